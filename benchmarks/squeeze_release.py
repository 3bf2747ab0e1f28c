"""Squeeze-Release on small networks, against the method's published compression (39x FC, 14.8x ConvNeXt-Tiny).

    python benchmarks/squeeze_release.py --model fc --dataset digits
    python benchmarks/squeeze_release.py --model convnext --dataset mnist1d
    python benchmarks/squeeze_release.py --model fc --dataset digits --quick --plot results.png
    python benchmarks/squeeze_release.py --model fc --dataset digits --baselines --seed 1 > fc-digits-1.json
    python benchmarks/squeeze_release.py --model fc --dataset digits --baselines --folds 4 --seed 0  # cross-validated
    python benchmarks/squeeze_release.py --summarize fc-digits-*.json

Trains the dense model, runs ``fp.squeeze_release`` (c) and, with ``--baselines`` (or ``--method``), at the same
training budget: (a) gradual magnitude pruning in one run, then minimize, and (b) the cycle without release (the
zeros left after minimize held during the last fine-tune of each cycle). One-shot mask + minimize of the dense
model at a grid of sparsities (no training) is always reported. Prints a table and, as its LAST line, one JSON
object; ``--summarize`` reads such lines from several runs (seeds) and prints mean and spread. Data is generated
offline (scikit-learn's digits, mnist1d's generator); every seed is fixed.

The recipe is the user's side of the cycle only: Adam and cross-entropy in an ordinary loop (``.train()``, then
``.eval()`` to evaluate), per (model, dataset) ``RECIPES`` the epochs, the learning rate, its schedule within a call
(cosine decay for ConvNeXt) and a distillation term towards the dense model's logits (FC and ConvNeXt digits). The
structure ``minimize`` removes comes from fxprune itself: ``fp.squeeze_release``'s group lasso over the model's own
channel groups (``fp.GroupLasso``: an exact-zero proximal step after every 16th optimizer step), at the strength a recipe
names (``lasso``; the library's default where it names none). The gradual baseline (a) trains with the same group
lasso attached. The dense model always trains at a constant learning rate, with neither regularizer nor
distillation. Selection
(the cycle's tolerance, the gradual steps, the one-shot grid) uses a validation split, or with ``--folds K`` the
mean over K cross-validation folds (every method then runs K times and the K models picked are reported as means);
the accuracies reported are on the test split. Every candidate is recorded in the JSON line, and ``--summarize``
also re-applies the rule with each cycle's fine-tuned model kept (instead of the better of the minimized and the
fine-tuned one on validation).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import inspect
import math
import platform
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import fxprune as fp
from fxprune.passes.mask import apply_masks, magnitude_masks
from fxprune.verify import count_params

# ----------------------------------------------------------------------------------------------------- data


def load(dataset: str, seed: int, folds: int = 1, fold: int = 0) -> dict[str, torch.Tensor]:
    """Train / validation / test splits as float32 tensors, inputs standardized with the train statistics.

    ``folds=1``: the seed's fixed split (digits: stratified 60/20/20; MNIST-1D: its 4,000 training samples less
    the first 800 for validation, and its 1,000 test samples). ``folds=K``: the same test split; the rest (the
    pool) cut into K parts (stratified for digits), part ``fold`` for validation and the others for training."""
    if dataset == "digits":
        from sklearn.datasets import load_digits
        x, y = load_digits(return_X_y=True)
        x = x / 16.0
        order = digits_indices(y, seed, folds, fold)
        xs = {k: x[o] for k, o in order.items()}
        ys = {k: y[o] for k, o in order.items()}
    elif dataset == "mnist1d":
        from mnist1d.data import get_dataset_args, make_dataset
        args = get_dataset_args()
        args.seed = seed
        d = make_dataset(args)
        parts = np.array_split(np.arange(len(d["x"])), 5 if folds == 1 else folds)  # (generated in random order)
        va = parts[fold]
        tr = np.concatenate([q for i, q in enumerate(parts) if i != fold])
        xs = dict(train=d["x"][tr], val=d["x"][va], test=d["x_test"])
        ys = dict(train=d["y"][tr], val=d["y"][va], test=d["y_test"])
    else:
        raise SystemExit(f"unknown dataset {dataset!r} (digits | mnist1d)")
    mu, sd = xs["train"].mean(0), xs["train"].std(0) + 1e-6
    out = {}
    for k in xs:
        out[f"x_{k}"] = torch.tensor((xs[k] - mu) / sd, dtype=torch.float32)
        out[f"y_{k}"] = torch.tensor(ys[k], dtype=torch.long)
    return out


def digits_indices(y: np.ndarray, seed: int, folds: int = 1, fold: int = 0) -> dict[str, np.ndarray]:
    """The digits' indices per split (see :func:`load`), each split in a seeded random order."""
    rng = np.random.default_rng(seed)
    idx: dict[str, list[np.ndarray]] = dict(train=[], val=[], test=[])
    for label in range(10):  # stratified 60/20/20: every split has each digit in the dataset's proportion
        members = rng.permutation(np.flatnonzero(y == label))
        n_tr, n_va = round(0.6 * len(members)), round(0.2 * len(members))
        if folds == 1:
            idx["train"].append(members[:n_tr])
            idx["val"].append(members[n_tr:n_tr + n_va])
        else:
            parts = np.array_split(members[:n_tr + n_va], folds)
            idx["train"].append(np.concatenate([q for i, q in enumerate(parts) if i != fold]))
            idx["val"].append(parts[fold])
        idx["test"].append(members[n_tr + n_va:])
    return {k: rng.permutation(np.concatenate(v)) for k, v in idx.items()}

