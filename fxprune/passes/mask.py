"""``mask``: magnitude (or random) pruning that writes exact zeros, pure.

The returned GraphModule records its masks in ``gm.meta["fxprune_masks"]`` (parameter name -> bool tensor,
True = kept). To keep them applied while fine-tuning, call :func:`hold_masks_` (a parametrization that
multiplies each weight by its mask, so masked entries stay exactly zero under any optimizer, DDP included);
:func:`bake_masks_` removes the parametrizations again, leaving plain parameters with their zeros.
"""
from __future__ import annotations

import copy
import fnmatch
import math
import warnings
from typing import Callable, Iterable, Literal, Mapping

import torch
from torch import nn
from torch.fx import GraphModule
from torch.nn.utils import parametrize

from fxprune.errors import MaskError, require
from fxprune.graph.capture import check_weights
from fxprune.graph.exported import Program, exported_io
from fxprune.graph.masks import bake_weight_norm_masks_, mask_weight_norm_, weight_normed
from fxprune.graph.rebuild import attr_owner

__all__ = ["mask", "magnitude_masks", "group_masks", "taylor_gradients", "flop_costs", "TargetNotReachedWarning", "apply_masks", "prunable", "hold_masks_", "bake_masks_", "hold_masks", "bake_masks", "sparsity_schedule", "MASKS_KEY"]

MASKS_KEY = "fxprune_masks"
REACHED_KEY = "fxprune_mask_reached"  # structure="groups": the fraction of the parameters minimize will remove


def weight_sources(model: nn.Module) -> dict[str, str]:
    """The parameters a weight is computed from, by name: weight norm's direction ``v`` (``"direction"``) and scale
    ``g`` (``"scale"``), as ``torch.nn.utils.parametrizations.weight_norm`` holds them (``original1``,
    ``original0``), as the legacy hook does (``weight_v``, ``weight_g``) or as an exported graph reads them
    (``aten._weight_norm``); the originals of any other parametrization of the user's (``"original"``: orthogonal,
    spectral norm; fxprune's own masks aside). A mask on one of them is no mask on the weight; and a zero row of
    ``v`` is a row of NaN (0 / 0)."""
    from torch.nn.utils.weight_norm import WeightNorm

    from fxprune.analysis.rule import WEIGHT_NORMS

    normed = {id(mod.parametrizations[leaf]) for mod, leaf in weight_normed(model).values()}
    out: dict[str, str] = {}
    for path, mod in model.named_modules():
        pre = f"{path}." if path else ""
        for hook in mod._forward_pre_hooks.values():
            if isinstance(hook, WeightNorm):
                out |= {f"{pre}{hook.name}_v": "direction", f"{pre}{hook.name}_g": "scale"}
        if not parametrize.is_parametrized(mod):
            continue
        for leaf, plist in mod.parametrizations.items():
            if all(isinstance(p, HeldMask) for p in plist):
                continue
            for name, _ in plist.named_parameters(recurse=False):
                role = {"original0": "scale", "original1": "direction"}.get(name) if id(plist) in normed else None
                out[f"{pre}parametrizations.{leaf}.{name}"] = role or "original"
    if isinstance(model, GraphModule):
        for n in model.graph.nodes:
            if n.op == "call_function" and n.target in WEIGHT_NORMS:
                for a, role in zip(n.args[:2], ("direction", "scale")):
                    if getattr(a, "op", None) == "get_attr":
                        out[a.target] = role
    return out


def prunable(gm: nn.Module, include: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
             computed: bool = False) -> dict[str, torch.Tensor]:
    """The parameters ``mask`` may prune: floating, ndim >= 2, matching ``include`` and no ``exclude`` glob, and no
    source of a computed weight (:func:`weight_sources`: weight norm's g and v). ``computed``: the weights
    ``parametrizations.weight_norm`` computes as well (values, detached), which masks mask in g and v's terms
    (:func:`mask_weight_norm_`)."""
    inc, exc = list(include or ["*"]), list(exclude or [])
    out = {}
    sources = weight_sources(gm)
    if computed:
        for name, (mod, leaf) in weight_normed(gm).items():
            if any(fnmatch.fnmatch(name, pat) for pat in inc) and not any(fnmatch.fnmatch(name, pat) for pat in exc):
                out[name] = getattr(mod, leaf).detach()
    for name, p in gm.named_parameters():
        if p.dim() < 2 or not p.is_floating_point() or name in sources:
            continue
        if any(fnmatch.fnmatch(name, pat) for pat in inc) and not any(fnmatch.fnmatch(name, pat) for pat in exc):
            out[name] = p
    return out


