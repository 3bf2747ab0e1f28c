"""Masks held outside the weights, read as the zeros they are.

Pruning tools keep masks beside the weights: ``torch.nn.utils.prune`` as a forward pre-hook that recomputes
``weight = weight_orig * weight_mask``; ``torch.ao.pruning`` sparsifiers (before ``squash_mask``) and fxprune's
own :func:`~fxprune.passes.mask.hold_masks_` as parametrizations whose forward is ``original * mask``. The
analysis reads parameters, so :func:`unmasked` gives it a copy of the model in which each such weight is a plain
parameter holding ``weight * mask``: the same function, the zeros visible, trainable as before. The user's model
is never touched. A parametrization that is not a mask (weight norm, orthogonal...) stays: it is traced as the
function it is. Masks held after a weight norm (``parametrizations.weight_norm`` then a mask on ``weight``) are
written into its g and v (:func:`mask_weight_norm_`): the weight norm stays, and its weight holds the zeros.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize, prune

from fxprune.errors import UnsupportedError

__all__ = ["held_masks", "unmasked", "plain_copy", "weight_normed", "weight_norm_kept", "mask_weight_norm_", "bake_weight_norm_masks_"]


def _prune_hooks(m: nn.Module) -> list[prune.BasePruningMethod]:
    return [h for h in m._forward_pre_hooks.values() if isinstance(h, prune.BasePruningMethod)]


def _is_mask(p: nn.Module, original: torch.Tensor) -> bool:
    """Whether the parametrization ``p`` is ``original * p.mask`` with a 0/1 mask (checked on the values)."""
    mask = getattr(p, "mask", None)
    if not isinstance(mask, torch.Tensor) or mask.shape != original.shape:
        return False
    if not bool(((mask == 0) | (mask == 1)).all()):
        return False
    with torch.no_grad():
        return torch.equal(p(original), original * mask.to(original.dtype))


def _mask_parametrizations(m: nn.Module) -> list[str]:
    """Names of ``m``'s parametrized tensors, when every parametrization of ``m`` is a mask (a module that also
    holds another parametrization is left as it is: traced as the function it computes)."""
    if not parametrize.is_parametrized(m):
        return []
    plists = dict(m.parametrizations.items())
    # (a parametrization of several tensors, like weight norm's g and v, keeps original0, original1...: no mask)
    if not all(len(pl) and isinstance(getattr(pl, "original", None), torch.Tensor) and all(_is_mask(p, pl.original) for p in pl)
               for pl in plists.values()):
        return []
    return list(plists)


def _apply_parametrizations(m: nn.Module, names: list[str]) -> None:
    """Turn the parametrized module ``m`` (a copy) back into its own class with plain parameters holding the
    parametrized values. ``parametrize.remove_parametrizations`` would delete the property from the injected
    class, which a deep copy shares with the user's module."""
    values = {}
    for name in names:
        original = m.parametrizations[name].original
        with torch.no_grad():
            values[name] = nn.Parameter(getattr(m, name).detach().clone(), requires_grad=original.requires_grad)
    m.__class__ = m.__class__.__bases__[0]
    del m._modules["parametrizations"]
    for name, value in values.items():
        m.register_parameter(name, value)


