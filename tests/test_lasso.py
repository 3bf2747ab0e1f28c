"""fp.GroupLasso: groups read off fxprune's own analysis (the hand-written residual-stream lists of the old benchmark
found with nothing listed), an exact-zero proximal step that leaves what minimize removes, attached to any
optimizer through its step, pure to build."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune as fp
from fxprune.errors import InputError
from fxprune.verify import count_params

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import squeeze_release as sr  # noqa: E402


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))


def test_groups_are_the_hidden_units_and_the_input_features_and_the_output_is_frozen():
    net, x = mlp(), torch.randn(4, 6)
    reg = fp.GroupLasso(net, (x,), inputs=False)
    assert reg.channels == 10 + 8
    dims = {(s.name, s.dim) for s in reg.slices}
    assert dims == {("0.weight", 0), ("0.bias", 0), ("2.weight", 1), ("2.weight", 0), ("2.bias", 0), ("4.weight", 1)}
    # entries per group: unit k of layer 0 owns its row (6) and bias (1) and column k of layer 2 (8)
    assert sorted(reg.sizes.tolist()) == [14.0] * 8 + [15.0] * 10
    # by default the 6 input features too: feature j owns column j of layer 0 (10 entries)
    reg = fp.GroupLasso(net, (x,))
    assert reg.channels == 6 + 10 + 8 and ("0.weight", 1) in {(s.name, s.dim) for s in reg.slices}
    assert sorted(reg.sizes.tolist()) == [10.0] * 6 + [14.0] * 8 + [15.0] * 10


def _stream_slices(model: sr.ConvNeXtStyle) -> list[list[tuple[str, int]]]:
    """The benchmark's former hand-written list of every (parameter, dim) carrying each residual stream."""
    def block(prefix: str) -> list[tuple[str, int]]:
        return [(f"{prefix}.dwconv.weight", 0), (f"{prefix}.norm.weight", 0), (f"{prefix}.pwconv1.weight", 1),
                (f"{prefix}.pwconv2.weight", 0), (f"{prefix}.gamma", 0)]
    s1 = [("stem.weight", 0), ("stem_norm.weight", 0), ("down_norm.weight", 0), ("down.weight", 1)]
    s2 = [("down.weight", 0), ("head_norm.weight", 0), ("head.weight", 1)]
    s1 += [sl for i in range(len(model.stage1)) for sl in block(f"stage1.{i}")]
    s2 += [sl for i in range(len(model.stage2)) for sl in block(f"stage2.{i}")]
    return [s1, s2]


def test_convnext_streams_are_found_with_nothing_listed():
    torch.manual_seed(0)
    model = sr.ConvNeXtStyle(2)
    reg = fp.GroupLasso(model, (torch.randn(2, 1, 8, 8),))
    by = {(s.name, s.dim): s.channel for s in reg.slices}
    for stream in _stream_slices(model):
        first = by[stream[0]]
        assert (first >= 0).all()
        for sl in stream:  # every slice of the stream maps channel k to the same group channel
            assert torch.equal(by[sl], first), sl
    # the MLP units of each block: pwconv1 rows and bias, pwconv2 columns, one group each
    assert torch.equal(by[("stage1.0.pwconv1.weight", 0)], by[("stage1.0.pwconv2.weight", 1)])
    assert reg.channels == 2 * 32 + 2 * 128 + 64 + 2 * 256 - 32  # streams (32, 64) + 4 MLPs; the stem stream once


