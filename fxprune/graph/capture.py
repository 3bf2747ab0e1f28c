"""``capture``: any PyTorch model -> an annotated ``torch.fx.GraphModule``.

``method="auto"`` tries ``torch.fx.symbolic_trace`` (module-level graphs, readable node names) and falls
back to ``torch.export.export(..., strict=False).module()`` (ATen-level graphs; works on nearly every
model, HF transformers included). Either way every node ends annotated with ``meta["val"]``. A symbolic trace
is checked to reproduce the model's output on the example inputs here; an exported graph is checked end to end,
through the result of the pass that uses it (:mod:`fxprune.graph.origin`).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import io
import logging
import operator
import sys
import traceback
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from fxprune.graph.scan import fresh, scan
from fxprune.compare import check, ieee_float32, precision_of, rounding_only, rtol_for
from fxprune.errors import CaptureError, InputError, UnsupportedError
from fxprune.graph import lazy
from fxprune.graph.rebuild import accelerator, graph_module
from fxprune.graph.origin import record, run
from fxprune.graph.dynamic import DYNAMIC_KEY, batch_dims, default_spec, every_dims, from_graph, resize, static_dims
from fxprune.graph.shapes import TensorSpec, annotate, is_annotated, node_spec, runs_at
from fxprune.graph.masks import unmasked

__all__ = ["capture", "as_inputs", "on_model_device", "check_weights", "on_meta", "unwrapped", "LabelsLeftOutWarning",
           "EXAMPLE_INPUTS_KEY"]

EXAMPLE_INPUTS_KEY = "fxprune_example_inputs"
CAPTURE_METHOD_KEY = "fxprune_capture_method"  # gm.meta: "symbolic" or "export", the capture that worked
Method = Literal["auto", "symbolic", "export"]
BATCH = "batch"  # capture's default dynamic_shapes: the batch dim dynamic wherever the model allows it
EVERY = "every"  # every dim of every tensor input dynamic wherever the model allows it (minimize_module's default)


def as_inputs(example_inputs: Any, model: Any = None) -> tuple[Any, ...]:
    """Normalize example inputs to a tuple (a lone tensor becomes a 1-tuple). A dict holds keyword inputs, as a
    transformers batch does (``dict(input_ids=..., labels=...)``): with ``model`` given they become its forward's
    positional arguments in order, each parameter left out before the last given one at its default (the call
    the model would make): :func:`keyword_inputs`. Inputs all on the CPU for a model on a GPU go to the model's
    device (:func:`on_model_device`)."""
    return on_model_device(_as_tuple(example_inputs, model), model)


def on_model_device(inputs: tuple[Any, ...], model: Any) -> tuple[Any, ...]:
    """``inputs`` moved to the accelerator ``model``'s tensors live on, when every tensor among them is on the CPU
    (a batch as a DataLoader gives it, for a model a ``Trainer`` or ``model.cuda()`` put on a GPU), as
    transformers' ``Trainer`` and accelerate place a batch. Inputs with any tensor already off the CPU are the
    user's placement and stay as given (an RNN's ``lengths`` stay on the CPU beside inputs on the GPU), and so do
    the inputs of a model on the CPU or spread over several devices."""
    if not isinstance(model, nn.Module):
        return inputs
    tensors = [t for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)]
    if not tensors or any(t.device.type != "cpu" for t in tensors):
        return inputs
    try:
        device = accelerator(model)
    except UnsupportedError:  # several devices: minimize says so where it matters
        return inputs
    if device is None:
        return inputs
    return pytree.tree_map_only(torch.Tensor, lambda t: t.to(device), inputs)


def _as_tuple(example_inputs: Any, model: Any) -> tuple[Any, ...]:
    if example_inputs is None:
        raise InputError("example_inputs is None: pass a tuple of tensors the model accepts, e.g. (torch.randn(1, 3, 32, 32),)")
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    if isinstance(example_inputs, Mapping):  # a dict, or a tokenizer's BatchEncoding
        if isinstance(model, nn.Module):
            return keyword_inputs(model, dict(example_inputs))
        if isinstance(model, torch.export.ExportedProgram):
            return _program_keyword_inputs(model, dict(example_inputs))
        raise InputError("example_inputs is a dict of keyword inputs: they are bound to a model's forward, and there "
                         "is no model here; pass them positionally, as a tuple in the order of forward's parameters")
    raise InputError(f"example_inputs must be a tensor, a tuple of tensors or a dict of keyword inputs, got "
                     f"{type(example_inputs).__name__}")


def keyword_inputs(model: nn.Module, named: dict[str, Any], length: int | None = None) -> tuple[Any, ...]:
    """``named`` (keyword inputs) as the positional arguments of ``model.forward`` that make the same call: in the
    order of its parameters up to the last one named (``length``: exactly the first ``length`` parameters, as a
    graph captured with that many inputs takes them), each one left out at its default value. Captured graphs
    take their inputs positionally, so a name forward takes only through ``**kwargs`` (or keyword-only) cannot be
    placed, and neither can a left-out parameter without a default: both raise an :class:`InputError`."""
    if not named and length is None:
        raise InputError("example_inputs is an empty dict: give the model's inputs, e.g. dict(input_ids=ids)")
    return _placed(_forward_parameters(model), named, length)


def _placed(signature: tuple[str, list[inspect.Parameter], list[str]], named: dict[str, Any],
            length: int | None) -> tuple[Any, ...]:
    where, params, names = signature
    for key in named:
        if key not in names:
            raise InputError(f"{where} has no positional parameter {key!r} (it has {', '.join(names) or 'none'}): "
                             "fxprune passes example inputs positionally; name only those parameters")
        if length is not None and names.index(key) >= length:
            raise InputError(f"{key!r} was not among the example inputs: the graph takes the first {length} "
                             f"parameters of {where} ({', '.join(names[:length])}); capture with it to pass it")
    last = max(names.index(k) for k in named) if length is None else length - 1
    args = []
    for p in params[:last + 1]:
        if p.name in named:
            args.append(named[p.name])
        elif p.default is inspect.Parameter.empty:
            raise InputError(f"{where} needs {p.name!r} (it has no default) before "
                             f"{names[last]!r}: add it to example_inputs")
        else:
            args.append(p.default)
    return tuple(args)


def _forward_parameters(model: nn.Module) -> tuple[str, list[inspect.Parameter], list[str]]:
    """``model.forward`` (read through wrappers) as ``Class.forward``, its parameters, and the names of those a
    positional call can fill."""
    owner = unwrapped(model)
    try:
        params = list(inspect.signature(owner.forward).parameters.values())
    except (TypeError, ValueError) as e:
        raise InputError(f"cannot read the parameters of {type(owner).__name__}.forward to place keyword inputs "
                         f"({e}): pass the inputs positionally, as a tuple") from None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return f"{type(owner).__name__}.forward", params, [p.name for p in params if p.kind in kinds]


def model_call(model: nn.Module, example: tuple[Any, ...]) -> "ModelCall":
    """A function that turns a call of ``model`` (positional and keyword arguments, defaults left out) into the
    positional inputs of a graph captured from it on ``example``. The graph holds what was not a tensor there
    (``None``, a flag) as a constant, so a call must give the same value there, and a tensor where it had one:
    anything else raises an :class:`InputError` instead of running a graph that does not compute it."""
    return ModelCall(_forward_parameters(model), tuple(example))


class ModelCall:
    """:func:`model_call`'s function, picklable: its :meth:`hook`, a forward pre-hook (``with_kwargs=True``), lets
    the graph itself be called as the model is, and the graph still saves with ``torch.save``."""

    def __init__(self, signature: tuple[str, list[inspect.Parameter], list[str]], example: tuple[Any, ...]) -> None:
        self.signature, self.example = signature, example

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        names, example = self.signature[2], self.example
        if len(args) > len(names):
            raise InputError(f"{len(args)} positional inputs, forward takes {len(names)}")
        named = dict(zip(names, args))
        twice = sorted(set(named) & set(kwargs))
        if twice:
            raise InputError(f"{', '.join(twice)} given both positionally and by name")
        placed = args if not kwargs and len(args) == len(example) else _placed(self.signature, {**named, **kwargs},
                                                                              len(example))
        for name, got, want in zip(names, placed, example):
            if isinstance(want, torch.Tensor) != isinstance(got, torch.Tensor) or (
                    not isinstance(want, torch.Tensor) and not (got is want or got == want)):
                raise InputError(f"{name}={_short(got)}: the graph was captured with {name}={_short(want)} and "
                                 "computes only that; capture (compile) again with this input among the example inputs")
        return placed

    def hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict]:
        return self(*args, **kwargs), {}


def _short(x: Any) -> str:
    return f"a tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else repr(x)


def _caches(model: nn.Module) -> bool:
    """Whether a module of ``model`` has a transformers config with the KV cache on."""
    return any(getattr(getattr(m, "config", None), "use_cache", False) is True for m in model.modules())


def _program_keyword_inputs(ep: torch.export.ExportedProgram, named: dict[str, Any]) -> tuple[Any, ...]:
    """Keyword inputs for a program exported with keyword inputs only, in the order its graph takes them."""
    from fxprune.graph.exported import keyword_names

    args, kwargs = ep.example_inputs or ((), {})
    if args or set(named) != set(kwargs):
        raise InputError(f"the ExportedProgram takes {len(args)} positional inputs and the keyword inputs "
                         f"{sorted(kwargs)}; got the keywords {sorted(named)}: pass exactly its keywords, or a tuple")
    return tuple(named[k] for k in keyword_names(ep))


def on_meta(m: nn.Module, *extra: Any) -> bool:
    """Whether a parameter or buffer of ``m`` (or a tensor among ``extra``) is on the meta device with no values
    (not bound to a reader: :mod:`fxprune.graph.lazy`)."""
    tensors = list(m.parameters()) + list(m.buffers()) + [t for t in extra if isinstance(t, torch.Tensor)]
    return any(lazy.unbound(t) for t in tensors)


def static_size_reads(gm: GraphModule) -> bool:
    """Whether a symbolic trace reads the size of a dim that does not vary with the inputs off a tensor
    (``B, N, C = x.shape``, ``x.size(-1)``): the analysis freezes such a dim (a size that changed would change what
    the graph computes), where torch.export records the size as a number the rewrite resizes. Reads of dynamic
    dims only (``x.view(x.size(0), -1)``) do not count."""
    for n in gm.graph.nodes:
        if n.op == "call_method" and n.target == "size":
            x, dims = n.args[0], ({n.args[1]} if len(n.args) > 1 else {n.kwargs["dim"]} if "dim" in n.kwargs else None)
        elif n.op == "call_function" and n.target is getattr and len(n.args) > 1 and n.args[1] == "shape":
            x = n.args[0]
            users = list(n.users)
            ints = [u.args[1] for u in users if u.op == "call_function" and u.target is operator.getitem
                    and isinstance(u.args[1], int)]
            dims = set(ints) if len(ints) == len(users) else None
        else:
            continue
        spec = node_spec(x) if isinstance(x, torch.fx.Node) else None
        if not isinstance(spec, TensorSpec):
            continue
        r = len(spec.shape)
        read = set(range(r)) if dims is None else {d % r for d in dims if isinstance(d, int) and r}
        if read - set(spec.dynamic):
            return True
    return False


# torch.nn modules that a symbolic trace keeps as one call (torch.nn's modules are its leaves) and torch.export
# records as the ATen ops they compute: attention's projections, heads and SDPA, the layers' feed-forward units and
# norms, each of which has channel rules; recurrent layers (one op with a rule, where a trace has one call); and
# convolutions that pad other than with zeros (a pad, then the conv); and any module whose weight is computed from
# parameters (torch.nn.utils.parametrize: weight norm, as aten._weight_norm; the legacy weight_norm hook)
EXPORT_INTO_OPS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.TransformerEncoder,
                   nn.TransformerDecoder, nn.Transformer, nn.LSTM, nn.GRU, nn.RNN)


def _export_into_ops(m: nn.Module) -> bool:
    from torch.nn.utils import parametrize
    from torch.nn.utils.weight_norm import WeightNorm

    return (isinstance(m, EXPORT_INTO_OPS) or (isinstance(m, nn.modules.conv._ConvNd) and m.padding_mode != "zeros")
            or parametrize.is_parametrized(m) or any(isinstance(h, WeightNorm) for h in m._forward_pre_hooks.values()))


def opaque_layers(gm: GraphModule) -> list[str]:
    """The calls of a symbolic trace to modules of :data:`EXPORT_INTO_OPS` (``nn.MultiheadAttention``,
    ``nn.TransformerEncoderLayer``...) or to a convolution with ``padding_mode="reflect"`` (or another mode than
    zeros), and its indexing of tensors (``h[:, :4]``). Such a module is one opaque call to the analysis, which
    would freeze every channel it touches, where torch.export writes out what it computes; torch.export writes an
    index as slices, selects and unsqueezes, which have channel rules. (``lower_modules`` lowers a symbolic trace's
    basic indexing to those steps too, for a trace kept where torch.export fails and a GraphModule traced by the
    user; advanced indexing stays opaque.)"""
    return [str(n.target) if n.op == "call_module" else n.name for n in gm.graph.nodes
            if n.op == "call_module" and _export_into_ops(gm.get_submodule(n.target))
            or n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[0], torch.fx.Node)
            and isinstance(n.args[0].meta.get("val"), torch.Tensor)]


def unwrapped(model: Any) -> Any:
    """The module inside the wrappers that compute its function unchanged: ``torch.compile``'s ``OptimizedModule``
    (``_orig_mod``), ``nn.DataParallel`` and ``DistributedDataParallel`` (``module``), however nested; anything
    else as it is. fxprune rewrites (and hands back) the module inside: wrap the result again."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def check_weights(m: nn.Module, what: str) -> None:
    """Raise :class:`UnsupportedError` unless every floating parameter holds real, finite values and every buffer
    real values without NaN: ``what`` (the pass) needs them. Buffers may hold infinities (clamp bounds, mask fill
    values): the analysis treats them as constants it never folds. Analysis alone works on the meta device."""
    fresh()  # this pass reads its weights again (writes through .data move no version counter)
    params = {name for name, _ in m.named_parameters()}
    for name, t in list(m.named_parameters()) + list(m.named_buffers()):
        if lazy.unbound(t):
            raise UnsupportedError(
                f"'{name}' is on the meta device (no values): {what} needs real weights. fp.capture and fp.analyze "
                "work on meta models; materialize the weights first, e.g. model.to_empty(device='cpu') and "
                "model.load_state_dict(...)")
        if not t.is_floating_point() or t.numel() == 0:
            continue
        s = scan(t, keep=True) if t.dim() else scan(lazy.value(t).reshape(1))  # one read, kept for the analysis
        if name in params and not s.finite:
            raise UnsupportedError(f"'{name}' holds NaN or Inf values: fix or re-initialize it before {what}")
        if s.has_nan:
            raise UnsupportedError(f"buffer '{name}' holds NaN values: fix or re-initialize it before {what}")