# --------------------------------------------------------------------------------------------------- models


def fc(d_in: int, widths: tuple[int, ...] = (300, 100), d_out: int = 10) -> nn.Module:
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Linear(d_in, w), nn.ReLU()]
        d_in = w
    return nn.Sequential(*layers, nn.Linear(d_in, d_out))


class ChannelsLastNorm(nn.LayerNorm):
    """LayerNorm over the channel dim of an (N, C, *spatial) tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


class Block(nn.Module):
    """ConvNeXt block: depthwise 7-tap conv, LayerNorm, inverted MLP (4x), layer scale, residual."""

    def __init__(self, conv: type[nn.Module], dim: int):
        super().__init__()
        self.dwconv = conv(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).movedim(1, -1)
        y = self.pwconv2(F.gelu(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).movedim(-1, 1)


class ConvNeXtStyle(nn.Module):
    """ConvNeXt sized for 8x8 digits (2-D) or 40-sample MNIST-1D (1-D): patchify stem + LayerNorm, two stages
    with a LayerNorm + strided-conv downsampling between them, global average pool, LayerNorm, linear head."""

    def __init__(self, spatial_dims: int, dims: tuple[int, int] = (32, 64), depths: tuple[int, int] = (2, 2),
                 stem: int = 2, d_out: int = 10):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d}[spatial_dims]
        self.stem = conv(1, dims[0], stem, stride=stem)
        self.stem_norm = ChannelsLastNorm(dims[0])
        self.stage1 = nn.Sequential(*[Block(conv, dims[0]) for _ in range(depths[0])])
        self.down_norm = ChannelsLastNorm(dims[0])
        self.down = conv(dims[0], dims[1], 2, stride=2)
        self.stage2 = nn.Sequential(*[Block(conv, dims[1]) for _ in range(depths[1])])
        self.head_norm = nn.LayerNorm(dims[1])
        self.head = nn.Linear(dims[1], d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage1(self.stem_norm(self.stem(x)))
        x = self.stage2(self.down(self.down_norm(x)))
        return self.head(self.head_norm(x.flatten(2).mean(-1)))


class BasicBlock(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN plus the identity, ReLU."""

    def __init__(self, conv: type[nn.Module], bn: type[nn.Module], c: int):
        super().__init__()
        self.conv1, self.bn1 = conv(c, c, 3, padding=1, bias=False), bn(c)
        self.conv2, self.bn2 = conv(c, c, 3, padding=1, bias=False), bn(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ResNetStyle(nn.Module):
    """An untuned network: a ResNet with BatchNorm (stem, two stages of two basic blocks, a strided conv between
    them, global average pool, linear head). No recipe was tuned on it: it runs with the untuned recipe."""

    def __init__(self, spatial_dims: int, dims: tuple[int, int] = (32, 64), d_out: int = 10):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d}[spatial_dims]
        bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[spatial_dims]
        self.stem, self.stem_bn = conv(1, dims[0], 3, padding=1, bias=False), bn(dims[0])
        self.stage1 = nn.Sequential(BasicBlock(conv, bn, dims[0]), BasicBlock(conv, bn, dims[0]))
        self.down, self.down_bn = conv(dims[0], dims[1], 2, stride=2, bias=False), bn(dims[1])
        self.stage2 = nn.Sequential(BasicBlock(conv, bn, dims[1]), BasicBlock(conv, bn, dims[1]))
        self.head = nn.Linear(dims[1], d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage1(F.relu(self.stem_bn(self.stem(x))))
        x = self.stage2(F.relu(self.down_bn(self.down(x))))
        return self.head(x.flatten(2).mean(-1))


def vit(sample: tuple[int, ...]) -> nn.Module:
    """An untuned network: transformers' ViTForImageClassification (random weights from a config), patches of 2x2
    on the 8x8 digits, 4 layers of width 64 with 4 heads. Its output is an ``ImageClassifierOutput`` (``.logits``)."""
    import transformers

    cfg = transformers.ViTConfig(image_size=sample[-1], patch_size=2, num_channels=1, hidden_size=64,
                                 num_hidden_layers=4, num_attention_heads=4, intermediate_size=256, num_labels=10)
    return transformers.ViTForImageClassification(cfg)


def build(model: str, dataset: str) -> tuple[nn.Module, tuple[int, ...]]:
    """The model and the shape of one input sample."""
    sample = {"digits": (8, 8), "mnist1d": (40,)}[dataset]
    if model == "fc":
        return fc(math.prod(sample)), (math.prod(sample),)
    if model == "convnext":
        return ConvNeXtStyle(len(sample)), (1, *sample)
    if model == "resnet":
        return ResNetStyle(len(sample)), (1, *sample)
    if model == "vit":
        if dataset != "digits":
            raise SystemExit("--model vit runs on images: --dataset digits")
        return vit(sample), (1, *sample)
    raise SystemExit(f"unknown model {model!r} (fc | convnext | resnet | vit)")


def logits(out) -> torch.Tensor:
    """A model's output as logits: the tensor itself, or transformers' ``.logits``."""
    return getattr(out, "logits", out)

# --------------------------------------------------------------------------------------------------- recipe


@dataclass
class Recipe:
    epochs: int  # per `train` call (each mask step and each release fine-tune)
    dense_epochs: int
    lr: float  # the dense model's, and the fine-tuning's unless tune_lr is set
    lasso: float = fp.interop.lasso.DEFAULT_STRENGTH  # fp.squeeze_release's lasso (the dense model trains without it)
    batch: int = 64
    cycles: int = 6
    release_scale: float = 0.01  # fp.squeeze_release's release_scale: noise std over the std of each weight's nonzeros
    schedule: str = "constant"  # learning rate within each `train` call: constant, or cosine decay to 0 over its steps
    distill: float = 0.0  # fine-tuning loss: (1 - distill) x cross-entropy + distill x KL to the dense model (T = 4)
    sparsity: float | None = 0.9  # fp.squeeze_release's sparsity per cycle (None: its default)
    mask_steps: int | None = 3  # fp.squeeze_release's mask_steps (None: its default)
    tune_lr: float | None = None  # the fine-tuning calls' learning rate (None: lr); the dense model trains at lr
    tune_batch: int | None = None  # the fine-tuning calls' batch size (None: batch)
    weight_decay: float = 0.0  # the fine-tuning calls' decoupled weight decay (AdamW; 0: Adam)


RECIPES = {
    # 10 gentler cycles (0.7 each) instead of 6 at 0.9: 43.0x at 0.84 points over seeds 0-2 against 39.1x at 1.39
    ("fc", "digits"): Recipe(epochs=30, dense_epochs=60, lr=3e-3, distill=0.5, cycles=10, sparsity=0.7),
    # stop 46's four best recipes and c018 with 14 and 20 cycles, run again on ten tuning seeds, 10-19 (results.md,
    # stop 52): c018 with 14 cycles has the most compression within a point there (39.4x at 0.93; stop 46's g000 35.1x
    # at 1.12); seeds 0-2: 32.3x at -0.33 points (g000: 23.6x at 0.83 on this machine)
    ("fc", "mnist1d"): Recipe(epochs=10, dense_epochs=60, lr=3e-3, lasso=0.001, cycles=14, sparsity=0.7, tune_lr=0.01,
                              tune_batch=32, weight_decay=0.01, schedule="cosine", release_scale=0.05),
    ("convnext", "digits"): Recipe(epochs=15, dense_epochs=40, lr=2e-3, cycles=10, schedule="cosine", distill=0.5),
    # 0.7 per cycle instead of 0.9 (stop 61, stop 54's rule on ten tuning seeds, 10-19): 21.7x at -0.45 points, 9 of
    # 10 seeds within a point, against 20.8x at +0.02, 8 of 10
    ("convnext", "mnist1d"): Recipe(epochs=10, dense_epochs=40, lr=2e-3, cycles=10, schedule="cosine", sparsity=0.7),
}
# resnet, vit: an ordinary loop, nothing tuned; fp.squeeze_release's defaults (sparsity, mask_steps, lasso, backoff)
UNTUNED = Recipe(epochs=15, dense_epochs=40, lr=2e-3, sparsity=None, mask_steps=None)
CYCLE_DEFAULTS = {k: v.default for k, v in inspect.signature(fp.squeeze_release).parameters.items()}


T = 4.0  # distillation temperature


class Trainer:
    def __init__(self, data: dict[str, torch.Tensor], sample: tuple[int, ...], recipe: Recipe, seed: int):
        self.data, self.sample, self.recipe, self.seed, self.calls = data, sample, recipe, seed, 0
        self.teacher: torch.Tensor | None = None  # the dense model's logits on the training split (distillation)

    def inputs(self, split: str) -> torch.Tensor:
        x = self.data[f"x_{split}"]
        return x.reshape(len(x), *self.sample)

    def train(self, model: nn.Module, epochs: int | None = None, schedule: str | None = None,
              dense: bool = False) -> nn.Module:
        """One call of the user's loop: ``dense`` trains the reference model (the recipe's lr and batch, never the
        fine-tuning's own)."""
        r = self.recipe
        self.calls += 1
        g = torch.Generator().manual_seed(self.seed * 1000 + self.calls)
        x, y = self.inputs("train"), self.data["y_train"]
        lr = r.lr if dense or r.tune_lr is None else r.tune_lr
        batch = r.batch if dense or r.tune_batch is None else r.tune_batch
        params = [p for p in model.parameters() if p.requires_grad]
        # foreach: the same updates, bit for bit, with less per-tensor overhead
        if r.weight_decay and not dense:
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=r.weight_decay, foreach=True)
        else:
            opt = torch.optim.Adam(params, lr=lr, foreach=True)
        epochs = epochs or r.epochs
        steps = epochs * math.ceil(len(x) / batch)
        cosine = (schedule or r.schedule) == "cosine"
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if cosine else None
        model.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=g).split(batch):
                opt.zero_grad(set_to_none=True)
                out = logits(model(x[idx]))
                loss = F.cross_entropy(out, y[idx])
                if r.distill and self.teacher is not None:
                    kl = F.kl_div(F.log_softmax(out / T, -1), F.log_softmax(self.teacher[idx] / T, -1),
                                  log_target=True, reduction="batchmean")
                    loss = (1 - r.distill) * loss + r.distill * T * T * kl
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
        return model

    @torch.no_grad()
    def accuracy(self, model: nn.Module, split: str = "val") -> float:
        model.eval()
        return float((logits(model(self.inputs(split))).argmax(-1) == self.data[f"y_{split}"]).float().mean())

