"""Masks held outside the weights, read as the zeros they are.

Pruning tools keep masks beside the weights: ``torch.nn.utils.prune`` as a forward pre-hook that recomputes
``weight = weight_orig * weight_mask``; ``torch.ao.pruning`` sparsifiers (before ``squash_mask``) and fxprune's
own :func:`~fxprune.passes.mask.hold_masks_` as parametrizations whose forward is ``original * mask``. The
analysis reads parameters, so :func:`unmasked` gives it a copy of the model in which each such weight is a plain
parameter holding ``weight * mask``: the same function, the zeros visible, trainable as before. The user's model
is never touched. A parametrization that is not a mask (weight norm, orthogonal...) stays: it is traced as the
function it is, and the weight it computes is not sliced.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize, prune

from fxprune.errors import UnsupportedError

__all__ = ["held_masks", "unmasked"]


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


def held_masks(model: nn.Module) -> list[str]:
    """Qualified names of the weights of ``model`` whose masks are held by prune hooks or mask parametrizations."""
    out = []
    for path, m in model.named_modules():
        prefix = f"{path}." if path else ""
        out += [prefix + h._tensor_name for h in _prune_hooks(m)]
        out += [prefix + name for name in _mask_parametrizations(m)]
    return out


def unmasked(model: nn.Module) -> nn.Module:
    """``model`` itself when it holds no masks; otherwise a copy in which every held mask is applied to its weight,
    which becomes a plain parameter (``prune.remove`` / ``remove_parametrizations(leave_parametrized=True)`` on
    the copy). Raises :class:`UnsupportedError` for masks it cannot apply."""
    if not held_masks(model):
        return model
    # prune hooks keep the masked weight as a computed (non-leaf) attribute, which deepcopy refuses: copy it plain
    memo = {id(t): t.detach().clone() for m in model.modules() for h in _prune_hooks(m)
            if isinstance(t := getattr(m, h._tensor_name, None), torch.Tensor)}
    out = copy.deepcopy(model, memo)
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