def _run(model: Any, inputs: tuple[Any, ...], what: str) -> Any:
    return run(model, inputs, what, "the example inputs")


def _check_reproduces(gm: GraphModule, model: nn.Module, inputs: tuple[Any, ...], reference: Any, what: str,
                      failure: str) -> None:
    """Run ``gm`` (``what``) and raise ``RuntimeError(failure)`` unless it gives ``reference``, the model's outputs,
    within the tolerance of ``gm``'s precision. Nothing to compare on the meta device (``reference`` is None)."""
    if reference is None:
        return
    p = next(check(lambda xs: reference, lambda xs: _run(gm, xs, what), [inputs]))
    if p.error is not None:
        raise p.error
    precision = precision_of(gm)
    if p.failure(rtol_for(precision)) is not None and not (  # unless an ill-conditioned model's own rounding
            precision == torch.float32 and rounding_only(model, gm, inputs, reference, p.got)):
        raise RuntimeError(failure)
    record(gm, model, inputs, reference, checked=True)


def _is_batch(dynamic_shapes: Any) -> bool:
    return isinstance(dynamic_shapes, str) and dynamic_shapes == BATCH


def _annotated_copy(gm: GraphModule, inputs: tuple[Any, ...], dynamic_shapes: Any) -> GraphModule:
    """A GraphModule running a copy of ``gm``'s graph (its tensors shared, never written), annotated, with its
    inputs' dims: those of its placeholders' symbolic sizes when it came from torch.export, else a dynamic batch
    where the graph runs at another batch size (or none, with ``dynamic_shapes=None``)."""
    out = graph_module(gm, copy.deepcopy(gm.graph), gm.__class__.__name__)
    out.meta.update(gm.meta)
    symbolic = any(isinstance(getattr(n.meta.get("val"), "shape", None), torch.Size)
                   and any(isinstance(s, torch.SymInt) for s in n.meta["val"].shape)
                   for n in gm.graph.nodes if n.op == "placeholder")
    if symbolic:
        dims = from_graph(gm).at(inputs)
    else:
        dims = batch_dims(inputs) if _is_batch(dynamic_shapes) else static_dims(inputs)
    out.meta[DYNAMIC_KEY] = _annotate_or_static(out, inputs, dims)
    return out


