"""float32 checks of a model that rounds more than float32's tolerance by itself.

An ill-conditioned network (large activations that nearly cancel: an untrained torchvision MobileNetV2 with
BatchNorm computes its logits 9e-4 away from its own float64 result) is rewritten exactly, yet a rewrite that folds a
constant or sums in another order rounds differently by as much. minimize's self-check and verify read such a
difference as rounding only where the rewrite is exact in float64 and the float32 difference stays within 4x the
model's own float32 error; an error of that size that float64 shows is still caught.
"""
import copy

import pytest
import torch
from torch import nn

import fxprune as fp
from conftest import graph_state, snapshot
from fxprune.compare import NOISE_FACTOR, float32_rtol, to_dtype
from fxprune.passes.minimize import MinimizeOptions, self_check
from fxprune.verify import count_params


def ill_conditioned(seed: int = 0) -> nn.Sequential:
    """Pairs of equal hidden units of size 1e3 whose output weights cancel to 1e-4; 8 units constant (dead rows,
    bias 5), which minimize folds into the output bias."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 2))
    with torch.no_grad():
        net[0].weight.copy_((torch.randn(32, 8, generator=g) * 1e3).repeat_interleave(2, 0))
        net[0].bias.copy_((torch.rand(32, generator=g) * 1e3).repeat_interleave(2))
        a = torch.randn(2, 32, generator=g)
        net[2].weight.copy_(torch.stack([a, -a * (1 - 1e-4)], -1).reshape(2, 64))
        net[2].bias.zero_()
        net[0].weight[:8] = 0.0
        net[0].bias[:8] = 5.0
    return net


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.fixture
def case():
    net, x = ill_conditioned(), torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        own = rel(net(x), copy.deepcopy(net).double()(x.double()))
    assert own > 1e-4  # the model itself rounds past float32's tolerance
    return net, x, own


def test_minimize_keeps_an_exact_rewrite_of_an_ill_conditioned_model(case):
    net, x, own = case
    before = copy.deepcopy(net.state_dict())
    small = fp.minimize(net, (x,))  # raised EquivalenceError when the check held float32 to 1e-4
    with torch.no_grad():
        diff32 = rel(small(x), net(x))
        exact = rel(to_dtype(small, torch.float64)(x.double()), copy.deepcopy(net).double()(x.double()))
    assert 1e-4 < diff32 <= float32_rtol(own)  # a float32 difference the old check refused: rounding
    assert exact < 1e-6  # the rewrite itself is exact (its folded bias rounded to float32)
    assert count_params(small) == count_params(net) - 8 * (8 + 1) - 8 * 2
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # the input is untouched
    # other batch sizes than the example's
    x2 = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel(to_dtype(small, torch.float64)(x2.double()), copy.deepcopy(net).double()(x2.double())) < 1e-6


def test_minimize_module_keeps_it_too(case):
    net, x, _ = case
    small = fp.minimize_module(net, (x,))
    assert type(small) is nn.Sequential and small[0].out_features == 56
    assert fp.verify(net, small, (x,)).ok


def test_verify_reads_the_first_models_own_rounding(case):
    net, x, own = case
    small = fp.minimize(net, (x,))
    report = fp.verify(net, small, (x,))
    assert report.ok, report
    o = report.outputs[0]
    assert o.max_rel["float32"] > 1e-4 and o.noise > 1e-4  # without the model's noise the verdict would be no
    assert "own f32 rel" in str(report)


def test_an_error_under_the_models_own_rounding_is_still_caught(case):
    """A result off by 8e-4 of the output's scale: within 4x the model's float32 noise, so float32 alone could not
    tell it from rounding; float64 does."""
    net, x, own = case
    gm = fp.capture(net, (x,))
    small = fp.minimize(gm, options=MinimizeOptions(verify=False))
    wrong = copy.deepcopy(small)
    with torch.no_grad():
        scale = float(net(x).abs().max())
        for name, t in wrong.named_parameters():
            if t.shape == (2,):  # the output bias
                t += 8e-4 * scale
        assert 1e-4 < rel(wrong(x), net(x)) <= NOISE_FACTOR * own
    with pytest.raises(fp.EquivalenceError, match="relative error"):
        self_check(gm, wrong, (x,))
    assert not fp.verify(net, wrong, (x,)).ok


def test_a_model_that_runs_in_float32_only_gets_no_allowance():
    """A forward that casts its input to float32 does not run as a float64 copy: nothing confirms the rewrite
    there, and its float32 difference stands (fail-closed), although the rewrite is right."""

    class Casts(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = ill_conditioned()

        def forward(self, x):
            return self.net(x.float())

    m, x = Casts(), torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    gm = fp.capture(m, (x,))
    small = fp.minimize(gm, options=MinimizeOptions(verify=False))
    with torch.no_grad():
        assert rel(small(x), m(x)) > 1e-4
    with pytest.raises(fp.EquivalenceError, match="relative error"):
        self_check(gm, small, (x,))


class _RoundsInEager(nn.Module):
    """x plus a large value minus it again: eager float32 rounds x to the large value's ulps (about 5e-4 of x);
    the traced graph (the branch a symbolic trace takes) adds the zero difference instead and keeps x exactly. The
    same function, rounded differently."""

    def forward(self, x):
        big = 1e4 * torch.ones_like(x)
        if torch.fx._symbolic_trace.is_fx_tracing():
            return x + (big - big)
        return (x + big) - big


def test_capture_reads_the_models_own_rounding_too():
    m, x = _RoundsInEager(), torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel(m(x), x) > 1e-4  # the model's own float32 rounding
    gm = fp.capture(m, (x,), method="symbolic")  # raised CaptureError: "does not reproduce the model's outputs"
    with torch.no_grad():
        assert torch.equal(gm(x), x)


def test_the_models_own_rounding_is_the_largest_measured_not_one_inputs():
    """One input can happen to round little where the model rounds much (a batch of one: this model's own float32
    error there was 6.5e-5 on one CPU, 2.5e-4 on the 16 examples), and minimize refused its exact rewrite at that
    check shape. The own error is now the largest measured over the points checked, the example's included."""
    from fxprune.compare import own_rounding, rounding_only

    net = ill_conditioned()
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        example = own_rounding(net, (x,), net(x))
        one = x[:1]
        out = net(one)
    assert len(example) == 1 and example[0] > 1e-4  # measured on the example: the model rounds past 1e-4
    here = own_rounding(net, (one,), out)[0]
    measured = max(10 * here, 1e-3)  # what an earlier point measured, well above this input's own error
    got = out + 0.5 * (float32_rtol(here) + float32_rtol(measured)) * out.abs().max()  # exact in float64 (the
    # candidate is the model), its float32 difference past 4x this input's own error and within 4x the measured
    assert not rounding_only(net, net, (one,), out, got)  # this input alone: refused
    noise = [measured]
    assert rounding_only(net, net, (one,), out, got, noise) and noise == [measured]
    far = out + 2 * float32_rtol(measured) * out.abs().max()  # past the largest own error: still refused
    assert not rounding_only(net, net, (one,), out, far, [measured])
    noise = [0.0]
    rounding_only(net, net, (one,), out, out, noise)
    assert noise == [here]  # the list keeps the largest own error measured


