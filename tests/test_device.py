"""fxprune on the device the model lives on: every public path takes a model on CUDA (or any device) as it is, runs
there and gives back a model on that device, equal to the original. The ``cpu`` cases run everywhere; the ``cuda``
cases skip where no CUDA device is present (CI has none): run this file on a GPU machine.
"""
from __future__ import annotations

import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune as fp
from fxprune import zoo
from fxprune.verify import count_params

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="needs a CUDA device (run on a GPU machine)"))]


def on(m: nn.Module) -> set[str]:
    """The device types that ``m``'s parameters and buffers are on."""
    return {t.device.type for t in [*m.parameters(), *m.buffers()]}


def rel(ref: torch.Tensor, got: torch.Tensor) -> float:
    return float((ref - got).abs().max() / ref.abs().max().clamp_min(1e-30))


def cnn_with_dead_channels(device: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    model, (x,) = zoo.build("cnn")
    with torch.no_grad():  # channels 2 and 5 of the ReLU branch dead: zero filter, negative bias
        model.b2.weight[[2, 5]] = 0
        model.b2.bias[[2, 5]] = -1.0
    return model.double().to(device), (x.double().to(device),)


@pytest.mark.parametrize("device", DEVICES)
def test_minimize_a_traced_cnn_on_its_device(device):
    model, (x,) = cnn_with_dead_channels(device)
    small = fp.minimize(model, (x,))
    assert on(small) == {device}
    assert count_params(small) < count_params(model)
    for b in (2, 5):
        xb = torch.randn(b, 3, 8, 8, dtype=torch.float64, device=device)
        with torch.no_grad():
            assert rel(model(xb), small(xb)) <= 1e-9


@pytest.mark.parametrize("device", DEVICES)
def test_minimize_module_on_an_exported_transformer_on_its_device(device):
    pytest.importorskip("transformers", reason="the model comes from transformers (dev dependency)")
    model, (ids,) = zoo.build("bert", head=True)
    zoo.plant_dead_stream(model, "bert", [3, 7])
    model = model.double().to(device)
    ids = ids.to(device)
    small = fp.minimize_module(model, (ids,))
    assert type(small) is type(model) and on(small) == {device}
    assert count_params(small) < count_params(model)
    for shape in ((1, 8), (3, 13), (2, 5)):
        x = torch.randint(0, 100, shape, device=device)
        with torch.no_grad():
            assert rel(model(x).logits, small(x).logits) <= 1e-9, shape


@pytest.mark.parametrize("device", DEVICES)
def test_causal_lm_as_loaded_on_its_device_generates_the_same(device):
    transformers = pytest.importorskip("transformers", reason="the model comes from transformers (dev dependency)")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64)  # use_cache on
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    with torch.no_grad():
        for block in model.transformer.h:  # 6 dead MLP units per block
            block.mlp.c_fc.weight[:, :6] = 0
            block.mlp.c_fc.bias[:6] = 0
    model = model.to(device)
    small = fp.minimize_module(model, (torch.randint(3, 100, (2, 12), device=device),))
    assert type(small) is type(model) and small.config.use_cache and on(small) == {device}
    assert count_params(model) - count_params(small) >= 2 * 6 * (32 + 1 + 32)
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
    for n in (5, 11):
        prompt = torch.randint(3, 100, (1, n), device=device)
        assert torch.equal(model.generate(prompt, **kw), small.generate(prompt, **kw))


@pytest.mark.parametrize("device", DEVICES)
def test_mask_release_and_compensated_norms_on_the_device(device):
    pytest.importorskip("transformers", reason="the model comes from transformers (dev dependency)")
    model, (x,) = zoo.build("vit", head=True)
    model = model.double().to(device)
    x = x.double().to(device)
    gm = fp.capture(model, (x,))
    masked = fp.mask(gm, 0.5)
    small = fp.minimize(masked)
    released = fp.release(small, 0.01, seed=0)
    comp = fp.compensate_layernorm(small)
    for m in (masked, small, released, comp):
        assert on(m) == {device}
    with torch.no_grad():
        ref = masked(x).logits
        for m in (small, comp):
            assert rel(ref, m(x).logits) <= 1e-9
    assert fp.ReleaseReport.of(released).total > 0
    assert fp.verify(masked, small, (x,)).ok


