"""What a captured graph stands for: the model it was captured from, and that model's outputs on the example.

A checking pass compares its result with the model the user gave, end to end, and with nothing in between
(:func:`reference_outputs`). ``capture`` records the model and the outputs it computed on the example anyway, so
that comparison costs no extra forward at the example; the captured graph itself is run only when the end-to-end
check fails, to say whether the capture or the pass is at fault (:func:`blame_capture`).

A record is used while nothing it depends on changed: the graph's code, the identity, storage and version counter
of every tensor of the graph and of the model, the modules' train/eval modes, and the inputs' values. A write that
bypasses version counters (``p.data[...] = 0``) is not seen; a stale record then makes the check fail, and the
check runs the model again before it says anything (:func:`fresh_outputs`).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from fxprune.compare import check
from fxprune.errors import CaptureError, InputError
from fxprune.graph.dynamic import shape_str
from fxprune.graph.rebuild import get_attr, named_tensors

__all__ = ["record", "reference_outputs", "fresh_outputs", "origin_model", "blame_capture", "run", "takes"]


@dataclass
class Origin:
    model: nn.Module  # the user's module (or, for a program or a GraphModule given to capture, the graph itself)
    inputs: tuple[Any, ...]
    outputs: Any
    key: tuple[Any, ...] | None
    checked: bool  # capture compared the graph with ``model`` at ``inputs``


# Per captured GraphModule. Keyed by the object, not kept in gm.meta, so the modules passes derive from it (which
# copy meta) never carry a record that does not apply to them.
_ORIGINS: "weakref.WeakKeyDictionary[GraphModule, Origin]" = weakref.WeakKeyDictionary()


def run(model: Any, inputs: tuple[Any, ...], what: str, where: str = "the inputs") -> Any:
    """``model(*inputs)`` without gradients; a model that rejects the inputs raises :class:`InputError`. (Its
    callers, capture and minimize, run in IEEE float32: :func:`~fxprune.compare.ieee_float32`.)"""
    try:
        with torch.no_grad():
            return model(*inputs)
    except Exception as e:
        shapes = ", ".join(f"{tuple(x.shape)}:{x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__ for x in inputs)
        raise InputError(
            f"{what} failed on {where} ({shapes}): {type(e).__name__}: {e}. "
            "Pass inputs of the shapes and dtypes the model's forward expects."
        ) from e


def takes(model: Any, inputs: tuple[Any, ...]) -> bool:
    """Whether ``model(*inputs)`` runs (:func:`run`, without gradients)."""
    try:
        run(model, inputs, "the model")
    except InputError:
        return False
    return True


def _state(m: nn.Module) -> tuple[Any, ...] | None:
    """What a module's output depends on besides its inputs, read without touching tensor data: code, tensors
    (identity, storage, version counter, shape, dtype), modules' modes and settings. None when unreadable."""
    tensors = named_tensors(m)
    if isinstance(m, GraphModule):
        held = {n for n, _ in tensors}
        tensors += [(n.target, t) for n in m.graph.nodes if n.op == "get_attr" and n.target not in held
                    and isinstance(t := get_attr(m, n.target), torch.Tensor)]
    try:
        ids = tuple((n, id(t), t.data_ptr(), t._version, tuple(t.shape), t.dtype) for n, t in tensors)
    except (RuntimeError, TypeError):  # inference tensors have no version counter; meta tensors no storage
        return None
    modules = tuple((name, type(s).__name__, s.training, s.extra_repr()) for name, s in m.named_modules())
    return (getattr(m, "code", None), modules, ids)


def _key(gm: GraphModule, model: nn.Module) -> tuple[Any, ...] | None:
    g = _state(gm)
    o = g if model is gm else _state(model)
    return None if g is None or o is None else (g, o)


def _same_inputs(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    if a is b:
        return True
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor):
            if x.shape != y.shape or x.dtype != y.dtype or x.device != y.device or not torch.equal(x, y):
                return False
        elif type(x) is not type(y) or x != y:
            return False
    return True


def record(gm: GraphModule, model: nn.Module, inputs: tuple[Any, ...], outputs: Any, checked: bool) -> None:
    """Remember that ``gm`` was captured from ``model``, whose outputs on ``inputs`` are ``outputs``."""
    _ORIGINS[gm] = Origin(model, inputs, outputs, _key(gm, model), checked)


def _origin(gm: GraphModule) -> Origin | None:
    o = _ORIGINS.get(gm)
    return o if o is not None and o.key is not None and o.key == _key(gm, o.model) else None


def reference_outputs(gm: GraphModule, inputs: tuple[Any, ...]) -> Any:
    """What a rewrite of ``gm`` must compute on ``inputs``: the outputs of the model ``gm`` was captured from
    (recorded at the example, run at other inputs), or ``gm``'s own where it has no valid record. Raises
    :class:`InputError` when that model rejects the inputs."""
    o = _origin(gm)
    if o is None:
        return run(gm, inputs, "the GraphModule")
    if _same_inputs(o.inputs, inputs):
        return o.outputs
    return run(o.model, inputs, f"the model ({type(o.model).__name__})")


def fresh_outputs(gm: GraphModule, inputs: tuple[Any, ...]) -> Any:
    """:func:`reference_outputs` computed again (the model run now, never a recorded output): what a failed
    check confirms its reference with."""
    return run(origin_model(gm), inputs, "the model")


def origin_model(gm: GraphModule) -> nn.Module:
    """The model :func:`fresh_outputs` runs: the one ``gm`` was captured from, or ``gm`` itself."""
    o = _origin(gm)
    return o.model if o is not None else gm


def blame_capture(gm: GraphModule, inputs: tuple[Any, ...], expected: Any, same: Any) -> None:
    """Called when a pass's result differs from ``expected`` (the model's outputs on ``inputs``): raise
    :class:`CaptureError` if the captured graph ``gm`` already differs from them (``same(a, b)`` compares), so the
    error names the step that failed. Nothing when ``gm`` reproduces the model (the pass is at fault)."""
    o = _ORIGINS.get(gm)
    if o is None or o.model is gm:
        return
    p = next(check(lambda xs: expected, lambda xs: gm(*xs), [inputs], diff=same))
    if p.error is not None:
        e = p.error
        raise CaptureError(f"the captured graph does not run on inputs the model takes (shapes {shape_str(inputs)}), "
                           f"where the result does not match the model: {type(e).__name__}: {e}; the capture is at "
                           "fault, not the pass") from e
    if not p.diffs:
        raise CaptureError(f"the captured graph does not reproduce {type(o.model).__name__}'s outputs on these inputs: "
                           "the capture is at fault, not the pass (pass an ExportedProgram you exported yourself, or "
                           "try the other capture method)")
