"""squeeze_release(backoff=True), the default: a cycle whose model falls outside the tolerance is not built on; the
next cycle starts again from the best model so far with half the step (the mask's kept fraction square-rooted, the
lasso strength halved); a passing cycle doubles it back, and one that removed nothing doubles the lasso strength; a
resumed run does the same."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fxprune as fp
from fxprune.cycle import stepped
from fxprune.verify import count_params

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
import cycle_run  # noqa: E402

DENSE = count_params(cycle_run.build("fc"))


def _run(backoff: bool, passes, cycles: int = 3, sparsity: float = 0.9, epochs: int = 1, **kw):
    """The helper's FC net; ``passes(params)`` decides the accuracy evaluate reports (1 or 0), so that which
    cycles fail is fixed; the sizes of the models train receives are recorded."""
    x, y = cycle_run.data()
    sizes: list[int] = []

    def train(m):
        sizes.append(count_params(m))
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        m.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(x)).split(32):
                opt.zero_grad()
                F.cross_entropy(m(x[idx]), y[idx]).backward()
                opt.step()

    def evaluate(m):
        return 1.0 if passes(count_params(m)) else 0.0

    torch.manual_seed(0)
    model = cycle_run.build("fc")
    res = fp.squeeze_release(model, (x[:8],), train=train, evaluate=evaluate, cycles=cycles, sparsity=sparsity,
                             mask_steps=1, backoff=backoff, progress=False, **kw)
    return res, sizes, count_params(model)


def test_stepped_halves_the_step():
    assert stepped(0.9, 1e-3, 0) == (0.9, 1e-3)
    assert stepped(0.9, 1e-3, -1) == (0.9, pytest.approx(2e-3))
    assert stepped(0.9, 1e-3, -2) == (0.9, pytest.approx(4e-3))
    s, lam = stepped(0.9, 1e-3, 1)
    assert s == pytest.approx(1 - 0.1 ** 0.5) and lam == pytest.approx(5e-4)
    s, lam = stepped(0.9, 1e-3, 2)
    assert s == pytest.approx(1 - 0.1 ** 0.25) and lam == pytest.approx(2.5e-4)


def test_a_failed_cycle_restarts_from_the_best_model_with_half_the_step():
    res, sizes, dense = _run(True, passes=lambda p: p == DENSE)
    assert res.history[0]["params"] < dense  # cycle 1 compressed, and failed
    assert [h["passed"] for h in res.history] == [False, False, False]
    assert [h["step"] for h in res.history] == [0, 1, 2]
    assert [h["sparsity"] for h in res.history] == [pytest.approx(stepped(0.9, 0, k)[0]) for k in range(3)]
    assert [h["lasso"] for h in res.history] == [pytest.approx(fp.interop.lasso.DEFAULT_STRENGTH * 0.5 ** k)
                                                 for k in range(3)]
    # 2 train calls per cycle (one mask step, the release fine-tune): every cycle's first starts from the dense model
    assert sizes[0::2] == [dense] * 3
    assert res.best_cycle is None and count_params(res.module) == dense


def test_without_backoff_every_cycle_builds_on_the_one_before():
    res, sizes, dense = _run(False, passes=lambda p: p == DENSE)
    assert [h["step"] for h in res.history] == [0, 0, 0] and not any(h["passed"] for h in res.history)
    assert all(h["sparsity"] == 0.9 for h in res.history)
    assert sizes[2] == res.history[0]["params"] < dense  # cycle 2 started from cycle 1's model


def test_a_passing_cycle_is_built_on_and_a_later_failure_returns_to_it():
    gentle = dict(sparsity=0.7, epochs=20, lasso=1e-2)
    first, _, _ = _run(True, passes=lambda p: True, cycles=1, **gentle)
    cut = first.history[0]["params"]
    assert cut < DENSE
    res, sizes, _ = _run(True, passes=lambda p: p >= cut, **gentle)  # cycle 1 passes; smaller than it fails
    assert res.history[0]["passed"] and res.best_cycle == 1
    assert res.history[1]["params"] < cut and not res.history[1]["passed"]
    assert sizes[2] == cut and sizes[4] == cut  # cycles 2 and 3 start from cycle 1's model
    assert res.history[2]["step"] == 1
    assert count_params(res.module) == cut


def test_a_passing_cycle_that_removed_nothing_doubles_the_lasso_strength():
    res, _, _ = _run(True, passes=lambda p: True, sparsity=0.1, exclude=["0.*", "2.*"])  # the last layer only
    assert res.history[0]["params"] == DENSE
    assert [h["step"] for h in res.history[:2]] == [0, -1]
    assert res.history[1]["sparsity"] == 0.1
    assert res.history[1]["lasso"] == pytest.approx(2 * fp.interop.lasso.DEFAULT_STRENGTH)
    assert all(h["step"] >= -2 for h in res.history)


def test_a_cycle_that_fails_after_a_stalled_one_is_followed_by_half_the_schedules_step():
    """A passing cycle that removed nothing raises the lasso strength (step -1) but keeps the schedule's sparsity.
    When the next cycle fails at that sparsity (here: the first to mask whole channels), the one after it must ask
    less than the failed one: half the step (step 1), not the schedule's step again, which masked the same
    channels and failed the same way (timm's BiT in the flow: cycles 2 and 3 both at 5.14x, both outside)."""
    res, sizes, dense = _run(True, passes=lambda p: p == DENSE, sparsity=0.1)
    assert [(h["params"] == dense, h["passed"]) for h in res.history] == [(True, True), (False, False), (False, False)]
    assert [h["step"] for h in res.history] == [0, -1, 1]
    assert res.history[2]["sparsity"] == pytest.approx(stepped(0.1, 0, 1)[0])
    assert res.history[2]["sparsity"] < res.history[1]["sparsity"]
    assert res.history[2]["lasso"] == pytest.approx(fp.interop.lasso.DEFAULT_STRENGTH / 2)
    assert res.history[2]["params"] > res.history[1]["params"]  # fewer channels masked than in the failed cycle


def test_resume_after_failed_cycles_gives_the_same_model(tmp_path):
    whole, _, _ = _run(True, passes=lambda p: p == DENSE, checkpoint_dir=tmp_path / "whole")
    _run(True, passes=lambda p: p == DENSE, cycles=2, checkpoint_dir=tmp_path / "ck")
    resumed, sizes, dense = _run(True, passes=lambda p: p == DENSE, checkpoint_dir=tmp_path / "ck",
                                 resume=True)
    rows = lambda r: [{k: v for k, v in h.items() if not k.endswith("seconds")} for h in r.history]  # noqa: E731
    assert rows(resumed) == rows(whole) and sizes[0] == dense  # cycle 3 started from the dense model
    with pytest.raises(fp.CheckpointError, match="backoff"):
        _run(False, passes=lambda p: True, checkpoint_dir=tmp_path / "ck", resume=True)


def test_each_structure_reads_its_groups_once_and_every_use_gets_its_cycles_strength(monkeypatch):
    """The groups are the structure's: the cycle builds one GroupLasso per model structure it masks, not one per
    train phase, and each masking step trains with its cycle's strength (halved after the failed cycle 1; cycles
    1 and 2 start from the dense structure, whose groups are read once). The fine-tune after release trains
    without it (two train calls per cycle, one lasso)."""
    built, used = [], []
    real_init, real_attach = fp.GroupLasso.__init__, fp.GroupLasso.attach

    def init(self, *a, **k):
        built.append(1)
        real_init(self, *a, **k)

    def attach(self, model):
        used.append(self.strength)
        return real_attach(self, model)

    monkeypatch.setattr(fp.GroupLasso, "__init__", init)
    monkeypatch.setattr(fp.GroupLasso, "attach", attach)
    res, _, _ = _run(True, passes=lambda p: p == DENSE, cycles=2)
    assert [h["passed"] for h in res.history] == [False, False]
    assert len(built) == 1  # the dense structure's, used by both cycles' mask steps
    strength = fp.interop.lasso.DEFAULT_STRENGTH
    assert used == [pytest.approx(v) for v in (strength, strength / 2)]  # no lasso in the release fine-tunes
