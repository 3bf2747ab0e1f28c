"""Masks held outside the weights (torch.nn.utils.prune hooks, torch.ao.pruning sparsifiers, fxprune's hold_masks_)
are read as the zeros they are: the same result as the zeros written into the weights, the user's model untouched."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize, prune

import fxprune as fp
from conftest import snapshot
from fxprune.interop import held_masks
from fxprune.passes.mask import hold_masks_
from fxprune.passes.minimize import NothingRemovedWarning

METHODS = ["symbolic", "export"]


def net() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)).double().eval()
    with torch.no_grad():
        m[0].weight[:10] *= 1e-3  # small rows: magnitude pruning takes them whole
        m[2].weight[:, :6] *= 1e-3
    return m


X = (torch.randn(3, 12, dtype=torch.float64),)


def written(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """A plain copy of ``net()`` with ``masks`` written into its weights as zeros."""
    out = net()
    with torch.no_grad():
        for name, mask in masks.items():
            out.get_parameter(name).mul_(mask.to(torch.float64))
    return out


def by_prune(m: nn.Module) -> dict[str, torch.Tensor]:
    prune.global_unstructured([(m[0], "weight"), (m[2], "weight")], pruning_method=prune.L1Unstructured, amount=0.4)
    return {"0.weight": m[0].weight_mask.clone(), "2.weight": m[2].weight_mask.clone()}


def by_sparsifier(m: nn.Module) -> dict[str, torch.Tensor]:
    from torch.ao.pruning import WeightNormSparsifier

    sp = WeightNormSparsifier(sparsity_level=0.25, sparse_block_shape=(1, 12), zeros_per_block=12)
    sp.prepare(m, [{"tensor_fqn": "0.weight"}])
    sp.step()
    return {"0.weight": m[0].parametrizations.weight[0].mask.clone()}


def by_hold_masks(m: nn.Module) -> dict[str, torch.Tensor]:
    mask = torch.ones(32, 12, dtype=torch.bool)
    mask[:10] = False
    hold_masks_(m, {"0.weight": mask})
    return {"0.weight": mask}


def _state(m: nn.Module) -> dict:
    """Bytes of every parameter and buffer, and the hooks and parametrizations the model holds."""
    return {"tensors": snapshot(m), "hooks": [(p, len(x._forward_pre_hooks)) for p, x in m.named_modules()],
            "parametrized": [(p, parametrize.is_parametrized(x)) for p, x in m.named_modules()]}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("source", [by_prune, by_sparsifier, by_hold_masks], ids=["prune", "sparsifier", "hold_masks_"])
def test_held_masks_minimize_like_written_zeros(source, method):
    model = net()
    masks = source(model)
    assert held_masks(model) == sorted(masks)
    before = _state(model)
    small = fp.minimize(fp.capture(model, X, method=method))
    assert _state(model) == before  # hooks, parametrizations and bytes: untouched
    reference = fp.minimize(fp.capture(written(model, masks), X, method=method))
    params = lambda m: {n: tuple(p.shape) for n, p in m.named_parameters()}  # noqa: E731
    assert params(small) == params(reference)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in net().parameters())
    assert all(p.requires_grad for p in small.parameters())  # a weight that was trainable stays a parameter
    assert not any(b.is_floating_point() for b in small.buffers())
    with torch.no_grad():
        ref = model(*X)
        assert float((small(*X) - ref).abs().max() / ref.abs().max()) <= 1e-9


def test_a_parametrization_that_is_not_a_mask_is_evaluated_not_baked():
    """Weight norm computes the weight from g and v: it stays that function (nothing is sliced through it), and
    minimize says which op kept it when it removes nothing."""
    model = net()
    torch.nn.utils.parametrizations.weight_norm(model[0])
    before = _state(model)
    assert held_masks(model) == []
    with pytest.warns(NothingRemovedWarning, match="no channel rule|ParametrizedLinear|without a channel rule"):
        small = fp.minimize(fp.capture(model, X, method="symbolic"))
    assert _state(model) == before
    with torch.no_grad():
        ref = model(*X)
        assert float((small(*X) - ref).abs().max() / ref.abs().max()) <= 1e-9
        model[0].parametrizations.weight.original0.mul_(2)  # g: the result computes from its own copy
        assert float((small(*X) - ref).abs().max() / ref.abs().max()) <= 1e-9


def test_masked_weights_are_trainable_parameters_of_the_result():
    """torch.nn.utils.prune masked layers used to come back with their weight as a buffer: frozen in training."""
    model = net()
    mask = torch.ones(32, 12)
    mask[:10] = 0
    prune.custom_from_mask(model[0], "weight", mask)
    small = fp.minimize(fp.capture(model, X))
    w = small.get_parameter("0.weight")
    assert w.shape == (22, 12) and w.requires_grad
    small(*X).sum().backward()
    assert w.grad is not None and bool(w.grad.abs().sum() > 0)


def test_copying_leaves_the_users_prune_hooks_working():
    """The copy is made without touching the user's pruned module (a plain deepcopy of one fails in torch)."""
    model = net()
    prune.random_unstructured(model[2], "weight", amount=0.5)
    fp.capture(model, X)
    with torch.no_grad():
        model[2].weight_orig.add_(1.0)
        model(*X)  # the hook recomputes the masked weight from weight_orig, as before
    assert torch.equal(model[2].weight, model[2].weight_orig * model[2].weight_mask)
