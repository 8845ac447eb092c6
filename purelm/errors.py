"""The one error family purelm raises for bad input."""


class PurelmError(Exception):
    """Base class: every error purelm raises on purpose derives from it."""


class FormatError(PurelmError):
    """A model file is corrupt, truncated, hostile or of an unsupported kind.

    The message names the file, the field and what was wrong.
    """

    def __init__(self, path: object, field: str, problem: str) -> None:
        self.path, self.field, self.problem = str(path), field, problem
        super().__init__(f"{self.path}: {field}: {problem}")


class ContextOverflowError(PurelmError):
    """A prompt (or prompt plus generation) does not fit in the model's context."""