Criterion = Literal["magnitude", "l1", "taylor", "random"]
CRITERIA = ("magnitude", "l1", "taylor", "random")


def _check_criterion(criterion: str, grads: Mapping[str, torch.Tensor] | None) -> None:
    if criterion not in CRITERIA:
        raise MaskError(f"criterion must be one of {', '.join(map(repr, CRITERIA))}, got {criterion!r}")
    if criterion == "taylor" and grads is None:
        raise MaskError("criterion='taylor' needs the gradients (taylor_gradients(model, calibration))")


def _scores(params: Mapping[str, torch.Tensor], criterion: str, seed: int,
            grads: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    if criterion in ("magnitude", "l1"):  # one weight: its L1 and L2 magnitude rank alike
        return {n: p.detach().abs().float() for n, p in params.items()}
    if criterion == "taylor":
        return {n: (p.detach() * grads[n]).abs().float() for n, p in params.items()}  # type: ignore[index]
    if criterion == "random":
        g = torch.Generator().manual_seed(seed)
        return {n: torch.rand(p.shape, generator=g).to(p.device) * (p.detach() != 0) for n, p in params.items()}
    raise AssertionError(criterion)  # pragma: no cover - _check_criterion ran first


def taylor_gradients(model: nn.Module, calibration: object, loss: Callable[[object], torch.Tensor] | None = None
                     ) -> dict[str, torch.Tensor]:
    """The gradient of ``loss(model(*calibration))`` (default: half the sum of squares of the model's floating
    outputs) with respect to every parameter of ``model``, computed on a copy (``model`` and its ``.grad`` are left
    alone): what the first-order Taylor criterion weighs each weight by."""
    if calibration is None:
        raise MaskError("criterion='taylor' needs calibration=(inputs, ...): a batch the model accepts, to take the "
                        "loss's gradient on (and loss=callable(output) -> scalar for your task's loss)")
    xs = calibration if isinstance(calibration, (tuple, list)) else (calibration,)
    work = copy.deepcopy(model)
    params = dict(work.named_parameters())
    for p in params.values():
        p.requires_grad_(p.is_floating_point())
        p.grad = None
    with torch.enable_grad():
        out = work(*xs)
        value = loss(out) if loss is not None else sum(
            0.5 * t.pow(2).sum() for t in torch.utils._pytree.tree_leaves(out)
            if isinstance(t, torch.Tensor) and t.is_floating_point())
        if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.requires_grad:
            raise MaskError("the Taylor loss must be a scalar tensor that depends on the model's parameters, got "
                            f"{type(value).__name__}")
        value.backward()
    return {n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach() for n, p in params.items()}


def flop_costs(gm: nn.Module, inputs: tuple[object, ...]) -> dict[str, float]:
    """FLOPs per entry of each parameter of ``gm`` on one forward of ``inputs``: every op ``FlopCounterMode``
    counts (matmuls, convolutions, attention) charges its FLOPs to the weights among its operands (parameters or
    views of them with two dims or more; a bias added in the same op is not charged), spread over their entries.
    Parameters no counted op reads cost nothing."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    registry = FlopCounterMode(display=False).flop_registry
    owner: dict[int, str] = {}
    for name, p in gm.named_parameters():
        owner.setdefault(p.untyped_storage().data_ptr(), name)
    costs = dict.fromkeys(owner.values(), 0.0)
    numel = {name: p.numel() for name, p in gm.named_parameters()}

    class Charge(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            count = registry.get(func._overloadpacket)
            if count is not None:
                names = {owner[t.untyped_storage().data_ptr()] for t in torch.utils._pytree.tree_leaves((args, kwargs))
                         if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.untyped_storage().data_ptr() in owner}
                for name in names:
                    costs[name] += count(*args, **kwargs, out_val=out) / numel[name] / len(names)
            return out

    with torch.no_grad(), Charge():
        gm(*inputs)
    return costs


def _check_masks(gm: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    params = dict(gm.named_parameters()) | {n: getattr(*held) for n, held in weight_normed(gm).items()}
    out = {}
    for name, m in masks.items():
        if name not in params:
            raise MaskError(f"mask given for '{name}', which is not a parameter of the model (parameters: {', '.join(list(params)[:5])}, ...)")
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            raise MaskError(f"mask for '{name}' must be a bool tensor (True = keep), got {getattr(m, 'dtype', type(m).__name__)}")
        if tuple(m.shape) != tuple(params[name].shape):
            raise MaskError(f"mask for '{name}' has shape {tuple(m.shape)}, the parameter has {tuple(params[name].shape)}")
        out[name] = m
    return out


@exported_io
def mask(gm: Program, sparsity: float | None = None, *, scope: Literal["global", "layer"] = "global",
         criterion: Criterion = "magnitude", include: Iterable[str] | None = None,
         exclude: Iterable[str] | None = None, masks: Mapping[str, torch.Tensor] | None = None,
         seed: int = 0, structure: Literal["weights", "groups"] = "weights", max_fraction: float = 0.9,
         round_to: int = 1, target: Literal["params", "flops"] = "params", calibration: object = None,
         loss: Callable[[object], torch.Tensor] | None = None) -> Program:
    """Zero the smallest weights (ndim >= 2, matching ``include``/``exclude`` globs) to reach ``sparsity``.

    ``criterion``: ``"magnitude"`` (default; ``"l1"`` ranks single weights alike), ``"random"`` (seeded), or
    ``"taylor"``: ``|w * dL/dw|`` with ``L = loss(gm(*calibration))`` (``calibration``: a batch of inputs, required;
    ``loss``: default half the sum of squares of the outputs; pass your task's loss), see :func:`taylor_gradients`.

    ``structure="groups"``: zero whole channels of the free channel groups :func:`fxprune.analyze` finds instead
    (every slice of every member: producer rows and biases, consumer columns, norm weights, every tensor of a
    residual stream), so that ``minimize`` removes them; ``sparsity`` is then the fraction of the model's
    parameters that ``minimize`` will remove (see :func:`group_masks`, and its ``round_to``); it is aimed by running
    ``minimize`` on the masked copy (unchecked, up to three times: channels that go only because others did, a key
    channel whose query channel was masked, are counted), and the fraction ``minimize`` removes is in
    ``gm.meta["fxprune_mask_reached"]``. ``target="flops"``: ``sparsity`` is the fraction of the forward's FLOPs
    (``torch.utils.flop_counter.FlopCounterMode`` on the example inputs) that ``minimize`` will remove instead.

    >>> import torch, fxprune as fp
    >>> gm = fp.capture(torch.nn.Sequential(torch.nn.Linear(10, 10)), (torch.randn(1, 10),))
    >>> int((fp.mask(gm, 0.7).get_parameter("0.weight") == 0).sum())
    70
    """
    if not isinstance(gm, GraphModule):
        raise MaskError(f"mask takes a GraphModule (from fp.capture) or an ExportedProgram, got the module "
                        f"{type(gm).__name__}: capture it first, fp.mask(fp.capture(model, example_inputs), ...); "
                        "fp.squeeze_release prunes your own class")
    check_weights(gm, "mask")
    reached = None
    if masks is not None:
        new_masks = _check_masks(gm, masks)
    else:
        if target not in ("params", "flops") or (target == "flops" and structure != "groups"):
            raise MaskError(f"target must be 'params' or (with structure='groups') 'flops', got {target!r}")
        grads = taylor_gradients(gm, calibration, loss) if criterion == "taylor" else None
        if structure == "groups":
            new_masks, reached = _to_target(gm, sparsity, target, include=include, exclude=exclude,
                                            max_fraction=max_fraction, round_to=round_to, criterion=criterion,
                                            grads=grads, seed=seed)
        elif structure == "weights":
            new_masks = magnitude_masks(gm, sparsity, scope=scope, criterion=criterion, include=include,
                                        exclude=exclude, seed=seed, grads=grads)
        else:
            raise MaskError(f"structure must be 'weights' or 'groups', got {structure!r}")
    out = copy.deepcopy(gm)
    out.meta = dict(gm.meta)
    out.meta[MASKS_KEY] = apply_masks(out, new_masks, gm.meta.get(MASKS_KEY, {}))
    if reached is not None:
        out.meta[REACHED_KEY] = reached
    return out


def _to_target(gm: GraphModule, sparsity: float, target: str, **kw: object) -> tuple[dict[str, torch.Tensor], float]:
    """:func:`group_masks` aimed so that what ``minimize`` removes from the masked graph (parameters, or with
    ``target="flops"`` the forward's FLOPs on the example inputs), counted by running it (unchecked, on a copy),
    lands on ``sparsity``: the masks' own count misses channels that go only because others did (a query channel
    masked leaves its key channel unread) and FLOPs no weight carries (attention's products). Up to three aims, each
    corrected by the last miss; the closest is kept, with the fraction ``minimize`` removes."""
    from fxprune.graph.capture import EXAMPLE_INPUTS_KEY
    from fxprune.graph.shapes import placeholder_inputs
    from fxprune.passes.minimize import MinimizeOptions, minimize
    from fxprune.verify import count_flops, random_inputs

    if target == "flops":
        inputs = gm.meta.get(EXAMPLE_INPUTS_KEY) or random_inputs(placeholder_inputs(gm), torch.Generator().manual_seed(0))
        size = lambda m: count_flops(m, inputs)  # noqa: E731
        kw["costs"] = flop_costs(gm, inputs)
    else:
        size = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    total = size(gm)
    aim, best = sparsity, None
    for _ in range(3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            masks, _ = group_masks(gm, aim, **kw)  # type: ignore[arg-type]
            trial = copy.deepcopy(gm)
            trial.meta = dict(gm.meta)
            apply_masks(trial, masks)
            small = minimize(trial, options=MinimizeOptions(verify=False))
        reached = 1 - size(small) / max(total, 1)
        if best is None or abs(reached - sparsity) < abs(best[1] - sparsity):
            best = (masks, reached)
        if abs(reached - sparsity) <= 0.005 or not 0 < aim - (reached - sparsity) < 1:
            break
        aim -= reached - sparsity
    masks, reached = best
    _warn_short(reached, sparsity, kw.get("max_fraction", 0.9), stacklevel=5)
    return masks, reached


def _warn_short(reached: float, sparsity: float, max_fraction: object, stacklevel: int) -> None:
    if reached < sparsity - 0.01:
        warnings.warn(f"the structured mask removes {reached:.1%} of the parameters, short of the {sparsity:.1%} asked: "
                      f"the others are in frozen groups (fp.analyze shows why), excluded, or past max_fraction="
                      f"{max_fraction} of their group", TargetNotReachedWarning, stacklevel=stacklevel)


def group_masks(gm: GraphModule, sparsity: float, *, include: Iterable[str] | None = None,
                exclude: Iterable[str] | None = None, max_fraction: float = 0.9, round_to: int = 1,
                criterion: Criterion = "magnitude", grads: Mapping[str, torch.Tensor] | None = None,
                costs: Mapping[str, float] | None = None, seed: int = 0,
                inputs: bool | Iterable[str] = False, keep: Mapping[str, str] | None = None,
                whole_heads: Iterable[str] = ()) -> tuple[dict[str, torch.Tensor], float]:
    """Masks that zero whole channels of ``gm``'s free channel groups, so that ``minimize`` removes ``sparsity`` of
    its parameters; returns them and the fraction they remove.

    Importance of channel ``c`` of a group, over every entry of every slice of every member that holds it:
    ``criterion="magnitude"`` (L2), the root mean square of those entries, each measured against its own tensor
    (``w / s_t``, ``s_t`` the root mean square of the tensor's nonzero entries, so a norm weight near 1 and a conv
    weight near 0.05 count alike); ``"l1"``, their mean absolute value, each against the tensor's mean absolute
    nonzero entry; ``"taylor"``, ``(sum of w * dL/dw)**2`` over the entries, the square of the first-order change
    in the loss when the whole channel is zeroed (``grads``: :func:`taylor_gradients`); ``"random"``, a seeded
    random order. Channels are ranked globally, least important first, and taken while what their removal frees
    stays under the target: parameters (counted exactly: a weight loses rows and columns of several groups at once),
    or with ``costs`` (:func:`flop_costs`) each entry weighed by its FLOPs; the one that would cross the target is
    taken when that lands closer to it than stopping short. At most ``max_fraction`` of a group's channels
    (and never all of them) go. Frozen groups (model inputs and outputs, ops without a rule) and groups with a
    member outside ``include`` / in ``exclude`` are never touched. A model input's channels (the pixels' colors, a
    table's features) are masked only with ``inputs`` (True, or input names: those that layers read through
    their weights alone, :func:`~fxprune.analysis.groups.input_channels`): what the data holds is the user's to
    drop, and the weight magnitude of a feature says little of it (the group lasso, which the loss pulls against,
    and zero weight columns still cut them in ``minimize``). ``round_to=k``: every group that loses channels
    keeps a multiple of ``k`` of them (its channels are masked ``k`` at a time, the least important of those chosen),
    so that ``minimize`` leaves widths the kernels' blocks divide. ``keep`` and ``whole_heads`` leave groups out as
    :class:`~fxprune.passes.minimize.MinimizeOptions` keeps them (``whole_heads``: the channels inside the heads;
    whole heads may still be masked)."""
    from fxprune.analysis.groups import Analysis, param_slices
    from fxprune.passes.lower import lower_modules

    require("sparsity", sparsity, "number in [0, 1)", error=MaskError)
    require("max_fraction", max_fraction, "number in [0, 1]", error=MaskError)
    require("round_to", round_to, "positive integer", error=MaskError)
    _check_criterion(criterion, grads)
    sources = weight_sources(gm)  # (whole channels: weight norm's g, never its direction v, whose zero row is NaN)
    params = {n: p for n, p in gm.named_parameters() if sources.get(n, "scale") == "scale"}
    an = Analysis(lower_modules(gm), dict(keep or {}), inputs=inputs if isinstance(inputs, bool) else set(inputs))
    an.hold_inside_heads(whole_heads, "the channels inside these heads are kept")
    slices, leaves = param_slices(an, set(params))
    total = sum(size for _, size in leaves)
    inc, exc = list(include or ["*"]), list(exclude or [])
    allowed = torch.ones(total, dtype=torch.bool)
    squares = torch.zeros(total, dtype=torch.float64)
    counts = torch.zeros(total, dtype=torch.float64)
    for sl in slices:
        hit = sl.channel >= 0
        if not any(fnmatch.fnmatch(sl.name, p) for p in inc) or any(fnmatch.fnmatch(sl.name, p) for p in exc):
            allowed[sl.channel[hit]] = False
            continue
        w = params[sl.name].detach().to(torch.float64)
        dims = [d for d in range(w.dim()) if d != sl.dim]
        if criterion == "taylor":
            entry = w * grads[sl.name].to(torch.float64)  # type: ignore[index]
        else:
            nz = w[w != 0].abs()
            scale = (nz.pow(2).mean().sqrt() if criterion != "l1" else nz.mean()) if nz.numel() else 1.0
            entry = (w / scale).pow(2) if criterion != "l1" else (w / scale).abs()
        per = (entry.sum(dims) if dims else entry).cpu()  # (the channel bookkeeping is on the CPU)
        squares.index_add_(0, sl.channel[hit], per[hit])
        counts.index_add_(0, sl.channel[hit], torch.full((int(hit.sum()),), float(w.numel() // w.shape[sl.dim]),
                                                         dtype=torch.float64))
    if criterion == "taylor":
        importance = squares.pow(2)
    elif criterion == "random":
        importance = torch.rand(total, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    else:
        importance = squares / counts.clamp_min(1)
        importance = importance.sqrt() if criterion == "magnitude" else importance
    cap = torch.zeros(total, dtype=torch.long)  # per channel: how many of its group's channels may go
    group = torch.zeros(total, dtype=torch.long)
    for i, (first, size) in enumerate(leaves):
        cap[first:first + size] = min(int(max_fraction * size), size - 1)
        group[first:first + size] = i
    kept = {name: list(p.shape) for name, p in params.items()}
    by_channel: dict[int, list[tuple[str, int, int]]] = {}  # channel -> (param, dim, positions)
    for sl in slices:
        ch, n = torch.unique(sl.channel[sl.channel >= 0], return_counts=True)
        for c, k in zip(ch.tolist(), n.tolist()):
            by_channel.setdefault(c, []).append((sl.name, sl.dim, k))
    cost = (lambda n: 1.0) if costs is None else (lambda n: costs.get(n, 0.0))  # noqa: E731
    everything = sum(cost(n) * p.numel() for n, p in params.items())
    target = sparsity * everything
    removed, taken = 0, torch.zeros(len(leaves), dtype=torch.long)
    gone = torch.zeros(total, dtype=torch.bool)
    pending: dict[int, list[int]] = {}  # per group, channels chosen but not yet masked (round_to: masked k at a time)
    for c in torch.argsort(importance, stable=True).tolist():
        if removed >= target:
            break
        g = int(group[c])
        if not allowed[c] or taken[g] + len(pending.get(g, [])) >= cap[c] or c not in by_channel:
            continue
        batch = pending.setdefault(g, []) + [c]
        size, now = leaves[g][1], leaves[g][1] - int(taken[g])
        lower = (now - 1) // round_to * round_to  # the next width down that is a multiple of round_to
        if lower < 1 or now - len(batch) > lower:
            pending[g] = batch if lower >= 1 else pending[g]
            continue
        after: dict[str, list[int]] = {}
        for ch in batch:
            for name, d, k in by_channel[ch]:
                after.setdefault(name, list(kept[name]))[d] -= k
        delta = sum(cost(n) * (math.prod(kept[n]) - math.prod(a)) for n, a in after.items())
        if removed + delta > target and removed + delta - target > target - removed:
            break  # the closer of the two to the target
        kept.update(after)
        removed += delta
        taken[g] += len(batch)
        gone[batch] = True
        pending[g] = []
    out: dict[str, torch.Tensor] = {}
    for sl in slices:
        drop = (sl.channel >= 0) & gone[sl.channel.clamp_min(0)]
        if bool(drop.any()):
            shape = [1] * params[sl.name].dim()
            shape[sl.dim] = -1
            m = (~drop).view(shape).expand_as(params[sl.name])
            out[sl.name] = m if sl.name not in out else out[sl.name] & m
    reached = removed / max(everything, 1)
    _warn_short(reached, sparsity, max_fraction, stacklevel=4)
    return {n: m.contiguous() for n, m in out.items()}, reached


class TargetNotReachedWarning(UserWarning):
    """A structured mask removes less than the sparsity asked (frozen groups, exclusions, the per-group cap)."""


def magnitude_masks(model: nn.Module, sparsity: float, *, scope: Literal["global", "layer"] = "global",
                    criterion: Criterion = "magnitude", include: Iterable[str] | None = None,
                    exclude: Iterable[str] | None = None, seed: int = 0,
                    grads: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The masks :func:`mask` writes (parameter name -> bool, True = kept), for any module: the graph pass and the
    cycle's masking of the user's own model both draw them here."""
    require("sparsity", sparsity, "number in [0, 1)", error=MaskError)
    if scope not in ("global", "layer"):
        raise MaskError(f"scope must be 'global' or 'layer', got {scope!r}")
    params = prunable(model, include, exclude, computed=True)
    if not params:
        raise MaskError("no parameter matches: mask selects floating parameters with ndim >= 2 matching include/exclude")
    _check_criterion(criterion, grads)
    scores = _scores(params, criterion, seed, grads)
    if scope == "layer":
        return {n: _keep_top(s.flatten(), sparsity).view(s.shape) for n, s in scores.items()}
    flat = torch.cat([s.flatten() for s in scores.values()])
    keep = _keep_top(flat, sparsity)
    return {n: k.view(s.shape) for (n, s), k in zip(scores.items(), torch.split(keep, [s.numel() for s in scores.values()]))}


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor],
                previous: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Zero ``model``'s parameters where ``masks`` (ANDed with ``previous``) say so, in place; the combined masks."""
    out = dict(previous or {})
    normed = weight_normed(model)
    with torch.no_grad():
        for n, m in masks.items():
            if n in normed:  # a weight norm computes it: masked in g and v's terms
                m = m & out[n].to(m.device) if n in out else m
                mask_weight_norm_(*normed[n], m)
                out[n] = m
                continue
            p = model.get_parameter(n)
            m = m.to(p.device)
            if n in out:
                m = m & out[n]
            p.mul_(m.to(p.dtype))
            out[n] = m
    return out


def _keep_top(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    k = int(round(sparsity * scores.numel()))
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k > 0:
        keep[torch.topk(scores, k, largest=False, sorted=False).indices] = False
    return keep


class HeldMask(nn.Module):
    """The parametrization :func:`hold_masks_` installs: the weight the forward reads is ``original * mask``."""

    def __init__(self, m: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", m, persistent=False)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask.to(w.dtype)


def hold_masks_(gm: nn.Module, masks: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """Keep masks applied during fine-tuning, **in place** (the trailing underscore, as in ``Tensor.mul_``): every
    masked weight of ``gm`` becomes the parametrization ``w * mask``; returns ``gm``."""
    masks = masks if masks is not None else getattr(gm, "meta", {}).get(MASKS_KEY, {})
    for name, m in _check_masks(gm, masks).items():
        owner, leaf = attr_owner(gm, name)
        if not parametrize.is_parametrized(owner, leaf) or not any(  # (a weight norm: the mask goes after it)
                isinstance(p, HeldMask) for p in owner.parametrizations[leaf]):
            parametrize.register_parametrization(owner, leaf, HeldMask(m.to(getattr(owner, leaf).device)))
    return gm


def bake_masks_(gm: nn.Module) -> nn.Module:
    """Remove the parametrizations added by :func:`hold_masks_`, **in place**, keeping the masked values; returns
    ``gm``. Other parametrizations (weight norm, orthogonal, a user's own) stay."""
    for mod in list(gm.modules()):
        if parametrize.is_parametrized(mod):
            for leaf in list(mod.parametrizations.keys()):
                if all(isinstance(p, HeldMask) for p in mod.parametrizations[leaf]):
                    parametrize.remove_parametrizations(mod, leaf, leave_parametrized=True)
    bake_weight_norm_masks_(gm)  # masks after a weight norm: into g and v, the weight norm stays
    return gm


def hold_masks(gm: nn.Module, masks: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """Deprecated name of :func:`hold_masks_` (it works in place)."""
    warnings.warn("fxprune.hold_masks is now hold_masks_ (it works in place)", DeprecationWarning, stacklevel=2)
    return hold_masks_(gm, masks)


def bake_masks(gm: nn.Module) -> nn.Module:
    """Deprecated name of :func:`bake_masks_` (it works in place)."""
    warnings.warn("fxprune.bake_masks is now bake_masks_ (it works in place)", DeprecationWarning, stacklevel=2)
    return bake_masks_(gm)


def sparsity_schedule(step: int, total_steps: int, final: float, initial: float = 0.0,
                      kind: Literal["cubic", "linear"] = "cubic") -> float:
    """Sparsity at ``step`` of a gradual schedule (cubic = Zhu & Gupta's AGP).

    >>> [round(sparsity_schedule(t, 4, 0.9), 3) for t in range(5)]
    [0.0, 0.52, 0.787, 0.886, 0.9]
    """
    if not 0 <= initial <= final < 1:
        raise MaskError(f"need 0 <= initial <= final < 1, got initial={initial}, final={final}")
    if total_steps <= 0:
        raise MaskError(f"total_steps must be positive, got {total_steps}")
    t = min(max(step, 0), total_steps) / total_steps
    if kind == "cubic":
        return final + (initial - final) * (1 - t) ** 3
    if kind == "linear":
        return initial + (final - initial) * t
    raise MaskError(f"kind must be 'cubic' or 'linear', got {kind!r}")
