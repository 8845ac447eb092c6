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


class UsageError(PurelmError, ValueError):
    """An argument given to the API or the command line is out of range or of the wrong type.

    Also a ValueError, so code written against the standard exception keeps working."""


class MemoryLimitError(UsageError):
    """More memory is asked for than the host (or the device) has available: a KV cache for more
    sequences or positions than fit. Raised before the allocation, never by the OOM killer."""


class TemplateError(PurelmError):
    """A chat template failed to compile or render: a syntax error, an error it raised itself
    (`raise_exception`), something the sandbox refuses (a model file is untrusted input), or a limit
    on its work or output."""


class GenerationError(PurelmError):
    """Generation could not go on: a grammar that allows no next token, a forward pass that failed
    inside the server's engine (which answers 500 with this message)."""


class DownloadError(PurelmError):
    """A model download failed, was interrupted or does not match its checksum."""


class ShapeError(PurelmError, ValueError):
    """An op was handed arrays whose shapes do not fit together. Every backend checks at each
    kernel's entry, so a model whose hyperparameters slipped past the loader's checks fails here
    instead of reading or writing memory it does not own."""
