"""Errors that say what was wrong, what was expected and what to do."""
from __future__ import annotations


class InterpError(Exception):
    """Base class of every error interp raises on purpose."""


class UnknownSiteError(InterpError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class SiteShapeError(InterpError, ValueError):
    """A source, vector or selection does not fit the site's tensor."""


class PositionError(InterpError, IndexError):
    """Positions, heads or tokens that the input does not have."""


class OpNeverFiredError(InterpError, RuntimeError):
    """An op's site never ran during the forward pass."""


class UnsupportedModelError(InterpError, TypeError):
    """attach() was given an object no adapter understands."""


class OfflineModelError(InterpError, RuntimeError):
    """A model cannot be loaded on this machine (package missing, hub unreachable)."""


class SpecError(InterpError, ValueError):
    """An op, a position / step spec or a run option is malformed (refused where it is written)."""


class PositionSpecError(SpecError, PositionError):
    """A malformed position spec (a SpecError that is also a PositionError)."""
