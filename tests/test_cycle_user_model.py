"""fp.squeeze_release on the user's own model with an ordinary loop (``.train()``, AdamW, ``.eval()`` to evaluate):
a CNN with BatchNorm and residual blocks, and a transformers ViT. ``train``/``evaluate`` get the user's class,
BatchNorm's running statistics move in every fine-tuning call, the kept model is the user's class and smaller; a
class that cannot be kept goes the graph path with a warning."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune as fp
from fxprune.cycle import LITTLE, GraphPathWarning, LittleRemovedWarning, UntrainedWarning
from fxprune.verify import count_params


class Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class SmallResNet(nn.Module):
    def __init__(self, c: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.blocks = nn.Sequential(Residual(c), Residual(c))
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn(self.stem(x))))
        return self.head(self.drop(x.mean((2, 3))))


def _data(n: int = 96, shape=(1, 8, 8), classes: int = 4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *shape, generator=g)
    y = (x.flatten(1)[:, :classes].argmax(1))
    return x, y


class Loop:
    """An ordinary loop: ``.train()``, AdamW, cross-entropy; ``.eval()`` to evaluate. Records per call what it saw."""

    def __init__(self, x, y, logits=lambda out: out, epochs: int = 3, lr: float = 3e-3) -> None:
        self.x, self.y, self.logits, self.epochs, self.lr = x, y, logits, epochs, lr
        self.seen: list[type] = []
        self.bn_moved: list[bool] = []

    def train(self, m: nn.Module) -> None:
        self.seen.append(type(m))
        stats = {n: b.clone() for n, b in m.named_buffers() if n.endswith("running_mean")}
        opt = torch.optim.AdamW(m.parameters(), lr=self.lr)
        m.train()
        for _ in range(self.epochs):
            for idx in torch.randperm(len(self.x)).split(32):
                opt.zero_grad()
                F.cross_entropy(self.logits(m(self.x[idx])), self.y[idx]).backward()
                opt.step()
        if stats:
            now = dict(m.named_buffers())
            self.bn_moved.append(all(not torch.equal(now[n], v) for n, v in stats.items()))

    @torch.no_grad()
    def evaluate(self, m: nn.Module) -> float:
        self.seen.append(type(m))
        m.eval()
        return float((self.logits(m(self.x)).argmax(-1) == self.y).float().mean())


def test_cnn_with_batchnorm_and_an_ordinary_loop():
    torch.manual_seed(0)
    model, (x, y) = SmallResNet(), _data()
    loop = Loop(x, y, epochs=10, lr=1e-2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = fp.squeeze_release(model, (x[:8],), train=loop.train, evaluate=loop.evaluate, cycles=2, mask_steps=2,
                             sparsity=0.7, tolerance=1.0, progress=False)
    assert all(issubclass(t, SmallResNet) for t in loop.seen)  # the user's class (a parametrized subclass in train)
    assert len(loop.bn_moved) == 2 * (2 + 1) and all(loop.bn_moved)  # every fine-tuning call updated BatchNorm
    assert type(res.module) is SmallResNet and res.best_cycle is not None
    assert count_params(res.module) < res.dense["params"]
    assert res.history[-1]["params"] < res.history[0]["params"] or res.history[0]["compression"] > 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the user's model untouched
    # the kept model still trains as its class does: BatchNorm in train mode moves its statistics
    kept = res.module
    mean = kept.bn.running_mean.clone()
    kept.train()
    kept(x[:16])
    assert not torch.equal(kept.bn.running_mean, mean)


def test_a_wrapped_model_cycles_as_the_module_inside():
    """A model handed in inside nn.DataParallel (or torch.compile's wrapper): train/evaluate get the module inside's
    class, the result is that class, and the user's model is untouched."""
    torch.manual_seed(0)
    model, (x, y) = SmallResNet(), _data()
    loop = Loop(x, y, epochs=2, lr=1e-2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = fp.squeeze_release(nn.DataParallel(model), (x[:8],), train=loop.train, evaluate=loop.evaluate, cycles=1,
                             mask_steps=1, sparsity=0.5, tolerance=1.0, progress=False)
    assert loop.seen and all(issubclass(t, SmallResNet) for t in loop.seen)
    assert type(res.module) is SmallResNet
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("wrap", ["compile", "data_parallel"])
def test_a_train_that_returns_its_module_wrapped_goes_on_with_the_module_inside(wrap):
    """A loop that wraps what it trains (``model = torch.compile(model)``, ``nn.DataParallel``) and returns it: the
    cycle goes on with the module inside, which holds the masks."""
    torch.manual_seed(0)
    model, (x, y) = SmallResNet(), _data()
    loop = Loop(x, y, epochs=2, lr=1e-2)

    def train(m):
        loop.train(m)
        return torch.compile(m) if wrap == "compile" else nn.DataParallel(m)

    res = fp.squeeze_release(model, (x[:8],), train=train, evaluate=loop.evaluate, cycles=1, mask_steps=2,
                             sparsity=0.5, structure="groups", tolerance=1.0, progress=False)
    assert type(res.module) is SmallResNet and res.best_cycle == 1
    assert count_params(res.module) < res.dense["params"]


class RemembersItsLastOutput(SmallResNet):
    """A forward that leaves a state in the model (transformers' RecurrentGemma keeps its recurrent state so):
    after a training step it is a tensor autograd computed, which ``copy.deepcopy`` refuses."""

    def forward(self, x):
        self.last = super().forward(x)
        return self.last


def test_a_model_holding_a_state_its_last_forward_left_cycles():
    """The cycle's copies of the user's model were deep copies, which raised RuntimeError ("Only Tensors created
    explicitly by the user (graph leaves) support the deepcopy protocol") on a model trained before the call."""
    torch.manual_seed(0)
    model, (x, y) = RemembersItsLastOutput(), _data()
    loop = Loop(x, y, epochs=2, lr=1e-2)
    loop.train(model)  # the user's own training first: model.last now has a grad_fn
    assert model.last.grad_fn is not None
    res = fp.squeeze_release(model, (x[:8],), train=loop.train, evaluate=loop.evaluate, cycles=1, mask_steps=1,
                             sparsity=0.5, structure="groups", tolerance=1.0, progress=False)
    assert type(res.module) is RemembersItsLastOutput and count_params(res.module) < res.dense["params"]
    assert model.last.grad_fn is not None  # (the user's model as it was)


def test_an_optimizer_built_over_the_original_model_warns_that_train_changed_nothing():
    """The usual slip: the optimizer is built once, over the user's model, while each ``train`` call gets a copy;
    the copy never moves. The cycle says so, once; a loop that builds its optimizer from the module it gets does not
    warn."""
    torch.manual_seed(0)
    model, (x, y) = SmallResNet(), _data()
    outside = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def train(m):
        m.train()
        for idx in torch.randperm(len(x)).split(32):
            outside.zero_grad()
            F.cross_entropy(m(x[idx]), y[idx]).backward()
            outside.step()

    loop = Loop(x, y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fp.squeeze_release(model, (x[:8],), train=train, evaluate=loop.evaluate, cycles=2, mask_steps=2,
                           sparsity=0.5, tolerance=1.0, progress=False)
    said = [w for w in caught if w.category is UntrainedWarning]
    assert len(said) == 1 and "build the optimizer inside train" in str(said[0].message)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # (nor did the original move)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fp.squeeze_release(model, (x[:8],), train=loop.train, evaluate=loop.evaluate, cycles=1, mask_steps=1,
                           sparsity=0.5, tolerance=1.0, progress=False)
    assert not [w for w in caught if w.category is UntrainedWarning]


@pytest.mark.parametrize("returned", [{"eval_loss": 0.3, "eval_accuracy": 0.9}, torch.tensor([0.5, 0.7]), "0.9x"])
def test_evaluate_must_return_one_number(returned):
    model, (x, y) = SmallResNet(), _data()
    loop = Loop(x, y, epochs=1)
    with pytest.raises(fp.InputError, match="evaluate .*one number") as e:
        fp.squeeze_release(model, (x[:8],), train=loop.train, evaluate=lambda m: returned, cycles=1, progress=False)
    if isinstance(returned, dict):
        assert "'eval_accuracy'" in str(e.value) and "negated" in str(e.value)


def test_history_splits_each_cycles_seconds_between_fxprune_and_the_users_code():
    import time

    torch.manual_seed(0)
    model, (x, y) = SmallResNet(), _data()
    loop = Loop(x, y, epochs=1)

    def train(m):  # 0.2 s of the user's own on top of the loop
        time.sleep(0.2)
        loop.train(m)

    def evaluate(m):
        time.sleep(0.1)
        return loop.evaluate(m)

    res = fp.squeeze_release(model, (x[:8],), train=train, evaluate=evaluate, cycles=1, mask_steps=2, sparsity=0.5,
                             tolerance=1.0, progress=False)
    row = res.history[0]  # 3 train calls (2 mask steps, 1 after release) and 2 evaluations: 0.8 s asleep at least
    assert row["user_seconds"] >= 0.8 and 0 < row["fxprune_seconds"] < row["seconds"]
    assert abs(row["user_seconds"] + row["fxprune_seconds"] - row["seconds"]) <= 1e-9
    assert 0 < row["lasso_seconds"] < row["fxprune_seconds"]  # the lasso's optimizer hooks ran, inside train
    assert "fxprune share" in res.table()


def test_group_lasso_makes_the_weight_masked_cycle_remove_structure():
    """With weight masks the same loop and defaults with the group lasso off removes (almost) nothing; on, whole
    channels go. (``structure="weights"``: the default, ``"auto"``, would mask whole channels in cycle 2 of the run
    without the lasso, after its cycle 1 stalled.)"""
    def run(lasso):
        torch.manual_seed(0)
        model, (x, y) = SmallResNet(), _data()
        loop = Loop(x, y, epochs=10, lr=1e-2)
        return fp.squeeze_release(model, (x[:8],), train=loop.train, evaluate=loop.evaluate, cycles=2, mask_steps=2,
                                  tolerance=1.0, lasso=lasso, structure="weights", progress=False)
    off, on = run(0.0), run(fp.interop.lasso.DEFAULT_STRENGTH)
    assert on.history[-1]["params"] < 0.9 * off.history[-1]["params"]


def test_vit_from_transformers_with_an_ordinary_loop():
    transformers = pytest.importorskip("transformers", reason="the model comes from transformers (dev dependency)")
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, num_labels=4, hidden_dropout_prob=0.1)
    torch.manual_seed(0)
    model, (x, y) = transformers.ViTForImageClassification(cfg), _data()
    loop = Loop(x, y, logits=lambda out: out.logits, epochs=10, lr=3e-3)
    with warnings.catch_warnings():  # its attention reads head_dim: those channels stay (KeptChannelsWarning)
        warnings.simplefilter("ignore", fp.interop.module.KeptChannelsWarning)
        # the defaults: cycle 1's weight masks leave no whole channel (the group lasso zeroes none in 10 epochs),
        # so cycles 2 and 3 mask whole channels (structure="auto")
        res = fp.squeeze_release(model, (x[:8],), train=loop.train, evaluate=loop.evaluate, cycles=3, mask_steps=1,
                                 sparsity=0.6, tolerance=1.0, progress=False)
    assert [h["structure"] for h in res.history] == ["weights", "groups", "groups"]
    assert all(issubclass(t, transformers.ViTForImageClassification) for t in loop.seen)
    assert type(res.module) is transformers.ViTForImageClassification
    assert count_params(res.module) < res.dense["params"]
    assert res.history[res.best_cycle - 1]["accuracy"] > res.dense["accuracy"] + 0.2  # it trained while it shrank
    kept = res.module.eval()
    with torch.no_grad():
        out = kept(x[:5])  # another batch size than the example's
    assert out.logits.shape == (5, 4)
    kept.train()  # mode switches work on what comes back


def _refuse_the_class(monkeypatch, why: str) -> None:
    """The cycle's minimize_module refuses (as for a model it cannot keep as its own class): the graph path."""
    import fxprune.cycle as cycle

    def refuse(*args, **kwargs):
        raise fp.UnsupportedError(why)

    monkeypatch.setattr(cycle, "minimize_module_kept", refuse)


def _training(n: int, loss: Any) -> Any:
    """A ``train`` that calls ``.train()`` and runs AdamW (lr 1e-2) once over ``n`` examples in batches of 32,
    minimizing ``loss(m, idx)``: for a model called its own way (keywords, labels passed to it)."""

    def train(m: nn.Module) -> None:
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        m.train()
        for idx in torch.randperm(n).split(32):
            opt.zero_grad()
            loss(m, idx).backward()
            opt.step()

    return train


def _graph_path_run(model: nn.Module, x: torch.Tensor, loop: Loop, **kw: Any) -> tuple[Any, list[str]]:
    """The cycle on ``model`` with ``loop`` (tolerance 1.0), and the GraphPathWarnings it gave."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        res = fp.squeeze_release(model, (x[:8],), train=loop.train, evaluate=loop.evaluate, tolerance=1.0,
                                 progress=False, **kw)
    return res, [str(w.message) for w in seen if issubclass(w.category, GraphPathWarning)]


def test_a_class_that_cannot_be_kept_goes_the_graph_path_with_a_warning(monkeypatch):
    """The graph path keeps training semantics: BatchNorm and dropout are modules in every graph the cycle trains."""
    _refuse_the_class(monkeypatch, "minimize folded a constant into a bias that no module of the model holds")
    torch.manual_seed(0)
    model, (x, y) = SmallResNet(), _data()
    loop = Loop(x, y, epochs=10, lr=1e-2)
    res, msgs = _graph_path_run(model, x, loop, cycles=2, mask_steps=2, sparsity=0.7)
    assert len(msgs) == 1 and "no module of the model holds" in msgs[0]
    graphs = [t for t in loop.seen if issubclass(t, torch.fx.GraphModule)]
    assert graphs and len(loop.bn_moved) == 2 * (2 + 1) and all(loop.bn_moved)  # BatchNorm trained on every call
    kept = res.module
    assert isinstance(kept, torch.fx.GraphModule) and res.best_cycle is not None
    assert count_params(kept) < res.dense["params"]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in kept.modules()) == 5
    assert any(isinstance(m, nn.Dropout) for m in kept.modules())
    bn = next(m for m in kept.modules() if isinstance(m, nn.BatchNorm2d))
    mean = bn.running_mean.clone()
    kept.train()
    kept(x[:16])
    assert not torch.equal(bn.running_mean, mean)


class _ReadsItsWidth(nn.Module):
    """Adds the mean of its hidden units: eager code divides by the kept width, the graph by the full one."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(h) + h.mean(-1, keepdim=True)


class LossOnLabelledRows(nn.Module):
    """A classifier whose loss keeps the labelled rows through a data-dependent branch (DeBERTa's): captured
    without its labels."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x, labels=None):
        logits = self.body(x.flatten(1))
        if labels is None:
            return logits
        keep = (labels >= 0).nonzero()[:, 0]
        return F.cross_entropy(logits[keep], labels[keep]) if keep.size(0) > 0 else logits.sum() * 0


def test_the_graph_path_of_a_model_captured_without_its_labels_says_it_cannot_stand_in(monkeypatch):
    """Its graph takes no labels, the loop passes them: the graph path's check called it with them and raised a
    CaptureError blaming the capture ("does not run on inputs the model takes"). It says what happened."""
    _refuse_the_class(monkeypatch, "minimize folded a constant into a bias that no module of the model holds")
    torch.manual_seed(0)
    model, (x, y) = LossOnLabelledRows(), _data()

    train = _training(len(x), lambda m, idx: m(x[idx], y[idx]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(fp.UnsupportedError, match="captured without the labels it was given"):
            fp.squeeze_release(model, (x[:8], y[:8]), train=train, evaluate=lambda m: 1.0, cycles=1, mask_steps=1,
                               sparsity=0.5, tolerance=1.0, progress=False)


def test_a_class_whose_copy_differs_goes_the_graph_path_with_a_warning():
    """minimize_module raises EquivalenceError where the class's own code cannot follow a removal and no channel it
    could keep is suspect (the graph is right): the cycle stopped there; it now goes on with the graph."""
    torch.manual_seed(0)
    model, (x, y) = _ReadsItsWidth(), _data()
    loop = Loop(x, y, epochs=2, lr=1e-2)
    res, msgs = _graph_path_run(model, x, loop, cycles=1, mask_steps=1, sparsity=0.5, structure="groups")
    assert len(msgs) == 1 and "could not keep _ReadsItsWidth" in msgs[0] and "differs from it" in msgs[0]
    assert isinstance(res.module, torch.fx.GraphModule) and issubclass(loop.seen[-1], torch.fx.GraphModule)
    assert count_params(res.module) < 0.6 * res.dense["params"]


class _KeywordNet(nn.Module):
    """Called by keyword, with an optional input left out: ``net(x=..., target=...)`` gives logits and the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x, scale=None, target=None):
        out = self.body(x) if scale is None else self.body(x) * scale
        return out, (None if target is None else F.cross_entropy(out, target))


