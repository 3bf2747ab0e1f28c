"""Build a new GraphModule from a graph and fresh attributes, sharing nothing with the old one."""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node

from fxprune.errors import UnsupportedError

__all__ = ["rebuild", "accelerator", "get_attr", "has_attr", "attr_owner", "named_tensors", "tied_names", "new_graph_like",
           "GraphCopy", "graph_module"]


def accelerator(m: nn.Module) -> torch.device | None:
    """The one accelerator (a GPU) that ``m``'s parameters and buffers live on, or None for a model on the CPU (or
    the meta device): where the tensors a rewrite creates go. Raises :class:`UnsupportedError` for a model spread
    over several devices."""
    devices = {t.device for t in [*m.parameters(), *m.buffers()] if t.device.type != "meta"}
    if len(devices) > 1:
        raise UnsupportedError(f"the model's tensors are on {len(devices)} devices ({', '.join(sorted(map(str, devices)))}): "
                               "fxprune rewrites a model on one device; move it to one (model.to(device)) first")
    d = next(iter(devices), None)
    return d if d is not None and d.type != "cpu" else None


def get_attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def has_attr(gm: nn.Module, target: str) -> bool:
    """Whether the dotted ``target`` resolves on ``gm``."""
    try:
        get_attr(gm, target)
        return True
    except AttributeError:
        return False


def attr_owner(root: nn.Module, target: str) -> tuple[nn.Module, str]:
    """The module holding the dotted ``target`` of ``root``, and the attribute's name in it."""
    path, _, leaf = target.rpartition(".")
    return (root.get_submodule(path) if path else root), leaf


