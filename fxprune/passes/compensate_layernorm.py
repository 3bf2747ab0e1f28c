"""``compensate_layernorm``: LayerNorm / RMSNorm -> their compensated form, computing the same function.

Every one-dim ``nn.LayerNorm`` / ``nn.RMSNorm`` module becomes a :class:`~fxprune.nn.CompensatedLayerNorm` /
:class:`~fxprune.nn.CompensatedRMSNorm`, and every one-dim ``F.layer_norm`` / ``aten.layer_norm`` (``rms_norm``)
call becomes :func:`~fxprune.nn.compensated_layer_norm` (``compensated_rms_norm``) with nothing removed yet.
``minimize`` does this by itself for the norms whose channels it removes; this pass is for pipelines that want
every norm in the compensated form up front (to fine-tune it, or to hand it to later passes).
Multi-dim norms and GroupNorm are left as they are.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from fxprune.analysis.rule import FULL_MEAN, GHOST_SUM
from fxprune.errors import InputError
from fxprune.graph.rebuild import new_graph_like, rebuild
from fxprune.nn.norm import CompensatedLayerNorm, CompensatedRMSNorm, compensated_layer_norm, compensated_rms_norm

__all__ = ["compensate_layernorm", "uncompensate"]

aten = torch.ops.aten
_LAYER = (F.layer_norm, aten.layer_norm.default)
_RMS = tuple(t for t in (getattr(F, "rms_norm", None), getattr(aten, "rms_norm", None) and aten.rms_norm.default) if t)


def _arg(n: Node, i: int, name: str, default=None):
    return n.args[i] if i < len(n.args) else n.kwargs.get(name, default)


def _module_replacement(m: nn.Module) -> nn.Module | None:
    if type(m) is nn.LayerNorm and len(m.normalized_shape) == 1:
        return CompensatedLayerNorm.from_layer_norm(m)
    if hasattr(nn, "RMSNorm") and type(m) is nn.RMSNorm and len(m.normalized_shape) == 1:
        return CompensatedRMSNorm.from_rms_norm(m)
    return None


def compensate_layernorm(gm: GraphModule) -> GraphModule:
    """A new GraphModule in which every one-dim LayerNorm / RMSNorm is in compensated form (same function).

    >>> import torch, fxprune as fp
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.LayerNorm(6))
    >>> gm = fp.compensate_layernorm(fp.capture(net, (torch.randn(2, 4),)))
    >>> gm.get_submodule("1")
    CompensatedLayerNorm(6, full_size=6, removed_sum=0.0, removed_sq_sum=0.0, eps=1e-05)
    """
    if not isinstance(gm, GraphModule):
        raise InputError(f"compensate_layernorm takes a GraphModule (from fp.capture), got {type(gm).__name__}")
    graph = new_graph_like(gm.graph)
    env: dict[Node, Node] = {}
    swaps: dict[str, nn.Module] = {}
    for n in gm.graph.nodes:
        new = env[n] = graph.node_copy(n, lambda a: env[a])
        if n.op == "call_module":
            repl = _module_replacement(gm.get_submodule(n.target))
            if repl is not None:
                swaps[n.target] = repl
            continue
        if n.op != "call_function" or n.target not in _LAYER + _RMS:
            continue
        shape = _arg(n, 1, "normalized_shape")
        if len(shape) != 1:
            continue
        x, w = env[n.args[0]], env.get(_arg(n, 2, "weight"), _arg(n, 2, "weight"))
        if n.target in _LAYER:
            b = env.get(_arg(n, 3, "bias"), _arg(n, 3, "bias"))
            new.target, new.args, new.kwargs = compensated_layer_norm, (x, w, b, _arg(n, 4, "eps", 1e-5), shape[0], 0.0, 0.0), {}
        else:
            new.target, new.args, new.kwargs = compensated_rms_norm, (x, w, _arg(n, 3, "eps"), shape[0], 0.0), {}
    out = rebuild(gm, graph, {})
    for target, module in swaps.items():
        owner, _, name = target.rpartition(".")
        out.get_submodule(owner).add_module(name, module)
    out.recompile()
    return out


def uncompensate(gm: GraphModule) -> GraphModule:
    """What plain slicing would compute: a copy of ``gm`` whose compensated norms use the statistics of the
    kept channels only (as if the removed channels had never existed). For demonstrating the error
    compensation avoids; never part of a pipeline."""
    graph = new_graph_like(gm.graph)
    env: dict[Node, Node] = {}
    for n in gm.graph.nodes:
        if n.meta.get(GHOST_SUM):  # sum over kept + removed channels -> sum over kept
            env[n] = env[n.args[0]]
            continue
        new = env[n] = graph.node_copy(n, lambda a: env[a])
        if FULL_MEAN in n.meta:  # (sum) / full width -> (sum over kept) / kept width
            kept_sum = n.args[0].args[0] if n.args[0].meta.get(GHOST_SUM) else n.args[0]
            new.args = (new.args[0], kept_sum.args[0].meta["val"].shape[n.meta[FULL_MEAN]])
        elif n.target is compensated_layer_norm:
            x, w, b, eps = new.args[:4]
            new.args = (x, w, b, eps, n.meta["val"].shape[-1], 0.0, 0.0)
        elif n.target is compensated_rms_norm:
            x, w, eps = new.args[:3]
            new.args = (x, w, eps, n.meta["val"].shape[-1], 0.0)
    return rebuild(gm, graph, {})
