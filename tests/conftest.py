import os
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


def smollm2_file() -> Path:
    """The real SmolLM2 Q4_1 file: $PURELM_SMOLLM2, else the purelm cache (pulled if absent, so these
    tests run rather than skip; `purelm pull smollm2` beforehand avoids the download inside the run)."""
    env = os.environ.get("PURELM_SMOLLM2")
    if env:
        return Path(env)
    from purelm.hub import pull

    return pull("smollm2")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return smollm2_file()


@pytest.fixture(scope="session")
def fixtures() -> Path:
    return FIXTURES
