"""``lower_modules``: call_module nodes of parameterized layers -> functional calls on get_attr parameters.

After lowering, ``nn.Linear``, ``F.linear`` and ``aten.linear`` look alike to the analysis (one rule), and every
parameter is a graph value with channel spaces of its own. Modules whose forward reads a size or a dim from an
attribute (``nn.Flatten``, ``nn.Unflatten``, ``nn.Softmax``...) are lowered too: the rewrite then changes the call's
arguments, never leaving a module attribute stale. Node names are kept (module ``downs.1`` stays node
``downs_1``); parameters are shared with the input module, never copied or changed. A subclass that overrides
``forward`` is left alone (the analysis then treats it as opaque).
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import Graph, GraphModule, Node

from fxprune.analysis.rules import legacy_softmax_dim
from fxprune.graph.rebuild import GraphCopy, graph_module
from fxprune.graph.shapes import DYNAMIC_DIMS
from fxprune.nn.inputs import SELECTED_DIMS, SelectedInputs
from fxprune.nn.norm import (CompensatedGroupNorm, CompensatedLayerNorm, CompensatedRMSNorm, compensated_group_norm,
                             compensated_layer_norm, compensated_rms_norm)

__all__ = ["lower_modules", "LOWERINGS"]

aten = torch.ops.aten

# module type -> (functional, builder(module, x, param) -> (args, kwargs), or None where the module cannot be lowered);
# param(name) returns a get_attr node or None
Lowering = Callable[[Any, Node, Callable[[str], Node | None]], "tuple[tuple, dict] | None"]
LOWERINGS: dict[type, tuple[Callable[..., Any], Lowering]] = {}


def lowering(*types: type, fn: Callable[..., Any]) -> Callable[[Lowering], Lowering]:
    def deco(build: Lowering) -> Lowering:
        for t in types:
            if t in LOWERINGS:
                raise ValueError(f"duplicate lowering for {t.__name__}")
            LOWERINGS[t] = (fn, build)
        return build

    return deco


@lowering(nn.Linear, fn=F.linear)
def _linear(m: nn.Linear, x: Node, p: Callable[[str], Node | None]) -> tuple[tuple, dict]:
    return (x, p("weight"), p("bias")), {}


def _conv(m: nn.modules.conv._ConvNd, x: Node, p: Callable[[str], Node | None]) -> tuple[tuple, dict]:
    return (x, p("weight"), p("bias"), m.stride, m.padding, m.dilation, m.groups), {}


for _t, _f in ((nn.Conv1d, F.conv1d), (nn.Conv2d, F.conv2d), (nn.Conv3d, F.conv3d)):
    lowering(_t, fn=_f)(_conv)


def _conv_transpose(m: nn.modules.conv._ConvTransposeNd, x: Node, p: Callable[[str], Node | None]) -> tuple[tuple, dict]:
    # (a call with output_size, which picks the output padding, has two arguments: it is not lowered)
    return (x, p("weight"), p("bias"), m.stride, m.padding, m.output_padding, m.groups, m.dilation), {}


for _t, _f in ((nn.ConvTranspose1d, F.conv_transpose1d), (nn.ConvTranspose2d, F.conv_transpose2d),
               (nn.ConvTranspose3d, F.conv_transpose3d)):
    lowering(_t, fn=_f)(_conv_transpose)


@lowering(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, fn=F.batch_norm)
def _bn(m: nn.modules.batchnorm._BatchNorm, x: Node, p: Callable[[str], Node | None]) -> tuple[tuple, dict]:
    training = m.training or m.running_mean is None
    return (x, p("running_mean"), p("running_var"), p("weight"), p("bias"), training, m.momentum or 0.0, m.eps), {}


@lowering(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, fn=F.instance_norm)
def _in(m: nn.modules.instancenorm._InstanceNorm, x: Node, p: Callable[[str], Node | None]) -> tuple[tuple, dict] | None:
    val = x.meta.get("val")
    if getattr(val, "ndim", None) != m._get_no_batch_dim() + 1:
        return None  # an input without a batch dim: the module adds one around the call
    return (x, p("running_mean"), p("running_var"), p("weight"), p("bias"), m.training or not m.track_running_stats,
            m.momentum if m.momentum is not None else 0.0, m.eps), {}


@lowering(nn.PReLU, fn=F.prelu)
def _prelu(m: nn.PReLU, x: Node, p: Callable[[str], Node | None]) -> tuple[tuple, dict]:
    return (x, p("weight")), {}


@lowering(nn.SyncBatchNorm, fn=F.batch_norm)
def _sync_bn(m: nn.SyncBatchNorm, x: Node, p: Callable[[str], Node | None]) -> tuple[tuple, dict] | None:
    # in eval mode (running statistics) a BatchNorm; in training mode its statistics are synchronized across the
    # processes, which no single-process call computes
    return None if m.training or m.running_mean is None else _bn(m, x, p)


@lowering(nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, fn=F.interpolate)
def _upsample(m: nn.Upsample, x: Node, p: Callable[[str], Node | None]) -> tuple[tuple, dict]:
    return (x,), dict(size=m.size, scale_factor=m.scale_factor, mode=m.mode, align_corners=m.align_corners,
                      recompute_scale_factor=m.recompute_scale_factor)


_PAD_MODES = {nn.modules.padding._ConstantPadNd: "constant", nn.modules.padding._ReflectionPadNd: "reflect",
              nn.modules.padding._ReplicationPadNd: "replicate"}
if hasattr(nn.modules.padding, "_CircularPadNd"):
    _PAD_MODES[nn.modules.padding._CircularPadNd] = "circular"


def _pad(m: nn.Module, x: Node, p: Callable[[str], Node | None]) -> tuple[tuple, dict]:
    mode = next(v for k, v in _PAD_MODES.items() if isinstance(m, k))
    return (x, tuple(m.padding), mode, *([m.value] if mode == "constant" else [])), {}


for _base in _PAD_MODES:  # every padding module of torch.nn (ZeroPad2d, ReflectionPad1d, ReplicationPad3d...)
    lowering(*(t for t in vars(nn).values() if isinstance(t, type) and issubclass(t, _base) and t is not _base),
             fn=F.pad)(_pad)


@lowering(nn.LayerNorm, fn=F.layer_norm)
def _ln(m: nn.LayerNorm, x: Node, p: Callable[[str], Node | None]) -> tuple[tuple, dict]:
    return (x, tuple(m.normalized_shape), p("weight"), p("bias"), m.eps), {}


@lowering(nn.GroupNorm, fn=F.group_norm)
def _gn(m: nn.GroupNorm, x: Node, p: Callable[[str], Node | None]) -> tuple[tuple, dict]:
    return (x, m.num_groups, p("weight"), p("bias"), m.eps), {}


@lowering(nn.Embedding, fn=F.embedding)
def _emb(m: nn.Embedding, x: Node, p: Callable[[str], Node | None]) -> tuple[tuple, dict]:
    # padding_idx and the gradient flags change training only (the padding row gets no gradient): kept all the same
    extra = {k: v for k, v in (("padding_idx", m.padding_idx), ("scale_grad_by_freq", m.scale_grad_by_freq),
                               ("sparse", m.sparse)) if v is not None and v is not False}
    return (x, p("weight")), extra


@lowering(nn.Flatten, fn=torch.flatten)
def _flatten(m: nn.Flatten, x: Node, p: Callable[[str], Node | None]) -> tuple[tuple, dict]:
    return (x, m.start_dim, m.end_dim), {}


@lowering(nn.Unflatten, fn=torch.unflatten)
def _unflatten(m: nn.Unflatten, x: Node, p: Callable[[str], Node | None]) -> tuple[tuple, dict]:
    return (x, m.dim, tuple(m.unflattened_size)), {}


def _softmax_dim(m: Any, x: Node) -> int | None:
    """The module's dim; for ``dim=None``, the dim torch's legacy rule picks (None when the rank is unknown)."""
    if m.dim is not None:
        return m.dim
    val = x.meta.get("val", x.meta.get("tensor_meta"))
    return None if val is None else legacy_softmax_dim(len(val.shape))


@lowering(nn.Softmax, fn=F.softmax)
def _softmax(m: nn.Softmax | nn.LogSoftmax, x: Node, p: Callable[[str], Node | None]) -> tuple[tuple, dict] | None:
    dim = _softmax_dim(m, x)
    return None if dim is None else ((x,), {"dim": dim})


lowering(nn.LogSoftmax, fn=F.log_softmax)(_softmax)


if hasattr(nn, "RMSNorm"):

    @lowering(nn.RMSNorm, fn=F.rms_norm)
    def _rms(m: Any, x: Node, p: Callable[[str], Node | None]) -> tuple[tuple, dict]:
        return (x, tuple(m.normalized_shape), p("weight"), m.eps), {}


@lowering(CompensatedLayerNorm, fn=compensated_layer_norm)
def _cln(m: CompensatedLayerNorm, x: Node, p: Callable[[str], Node | None]) -> tuple[tuple, dict]:
    return (x, p("weight"), p("bias"), m.eps, m.full_size, m.removed_sum, m.removed_sq_sum), {}


@lowering(CompensatedGroupNorm, fn=compensated_group_norm)
def _cgn(m: CompensatedGroupNorm, x: Node, p: Callable[[str], Node | None]) -> tuple[tuple, dict]:
    groups = (m.kept_per_group,) if getattr(m, "kept_per_group", None) is not None else ()
    return (x, p("weight"), p("bias"), m.eps, m.full_channels, m.removed_sum, m.removed_sq_sum, *groups), {}


@lowering(CompensatedRMSNorm, fn=compensated_rms_norm)
def _crms(m: CompensatedRMSNorm, x: Node, p: Callable[[str], Node | None]) -> tuple[tuple, dict]:
    return (x, p("weight"), m.eps, m.full_size, m.removed_sq_sum), {}


def _applies(m: nn.Module) -> tuple[Callable[..., Any], Lowering] | None:
    selects = isinstance(m, SelectedInputs)
    entry = LOWERINGS.get(m._fxprune_selects if selects else type(m))
    if entry is None:
        return None
    if isinstance(m, nn.modules.conv._ConvNd) and m.padding_mode != "zeros":
        return None
    if isinstance(m, nn.Embedding) and (m.max_norm is not None):
        return None
    return (entry[0], _selected(entry[1])) if selects else entry


def _selected(build: Lowering) -> Lowering:
    """The lowering of a layer that reads its input at ``kept_inputs`` (:class:`~fxprune.nn.inputs.SelectedInputs`):
    ``index_select`` of its kept channels, then the layer's own."""
    def lowered(m: Any, x: Node, p: Callable[[str], Node | None]) -> "tuple[tuple, dict] | None":
        d = SELECTED_DIMS[m._fxprune_selects]
        val = x.meta.get("val")
        sel = x.graph.create_node("call_function", torch.index_select, (x, d, p("kept_inputs")))
        if isinstance(val, torch.Tensor):  # (the input's shape, with the kept channels: never a dynamic dim)
            shape = list(val.shape)
            shape[d] = m.kept_inputs.numel()
            sel.meta["val"] = val.new_empty(shape)
            dynamic = x.meta.get(DYNAMIC_DIMS)
            if isinstance(dynamic, frozenset) and dynamic - {d % val.dim()}:
                sel.meta[DYNAMIC_DIMS] = dynamic - {d % val.dim()}
        return build(m, sel, p)

    return lowered


