"""Weight standardization over the kept entries of a convolution's weight, with the statistics of the whole
original weight.

A weight-standardized convolution (BiT's and timm's ``StdConv2d``, transformers' ``WeightStandardizedConv2d``)
computes its weight in the forward: each output channel's row of the weight (``in x kh x kw`` entries) is shifted
by its mean and divided by its standard deviation, ``F.batch_norm(w.reshape(1, out, -1), None, None,
training=True, eps=eps)``. An output channel has its own row, so removing one is plain slicing. Removing an input
channel takes entries out of every row, and the rows' statistics would change; the removed entries are parameters,
known constants, so their per-row sum ``S1`` and sum of squares ``S2`` keep the full statistics::

    mean = (sum_K w + S1) / D
    var  = (sum_K (w - mean)^2 + S2 - 2 mean S1 + n_R mean^2) / D

with ``D`` the row's original length and ``n_R = D - |K|``, as :mod:`fxprune.nn.norm` does for a stream's channels.
timm's ``ScaledStdConv2d`` (NF-ResNets, NFNets) then multiplies each row by its ``gain`` times a number fixed from
the full fan-in (``scale``), which stays as it is.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["compensated_standardization", "CompensatedStdConv2d", "std_conv_subclass", "compensate_std_conv_",
           "one_op", "standardizes", "KNOWN"]


def compensated_standardization(input: torch.Tensor, removed_sum: torch.Tensor, removed_sq_sum: torch.Tensor,
                                full_size: int, eps: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``F.batch_norm(input, None, None, weight, training=True, eps=eps)`` of ``input`` shaped (1, C, L): each
    channel's L entries less their mean, over the square root of their (biased) variance plus ``eps`` (times the
    channel's ``weight`` where given: NF-Nets' gain), as if ``full_size - L`` removed entries per channel were still
    there, whose sums per channel are ``removed_sum`` and sums of squares ``removed_sq_sum`` (shape (C,))."""
    n = full_size - input.shape[-1]
    s1, s2 = removed_sum.reshape(1, -1, 1), removed_sq_sum.reshape(1, -1, 1)
    mean = (input.sum(-1, keepdim=True) + s1) / full_size
    centered = input - mean
    var = ((centered * centered).sum(-1, keepdim=True) + s2 - 2.0 * mean * s1 + n * (mean * mean)) / full_size
    out = centered * torch.rsqrt(var + eps)
    return out if weight is None else out * weight.reshape(1, -1, 1)


torch.fx.wrap("compensated_standardization")