def sensitive(seed: int = 0) -> nn.Sequential:
    """ill_conditioned's cancelling pairs (units of about 1e3, output weights cancelling to 1e-4), fed by a layer
    with 4 dead units (constants 1-2) that the two units of a pair read through different weights, their biases
    making up the difference. minimize folds the constants into those biases, and each rounds to float32 on its
    own: a change of half an ulp of 1e3 in a unit moves the output by about 3e-4 of its scale, so the model in
    float64 moves past stored_rtol (1e-6) with its folded biases rounded, however exactly they were computed."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.randn(12, 8, generator=g))
        net[0].bias.copy_(torch.rand(12, generator=g))
        net[0].weight[:4] = 0.0
        net[0].bias[:4] = 1 + torch.rand(4, generator=g)
        c = net[0].bias[:4].double()
        w = (torch.randn(32, 12, generator=g, dtype=torch.float64) * 1e2).repeat_interleave(2, 0)
        w[:, :4] = torch.randn(64, 4, generator=g, dtype=torch.float64) * 1e2
        w = w.float().double()
        b = (torch.rand(32, generator=g, dtype=torch.float64) * 1e3 + 500).repeat_interleave(2)
        net[2].weight.copy_(w)
        net[2].bias.copy_(b + (w[0::2, :4] @ c).repeat_interleave(2) - w[:, :4] @ c)
        a = torch.randn(2, 32, generator=g)
        net[4].weight.copy_(torch.stack([a, -a * (1 - 1e-4)], -1).reshape(2, 64))
        net[4].bias.zero_()
    return net


@pytest.fixture
def touchy():
    net, x = sensitive(), torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        own = rel(net(x), copy.deepcopy(net).double()(x.double()))
    assert own > 1e-4
    return net, x


def test_a_rewrite_too_sensitive_for_float32_constants_is_proved_by_its_float64_twin(touchy):
    """The float32 rewrite's float64 copy is 1e-4 from the model, past stored_rtol, and was refused although the
    rewrite is exact: now minimize makes the same rewrite on a float64 copy (float64_twin), holds it to 1e-9, and
    returns its float32 copy."""
    from fxprune.compare import EXACT_RTOL, stored_rtol
    from fxprune.passes.minimize import float64_twin

    net, x = touchy
    before = copy.deepcopy(net.state_dict())
    gm = fp.capture(net, (x,))
    first = fp.minimize(gm, options=MinimizeOptions(verify=False))
    n64 = copy.deepcopy(net).double()
    with torch.no_grad():
        assert rel(to_dtype(first, torch.float64)(x.double()), n64(x.double())) > 100 * stored_rtol(torch.float32)
    with pytest.raises(fp.EquivalenceError, match="relative error") as info:
        self_check(gm, first, (x,))  # the float64 half of the rule refuses it: what minimize raised before
    assert info.value.rounding  # ... alone: the float32 outputs lie within the model's own rounding
    graph_before = graph_state(gm), snapshot(gm)
    small = fp.minimize(gm)
    assert (graph_state(gm), snapshot(gm)) == graph_before  # the captured graph too, its node.meta included
    twin = float64_twin(gm, (x,), MinimizeOptions())
    assert all(t.dtype == torch.float32 for t in small.state_dict().values())
    assert all(torch.equal(t, twin.state_dict()[k].float()) for k, t in small.state_dict().items())
    assert count_params(small) == count_params(net) - 4 * (8 + 1) - 4 * 64
    for n in (16, 5, 1):  # the example's batch and others: the twin is exact, the float32 copy within own rounding
        xs = torch.randn(n, 8, generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            assert rel(twin(xs.double()), n64(xs.double())) <= EXACT_RTOL
            own = rel(net(xs), n64(xs.double()))
            assert rel(small(xs), net(xs)) <= float32_rtol(own)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # the input is untouched


def test_minimize_module_proves_it_the_same_way(touchy):
    net, x = touchy
    small = fp.minimize_module(net, (x,))
    assert type(small) is nn.Sequential and small[0].out_features == 8 and small[2].in_features == 8
    report = fp.verify(net, small, (x,))
    assert not report.ok and report.outputs[0].float32_ok  # float64 with rounded constants: past 1e-6
    assert any("ill-conditioned" in n for n in report.notes)  # the report says why and how to check the rewrite
    n64, x64 = copy.deepcopy(net).double(), x.double()
    assert fp.verify(n64, fp.minimize_module(n64, (x64,)), (x64,)).ok  # which is exact


def test_the_twin_does_not_let_a_wrong_rewrite_through(touchy):
    """With the twin, what is checked is the twin (to 1e-9) and that the candidate is its rounded copy: a candidate
    off the twin, or a twin off the model, is refused."""
    from fxprune.passes.minimize import float64_twin

    net, x = touchy
    gm = fp.capture(net, (x,))
    twin = float64_twin(gm, (x,), MinimizeOptions())
    good = to_dtype(twin, torch.float32)
    self_check(gm, good, (x,), exact=twin)  # passes
    wrong = copy.deepcopy(good)
    with torch.no_grad():
        wrong.get_parameter("2.bias")[0] += 1e-3  # 16 ulps of a unit: inside 4x the model's own float32 error
        own = rel(net(x), copy.deepcopy(net).double()(x.double()))
        assert 1e-4 < rel(wrong(x), net(x)) <= float32_rtol(own)  # float32 alone cannot tell it from rounding
    with pytest.raises(fp.EquivalenceError, match="relative error"):
        self_check(gm, wrong, (x,), exact=twin)
    wrong64 = to_dtype(wrong, torch.float64)
    with pytest.raises(fp.EquivalenceError, match="relative error"):
        self_check(gm, wrong, (x,), exact=wrong64)


def test_no_twin_is_built_for_a_result_off_by_more_than_the_models_rounding(monkeypatch):
    """The twin costs float64 copies of the model and its graph: it is built only where the float32 outputs lie
    within the model's own rounding and the float64 half alone failed (``EquivalenceError.rounding``), not for a
    rewrite that is plainly wrong."""
    from fxprune.passes import minimize as mz

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    with torch.no_grad():
        net[0].weight[:4], net[0].bias[:4] = 0.0, -1.0  # 4 dead units
    x = torch.randn(6, 8)
    real = mz.Rewriter.run

    def shifted(self):  # a wrong rewrite: its output moved by 0.5 at every batch size
        out = real(self)
        node = next(n for n in out.graph.nodes if n.op == "output")
        with out.graph.inserting_before(node):
            node.args = (out.graph.call_function(torch.add, (node.args[0], 0.5)),)
        out.recompile()
        return out

    built = []
    monkeypatch.setattr(mz.Rewriter, "run", shifted)
    monkeypatch.setattr(mz, "float64_twin", lambda *a, **k: built.append(a))
    with pytest.raises(fp.EquivalenceError, match="relative error") as info:
        fp.minimize(net, (x,))
    assert not info.value.rounding and built == []
