"""``release``: the exact zeros left inside a minimized model become small, seeded noise (trainable again).

After :func:`~fxprune.minimize`, the kept tensors still hold the zeros of unstructured pruning. Release replaces
those zeros, and only those, in floating parameters with ndim >= 2 (the ones ``mask`` prunes). The noise of a
tensor is ``scale * std(surviving entries) * N(0, 1)``; with ``calibration`` inputs and a ``target``, ``scale``
is solved for so that the relative change of the outputs on those inputs is ``target``. Masks are dropped:
released positions train again. ``release`` returns the kind of object it was given (GraphModule or
ExportedProgram), as every pass does; its :class:`ReleaseReport` is ``ReleaseReport.of(result)``.
"""
from __future__ import annotations

import copy
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import torch
from torch import nn
from torch.export import ExportedProgram
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from fxprune.errors import InputError, require
from fxprune.graph.capture import EXAMPLE_INPUTS_KEY, as_inputs, check_weights
from fxprune.passes.mask import MASKS_KEY, bake_masks_, prunable
from fxprune.graph.exported import Program, exported_io

__all__ = ["release", "ReleaseReport", "Released", "RELEASE_KEY"]

RELEASE_KEY = "fxprune_release"  # result meta (an ExportedProgram's: its graph_module's): the ReleaseReport


@dataclass
class ReleaseReport:
    """What :func:`release` did: positions released per tensor, the scale used and the output change."""

    released: dict[str, int] = field(default_factory=dict)
    total: int = 0
    scale: float = 0.0
    deviation: float | None = None  # relative output change (Frobenius) on the calibration / example inputs

    def __str__(self) -> str:
        dev = "n/a (no inputs)" if self.deviation is None else f"{self.deviation:.3e}"
        return (f"released {self.total:,} zeros in {len(self.released)} tensors at scale {self.scale:.3g}; "
                f"relative output change {dev}")

    @staticmethod
    def of(released: nn.Module | ExportedProgram) -> "ReleaseReport":
        """The report of a module or program :func:`release` returned (a GraphModule's ``meta[RELEASE_KEY]``, a
        program's ``graph_module.meta[RELEASE_KEY]``; for a module of the user's own class, held beside it)."""
        meta = getattr(released.graph_module if isinstance(released, ExportedProgram) else released, "meta", None)
        report = meta.get(RELEASE_KEY) if isinstance(meta, dict) else _REPORTS.get(released)
        if not isinstance(report, ReleaseReport):
            raise InputError(f"this {type(released).__name__} did not come from fp.release (no release report)")
        return report


# reports of released modules of the user's own classes (no meta dict of theirs is touched); gone with the module
_REPORTS: "weakref.WeakKeyDictionary[nn.Module, ReleaseReport]" = weakref.WeakKeyDictionary()


class Released(NamedTuple):
    """What ``release`` returned before it returned the module itself (kept for code that names the type)."""

    module: GraphModule | ExportedProgram
    report: ReleaseReport


_OLD_API = ("fp.release returns the released module itself now (the kind it was given); its report is "
            "fp.ReleaseReport.of(module). Unpacking `module, report = fp.release(...)` and `.module`/`.report` on "
            "the result are deprecated and will be removed")


def _old_api(result: Any, report: ReleaseReport) -> Any:
    """Until its removal, the tuple API works on the result with a DeprecationWarning: ``freed, rep = release(...)``,
    and on a GraphModule ``.module`` and ``.report`` (unless a submodule or tensor has that name). A GraphModule
    instance has a class of its own, so only this result gains them; a program gets a subclass of its own for
    unpacking (its ``.module()`` stays the ExportedProgram method)."""
    def unpack(self: Any) -> Any:
        warnings.warn(_OLD_API, DeprecationWarning, stacklevel=2)
        return iter((self, report))

    def old(value: Callable[[Any], Any]) -> property:
        def get(self: Any) -> Any:
            warnings.warn(_OLD_API, DeprecationWarning, stacklevel=2)
            return value(self)
        return property(get)

    if isinstance(result, nn.Module) and not isinstance(result, GraphModule):
        return result  # the user's own class stays exactly that
    if isinstance(result, GraphModule):
        cls = type(result)
        cls.__iter__ = unpack
        for name, value in (("module", lambda m: m), ("report", lambda m: report)):
            if name not in result._modules and name not in result._parameters and name not in result._buffers:
                setattr(cls, name, old(value))
    else:
        result.__class__ = type(type(result).__name__, (type(result),), {"__iter__": unpack})
    return result


