"""Shape and dtype annotation of FX nodes.

Export graphs already carry ``node.meta["val"]`` (fake tensors); symbolically traced and rewritten graphs get it
here by running the graph on meta tensors, or under a fake mode where that fails. :func:`node_spec` reads it back
as plain ``TensorSpec``\\ s so the analysis never touches fake tensors itself.
"""
from __future__ import annotations

import copy
import difflib
import logging
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import nn
from torch.fx import GraphModule, Interpreter, Node
from torch.fx.node import map_aggregate
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch._subclasses.fake_tensor import FakeTensorMode

if TYPE_CHECKING:
    from fxprune.graph.dynamic import InputDims

__all__ = ["TensorSpec", "annotate", "runs_at", "node_spec", "is_annotated", "placeholder_inputs", "hint",
           "is_dynamic_scalar", "DYNAMIC_DIMS"]

GUARDS = "_guards_fn"  # the call_module of ExportedProgram.module() that checks its inputs' shapes
DYNAMIC_DIMS = "fxprune_dynamic"  # node meta: dims that vary with the inputs (True for an int that varies)
# node meta: dims read off a capture at other sizes (annotate's ``like``), which vary past the captured range; a
# rewrite's nodes keep their meta, so the graph annotated again (minimize's next round) still knows them
BEYOND_DIMS = "fxprune_beyond"


@dataclass(frozen=True)
class TensorSpec:
    """Static shape and dtype of one tensor value."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    dynamic: frozenset[int] = frozenset()  # dims whose size varies with the inputs' dynamic dims (never channels)

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point


def hint(s: Any) -> int | None:
    """The example value of a size: an int as it is; a SymInt's hint, read without guarding on it (``int(s)``
    would specialize the shape environment it belongs to, which an exported program shares); None if unbacked."""
    if isinstance(s, int):
        return int(s)
    if isinstance(s, torch.SymInt):
        expr = s.node.expr
        if expr.is_number:
            return int(expr)
        h = s.node.hint
        return None if h is None else int(h)
    return None


def _spec(val: Any, dynamic: Any = None) -> TensorSpec | None:
    if not isinstance(val, torch.Tensor):
        return None
    shape = tuple(hint(s) for s in val.shape)
    if any(s is None for s in shape):  # unbacked sizes
        return None
    dyn = {d for d, s in enumerate(val.shape) if isinstance(s, torch.SymInt) and not s.node.expr.is_number}
    if isinstance(dynamic, frozenset):
        dyn |= dynamic
    return TensorSpec(shape, val.dtype, frozenset(dyn))  # type: ignore[arg-type]


def node_spec(node: Node) -> TensorSpec | list[TensorSpec | None] | None:
    """The annotated value of ``node``: a TensorSpec, a list of them (tuple outputs) or None."""
    val = node.meta.get("val", node.meta.get("example_value"))
    dyn = node.meta.get(DYNAMIC_DIMS)
    if val is None and "tensor_meta" in node.meta:
        tm = node.meta["tensor_meta"]
        if hasattr(tm, "shape"):  # (one tensor's TensorMetadata: itself a NamedTuple)
            return TensorSpec(tuple(tm.shape), tm.dtype)
        if isinstance(tm, (list, tuple)):
            return [TensorSpec(tuple(t.shape), t.dtype) if hasattr(t, "shape") else None for t in tm]
        return None
    if isinstance(val, (list, tuple)):
        dyns = dyn if isinstance(dyn, (list, tuple)) else [None] * len(val)
        return [_spec(v, d) for v, d in zip(val, dyns)]
    return _spec(val, dyn)


def is_dynamic_scalar(v: Any) -> bool:
    """Whether ``v`` is a graph node holding an int that varies with the inputs' dynamic dims (``sym_size``)."""
    if not isinstance(v, Node):
        return False
    val = v.meta.get("val")
    return v.meta.get(DYNAMIC_DIMS) is True or (isinstance(val, torch.SymInt) and not val.node.expr.is_number)