@pytest.mark.parametrize("device", DEVICES)
def test_group_lasso_on_the_device(device):
    model = zoo.ResidualMLP().to(device)
    x = torch.randn(8, 12, device=device)
    reg = fp.GroupLasso(model, (x,), strength=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with reg.attach(model):
        for _ in range(20):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    assert on(model) == {device}
    norms = reg.norms(model)  # bookkeeping: a few numbers per group channel, on the CPU
    assert int((norms == 0).sum()) > 0 and torch.isfinite(norms).all()  # exact zeros
    penalty = fp.group_lasso(model, (x,))
    assert penalty.device.type == device and torch.isfinite(penalty)


@pytest.mark.parametrize("device", DEVICES)
def test_squeeze_release_with_batchnorm_and_a_checkpoint_on_the_device(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 16), nn.BatchNorm1d(16),
                          nn.ReLU(), nn.Linear(16, 3)).to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 12, generator=g)
    y = ((x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long())
    x, y = x.to(device), y.to(device)
    stats = []

    def train(m: nn.Module) -> None:
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        m.train()
        before = [b.running_mean.clone() for b in m.modules() if isinstance(b, nn.BatchNorm1d)]
        for idx in torch.randperm(len(x), device=device).split(32):
            opt.zero_grad()
            F.cross_entropy(m(x[idx]), y[idx]).backward()
            opt.step()
        after = [b.running_mean for b in m.modules() if isinstance(b, nn.BatchNorm1d)]
        stats.append(bool(before) and all(not torch.equal(a, b) for a, b in zip(before, after)))

    def evaluate(m: nn.Module) -> float:
        m.eval()
        with torch.no_grad():
            return float((m(x).argmax(1) == y).float().mean())

    with tempfile.TemporaryDirectory() as d:
        res = fp.squeeze_release(model, (x[:8],), train=train, evaluate=evaluate, cycles=2, sparsity=0.5,
                                 progress=False, checkpoint_dir=d, tolerance=1.0)
    assert stats and all(stats)  # BatchNorm trains in every call
    assert type(res.module) is nn.Sequential and on(res.module) == {device}
    assert count_params(res.module) < count_params(model)
    res.module.eval()
    with torch.no_grad():
        assert res.module(x[:5]).shape == (5, 3)


@pytest.mark.parametrize("device", DEVICES)
def test_saved_and_loaded_from_the_device(device):
    model, (x,) = cnn_with_dead_channels(device)
    small = fp.minimize_module(model, (x,))
    with tempfile.TemporaryDirectory() as d:
        fp.save(small, d + "/small")
        back = fp.load(d + "/small", lambda: zoo.SmallCNN().double())
    back = back.to(device).eval()
    with torch.no_grad():
        assert rel(small(x), back(x)) == 0.0


class _Gating(nn.Module):
    """gMLP's gating unit: the LayerNorm's kept outputs are selected on the device (an index constant there)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.norm, self.proj, self.fc2 = nn.Linear(16, 32), nn.LayerNorm(16), nn.Linear(8, 8), nn.Linear(16, 16)

    def forward(self, x):
        u, v = F.gelu(self.fc1(x)).chunk(2, dim=-1)
        return x + self.fc2(u * self.proj(self.norm(v).transpose(-1, -2)).transpose(-1, -2))


@pytest.mark.parametrize("device", DEVICES)
def test_a_split_norm_selects_on_the_device(device):
    torch.manual_seed(0)
    m = _Gating().double()
    with torch.no_grad():
        m.fc1.weight[[0, 1, 2, 16, 17]] = 0  # pairs 0, 1 dead; unit 2 dead in u only
        m.fc1.bias[[0, 1, 2, 16, 17]] = 0
    m = m.to(device)
    small = fp.minimize(m, (torch.randn(2, 8, 16, dtype=torch.float64, device=device),))
    assert on(small) == {device} and small.get_parameter("fc1.weight").shape == (27, 16)
    x = torch.randn(3, 8, 16, dtype=torch.float64, device=device)
    with torch.no_grad():
        assert rel(m(x), small(x)) <= 1e-9


@pytest.mark.parametrize("device", DEVICES)
def test_example_inputs_from_the_cpu_follow_a_model_on_the_device(device):
    """A DataLoader's batch stays on the CPU while ``model.cuda()`` or a ``Trainer`` put the model on the GPU:
    fxprune places such inputs on the model's device, as the Trainer does with each batch."""
    model, (x,) = cnn_with_dead_channels(device)
    xc = x.cpu()
    small, graph = fp.minimize_module(model, (xc,)), fp.minimize(model, (xc,))
    assert on(small) == {device} and on(graph) == {device}
    assert fp.verify(model, small, (xc,)).ok
    with torch.no_grad():
        assert rel(model(x), small(x)) <= 1e-9 and rel(model(x), graph(x)) <= 1e-9
    pytest.importorskip("transformers", reason="the model comes from transformers (dev dependency)")
    bert, (ids,) = zoo.build("bert", head=True)
    zoo.plant_dead_stream(bert, "bert", [3, 7])
    bert = bert.double().to(device)
    batch = dict(input_ids=ids.cpu(), attention_mask=torch.ones_like(ids).cpu())  # the collator's dict, on the CPU
    slim = fp.minimize_module(bert, batch)
    assert type(slim) is type(bert) and on(slim) == {device} and count_params(slim) < count_params(bert)
    on_dev = {k: v.to(device) for k, v in batch.items()}
    with torch.no_grad():
        assert rel(bert(**on_dev).logits, slim(**on_dev).logits) <= 1e-9


@pytest.mark.parametrize("device", DEVICES)
def test_squeeze_release_when_train_moves_each_copy_to_the_device(device):
    """The user's model on the CPU and a loop that puts the module it trains on the GPU (as a ``Trainer`` does with
    every module it is given): each cycle trains there, and the model comes back on the CPU, as it came."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 3))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 12, generator=g)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()
    where = []

    def train(m: nn.Module) -> None:
        m.to(device)
        where.append(on(m))
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        m.train()
        xd, yd = x.to(device), y.to(device)
        for idx in torch.randperm(len(x)).split(32):
            opt.zero_grad()
            F.cross_entropy(m(xd[idx]), yd[idx]).backward()
            opt.step()

    def evaluate(m: nn.Module) -> float:
        m.eval()
        d = next(m.parameters()).device
        with torch.no_grad():
            return float((m(x.to(d)).argmax(1).cpu() == y).float().mean())

    res = fp.squeeze_release(model, (x[:8],), train=train, evaluate=evaluate, cycles=2, sparsity=0.5, progress=False,
                             tolerance=1.0)
    assert where and all(w == {device} for w in where)
    assert type(res.module) is nn.Sequential and on(res.module) == {"cpu"}
    assert count_params(res.module) < count_params(model)
    assert res.best_cycle is not None and 0.0 <= evaluate(res.module) <= 1.0


def _fp32_settings() -> dict[str, str]:
    out = {}
    for name in ("cuda.matmul", "cudnn.conv", "cudnn.rnn", "mkldnn.matmul", "mkldnn.conv"):
        backend, op = name.split(".")
        owner = getattr(getattr(torch.backends, backend, None), op, None)
        if owner is not None and hasattr(owner, "fp32_precision"):
            out[name] = owner.fp32_precision
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_float32_checks_run_in_ieee_float32_whatever_the_process_set(device):
    """cuDNN convolutions use TF32 by default on Ampere-or-later GPUs, and users turn it on for matrix products: the
    float32 self-check of minimize and verify compare in IEEE float32 (TF32's rounding is no rewrite error), and the
    process's settings come back as they were."""
    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("torch before 2.9 has no per-op fp32_precision settings")
    model, (x,) = cnn_with_dead_channels(device)
    model, x = model.float(), x.float()
    saved = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        before = _fp32_settings()
        small = fp.minimize_module(model, (x,))  # raised EquivalenceError on an H200 before (cuDNN TF32)
        assert fp.verify(model, small, (x,)).ok
        assert _fp32_settings() == before
        with torch.no_grad(), fp.compare.ieee_float32():
            assert _fp32_settings()["cuda.matmul"] == "ieee"
            assert rel(model(x), small(x)) <= 1e-5
        assert _fp32_settings() == before
    finally:
        torch.backends.cuda.matmul.fp32_precision = saved


def test_every_model_run_of_fxprune_computes_float32_in_ieee():
    """What fxprune runs the model for (capture's reference, the constants a pass folds, the self-check, verify)
    computes in IEEE float32 even when the process turned TF32 on; the user's own calls keep the setting. Read
    from inside the model's forward on the CPU, so that this holds where no GPU is (the H200 run showed a capture
    reference computed in TF32 failing minimize's check of a float32 CNN)."""
    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("torch before 2.9 has no per-op fp32_precision settings")
    seen: list[str] = []

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if type(x) is torch.Tensor and not torch.compiler.is_compiling():  # a run, not a trace
                seen.append(torch.backends.cuda.matmul.fp32_precision)
            return self.fc2(torch.relu(self.fc1(x)))

    torch.manual_seed(0)
    model = Probe()
    with torch.no_grad():
        model.fc1.weight[:3] = 0
        model.fc1.bias[:3] = -1.0
    x = torch.randn(3, 4)
    saved = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        graph = fp.minimize(model, (x,))
        small = fp.minimize_module(model, (x,))
        assert fp.verify(model, small, (x,)).ok and fp.verify(model, graph, (x,)).ok
        n = len(seen)
        model(x)  # the user's call: their setting
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    finally:
        torch.backends.cuda.matmul.fp32_precision = saved
    assert n > 0 and set(seen[:n]) == {"ieee"}, seen
    assert seen[n:] == ["tf32"]
    assert small.fc1.weight.shape == (5, 4)
