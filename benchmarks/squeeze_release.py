"""Squeeze-Release on small networks, against the method's published compression (39x FC, 14.8x ConvNeXt-Tiny).

    python benchmarks/squeeze_release.py --model fc --dataset digits
    python benchmarks/squeeze_release.py --model convnext --dataset mnist1d
    python benchmarks/squeeze_release.py --model fc --dataset digits --quick --plot results.png

Trains the dense model, runs ``fp.squeeze_release`` and, as the baseline, one-shot mask + minimize of the same
dense model at a grid of sparsities (no cycles; the largest compression within the same accuracy budget). Prints
a table and, as its LAST line, one JSON object. Data is generated offline (scikit-learn's digits, mnist1d's
generator); every seed is fixed.

The recipe (the user's side of the cycle, not part of fxprune): Adam, with a group-lasso term in the fine-tuning
optimizer step, which shrinks whole rows and columns of every weight (and entries of 1-D scales: LayerNorm
weights, layer scales) towards zero and sets the ones below the threshold to exact zeros. Exact zeros in a row are
a dead unit, in a column an unread input, in a stream's norm weight and layer scales a constant stream channel:
all structure that ``minimize`` removes exactly. Selection (the cycle's tolerance, the one-shot grid) uses a
validation split; the accuracies reported are on the test split.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import fxprune as fp
from fxprune.verify import count_params

# ----------------------------------------------------------------------------------------------------- data


def load(dataset: str, seed: int) -> dict[str, torch.Tensor]:
    """Train / validation / test splits as float32 tensors, inputs standardized with the train statistics."""
    if dataset == "digits":
        from sklearn.datasets import load_digits
        x, y = load_digits(return_X_y=True)
        perm = np.random.default_rng(seed).permutation(len(x))
        x, y = x[perm] / 16.0, y[perm]
        n_tr, n_va = int(0.6 * len(x)), int(0.2 * len(x))
        parts = dict(train=slice(0, n_tr), val=slice(n_tr, n_tr + n_va), test=slice(n_tr + n_va, None))
        xs = {k: x[s] for k, s in parts.items()}
        ys = {k: y[s] for k, s in parts.items()}
    elif dataset == "mnist1d":
        from mnist1d.data import get_dataset_args, make_dataset
        args = get_dataset_args()
        args.seed = seed
        d = make_dataset(args)
        n_va = len(d["x"]) // 5
        xs = dict(train=d["x"][n_va:], val=d["x"][:n_va], test=d["x_test"])
        ys = dict(train=d["y"][n_va:], val=d["y"][:n_va], test=d["y_test"])
    else:
        raise SystemExit(f"unknown dataset {dataset!r} (digits | mnist1d)")
    mu, sd = xs["train"].mean(0), xs["train"].std(0) + 1e-6
    out = {}
    for k in xs:
        out[f"x_{k}"] = torch.tensor((xs[k] - mu) / sd, dtype=torch.float32)
        out[f"y_{k}"] = torch.tensor(ys[k], dtype=torch.long)
    return out

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

    def stream_slices(self) -> list[list[tuple[str, int]]]:
        """Per residual stream: the (parameter, dim) slices that carry its channels. A stream channel goes only
        when every writer leaves it constant and every reader ignores it, so the recipe's lasso groups them."""
        def block(prefix: str) -> list[tuple[str, int]]:
            return [(f"{prefix}.dwconv.weight", 0), (f"{prefix}.norm.weight", 0), (f"{prefix}.pwconv1.weight", 1),
                    (f"{prefix}.pwconv2.weight", 0), (f"{prefix}.gamma", 0)]
        s1 = [("stem.weight", 0), ("stem_norm.weight", 0), ("down_norm.weight", 0), ("down.weight", 1)]
        s2 = [("down.weight", 0), ("head_norm.weight", 0), ("head.weight", 1)]
        s1 += [sl for i in range(len(self.stage1)) for sl in block(f"stage1.{i}")]
        s2 += [sl for i in range(len(self.stage2)) for sl in block(f"stage2.{i}")]
        return [s1, s2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage1(self.stem_norm(self.stem(x)))
        x = self.stage2(self.down(self.down_norm(x)))
        return self.head(self.head_norm(x.flatten(2).mean(-1)))


def build(model: str, dataset: str) -> tuple[nn.Module, tuple[int, ...]]:
    """The model and the shape of one input sample."""
    sample = {"digits": (8, 8), "mnist1d": (40,)}[dataset]
    if model == "fc":
        return fc(math.prod(sample)), (math.prod(sample),)
    if model == "convnext":
        return ConvNeXtStyle(len(sample)), (1, *sample)
    raise SystemExit(f"unknown model {model!r} (fc | convnext)")

# --------------------------------------------------------------------------------------------------- recipe


@dataclass
class Recipe:
    epochs: int  # per `train` call (each mask step and each release fine-tune)
    dense_epochs: int
    lr: float
    lasso: float  # group-lasso strength in the fine-tuning loss (the dense model trains without it)
    batch: int = 64
    scale_tau: float = 0.0  # 1-D scales below this become exact zeros after each fine-tune (0: never)
    cycles: int = 6


RECIPES = {
    ("fc", "digits"): Recipe(epochs=20, dense_epochs=60, lr=3e-3, lasso=1e-3),
    ("fc", "mnist1d"): Recipe(epochs=20, dense_epochs=60, lr=3e-3, lasso=1e-3),
    ("convnext", "digits"): Recipe(epochs=10, dense_epochs=40, lr=2e-3, lasso=1e-3, scale_tau=1e-2, cycles=8),
    ("convnext", "mnist1d"): Recipe(epochs=10, dense_epochs=40, lr=2e-3, lasso=1e-3, scale_tau=1e-2, cycles=8),
}


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding tensor ``name`` and its attribute (read through a held mask's parametrization)."""
    mod, _, attr = name.rpartition(".")
    return (model.get_submodule(mod) if mod else model), attr


class GroupLasso:
    """Sum of the L2 norms of the rows and columns of every weight, of each residual-stream channel across all its
    slices (``streams``: (tensor name, channel dim)), and the L1 norm of every 1-D scale (norm weights, layer
    scales; not biases). The tensors are looked up once per fine-tuning call, read on every step."""

    def __init__(self, model: nn.Module, streams: list[list[tuple[str, int]]]):
        self.params = list(model.named_parameters())
        self.streams = [[(*_owner(model, n), dim) for n, dim in slices] for slices in streams]

    def __call__(self) -> torch.Tensor:
        terms = []
        for name, p in self.params:
            if p.dim() >= 2:
                w = p.flatten(2) if p.dim() > 2 else p.unsqueeze(-1)  # (out, in, taps)
                terms.append(w.pow(2).sum((1, 2)).add(1e-12).sqrt().sum())
                if w.shape[1] > 1:
                    terms.append(w.pow(2).sum((0, 2)).add(1e-12).sqrt().sum())
            elif p.dim() == 1 and not name.endswith("bias"):
                terms.append(p.abs().sum())
        for slices in self.streams:
            sq = sum(t.pow(2).sum([d for d in range(t.dim()) if d != dim])
                     for t, dim in ((getattr(mod, attr), dim) for mod, attr, dim in slices))
            terms.append(sq.add(1e-12).sqrt().sum())
        return torch.stack(terms).sum()


@torch.no_grad()
def zero_small_scales(model: nn.Module, tau: float) -> None:
    """Set 1-D scales (norm weights, layer scales) with magnitude below ``tau`` to exact zeros. The lasso drives
    unneeded scales towards zero but Adam leaves them hovering there; a zero scale makes its channel constant."""
    for name, p in model.named_parameters():
        if p.dim() == 1 and not name.endswith("bias"):
            p[p.abs() < tau] = 0


class Trainer:
    def __init__(self, data: dict[str, torch.Tensor], sample: tuple[int, ...], recipe: Recipe, seed: int,
                 streams: list[list[tuple[str, int]]]):
        self.data, self.sample, self.recipe, self.seed, self.calls = data, sample, recipe, seed, 0
        self.streams = streams

    def inputs(self, split: str) -> torch.Tensor:
        x = self.data[f"x_{split}"]
        return x.reshape(len(x), *self.sample)

    def train(self, model: nn.Module, epochs: int | None = None, lasso: float | None = None) -> nn.Module:
        r = self.recipe
        self.calls += 1
        g = torch.Generator().manual_seed(self.seed * 1000 + self.calls)
        x, y = self.inputs("train"), self.data["y_train"]
        # foreach: the same updates, bit for bit, with less per-tensor overhead
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=r.lr, foreach=True)
        penalty = GroupLasso(model, self.streams)
        model.train()
        for _ in range(epochs or r.epochs):
            for idx in torch.randperm(len(x), generator=g).split(r.batch):
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x[idx]), y[idx])
                lam = r.lasso if lasso is None else lasso
                (loss + lam * penalty() if lam else loss).backward()
                opt.step()
        if lam and r.scale_tau:
            zero_small_scales(model, r.scale_tau)
        return model

    @torch.no_grad()
    def accuracy(self, model: nn.Module, split: str = "val") -> float:
        model.eval()
        return float((model(self.inputs(split)).argmax(-1) == self.data[f"y_{split}"]).float().mean())

