"""Typed errors raised by fxprune. Every error is an :class:`FxPruneError`."""
from __future__ import annotations

from typing import Any, Callable

__all__ = [
    "FxPruneError",
    "CaptureError",
    "InputError",
    "MaskError",
    "EquivalenceError",
    "UnsupportedError",
    "LoadError",
    "CheckpointError",
    "require",
]


class FxPruneError(Exception):
    """Base class of every error fxprune raises on purpose."""


class CaptureError(FxPruneError):
    """The model could not be turned into an FX graph by any tracer that was tried."""


class InputError(FxPruneError):
    """A bad argument: example inputs that do not fit the model (wrong shape, dtype, count or type), an object of
    the wrong kind where a model is expected, an option out of its range."""


class MaskError(InputError):
    """A mask request is invalid: sparsity out of range, wrong shape or dtype, unknown parameter (a bad argument,
    so also an :class:`InputError`)."""


class EquivalenceError(FxPruneError):
    """A rewrite failed its own equivalence check; no model is returned. ``rounding``: only the float64 half of the
    rounding rule failed (the float32 outputs lie within the model's own rounding), where the float64 twin of the
    rewrite may prove it (:func:`fxprune.passes.minimize.float64_twin`)."""

    rounding: bool = False


class UnsupportedError(FxPruneError):
    """The model holds something fxprune cannot process (NaN/Inf weights, unsupported dtype...)."""


class LoadError(FxPruneError):
    """A saved model cannot be loaded: a damaged or tampered file, or files that do not describe the model built."""


class CheckpointError(LoadError):
    """A cycle checkpoint cannot be resumed: a damaged file, a missing cycle, or one written for another model or
    other settings."""


# What an option may be: its types and its range, by the words the error message uses.
_KINDS: dict[str, tuple[tuple[type, ...], Callable[[Any], bool]]] = {
    "positive integer": ((int,), lambda v: v >= 1),
    "non-negative integer": ((int,), lambda v: v >= 0),
    "non-negative number": ((int, float), lambda v: v >= 0),
    "number in [0, 1)": ((int, float), lambda v: 0 <= v < 1),
    "number in [0, 1]": ((int, float), lambda v: 0 <= v <= 1),
}


def require(name: str, value: Any, kind: str, *, error: type[InputError] = InputError, note: str = "") -> None:
    """Raise ``error`` ("``name`` must be a ``kind````note``, got ``value``") unless ``value`` is a ``kind`` (one of
    ``_KINDS``; booleans are never numbers): the one check of every numeric option."""
    types, ok = _KINDS[kind]
    if not isinstance(value, types) or isinstance(value, bool) or not ok(value):
        raise error(f"{name} must be a {kind}{note}, got {value!r}")