def _annotate_or_static(gm: GraphModule, inputs: tuple[Any, ...], dims: Any) -> Any:
    """Annotate ``gm`` with ``dims``; a graph that does not run at another point of their range (a size written in
    its code) is annotated with static dims instead. Returns the dims used."""
    try:
        annotate(gm, inputs, dims)
        return dims
    except Exception:
        dims = static_dims(inputs)
        annotate(gm, inputs, dims)
        return dims


# Producers whose output is a fresh tensor (never a view of another value): an in-place op on such a value with
# no other reader cannot be observed, so the symbolic graph computes the same thing as the model.
_FRESH_MODULES = (nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                  nn.ConvTranspose3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
                  nn.RMSNorm, nn.Embedding)
_FRESH_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.matmul, torch.add,
                    torch.sub, torch.mul, torch.matmul, torch.cat, F.linear, F.conv1d, F.conv2d, F.conv3d,
                    F.batch_norm, F.layer_norm, F.group_norm}
_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem}


def _mutates(gm: GraphModule, node: torch.fx.Node) -> bool:
    """Whether ``node`` writes into its first argument."""
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return (node.target in _INPLACE_OPERATORS or node.kwargs.get("inplace") is True
                or (name.endswith("_") and not name.endswith("__")))
    if node.op == "call_module":
        return getattr(gm.get_submodule(node.target), "inplace", False) is True
    return False


