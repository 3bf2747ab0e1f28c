"""passes.modes.trainable: an eval-mode capture's BatchNorm and dropout calls become modules again, so that the graph
trains as the model does (batch statistics, running statistics updated, dropout drawn), for symbolic traces and
torch.export captures, minimized or not; pure; exact in eval mode; what it cannot give back it names."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxprune.errors import EquivalenceError
from fxprune.graph.capture import capture
from fxprune.passes.minimize import minimize
from fxprune.passes.modes import trainable


class Net(nn.Module):
    def __init__(self, functional_dropout: bool = False) -> None:
        super().__init__()
        self.functional_dropout = functional_dropout
        self.conv, self.bn = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.bn1d = nn.BatchNorm1d(8, momentum=None)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.bn1d(F.relu(self.bn(self.conv(x))).mean((2, 3)))
        h = F.dropout(h, 0.3, self.training) if self.functional_dropout else self.drop(h)
        return self.head(h)


def _trained_step(m: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    m.train()
    torch.manual_seed(1)
    y = m(x)
    return y, {k: v.clone() for k, v in m.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("method", ["symbolic", "export"])
@pytest.mark.parametrize("functional_dropout", [False, True])
def test_the_graph_trains_as_the_model_does(method, functional_dropout):
    torch.manual_seed(0)
    model, x = Net(functional_dropout).eval(), torch.randn(6, 1, 5, 5)
    gm = capture(model, (x,), method=method)
    out, kept = trainable(minimize(gm, (x,)), (x,))
    assert kept == []
    assert sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in out.modules()) == 2
    assert any(isinstance(m, nn.Dropout) for m in out.modules())
    assert out.get_submodule("bn1d").momentum is None  # recorded as 0.0 by the eval-mode capture
    # in train mode: the same batch statistics, dropout draws and running-statistics updates as the model
    want, want_stats = _trained_step(copy.deepcopy(model), x)
    got, got_stats = _trained_step(out, x)
    assert torch.allclose(got, want, atol=1e-6)
    for k, v in want_stats.items():
        assert torch.allclose(got_stats[k], v, atol=1e-6), k
    out.eval()  # and back in eval mode, with the updated statistics, as the model in eval mode
    trained = copy.deepcopy(model)
    _trained_step(trained, x)
    with torch.no_grad():
        assert torch.allclose(out(x), trained.eval()(x), atol=1e-6)


def test_pure_and_exact_in_eval_mode_at_another_batch_size():
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(6, 1, 5, 5)
    gm = minimize(capture(model, (x,), method="export"), (x,))
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    meta = {n.name: dict(n.meta) for n in gm.graph.nodes}
    code = gm.code
    out, _ = trainable(gm, (x,))
    assert gm.code == code and all(torch.equal(state[k], v) for k, v in gm.state_dict().items())
    assert {n.name: dict(n.meta) for n in gm.graph.nodes}.keys() == meta.keys()
    assert all(n.meta.keys() == meta[n.name].keys() for n in gm.graph.nodes)
    assert not any(t.data_ptr() == u.data_ptr() for t in gm.state_dict().values() for u in out.state_dict().values())
    out.eval()
    with torch.no_grad():
        for xi in (x, torch.randn(3, 1, 5, 5)):
            assert torch.allclose(out(xi), model(xi), atol=1e-6)
    out.train()
    out(x)
    assert all(torch.equal(state[k], v) for k, v in gm.state_dict().items())  # training the result leaves gm alone


def test_statistics_read_elsewhere_stay_and_are_named():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.zeros(4))
            self.register_buffer("var", torch.ones(4))

        def forward(self, x):
            return F.batch_norm(x, self.mean, self.var, training=False) + self.mean

    x = torch.randn(3, 4)
    gm = torch.fx.symbolic_trace(Shared())
    out, kept = trainable(gm, (x,))
    assert kept == ["batch_norm"] and not any(isinstance(m, nn.BatchNorm1d) for m in out.modules())


def test_a_wrong_rewrite_is_refused(monkeypatch):
    import fxprune.passes.modes as modes

    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(6, 1, 5, 5)
    gm = minimize(capture(model, (x,), method="symbolic"), (x,))
    monkeypatch.setitem(modes._BATCH_NORMS, 4, lambda *a, **k: nn.BatchNorm2d(*a, **{**k, "eps": 1.0}))
    with pytest.raises(EquivalenceError, match="eval mode"):
        trainable(gm, (x,))


@pytest.mark.parametrize("method", ["symbolic", "export"])
def test_exact_in_float64_at_other_batch_sizes(method):
    """In eval mode the graph with its modes as modules is the same function, float64, at batches 6, 1 and 9."""
    torch.manual_seed(0)
    model, x = Net().double().eval(), torch.randn(6, 1, 5, 5, dtype=torch.float64)
    with torch.no_grad():  # statistics away from their initial values
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    out, _ = trainable(minimize(capture(model, (x,), method=method), (x,)), (x,))
    out.eval()
    with torch.no_grad():
        for xi in (x, torch.randn(1, 1, 5, 5, dtype=torch.float64), torch.randn(9, 1, 5, 5, dtype=torch.float64)):
            got, want = out(xi), model(xi)
            got = got[0] if isinstance(got, (tuple, list)) else got
            assert float((got - want).abs().max() / want.abs().max()) <= 1e-12