def test_the_graph_path_is_called_as_the_model_is(monkeypatch):
    """A loop that calls the model by keyword with an optional input left out (SqueezeBERT's, transformers'
    ``Trainer``: ``model(**batch)``), on the graph path: the graph's forward took every input positionally
    (``forward(x, scale, target)``), and the loop raised TypeError. Every graph handed to train/evaluate, and the
    one that comes back, is called as the model is."""
    _refuse_the_class(monkeypatch, "refused for this test")
    torch.manual_seed(0)
    model, (x, y) = _KeywordNet(), _data()

    train = _training(len(x), lambda m, idx: m(x=x[idx], target=y[idx])[1])

    @torch.no_grad()
    def evaluate(m):
        m.eval()
        return float((m(x=x, target=y)[0].argmax(-1) == y).float().mean())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GraphPathWarning)
        res = fp.squeeze_release(model, {"x": x[:8], "target": y[:8]}, train=train, evaluate=evaluate, cycles=2,
                                 mask_steps=1, sparsity=0.5, tolerance=1.0, progress=False)
    kept = res.module
    assert isinstance(kept, torch.fx.GraphModule) and count_params(kept) < res.dense["params"]
    logits, loss = kept(x=x[:5], target=y[:5])
    assert logits.shape == (5, 4) and loss.dim() == 0