def is_annotated(gm: GraphModule) -> bool:
    return all(
        ("val" in n.meta or "tensor_meta" in n.meta)
        for n in gm.graph.nodes
        if n.op not in ("output", "get_attr") and not (n.op == "call_module" and n.target == GUARDS)
    )


def placeholder_inputs(gm: GraphModule) -> list[Any]:
    """Zero tensors shaped like the annotated placeholders (for re-annotating a rewritten graph)."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            s = node_spec(n)
            val = n.meta.get("val")
            out.append(torch.zeros(s.shape, dtype=s.dtype) if isinstance(s, TensorSpec) else
                       hint(val) if isinstance(val, torch.SymInt) else val)
    return out


class _MetaProp(Interpreter):
    """Runs the graph on meta tensors (shapes and dtypes, no values): tensors held by the graph move to the meta
    device without copying their data. Several times cheaper than fake propagation (ConvNeXt-Tiny's 363 ATen nodes:
    0.26 s vs 1.0 s); an op without a meta kernel raises and :func:`annotate` falls back to fake tensors.
    ``guards=False``: the input guards (``_guards_fn``) are not run."""

    def __init__(self, gm: GraphModule, guards: bool = True) -> None:
        super().__init__(gm)
        self.guards = guards

    def run_node(self, n: Node) -> Any:
        out = super().run_node(n)
        n.meta["val"] = map_aggregate(out, lambda v: v if isinstance(v, (torch.Tensor, int, float, bool)) else None)
        return out

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        t = super().get_attr(target, args, kwargs)
        return t.to("meta") if isinstance(t, torch.Tensor) else t

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        """A module of a symbolic trace (a ``torch.nn`` leaf), run as a copy whose tensors are on the meta device
        (no data copied; the module itself is never run or changed)."""
        if target == GUARDS and not self.guards:
            return None
        return _on_meta(self.fetch_attr(target))(*args, **kwargs)

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        if isinstance(kwargs.get("device"), (torch.device, str)):  # `.to(cpu)`, `arange(device=cpu)`: stay on meta
            kwargs = {**kwargs, "device": torch.device("meta")}
        if any(isinstance(a, torch.device) for a in args):  # `aten.to.device(x, cpu, ...)` (Llama's rotary table)
            args = tuple(torch.device("meta") if isinstance(a, torch.device) else a for a in args)
        shape_of = _SHAPE_RULES.get(target)
        if shape_of is not None and isinstance(args[0], torch.Tensor) and args[0].device.type == "meta":
            return shape_of(*args, **kwargs)
        return super().call_function(target, args, kwargs)


_META_COPIES: "weakref.WeakKeyDictionary[nn.Module, tuple[Any, nn.Module]]" = weakref.WeakKeyDictionary()


def _on_meta(m: nn.Module) -> nn.Module:
    """A copy of ``m`` with every parameter and buffer on the meta device, kept while ``m`` lives and its tensors
    keep their shapes and dtypes and its plain attributes (``groups``, ``stride``, ``eps``...) their values (shape
    propagation runs a graph several times)."""
    tensors = [*m.named_parameters(), *m.named_buffers()]
    if not tensors:
        return m
    plain = tuple(sorted((k, v) for k, v in vars(m).items() if isinstance(v, (bool, int, float, str, tuple))))
    key = (tuple((name, tuple(t.shape), t.dtype) for name, t in tensors), plain)
    hit = _META_COPIES.get(m)
    if hit is not None and hit[0] == key:
        return hit[1]
    memo = {id(t): nn.Parameter(t.to("meta"), requires_grad=t.requires_grad) if isinstance(t, nn.Parameter)
            else t.to("meta") for _, t in tensors}
    out = copy.deepcopy(m, memo)
    _META_COPIES[m] = (key, out)
    return out



# Ops whose meta kernel is a slow Python decomposition, by the shape and dtype of their output. LayerNorm's
# (``torch._refs.native_layer_norm``, which also computes the statistics' shapes) took half of annotating
# ConvNeXt-Tiny's graph; its output is a fresh contiguous tensor shaped and typed as the input.
_SHAPE_RULES: dict[Any, Callable[..., torch.Tensor]] = {
    torch.ops.aten.layer_norm.default: lambda x, *a, **k: torch.empty_like(x, memory_format=torch.contiguous_format),
}


def annotate(gm: GraphModule, example_inputs: Sequence[Any], dims: "InputDims | None" = None,
             like: GraphModule | Sequence[GraphModule] = ()) -> GraphModule:
    """Set ``node.meta["val"]`` on every node (in place): meta-device propagation of ``example_inputs``' shapes,
    or fake propagation where an op has no meta kernel.

    With ``dims`` (the inputs' dynamic dims, :class:`~fxprune.graph.dynamic.InputDims`), the graph is also
    propagated at the other check points of their range, and every node records in ``meta[DYNAMIC_DIMS]`` the dims
    whose size changed at any of them (True for an int that changed): those dims vary with the inputs and are never
    channels. The last check point must propagate (a graph with a size written in its code does not); the others
    propagate past the input guards of ``ExportedProgram.module()``, whose range may end short of the one recorded
    (an image whose first stride-2 map is 1 pixel high), and are skipped where they do not. ``dims.beyond``: also
    where every dynamic size is doubled, outside the captured range (:meth:`InputDims.doubled`): a size that the
    capture's guards pin (a feature map of 1x1 for every image up to 32 pixels) still varies for a module that runs
    at any size (:func:`~fxprune.minimize_module`'s copy); and at ``dims.free`` (sizes of dims the capture held
    static that the model takes), where the graph propagates past its guards.

    ``like``: the same program captured (and annotated) at other sizes (one graph or several), for a graph that
    does not propagate there (a view with a size export pinned: ShuffleNet's channel shuffle of a 1x1 map; a dim
    the capture held static). The dims whose sizes differ between matching nodes of the two vary too, and so do
    those that vary in ``like`` (:func:`_changed_in`). Nodes keep those dims in ``meta[BEYOND_DIMS]``, which later
    calls read again (on the graph a rewrite of this one gives).
    """
    for n in gm.graph.nodes:
        n.meta.pop(DYNAMIC_DIMS, None)
    _propagate(gm, example_inputs)
    first = {n: n.meta["val"] for n in gm.graph.nodes if "val" in n.meta}
    for other in [like] if isinstance(like, GraphModule) else like:
        for n, dyn in _changed_in(first, gm, other).items():
            n.meta[BEYOND_DIMS] = _union(n.meta.get(BEYOND_DIMS), dyn)
    changed: dict[Node, Any] = {n: n.meta[BEYOND_DIMS] for n in first if BEYOND_DIMS in n.meta}
    dynamic = dims is not None and dims.dynamic
    others = [p for p in dims.check_points() if p != dims.hints] if dynamic else []
    required = [dims.sizes(p) for p in others[-1:]]  # (the last check point must propagate)
    optional = ([dims.sizes(p) for p in others[:-1] + dims.beyond_points()] if dynamic else []) + list(
        dims.free if dims is not None else ())
    try:
        for i, shapes in enumerate(required + optional):
            other = [torch.zeros(s, dtype=x.dtype) if isinstance(x, torch.Tensor) and s is not None else x
                     for x, s in zip(example_inputs, shapes)]
            if i >= len(required):
                if not runs_at(gm, other, guards=False):
                    continue
            else:
                _propagate(gm, other)
            for n, a in first.items():
                dyn = _union(changed.get(n), _changed(a, n.meta.get("val")))
                if dyn:
                    changed[n] = dyn
    finally:
        if required or optional:
            for n in gm.graph.nodes:
                if n in first:
                    n.meta["val"] = first[n]
                else:
                    n.meta.pop("val", None)
    for n, dyn in changed.items():
        n.meta[DYNAMIC_DIMS] = dyn
    return gm


def _changed_in(first: dict[Node, Any], gm: GraphModule, like: GraphModule) -> dict[Node, Any]:
    """Per node of ``gm`` (shapes ``first``): the dims whose size differs in the matching node of ``like``, or that
    vary there (``like``'s ``DYNAMIC_DIMS``). Nodes match in order, by op and target (``difflib``'s longest
    matching runs: a size-specific op one capture has and the other lacks, an extra ``mul``, leaves the rest
    matched), a pair only where both values have the same number of dims; nodes of sizes (``sym_size`` and
    arithmetic on it, of which a size export pinned has none) are left out. An unmatched node gets nothing: the
    check of the result still runs at those sizes."""
    def carried(g: GraphModule) -> list[Node]:
        return [n for n in g.graph.nodes if not isinstance(n.meta.get("val"), (int, float, torch.SymInt, torch.SymFloat))]

    mine, theirs = carried(gm), carried(like)
    key = lambda n: (n.op, str(n.target))  # noqa: E731
    runs = difflib.SequenceMatcher(None, [key(n) for n in mine], [key(n) for n in theirs], autojunk=False)
    out = {}
    for i, j, size in runs.get_matching_blocks():
        for n, m in zip(mine[i:i + size], theirs[j:j + size]):
            a, b = first.get(n), m.meta.get("val")
            if n not in first or _rank(a) != _rank(b):
                continue
            dyn = _union(_changed(a, b), m.meta.get(DYNAMIC_DIMS))
            if dyn:
                out[n] = dyn
    return out


def _rank(v: Any) -> Any:
    """The number of dims of a tensor value, or of each tensor of a tuple value (None for anything else)."""
    if isinstance(v, torch.Tensor):
        return v.dim()
    if isinstance(v, (list, tuple)):
        return tuple(_rank(x) for x in v)
    return None


def runs_at(gm: GraphModule, inputs: Sequence[Any], guards: bool = True) -> bool:
    """Whether the graph's shapes propagate at ``inputs`` (meta or fake tensors: no values; ``guards=False``: past
    its input guards). Leaves the nodes' ``meta["val"]`` at whatever it reached: annotate afterwards."""
    log = logging.getLogger("torch._subclasses.fake_tensor")  # logs the failing op's traceback as an error
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        _propagate(gm, inputs, guards)
        return True
    except Exception:
        return False
    finally:
        log.setLevel(level)