def test_step_leaves_exact_zeros_that_minimize_removes():
    net, x = mlp(), torch.randn(5, 6)
    with torch.no_grad():  # three units of layer 0 and two of layer 2 made small (the scale of a step), not zero
        net[0].weight[:3] *= 1e-3; net[0].bias[:3] *= 1e-3; net[2].weight[:, :3] *= 1e-3
        net[2].weight[:2] *= 1e-3; net[2].bias[:2] *= 1e-3; net[4].weight[:, :2] *= 1e-3
    before = count_params(net)
    reg = fp.GroupLasso(net, (x,))
    assert int((reg.norms(net) == 0).sum()) == 0
    kept = net[0].weight[3:].clone()
    assert reg.step(net, lr=1e-3) == 5 and int((reg.norms(net) == 0).sum()) == 5
    assert bool((net[0].weight[:3] == 0).all()) and bool((net[4].weight[:, :2] == 0).all())
    assert torch.equal(net[0].weight[3:], kept)  # the others are untouched
    small = fp.minimize_module(net, (x,))
    assert count_params(small) == before - 3 * (6 + 1 + 8) - 2 * (7 + 1 + 3)  # rows, biases, columns (of 10 - 3)
    assert torch.allclose(small(x), net(x), atol=1e-6)
    assert fp.GroupLasso(net, (x,), threshold=0.0).step(net, lr=1.0) == 5  # threshold 0: only exact zeros
    shrunk = mlp()
    with torch.no_grad():  # a whole tensor shrunk alike (what a normalization after it would not notice)
        shrunk[0].weight.mul_(1e-6); shrunk[0].bias.mul_(1e-6)
    fp.GroupLasso(shrunk, (x,)).step(shrunk, lr=1e-3)
    assert int(torch.count_nonzero(shrunk[0].weight)) == 60  # small in absolute terms, not against its own tensor


def test_attach_acts_on_the_models_optimizer_only_holds_what_it_zeroed_and_detaches():
    net, other, x = mlp(), mlp(), torch.randn(5, 6)
    reg = fp.GroupLasso(net, (x,), threshold=1e9, relative=1e9)  # every group under both: one step zeroes them all
    opt, opt_other = torch.optim.SGD(net.parameters(), lr=0.1), torch.optim.SGD(other.parameters(), lr=0.1)
    with reg.attach(net):
        ref = {k: v.clone() for k, v in other.state_dict().items()}
        opt_other.zero_grad(); other(x).sum().backward()
        grads = {n: p.grad.clone() for n, p in other.named_parameters()}
        opt_other.step()
        for n, p in other.named_parameters():  # another model's optimizer: a plain SGD step, nothing added
            assert torch.allclose(p, ref[n] - 0.1 * grads[n])
        opt.zero_grad(); net(x).sum().backward(); opt.step()
        assert int((reg.norms(net) == 0).sum()) == reg.channels
        reg.threshold = reg.relative = 0.0  # from here on nothing new is under them, yet what was zeroed stays zero
        for _ in range(3):
            opt.zero_grad(); net(x).pow(2).sum().backward(); opt.step()
        assert int((reg.norms(net) == 0).sum()) == reg.channels
    fresh = mlp()
    opt = torch.optim.SGD(fresh.parameters(), lr=0.1)
    opt.zero_grad(); fresh(x).sum().backward(); opt.step()
    assert int((reg.norms(fresh) == 0).sum()) == 0  # the hooks are gone


def test_held_masks_and_penalty_and_regularize():
    net, x = mlp(), torch.randn(5, 6)
    reg = fp.GroupLasso(net, (x,), strength=0.5, inputs=False)  # (the hidden units: R written out below)
    masked = fp.hold_masks_(net, {"0.weight": torch.rand(10, 6) > 0.5})  # read through the parametrization
    p = reg.penalty(masked)
    assert p.requires_grad and float(p) > 0
    scale = {n: t[t != 0].pow(2).mean().sqrt() for n, t in (("0.weight", masked[0].weight), ("0.bias", masked[0].bias),
             ("2.weight", masked[2].weight), ("2.bias", masked[2].bias), ("4.weight", masked[4].weight))}
    u0 = torch.cat([masked[0].weight / scale["0.weight"], (masked[0].bias / scale["0.bias"])[:, None],
                    (masked[2].weight / scale["2.weight"]).T], 1)  # the 10 units of layer 0: row, bias, column
    u1 = torch.cat([masked[2].weight / scale["2.weight"], (masked[2].bias / scale["2.bias"])[:, None],
                    (masked[4].weight / scale["4.weight"]).T], 1)
    expected = (u0.norm(dim=1) * 15 ** 0.5).sum() + (u1.norm(dim=1) * 14 ** 0.5).sum()  # R over relative entries
    assert abs(float(p) - float(expected)) < 1e-4 * float(p)
    net2 = mlp()
    params = [net2[0].weight, net2[0].bias, net2[2].weight, net2[2].bias, net2[4].weight]
    auto = torch.autograd.grad(reg.penalty(net2), params)
    net2.zero_grad()
    reg.regularize(net2)  # strength * dR/du = strength * s_t * dR/dw, in closed form
    for t, g in zip(params, auto):
        s_t = t.detach().pow(2).mean().sqrt()
        assert torch.allclose(t.grad, 0.5 * s_t * g, rtol=1e-4, atol=1e-7)
    assert net2[4].bias.grad is None  # the output layer's bias is in no free group