_GRAD_HOP = getattr(torch.ops.higher_order, "wrap_with_set_grad_enabled", None)


def _getitem_users(n: Node, only: int | None = None) -> bool:
    return bool(n.users) and all(u.op == "call_function" and u.target is operator.getitem and (only is None or u.args[1] == only)
                                 for u in n.users)


def _inlinable(n: Node) -> bool:
    """A ``wrap_with_set_grad_enabled`` region (torch.export records ``torch.no_grad()`` blocks, e.g. the rotary
    tables of transformers models, as one) whose outputs are read by index."""
    return _GRAD_HOP is not None and n.op == "call_function" and n.target is _GRAD_HOP and _getitem_users(n)


def _native_layer_norm(n: Node) -> bool:
    """``native_layer_norm`` read only for its normalized output: the same function as ``layer_norm``."""
    return n.op == "call_function" and n.target is aten.native_layer_norm.default and _getitem_users(n, only=0)


_TRANSPOSES = {aten.numpy_T.default, aten.t.default, torch.t}
_MATMULS = {aten.matmul.default, operator.matmul, torch.matmul}


def _is_transpose(t: Any) -> bool:
    """``w.T`` / ``w.t()`` of an exported graph (``aten.numpy_T``, ``aten.t``) or of a symbolic trace (``getattr(w,
    'T')``, ``torch.t``, the method ``t``)."""
    if not isinstance(t, Node):
        return False
    if t.op == "call_function" and t.target is getattr:
        return len(t.args) == 2 and t.args[1] == "T" and not t.kwargs
    return ((t.op == "call_function" and t.target in _TRANSPOSES) or (t.op == "call_method" and t.target == "t")) \
        and len(t.args) == 1 and not t.kwargs


