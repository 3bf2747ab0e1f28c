import pytest
import torch

import fxprune as fp
from fxprune.passes.mask import MASKS_KEY, bake_masks_, hold_masks_, sparsity_schedule
from conftest import n_params, snapshot
from fxprune.zoo import build


def _gm():
    m, x = build("residual_mlp")
    return fp.capture(m, x), x


def _zeros(gm, names=None):
    ps = {n: p for n, p in gm.named_parameters() if p.dim() >= 2 and (names is None or n in names)}
    return sum(int((p == 0).sum()) for p in ps.values()), sum(p.numel() for p in ps.values())


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_sparsity_reached_and_input_untouched(scope, sparsity):
    gm, _ = _gm()
    before = snapshot(gm)
    masked = fp.mask(gm, sparsity, scope=scope)
    assert snapshot(gm) == before
    zeros, total = _zeros(masked)
    assert abs(zeros / total - sparsity) < 0.01
    if scope == "layer":
        for n, p in masked.named_parameters():
            if p.dim() >= 2:
                assert abs(float((p == 0).float().mean()) - sparsity) < 0.05, n
    masks = masked.meta[MASKS_KEY]
    for n, m in masks.items():
        assert torch.equal(masked.get_parameter(n) != 0, m)


def test_magnitude_keeps_the_largest():
    gm, _ = _gm()
    masked = fp.mask(gm, 0.5)
    kept = torch.cat([p[p != 0].abs() for n, p in masked.named_parameters() if p.dim() >= 2])
    orig = torch.cat([gm.get_parameter(n).abs()[masked.get_parameter(n) == 0] for n, p in masked.named_parameters() if p.dim() >= 2])
    assert kept.min() >= orig.max()


def test_include_exclude_and_masks_compose():
    gm, _ = _gm()
    masked = fp.mask(gm, 0.8, include=["blocks.*"], exclude=["blocks.2.*"])
    assert _zeros(masked, {"inp.weight", "out.weight", "blocks.2.0.weight"})[0] == 0
    assert _zeros(masked, {"blocks.0.0.weight"})[0] > 0
    again = fp.mask(masked, 0.1)  # an earlier mask stays applied
    assert torch.equal(again.meta[MASKS_KEY]["blocks.0.0.weight"] & masked.meta[MASKS_KEY]["blocks.0.0.weight"],
                       again.meta[MASKS_KEY]["blocks.0.0.weight"])


@pytest.mark.parametrize("bad", [1.0, -0.1, "0.5", None, True, float("nan")])
def test_bad_sparsity(bad):
    gm, _ = _gm()
    with pytest.raises(fp.MaskError, match="sparsity"):
        fp.mask(gm, bad)


def test_bad_explicit_masks():
    gm, _ = _gm()
    with pytest.raises(fp.MaskError, match="shape"):
        fp.mask(gm, masks={"inp.weight": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(fp.MaskError, match="bool"):
        fp.mask(gm, masks={"inp.weight": torch.ones(24, 12)})
    with pytest.raises(fp.MaskError, match="not a parameter"):
        fp.mask(gm, masks={"nope.weight": torch.ones(1, dtype=torch.bool)})
    with pytest.raises(fp.MaskError):
        fp.mask(gm, 0.5, criterion="taylor")
    with pytest.raises(fp.MaskError, match="no parameter"):
        fp.mask(gm, 0.5, include=["zzz*"])


def _train(held, x, lr: float, steps: int = 3):
    """A few SGD steps on ``held`` (masks held by parametrizations); returns it."""
    opt = torch.optim.SGD(held.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        held(*x).pow(2).sum().backward()
        opt.step()
    return held


def test_hold_masks_survives_training_then_bakes():
    gm, x = _gm()
    masked = fp.mask(gm, 0.8)
    held = hold_masks_(masked)
    baked = bake_masks_(_train(held, x, lr=1e-3))
    for n, m in masked.meta[MASKS_KEY].items():
        p = baked.get_parameter(n)
        assert bool((p[~m] == 0).all()), n


def test_the_in_place_mask_holders_say_so_in_their_names():
    """hold_masks_ / bake_masks_ change the module they are given (and return it); the old names still work, with a
    DeprecationWarning that names the new one."""
    gm, x = _gm()
    masked = fp.mask(gm, 0.5)
    assert hold_masks_(masked) is masked and bake_masks_(masked) is masked
    with pytest.warns(DeprecationWarning, match="hold_masks_"):
        assert fp.hold_masks(masked) is masked
    with pytest.warns(DeprecationWarning, match="bake_masks_"):
        assert fp.bake_masks(masked) is masked


def test_held_row_masks_survive_training_and_minimize_removes_them():
    """Rows masked through hold_masks_ stay zero through training; minimize then deletes exactly those units."""
    gm, x = _gm()
    hidden = gm.get_parameter("blocks.0.0.weight")  # (48, 24): block 0's hidden units
    rows = torch.ones_like(hidden, dtype=torch.bool)
    rows[:5] = False
    held = hold_masks_(fp.mask(gm, masks={"blocks.0.0.weight": rows}))
    baked = bake_masks_(_train(held, x, lr=1e-2))
    assert bool((baked.get_parameter("blocks.0.0.weight")[:5] == 0).all())
    assert not bool((baked.get_parameter("blocks.0.0.bias")[:5] == gm.get_parameter("blocks.0.0.bias")[:5]).all())  # trained
    small = fp.minimize(baked, x)
    # five dead units: their weight rows and biases, and the next layer's columns (their constant is folded)
    assert n_params(baked) - n_params(small) == 5 * 24 + 5 + 5 * 24
    assert small.get_parameter("blocks.0.0.weight").shape == (43, 24)


def test_schedules():
    assert sparsity_schedule(0, 10, 0.9) == 0.0
    assert sparsity_schedule(10, 10, 0.9) == pytest.approx(0.9)
    assert sparsity_schedule(5, 10, 0.8, kind="linear") == pytest.approx(0.4)
    cubic = [sparsity_schedule(t, 10, 0.9) for t in range(11)]
    assert all(a <= b for a, b in zip(cubic, cubic[1:]))
    assert cubic[5] > 0.45  # cubic front-loads pruning
    with pytest.raises(fp.MaskError):
        sparsity_schedule(1, 0, 0.5)
    with pytest.raises(fp.MaskError):
        sparsity_schedule(1, 10, 1.2)


def test_bake_masks_removes_only_the_mask_parametrizations():
    """A user's own parametrization (weight norm here) survives bake_masks_; only fxprune's masks are baked in."""
    from torch.nn.utils import parametrizations, parametrize

    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    parametrizations.weight_norm(net[2])
    hold_masks_(net, {"0.weight": torch.rand(6, 4) > 0.5})
    assert parametrize.is_parametrized(net[0], "weight") and parametrize.is_parametrized(net[2], "weight")
    x = torch.randn(3, 4)
    before = net(x)
    bake_masks_(net)
    assert not parametrize.is_parametrized(net[0]) and parametrize.is_parametrized(net[2], "weight")
    assert torch.allclose(net(x), before)