def test_building_is_pure_and_draws_no_randomness():
    net, x = mlp(), torch.randn(5, 6)
    net.train()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.random.get_rng_state()
    fp.GroupLasso(net, (x,))
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items()) and net.training


def test_bad_arguments():
    net, x = mlp(), torch.randn(5, 6)
    with pytest.raises(InputError, match="strength"):
        fp.GroupLasso(net, (x,), strength=-1)
    with pytest.raises(InputError, match="threshold"):
        fp.GroupLasso(net, (x,), threshold="big")
    with pytest.raises(InputError, match="relative"):
        fp.GroupLasso(net, (x,), relative=-0.1)
    reg = fp.GroupLasso(net, (x,))
    with pytest.raises(InputError, match="built"):
        reg.norms(nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))
    assert fp.GroupLasso(net, (x,), exclude=["2.*"]).channels == 6 + 18  # excluded slices: fewer members, same groups
    assert {s.name for s in fp.GroupLasso(net, (x,), exclude=["2.*"]).slices} == {"0.weight", "0.bias", "4.weight"}


def test_group_lasso_function_matches_the_object():
    net, x = mlp(), torch.randn(5, 6)
    assert torch.allclose(fp.group_lasso(net, (x,)), fp.GroupLasso(net, (x,)).penalty(net))