def _check_inplace(gm: GraphModule, rewrite: bool = True) -> None:
    """Symbolic tracing records an in-place op as a plain call and loses the mutation: readers of the mutated
    value (or of its aliases) would see the old value in the graph. Accept in-place ops on fresh values (and on the
    results of accepted in-place ops) that nothing read before the op: later readers are made to read the op's
    result, which is the mutated value (``h = lin(x); h.relu_(); h.mul_(2); return h``; ``conv -> bn ->
    ReLU(inplace=True)``; with ``rewrite=False``, for a graph that is not ours to change, only those read by
    nothing else). Anything else is for torch.export, which functionalizes."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    mutated: set[torch.fx.Node] = set()  # results of accepted in-place ops: fresh values too
    changed = False
    for node in list(gm.graph.nodes):
        if not _mutates(gm, node):
            continue
        src = node.args[0] if node.args else None
        fresh = isinstance(src, torch.fx.Node) and (
            src in mutated
            or (src.op == "call_module" and isinstance(gm.get_submodule(src.target), _FRESH_MODULES))
            or (src.op == "call_function" and src.target in _FRESH_FUNCTIONS))
        returns_it = node.target is not operator.setitem  # the op's result is the value it wrote into
        others = [u for u in src.users if u is not node] if fresh else []
        if rewrite and returns_it and others and all(order[u] > order[node] for u in others):
            for u in others:  # they read the value after the write: now the op's result
                u.replace_input_with(src, node)
            changed = True
        if fresh and returns_it and len(src.users) == 1:
            mutated.add(node)
        if not fresh or len(src.users) != 1:
            what = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
            raise CaptureError(
                f"in-place op '{what}' (node '{node.name}') writes into '{getattr(src, 'name', src)}', which is "
                "read elsewhere or may alias another tensor; symbolic tracing cannot record that")
    if changed:
        gm.recompile()


def _symbolic(model: nn.Module, inputs: tuple[Any, ...], reference: Any, dynamic_shapes: Any) -> GraphModule:
    """Symbolic tracing, always checked against the model: a trace can bake in control flow, and ``method="auto"``
    moves on to torch.export when the check fails."""
    if not (_is_batch(dynamic_shapes) or _is_every(dynamic_shapes)) and dynamic_shapes is not None:
        raise CaptureError("dynamic_shapes is torch.export's spec: use method='export' (or 'auto') with it")
    tracer = torch.fx.Tracer()
    graph = tracer.trace(model)
    gm = graph_module(tracer.root, graph, type(model).__name__)  # plain tensor attributes stay plain, not buffers
    _check_inplace(gm)
    if _is_every(dynamic_shapes):
        dims = _every(gm, inputs)
    else:
        dims = batch_dims(inputs) if _is_batch(dynamic_shapes) else static_dims(inputs)
    try:
        dims = _annotate_or_static(gm, inputs, dims)
    except Exception:  # fake propagation unsupported by some op: fall back to real shapes
        from torch.fx.passes.shape_prop import ShapeProp

        dims = static_dims(inputs)
        with contextlib.redirect_stderr(io.StringIO()):  # ShapeProp prints the traceback of what it then raises
            ShapeProp(gm).propagate(*inputs)
    gm.meta[DYNAMIC_KEY] = dims
    _check_reproduces(gm, model, inputs, reference, "the symbolically traced graph",
                      "the symbolic trace does not reproduce the model's outputs (control flow baked in?)")
    return gm


def _every(gm: GraphModule, inputs: tuple[Any, ...]) -> Any:
    """The dims of a symbolic trace that may vary: of :func:`every_dims`' symbols (each length shared by the
    inputs), those at whose next value (the example's + 1) the graph's shapes still propagate: all at once, else
    one at a time; what the model's code fixes (a Linear's input width, a conv's channels) fails there and stays
    static."""
    dims = every_dims(inputs)
    if runs_at(gm, resize(inputs, dims.sizes({s: h + 1 for s, h in dims.hints.items()}))):
        return dims
    free = [s for s in dims.ranges
            if runs_at(gm, resize(inputs, dims.only([s]).sizes({s: dims.hints[s] + 1})))]
    return dims.only(free)


def _export(model: nn.Module, inputs: tuple[Any, ...], reference: Any, dynamic_shapes: Any,
            check: bool) -> GraphModule:
    every = _is_every(dynamic_shapes)
    if every or _is_batch(dynamic_shapes):
        ep = _export_batch(model, inputs, every=every)
    else:
        ep = _exported(model, inputs, dynamic_shapes)
    gm = _program_module(ep, inputs)
    if check:
        _check_reproduces(gm, model, inputs, reference, "the exported graph",
                          "the exported graph does not reproduce the model's outputs")
    elif reference is not None:  # checked end to end by the first pass that checks its result (origin.py)
        record(gm, model, inputs, reference, checked=False)
    return gm


def _is_every(dynamic_shapes: Any) -> bool:
    return isinstance(dynamic_shapes, str) and dynamic_shapes == EVERY


def _export_batch(model: nn.Module, inputs: tuple[Any, ...], every: bool = False) -> torch.export.ExportedProgram:
    """Export with dim 0 (``every``: every dim) of every tensor input as ``Dim.AUTO``: torch.export keeps it dynamic
    where the model allows it. A batch of 1 would be specialized (torch.export's 0/1 rule), so the trace sees the
    example repeated to a batch of 2; the program still runs at 1. If the model cannot take that, the example's
    batch is traced."""
    spec = default_spec(inputs, every=every)
    tensors = [x for x in inputs if isinstance(x, torch.Tensor) and x.dim() > 0]
    if tensors and all(int(x.shape[0]) == 1 for x in tensors):
        doubled = resize(inputs, [(2, *x.shape[1:]) if isinstance(x, torch.Tensor) and x.dim() > 0 else None
                                  for x in inputs])
        try:
            return _exported(model, doubled, spec)
        except Exception:  # the model cannot take a batch of 2: export at the example
            pass
    return _exported(model, inputs, spec)


def _exported(model: nn.Module, inputs: tuple[Any, ...], dynamic_shapes: Any) -> torch.export.ExportedProgram:
    """``torch.export.export(model, inputs, strict=False)`` without the output that says nothing to fxprune's
    user (:func:`_quiet_export`), on contiguous copies of the inputs: torch.export guards on the strides of an
    example that is not contiguous (a slice such as ``ids[:, :-1]``), and its program then refuses every other
    size, where the model's function does not depend on strides."""
    inputs = pytree.tree_map_only(torch.Tensor, lambda t: t.contiguous(), inputs)
    with _quiet_export():
        return torch.export.export(model, inputs, dynamic_shapes=dynamic_shapes, strict=False)


@contextlib.contextmanager
def _quiet_export() -> Any:
    """Three things torch.export prints that say nothing to fxprune's user:

    - a warning for each ``Dim.AUTO`` dim it specializes (an image's one channel: "0/1 specialized"). fxprune
      asks for every dim, and those the model fixes are meant to be specialized;
    - the partial graph of an export that failed, to stderr (hundreds of lines for a transformers model).
      capture reports the failure in one line, and may go on with another method;
    - that ``nn.LSTM``/``GRU``/``RNN`` set their ``_flat_weights`` list during the export (torch's own modules do it
      on every call; their weights are parameters, which the program holds).

    Everything else written to stderr meanwhile is passed on (after the export); other warnings and errors show."""
    logger = logging.getLogger("torch._export.non_strict_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    buf = io.StringIO()
    try:
        with contextlib.redirect_stderr(buf), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"The tensor attributes .*_flat_weights\[")
            yield
    except Exception as e:
        partial = getattr(e, "partial_fx_graph", None)
        sys.stderr.write(buf.getvalue().replace(f"{partial}\n", "") if partial else buf.getvalue())  # (each wrapper prints it)
        raise
    else:
        sys.stderr.write(buf.getvalue())
    finally:
        logger.setLevel(level)


def program_module(ep: torch.export.ExportedProgram) -> GraphModule:
    """``ep.module()``, taking its inputs positionally as every graph here does. A program exported with keyword
    inputs takes them in the order of its flat inputs (:func:`fxprune.graph.exported.program_inputs`), with the
    same outputs: its pytree code generation gets a positional input spec, and the hook that checks each call
    against the keyword structure goes (the graph's own check of the inputs' shapes stays)."""
    from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo

    gm = ep.module()
    if ep.example_inputs is None or not ep.example_inputs[1]:
        return gm
    info = gm.graph._codegen.pytree_info
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    spec = pytree.tree_structure((tuple(range(len(names))), {}))
    gm.graph._codegen = _PyTreeCodeGen(_PyTreeInfo(names, spec, info.out_spec))
    gm._in_spec = spec
    gm.recompile()
    gm._forward_pre_hooks.clear()
    return gm


def _program_module(ep: torch.export.ExportedProgram, inputs: tuple[Any, ...]) -> GraphModule:
    """``ep.module()`` annotated with plain example shapes, its inputs' dynamic dims in ``meta[DYNAMIC_KEY]``. The
    program's nodes are never touched: node metadata is copied before it is rewritten, and its symbolic sizes are
    read without guarding (reading a SymInt as an int would specialize the program's shape environment)."""
    gm = program_module(ep)
    for n in gm.graph.nodes:
        n.meta = dict(n.meta)
    dims = from_graph(gm, ep.range_constraints).at(inputs)
    annotate(gm, inputs, dims)
    gm.meta[DYNAMIC_KEY] = dims
    return gm


class LabelsLeftOutWarning(UserWarning):
    """A model that could not be captured with the ``labels`` it was given was captured without them."""


def _without_labels(model: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """``inputs`` with the ``labels`` parameter of ``model.forward`` at its default (and the defaults after the
    last input given left out), when a tensor was given there; None otherwise."""
    try:
        _, params, names = _forward_parameters(model)
    except Exception:  # noqa: BLE001 (a forward fxprune cannot read: nothing to leave out)
        return None
    i = names.index("labels") if "labels" in names else len(inputs)
    if i >= len(inputs) or not isinstance(inputs[i], torch.Tensor) or params[i].default is inspect.Parameter.empty:
        return None
    out = [*inputs[:i], params[i].default, *inputs[i + 1:]]
    while len(out) > 1 and out[-1] is params[len(out) - 1].default:
        out.pop()
    return tuple(out)


@ieee_float32()  # (the model's outputs are the reference every check compares with)
def capture(model: Any, example_inputs: Any, method: Method = "auto", *, dynamic_shapes: Any = BATCH,
            check: bool = False) -> GraphModule:
    """Capture ``model`` as a GraphModule whose every node carries its shape and dtype.

    ``dynamic_shapes`` is torch.export's spec (``Dim``, ``Dim.AUTO``/``Dim.DYNAMIC``, nested like the inputs) and
    makes ``method="auto"`` use torch.export. By default (``"batch"``) dim 0 of every tensor input is dynamic
    wherever the model allows it: ``Dim.AUTO`` for torch.export (which keeps it static where the model needs a
    fixed size), and any batch size for a symbolically traced graph that runs at another one. ``"every"``: every
    dim of every tensor input, where the model accepts other sizes (sequence lengths, image sizes): ``Dim.AUTO``
    for torch.export; for a symbolic trace, each length the inputs share at which the graph's shapes still
    propagate one above the example's. ``None`` asks for static shapes. The inputs' dims are kept in ``gm.meta["fxprune_input_dims"]``
    (:class:`~fxprune.graph.dynamic.InputDims`): passes check their results at several shapes of that range and
    an ``ExportedProgram`` result is exported with them again.

    What is checked: a symbolic trace is always run and compared with the model (it can bake in control flow, and
    ``"auto"`` then moves on to torch.export). An exported graph is not run here: ``minimize`` compares its result
    with the model end to end and runs the captured graph only when that fails, to say which step is at fault
    (:mod:`fxprune.graph.origin`). ``check=True`` runs and compares the exported graph now (one forward).

    >>> import torch, fxprune as fp
    >>> gm = fp.capture(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()), (torch.randn(2, 4),))
    >>> [n.op for n in gm.graph.nodes]
    ['placeholder', 'call_module', 'call_module', 'output']
    >>> tuple(next(iter(gm.graph.nodes)).meta["val"].shape)
    (2, 4)
    """
    if method not in ("auto", "symbolic", "export"):
        raise CaptureError(f"method must be 'auto', 'symbolic' or 'export', got {method!r}")
    inputs = as_inputs(example_inputs, model)
    if isinstance(model, torch.export.ExportedProgram):
        gm = _program_module(model, inputs)
        record(gm, gm, inputs, _run(gm, inputs, "the exported program"), checked=True)
        gm.meta[EXAMPLE_INPUTS_KEY] = inputs
        return gm
    if isinstance(model, nn.Module):
        model = unmasked(unwrapped(model))  # masks held by prune hooks or parametrizations: read as the zeros they are (a copy)
    if isinstance(model, GraphModule):
        out = _run(model, inputs, "the GraphModule")
        _check_inplace(model, rewrite=False)
        if not is_annotated(model) or DYNAMIC_KEY not in model.meta:  # annotate a copy: never the caller's nodes
            model = _annotated_copy(model, inputs, dynamic_shapes)
        record(model, model, inputs, out, checked=True)
        model.meta[EXAMPLE_INPUTS_KEY] = inputs
        return model
    if not isinstance(model, nn.Module):
        raise InputError(f"capture takes an nn.Module, GraphModule or ExportedProgram, got {type(model).__name__}")
    with attributes_kept(model) as restore:
        return _capture_module(model, inputs, method, dynamic_shapes, check, restore)


_MODULE_INTERNALS = frozenset(nn.Module().__dict__)  # (parameters, buffers, submodules, hooks, training)


@contextlib.contextmanager
def attributes_kept(model: nn.Module) -> Any:
    """Every module of ``model`` with the plain attributes it had on entry, on exit and whenever the function it
    yields is called: those added go, those replaced come back, and a dict, list or set among them holds again what
    it held. A forward may cache values in its modules (timm's LeViT keeps its attention biases in a dict, per
    device): the capture's reference run would leave real tensors there for the trace to read as constants, a
    symbolic trace Proxies, torch.export fake tensors, and a copy of the model would carry them."""
    saved = []
    for m in model.modules():
        mine = {k: v for k, v in m.__dict__.items() if k not in _MODULE_INTERNALS}
        held = {k: copy.copy(v) for k, v in mine.items() if isinstance(v, (dict, list, set))}
        saved.append((m, mine, held))

    def restore() -> None:
        for m, mine, held in saved:
            for k in [k for k in m.__dict__ if k not in _MODULE_INTERNALS and k not in mine]:
                del m.__dict__[k]
            m.__dict__.update(mine)
            for k, was in held.items():
                now = mine[k]
                now.clear()
                now.extend(was) if isinstance(now, list) else now.update(was)

    try:
        yield restore
    finally:
        restore()


def _capture_module(model: nn.Module, inputs: tuple[Any, ...], method: Method, dynamic_shapes: Any,
                    check: bool, restore: Callable[[], None]) -> GraphModule:
    # A model on the meta device has shapes but no values: it is traced (fake tensors) but not run; its graph is
    # good for analysis, and the passes that need weights say so.
    reference = None if on_meta(model, *inputs) else _run(model, inputs, "the model")
    restore()  # (every run and trace starts from the model's own attributes)
    tracers = {"symbolic": _symbolic, "export": functools.partial(_export, check=check)}
    explicit = not (_is_batch(dynamic_shapes) or _is_every(dynamic_shapes)) and dynamic_shapes is not None
    order = (["export"] if explicit else ["symbolic", "export"]) if method == "auto" else [method]
    failures: list[str] = []
    held = None  # a symbolic trace that reads static sizes off tensors, while torch.export is tried
    for name in order:
        try:
            gm = tracers[name](model, inputs, reference, dynamic_shapes)
        except InputError:
            raise
        except Exception as e:
            last = traceback.extract_tb(e.__traceback__)[-1]
            failures.append(f"  {name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (at {last.filename.rsplit('/', 1)[-1]}:{last.lineno})")
            continue
        finally:
            restore()  # (the next tracer, and the caller, see the model's own attributes)
        if name == "symbolic" and method == "auto" and "export" in order and (static_size_reads(gm) or opaque_layers(gm)):
            held = gm  # its channels read as sizes, or its opaque layers, would freeze; torch.export records such
            continue  # sizes as numbers and writes those layers out as ATen ops
        break
    else:
        gm, name = held, "symbolic"  # torch.export failed: the symbolic trace after all (None: nothing worked)
    if gm is not None:
        gm.meta[EXAMPLE_INPUTS_KEY] = inputs
        gm.meta[CAPTURE_METHOD_KEY] = name
        return gm
    # (not with every dim dynamic: a caller asking that goes on to the batch alone, with the labels, when it fails;
    # XGLM's loss ties the numel of its inputs, which torch.export cannot keep as independent sizes)
    fewer = None if _is_every(dynamic_shapes) else _without_labels(model, inputs)
    if fewer is not None:  # a loss with data-dependent code (DeBERTa's): the outputs it is computed from
        try:
            gm = capture(model, fewer, method, dynamic_shapes=dynamic_shapes, check=check)
        except (CaptureError, InputError):  # (InputError: a model that needs them, as T5 needs decoder inputs)
            pass
        else:
            warnings.warn(f"{type(model).__name__} could not be captured with the labels it was given ("
                          f"{failures[-1].strip()}); it was captured without them: the graph returns the outputs "
                          "the loss is computed from, not the loss", LabelsLeftOutWarning, stacklevel=3)
            return gm
    hint = (
        "try method='export' (torch.export handles control flow on shapes and HF models)"
        if method == "symbolic"
        else "make the model traceable: remove data-dependent Python control flow, or pass an ExportedProgram "
        "you exported yourself (torch.export.export(model, args, strict=False))"
    )
    if any("cache_utils" in f or "Cache'>" in f for f in failures) and _caches(model):
        hint = ("the model returns transformers' KV cache (config.use_cache is True), which torch.export cannot "
                "return: set model.config.use_cache = False before capturing (the graph then returns no cache), or "
                "use fp.minimize_module(model, inputs), which keeps your class and its cache")
    raise CaptureError(f"could not capture {type(model).__name__}:\n" + "\n".join(failures) + f"\nWhat to try: {hint}.")
