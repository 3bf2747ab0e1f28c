"""LayerNorm, RMSNorm and GroupNorm over the kept channels of a stream, with the statistics of the whole
original stream.

When channels of a normalized stream are removed, plain slicing is wrong: the mean and variance are then
taken over fewer channels. If the removed channels held known constants ``c`` (zero, usually), the full
statistics are still computable from the kept channels ``x_K``::

    mean = (sum_K x + sum_R c) / D
    var  = (sum_K (x - mean)^2 + sum_R (c - mean)^2) / D
         = (sum_K (x - mean)^2 + S2 - 2 mean S1 + n_R mean^2) / D        (S1 = sum_R c, S2 = sum_R c^2)

with ``D`` the original width and ``n_R = D - |K|``. A GroupNorm with one group normalizes over the channels and
every position; a removed channel holds its constant at every position, so the same sums per position, times the
number of positions (read off the input at run time), give its statistics. A GroupNorm with several groups does
the same per group (each group's statistics are its own): the kept channels of the groups are what is left of
them, and the removed ones are put back as constants with each group's sums. The functions are plain torch code, so
torch.export traces them into ATen ops; :func:`torch.fx.wrap` keeps them one call under symbolic tracing.

Run eagerly (no tracer recording), :func:`compensated_layer_norm` computes the same function as the norm
itself: the removed entries are put back as ``n_R`` values with sum ``S1`` and sum of squares ``S2`` (the
zeros they were, usually), one ``F.layer_norm`` runs over the ``D`` entries, and its kept part is scaled and
shifted. That is three kernels where the statistics written out take seventeen: on a GPU, where a small
model's time is the kernels it launches, a compressed transformer ran slower than the dense one. Traced
(torch.export, torch.compile, make_fx), the statistics are written out: a compiler fuses them, and fxprune's
analysis reads them.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.experimental.proxy_tensor import get_proxy_mode

__all__ = ["compensated_layer_norm", "compensated_group_norm", "compensated_rms_norm", "compensated_softmax",
           "CompensatedLayerNorm", "CompensatedGroupNorm", "CompensatedRMSNorm"]


def compensated_layer_norm(input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                           full_size: int, removed_sum: float = 0.0, removed_sq_sum: float = 0.0,
                           ndim: int = 1) -> torch.Tensor:
    """LayerNorm over the last ``ndim`` dims of ``input`` as if ``full_size`` minus their element count removed
    entries with constant values (sum ``removed_sum``, sum of squares ``removed_sq_sum``) were still there."""
    if not _traced(input):
        return _layer_norm_eagerly(input, weight, bias, eps, full_size, removed_sum, removed_sq_sum, ndim)
    dims = tuple(range(-ndim, 0))
    kept = 1
    for n in input.shape[-ndim:]:
        kept = kept * n
    n_removed = full_size - kept
    mean = (input.sum(dims, keepdim=True) + removed_sum) / full_size
    centered = input - mean
    removed_var = removed_sq_sum - 2.0 * removed_sum * mean + n_removed * mean * mean
    var = ((centered * centered).sum(dims, keepdim=True) + removed_var) / full_size
    out = centered * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


def _traced(x: torch.Tensor) -> bool:
    """Whether a tracer records this call (torch.compile, torch.export, make_fx, a symbolic or fake-tensor run)."""
    return (torch.compiler.is_compiling() or isinstance(x, (torch.fx.Proxy, FakeTensor)) or x.device.type == "meta"
            or get_proxy_mode() is not None)


def _layer_norm_eagerly(input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                        full_size: int, removed_sum: float, removed_sq_sum: float, ndim: int) -> torch.Tensor:
    """:func:`compensated_layer_norm` as one ``F.layer_norm`` over the full width (the module's docstring)."""
    flat = input if ndim == 1 else input.flatten(-ndim)
    kept = flat.shape[-1]
    n = full_size - kept
    if n == 0:
        return F.layer_norm(input, input.shape[-ndim:], weight, bias, eps)
    values = _removed_values(n, removed_sum, removed_sq_sum, flat)
    if isinstance(values, float):  # all alike: one value
        full = F.pad(flat, (0, n), value=values)
    else:
        full = torch.cat([flat, values.expand(*flat.shape[:-1], n)], -1)
    normed = F.layer_norm(full, (full_size,), None, None, eps)[..., :kept]
    if ndim != 1:
        normed = normed.unflatten(-1, input.shape[-ndim:])
    return _affine(normed, weight, bias)


def _affine(normed: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
            shape: tuple[int, ...] | None = None, fused: bool = True) -> torch.Tensor:
    """``normed * weight + bias`` (either may be None; reshaped to ``shape`` where given: a group norm's channels at
    dim 1), contiguous. ``fused``: one ``addcmul`` (eager); otherwise a mul and an add, which fxprune's analysis
    follows where a trace records them."""
    if shape is not None:
        weight = weight.reshape(shape) if weight is not None else None
        bias = bias.reshape(shape) if bias is not None else None
    if weight is not None and bias is not None and fused:
        return torch.addcmul(bias, normed, weight)
    if weight is not None:
        normed = normed * weight
    return normed + bias if bias is not None else normed.contiguous()


def compensated_group_norm(input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                           full_channels: int, removed_sum: float | tuple[float, ...] = 0.0,
                           removed_sq_sum: float | tuple[float, ...] = 0.0,
                           kept_per_group: tuple[int, ...] | None = None) -> torch.Tensor:
    """GroupNorm with one group (``nn.GroupNorm(1, C)``: statistics over the channels and every position of
    ``input``, shaped (N, C, *spatial)) as if ``full_channels`` minus C removed channels were still there, each
    holding one constant at every position; per position their constants sum to ``removed_sum``, their squares to
    ``removed_sq_sum``. The number of positions is read off ``input``, so any spatial size gives the original's
    statistics. The affine is per channel, as GroupNorm's.

    ``kept_per_group``: GroupNorm with ``len(kept_per_group)`` groups of ``full_channels / G`` channels each, of
    which ``input`` holds the first ``kept_per_group[0]`` channels for group 0, then group 1's, and so on;
    ``removed_sum`` and ``removed_sq_sum`` are then per group (:func:`_grouped_norm`)."""
    if kept_per_group is not None:
        return _grouped_norm(input, weight, bias, eps, full_channels, removed_sum, removed_sq_sum, kept_per_group)
    kept = input.shape[1]
    shape = (kept,) + (1,) * (input.dim() - 2)
    if not _traced(input):  # one F.group_norm over the channels put back (as _layer_norm_eagerly does)
        n = full_channels - kept
        full = input
        if n:
            values = _removed_values(n, removed_sum, removed_sq_sum, input)
            values = input.new_full((n,), values) if isinstance(values, float) else values
            full = torch.cat([input, values.reshape(1, n, *(1,) * (input.dim() - 2)).expand(
                input.shape[0], n, *input.shape[2:])], 1)
        return _affine(F.group_norm(full, 1, None, None, eps)[:, :kept], weight, bias, shape)
    # per channel its mean and variance over the positions, then over the channels (the law of total variance:
    # within the channels plus between them). A removed channel's mean over any number of positions is its
    # constant and its variance zero, so fxprune's analysis can remove more channels from this form too.
    spatial = tuple(range(2, input.dim()))
    per_channel = (lambda t: t.mean(spatial, keepdim=True)) if spatial else (lambda t: t)
    mu = per_channel(input)
    mean = (mu.sum(1, keepdim=True) + removed_sum) / full_channels
    within = per_channel((input - mu) * (input - mu))
    removed_var = removed_sq_sum - 2.0 * removed_sum * mean + (full_channels - kept) * mean * mean
    var = ((within + (mu - mean) * (mu - mean)).sum(1, keepdim=True) + removed_var) / full_channels
    centered = input - mean
    out = centered * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight.reshape(shape)
    if bias is not None:
        out = out + bias.reshape(shape)
    return out


def _grouped_norm(input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                  full_channels: int, removed_sum: tuple[float, ...], removed_sq_sum: tuple[float, ...],
                  kept_per_group: tuple[int, ...]) -> torch.Tensor:
    """:func:`compensated_group_norm` with several groups. A group's statistics are its own, and they read its
    removed channels only through the sum and the sum of squares of their constants; the order of a group's
    channels does not enter. So each group's removed channels are put back after its kept ones, as at most three
    runs of constants with those sums (:func:`_removed_runs`), one ``F.group_norm`` with G groups normalizes the
    whole, and each group's kept channels are taken back out.

    Eagerly that is one gather in, the norm, one gather out. Traced (torch.export), the same is written as slices
    of the input, filled constants, a cat, the norm, slices and a cat: ops whose channels fxprune's analysis
    follows, so a second ``minimize`` of the exported model removes more of them (a gather's index it cannot)."""
    G = len(kept_per_group)
    per, kept = full_channels // G, input.shape[1]
    if per * G != full_channels or sum(kept_per_group) != kept or not all(0 <= k <= per for k in kept_per_group):
        raise ValueError(f"kept_per_group={tuple(kept_per_group)} does not fit {kept} input channels in {G} groups of "
                         f"{full_channels} channels")
    runs = [_removed_runs(per - k, float(removed_sum[g]), float(removed_sq_sum[g])) if k < per else []
            for g, k in enumerate(kept_per_group)]
    traced = _traced(input)
    if not any(runs):
        normed = F.group_norm(input, G, None, None, eps)
    elif traced:  # slices and a cat (ExecuTorch runs a split only at the batch size it was exported at)
        pieces, start = [], 0
        for k, group in zip(kept_per_group, runs):
            if k:
                pieces.append(input[:, start:start + k])
                start += k
            pieces += [input.new_full((input.shape[0], n, *input.shape[2:]), v) for n, v in group]
        normed = F.group_norm(torch.cat(pieces, 1), G, None, None, eps)
        normed = torch.cat([normed[:, g * per:g * per + k] for g, k in enumerate(kept_per_group) if k], 1)
    else:
        order, positions, values = [], [], []
        start, extra = 0, kept
        for g, (k, group) in enumerate(zip(kept_per_group, runs)):
            order += range(start, start + k)
            positions += range(g * per, g * per + k)
            start += k
            order += range(extra, extra + per - k)
            extra += per - k
            values += [float(v) for n, v in group for _ in range(n)]
        const = torch.tensor(values, dtype=input.dtype, device=input.device)
        const = const.reshape(1, -1, *(1,) * (input.dim() - 2)).expand(input.shape[0], -1, *input.shape[2:])
        full = torch.cat([input, const], 1).index_select(1, torch.tensor(order, device=input.device))
        normed = F.group_norm(full, G, None, None, eps).index_select(1, torch.tensor(positions, device=input.device))
    return _affine(normed, weight, bias, (kept,) + (1,) * (input.dim() - 2), fused=not traced)


def shrunk_groups(kept_per_group: tuple[int, ...], removed_sum: tuple[float, ...], removed_sq_sum: tuple[float, ...],
                  keep: torch.Tensor, removed_values: torch.Tensor) -> tuple[tuple[int, ...], tuple[float, ...],
                                                                         tuple[float, ...]]:
    """A grouped compensated norm's ``kept_per_group`` and removed sums per group once the channels where ``keep``
    (over its kept channels, group after group) is False are gone too, holding ``removed_values`` (one each, in
    channel order). A group that keeps no channel is dropped: its statistics are its own."""
    groups: list[int] = []
    s1: list[float] = []
    s2: list[float] = []
    at = 0
    values = torch.as_tensor(removed_values, dtype=torch.float64).flatten()
    for g, mask in enumerate(torch.as_tensor(keep, dtype=torch.bool).split(list(kept_per_group))):
        gone = values[at:at + int((~mask).sum())]
        at += len(gone)
        if bool(mask.any()):
            groups.append(int(mask.sum()))
            s1.append(float(removed_sum[g]) + float(gone.sum()))
            s2.append(float(removed_sq_sum[g]) + float((gone * gone).sum()))
    return tuple(groups), tuple(s1), tuple(s2)


def _removed_runs(n: int, removed_sum: float, removed_sq_sum: float) -> list[tuple[int, float]]:
    """``n > 0`` values with sum ``removed_sum`` and sum of squares ``removed_sq_sum``, as runs (count, value): one
    run where all are alike (zeros, usually), else the mean (``n`` odd), then as many of mean + d as of mean - d."""
    mean = removed_sum / n
    spread = math.sqrt(max(removed_sq_sum / n - mean * mean, 0.0))
    if spread == 0.0 or n == 1:
        return [(n, mean)]
    odd = n % 2
    d = spread * math.sqrt(n / (n - odd))
    pairs = (n - odd) // 2
    return [r for r in ((odd, mean), (pairs, mean + d), (pairs, mean - d)) if r[0]]


def _removed_values(n: int, removed_sum: float, removed_sq_sum: float, like: torch.Tensor) -> float | torch.Tensor:
    """``n > 0`` values with sum ``removed_sum`` and sum of squares ``removed_sq_sum`` (their statistics are all a
    norm reads of the removed entries): their one value where all are alike (zeros, usually), else a tensor like
    ``like`` of :func:`_removed_runs`'s runs."""
    runs = _removed_runs(n, removed_sum, removed_sq_sum)
    if len(runs) == 1:
        return runs[0][1]
    return torch.cat([like.new_full((count,), v) for count, v in runs])


def compensated_rms_norm(input: torch.Tensor, weight: torch.Tensor | None, eps: float | None, full_size: int,
                         removed_sq_sum: float = 0.0, ndim: int = 1, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm over the last ``ndim`` dims of ``input`` with the mean square of the full original stream, scaled by
    ``offset + weight`` (``offset=1``: Gemma's norms, whose weight is stored as the scale less one)."""
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    mean_sq = ((input * input).sum(tuple(range(-ndim, 0)), keepdim=True) + removed_sq_sum) / full_size
    out = input * torch.rsqrt(mean_sq + eps)
    if weight is None:
        return out
    return out * (offset + weight) if offset else out * weight


def compensated_softmax(input: torch.Tensor, dim: int, removed_lse: float, log: bool = False,
                        dtype: torch.dtype | None = None) -> torch.Tensor:
    """Softmax (``log``: log-softmax) over ``dim`` of the kept channels, normalized as if removed channels whose
    constant logits have log-sum-exp ``removed_lse`` were still there: ``exp(x - logaddexp(lse(x), removed_lse))``.
    ``dtype``: computed in and returned as that dtype (softmax's ``dtype=``, aten's ``half_to_float``)."""
    if dtype is not None:
        input = input.to(dtype)
    lse = torch.logaddexp(torch.logsumexp(input, dim, keepdim=True), torch.full((), removed_lse, dtype=input.dtype))
    return input - lse if log else torch.exp(input - lse)


torch.fx.wrap("compensated_layer_norm")
torch.fx.wrap("compensated_rms_norm")
torch.fx.wrap("compensated_group_norm")
torch.fx.wrap("compensated_softmax")


def _constants(keep: torch.Tensor, size: int, removed_values: torch.Tensor | None) -> torch.Tensor:
    keep = torch.as_tensor(keep, dtype=torch.bool)
    if keep.shape != (size,):
        raise ValueError(f"keep must be a bool mask of shape ({size},), got {tuple(keep.shape)}")
    if not keep.any():
        raise ValueError("keep at least one channel")
    n = int((~keep).sum())
    values = torch.zeros(n, dtype=torch.float64) if removed_values is None else torch.as_tensor(removed_values, dtype=torch.float64).flatten()
    if values.numel() != n:
        raise ValueError(f"removed_values must hold one constant per removed channel ({n}), got {values.numel()}")
    return values


def _take_affine(out: nn.Module, src: nn.Module, keep: torch.Tensor | None) -> nn.Module:
    """``out`` with copies of ``src``'s weight and bias (those it has): the entries ``keep`` selects, or all."""
    with torch.no_grad():
        for name in ("weight", "bias"):
            p = getattr(src, name, None)
            if p is not None:
                setattr(out, name, nn.Parameter(p.detach()[keep].clone() if keep is not None else p.detach().clone(),
                                                requires_grad=p.requires_grad))
    return out


class CompensatedLayerNorm(nn.Module):
    """LayerNorm of the kept channels of a stream whose other ``full_size - kept`` channels were removed while
    holding known constants. With nothing removed it is ``nn.LayerNorm(kept)``.

    >>> import torch
    >>> ln = torch.nn.LayerNorm(6).double()
    >>> x = torch.randn(2, 6, dtype=torch.float64); x[:, 4:] = 0.0      # channels 4, 5 are always zero
    >>> keep = torch.tensor([True] * 4 + [False] * 2)
    >>> small = CompensatedLayerNorm.from_layer_norm(ln).shrink(keep)
    >>> small
    CompensatedLayerNorm(4, full_size=6, removed_sum=0.0, removed_sq_sum=0.0, eps=1e-05)
    >>> torch.allclose(small(x[:, :4]), ln(x)[:, :4], rtol=1e-12, atol=1e-12)
    True
    """

    def __init__(self, kept: int, full_size: int | None = None, eps: float = 1e-5, removed_sum: float = 0.0,
                 removed_sq_sum: float = 0.0, elementwise_affine: bool = True, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        full_size = kept if full_size is None else full_size
        if not 0 < kept <= full_size:
            raise ValueError(f"need 0 < kept <= full_size, got kept={kept}, full_size={full_size}")
        self.kept, self.full_size, self.eps = int(kept), int(full_size), float(eps)
        self.removed_sum, self.removed_sq_sum = float(removed_sum), float(removed_sq_sum)
        self.weight = nn.Parameter(torch.ones(kept, device=device, dtype=dtype)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(kept, device=device, dtype=dtype)) if elementwise_affine and bias else None

    @classmethod
    def from_layer_norm(cls, ln: nn.LayerNorm) -> "CompensatedLayerNorm":
        """The equivalent module of a one-dim ``nn.LayerNorm`` (parameters copied)."""
        if len(ln.normalized_shape) != 1:
            raise ValueError(f"only LayerNorm over one dim can be compensated, got normalized_shape={tuple(ln.normalized_shape)}")
        return cls._copy(ln, ln.normalized_shape[0], ln.normalized_shape[0], ln.eps, 0.0, 0.0)

    @classmethod
    def _copy(cls, src: nn.Module, kept: int, full: int, eps: float, s1: float, s2: float,
              keep: torch.Tensor | None = None) -> "CompensatedLayerNorm":
        w, b = getattr(src, "weight", None), getattr(src, "bias", None)
        return _take_affine(cls(kept, full, eps, s1, s2, elementwise_affine=w is not None, bias=b is not None), src, keep)

    def shrink(self, keep: torch.Tensor, removed_values: torch.Tensor | None = None) -> "CompensatedLayerNorm":
        """A new module over the channels where ``keep`` is True; the others are known to hold
        ``removed_values`` (zeros by default) in every input."""
        c = _constants(keep, self.kept, removed_values)
        return self._copy(self, int(torch.as_tensor(keep).sum()), self.full_size, self.eps,
                          self.removed_sum + float(c.sum()), self.removed_sq_sum + float((c * c).sum()), torch.as_tensor(keep, dtype=torch.bool))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return compensated_layer_norm(input, self.weight, self.bias, self.eps, self.full_size, self.removed_sum, self.removed_sq_sum)

    def extra_repr(self) -> str:
        return (f"{self.kept}, full_size={self.full_size}, removed_sum={self.removed_sum!r}, "
                f"removed_sq_sum={self.removed_sq_sum!r}, eps={self.eps!r}")


class CompensatedGroupNorm(nn.Module):
    """``nn.GroupNorm`` over the kept channels of a stream whose other ``full_channels - kept`` channels were
    removed while holding known constants (one per channel, the same at every position). With nothing removed it
    is ``nn.GroupNorm(1, kept)``, or with ``kept_per_group`` (G groups, see :func:`compensated_group_norm`)
    ``nn.GroupNorm(G, kept)``.

    >>> import torch
    >>> gn = torch.nn.GroupNorm(1, 6).double()
    >>> x = torch.randn(2, 6, 5, 5, dtype=torch.float64); x[:, 4:] = 0.0      # channels 4, 5 are always zero
    >>> keep = torch.tensor([True] * 4 + [False] * 2)
    >>> small = CompensatedGroupNorm.from_group_norm(gn).shrink(keep)
    >>> small
    CompensatedGroupNorm(4, full_channels=6, removed_sum=0.0, removed_sq_sum=0.0, eps=1e-05)
    >>> torch.allclose(small(x[:, :4, :3]), gn(x[:, :, :3])[:, :4], rtol=1e-12, atol=1e-12)   # at any size
    True
    >>> gn3 = torch.nn.GroupNorm(3, 6).double()                      # three groups of two: (0, 1), (2, 3), (4, 5)
    >>> x[:, 1] = 0.5                                                # channel 1 holds 0.5 everywhere
    >>> keep = torch.tensor([True, False, True, True, True, False])
    >>> small = CompensatedGroupNorm.from_group_norm(gn3).shrink(keep, torch.tensor([0.5, 0.0]))
    >>> small.kept_per_group, small.removed_sum
    ((1, 2, 1), (0.5, 0.0, 0.0))
    >>> torch.allclose(small(x[:, keep]), gn3(x)[:, keep], rtol=1e-12, atol=1e-12)
    True
    """

    def __init__(self, kept: int, full_channels: int | None = None, eps: float = 1e-5,
                 removed_sum: float | tuple[float, ...] = 0.0, removed_sq_sum: float | tuple[float, ...] = 0.0,
                 affine: bool = True, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 kept_per_group: tuple[int, ...] | None = None) -> None:
        super().__init__()
        full_channels = kept if full_channels is None else full_channels
        if not 0 < kept <= full_channels:
            raise ValueError(f"need 0 < kept <= full_channels, got kept={kept}, full_channels={full_channels}")
        self.kept, self.full_channels, self.eps = int(kept), int(full_channels), float(eps)
        if kept_per_group is None:
            self.kept_per_group = None
            self.removed_sum, self.removed_sq_sum = float(removed_sum), float(removed_sq_sum)  # type: ignore[arg-type]
        else:
            G = len(kept_per_group)
            self.kept_per_group = tuple(int(k) for k in kept_per_group)
            self.removed_sum, self.removed_sq_sum = (
                tuple(float(v) for v in s) if isinstance(s, (tuple, list)) else (float(s),) * G
                for s in (removed_sum, removed_sq_sum))
            if (G == 0 or full_channels % G or sum(self.kept_per_group) != kept
                    or not all(0 <= k <= full_channels // G for k in self.kept_per_group)
                    or len(self.removed_sum) != G or len(self.removed_sq_sum) != G):
                raise ValueError(f"kept_per_group={self.kept_per_group} (and one removed sum per group) does not "
                                 f"fit kept={kept} channels in groups of a full width of {full_channels}")
        self.weight = nn.Parameter(torch.ones(kept, device=device, dtype=dtype)) if affine else None
        self.bias = nn.Parameter(torch.zeros(kept, device=device, dtype=dtype)) if affine else None

    @classmethod
    def from_group_norm(cls, gn: nn.GroupNorm) -> "CompensatedGroupNorm":
        """The equivalent module of an ``nn.GroupNorm`` (parameters copied)."""
        G, C = gn.num_groups, gn.num_channels
        if G == 1:
            return cls._copy(gn, C, C, gn.eps, 0.0, 0.0)
        return cls._copy(gn, C, C, gn.eps, (0.0,) * G, (0.0,) * G, groups=(C // G,) * G)

    @classmethod
    def _copy(cls, src: nn.Module, kept: int, full: int, eps: float, s1: Any, s2: Any,
              keep: torch.Tensor | None = None, groups: tuple[int, ...] | None = None) -> "CompensatedGroupNorm":
        return _take_affine(cls(kept, full, eps, s1, s2, affine=getattr(src, "weight", None) is not None,
                                kept_per_group=groups), src, keep)

    def shrink(self, keep: torch.Tensor, removed_values: torch.Tensor | None = None) -> "CompensatedGroupNorm":
        """A new module over the channels where ``keep`` is True; the others are known to hold
        ``removed_values`` (zeros by default) at every position of every input. A group that keeps no channel
        goes whole (its statistics are its own)."""
        c = _constants(keep, self.kept, removed_values)
        keep = torch.as_tensor(keep, dtype=torch.bool)
        if self.kept_per_group is None:
            return self._copy(self, int(keep.sum()), self.full_channels, self.eps,
                              self.removed_sum + float(c.sum()), self.removed_sq_sum + float((c * c).sum()), keep)
        per = self.full_channels // len(self.kept_per_group)
        groups, s1, s2 = shrunk_groups(self.kept_per_group, self.removed_sum, self.removed_sq_sum, keep, c)
        return self._copy(self, int(keep.sum()), per * len(groups), self.eps, s1, s2, keep, groups)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out = compensated_group_norm(input, self.weight, self.bias, self.eps, self.full_channels, self.removed_sum,
                                     self.removed_sq_sum, self.kept_per_group)
        act = self._modules.get("activation")  # (a norm whose class applies its activation too: BiT's)
        return out if act is None else act(out)

    def extra_repr(self) -> str:
        groups = f", kept_per_group={self.kept_per_group}" if self.kept_per_group is not None else ""
        return (f"{self.kept}, full_channels={self.full_channels}, removed_sum={self.removed_sum!r}, "
                f"removed_sq_sum={self.removed_sq_sum!r}, eps={self.eps!r}{groups}")


class CompensatedRMSNorm(nn.Module):
    """RMSNorm of the kept channels with the mean square of the full original stream (see
    :class:`CompensatedLayerNorm`)."""

    def __init__(self, kept: int, full_size: int | None = None, eps: float | None = None, removed_sq_sum: float = 0.0,
                 elementwise_affine: bool = True, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 offset: float = 0.0) -> None:
        super().__init__()
        full_size = kept if full_size is None else full_size
        if not 0 < kept <= full_size:
            raise ValueError(f"need 0 < kept <= full_size, got kept={kept}, full_size={full_size}")
        self.kept, self.full_size, self.eps, self.removed_sq_sum = int(kept), int(full_size), eps, float(removed_sq_sum)
        self.offset = float(offset)  # the scale is offset + weight (1.0: Gemma's norms)
        self.weight = nn.Parameter(torch.ones(kept, device=device, dtype=dtype)) if elementwise_affine else None

    @classmethod
    def from_rms_norm(cls, norm: nn.Module) -> "CompensatedRMSNorm":
        """The equivalent module of a one-dim ``nn.RMSNorm`` (parameters copied)."""
        shape = tuple(norm.normalized_shape)
        if len(shape) != 1:
            raise ValueError(f"only RMSNorm over one dim can be compensated, got normalized_shape={shape}")
        return cls._copy(norm, shape[0], shape[0], norm.eps, 0.0)

    @classmethod
    def _copy(cls, src: nn.Module, kept: int, full: int, eps: float | None, s2: float, keep: torch.Tensor | None = None) -> "CompensatedRMSNorm":
        w = getattr(src, "weight", None)
        out = cls(kept, full, eps, s2, elementwise_affine=w is not None, offset=getattr(src, "offset", 0.0))
        if w is not None:
            out.weight = nn.Parameter(w.detach()[keep].clone() if keep is not None else w.detach().clone(), requires_grad=w.requires_grad)
        return out

    def shrink(self, keep: torch.Tensor, removed_values: torch.Tensor | None = None) -> "CompensatedRMSNorm":
        """A new module over the channels where ``keep`` is True (the others hold ``removed_values``)."""
        c = _constants(keep, self.kept, removed_values)
        return self._copy(self, int(torch.as_tensor(keep).sum()), self.full_size, self.eps,
                          self.removed_sq_sum + float((c * c).sum()), torch.as_tensor(keep, dtype=torch.bool))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return compensated_rms_norm(input, self.weight, self.eps, self.full_size, self.removed_sq_sum,
                                    offset=self.offset)

    def extra_repr(self) -> str:
        offset = f", offset={self.offset!r}" if self.offset else ""
        return f"{self.kept}, full_size={self.full_size}, removed_sq_sum={self.removed_sq_sum!r}, eps={self.eps!r}{offset}"


class _CompensatedLayerNormBase(nn.LayerNorm):
    """``nn.LayerNorm`` whose forward is :func:`compensated_layer_norm` (statistics of the full stream): the base a
    LayerNorm subclass with its own forward reaches through ``super().forward`` (:func:`compensated_subclass`)."""

    full_size: int
    removed_sum: float
    removed_sq_sum: float
    _fxprune_compensates: tuple[type, bool]  # (the user's class, channels_first), set on each subclass

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return compensated_layer_norm(input, self.weight, self.bias, self.eps, self.full_size, self.removed_sum,
                                      self.removed_sq_sum)

    def __reduce_ex__(self, protocol: int) -> tuple:
        # the subclass is made at run time and named as the user's class, so pickle cannot find it by name: it
        # pickles as the user's class (found by name) and is made compensated again when unpickled
        return _compensated_instance, type(self)._fxprune_compensates, self.__getstate__()


def _channels_first(self: nn.LayerNorm, input: torch.Tensor) -> torch.Tensor:
    """The forward of a channels-first norm's compensated class: the norm over dim 1 (N, C, *spatial)."""
    return _CompensatedLayerNormBase.forward(self, input.movedim(1, -1)).movedim(-1, 1)


_COMPENSATED_SUBCLASSES: dict[tuple[type, bool], type] = {}


def compensated_subclass(cls: type, channels_first: bool = False) -> type:
    """``cls`` (a LayerNorm subclass with a forward of its own) with :class:`_CompensatedLayerNormBase` after it in
    the MRO: its own forward runs, and its ``super().forward`` is the compensated one. ``isinstance(m, cls)`` still
    holds; an instance needs ``full_size``, ``removed_sum`` and ``removed_sq_sum``. A class that is one already (a
    norm an earlier call compensated, met again) is its own. ``channels_first``: for a class whose forward
    normalizes dim 1 without reaching ``super().forward`` (torchvision's ``LayerNorm2d`` calls ``F.layer_norm``
    itself), the forward is the compensated norm over dim 1 instead. Instances pickle, deep-copy, and go through
    ``fp.save``/``fp.load`` as compensated norms."""
    if issubclass(cls, _CompensatedLayerNormBase):
        return cls
    if (cls, channels_first) not in _COMPENSATED_SUBCLASSES:
        body = {"__module__": cls.__module__, "__qualname__": cls.__qualname__,
                "_fxprune_compensates": (cls, channels_first)}
        forward = {"forward": _channels_first} if channels_first else {}
        _COMPENSATED_SUBCLASSES[cls, channels_first] = type(cls.__name__, (cls, _CompensatedLayerNormBase),
                                                            body | forward)
    return _COMPENSATED_SUBCLASSES[cls, channels_first]


def _compensated_instance(cls: type, channels_first: bool) -> nn.Module:
    """An empty instance of ``cls``'s compensated subclass, for pickle to fill (:meth:`_CompensatedLayerNormBase.__reduce_ex__`)."""
    return object.__new__(compensated_subclass(cls, channels_first))