def test_the_graph_path_switches_to_whole_channels_too(monkeypatch):
    """``structure="auto"`` on the graph path: the whole-channel masks are read off the trainable GraphModule, and
    BatchNorm still trains in every call."""
    _refuse_the_class(monkeypatch, "refused for this test")
    torch.manual_seed(0)
    model, (x, y) = SmallResNet(), _data()
    loop = Loop(x, y, epochs=2, lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GraphPathWarning)
        res = fp.squeeze_release(model, (x[:8],), train=loop.train, evaluate=loop.evaluate, cycles=2, mask_steps=2,
                                 sparsity=0.5, lasso=0.0, tolerance=1.0, progress=False)
    assert [h["structure"] for h in res.history] == ["weights", "groups"] and res.history[1]["passed"]
    assert isinstance(res.module, torch.fx.GraphModule)
    assert count_params(res.module) < 0.6 * res.history[0]["params"]
    assert len(loop.bn_moved) == 2 * (2 + 1) and all(loop.bn_moved)


def test_bad_lasso_strength():
    model = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(fp.InputError, match="lasso"):
        fp.squeeze_release(model, (torch.randn(2, 4),), train=lambda m: None, evaluate=lambda m: 0.0, lasso=-1)


def test_transformers_trainer_as_the_training_loop(tmp_path, monkeypatch):
    """transformers' Trainer builds its own optimizer and calls .train() first thing: the group lasso reaches it
    through the optimizer's step, and the kept model is the user's class."""
    transformers = pytest.importorskip("transformers", reason="the model and the Trainer come from transformers")
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (dev dependency)")
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, num_labels=4)
    torch.manual_seed(0)
    model, (x, y) = transformers.ViTForImageClassification(cfg), _data()
    rows = [{"pixel_values": xi, "labels": yi} for xi, yi in zip(x, y)]
    steps: list[int] = []

    def train(m):
        args = transformers.TrainingArguments(output_dir=str(tmp_path), num_train_epochs=10, per_device_train_batch_size=32,
                                              learning_rate=1e-2, lr_scheduler_type="constant", report_to=[],
                                              save_strategy="no", use_cpu=True,
                                              logging_strategy="no", disable_tqdm=True)
        trainer = transformers.Trainer(model=m, args=args, train_dataset=rows)
        steps.append(trainer.train().global_step)

    @torch.no_grad()
    def evaluate(m):
        m.eval()
        return float((m(x).logits.argmax(-1) == y).float().mean())

    calls = []
    real = fp.GroupLasso._pull_with  # what the optimizer's step pre-hook runs
    monkeypatch.setattr(fp.GroupLasso, "_pull_with", staticmethod(lambda *a: (calls.append(1), real(*a))[1]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fp.squeeze_release(model, (x[:8],), train=train, evaluate=evaluate, cycles=1, mask_steps=1,
                                 sparsity=0.6, tolerance=1.0, lasso=1e-2, progress=False)
    assert len(steps) == 2 and all(s > 0 for s in steps)
    assert len(calls) == steps[0]  # the group lasso acted on every step of the Trainer's own optimizer while it
    # squeezed (the mask step), and not in the fine-tune after release
    assert type(res.module) is transformers.ViTForImageClassification and res.history[0]["params"] <= res.dense["params"]


def test_gpt2_as_loaded_with_the_cache_on_and_an_ordinary_loop():
    """transformers' causal LM with its default config (use_cache=True) and a loop calling .train()/.eval(): the
    cycle keeps the user's class, smaller, with its cache flag."""
    transformers = pytest.importorskip("transformers", reason="the model comes from transformers (dev dependency)")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64,
                                                                  n_positions=32))
    ids = torch.randint(0, 64, (16, 12))

    def train(m):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        m.train()
        for _ in range(5):
            opt.zero_grad()
            m(ids, labels=ids).loss.backward()
            opt.step()

    @torch.no_grad()
    def evaluate(m):
        m.eval()
        return -float(m(ids, labels=ids).loss)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fp.squeeze_release(model, (ids[:2],), train=train, evaluate=evaluate, cycles=1, mask_steps=1,
                                 tolerance=10.0, progress=False)
    assert type(res.module) is transformers.GPT2LMHeadModel and res.module.config.use_cache
    assert count_params(res.module) < res.dense["params"] and model.config.use_cache


