"""Weight norm (``torch.nn.utils.parametrizations.weight_norm`` and the legacy ``torch.nn.utils.weight_norm``):
``w = g * v / ||v||``. Its layers froze every channel they touched (a weight computed in the forward); now ``v`` and
``g`` are sliced, and where input channels go ``g`` is scaled so that every kept entry of ``w`` stays what it was.
Float64, exact at other batch sizes and lengths, the input model untouched, the class kept."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize
from torch.nn.utils import weight_norm as legacy_weight_norm

import fxprune as fp
from conftest import exact_at as _exact, minimized_purely, snapshot
from fxprune.interop.module import KeptChannelsWarning
from fxprune.verify import count_params


class TCN(nn.Module):
    """Two weight-normed temporal convs and a plain 1x1 conv (a TCN's, a vocoder's layers)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = parametrizations.weight_norm(nn.Conv1d(4, 8, 3, padding=1))
        self.b = parametrizations.weight_norm(nn.Conv1d(8, 6, 3, padding=1))
        self.c = nn.Conv1d(6, 2, 1)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def planted_tcn() -> TCN:
    """a's units 1 and 5 dead (g zero, bias zero): b reads zeros there through columns of v that are not zero; b
    reads nothing of a's unit 3 (a zero column of v); c reads nothing of b's unit 2."""
    torch.manual_seed(0)
    m = TCN().double().eval()
    with torch.no_grad():
        m.a.parametrizations.weight.original0[[1, 5]] = 0
        m.a.bias[[1, 5]] = 0
        m.b.parametrizations.weight.original1[:, 3] = 0
        m.c.weight[:, 2] = 0
    return m


# a's units 1, 3, 5 (v rows 4x3, g, bias) and b's columns for them (6 rows x 3 taps); b's unit 2 (v row, now of 5
# columns x 3 taps, g, bias) and c's column for it (2)
TCN_GONE = 3 * (12 + 1 + 1) + 3 * 18 + (5 * 3 + 1 + 1) + 2


def test_weight_normed_convs_lose_dead_units_in_the_graph():
    model = planted_tcn()
    small = minimized_purely(model, (torch.randn(2, 4, 10, dtype=torch.float64),), dynamic_shapes="every")
    assert count_params(model) - count_params(small) == TCN_GONE
    _exact(model, small, [(2, 4, 10), (5, 4, 10), (1, 4, 23)])


def test_weight_normed_convs_lose_dead_units_in_their_class(tmp_path):
    model = planted_tcn()
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KeptChannelsWarning)
        small = fp.minimize_module(model, (torch.randn(2, 4, 10, dtype=torch.float64),))
    assert snapshot(model) == before and type(small) is TCN
    assert count_params(model) - count_params(small) == TCN_GONE
    assert parametrize.is_parametrized(small.a, "weight") and parametrize.is_parametrized(small.b, "weight")
    assert (small.a.out_channels, small.b.in_channels, small.b.out_channels, small.c.in_channels) == (5, 5, 5, 5)
    _exact(model, small, [(2, 4, 10), (5, 4, 10), (1, 4, 23)])
    _exact(model, copy.deepcopy(small), [(3, 4, 7)])
    back = fp.load(fp.save(small, tmp_path / "tcn"), lambda: TCN().double())  # (g and v under parametrizations)
    assert parametrize.is_parametrized(back.b, "weight") and back.b.in_channels == 5
    _exact(model, back.eval(), [(3, 4, 7)])
    small.train()  # still weight norm: g and v train, w follows
    loss = small(torch.randn(2, 4, 10, dtype=torch.float64)).pow(2).sum()
    loss.backward()
    assert small.b.parametrizations.weight.original0.grad is not None


