"""purelm: run GGUF language models from Python, with wheels only."""
from .errors import ContextOverflowError, DownloadError, FormatError, PurelmError, UsageError

__all__ = ["LLM", "load", "PurelmError", "FormatError", "ContextOverflowError", "UsageError",
           "DownloadError", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The API pulls in the tokenizer and the backends; import it only when asked, so that
    # `purelm info` and `import purelm.formats.gguf` stay quick.
    if name in ("LLM", "load"):
        from . import api

        return getattr(api, name)
    if name == "SamplingParams":
        from .sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'purelm' has no attribute {name!r}")