def test_structured_masks_as_the_cycles_masking_step():
    """``structure="groups"``: each mask step zeroes whole channels, so the minimized model is smaller by about the
    mask's sparsity even with the group lasso off (single-weight masks on this net leave almost nothing whole, and
    the cycle warns that it passed yet removed little, naming the option)."""
    def run(structure):
        torch.manual_seed(0)
        model, (x, y) = SmallResNet(), _data()
        loop = Loop(x, y, epochs=2, lr=1e-2)
        return fp.squeeze_release(model, (x[:8],), train=loop.train, evaluate=loop.evaluate, cycles=1, mask_steps=2,
                                  sparsity=0.5, lasso=0.0, tolerance=1.0, structure=structure, progress=False)
    with pytest.warns(LittleRemovedWarning, match=r"lasso is off \(lasso=0\)\. structure='groups'"):  # passed, yet
        # hardly smaller: says so, and why
        weights = run("weights")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groups = run("groups")
    assert not [w for w in caught if w.category is LittleRemovedWarning]
    with pytest.warns(LittleRemovedWarning, match="the group lasso zeroed few"):  # lasso on, a loop that never steps
        fp.squeeze_release(SmallResNet(), (_data()[0][:8],), train=lambda m: None, evaluate=lambda m: 1.0, cycles=1,
                           progress=False)
    dense = groups.dense["params"]
    assert type(groups.module) is SmallResNet
    assert abs(groups.history[0]["params"] / dense - 0.5) <= 0.05, groups.history[0]["params"] / dense
    assert weights.history[0]["params"] > 0.9 * dense and weights.history[0]["passed"]
    with pytest.raises(fp.errors.InputError, match="structure"):
        fp.squeeze_release(SmallResNet(), (_data()[0][:8],), train=lambda m: None, evaluate=lambda m: 0.0,
                           structure="rows")