@torch.library.custom_op("fxprune::compensated_standardization", mutates_args=())
def _standardization_op(input: torch.Tensor, removed_sum: torch.Tensor, removed_sq_sum: torch.Tensor,
                        full_size: int, eps: float, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    return compensated_standardization(input, removed_sum, removed_sq_sum, full_size, eps, weight)


@_standardization_op.register_fake
def _(input: torch.Tensor, removed_sum: torch.Tensor, removed_sq_sum: torch.Tensor, full_size: int,
      eps: float, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    return torch.empty_like(input)


STANDARDIZATION_OP = torch.ops.fxprune.compensated_standardization.default
_ONE_OP = [0]


@contextlib.contextmanager
def one_op() -> Iterator[None]:
    """While open, :class:`CompensatedStdConv2d` computes its weight with the custom op
    ``fxprune::compensated_standardization`` (:data:`STANDARDIZATION_OP`), which torch.export keeps as one node that
    fxprune's analysis reads as a weight standardization; fxprune's own captures of the user's class open it (a
    model minimized once is captured again by the next cycle). Otherwise the weight is aten ops, which any runtime
    and autograd run. Both compute the same values."""
    _ONE_OP[0] += 1
    try:
        yield
    finally:
        _ONE_OP[0] -= 1


class CompensatedStdConv2d(nn.Conv2d):
    """A weight-standardized ``Conv2d`` (see the module docstring) whose weight lost input channels: each row's
    statistics include the removed entries' sums (buffers ``removed_sum``, ``removed_sq_sum``, one entry per output
    channel) over ``full_size`` entries per row. The base of the class :func:`std_conv_subclass` makes of the
    user's (its padding kept)."""

    full_size: int
    _fxprune_standardizes: type  # the user's class, set on each subclass

    def standardized_weight(self) -> torch.Tensor:
        w = self.weight
        f = _standardization_op if _ONE_OP[0] else compensated_standardization
        gain = getattr(self, "gain", None)  # (timm's ScaledStdConv2d: each row times gain * scale)
        scale = None if gain is None else (gain * self.scale).view(-1)
        return f(w.reshape(1, w.shape[0], -1), self.removed_sum, self.removed_sq_sum, self.full_size,
                 float(self.eps), scale).reshape_as(w)

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the user's class pads it before its convolution (its ``padding`` aside): transformers'
        BiT through its ``pad`` module, timm's ``StdConv2d`` with ``same_pad`` and ``StdConv2dSame`` through timm's
        ``pad_same``."""
        pad = getattr(self, "pad", None)
        if isinstance(pad, nn.Module):
            return pad(x)
        base = getattr(type(self), "_fxprune_standardizes", type(self))  # (the user's class)
        if getattr(self, "same_pad", False) or base.__name__ == "StdConv2dSame":
            pad_same = getattr(sys.modules[base.__module__], "pad_same")
            return pad_same(x, self.kernel_size, self.stride, self.dilation)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.padded(x), self.standardized_weight(), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)

    def __reduce_ex__(self, protocol: int) -> Any:
        # made at run time and named as the user's class: pickled as the user's class, made compensated again
        if "_fxprune_standardizes" not in type(self).__dict__:
            return super().__reduce_ex__(protocol)  # (this class itself, built by hand)
        return _compensated_instance, (type(self)._fxprune_standardizes,), self.__getstate__()


_SUBCLASSES: dict[type, type] = {}
# the weight-standardized convolutions whose forward CompensatedStdConv2d's reproduces (module and class name):
# transformers' BiT, timm's
KNOWN = {("transformers.models.bit.modeling_bit", "WeightStandardizedConv2d"), ("timm.layers.std_conv", "StdConv2d"),
         ("timm.layers.std_conv", "StdConv2dSame"), ("timm.layers.std_conv", "ScaledStdConv2d"),
         ("timm.layers.std_conv", "ScaledStdConv2dSame")}


def standardizes(module: nn.Module) -> bool:
    """Whether ``module`` is a weight-standardized convolution of a class in :data:`KNOWN` (or one made
    compensated)."""
    base = getattr(type(module), "_fxprune_standardizes", type(module))
    return isinstance(module, nn.Conv2d) and (base.__module__, base.__name__) in KNOWN


def std_conv_subclass(cls: type) -> type:
    """``cls`` (a weight-standardized ``Conv2d`` class: transformers' ``WeightStandardizedConv2d``, timm's
    ``StdConv2d``/``StdConv2dSame``/``ScaledStdConv2d``/``ScaledStdConv2dSame``) with :class:`CompensatedStdConv2d`'s forward; ``isinstance(m, cls)`` still
    holds. An instance needs ``full_size`` and the buffers ``removed_sum`` and ``removed_sq_sum``."""
    if issubclass(cls, CompensatedStdConv2d):
        return cls
    if cls not in _SUBCLASSES:
        body = {name: CompensatedStdConv2d.__dict__[name]
                for name in ("standardized_weight", "padded", "forward", "__reduce_ex__")}
        body |= {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "_fxprune_standardizes": cls}
        _SUBCLASSES[cls] = type(cls.__name__, (cls, CompensatedStdConv2d), body)
    return _SUBCLASSES[cls]


def _compensated_instance(cls: type) -> nn.Module:
    """An empty instance of ``cls``'s compensated subclass, for pickle to fill."""
    return object.__new__(std_conv_subclass(cls))


def compensate_std_conv_(module: nn.Conv2d, full_size: int, removed_sum: torch.Tensor,
                         removed_sq_sum: torch.Tensor) -> nn.Conv2d:
    """Make ``module`` (a weight-standardized ``Conv2d`` of the user's class, its weight already sliced) compensated,
    **in place**: its class becomes :func:`std_conv_subclass`'s, and it holds the removed entries' statistics (in
    its weight's dtype and device)."""
    w = module.weight
    module.__class__ = std_conv_subclass(type(module))
    for name, t in (("removed_sum", removed_sum), ("removed_sq_sum", removed_sq_sum)):
        module.register_buffer(name, t.detach().to(dtype=w.dtype, device=w.device).clone())
    module.full_size = int(full_size)
    return module
