"""Engine errors: a backend that is unknown or not installed, an engine that does not fit this machine."""

from __future__ import annotations

from ertacache.errors import UserError


class UnknownBackendError(UserError):
    """A backend name that is not one of :data:`ertacache.engines.BACKENDS`."""


class BackendNotInstalledError(UserError):
    """A known backend whose Python package (or device) is missing here; the message names the pip extra."""


class EngineMismatchError(UserError):
    """An artifact made for another machine, library version, model or shape; the message names both sides."""


class EngineInactiveError(RuntimeError):
    """An engine used outside ``with engine:`` (a programming error, not bad input)."""