def test_the_default_masks_whole_channels_after_a_cycle_whose_weight_masks_removed_little():
    """``structure="auto"`` (the default): cycle 1 masks single weights; with the group lasso off they leave this net
    hardly smaller although the cycle passed, so cycle 2 masks whole channels, and the model comes back smaller by
    about that cycle's sparsity, as its own class, without a warning. ``"weights"`` never switches; one cycle has no
    next to switch in, and says so."""
    def run(cycles, **kw):
        torch.manual_seed(0)
        model, (x, y) = SmallResNet(), _data()
        loop = Loop(x, y, epochs=2, lr=1e-2)
        res = fp.squeeze_release(model, (x[:8],), train=loop.train, evaluate=loop.evaluate, cycles=cycles,
                                 mask_steps=2, sparsity=0.5, lasso=0.0, tolerance=1.0, progress=False, **kw)
        return res, model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto, model = run(2)
    assert not [w for w in caught if w.category is LittleRemovedWarning]
    assert [h["structure"] for h in auto.history] == ["weights", "groups"]
    first, second = auto.history
    assert first["passed"] and first["compression"] <= LITTLE
    assert abs(second["params"] / first["params"] - 0.5) <= 0.05, second["params"] / first["params"]
    assert type(auto.module) is SmallResNet and auto.best_cycle == 2
    assert count_params(model) == auto.dense["params"]  # the input is left alone
    with pytest.warns(LittleRemovedWarning, match="With structure='auto' a cycle after this one would mask whole"):
        one, _ = run(1)
    assert one.history[0]["structure"] == "weights"
    with pytest.warns(LittleRemovedWarning, match="structure='groups' masks whole channels"):
        weights, _ = run(2, structure="weights")
    assert [h["structure"] for h in weights.history] == ["weights", "weights"]
    assert weights.history[0] == {**first, **{k: weights.history[0][k] for k in first if k.endswith("seconds")}}


