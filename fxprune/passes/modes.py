"""``trainable``: the mode switches an eval-mode capture baked into a graph, given back as modules.

A graph captured from a model in eval mode calls BatchNorm with ``training=False`` and dropout with ``train=False``:
torch.export writes both flags as constants, and ``lower_modules`` lowers BatchNorm modules the same way. Such a
graph computes the deployed function, but trained after ``.train()`` it would normalize with the running statistics
and never update them, and drop nothing. ``trainable`` turns each such call back into a module (``nn.BatchNorm1d``,
``2d`` or ``3d`` holding the graph's own weight, bias and running statistics; ``nn.Dropout``), so that ``.train()``
and ``.eval()`` switch them as they switch the user's model. In eval mode the result computes the same function
(checked on the example inputs when given).

Momentum: an eval-mode graph records BatchNorm's ``momentum=None`` (a cumulative average) as ``0.0``, the factor eval
mode passes on. A running statistic that never moves is what 0.0 would mean, which no one trains with, so 0.0 comes
back as ``None``. A call whose statistics are read elsewhere too, whose input rank is unknown or that has only one of
weight and bias stays as it is and is named in the returned list.
"""
from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from fxprune.compare import check, eval_modes, rtol_for
from fxprune.errors import EquivalenceError
from fxprune.graph.rebuild import attr_owner, get_attr, has_attr

__all__ = ["trainable", "SWITCHES"]

aten = torch.ops.aten

# call target -> (kind, its argument names in order, defaults of the trailing ones)
SWITCHES: dict[Any, tuple[str, tuple[str, ...], dict[str, Any]]] = {
    F.batch_norm: ("batch_norm", ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum",
                                  "eps"), dict(weight=None, bias=None, training=False, momentum=0.1, eps=1e-5)),
    aten.batch_norm.default: ("batch_norm", ("input", "weight", "bias", "running_mean", "running_var", "training",
                                             "momentum", "eps", "cudnn_enabled"), {}),
    F.dropout: ("dropout", ("input", "p", "training", "inplace"), dict(p=0.5, training=True, inplace=False)),
    aten.dropout.default: ("dropout", ("input", "p", "train"), {}),
}

_BATCH_NORMS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def _bound(node: Node) -> dict[str, Any]:
    _, names, defaults = SWITCHES[node.target]
    out = dict(defaults)
    out.update(zip(names, node.args))
    out.update(node.kwargs)
    return out


def _rank(node: Any) -> int | None:
    val = node.meta.get("val", node.meta.get("tensor_meta")) if isinstance(node, Node) else None
    shape = getattr(val, "shape", None)
    return None if shape is None else len(shape)


def _free_name(gm: GraphModule, base: str) -> str:
    name, k = base, 0
    while hasattr(gm, name):
        k += 1
        name = f"{base}_{k}"
    return name


def _batch_norm(gm: GraphModule, a: dict[str, Any], readers: dict[str, int]) -> tuple[nn.Module, str] | None:
    """The BatchNorm module for a call with arguments ``a``, its tensors moved into it from ``gm``, and the path to
    put it at (where its tensors' own container was, when nothing else is left in it); None where it must stay."""
    stats, affine = [a["running_mean"], a["running_var"]], [a["weight"], a["bias"]]
    rank = _rank(a["input"])
    attrs = [t for t in stats + affine if t is not None]
    if (rank not in _BATCH_NORMS or not all(isinstance(t, Node) and t.op == "get_attr" for t in attrs)
            or (affine[0] is None) != (affine[1] is None) or any(readers[t.target] != 1 for t in attrs)):
        return None
    path = stats[0].target.rpartition(".")[0]
    mean = get_attr(gm, stats[0].target)
    bn = _BATCH_NORMS[rank](mean.numel(), eps=float(a["eps"]), momentum=float(a["momentum"]) or None,
                            affine=affine[0] is not None, device=mean.device, dtype=mean.dtype)
    tracked = f"{path}.num_batches_tracked" if path else "num_batches_tracked"
    moves = dict(running_mean=stats[0].target, running_var=stats[1].target, weight=getattr(affine[0], "target", None),
                 bias=getattr(affine[1], "target", None),
                 num_batches_tracked=tracked if readers.get(tracked, 0) == 0 and _has_tensor(gm, tracked) else None)
    for name, target in moves.items():
        if target is None:
            continue
        owner, leaf = attr_owner(gm, target)
        value = getattr(owner, leaf)
        delattr(owner, leaf)
        if name in ("weight", "bias"):
            bn.register_parameter(name, value if isinstance(value, nn.Parameter) else nn.Parameter(value))
        else:
            bn.register_buffer(name, value)
    container = gm.get_submodule(path) if path else gm
    empty = type(container) is nn.Module and not any(True for _ in container.named_children()) and not (
        container._parameters or container._buffers)
    return bn, path if path and empty else _free_name(gm, path.replace(".", "_") or "batch_norm")


