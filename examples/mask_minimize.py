"""Mask and minimize an MLP and a CNN; print parameters, FLOPs and the equivalence error.

    python examples/mask_minimize.py [--sparsity 0.9]

This is what `make demo` runs until the Squeeze-Release benchmark exists: the smallest end-to-end job
(capture -> mask -> minimize -> verify). The rewrite is exact: the float64 pass checks it at 1e-9 on float64
copies of the models.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

import fxprune as fp
from fxprune.zoo import build


def mlp() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
    return net.eval(), (torch.randn(32, 64),)


def run(name: str, model: nn.Module, inputs: tuple[torch.Tensor, ...], sparsity: float) -> None:
    model = model.double()
    inputs = tuple(x.double() for x in inputs)
    gm = fp.capture(model, inputs)
    masked = fp.mask(gm, sparsity, scope="layer")
    small = fp.minimize(masked)
    rep = fp.verify(masked, small)
    (pa, pb), (fa, fb) = rep.params, rep.flops
    print(f"{name:<5} {sparsity:>8.0%} {pa:>10,} {pb:>10,} {pa / pb:>7.2f}x {fa:>12,} {fb:>12,} "
          f"{rep.max_rel['float64']:>10.1e} {'exact' if rep.ok else 'NOT EXACT'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsity", type=float, nargs="*", default=[0.5, 0.9, 0.98])
    args = ap.parse_args()
    print("fxprune demo (interim: the smallest end-to-end job, until the Squeeze-Release benchmark lands)")
    print("capture -> mask (per-layer magnitude) -> minimize -> verify (float64)")
    print(f"{'model':<5} {'sparsity':>8} {'params':>10} {'after':>10} {'ratio':>8} {'FLOPs':>12} {'after':>12} {'f64 rel':>10}")
    for s in args.sparsity:
        run("mlp", *mlp(), s)
    for s in args.sparsity:
        run("cnn", *build("cnn"), s)


if __name__ == "__main__":
    main()