class _ConvBN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(1, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_the_pull_on_a_weight_before_batchnorm_keeps_its_scale_and_biases_are_not_zeroed_alone():
    torch.manual_seed(0)
    m, x = _ConvBN(), torch.randn(16, 1, 6, 6)
    reg = fp.GroupLasso(m, (x[:4],))
    assert reg.normalized == {"conv.weight"}
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    reg.regularize(m)
    # before BatchNorm: no component along the weight itself (no shrinking as a whole); elsewhere it shrinks
    assert abs(float((m.conv.weight.grad * m.conv.weight).sum())) < 1e-4 * float(m.conv.weight.grad.norm() * m.conv.weight.norm())
    assert float((m.head.weight.grad * m.head.weight).sum()) > 0
    # BatchNorm's biases start at zero; the exact-zero step must not pin them there
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    with reg.attach(m):
        m.train()
        for _ in range(5):
            opt.zero_grad()
            F.cross_entropy(m(x), torch.arange(16) % 3).backward()
            opt.step()
    assert bool((m.bn.bias != 0).all())


def test_a_bias_entry_goes_alone_only_once_its_channels_weight_entries_are_zero():
    net, x = mlp(), torch.randn(5, 6)
    with torch.no_grad():
        net[0].weight[0] = 0.0; net[0].bias[0] = 1e-6  # unit 0: row already zero, bias small -> the bias goes
        net[0].bias[1] = 1e-6                           # unit 1: row alive, bias small -> the bias stays
        net[0].weight[2] = 0.0; net[0].bias[2] = 0.5    # unit 2: row zero, bias large -> the bias stays
    fp.GroupLasso(net, (x,)).step(net, lr=1e-3)
    assert float(net[0].bias[0]) == 0.0
    assert float(net[0].bias[1]) != 0.0 and float(net[0].bias[2]) == 0.5
    with torch.no_grad():  # a row that this very step zeroes takes its small bias with it
        net[2].weight[4] *= 1e-6; net[2].bias[4] = 1e-6
    fp.GroupLasso(net, (x,)).step(net, lr=1e-3)
    assert bool((net[2].weight[4] == 0).all()) and float(net[2].bias[4]) == 0.0


def test_a_model_without_free_groups_has_nothing_to_regularize():
    """A lone Linear: its input and output channels are the model's own (frozen), so no group is free; every method
    works and does nothing (no error from an empty reading)."""
    net = torch.nn.Linear(4, 2)
    x = (torch.randn(3, 4),)
    reg = fp.GroupLasso(net, x)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    assert reg.channels == 0 and reg.norms(net).numel() == 0 and float(reg.penalty(net)) == 0.0
    assert reg.step(net, lr=1e-3) == 0
    reg.regularize(net)
    assert all(p.grad is None for p in net.parameters())
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with reg.attach(net):
        net(*x).sum().backward()
        opt.step()
    assert not torch.equal(net.weight, before["weight"])  # the optimizer's step went through


def test_every_k_steps_reads_less_often_and_holds_zeros_in_between():
    """every=4: the exact-zero step runs at optimizer steps 0, 4, 8...; between them, what it zeroed is zeroed again
    after each step although the loss's gradient moves it (tanh'(0) = 1); new zeros wait for the next reading."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    x = torch.randn(16, 4)
    with torch.no_grad():
        net[0].weight[:3] *= 1e-5; net[0].bias[:3] = 0; net[2].weight[:, :3] *= 1e-5
    reg = fp.GroupLasso(net, (x,), every=4)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    zero_counts = []
    with reg.attach(net):
        for step in range(6):
            if step == 2:  # a fourth unit at the scale of a step: not zeroed before the reading at step 4
                with torch.no_grad():
                    net[0].weight[3] *= 1e-5; net[0].bias[3] = 0; net[2].weight[:, 3] *= 1e-5
            opt.zero_grad()
            net(x).pow(2).sum().backward()
            opt.step()
            zero_counts.append(int((reg.norms(net) == 0).sum()))
    assert zero_counts == [3, 3, 3, 3, 4, 4]
    with pytest.raises(fp.InputError, match="every must be a positive integer"):
        fp.GroupLasso(net, (x,), every=0)


@pytest.mark.parametrize("every", [1, 4])
def test_the_pull_between_readings_is_the_last_readings_coefficients_times_the_current_weights(every):
    """With no loss gradient, SGD's step is the pull alone: each weight shrinks by ``1 - lr * c`` with ``c`` (per
    entry) from the last reading. So with every=4 the ratio new/old is the same on steps 1-4 and changes after the
    next reading; with every=1 it changes at every step (the group norms shrink)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
    x = torch.randn(16, 4, dtype=torch.float64)
    reg = fp.GroupLasso(net, (x,), every=every, strength=1.0)
    opt = torch.optim.SGD(net.parameters(), lr=1e-2)
    ratios = []
    with reg.attach(net):
        for _ in range(6):
            before = net[0].weight.detach().clone()
            opt.zero_grad()
            (0 * net(x).sum()).backward()
            opt.step()
            ratios.append(net[0].weight.detach() / before)
    assert all(bool((r < 1).all()) for r in ratios)  # the pull shrinks every entry
    same = [torch.allclose(ratios[i], ratios[i + 1], rtol=0, atol=1e-12) for i in range(5)]
    # every=4: step 0 pulls with a first reading before it; readings after steps 0 and 4 serve steps 1-4 and 5-8
    assert same == ([False, True, True, True, False] if every == 4 else [False] * 5)


def test_entries_whose_squares_underflow_leave_the_pull_finite():
    """A float32 tensor whose nonzero entries are ~1e-25 has squares that underflow to 0: its scale is taken as 1
    (was 0: the pull's factor strength / s_t was infinite and the next step wrote NaN into the weights)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    x = torch.randn(16, 4)
    reg = fp.GroupLasso(net, (x,), every=2)
    with torch.no_grad():
        net[0].weight.fill_(1e-25)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    with reg.attach(net):
        for _ in range(4):
            opt.zero_grad()
            net(x).pow(2).sum().backward()
            opt.step()
    assert all(bool(torch.isfinite(p).all()) for p in net.parameters())


def test_a_strong_pull_with_plain_sgd_takes_groups_to_zero_never_past_it():
    """With plain SGD the pull shrinks a value by ``lr * coefficient`` per step, the coefficient held between
    readings; once that passed 1 for a small group, the group flipped sign and grew at every step (strength 2, lr 0.05:
    the weights overflowed to inf in 6 steps). The coefficient is capped at ``1 / lr``: to zero at most."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 5))
    x = torch.randn(8, 12)
    reg = fp.GroupLasso(net, (x,), strength=2.0)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    with reg.attach(net):
        for _ in range(20):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
            assert all(bool(torch.isfinite(p).all()) for p in net.parameters())
    assert int((reg.norms(net) == 0).sum()) == reg.channels  # this strong a pull empties every group


