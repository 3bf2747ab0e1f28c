"""One read of a tensor: the smallest and largest value of every slice along every dim.

That is all the analysis needs to know about a weight: a slice is constant where its min equals its max (zero rows
and columns are the constant-0 slices), and the tensor is finite where every min and max is (NaN propagates
through both). The tensor is read once, in blocks along dim 0 that stay in cache while every dim's reduction
runs over them, in its own dtype (min and max are exact in any dtype, so no float64 copy is made); the results,
a few numbers per slice, are widened to float64. Scans of parameters and buffers are kept (per tensor object,
while its version counter does not move), so ``check_weights`` and every analysis iteration share one read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.weak import WeakIdKeyDictionary

from fxprune.graph import lazy

__all__ = ["Scan", "scan", "fresh", "BLOCK_BYTES"]

BLOCK_BYTES = 1 << 20  # bytes of one block: about the size of a core's L2 cache


@dataclass(frozen=True)
class Scan:
    """Per dim ``d``: ``lo[d][i]`` and ``hi[d][i]``, the min and max of slice ``i`` along ``d`` (float64)."""

    lo: tuple[torch.Tensor, ...]
    hi: tuple[torch.Tensor, ...]

    @property
    def finite(self) -> bool:
        return bool(torch.isfinite(self.lo[0]).all() and torch.isfinite(self.hi[0]).all())

    @property
    def has_nan(self) -> bool:
        return bool(torch.isnan(self.hi[0]).any())

    def constant(self, d: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(known, value) of dim ``d``: slices that hold one finite value, and that value (0 elsewhere)."""
        lo, hi = self.lo[d], self.hi[d]
        known = (lo == hi) & torch.isfinite(hi)
        return known, torch.where(known, hi, torch.zeros_like(hi))


_CACHE: WeakIdKeyDictionary = WeakIdKeyDictionary()  # tensor -> (version, Scan); tensors compare by identity
_GENERATION = [0]  # kept scans of tensors in memory hold within one generation (one pass or analysis)


def fresh() -> None:
    """Start a new generation: the next scans of tensors in memory read them again. Each pass and ``fp.analyze``
    starts one, since a write through ``.data`` (``weight.data[:3] = 0``) moves no version counter. Weights left
    on disk (the streamed path) cannot change and stay kept."""
    _GENERATION[0] += 1


def generation() -> int:
    """The current generation (:func:`fresh`): what a cache of values read from tensors in memory keys on, with
    their version counters."""
    return _GENERATION[0]


def scan(t: torch.Tensor, keep: bool = False) -> Scan:
    """The :class:`Scan` of a floating tensor with at least one dim and one element. ``keep``: remember it for
    this tensor object while its version counter stays the same, within this generation (:func:`fresh`) for a
    tensor in memory (parameters and buffers)."""
    version = _version(t) if keep or lazy.is_lazy(t) else None
    if version is not None:
        version = (version, None, 0) if lazy.is_lazy(t) else (version, _GENERATION[0], t.data_ptr())
        hit = _CACHE.get(t)
        if hit is not None and hit[0] == version:
            return hit[1]
    data = lazy.value(t).detach()  # a weight left on disk (the streamed path) is read here, once
    if data.dim() == 1:
        v = data.to("cpu", torch.float64)
        out = Scan((v,), (v,))
    else:
        out = _blocks(data) if data.device.type == "cpu" else _whole(data)
    if version is not None:
        _CACHE[t] = (version, out)
    return out


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter: never cached
        return None


def _blocks(t: torch.Tensor) -> Scan:
    n = t.dim()
    row_bytes = max(1, t[0].numel() * t.element_size()) if t.shape[0] else 1
    step = max(1, BLOCK_BYTES // row_bytes)
    lo0, hi0 = [], []
    lo = [None] * n
    hi = [None] * n
    for i in range(0, t.shape[0], step):
        b = t[i:i + step]
        flat = b.reshape(b.shape[0], -1)
        lo0.append(flat.amin(dim=1))  # amin and amax run several times faster than aminmax here
        hi0.append(flat.amax(dim=1))
        for d in range(1, n):
            rest = tuple(j for j in range(n) if j != d)
            bl, bh = b.amin(dim=rest), b.amax(dim=rest)
            lo[d] = bl if lo[d] is None else torch.minimum(lo[d], bl)
            hi[d] = bh if hi[d] is None else torch.maximum(hi[d], bh)
    lo[0], hi[0] = torch.cat(lo0), torch.cat(hi0)
    return Scan(tuple(x.to(torch.float64) for x in lo), tuple(x.to(torch.float64) for x in hi))


def _whole(t: torch.Tensor) -> Scan:
    """The scan of a tensor on an accelerator: one reduction per dim over the whole tensor there (blocks sized for
    a CPU cache would only launch more kernels), the few numbers per slice brought to the CPU, where the analysis
    works."""
    n = t.dim()
    rest = [tuple(j for j in range(n) if j != d) for d in range(n)]
    lo = [t.amin(dim=r).to("cpu", torch.float64) for r in rest]
    hi = [t.amax(dim=r).to("cpu", torch.float64) for r in rest]
    return Scan(tuple(lo), tuple(hi))
