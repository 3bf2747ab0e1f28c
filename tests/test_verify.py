import torch
from torch import nn

import fxprune as fp
from fxprune.zoo import build


def test_identical_models_are_exact_and_report_prints():
    m, x = build("cnn")
    m = m.double()
    x = (x[0].double(),)
    rep = fp.verify(m, m, x)
    assert rep.ok and rep.max_rel["float64"] == 0.0
    assert rep.params[0] == rep.params[1] > 0 and rep.flops[0] > 0
    text = str(rep)
    assert "EXACT" in text and "params" in text and "FLOPs" in text


def test_a_real_difference_is_caught():
    m, x = build("residual_mlp")
    gm = fp.capture(m, x)
    other = fp.capture(build("residual_mlp")[0], x)
    with torch.no_grad():
        other.get_parameter("out.bias").add_(1e-5)
    rep = fp.verify(gm, other, x)
    assert not rep.ok and rep.max_rel["float64"] > 1e-7
    assert "NOT EQUIVALENT" in str(rep)


def test_minimized_model_report_counts_smaller():
    m, x = build("residual_mlp")
    gm = fp.capture(m, x)
    masked = fp.mask(gm, 0.95)
    small = fp.minimize(masked)
    rep = fp.verify(masked, small)
    assert rep.ok and rep.params[1] < rep.params[0] and rep.flops[1] <= rep.flops[0]


def test_the_checking_driver_skips_shapes_the_reference_refuses_and_yields_what_the_candidate_raises():
    import pytest

    from fxprune.compare import check
    from fxprune.errors import InputError

    def reference(xs):
        if xs[0].shape[0] == 3:
            raise InputError("the model does not take a batch of 3")
        return xs[0] * 2

    def candidate(xs):
        if xs[0].shape[0] == 4:
            raise RuntimeError("the candidate fails at 4")
        return xs[0] * 2 + (xs[0].shape[0] == 5)

    points = [(torch.ones(n, 2),) for n in (2, 3, 4, 5)]
    got = list(check(reference, candidate, points, skip=InputError))
    assert [p.index for p in got] == [0, 2, 3]  # 3: the reference refuses it, skipped
    assert got[0].failure(1e-9) is None and got[0].worst() == 0.0
    assert isinstance(got[1].error, RuntimeError) and got[1].diffs is None
    assert got[2].failure(1e-9).max_abs == 1.0
    with pytest.raises(InputError):  # within the required points the reference's error propagates
        list(check(reference, candidate, points, required=2, skip=InputError))
    with pytest.raises(ZeroDivisionError):  # an error that is not `skip` is never swallowed
        list(check(lambda xs: 1 / 0, candidate, points, required=0, skip=InputError))


def test_count_flops_changes_nothing_of_a_model_in_train_mode():
    """FLOPs are counted on an eval-mode forward: BatchNorm's running statistics and the dropout RNG stay as they
    were (the cycle counts the dense model's FLOPs before it fingerprints it for a checkpoint), modes come back."""
    from fxprune.verify import count_flops

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 2))
    m.train()
    m[2].eval()
    x = torch.randn(5, 3)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    rng = torch.get_rng_state()
    assert count_flops(m, (x,)) == 2 * 5 * (3 * 4 + 4 * 2)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert [mod.training for mod in m.modules()] == [True, True, True, False, True]


def test_count_flops_of_a_model_passing_a_view_of_its_weight_to_a_submodule():
    """Mamba hands ``conv1d.weight.view(...)`` to a kernel module: under ``no_grad`` that view requires grad with no
    grad_fn, and FlopCounterMode's module tracker raised AssertionError on it (the cycle's first step, on every
    Mamba). The parameters still require grad afterwards."""
    from fxprune.verify import count_flops

    class MatMul(nn.Module):
        def forward(self, x, w):
            return x @ w

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w, self.mm = nn.Parameter(torch.randn(4, 3)), MatMul()

        def forward(self, x):
            return self.mm(x, self.w.view(4, 3))

    net = Net()
    assert count_flops(net, (torch.randn(2, 4),)) == 2 * 2 * 4 * 3
    assert net.w.requires_grad
