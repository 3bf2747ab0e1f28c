"""Shape and dtype annotation of FX nodes.

Export graphs already carry ``node.meta["val"]`` (fake tensors); symbolically traced and rewritten graphs get it
here by running the graph on meta tensors, or under a fake mode where that fails. :func:`node_spec` reads it back
as plain ``TensorSpec``\\ s so the analysis never touches fake tensors itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch.fx import GraphModule, Interpreter, Node
from torch.fx.node import map_aggregate
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


class _MetaProp(Interpreter):
    """Runs the graph on meta tensors (shapes and dtypes, no values): tensors held by the graph move to the meta
    device without copying their data. Several times cheaper than fake propagation (ConvNeXt-Tiny's 363 ATen nodes:
    0.26 s vs 1.0 s); an op without a meta kernel raises and :func:`annotate` falls back to fake tensors."""

    def run_node(self, n: Node) -> Any:
        out = super().run_node(n)
        val = map_aggregate(out, lambda v: v if isinstance(v, (torch.Tensor, int, float, bool)) else None)
        if val is not None:
            n.meta["val"] = val
        return out

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        t = super().get_attr(target, args, kwargs)
        return t.to("meta") if isinstance(t, torch.Tensor) else t

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        if isinstance(kwargs.get("device"), (torch.device, str)):  # `.to(cpu)`, `arange(device=cpu)`: stay on meta
            kwargs = {**kwargs, "device": torch.device("meta")}
        return super().call_function(target, args, kwargs)


def _calls_weighted_module(gm: GraphModule) -> bool:
    for n in gm.graph.nodes:
        if n.op == "call_module":
            m = gm.get_submodule(n.target)
            if any(True for _ in m.parameters()) or any(True for _ in m.buffers()):
                return True
    return False


def annotate(gm: GraphModule, example_inputs: Sequence[Any]) -> GraphModule:
    """Set ``node.meta["val"]`` on every node (in place): meta-device propagation of ``example_inputs``' shapes,
    or fake propagation where an op has no meta kernel."""
    if not _calls_weighted_module(gm):  # a module's own weights would meet meta inputs
        try:
            with torch.no_grad():
                _MetaProp(gm).run(*[x.to("meta") if isinstance(x, torch.Tensor) else x for x in example_inputs])
            return gm
        except Exception:  # no meta kernel, a data-dependent op: fake tensors handle it
            pass
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_inputs = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]
    FakeTensorProp(gm, mode).propagate(*fake_inputs)
    return gm