def _outputs(m: nn.Module, inputs: tuple[Any, ...]) -> torch.Tensor:
    with torch.no_grad():
        leaves = [t for t in pytree.tree_leaves(m(*inputs)) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return torch.cat([t.detach().double().flatten() for t in leaves])


def release(gm: Program, scale: float = 0.01, *, seed: int = 0, calibration: Sequence[Any] | None = None,
            target: float | None = None, include: Iterable[str] | None = None, exclude: Iterable[str] | None = None) -> Program:
    """Replace the exact zeros of the kept weights by seeded noise; return the released module (a GraphModule, or
    an ExportedProgram when given one). What it did: ``fp.ReleaseReport.of(result)``.

    >>> import torch, fxprune as fp
    >>> gm = fp.mask(fp.capture(torch.nn.Linear(8, 4), (torch.randn(2, 8),)), 0.5)
    >>> freed = fp.release(gm, scale=0.1, seed=0)
    >>> fp.ReleaseReport.of(freed).total, int((freed.get_parameter("weight") == 0).sum())
    (16, 0)
    """
    out = _release(gm, scale, seed=seed, calibration=calibration, target=target, include=include, exclude=exclude)
    return _old_api(out, ReleaseReport.of(out))


@exported_io
def _release(gm: Program, scale: float = 0.01, *, seed: int = 0, calibration: Sequence[Any] | None = None,
             target: float | None = None, include: Iterable[str] | None = None,
             exclude: Iterable[str] | None = None) -> Program:
    require("scale", scale, "non-negative number")
    if target is not None and calibration is None:
        raise InputError("target needs calibration inputs: pass calibration=(x, ...)")
    if target is not None and not target > 0:
        raise InputError(f"target must be a positive relative output change, got {target!r}")
    check_weights(gm, "release")
    out = bake_masks_(copy.deepcopy(gm))
    if isinstance(out, GraphModule):
        out.meta = {k: v for k, v in getattr(gm, "meta", {}).items() if k != MASKS_KEY}
    g = torch.Generator().manual_seed(seed)
    noise: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for name, p in sorted(prunable(out, include, exclude).items()):
        zero = p.detach() == 0
        alive = p.detach()[~zero]
        if not zero.any() or alive.numel() < 2:
            continue
        spread = alive.double().std()
        eps = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.device) * spread
        noise[name] = (p, zero, eps)
    report = ReleaseReport(released={n: int(z.sum()) for n, (_, z, _) in noise.items()})
    report.total = sum(report.released.values())
    originals = {n: p.detach().clone() for n, (p, _, _) in noise.items()}

    def apply(s: float) -> None:
        with torch.no_grad():
            for n, (p, zero, eps) in noise.items():
                p.copy_(torch.where(zero, (s * eps).to(p.dtype), originals[n]))

    inputs = as_inputs(calibration, gm) if calibration is not None else getattr(gm, "meta", {}).get(EXAMPLE_INPUTS_KEY)
    base = _outputs(out, inputs) if inputs is not None and noise else None

    def deviation() -> float:
        return float((_outputs(out, inputs) - base).norm() / base.norm().clamp_min(1e-30))

    s = float(scale)
    if target is not None and noise:
        s = s or 0.01
        for _ in range(8):  # the change is close to linear in the scale: a few secant steps
            apply(s)
            dev = deviation()
            if dev == 0 or abs(dev / target - 1) < 0.02:
                break
            s *= target / dev
    apply(s)
    report.scale = s
    report.deviation = deviation() if base is not None else None
    if isinstance(out, GraphModule):
        out.meta[RELEASE_KEY] = report
    else:
        _REPORTS[out] = report
    return out