# ------------------------------------------------------------------------------------------------------ run


def one_shot(dense: nn.Module, example: tuple[torch.Tensor, ...], trainer: Trainer, budget: float,
             grid: list[float]) -> dict:
    """Mask the dense model once at each sparsity of ``grid`` and minimize; the smallest within ``budget``."""
    gm = fp.capture(dense, example)
    best = dict(params=count_params(gm), sparsity=0.0, accuracy=trainer.accuracy(gm, "test"))
    for s in grid:
        small = fp.minimize(fp.mask(gm, s), example)
        if trainer.accuracy(small) >= budget and count_params(small) < best["params"]:
            best = dict(params=count_params(small), sparsity=s, accuracy=trainer.accuracy(small, "test"))
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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["fc", "convnext"], default="fc")
    ap.add_argument("--dataset", choices=["digits", "mnist1d"], default="digits")
    ap.add_argument("--cycles", type=int, default=None, help="default: 6 for FC, 8 for ConvNeXt (4 with --quick)")
    ap.add_argument("--sparsity", type=float, nargs="+", default=None,
                    help="final mask sparsity of each cycle (the last value repeats)")
    ap.add_argument("--tolerance", type=float, default=0.01, help="accuracy budget below the dense model")
    ap.add_argument("--quick", action="store_true", help="fewer cycles and epochs (make demo)")
    ap.add_argument("--lasso", type=float, default=None, help="group-lasso strength (default: the recipe's)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per fine-tune call (default: the recipe's)")
    ap.add_argument("--mask-steps", type=int, default=3, help="masking steps per cycle, each followed by fine-tuning")
    ap.add_argument("--dense-lasso", action="store_true", help="train the dense model with the group lasso too")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default=None, help="write a PNG of params and accuracy per cycle")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: these small networks train faster on one, and runs reproduce bit for bit)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    t_start = time.perf_counter()
    recipe = RECIPES[(a.model, a.dataset)]
    if a.quick:
        recipe = dataclasses.replace(recipe, epochs=max(5, recipe.epochs // 2), dense_epochs=recipe.dense_epochs // 2)
    recipe = dataclasses.replace(recipe, epochs=a.epochs or recipe.epochs,
                                 lasso=recipe.lasso if a.lasso is None else a.lasso)
    cycles = a.cycles or (4 if a.quick else recipe.cycles)
    sched = a.sparsity or [0.9]
    sparsity = [sched[min(c, len(sched) - 1)] for c in range(cycles)]

    data = load(a.dataset, a.seed)
    model, sample = build(a.model, a.dataset)
    trainer = Trainer(data, sample, recipe, a.seed, model.stream_slices() if hasattr(model, "stream_slices") else [])
    trainer.train(model, recipe.dense_epochs, lasso=None if a.dense_lasso else 0.0)
    example = (trainer.inputs("train")[:8],)
    acc_dense = trainer.accuracy(model)
    dense_test = trainer.accuracy(model, "test")

    result = fp.squeeze_release(model, example, train=trainer.train, evaluate=trainer.accuracy, cycles=cycles,
                                sparsity=sparsity, mask_steps=a.mask_steps, tolerance=a.tolerance, seed=a.seed,
                                progress=True)
    final_test = trainer.accuracy(result.module, "test")
    shot = one_shot(model, example, trainer, acc_dense - a.tolerance,
                    [0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995])
    seconds = time.perf_counter() - t_start

    params_final = count_params(result.module)
    print(f"\nSqueeze-Release, {a.model} on {a.dataset} (seed {a.seed}; accuracy column = validation)")
    print(result.table())
    print(f"\n{'':<24}{'params':>10}  {'compression':>11}  {'test acc':>8}")
    print(f"{'dense':<24}{result.dense['params']:>10,}  {1.0:>10.2f}x  {100 * dense_test:>7.2f}%")
    print(f"{'one-shot mask+minimize':<24}{shot['params']:>10,}  {result.dense['params'] / shot['params']:>10.2f}x  "
          f"{100 * shot['accuracy']:>7.2f}%   (sparsity {shot['sparsity']})")
    one = result.history[0]
    print(f"{'one cycle (= cycle 1)':<24}{one['params']:>10,}  {one['compression']:>10.2f}x  {'':>8}   "
          f"(validation {100 * one['accuracy']:.2f}%)")
    print(f"{'squeeze-release':<24}{params_final:>10,}  {result.compression:>10.2f}x  {100 * final_test:>7.2f}%   "
          f"(cycle {result.best_cycle})")
    print(f"{'':<24}published: 39x (FC), 14.8x (ConvNeXt-Tiny); {seconds:.0f} s")
    print("kept shapes: " + ", ".join(f"{n} {tuple(p.shape)}" for n, p in result.module.named_parameters()
                                      if p.dim() >= 2))
    if a.plot:
        plot(a.plot, result, acc_dense, [h["accuracy"] for h in result.history],
             f"Squeeze-Release: {a.model} on {a.dataset}")
        print(f"wrote {a.plot}")
    out = dict(benchmark="squeeze_release", model=a.model, dataset=a.dataset, seed=a.seed, quick=a.quick,
               compression=round(result.compression, 3), accuracy_dense=dense_test, accuracy_final=final_test,
               params_dense=result.dense["params"], params_final=params_final, cycles=cycles,
               best_cycle=result.best_cycle, one_shot_compression=round(result.dense["params"] / shot["params"], 3),
               one_shot_accuracy=shot["accuracy"], one_shot_sparsity=shot["sparsity"],
               val_accuracy_dense=acc_dense, history=[{k: (round(v, 4) if isinstance(v, float) else v)
                                                        for k, v in h.items()} for h in result.history],
               seconds=round(seconds, 1))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