@pytest.mark.parametrize("dim", [0, None])
def test_legacy_weight_norm_layers_lose_units_and_keep_their_hooks(dim):
    """The legacy hook keeps ``weight`` as a plain attribute it recomputes before each forward; ``dim=None`` is one
    norm over the whole weight (its g a scalar: every removal rescales it)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # (torch deprecates the legacy form)
        model = nn.Sequential(legacy_weight_norm(nn.Linear(4, 8, bias=False), dim=dim), nn.ReLU(),
                              legacy_weight_norm(nn.Linear(8, 3), dim=dim), nn.ReLU(), nn.Linear(3, 2)).double()
    with torch.no_grad():
        model[0].weight_v[[1, 5]] = 0 if dim is None else model[0].weight_v[[1, 5]]
        if dim is not None:
            model[0].weight_g[[1, 5]] = 0  # units 1 and 5 dead
        model[2].weight_v[:, 6] = 0  # unit 6 unread
        model[4].weight[:, 0] = 0  # the second layer's unit 0 unread
    x = torch.randn(2, 4, dtype=torch.float64)
    before = snapshot(model)
    small = fp.minimize_module(model, (x,))
    assert snapshot(model) == before
    assert (small[0].out_features, small[2].in_features, small[2].out_features) == (5, 5, 2)
    assert small[0].weight.shape == (5, 4)  # (recomputed from the sliced weight_g and weight_v)
    _exact(model, small, [(2, 4), (7, 4)])


class _OneRow(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), parametrizations.weight_norm(nn.Linear(4, 2))

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_removed_inputs_rescale_g_and_a_row_left_with_zeros_stays_finite():
    """a's units 0 and 1 hold constants (rows zero, biases 0.5 and -1): b folds them into its bias and drops their
    columns of v, whose norms then shrink. b's row 0 reads only those units: what is left of it is zero, and its
    g becomes 0 (its v a 1, not 0 / 0)."""
    torch.manual_seed(0)
    model = _OneRow().double()
    with torch.no_grad():
        model.a.weight[[0, 1]] = 0
        model.a.bias[[0, 1]] = torch.tensor([0.5, -1.0], dtype=torch.float64)
        model.b.parametrizations.weight.original1[0, 2:] = 0
    small = fp.minimize_module(model, (torch.randn(2, 3, dtype=torch.float64),))
    assert small.b.in_features == 2
    w = small.b.weight
    assert bool(torch.isfinite(w).all()) and bool((w[0] == 0).all())
    _exact(model, small, [(2, 3), (6, 3)])


def test_the_group_lasso_pulls_g_and_leaves_v_alone():
    """v's rows do not scale w (g * v / ||v||), and a zero row of v is 0 / 0: only g (and the bias) are pulled and
    set to exact zeros; the model stays finite and the zeroed units go."""
    torch.manual_seed(0)
    net = nn.Sequential(parametrizations.weight_norm(nn.Linear(4, 8)), nn.ReLU(), nn.Linear(8, 2)).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    reg = fp.GroupLasso(net, (x,))
    assert not any("original1" in s.name for s in reg.slices)
    assert any("original0" in s.name for s in reg.slices)
    with torch.no_grad():
        net[0].parametrizations.weight.original0[:3] *= 1e-4
        net[0].parametrizations.weight.original1[:3] *= 1e-4
        net[0].bias[:3] = 0
        net[2].weight[:, :3] *= 1e-4
    assert reg.step(net, lr=1e-3) == 3
    assert bool(torch.isfinite(net(x)).all())
    small = fp.minimize_module(net, (x,))
    assert small[0].out_features == 5


def test_masks_leave_weight_norm_sources_alone_and_whole_channels_go_through_g():
    """A weight mask on g or v is no mask on the weight, and a v row masked whole is a row of NaN (0 / 0): weight
    masks skip them (the cycle's first masking of a TCN made its weights NaN). Whole-channel masks zero g, never v."""
    from fxprune.passes.mask import prunable, weight_sources

    model = planted_tcn()
    x = torch.randn(2, 4, 10, dtype=torch.float64)
    sources = weight_sources(model)
    assert sources == {f"{m}.parametrizations.weight.{o}": role for m in "ab"
                       for o, role in (("original0", "scale"), ("original1", "direction"))}
    assert set(prunable(model)) == {"c.weight"}
    gm = fp.capture(model, (x,))
    assert weight_sources(gm) == sources  # (read off the exported graph's aten._weight_norm)
    masked = fp.mask(gm, sparsity=0.5, structure="groups")
    masks = masked.meta["fxprune_masks"]
    assert not any("original1" in name for name in masks)
    assert any("original0" in name and not bool(m.all()) for name, m in masks.items())
    with torch.no_grad():
        assert bool(torch.isfinite(masked(x)).all())
    small = fp.minimize(masked)
    _exact(masked, small, [(3, 4, 10)])
    assert count_params(small) < count_params(model)


def test_squeeze_release_on_a_weight_normed_tcn_stays_finite():
    """The cycle with its defaults and a plain loop on a TCN of weight-normed convs: it comes back its own class,
    finite and smaller. (Before, nothing went here; and ``benchmarks/user_models.py``'s TCN came out of its first
    masking with NaN weights, masks on v, which minimize then refused.)"""
    torch.manual_seed(0)
    model = TCN().float()
    x, y = torch.randn(64, 4, 12), torch.randint(0, 2, (64,))

    def train(m):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        m.train()
        for _ in range(5):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x).mean(-1), y).backward()
            opt.step()

    @torch.no_grad()
    def evaluate(m):
        m.eval()
        return float((m(x).mean(-1).argmax(-1) == y).float().mean())

    train(model)
    res = fp.squeeze_release(model, (x[:8],), train=train, evaluate=evaluate, cycles=2, tolerance=1.0, progress=False)
    assert type(res.module) is TCN and parametrize.is_parametrized(res.module.a, "weight")
    with torch.no_grad():
        assert bool(torch.isfinite(res.module(x)).all())
    assert count_params(res.module) < count_params(model)


