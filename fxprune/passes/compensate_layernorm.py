"""``compensate_layernorm``: LayerNorm / RMSNorm / GroupNorm -> their compensated form, computing the same function.

Every one-dim ``nn.LayerNorm`` / ``nn.RMSNorm`` module becomes a :class:`~fxprune.nn.CompensatedLayerNorm` /
:class:`~fxprune.nn.CompensatedRMSNorm` (``nn.GroupNorm(1, C)``: :class:`~fxprune.nn.CompensatedGroupNorm`), and
every one-dim ``F.layer_norm`` / ``aten.layer_norm`` (``rms_norm``, ``group_norm``) call becomes
:func:`~fxprune.nn.compensated_layer_norm` (``compensated_rms_norm``, ``compensated_group_norm``) with nothing
removed yet.
``minimize`` does this by itself for the norms whose channels it removes; this pass is for pipelines that want
every norm in the compensated form up front (to fine-tune it, or to hand it to later passes).
Multi-dim norms are left as they are.
"""
from __future__ import annotations

from torch import nn
from torch.fx import GraphModule

from fxprune.analysis.rule import FULL_MEAN, GHOST_SUM, Op
from fxprune.analysis.rules import Norm
from fxprune.analysis.table import RULES
from fxprune.errors import InputError
from fxprune.graph.capture import EXAMPLE_INPUTS_KEY
from fxprune.graph.rebuild import GraphCopy, rebuild
from fxprune.graph.shapes import node_spec
from fxprune.nn.norm import (CompensatedGroupNorm, CompensatedLayerNorm, CompensatedRMSNorm, compensated_group_norm,
                             compensated_layer_norm, compensated_rms_norm)
from fxprune.graph.exported import Program, exported_io
from fxprune.graph.rebuild import attr_owner

__all__ = ["compensate_layernorm", "uncompensate"]

def _module_replacement(m: nn.Module) -> nn.Module | None:
    if type(m) is nn.LayerNorm and len(m.normalized_shape) == 1:
        return CompensatedLayerNorm.from_layer_norm(m)
    if type(m) is nn.GroupNorm:
        return CompensatedGroupNorm.from_group_norm(m)
    if hasattr(nn, "RMSNorm") and type(m) is nn.RMSNorm and len(m.normalized_shape) == 1:
        return CompensatedRMSNorm.from_rms_norm(m)
    return None


@exported_io
def compensate_layernorm(gm: Program, *, verify: bool = True) -> Program:
    """A new GraphModule in which every one-dim LayerNorm / RMSNorm (and GroupNorm) is in compensated form
    (same function).

    With ``verify`` (the default) the result is checked as ``minimize``'s is, against the model ``gm`` was
    captured from, at the example inputs ``fp.capture`` recorded and the other check points of their dynamic
    dims: :class:`~fxprune.errors.EquivalenceError` rather than a wrong graph. A graph with no recorded example
    inputs is not run.

    >>> import torch, fxprune as fp
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.LayerNorm(6))
    >>> gm = fp.compensate_layernorm(fp.capture(net, (torch.randn(2, 4),)))
    >>> gm.get_submodule("1")
    CompensatedLayerNorm(6, full_size=6, removed_sum=0.0, removed_sq_sum=0.0, eps=1e-05)
    """
    if not isinstance(gm, GraphModule):
        raise InputError(f"compensate_layernorm takes a GraphModule (from fp.capture), got {type(gm).__name__}")
    copy_ = GraphCopy(gm.graph)
    graph = copy_.graph
    swaps: dict[str, nn.Module] = {}
    for n in gm.graph.nodes:
        new = copy_.copy(n)
        if n.op == "call_module":
            repl = _module_replacement(gm.get_submodule(n.target))
            if repl is not None:
                swaps[n.target] = repl
            continue
        rule, op = RULES.lookup(n, gm), Op(n, gm)
        if n.op != "call_function" or type(rule) is not Norm or not rule.compensable(op):
            continue
        groups = None
        if op.target in Norm._GROUP:  # the norm over each group's channels (and every position)
            full, G = node_spec(op.arg(0, "input")).shape[1], op.arg(1, "num_groups")
            if G != 1:
                groups = (full // G,) * G
        elif len(op.arg(1, "normalized_shape")) == 1:
            full = op.arg(1, "normalized_shape")[0]
        else:
            continue
        none = (0.0,) * len(groups) if groups else 0.0
        new.target, new.args = rule.compensated(op, copy_.arg, full, none, none, 1, groups=groups)
        new.kwargs = {}
    out = rebuild(gm, graph, {})
    for target, module in swaps.items():
        owner, name = attr_owner(out, target)
        owner.add_module(name, module)
    out.recompile()
    inputs = gm.meta.get(EXAMPLE_INPUTS_KEY)
    if verify and (swaps or any(n.target in (compensated_layer_norm, compensated_group_norm, compensated_rms_norm)
                                for n in graph.nodes)) \
            and inputs is not None:
        from fxprune.passes.minimize import self_check  # the one end-to-end check every rewrite runs

        self_check(gm, out, inputs)
    return out


def uncompensate(gm: GraphModule) -> GraphModule:
    """What plain slicing would compute: a copy of ``gm`` whose compensated norms use the statistics of the
    kept channels only (as if the removed channels had never existed). For demonstrating the error
    compensation avoids; never part of a pipeline."""
    copy_ = GraphCopy(gm.graph)
    graph, env = copy_.graph, copy_.env
    for n in gm.graph.nodes:
        if n.meta.get(GHOST_SUM):  # sum over kept + removed channels -> sum over kept
            env[n] = env[n.args[0]]
            continue
        new = copy_.copy(n)
        if FULL_MEAN in n.meta:  # (sum) / full width -> (sum over kept) / kept width
            kept_sum = n.args[0].args[0] if n.args[0].meta.get(GHOST_SUM) else n.args[0]
            new.args = (new.args[0], kept_sum.args[0].meta["val"].shape[n.meta[FULL_MEAN]])
        elif n.target is compensated_layer_norm:
            x, w, b, eps = new.args[:4]
            new.args = (x, w, b, eps, n.meta["val"].shape[-1], 0.0, 0.0)
        elif n.target is compensated_group_norm and (len(n.args) < 8 or n.args[7] is None):  # (one group; several
            x, w, b, eps = new.args[:4]                     # groups of unequal widths have no uncompensated form)
            new.args = (x, w, b, eps, n.meta["val"].shape[1], 0.0, 0.0)
        elif n.target is compensated_rms_norm:
            x, w, eps = new.args[:3]
            new.args = (x, w, eps, n.meta["val"].shape[-1], 0.0)
    return rebuild(gm, graph, {})
