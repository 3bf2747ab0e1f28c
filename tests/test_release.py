"""release: only the exact zeros of kept weights change, seeded, calibrated; squeeze_release: the cycle driver."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune as fp
from conftest import snapshot


def _masked(sparsity=0.7):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(32, 8)
    return fp.mask(fp.capture(net, (x,)), sparsity, scope="layer"), x


def test_release_fills_only_the_zeros_and_is_pure():
    gm, x = _masked()
    before = snapshot(gm)
    freed = fp.release(gm, scale=0.05, seed=3)
    rep = fp.ReleaseReport.of(freed)
    assert snapshot(gm) == before
    assert "fxprune_masks" not in freed.meta and "fxprune_masks" in gm.meta
    total = 0
    for name, p in gm.named_parameters():
        q = freed.get_parameter(name)
        zero = p == 0
        if p.dim() >= 2:
            assert (q[zero] != 0).all() and torch.equal(q[~zero], p[~zero])
            total += int(zero.sum())
            alive = p[~zero]
            assert q[zero].std() < 0.2 * alive.std()  # small, relative to the surviving weights
        else:
            assert torch.equal(q, p)  # biases are not released
    assert rep.total == total == sum(rep.released.values())
    assert rep.deviation is not None and rep.deviation > 0  # measured on the capture's example inputs
    assert "released" in str(rep)


def test_release_is_deterministic_per_seed():
    gm, _ = _masked()
    a, b, c = fp.release(gm, seed=1), fp.release(gm, seed=1), fp.release(gm, seed=2)
    assert snapshot(a) == snapshot(b)
    assert snapshot(a) != snapshot(c)


@pytest.mark.parametrize("target", [0.01, 0.1])
def test_release_calibrates_to_a_target_output_change(target):
    gm, x = _masked()
    freed = fp.release(gm, calibration=(x,), target=target)
    rep = fp.ReleaseReport.of(freed)
    with torch.no_grad():
        a, b = gm(x), freed(x)
    assert (b - a).norm() / a.norm() == pytest.approx(target, rel=0.05)
    assert rep.deviation == pytest.approx(target, rel=0.05)


def test_release_after_minimize_and_bad_arguments():
    gm, x = _masked(0.9)
    small = fp.minimize(gm)
    freed = fp.release(small)
    rep = fp.ReleaseReport.of(freed)
    assert {k: v.shape for k, v in freed.state_dict().items()} == {k: v.shape for k, v in small.state_dict().items()}
    with pytest.raises(fp.InputError, match="calibration"):
        fp.release(small, target=0.1)
    with pytest.raises(fp.InputError, match="scale"):
        fp.release(small, scale=-1.0)
    with pytest.raises(fp.InputError, match="GraphModule"):
        fp.release("model.pt")


def test_held_masks_survive_release_input():
    gm, x = _masked()
    held = fp.hold_masks_(fp.mask(gm, 0.8, scope="layer"))
    freed = fp.release(held)
    rep = fp.ReleaseReport.of(freed)
    assert rep.total > 0 and not any("parametrizations" in n for n, _ in freed.named_parameters())


# ---- the cycle driver -----------------------------------------------------------------------
def _task():
    torch.manual_seed(0)
    x = torch.randn(256, 10)
    y = (x[:, :3].sum(1) > 0).long()
    net = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2))
    calls = []

    def train(m):
        calls.append(type(m).__name__)
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        for _ in range(30):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()

    def evaluate(m):
        with torch.no_grad():
            return (m(x).argmax(1) == y).float().mean().item()

    train(net)
    return net, x, train, evaluate, calls


def test_squeeze_release_shrinks_and_keeps_the_best_model_within_tolerance():
    net, x, train, evaluate, calls = _task()
    before = snapshot(net)
    lines = []
    res = fp.squeeze_release(net, (x[:4],), train=train, evaluate=evaluate, cycles=3, sparsity=0.8, mask_steps=2,
                             tolerance=0.05, progress=lines.append)
    assert snapshot(net) == before  # the user's model is not changed
    assert [h["cycle"] for h in res.history] == [1, 2, 3]
    assert all(h["params"] <= res.dense["params"] for h in res.history)
    assert res.history[-1]["params"] < res.dense["params"]
    assert res.best_cycle is not None
    best = res.history[res.best_cycle - 1]
    assert best["accuracy"] >= res.dense["accuracy"] - 0.05
    assert fp.verify(res.module, res.module, (x[:4],)).params[0] == best["params"]
    assert evaluate(res.module) == pytest.approx(best["accuracy"])
    assert len(calls) == 3 * 2 + 3 + 1  # masked fine-tunes, released fine-tunes, the dense training
    assert all(h["accuracy"] == max(h["accuracy_minimized"], h["accuracy_released"]) for h in res.history)
    assert any("minimize" in s for s in lines) and "compression" in res.table() and res.compression > 1


def test_squeeze_release_returns_the_dense_model_when_no_cycle_is_good_enough():
    net, x, train, evaluate, _ = _task()
    res = fp.squeeze_release(net, (x[:4],), train=lambda m: None, evaluate=evaluate, cycles=1, sparsity=0.99,
                             mask_steps=1, tolerance=0.0, progress=False)
    assert res.best_cycle is None and res.compression == 1.0


def test_squeeze_release_rejects_bad_arguments():
    net, x, train, evaluate, _ = _task()
    with pytest.raises(fp.InputError, match="cycles"):
        fp.squeeze_release(net, (x,), train=train, evaluate=evaluate, cycles=0)
    with pytest.raises(fp.InputError, match="callables"):
        fp.squeeze_release(net, (x,), train=None, evaluate=evaluate)


@pytest.mark.parametrize("release", [True, False])
def test_squeeze_release_without_release_holds_the_zeros_left(release):
    """release=False (the ablation): the fine-tune after minimize sees the zeros minimize left and keeps them; with
    release they are noise when that fine-tune starts."""
    net, x, train, evaluate, _ = _task()
    seen = []

    def spy(m):
        w = {n: p.detach().clone() for n, p in m.named_parameters() if p.dim() >= 2}
        train(m)
        after = {n: p.detach() for n, p in m.named_parameters() if p.dim() >= 2}
        seen.append((sum(int((v == 0).sum()) for v in w.values()),
                     all(bool((after[n][v == 0] == 0).all()) for n, v in w.items())))

    fp.squeeze_release(net, (x[:4],), train=spy, evaluate=evaluate, cycles=2, sparsity=0.8, mask_steps=1,
                       tolerance=1.0, release=release, progress=False)
    post = seen[1::2]  # per cycle: one masked fine-tune, then the one after minimize
    assert len(post) == 2
    if release:
        assert all(zeros == 0 for zeros, _ in post)
    else:
        assert all(zeros > 0 and kept for zeros, kept in post)


def test_release_returns_the_kind_it_was_given_and_the_tuple_api_is_deprecated():
    """release returns a GraphModule for a GraphModule (report: ReleaseReport.of); the old tuple API still works
    on it with a DeprecationWarning (unpacking, .module, .report) and on no other GraphModule; the user's own
    class stays exactly its class; something release did not return has no report (InputError)."""
    gm, x = _masked()
    freed = fp.release(gm, seed=0)
    assert isinstance(freed, torch.fx.GraphModule) and fp.ReleaseReport.of(freed).total > 0
    with pytest.warns(DeprecationWarning, match="ReleaseReport.of"):
        module, rep = freed
    assert module is freed and rep is fp.ReleaseReport.of(freed)
    with pytest.warns(DeprecationWarning):
        assert freed.module is freed and freed.report is rep
    with pytest.raises(TypeError):
        iter(gm)  # the input's class is its own: untouched
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        net[0].weight[:, :3] = 0
    mine = fp.release(net, seed=0)
    assert type(mine) is nn.Sequential and fp.ReleaseReport.of(mine).released == {"0.weight": 48}
    with pytest.raises(fp.InputError, match="did not come from fp.release"):
        fp.ReleaseReport.of(net)
