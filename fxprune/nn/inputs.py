"""Layers that read only some channels of the model's input.

When no weight of a layer reads input channel ``k`` of the model (its weight column is zero), ``minimize`` removes
the column and the graph selects the channels that are still read at the input (``index_select``); the model keeps
taking its whole input. In the user's own class, the layer that reads the input (an ``nn.Linear`` or an
``nn.Conv1d/2d/3d``) becomes :func:`selected_subclass` of its class: the same forward after ``index_select`` of
its ``kept_inputs`` buffer, the positions of the kept channels in the model's input.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["SelectedInputs", "selected_subclass", "SELECTED_DIMS"]

# the classes whose instances may read a selection of the model's input, and the dim of their input that holds the
# channels (counted from the end: an unbatched input has one dim fewer at the front)
SELECTED_DIMS: dict[type, int] = {nn.Linear: -1, nn.Conv1d: -2, nn.Conv2d: -3, nn.Conv3d: -4}


class SelectedInputs(nn.Module):
    """The forward of a layer of :data:`SELECTED_DIMS` applied to ``input.index_select(dim, kept_inputs)``:
    ``kept_inputs`` (a buffer, int64) lists the input channels the layer's weight still reads, by their position in
    the input it is given. ``in_features`` / ``in_channels`` count the kept ones.

    >>> import torch
    >>> from fxprune.nn import selected_subclass
    >>> layer = torch.nn.Linear(3, 2)
    >>> x = torch.randn(4, 5)
    >>> layer.__class__ = selected_subclass(torch.nn.Linear)
    >>> layer.register_buffer("kept_inputs", torch.tensor([0, 2, 4]))
    >>> torch.equal(layer(x), torch.nn.functional.linear(x[:, [0, 2, 4]], layer.weight, layer.bias))
    True
    >>> layer, isinstance(layer, torch.nn.Linear)
    (Linear(in_features=3, out_features=2, bias=True, kept_inputs=3), True)
    """

    kept_inputs: torch.Tensor
    _fxprune_selects: type

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(input.index_select(SELECTED_DIMS[self._fxprune_selects], self.kept_inputs))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kept_inputs={self.kept_inputs.numel()}"

    def __reduce_ex__(self, protocol: int) -> tuple:
        # the subclass is made at run time and named as the layer's class, so pickle cannot find it by name: it
        # pickles as that class (found by name) and reads its selection again when unpickled
        return _selected_instance, (type(self)._fxprune_selects,), self.__getstate__()


_SUBCLASSES: dict[type, type] = {}


def selected_subclass(cls: type) -> type:
    """``cls`` (a class of :data:`SELECTED_DIMS`) reading its input at ``kept_inputs``: named as ``cls``, and
    ``isinstance(m, cls)`` still holds. Instances pickle, deep-copy and go through ``fp.save``/``fp.load``."""
    if issubclass(cls, SelectedInputs):
        return cls
    if cls not in SELECTED_DIMS:
        raise TypeError(f"{cls.__name__} is not a layer whose input channels fxprune selects "
                        f"({', '.join(c.__name__ for c in SELECTED_DIMS)})")
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(cls.__name__, (SelectedInputs, cls), {"__module__": cls.__module__,
                                                                      "__qualname__": cls.__qualname__,
                                                                      "_fxprune_selects": cls})
    return _SUBCLASSES[cls]


def _selected_instance(cls: type) -> nn.Module:
    """An empty instance of ``cls``'s selecting subclass, for pickle to fill (:meth:`SelectedInputs.__reduce_ex__`)."""
    return object.__new__(selected_subclass(cls))