def _changed(a: Any, b: Any) -> Any:
    """The dims of ``a`` whose size differs in ``b`` (a frozenset; a list of them for tuple values; True for an
    int that differs; None when nothing differs)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.dim() != b.dim():
            return frozenset(range(a.dim()))
        d = frozenset(i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y)
        return d or None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        parts = [_changed(x, y) for x, y in zip(a, b)]
        return [p if isinstance(p, frozenset) else None for p in parts] if any(p is not None for p in parts) else None
    if isinstance(a, int) and not isinstance(a, bool) and isinstance(b, int):
        return True if a != b else None
    return None


def _union(a: Any, b: Any) -> Any:
    """Two :func:`_changed` results as one: the dims that changed in either."""
    if a is None or b is None:
        return a if b is None else b
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [x if y is None else y if x is None else x | y for x, y in zip(a, b)]
    if isinstance(a, frozenset) and isinstance(b, frozenset):
        return a | b
    return a if a is True or isinstance(a, list) else b


def _propagate(gm: GraphModule, example_inputs: Sequence[Any], guards: bool = True) -> None:
    """Shapes at ``example_inputs``; ``guards=False``: past the input guards of ``ExportedProgram.module()``
    (``_guards_fn``), to see which sizes vary beyond the range the program was captured for."""
    try:
        with torch.no_grad():
            _MetaProp(gm, guards).run(*[x.to("meta") if isinstance(x, torch.Tensor) else x for x in example_inputs])
        return
    except Exception:  # no meta kernel, a data-dependent op: fake tensors handle it
        pass
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_inputs = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]
    (FakeTensorProp if guards else _UnguardedFakeProp)(gm, mode).propagate(*fake_inputs)


class _UnguardedFakeProp(FakeTensorProp):
    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        return None if target == GUARDS else super().call_module(target, args, kwargs)
