"""One exception base for the package.

`UserError` is raised for bad input that the user can fix (a wrong flag, a
profile made for another model, a corrupt file); its message names the
problem and the fix. Anything else that escapes is an internal bug.
"""


class ErtaCacheError(Exception):
    """Base of every error this package raises on purpose."""


class UserError(ErtaCacheError):
    """Bad input: the message says what is wrong and how to fix it."""


class ProfileError(UserError):
    """A profile folder that is missing, corrupt, or made for something else."""


class ModelNotFoundError(UserError):
    """Model weights that are neither local nor in the hub cache."""


class ModelFilesError(ModelNotFoundError):
    """A model folder with a weights file missing, truncated or unreadable (an interrupted copy or download)."""


class NumericalError(ErtaCacheError):
    """NaN or Inf appeared in a model output; the message names the step."""


class PromptError(UserError, ValueError):
    """A prompt the model's text encoder cannot encode (unknown words, too long); a ValueError too."""


def brief(value: object, limit: int = 80) -> str:
    """``repr(value)`` capped at ``limit`` characters: error messages never echo megabytes of input."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