def test_an_encoder_decoder_with_a_dict_batch_as_its_example_inputs():
    """T5 needs decoder inputs (or labels) besides input_ids: the example inputs are the loop's own dict batch,
    placed as forward takes them. Its feed-forward units with dead rows stay dead under training (ReLU at 0 has no
    gradient) and leave the user's class; generate() works on what comes back."""
    transformers = pytest.importorskip("transformers", reason="the model comes from transformers (dev dependency)")
    cfg = transformers.T5Config(vocab_size=16, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_decoder_layers=1,
                                num_heads=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(cfg)
    ffns = [m for m in model.modules() if type(m).__name__ == "T5DenseActDense"]
    with torch.no_grad():
        for ffn in ffns:
            ffn.wi.weight[:8] = 0.0  # 8 of 32 units dead in each feed-forward block
    src = torch.randint(2, 16, (32, 6), generator=torch.Generator().manual_seed(0))
    batch = dict(input_ids=src, labels=src.flip(1))

    def train(m):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        m.train()
        for idx in torch.randperm(len(src)).split(16):
            opt.zero_grad()
            m(input_ids=src[idx], labels=batch["labels"][idx]).loss.backward()
            opt.step()

    @torch.no_grad()
    def evaluate(m):
        m.eval()
        return float((m(**batch).logits.argmax(-1) == batch["labels"]).float().mean())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fp.squeeze_release(model, {k: v[:4] for k, v in batch.items()}, train=train, evaluate=evaluate,
                                 cycles=1, mask_steps=1, sparsity=0.3, tolerance=1.0, lasso=0, progress=False)
    kept = res.module
    assert type(kept) is transformers.T5ForConditionalGeneration
    assert res.dense["params"] - count_params(kept) >= len(ffns) * 8 * 2 * 16  # the dead units' wi rows, wo columns
    assert all(ffn.wi.out_features <= 24 for ffn in kept.modules() if type(ffn).__name__ == "T5DenseActDense")
    assert kept.generate(src[:2], max_new_tokens=4, do_sample=False).shape[0] == 2


def test_the_trainer_example_runs_and_reloads(tmp_path):
    """examples/trainer_squeeze_release.py: the Trainer as ``train``, a collated batch (a dict with labels) as the
    example inputs; the user's class comes back, and fp.load rebuilds it with the same logits."""
    pytest.importorskip("transformers", reason="the model and the Trainer come from transformers")
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (dev dependency)")
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "examples" / "trainer_squeeze_release.py"
    spec = importlib.util.spec_from_file_location("trainer_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = example.main(["--cycles", "1", "--epochs", "2", "--samples", "256", "--out", str(tmp_path / "small")])
    assert out["cls"] == "BertForSequenceClassification" and out["reloaded_equal"]
    assert out["params"] < out["params_dense"]
    assert (tmp_path / "small" / "manifest.json").exists()


@pytest.mark.parametrize("name", ["deit", "gemma", "squeezebert", "funnel"])
def test_the_user_models_benchmark_gives_the_users_class_back_smaller(name):
    """``benchmarks/user_models.py``: a model as loaded, a plain loop, the cycle's defaults (2 cycles). SqueezeBERT
    (channels-first norms that call ``nn.LayerNorm.forward`` by name) and Funnel (``mask.type_as(hidden)``) raised
    before stop 55."""
    pytest.importorskip("transformers", reason="the models come from transformers (dev dependency)")
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import user_models

    row = user_models.run(name)
    assert row["own_class"] and row["kept_cls"] == row["cls"]
    assert row["params"][1] < row["params"][0]
    assert row["accuracy"][1] >= row["accuracy"][0] - 0.05  # the tolerance it ran with
    if name == "gemma":
        assert row["generate"] == [2, 7]


def test_the_graph_path_of_a_causal_lm_as_loaded_captures_with_the_cache_off(monkeypatch):
    """Where the cycle cannot keep a transformers LM as its class (XGLM did not, before), its graph path captured
    the model as loaded, with ``use_cache`` on: torch.export cannot return the KV cache, and the cycle raised
    CaptureError. The graph is captured with the cache off; the user's model keeps its flag."""
    transformers = pytest.importorskip("transformers", reason="the model comes from transformers (dev dependency)")
    _refuse_the_class(monkeypatch, "refused for this test")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64,
                                                                  n_positions=32))
    assert model.config.use_cache
    ids = torch.randint(0, 64, (16, 12))

    def loss(m):
        return F.cross_entropy(m(input_ids=ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    def train(m):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        m.train()
        for _ in range(3):
            opt.zero_grad()
            loss(m).backward()
            opt.step()

    @torch.no_grad()
    def evaluate(m):
        m.eval()
        return -float(loss(m))

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        res = fp.squeeze_release(model, (ids[:2],), train=train, evaluate=evaluate, cycles=1, mask_steps=1,
                                 tolerance=10.0, progress=False)
    assert any(issubclass(w.category, GraphPathWarning) for w in seen)
    assert isinstance(res.module, torch.fx.GraphModule) and count_params(res.module) < res.dense["params"]
    assert model.config.use_cache and res.module(input_ids=ids[:3]).logits.shape == (3, 12, 64)


class _KeepsAWidth(nn.Module):
    """A hidden layer its forward reshapes by a size it keeps as an attribute (``half``), which fxprune cannot
    update: the class keeps a's units (``KeptChannelsWarning``); b's 32 units it can lose."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.half = nn.Linear(4, 8), nn.Linear(4, 32), nn.Linear(32, 4), 4
        with torch.no_grad():  # the first half of a's units small: the magnitude masks would take it first
            self.a.weight[:4] *= 0.01
            self.a.bias[:4] *= 0.01

    def forward(self, x):
        h = torch.relu(self.a(x.flatten(1))).view(x.shape[0], 2, self.half)
        return self.c(torch.relu(self.b(h))).sum(1)


def test_groups_the_class_cannot_lose_are_left_out_of_the_masks_and_the_lasso():
    """Before the first cycle, the cycle minimizes a copy with one channel of every group dead and reads what the
    class kept: a's units. The whole-channel masks then take their share from b's units alone, and the group lasso
    pulls on none of a's (channels pulled to zero there would stay in the class, zeros). On the commit before, the
    masks zeroed a unit of a, which the class then kept."""
    from fxprune.cycle import _class_kept
    from fxprune.interop.lasso import GroupLasso

    torch.manual_seed(0)
    x, y = _data(shape=(1, 2, 2))
    probed = _KeepsAWidth()
    state = torch.get_rng_state()
    kept = _class_kept(probed, (x[:8],), verify=True)
    assert torch.equal(torch.get_rng_state(), state)  # (the user's loop draws the same numbers as without it)
    assert kept is not None and any(k.startswith("a.") for k in kept.keep), kept
    reg = GroupLasso(_KeepsAWidth(), (x[:8],), keep=kept.keep)
    assert reg.slices and not any(s.name.startswith("a.") for s in reg.slices)
    model = _KeepsAWidth()
    loop = Loop(x, y, epochs=2, lr=1e-2)
    masked_a: list[bool] = []  # per train call: whether a unit of a is masked whole

    def train(m):
        masked_a.append(bool((m.a.weight == 0).all(dim=1).any()))
        loop.train(m)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fp.interop.module.KeptChannelsWarning)
        res = fp.squeeze_release(model, (x[:8],), train=train, evaluate=loop.evaluate, cycles=1, mask_steps=2,
                                 sparsity=0.4, tolerance=1.0, structure="groups", progress=False)
    assert len(masked_a) == 3 and not any(masked_a)  # (two mask steps and the fine-tune after release)
    assert type(res.module) is _KeepsAWidth and res.module.a.out_features == 8
    assert abs(res.history[0]["params"] / res.dense["params"] - 0.6) <= 0.05, res.history[0]["params"]