# ------------------------------------------------------------------------------------------------------ run


Curve = list[dict]  # the candidates of one method on one split: index 0 the dense model; params, val, test, label


def candidate(model: nn.Module, trainer: Trainer, label: str) -> dict:
    return dict(params=count_params(model), val=trainer.accuracy(model), test=trainer.accuracy(model, "test"),
                label=label)


def one_shot(dense: nn.Module, example: tuple[torch.Tensor, ...], trainer: Trainer, grid: list[float]) -> Curve:
    """Mask the dense model once at each sparsity of ``grid`` and minimize (no training): one candidate each."""
    curve = [candidate(dense, trainer, "sparsity 0.0")]
    for s in grid:
        m = copy.deepcopy(dense).eval()
        apply_masks(m, magnitude_masks(m, s))
        curve.append(candidate(fp.minimize_module(m, example), trainer, f"sparsity {s}"))
    return curve


def gradual(dense: nn.Module, example: tuple[torch.Tensor, ...], trainer: Trainer, steps: int, final: float,
            every: int) -> Curve:
    """Baseline (a): progressive magnitude pruning in one run, on a copy of the user's model. ``steps`` masking
    steps on a linear schedule to ``final`` (global magnitude of the active weights; masked weights stay masked),
    each followed by one ``train`` call with the masks held and fxprune's group lasso attached (the same calls,
    epochs, strength and reading interval as the cycle); after each, the masked model is minimized and is a candidate."""
    work = copy.deepcopy(dense)
    curve = [candidate(dense, trainer, "step 0, sparsity 0.0")]
    masks: dict[str, torch.Tensor] = {}
    for k in range(1, steps + 1):
        s = fp.sparsity_schedule(k, steps, final, kind="linear")
        masks = apply_masks(work, magnitude_masks(work, s), masks)
        held = fp.hold_masks_(work, masks)
        with fp.GroupLasso(held, example, strength=trainer.recipe.lasso, every=every).attach(held):
            work = fp.bake_masks_(trainer.train(held))
        curve.append(candidate(fp.minimize_module(copy.deepcopy(work).eval(), example), trainer,
                               f"step {k}, sparsity {round(s, 4)}"))
        print(f"[gradual] step {k}/{steps} sparsity {s:.3f}: {curve[-1]['params']:,} params, validation "
              f"{curve[-1]['val']:.4f}", file=sys.stderr)
    return curve