def _has_tensor(gm: nn.Module, target: str) -> bool:
    return has_attr(gm, target) and isinstance(get_attr(gm, target), torch.Tensor)


def _baked(kind: str, a: dict[str, Any]) -> bool:
    """Whether the call's mode flag is a constant False (an eval-mode capture)."""
    return (a["training"] if kind == "batch_norm" else a.get("training", a.get("train"))) is False


def trainable(gm: GraphModule, example_inputs: Sequence[Any] | None = None) -> tuple[GraphModule, list[str]]:
    """A copy of ``gm`` (nothing of ``gm`` changed or shared) whose eval-mode BatchNorm and dropout calls are modules
    again (see the module docstring), and the names of the eval-mode calls that stayed as they were. With
    ``example_inputs``, the copy in eval mode is checked against ``gm`` on them
    (:class:`~fxprune.errors.EquivalenceError` if it differs)."""
    out = copy.deepcopy(gm)
    graph = out.graph
    readers: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "get_attr":
            readers[n.target] = readers.get(n.target, 0) + len(n.users)
    kept: list[str] = []
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in SWITCHES:
            continue
        kind, a = SWITCHES[node.target][0], _bound(node)
        if not _baked(kind, a):
            continue
        attrs = [a[k] for k in ("running_mean", "running_var", "weight", "bias")] if kind == "batch_norm" else []
        made = _batch_norm(out, a, readers) if kind == "batch_norm" else (nn.Dropout(float(a["p"])), None)
        if made is None:
            kept.append(node.name)
            continue
        module, path = made
        path = path or _free_name(out, node.name)
        if path in dict(out.named_modules()):
            parent, leaf = attr_owner(out, path)
            setattr(parent, leaf, module)
        else:
            out.add_submodule(path, module)
        with graph.inserting_before(node):
            new = graph.call_module(path, (a["input"],))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        for t in attrs:
            if isinstance(t, Node) and not t.users:
                graph.erase_node(t)
    for n in list(graph.nodes):  # reads of moved tensors nothing uses (torch.export reads num_batches_tracked)
        if n.op == "get_attr" and not n.users and not has_attr(out, n.target):
            graph.erase_node(n)
    out.recompile()
    if example_inputs is not None:
        _check(gm, out, example_inputs)
    return out, kept


def _check(gm: GraphModule, out: GraphModule, example_inputs: Sequence[Any]) -> None:
    with eval_modes(out):
        p = next(check(lambda xs: gm(*xs), lambda xs: out(*xs), [tuple(example_inputs)]))
    if p.error is not None:
        raise p.error
    dtype = next((t.dtype for t in out.state_dict().values() if t.is_floating_point()), torch.float32)
    bad = p.failure(rtol_for(dtype))
    if bad is not None:
        raise EquivalenceError(f"trainable: the graph with its modes as modules differs from the input in eval mode "
                               f"(output {bad.index}: relative error {bad.max_rel:.3g})")