def _transposed_weight(n: Node) -> Node | None:
    """The 2-D get_attr ``w`` of ``matmul(x, w.T)`` (``x @ self.weight.T``: Falcon's linear layers); None otherwise."""
    if n.op != "call_function" or n.target not in _MATMULS or len(n.args) != 2 or n.kwargs:
        return None
    t = n.args[1]
    if not _is_transpose(t):
        return None
    w = t.args[0]
    val = w.meta.get("val") if isinstance(w, Node) else None
    return w if isinstance(w, Node) and w.op == "get_attr" and getattr(val, "ndim", None) == 2 else None


_OPEN_END = 9223372036854775807  # the end torch.export writes for an open slice


def _tensor_index(n: Node) -> list[tuple[Any, tuple[Any, ...], frozenset[int]]] | None:
    """A symbolic trace's basic indexing of a tensor (``x[:, :4]``, ``x[..., 1::2]``, ``x[0]``, ``x[:, None]``) as
    the aten steps torch.export records for it (``slice``, ``select``, ``unsqueeze``), which have channel rules: per
    step the op, its arguments after the tensor (the dim first) and the dims of its result that vary with the
    inputs; or None: a tuple output's item, advanced indexing, bounds read off the graph, or a dim of varying size
    cut (its size would then vary otherwise)."""
    if not (n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[0], Node)
            and isinstance(n.args[0].meta.get("val"), torch.Tensor) and isinstance(n.meta.get("val"), torch.Tensor)):
        return None
    index = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
    if sum(i is Ellipsis for i in index) > 1:
        return None
    rank = n.args[0].meta["val"].dim()
    varying = [d in (n.args[0].meta.get(DYNAMIC_DIMS) or ()) for d in range(rank)]
    consumed = sum(isinstance(i, (int, slice)) for i in index)
    steps: list[tuple[Any, tuple[Any, ...], frozenset[int]]] = []

    def step(fn: Any, *args: Any) -> None:
        steps.append((fn, args, frozenset(j for j, v in enumerate(varying) if v)))

    d = 0
    for i in index:
        if i is Ellipsis:
            d += rank - consumed
        elif i is None:
            varying.insert(d, False)
            step(aten.unsqueeze.default, d)
            d += 1
        elif isinstance(i, int) and not isinstance(i, bool):
            varying.pop(d)
            step(aten.select.int, d, i)
        elif isinstance(i, slice) and all(p is None or isinstance(p, int) and not isinstance(p, bool)
                                          for p in (i.start, i.stop, i.step)):
            start, stop, stride = i.start or 0, _OPEN_END if i.stop is None else i.stop, i.step or 1
            if (start, stop, stride) != (0, _OPEN_END, 1):
                if varying[d] or stride < 1:
                    return None
                step(aten.slice.Tensor, d, start, stop, stride)
            d += 1
        else:
            return None
    return steps