class Logged:
    """``evaluate`` for ``fp.squeeze_release``: validation accuracy, and the test accuracy of every model it is
    called on recorded beside it (the test split is never what the cycle decides on)."""

    def __init__(self, trainer: Trainer):
        self.trainer, self.calls = trainer, []

    def __call__(self, model: nn.Module) -> float:
        val = self.trainer.accuracy(model)
        self.calls.append((val, self.trainer.accuracy(model, "test")))
        return val


def cycle_curve(res: fp.SqueezeReleaseResult, log: Logged) -> Curve:
    """One candidate per cycle: the model the cycle kept (the more accurate on validation of the minimized and the
    fine-tuned one; ``evaluate`` ran on the dense model, then on those two per cycle). Each cycle's entry also
    records both models' (validation, test) accuracies as ``minimized`` and ``tuned``."""
    (val, test), curve = log.calls[0], []
    curve.append(dict(params=res.dense["params"], val=val, test=test, label="dense"))
    for c, h in enumerate(res.history):
        minimized, tuned = log.calls[1 + 2 * c], log.calls[2 + 2 * c]
        val, test = tuned if tuned[0] > minimized[0] else minimized
        assert val == h["accuracy"], "evaluate's calls out of step with the cycles"
        curve.append(dict(params=h["params"], val=val, test=test, label=f"cycle {h['cycle']}",
                          minimized=list(minimized), tuned=list(tuned)))
    return curve


def select(curves: list[Curve], tolerance: float) -> int:
    """The accuracy rule, over one split or the K folds of cross-validation: the candidate index with the fewest
    parameters (mean over the splits) among those whose mean validation accuracy is within ``tolerance`` of the
    dense model's; 0 (dense) when none is. On one split it is ``fp.squeeze_release``'s own choice."""
    n = min(len(c) for c in curves)
    mean = lambda key, j: float(np.mean([c[j][key] for c in curves]))  # noqa: E731
    budget, best = mean("val", 0) - tolerance, 0
    for j in range(1, n):
        if mean("val", j) >= budget and mean("params", j) < mean("params", best):
            best = j
    return best


