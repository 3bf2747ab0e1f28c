"""``release``: the exact zeros left inside a minimized model become small, seeded noise (trainable again).

After :func:`~fxprune.minimize`, the kept tensors still hold the zeros of unstructured pruning. Release replaces
those zeros, and only those, in floating parameters with ndim >= 2 (the ones ``mask`` prunes). The noise of a
tensor is ``scale * std(surviving entries) * N(0, 1)``; with ``calibration`` inputs and a ``target``, ``scale``
is solved for so that the relative change of the outputs on those inputs is ``target``. Masks are dropped:
released positions train again.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Iterable, NamedTuple, Sequence

import torch
from torch import nn
from torch.export import ExportedProgram
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from fxprune.errors import InputError, require
from fxprune.graph.capture import EXAMPLE_INPUTS_KEY, as_inputs, check_weights
from fxprune.passes.mask import MASKS_KEY, bake_masks_, prunable
from fxprune.graph.exported import Program, exported_io

__all__ = ["release", "ReleaseReport", "Released"]


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


class Released(NamedTuple):
    module: GraphModule | ExportedProgram  # the kind of object release was given
    report: ReleaseReport


def _outputs(m: nn.Module, inputs: tuple[Any, ...]) -> torch.Tensor:
    with torch.no_grad():
        leaves = [t for t in pytree.tree_leaves(m(*inputs)) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return torch.cat([t.detach().double().flatten() for t in leaves])


@exported_io
def release(gm: Program, scale: float = 0.01, *, seed: int = 0, calibration: Sequence[Any] | None = None,
            target: float | None = None, include: Iterable[str] | None = None, exclude: Iterable[str] | None = None) -> Released:
    """Replace the exact zeros of the kept weights by seeded noise; return ``(module, report)``.

    >>> import torch, fxprune as fp
    >>> gm = fp.mask(fp.capture(torch.nn.Linear(8, 4), (torch.randn(2, 8),)), 0.5)
    >>> freed, rep = fp.release(gm, scale=0.1, seed=0)
    >>> rep.total, int((freed.get_parameter("weight") == 0).sum())
    (16, 0)
    """
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
        eps = torch.randn(p.shape, generator=g, dtype=torch.float64) * spread
        noise[name] = (p, zero, eps)
    report = ReleaseReport(released={n: int(z.sum()) for n, (_, z, _) in noise.items()})
    report.total = sum(report.released.values())
    originals = {n: p.detach().clone() for n, (p, _, _) in noise.items()}

    def apply(s: float) -> None:
        with torch.no_grad():
            for n, (p, zero, eps) in noise.items():
                p.copy_(torch.where(zero, (s * eps).to(p.dtype), originals[n]))

    inputs = as_inputs(calibration) if calibration is not None else getattr(gm, "meta", {}).get(EXAMPLE_INPUTS_KEY)
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
    return Released(out, report)
