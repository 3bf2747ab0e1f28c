"""Shape and dtype annotation of FX nodes.

Export graphs already carry ``node.meta["val"]`` (fake tensors); symbolically traced graphs get it here
by running the graph on the example inputs under a fake mode. :func:`node_spec` reads it back as plain
``TensorSpec``\\ s so the analysis never touches fake tensors itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch.fx import GraphModule, Node
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch._subclasses.fake_tensor import FakeTensorMode

__all__ = ["TensorSpec", "annotate", "node_spec", "is_annotated", "placeholder_inputs"]


@dataclass(frozen=True)
class TensorSpec:
    """Static shape and dtype of one tensor value."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point


def _spec(val: Any) -> TensorSpec | None:
    if isinstance(val, torch.Tensor):
        try:
            shape = tuple(int(s) for s in val.shape)
        except (TypeError, RuntimeError):  # unbacked / symbolic sizes
            return None
        return TensorSpec(shape, val.dtype)
    return None


def node_spec(node: Node) -> TensorSpec | list[TensorSpec | None] | None:
    """The annotated value of ``node``: a TensorSpec, a list of them (tuple outputs) or None."""
    val = node.meta.get("val", node.meta.get("example_value"))
    if val is None and "tensor_meta" in node.meta:
        tm = node.meta["tensor_meta"]
        if isinstance(tm, (list, tuple)):
            return [TensorSpec(tuple(t.shape), t.dtype) if hasattr(t, "shape") else None for t in tm]
        return TensorSpec(tuple(tm.shape), tm.dtype)
    if isinstance(val, (list, tuple)):
        return [_spec(v) for v in val]
    return _spec(val)


def is_annotated(gm: GraphModule) -> bool:
    return all(
        ("val" in n.meta or "tensor_meta" in n.meta)
        for n in gm.graph.nodes
        if n.op not in ("output", "get_attr") and not (n.op == "call_module" and n.target == "_guards_fn")
    )


def placeholder_inputs(gm: GraphModule) -> list[Any]:
    """Zero tensors shaped like the annotated placeholders (for re-annotating a rewritten graph)."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            s = node_spec(n)
            out.append(torch.zeros(s.shape, dtype=s.dtype) if isinstance(s, TensorSpec) else n.meta.get("val"))
    return out


def annotate(gm: GraphModule, example_inputs: Sequence[Any]) -> GraphModule:
    """Set ``node.meta["val"]`` on every node by fake propagation of ``example_inputs`` (in place)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_inputs = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]
    FakeTensorProp(gm, mode).propagate(*fake_inputs)
    return gm