def plot(path: str, result: fp.SqueezeReleaseResult, dense_acc: float, accs: list[float], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cyc = [0] + [h["cycle"] for h in result.history]
    params = [result.dense["params"]] + [h["params"] for h in result.history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.semilogy(cyc, params, "o-", color="C0")
    ax.set_xlabel("cycle (0 = dense)")
    ax.set_ylabel("deployable parameters", color="C0")
    ax2 = ax.twinx()
    ax2.plot(cyc, [100 * dense_acc] + [100 * a for a in accs], "s--", color="C1")
    ax2.set_ylabel("validation accuracy (%)", color="C1")
    ax.set_xticks(cyc)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


METHODS = {"squeeze-release": "(c) Squeeze-Release", "no-release": "(b) cycles without release",
           "gradual": "(a) gradual magnitude pruning, one run"}


def run_cycles(model: nn.Module, example: tuple[torch.Tensor, ...], trainer: Trainer, evaluate: Logged,
               a: argparse.Namespace, cycles: int, sparsity: list[float], release: bool) -> fp.SqueezeReleaseResult:
    return fp.squeeze_release(model, example, train=trainer.train, evaluate=evaluate, cycles=cycles,
                              sparsity=sparsity, mask_steps=a.mask_steps, tolerance=a.tolerance, seed=a.seed,
                              release=release, release_scale=a.release_scale, lasso=trainer.recipe.lasso,
                              lasso_every=a.lasso_every,
                              backoff=not a.no_backoff, structure=a.structure, progress=True)


GRID = [0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995]  # the one-shot baseline's sparsities


def machine() -> dict:
    """What the figures depend on besides the code: the CPU kernels torch picks (AVX2, AVX512...) round float32
    differently, and a training trajectory that hits a different rounding diverges (stop 50: FC digits seed 0,
    the same code, 39.8x on one machine and 43.3x on another)."""
    return dict(torch=torch.__version__, cpu=torch.backends.cpu.get_cpu_capability(), threads=torch.get_num_threads(),
                processor=platform.processor() or platform.machine())


def run_split(a: argparse.Namespace, recipe: Recipe, cycles: int, sparsity: list[float], methods: list[str],
              data: dict[str, torch.Tensor]) -> dict:
    """Train the dense model on one split and run every method and the one-shot grid from it: their candidates."""
    torch.manual_seed(a.seed)  # every split starts from the same initial weights
    model, sample = build(a.model, a.dataset)
    trainer = Trainer(data, sample, recipe, a.seed)
    # the dense model: a constant learning rate whatever the fine-tuning schedule, so that a recipe change never
    # moves the reference the accuracy rule and the reported drop are measured against
    if a.dense_lasso:
        with fp.GroupLasso(model, (trainer.inputs("train")[:8],), strength=recipe.lasso).attach(model):
            trainer.train(model, recipe.dense_epochs, schedule="constant", dense=True)
    else:
        trainer.train(model, recipe.dense_epochs, schedule="constant", dense=True)
    if recipe.distill:
        with torch.no_grad():
            trainer.teacher = logits(model.eval()(trainer.inputs("train")))
    example = (trainer.inputs("train")[:8],)
    out: dict = dict(params_dense=count_params(model), curves={}, seconds={}, results={})
    for method in methods:
        trainer.calls = 0  # each method draws the same training batches whatever ran before it
        t0 = time.perf_counter()
        if method == "gradual":
            out["curves"][method] = gradual(model, example, trainer, cycles * (a.mask_steps + 1), a.gradual_final,
                                            a.lasso_every)
        else:
            log = Logged(trainer)
            res = run_cycles(model, example, trainer, log, a, cycles, sparsity, release=method == "squeeze-release")
            out["curves"][method], out["results"][method] = cycle_curve(res, log), res
        out["seconds"][method] = time.perf_counter() - t0
    out["curves"]["one-shot"] = one_shot(model, example, trainer, GRID)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["fc", "convnext", "resnet", "vit"], default="fc",
                    help="resnet and vit: networks no recipe was tuned on (the untuned recipe, the cycle's defaults)")
    ap.add_argument("--dataset", choices=["digits", "mnist1d"], default="digits")
    ap.add_argument("--cycles", type=int, default=None,
                    help="default: the recipe's (10 FC and ConvNeXt, 14 FC on MNIST-1D, 6 for the untuned networks; 4 with --quick)")
    ap.add_argument("--sparsity", type=float, nargs="+", default=None,
                    help="final mask sparsity of each cycle, the last value repeating (default: the recipe's)")
    ap.add_argument("--tolerance", type=float, default=0.01, help="accuracy budget below the dense model")
    ap.add_argument("--folds", type=int, default=1,
                    help="K > 1: K-fold cross-validation of the selection: the split's training and validation data "
                         "pooled and cut into K folds; every method runs K times (one fold for validation each), the "
                         "accuracy rule reads the mean validation curve, and the K models it picks are reported "
                         "(mean). 1: the seed's fixed split")
    ap.add_argument("--quick", action="store_true", help="fewer cycles and epochs (a smoke run)")
    ap.add_argument("--lasso", type=float, default=None, help="strength of fxprune's group lasso, fp.squeeze_release(lasso=...) (default: the recipe's; 0: off)")
    ap.add_argument("--lasso-every", type=int, default=None, metavar="K",
                    help="fp.squeeze_release(lasso_every=K): the group lasso reads the weights every K optimizer steps, "
                         "the cycle's and the gradual baseline's (default: the library's)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per fine-tune call (default: the recipe's)")
    ap.add_argument("--lr", type=float, default=None,
                    help="learning rate of the fine-tuning calls (default: the recipe's; the dense model keeps the recipe's)")
    ap.add_argument("--batch", type=int, default=None, help="batch size of the fine-tuning calls (default: the recipe's)")
    ap.add_argument("--weight-decay", type=float, default=None,
                    help="decoupled weight decay of the fine-tuning calls (AdamW; default: the recipe's, 0: Adam)")
    ap.add_argument("--release-scale", type=float, default=None, help="release noise scale (default: the recipe's)")
    ap.add_argument("--schedule", choices=["constant", "cosine"], default=None,
                    help="learning rate within each train call (default: the recipe's)")
    ap.add_argument("--distill", type=float, default=None,
                    help="weight of distillation from the dense model in the fine-tuning loss (default: the recipe's)")
    ap.add_argument("--mask-steps", type=int, default=None,
                    help="masking steps per cycle, each followed by fine-tuning (default: the recipe's)")
    ap.add_argument("--structure", choices=["auto", "weights", "groups"], default="auto",
                    help="the cycle's masks (fp.squeeze_release's structure): single weights, whole channels of "
                         "fxprune's groups, or auto (default: weights, whole channels after cycles that passed "
                         f"kept at most {fp.cycle.LITTLE}x)")
    ap.add_argument("--no-backoff", action="store_true",
                    help="fp.squeeze_release(backoff=False): every cycle builds on the one before, even one outside the tolerance")
    ap.add_argument("--dense-lasso", action="store_true", help="train the dense model with the group lasso too")
    ap.add_argument("--method", choices=list(METHODS), nargs="+", default=["squeeze-release"],
                    help="what to run on the dense model: squeeze-release (c), no-release (b: the cycle with the "
                         "zeros held instead of released), gradual (a: progressive magnitude pruning in one run); "
                         "all with the same train calls, epochs and group lasso")
    ap.add_argument("--baselines", action="store_true", help="run all three methods (--method gradual no-release squeeze-release)")
    ap.add_argument("--gradual-final", type=float, default=0.99, help="final sparsity of the gradual baseline's linear schedule")
    ap.add_argument("--summarize", nargs="+", metavar="JSON", default=None,
                    help="read the JSON lines of earlier runs (files) and print mean and spread over seeds")
    ap.add_argument("--frontier", nargs="+", metavar="JSON", default=None,
                    help="read the JSON lines of earlier runs (any recipes, methods) and print, per seed, the best test "
                         "accuracy any recorded candidate at the target compression has (picked on test: a bound on "
                         "what selection could reach, not a result)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default=None, help="write a PNG of params and accuracy per cycle")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: these small networks train faster on one, and runs reproduce bit for bit)")
    a = ap.parse_args(argv)
    if a.summarize:
        return summarize(a.summarize)
    if a.frontier:
        return frontier(a.frontier)
    if a.folds < 1:
        raise SystemExit(f"--folds must be at least 1, got {a.folds}")
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    recipe = RECIPES.get((a.model, a.dataset), UNTUNED)
    if a.quick:
        recipe = dataclasses.replace(recipe, epochs=max(5, recipe.epochs // 2), dense_epochs=recipe.dense_epochs // 2)
    recipe = dataclasses.replace(recipe, epochs=a.epochs or recipe.epochs,
                                 lasso=recipe.lasso if a.lasso is None else a.lasso,
                                 schedule=a.schedule or recipe.schedule,
                                 distill=recipe.distill if a.distill is None else a.distill,
                                 tune_lr=a.lr or recipe.tune_lr, tune_batch=a.batch or recipe.tune_batch,
                                 weight_decay=recipe.weight_decay if a.weight_decay is None else a.weight_decay)
    cycles = a.cycles or (4 if a.quick else recipe.cycles)
    a.release_scale = recipe.release_scale if a.release_scale is None else a.release_scale
    a.mask_steps = a.mask_steps or recipe.mask_steps or CYCLE_DEFAULTS["mask_steps"]
    a.lasso_every = a.lasso_every or CYCLE_DEFAULTS["lasso_every"]
    sched = a.sparsity or [recipe.sparsity or CYCLE_DEFAULTS["sparsity"]]
    sparsity = [sched[min(c, len(sched) - 1)] for c in range(cycles)]
    methods = ["gradual", "no-release", "squeeze-release"] if a.baselines else list(dict.fromkeys(a.method))

    splits = []
    for k in range(a.folds):
        if a.folds > 1:
            print(f"[folds] fold {k + 1}/{a.folds}", file=sys.stderr, flush=True)
        splits.append(run_split(a, recipe, cycles, sparsity, methods, load(a.dataset, a.seed, a.folds, k)))
    params_dense = splits[0]["params_dense"]
    dense_test = float(np.mean([sp["curves"]["one-shot"][0]["test"] for sp in splits]))
    dense_val = float(np.mean([sp["curves"]["one-shot"][0]["val"] for sp in splits]))
    rows: dict[str, dict] = {}
    picks: dict[str, int] = {}
    for method in methods + ["one-shot"]:
        curves = [sp["curves"][method] for sp in splits]
        j = picks[method] = select(curves, a.tolerance)
        picked = [c[j] for c in curves]
        rows[method] = dict(params=round(float(np.mean([p["params"] for p in picked]))),
                            compression=round(float(np.mean([params_dense / p["params"] for p in picked])), 3),
                            accuracy=float(np.mean([p["test"] for p in picked])), picked=picked[0]["label"],
                            seconds=round(sum(sp["seconds"].get(method, 0.0) for sp in splits), 1))
        rows[method]["curves"] = curves  # every candidate of every split: what the rule chose from
        if a.folds > 1:
            rows[method]["folds"] = [dict(params=p["params"], compression=round(params_dense / p["params"], 3),
                                          test=p["test"], dense_test=c[0]["test"]) for p, c in zip(picked, curves)]
        res = splits[0]["results"].get(method)
        if a.folds == 1 and res is not None:
            rows[method]["history"] = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in h.items()}
                                       for h in res.history]
    shot = rows.pop("one-shot")
    result = splits[0]["results"].get("squeeze-release") if a.folds == 1 else None
    if result is not None:
        assert rows["squeeze-release"]["picked"] == (f"cycle {result.best_cycle}" if result.best_cycle else "dense")
    seconds = time.perf_counter() - t_start

    split = "the fixed split" if a.folds == 1 else f"{a.folds}-fold cross-validation (means over the folds' models)"
    print(f"\n{a.model} on {a.dataset}, seed {a.seed}, {split}: {cycles} cycles x {a.mask_steps + 1} train calls of "
          f"{recipe.epochs} epochs each (the gradual baseline: the same {cycles * (a.mask_steps + 1)} calls)")
    if result is not None:
        print("Squeeze-Release per cycle (accuracy column = validation):")
        print(result.table())
    print(f"\n{'':<40}{'params':>10}  {'compression':>11}  {'test acc':>8}")
    print(f"{'dense':<40}{params_dense:>10,}  {1.0:>10.2f}x  {100 * dense_test:>7.2f}%")
    print(f"{'one-shot mask+minimize (no training)':<40}{shot['params']:>10,}  {shot['compression']:>10.2f}x  "
          f"{100 * shot['accuracy']:>7.2f}%   ({shot['picked']})")
    for method, r in rows.items():
        print(f"{METHODS[method]:<40}{r['params']:>10,}  {r['compression']:>10.2f}x  {100 * r['accuracy']:>7.2f}%   "
              f"({r['picked']}; {r['seconds']:.0f} s)")
    print(f"{'':<40}published: 39x (FC), 14.8x (ConvNeXt-Tiny); {seconds:.0f} s")
    if result is not None:
        print("kept shapes: " + ", ".join(f"{n} {tuple(p.shape)}" for n, p in result.module.named_parameters()
                                          if p.dim() >= 2))
    if a.plot and result is not None:
        plot(a.plot, result, dense_val, [h["accuracy"] for h in result.history],
             f"Squeeze-Release: {a.model} on {a.dataset}")
        print(f"wrote {a.plot}")
    out = dict(benchmark="squeeze_release", model=a.model, dataset=a.dataset, seed=a.seed, quick=a.quick,
               folds=a.folds, cycles=cycles, epochs=recipe.epochs, recipe=dataclasses.asdict(recipe),
               backoff=not a.no_backoff, structure=a.structure, mask_steps=a.mask_steps, sparsity=sparsity,
               lasso_every=a.lasso_every,
               params_dense=params_dense, accuracy_dense=dense_test, val_accuracy_dense=dense_val,
               one_shot_compression=shot["compression"], one_shot_accuracy=shot["accuracy"],
               one_shot_sparsity=([0.0] + GRID)[picks["one-shot"]], methods=rows,
               seconds=round(seconds, 1), machine=machine())
    if "squeeze-release" in rows:  # the headline fields, as before
        c = rows["squeeze-release"]
        out.update(compression=c["compression"], accuracy_final=c["accuracy"], params_final=c["params"],
                   best_cycle=result.best_cycle if result is not None else c["picked"])
    print(json.dumps(out))
    return out


def read_runs(paths: list[str]) -> list[dict]:
    """The last JSON line of each file (a run's result); files without one are skipped, with a note."""
    runs = []
    for path in paths:
        with open(path) as f:
            lines = [ln for ln in f.read().splitlines() if ln.startswith("{")]
        if not lines:
            print(f"skipped {path}: no JSON line (a run still going, or one that failed)", file=sys.stderr)
            continue
        runs.append(json.loads(lines[-1]))
    return runs


def summarize(paths: list[str]) -> dict:
    """Mean and spread (min-max) over seeds of each (model, dataset, method) in the runs' JSON lines."""
    runs = read_runs(paths)
    groups: dict[tuple[str, str, str], list[tuple[dict, dict]]] = {}
    for r in runs:
        for method, m in r["methods"].items():
            groups.setdefault((r["model"], r["dataset"], method), []).append((r, m))
    print("| model | data | method | seeds | compression mean (min-max) | test acc mean (min-max) | dense test acc mean | drop (pt) |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    table = []
    for (model, dataset, method), rs in sorted(groups.items()):
        comp = [m["compression"] for _, m in rs]
        acc = [100 * m["accuracy"] for _, m in rs]
        dense = [100 * r["accuracy_dense"] for r, _ in rs]
        drop = float(np.mean(dense) - np.mean(acc))
        seeds = ",".join(str(r["seed"]) for r, _ in rs)
        print(f"| {model} | {dataset} | {METHODS[method]} | {seeds} | {np.mean(comp):.1f}x ({min(comp):.1f}-{max(comp):.1f}) | "
              f"{np.mean(acc):.2f}% ({min(acc):.2f}-{max(acc):.2f}) | {np.mean(dense):.2f}% | {drop:+.2f} |")
        table.append(dict(model=model, dataset=dataset, method=method, seeds=seeds, compression=float(np.mean(comp)),
                          accuracy=float(np.mean(acc)), dense=float(np.mean(dense)), drop=drop))
    print("\n| model | data | method | seed | compression | test acc | dense test acc | kept | seconds |")
    print("|---|---|---|---:|---:|---:|---:|---|---:|")
    for (model, dataset, method), rs in sorted(groups.items()):
        for r, m in sorted(rs, key=lambda rm: rm[0]["seed"]):
            print(f"| {model} | {dataset} | {method} | {r['seed']} | {m['compression']:.1f}x | {100 * m['accuracy']:.2f}% | "
                  f"{100 * r['accuracy_dense']:.2f}% | {m['picked']} | {r['seconds']:.0f} |")
    kept_tuned = tuned_rows(groups)
    out = dict(benchmark="squeeze_release_summary", rows=table, kept_tuned=kept_tuned)
    print(json.dumps(out))
    return out


TARGETS = {"fc": 39.0, "convnext": 14.8, "resnet": 10.0, "vit": 10.0}  # compression the issue asks for, within a point


def frontier(paths: list[str]) -> dict:
    """Per (model, dataset, seed), over every model the fixed-split runs recorded (each cycle's minimized and
    fine-tuned model, each gradual step; every method and recipe in ``paths``): the best test accuracy at or above
    the target compression, against the dense model's. Chosen on the test split, so it bounds what any selection
    rule could have kept from these candidates; it is not a result."""
    best: dict[tuple[str, str, int], dict] = {}
    for r in read_runs(paths):
        if r.get("folds", 1) != 1 or r["model"] not in TARGETS:
            continue
        key = (r["model"], r["dataset"], r["seed"])
        row = best.setdefault(key, dict(model=r["model"], dataset=r["dataset"], seed=r["seed"], runs=0, models=0,
                                        at_target=0, drop=None, compression=None))
        row["runs"] += 1
        for m in r["methods"].values():
            for curve in m.get("curves", []):
                dense = curve[0]["test"]
                for c in curve[1:]:
                    models = [tuple(c[k]) for k in ("minimized", "tuned") if k in c] or [(c["val"], c["test"])]
                    for val, test in models:  # (a cycle's kept model is one of its two)
                        row["models"] += 1
                        compression = r["params_dense"] / c["params"]
                        if compression < TARGETS[r["model"]]:
                            continue
                        row["at_target"] += 1
                        drop = 100 * (dense - test)
                        if row["drop"] is None or drop < row["drop"]:
                            row.update(drop=drop, compression=compression)
    print("| model | data | seed | runs | models | at the target | best test drop there (pt) | its compression |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    rows = [best[k] for k in sorted(best)]
    for w in rows:
        at = "none" if w["drop"] is None else f"{w['drop']:+.2f}"
        comp = "" if w["compression"] is None else f"{w['compression']:.1f}x"
        print(f"| {w['model']} | {w['dataset']} | {w['seed']} | {w['runs']} | {w['models']} | {w['at_target']} | {at} | {comp} |")
    out = dict(benchmark="squeeze_release_frontier", targets=TARGETS, rows=rows)
    print(json.dumps(out))
    return out


def tuned_curve(curve: Curve) -> Curve:
    """A cycle method's candidates with each cycle's fine-tuned model in place of the kept one (the more accurate
    on validation of the minimized and the fine-tuned model)."""
    return [c if "tuned" not in c else dict(c, val=c["tuned"][0], test=c["tuned"][1]) for c in curve]


def tuned_rows(groups: dict[tuple[str, str, str], list[tuple[dict, dict]]], tolerance: float = 0.01) -> list[dict]:
    """The accuracy rule re-applied to the recorded candidates with every cycle's fine-tuned model kept: a check
    of how much choosing per cycle on validation, and then again across cycles, costs on test."""
    def figures(r: dict, curves: list[Curve], j: int) -> tuple[float, float]:  # mean compression, test drop (pt)
        return (float(np.mean([r["params_dense"] / cv[j]["params"] for cv in curves])),
                100 * float(np.mean([cv[0]["test"] - cv[j]["test"] for cv in curves])))

    rows = []
    for (model, dataset, method), rs in sorted(groups.items()):
        rs = [(r, m) for r, m in rs if "curves" in m and any("tuned" in c for cv in m["curves"] for c in cv)]
        if not rs:
            continue
        per_run = []
        for r, m in rs:
            j = select(m["curves"], tolerance)
            if m["curves"][0][j]["label"] != m["picked"]:
                raise ValueError(f"seed {r['seed']}, {method}: the recorded pick ({m['picked']}) is not the rule's "
                                 f"at tolerance {tolerance} ({m['curves'][0][j]['label']}): a run with another --tolerance?")
            tuned = [tuned_curve(cv) for cv in m["curves"]]
            per_run.append(figures(r, m["curves"], j) + figures(r, tuned, select(tuned, tolerance)))
        kept_compression, kept_drop, tuned_compression, tuned_drop = (float(np.mean(col)) for col in zip(*per_run))
        rows.append(dict(model=model, dataset=dataset, method=method, seeds=",".join(str(r["seed"]) for r, _ in rs),
                         kept_compression=kept_compression, kept_drop=kept_drop, tuned_compression=tuned_compression,
                         tuned_drop=tuned_drop))
    if rows:
        print("\nThe same rule with each cycle's fine-tuned model kept instead of the better of the two on validation:")
        print("| model | data | method | seeds | compression, kept | drop, kept (pt) | compression, fine-tuned | drop, fine-tuned (pt) |")
        print("|---|---|---|---|---:|---:|---:|---:|")
        for w in rows:
            print(f"| {w['model']} | {w['dataset']} | {METHODS[w['method']]} | {w['seeds']} | {w['kept_compression']:.1f}x | "
                  f"{w['kept_drop']:+.2f} | {w['tuned_compression']:.1f}x | {w['tuned_drop']:+.2f} |")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