def weight_normed(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """The weights ``torch.nn.utils.parametrizations.weight_norm`` computes (``conv.weight``), by name: their
    module and tensor name, with any masks held after the weight norm. A mask on one masks the weight itself
    (:func:`mask_weight_norm_`)."""
    from torch.nn.utils.parametrizations import _WeightNorm

    out = {}
    for path, mod in model.named_modules():
        if parametrize.is_parametrized(mod):
            for leaf, plist in mod.parametrizations.items():
                if isinstance(plist[0], _WeightNorm) and all(_a_mask(p) for p in list(plist)[1:]):
                    out[f"{path}.{leaf}" if path else leaf] = (mod, leaf)
    return out


@torch.no_grad()
def weight_norm_kept(v: torch.Tensor, g: torch.Tensor, dim: int, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g', v')`` in float64 whose weight norm ``g' * v' / ||v'||`` is ``g * v / ||v||`` where ``keep`` (bool,
    broadcast to ``v``'s shape) is True and zero elsewhere: ``v`` zeroed where ``keep`` is False, and ``g`` scaled
    by each row's kept norm over its whole (a row: a slice along ``dim``; ``-1``: the whole tensor). A row whose kept
    part is zero gets ``g = 0`` and a 1 in ``v`` at its first kept entry (at its first where it keeps none): its
    weight is zero either way, and ``0 / 0`` would be NaN. Masks (:func:`mask_weight_norm_`) and minimize's
    slicing of ``v`` and ``g`` both use it."""
    v = v.detach().to(torch.float64)
    keep = keep.to(v.device).expand(v.shape)
    own = None if dim == -1 else dim % v.dim()
    others = [d for d in range(v.dim()) if d != own]
    kept = v * keep
    whole = v.pow(2).sum(others, keepdim=True).sqrt()
    left = kept.pow(2).sum(others, keepdim=True).sqrt()
    g = g.detach().to(v.device, torch.float64) * torch.where(whole > 0, left / whole, torch.ones_like(whole)).reshape(g.shape)
    if bool((left == 0).any()):
        rows = (keep if own is None else keep.movedim(own, 0)).reshape(1 if own is None else v.shape[own], -1)
        first = torch.zeros_like(rows)
        first[torch.arange(len(rows)), rows.to(torch.uint8).argmax(dim=1)] = True  # (argmax: the first True, or 0)
        first = first.reshape(v.shape if own is None else v.movedim(own, 0).shape)
        first = first if own is None else first.movedim(0, own)
        kept = torch.where((left == 0) & first, torch.ones_like(kept), kept)
    return g, kept


@torch.no_grad()
def mask_weight_norm_(mod: nn.Module, leaf: str, keep: torch.Tensor) -> None:
    """Zero the entries of ``mod``'s weight-normed ``leaf`` where ``keep`` is False, **in place**, in its own terms
    (:func:`weight_norm_kept`): ``v`` is masked, and ``g`` scaled by the masked row's norm over the whole's, so every
    kept entry of the weight stays as it was."""
    plist = mod.parametrizations[leaf]
    g, v = weight_norm_kept(plist.original1, plist.original0, plist[0].dim, keep)
    plist.original0.copy_(g.to(plist.original0.dtype))
    plist.original1.copy_(v.to(plist.original1.dtype))


def _a_mask(p: nn.Module) -> bool:
    """Whether the parametrization ``p`` holds a 0/1 ``mask`` (fxprune's ``HeldMask``, a sparsifier's)."""
    mask = getattr(p, "mask", None)
    return isinstance(mask, torch.Tensor) and bool(((mask == 0) | (mask == 1)).all())


def bake_weight_norm_masks_(model: nn.Module) -> list[str]:
    """Every mask held after a weight norm (:func:`weight_normed`) written into its g and v
    (:func:`mask_weight_norm_`) and removed, **in place**: the weight norm stays. Returns the weights' names."""
    done = []
    for name, (mod, leaf) in weight_normed(model).items():
        plist = mod.parametrizations[leaf]
        masks = [plist[i].mask.bool() for i in range(1, len(plist))]
        if masks:
            for i in reversed(range(1, len(plist))):
                del plist[i]
            keep = masks[0]
            for m in masks[1:]:
                keep = keep & m
            mask_weight_norm_(mod, leaf, keep)
            done.append(name)
    return done


def held_masks(model: nn.Module) -> list[str]:
    """Qualified names of the weights of ``model`` whose masks are held by prune hooks or mask parametrizations."""
    out = []
    for path, m in model.named_modules():
        prefix = f"{path}." if path else ""
        out += [prefix + h._tensor_name for h in _prune_hooks(m)]
        out += [prefix + name for name in _mask_parametrizations(m)]
    out += [name for name, (mod, leaf) in weight_normed(model).items() if len(mod.parametrizations[leaf]) > 1]
    return out


def plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in which a tensor kept as a plain attribute that autograd computed is copied
    detached, which deepcopy refuses to copy otherwise: the masked weight of a ``torch.nn.utils.prune`` hook, the
    ``weight`` of the legacy ``torch.nn.utils.weight_norm`` hook (both recomputed before every forward)."""
    memo = {id(t): t.detach().clone() for m in model.modules() for t in vars(m).values()
            if isinstance(t, torch.Tensor) and t.grad_fn is not None}
    return copy.deepcopy(model, memo)


def unmasked(model: nn.Module) -> nn.Module:
    """``model`` itself when it holds no masks; otherwise a copy in which every held mask is applied to its weight,
    which becomes a plain parameter (``prune.remove`` / ``remove_parametrizations(leave_parametrized=True)`` on
    the copy). Raises :class:`UnsupportedError` for masks it cannot apply."""
    if not held_masks(model):
        return model
    out = plain_copy(model)
    bake_weight_norm_masks_(out)  # masks held after a weight norm: into its g and v
    for path, m in out.named_modules():
        for hook in _prune_hooks(m):
            try:
                prune.remove(m, hook._tensor_name)
            except Exception as e:
                raise UnsupportedError(
                    f"could not apply the torch.nn.utils.prune mask of '{path}.{hook._tensor_name}': {e}. "
                    f"Apply it yourself first: torch.nn.utils.prune.remove(module, '{hook._tensor_name}')") from e
        names = _mask_parametrizations(m)
        if names:
            try:
                _apply_parametrizations(m, names)
            except Exception as e:
                raise UnsupportedError(
                    f"could not apply the mask parametrizations of '{path}' ({', '.join(names)}): {e}. Apply them "
                    "yourself first (a torch.ao.pruning sparsifier: sparsifier.squash_mask(); otherwise torch.nn."
                    "utils.parametrize.remove_parametrizations(module, name, leave_parametrized=True))") from e
    return out