def test_regularize_by_hand_takes_the_learning_rate_for_the_same_cap():
    """The hand-written loop (``regularize`` before the step, ``step`` after it) with the step's ``lr``: finite, and
    the groups emptied, as with ``attach``."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 5))
    x = torch.randn(8, 12)
    reg = fp.GroupLasso(net, (x,), strength=2.0)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    for _ in range(20):
        opt.zero_grad()
        net(x).square().mean().backward()
        reg.regularize(net, lr=0.05)
        opt.step()
        reg.step(net, 0.05)
        assert all(bool(torch.isfinite(p).all()) for p in net.parameters())
    assert int((reg.norms(net) == 0).sum()) == reg.channels


def test_a_model_inside_data_parallel_is_regularized_by_its_own_parameters():
    """nn.DataParallel names the parameters ``module.*``: the GroupLasso reads the module inside, built from or
    given the wrapper alike."""
    net, x = mlp(), torch.randn(4, 6)
    dp = nn.DataParallel(net)
    reg = fp.GroupLasso(dp, (x,))
    assert reg.channels == fp.GroupLasso(net, (x,)).channels == 6 + 18
    assert torch.equal(reg.norms(dp), reg.norms(net))
    assert float(reg.penalty(dp)) == float(reg.penalty(net)) > 0


class _PreNorm(nn.Module):
    """A residual stream of 8 channels written by ``inp``, read through a LayerNorm by a block and by the head."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.norm1, self.block = nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 8)
        self.norm2, self.head = nn.LayerNorm(8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.block(self.norm1(h))
        return self.head(self.norm2(h))


@pytest.mark.parametrize("statistics_only", [True, False])
def test_a_stream_channel_only_the_norms_statistics_read_goes_whole(statistics_only):
    torch.manual_seed(0)
    net, x = _PreNorm().double(), torch.randn(5, 4, dtype=torch.float64)
    with torch.no_grad():
        net.norm1.weight[:2] = 0
        net.norm2.weight[:2] = 0  # channels 0 and 1: no norm output carries them any more
        net.norm1.weight[2] = 0  # channel 2: the head's norm still carries it
    before = count_params(net)
    written = net.inp.weight[:3].clone()
    reg = fp.GroupLasso(net, (x,), statistics_only=statistics_only, threshold=0.0)  # (no slice is small)
    zeroed = reg.step(net, lr=1e-3)
    if not statistics_only:
        assert zeroed == 0 and torch.equal(net.inp.weight[:3], written)  # the writers are left to the pull
        return
    assert zeroed == 2
    for t in (net.inp.weight[:2], net.inp.bias[:2], net.block.weight[:2], net.block.weight[:, :2], net.block.bias[:2],
              net.norm1.bias[:2], net.norm2.bias[:2], net.head.weight[:, :2]):
        assert bool((t == 0).all())
    assert torch.equal(net.inp.weight[2], written[2])  # channel 2 stays
    small = fp.minimize_module(net, (x,))
    assert count_params(small) < before
    assert small.inp.out_features == 6
    for xs in (x, torch.randn(2, 4, dtype=torch.float64)):  # exact, at the example's batch and another
        assert torch.allclose(small(xs), net(xs), rtol=0, atol=1e-12)  # the zeroed channels are constant zeros


class _GroupNormed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.gn, self.b = nn.Conv2d(3, 8, 1), nn.GroupNorm(2, 8), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.b(torch.relu(self.gn(self.a(x))))


def test_a_group_norm_channel_whose_weights_are_zero_goes_whole():
    """A group norm's channels go one by one now (its groups are compensated): a zero weight entry gates its
    channel as a LayerNorm's does, so the exact-zero step zeroes the channel's writers too, and it goes (it was
    off for any model with a group norm). The CompensatedGroupNorm left after minimize gates as well."""
    torch.manual_seed(0)
    net, x = _GroupNormed().double(), torch.randn(2, 3, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        net.gn.weight[[1, 6]] = 0  # one channel in each group
        net.gn.bias[[1, 6]] = 0
    reg = fp.GroupLasso(net, (x,), threshold=0.0)  # (no slice is small)
    assert reg.statistics_only and [s.name for s in reg.slices if s.gate] == ["gn.weight"]
    assert reg.step(net, lr=1e-3) == 2
    assert bool((net.a.weight[[1, 6]] == 0).all()) and bool((net.b.weight[:, [1, 6]] == 0).all())
    small = fp.minimize_module(net, (x,))
    assert isinstance(small.gn, fp.nn.CompensatedGroupNorm) and small.gn.kept_per_group == (3, 3)
    for xs in (x, torch.randn(4, 3, 7, 6, dtype=torch.float64)):
        assert torch.allclose(small(xs), net(xs), rtol=0, atol=1e-12)
    assert fp.GroupLasso(small, (x,)).statistics_only


class _OffsetRMSNorm(nn.Module):
    """Gemma's form: ``x / rms(x) * (1 + weight)``, weight initialized to zero (a zero weight keeps the channel)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.zeros(d)), 1e-6

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)


_OffsetRMSNorm.__name__ = "GemmaRMSNorm"


class _Normed(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(4, 8), norm, nn.Linear(8, 2)

    def forward(self, x):
        return self.b(self.norm(self.a(x)))


@pytest.mark.parametrize("norm", [_OffsetRMSNorm(8), nn.LayerNorm(8, elementwise_affine=False)], ids=["1+w", "no weight"])
def test_norms_whose_zero_weight_does_not_drop_the_channel_turn_the_statistics_rule_off(norm):
    net, x = _Normed(norm), torch.randn(3, 4)
    written = net.a.weight.clone()
    reg = fp.GroupLasso(net, (x,), threshold=0.0)
    assert not reg.statistics_only and not any(s.gate for s in reg.slices)
    reg.step(net, lr=1e-3)  # (Gemma's weights start at zero: the rule would have zeroed every channel)
    assert torch.equal(net.a.weight, written)


class _Attention(nn.Module):
    """Self-attention of 4 heads of width 4 over 16 channels (q, k, v, o Linear)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (f(x).view(b, n, 4, 4).transpose(1, 2) for f in (self.q, self.k, self.v))
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, 16))