def _lowers(gm: GraphModule, n: Node) -> bool:
    if n.op == "call_module":
        return _applies(gm.get_submodule(n.target)) is not None
    return (_inlinable(n) or _native_layer_norm(n) or _transposed_weight(n) is not None
            or bool(_tensor_index(n)))


def lower_modules(gm: GraphModule) -> GraphModule:
    """A new GraphModule computing the same function with parameterized layers as functional calls; ``no_grad``
    regions inlined (the values are the same; nothing in them needs a gradient: they read no parameter),
    ``native_layer_norm`` read for its output as ``layer_norm``, ``matmul(x, w.T)`` of a 2-D weight as
    ``linear(x, w)`` and a symbolic trace's basic indexing of a tensor as torch.export's ``slice``/``select``/
    ``unsqueeze`` steps (:func:`_tensor_index`)."""
    if not any(_lowers(gm, n) for n in gm.graph.nodes):
        return gm
    copy_ = GraphCopy(gm.graph)
    graph, env = copy_.graph, copy_.env
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is operator.getitem and isinstance(env.get(n.args[0]), tuple):
            env[n] = env[n.args[0]][n.args[1]]  # an output of an inlined region or of a native_layer_norm
            continue
        if _inlinable(n):
            env[n] = _inline(gm, graph, n, env)
            continue
        steps = _tensor_index(n)
        if steps:  # x[:, :4] -> aten.slice(x, 1, 0, 4): the last step is the node (its name and meta)
            v, val = env[n.args[0]], n.args[0].meta["val"]
            for k, (fn, args, varying) in enumerate(steps):
                val = fn(val, *args)
                last = k == len(steps) - 1
                v = graph.create_node("call_function", fn, (v, *args), name=n.name if last else f"{n.name}_{k}")
                v.meta = dict(n.meta) if last else {**n.meta, "val": val, DYNAMIC_DIMS: varying}
            env[n] = v
            continue
        if _native_layer_norm(n):
            new = graph.create_node("call_function", aten.layer_norm.default, copy_.arg(n.args), name=n.name)
            new.meta = {k: v for k, v in n.meta.items() if k != "val"}
            if isinstance(n.meta.get("val"), (tuple, list)):
                new.meta["val"] = n.meta["val"][0]
            env[n] = (new,)
            continue
        w = _transposed_weight(n)
        if w is not None:  # x @ w.T is linear(x, w): the analysis then reads w's rows as the layer's units
            new = graph.create_node("call_function", aten.linear.default, (env[n.args[0]], env[w]), name=n.name)
            new.meta = dict(n.meta)
            env[n] = new
            continue
        m = gm.get_submodule(n.target) if n.op == "call_module" else None
        entry = _applies(m) if m is not None else None
        if entry is None or len(n.args) != 1 or n.kwargs:
            copy_.copy(n)
            continue
        fn, build = entry

        def param(name: str, prefix: str = n.target, base: str = n.name) -> Node | None:
            if getattr(m, name, None) is None:
                return None
            return graph.create_node("get_attr", f"{prefix}.{name}", name=f"{base}_{name}")

        built = build(m, env[n.args[0]], param)
        if built is None:
            copy_.copy(n)
            continue
        args, kwargs = built
        new = graph.create_node("call_function", fn, args, kwargs, name=n.name)
        new.meta = dict(n.meta)
        env[n] = new
    for n in reversed(list(graph.nodes)):  # transposes only the lowered matmuls read
        if n.op == "call_function" and n.target in _TRANSPOSES and not n.users:
            graph.erase_node(n)
    out = graph_module(gm, graph, gm.__class__.__name__)
    out.meta.update(gm.meta)
    return out


def _inline(gm: GraphModule, graph: Graph, n: Node, env: dict[Node, Any]) -> tuple[Node, ...]:
    """Copy the region's nodes into ``graph`` (its get_attr targets prefixed with the region's path); returns its
    outputs."""
    path = n.args[1].target
    sub = gm.get_submodule(path)
    operands = iter(env[a] if isinstance(a, Node) else a for a in n.args[2:])
    local: dict[Node, Any] = {}
    for sn in sub.graph.nodes:
        if sn.op == "placeholder":
            local[sn] = next(operands)
        elif sn.op == "output":
            outs = torch.fx.node.map_arg(sn.args[0], lambda a: local[a])
            return tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
        elif sn.op == "get_attr":
            local[sn] = graph.create_node("get_attr", f"{path}.{sn.target}", name=f"{path}_{sn.name}")
            local[sn].meta = dict(sn.meta)
        else:
            local[sn] = graph.node_copy(sn, lambda a: local[a])
    raise AssertionError("a graph without an output node")  # pragma: no cover
