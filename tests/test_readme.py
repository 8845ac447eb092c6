from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text().splitlines()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    command = next(line for line in readme if "pytest" in line and not line.startswith("#"))
    assert command in ci
    first_block = readme[readme.index("```bash") + 1 : readme.index("```bash") + 5]
    assert command in first_block  # the test command is one of the README's two opening commands