def test_a_dim_of_heads_is_regularized_over_its_head_dim_channels():
    """What the guide says the lasso covers in an attention: each head-dim channel across every head (row j of each
    head of q and k, one group; of v and o's columns, another), one slice per dim; whole heads are no group of their
    own (results.md, stop 49: tried, kept less)."""
    net = _Attention()
    reg = fp.GroupLasso(net, (torch.randn(2, 5, 16),))
    by = {}
    for s in reg.slices:
        assert (s.name, s.dim) not in by  # one slice per dim
        by[s.name, s.dim] = s.channel
    for name in ("q.weight", "k.weight", "v.weight"):
        rows = by[name, 0]
        assert all(len(set(rows[4 * h:4 * h + 4].tolist())) == 4 for h in range(4))  # a head's rows: 4 groups
        assert torch.equal(rows[:4], rows[4:8]) and torch.equal(rows[:4], rows[12:])  # row j of every head: one
    assert torch.equal(by["q.weight", 0], by["k.weight", 0]) and torch.equal(by["v.weight", 0], by["o.weight", 1])
    assert not (set(by["q.weight", 0].tolist()) & set(by["v.weight", 0].tolist()))
    # the input's 16 features (q, k and v read it through their weights alone; the output is frozen), q/k's and v/o's
    # head-dim channels, and the heads: a free group that no slice holds, so nothing pulls on it
    assert reg.channels == 16 + 4 + 4 + 4 and int((reg.sizes == 0).sum()) == 4
    assert fp.GroupLasso(net, (torch.randn(2, 5, 16),), inputs=False).channels == 4 + 4 + 4
