"""BatchNorm running statistics re-estimated from the batches a loop trained on (fxprune.interop.batchnorm), and
fp.squeeze_release doing so after every ``train`` call."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import update_bn

import fxprune as fp
from fxprune.errors import InputError
from fxprune.interop.batchnorm import BatchRecorder, recalibrate_batchnorm


def _net(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3), nn.Dropout(dropout), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 3), nn.BatchNorm1d(3))


def _batches(k: int, n: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, 1, 8, 8, generator=g) * (1 + i) for i in range(k)]


def _stats(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items() if "running" in k}


def test_equals_torch_update_bn_on_the_same_batches():
    m, batches = _net(), _batches(5)
    ref = copy.deepcopy(m)
    update_bn(batches, ref)  # the whole model in train mode: the same here, the net has no dropout at p=0
    assert recalibrate_batchnorm(m, [((b,), {}) for b in batches]) == 5
    got, want = _stats(m), _stats(ref)
    assert got.keys() == want.keys() and len(got) == 6
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)


def test_dropout_is_off_modes_momentum_weights_and_counts_are_kept():
    m = _net(dropout=0.5)
    m[2].momentum = 0.3
    m.train()
    m[7].eval()  # a mixed-mode model: every module's own mode comes back
    m(_batches(1)[0])  # num_batches_tracked moves off 0
    params = {k: v.clone() for k, v in m.named_parameters()}
    tracked = {k: v.clone() for k, v in m.state_dict().items() if k.endswith("num_batches_tracked")}
    modes = [mod.training for mod in m.modules()]
    batches = [((b,), {}) for b in _batches(4)]
    recalibrate_batchnorm(m, batches)
    first = _stats(m)
    recalibrate_batchnorm(m, batches)  # dropout off: the same statistics again, whatever the RNG does
    assert all(torch.equal(first[k], v) for k, v in _stats(m).items())
    assert [mod.training for mod in m.modules()] == modes and m[2].momentum == 0.3 and m[5].momentum == 0.1
    assert all(torch.equal(params[k], v) for k, v in m.named_parameters())
    assert all(torch.equal(tracked[k], m.state_dict()[k]) for k in tracked)
    # without dropout's scaling the statistics are those of the eval-mode dropout: equal to update_bn at p=0
    ref = _net(dropout=0.0)
    ref.load_state_dict(m.state_dict())
    update_bn([b for (b,), _ in batches], ref)
    for k, v in _stats(ref).items():
        torch.testing.assert_close(first[k], v, rtol=1e-6, atol=1e-7)


def test_a_failing_call_restores_the_running_statistics():
    m = _net()
    before = _stats(m)
    with pytest.raises(RuntimeError):
        recalibrate_batchnorm(m, [((b,), {}) for b in _batches(2)] + [((torch.randn(2, 5, 8, 8),), {})])
    assert all(torch.equal(before[k], v) for k, v in _stats(m).items())
    assert m[2].momentum == 0.1


def test_nothing_to_do_without_batchnorm_or_batches():
    lin = nn.Sequential(nn.Linear(3, 3))
    assert recalibrate_batchnorm(lin, [((torch.randn(2, 3),), {})]) == 0
    m = _net()
    before = _stats(m)
    assert recalibrate_batchnorm(m, []) == 0
    assert all(torch.equal(before[k], v) for k, v in _stats(m).items())


def test_sync_batchnorm_is_left_alone():
    m = nn.Sequential(nn.Linear(3, 4), nn.SyncBatchNorm(4))
    before = _stats(m)
    assert recalibrate_batchnorm(m, [((torch.randn(5, 3),), {})]) == 0
    assert all(torch.equal(before[k], v) for k, v in _stats(m).items())


class _Kw(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin, self.bn = nn.Linear(3, 4), nn.BatchNorm1d(4)

    def forward(self, x, *, scale=1.0):
        return self.bn(self.lin(x) * scale)


def test_recorder_keeps_copies_of_the_last_train_mode_calls_with_their_keywords():
    m = _Kw()
    xs = [torch.randn(6, 3) for _ in range(5)]
    with BatchRecorder(m, 3) as rec:
        m.train()
        for i, x in enumerate(xs[:4]):
            m(x, scale=float(i))
        m.eval()
        m(xs[4])  # eval-mode calls are not training batches
        xs[3].zero_()  # the loop reusing its buffer does not change what was recorded
    m.train()
    m(xs[0])  # after the block nothing is recorded
    assert len(rec.batches) == 3
    assert [kw["scale"] for _, kw in rec.batches] == [1.0, 2.0, 3.0]
    assert rec.batches[-1][0][0].abs().sum() > 0 and not rec.batches[-1][0][0].requires_grad
    recalibrate_batchnorm(m, rec.batches)
    want = torch.stack([(m.lin(a) * kw["scale"]).mean(0) for (a,), kw in rec.batches]).mean(0)
    torch.testing.assert_close(m.bn.running_mean, want.detach())
    with pytest.raises(InputError, match="batches"):
        BatchRecorder(m, 0)


class _JumpLoop:
    """A loop whose last steps move the weights faster than BatchNorm's running averages follow: the conv
    weights are scaled by 3 before the last 12 train-mode forwards. Keeps the batches of its last call."""

    def __init__(self) -> None:
        self.last: list[torch.Tensor] = []
        self.checked = 0
        self.lagging = 0

    def train(self, m: nn.Module) -> None:
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        m.train()
        g = torch.Generator().manual_seed(7)
        self.last = [torch.randn(16, 1, 8, 8, generator=g) for _ in range(20)]
        for i, x in enumerate(self.last):
            if i == 8:
                with torch.no_grad():
                    for p in m.parameters():
                        if p.dim() == 4:
                            p.mul_(3.0)
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()

    @torch.no_grad()
    def evaluate(self, m: nn.Module) -> float:
        if not self.last:  # the dense model, as the user gave it
            return 1.0
        ref = copy.deepcopy(m)
        for mod in ref.modules():
            if isinstance(mod, nn.Dropout):
                mod.p = 0.0
        update_bn(self.last[-16:], ref)  # what the statistics are for the weights training ended with
        fits = all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(_stats(m).values(), _stats(ref).values()))
        self.checked += fits
        self.lagging += not fits
        return 1.0


@pytest.mark.parametrize("bn_batches", [16, 0])
def test_the_cycle_recalibrates_after_every_train_call(bn_batches):
    loop = _JumpLoop()
    res = fp.squeeze_release(_net(dropout=0.2), (torch.randn(4, 1, 8, 8),), train=loop.train, evaluate=loop.evaluate,
                             cycles=2, mask_steps=1, sparsity=0.5, lasso=0, bn_batches=bn_batches, progress=False)
    assert len(res.history) == 2
    # per cycle the minimized model (after the mask step's train call) and the fine-tuned one
    assert loop.checked + loop.lagging == 4
    if bn_batches:  # every model evaluated holds the statistics of the weights its training ended with
        assert loop.checked == 4
    else:  # the running averages as training left them lag behind the jump
        assert loop.lagging == 4


def test_bad_bn_batches():
    with pytest.raises(InputError, match="bn_batches"):
        fp.squeeze_release(_net(), (torch.randn(2, 1, 8, 8),), train=lambda m: m, evaluate=lambda m: 1.0,
                           bn_batches=-1, progress=False)


def test_trainer_batches_recalibrate_a_transformers_resnet(tmp_path, monkeypatch):
    """transformers' Trainer calls the model with keywords (pixel_values, labels): the batches it trained on
    re-estimate the BatchNorms of transformers' ResNet after each of its train calls, and evaluate sees them."""
    transformers = pytest.importorskip("transformers", reason="the model and the Trainer come from transformers")
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (dev dependency)")
    import fxprune.cycle as cycle

    cfg = transformers.ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                    layer_type="basic", num_labels=4)
    torch.manual_seed(0)
    model = transformers.ResNetForImageClassification(cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 16, 16, generator=g)
    y = x.flatten(1)[:, :4].argmax(1)
    rows = [{"pixel_values": xi, "labels": yi} for xi, yi in zip(x, y)]
    used: list[tuple[int, bool]] = []
    real = cycle.recalibrate_batchnorm

    def spy(m, batches):
        batches = list(batches)
        used.append((real(m, batches), all("pixel_values" in kw and "labels" in kw for _, kw in batches)))
        return used[-1][0]

    monkeypatch.setattr(cycle, "recalibrate_batchnorm", spy)
    seen: list[dict[str, torch.Tensor]] = []

    def train(m):
        args = transformers.TrainingArguments(output_dir=str(tmp_path), num_train_epochs=2, per_device_train_batch_size=8,
                                              learning_rate=1e-2, lr_scheduler_type="constant", report_to=[],
                                              save_strategy="no", use_cpu=True, logging_strategy="no", disable_tqdm=True)
        transformers.Trainer(model=m, args=args, train_dataset=rows).train()

    @torch.no_grad()
    def evaluate(m):
        seen.append({k: v.clone() for k, v in m.state_dict().items() if k.endswith("running_mean")})
        m.eval()
        return float((m(x).logits.argmax(-1) == y).float().mean())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fp.squeeze_release(model, (x[:4],), train=train, evaluate=evaluate, cycles=1, mask_steps=1,
                                 sparsity=0.5, tolerance=1.0, progress=False)
    assert used == [(16, True), (16, True)]  # 16 steps of 8 per call: each call's last 16 batches, keywords kept
    assert type(res.module) is transformers.ResNetForImageClassification
    assert len(seen) == 3 and seen[0].keys() == seen[2].keys()