def named_tensors(m: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of ``m`` under every name it has (a tied tensor once per name)."""
    return list(m.named_parameters(remove_duplicate=False)) + list(m.named_buffers(remove_duplicate=False))


def tied_names(m: nn.Module) -> dict[int, list[str]]:
    """Per parameter or buffer object (by ``id``), every name it has in ``m``: tied weights have several. The one
    tied-tensor detection of the eager side (a graph's ties are ``Spaces.param_key``)."""
    out: dict[int, list[str]] = {}
    for name, t in named_tensors(m):
        out.setdefault(id(t), []).append(name)
    return out


def _kind(gm: nn.Module, target: str) -> str:
    try:
        owner, name = attr_owner(gm, target)
    except AttributeError:
        return "buffer"
    if name in owner._parameters:
        return "param"
    if name in owner._buffers and name in getattr(owner, "_non_persistent_buffers_set", ()):
        return "nonpersistent"
    if name not in owner._buffers and isinstance(getattr(owner, name, None), torch.Tensor):
        return "constant"  # a plain tensor attribute (torch.export's lifted constants): not state, stays so
    return "buffer"


def rebuild(old: GraphModule, graph: Graph, tensors: dict[str, torch.Tensor], buffers: set[str] = frozenset(),
            copy_if: Callable[[torch.Tensor], bool] | None = None) -> GraphModule:
    """A GraphModule running ``graph``; get_attr targets come from ``tensors`` or from ``old``; call_module targets
    are deep-copied from ``old``. A tensor of ``old`` (taken from it, or passed in ``tensors`` unchanged) is copied
    where ``copy_if(tensor)`` says so (default: always, so the result shares no storage with ``old``) and shared,
    the same object, elsewhere; any other tensor in ``tensors`` is a new value, owned by the caller, and is used as
    it is. Targets bound to one tensor (tied weights) stay bound to one parameter. Parameters, buffers and plain
    tensor attributes (constants, not in the state dict) keep their kind. New targets become parameters, except
    those named in ``buffers``."""
    root = nn.Module()
    made: dict[int, torch.Tensor] = {}
    for node in graph.nodes:
        if node.op not in ("get_attr", "call_module"):
            continue
        path, _, name = node.target.rpartition(".")
        owner = root
        for part in path.split(".") if path else []:
            if not hasattr(owner, part):
                owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
        if hasattr(owner, name):
            continue
        if node.op == "call_module":
            owner.add_module(name, copy.deepcopy(old.get_submodule(node.target)))
            continue
        src = get_attr(old, node.target) if node.target not in tensors else None
        kind = _kind(old, node.target) if src is not None or has_attr(old, node.target) else "param"
        if node.target in buffers:
            kind = "buffer"
        value = tensors[node.target] if node.target in tensors else src
        if not isinstance(value, torch.Tensor):
            setattr(owner, name, copy.deepcopy(value))
            continue
        mine = has_attr(old, node.target) and get_attr(old, node.target) is value  # else a new value from the caller
        clone = mine and (copy_if is None or copy_if(value))
        if id(value) in made:
            new = made[id(value)]
        elif kind == "param":
            requires_grad = getattr(src, "requires_grad", True) if src is not None else _requires_grad(old, node.target)
            requires_grad = requires_grad and value.is_floating_point()
            if not clone and isinstance(value, nn.Parameter) and value.requires_grad == requires_grad:
                new = value
            else:
                new = nn.Parameter(value.detach().clone() if clone else value.detach(), requires_grad=requires_grad)
        else:
            new = value.detach().clone() if clone else value if mine else value.detach()
        made[id(value)] = new
        if kind == "constant":
            setattr(owner, name, new)
        elif isinstance(new, nn.Parameter):
            owner.register_parameter(name, new)
        else:
            owner.register_buffer(name, new, persistent=kind != "nonpersistent")
    gm = graph_module(root, graph, old.__class__.__name__ if isinstance(old, GraphModule) else "GraphModule")
    gm.meta.update({k: v for k, v in old.meta.items()})
    return gm


def graph_module(root: nn.Module, graph: Graph, class_name: str = "GraphModule") -> GraphModule:
    """``GraphModule(root, graph)``, except that get_attr targets that are plain tensor attributes of ``root`` (not
    parameters or buffers: torch.export's lifted constants, caches a model builds) stay plain attributes.
    GraphModule registers them as buffers, which would put them into the state dict and the parameter count."""
    gm = GraphModule(root, graph, class_name)
    for node in graph.nodes:
        if node.op != "get_attr":
            continue
        path, _, name = node.target.rpartition(".")
        try:
            src, dst = root.get_submodule(path), gm.get_submodule(path)
        except AttributeError:
            continue
        if name in dst._buffers and name not in src._buffers and name not in src._parameters:
            value = dst._buffers.pop(name)
            dst._non_persistent_buffers_set.discard(name)
            setattr(dst, name, value)
    return gm


def _requires_grad(gm: nn.Module, target: str) -> bool:
    t = get_attr(gm, target) if has_attr(gm, target) else None
    return bool(getattr(t, "requires_grad", True))


def new_graph_like(old: Graph) -> Graph:
    g = Graph()
    g._codegen = copy.deepcopy(old._codegen)
    return g


class GraphCopy:
    """The one way a pass copies a graph: a new graph with ``old``'s codegen (an exported graph keeps taking and
    returning its pytree), filled node by node in order; ``env`` maps each old node to its value in the new graph
    (a node, or a tuple of nodes for a region inlined whole). What a pass does differently for a node, it does
    around :meth:`copy` or instead of it."""

    def __init__(self, old: Graph) -> None:
        self.graph = new_graph_like(old)
        self.env: dict[Node, Any] = {}

    def copy(self, n: Node) -> Node:
        """``n`` copied as it is, its arguments read from ``env``; recorded there."""
        new = self.env[n] = self.graph.node_copy(n, self.env.__getitem__)
        return new

    def arg(self, a: Any) -> Any:
        """An argument (nested lists and tuples of nodes and constants) with every node read from ``env``."""
        return torch.fx.node.map_arg(a, self.env.__getitem__)