def test_weight_masks_mask_the_weight_a_weight_norm_computes():
    """A mask on ``a.weight`` of a weight-normed layer zeroes those entries of the weight itself, in g and v's terms:
    v masked, g scaled by the masked row's norm over the whole's, so the kept entries stay. Held while training
    (after the weight norm), baked back into g and v (the weight norm stays), read by minimize as zeros, held or
    baked."""
    from fxprune.passes.mask import apply_masks, bake_masks_, hold_masks_, magnitude_masks

    torch.manual_seed(0)
    model = TCN().double()
    x = torch.randn(3, 4, 10, dtype=torch.float64)
    masks = magnitude_masks(model, 0.7)
    assert set(masks) == {"a.weight", "b.weight", "c.weight"}  # (not g and v)
    before = {k: getattr(model, k[0]).weight.detach().clone() for k in ("a.weight", "b.weight")}
    apply_masks(model, masks)
    for k, w in before.items():
        now = getattr(model, k[0]).weight
        assert torch.allclose(now[masks[k]], w[masks[k]], rtol=1e-12, atol=0) and bool((now[~masks[k]] == 0).all())
    hold_masks_(model, masks)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
    assert bool((model.b.weight[~masks["b.weight"]] == 0).all()) and bool(torch.isfinite(model(x)).all())
    held = copy.deepcopy(model)
    small_held = fp.minimize(fp.capture(held, (x,), dynamic_shapes="every"))  # (held masks read as zeros)
    _exact(held, small_held, [(3, 4, 10), (2, 4, 13)])
    with torch.no_grad():
        out = model(x)
    bake_masks_(model)
    assert len(model.a.parametrizations.weight) == 1  # the weight norm alone again
    assert bool((model.b.weight[~masks["b.weight"]] == 0).all())
    with torch.no_grad():
        assert torch.allclose(model(x), out, rtol=1e-12, atol=1e-12)
    small = fp.minimize_module(model, (x,))
    assert count_params(small) == count_params(small_held) < count_params(model)
    _exact(model, small, [(3, 4, 10), (2, 4, 13)])


def test_weight_norm_sources_keep_their_roles_while_a_mask_is_held():
    from fxprune.passes.mask import hold_masks_, weight_sources

    model = planted_tcn()
    roles = weight_sources(model)
    hold_masks_(model, {"a.weight": torch.ones(8, 4, 3, dtype=torch.bool)})
    assert len(model.a.parametrizations.weight) == 2 and weight_sources(model) == roles
