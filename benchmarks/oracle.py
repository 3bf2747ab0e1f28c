"""Compression against the oracle: how much of the provably removable structure ``minimize`` removes, and how far
a random mask's non-zeros are from the parameters left.

    python benchmarks/oracle.py
    python benchmarks/oracle.py --size full          # ConvNeXt-Tiny, ViT-Base, GPT-2 small configs

Planted: each model gets dead units whose removable parameters are known in closed form. FC 64-300-100-10 with
dead units in both hidden layers (zero input rows, non-zero biases): the oracle is the narrower FC network. The
MLPs of transformers' ConvNeXt, ViT and GPT-2 with a quarter of their hidden units dead: each dead unit frees
its input row, its bias and its output column. Reported: removable parameters, removed, and the fraction
(target 1.0), with the float64 relative error left (exact: <= 1e-9).

Random masks: the FC network at 50/80/90/95% unstructured sparsity (untrained, random mask): the parameters
``minimize`` leaves against the non-zeros of the mask (what a sparse format would store). Last line: JSON.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
from torch import nn

import fxprune as fp
from fxprune.verify import count_params
from planted import MLP, logits, out_dim, planted, rel_err

def fc(widths: tuple[int, ...]) -> nn.Module:
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def planted_fc(dead: tuple[int, int] = (200, 60)) -> dict:
    torch.manual_seed(0)
    model = fc((64, 300, 100, 10)).double().eval()
    with torch.no_grad():
        model[0].weight[: dead[0]] = 0
        model[2].weight[: dead[1]] = 0
    oracle = count_params(fc((64, 300 - dead[0], 100 - dead[1], 10)))
    x = torch.randn(16, 64, dtype=torch.float64)
    small = fp.minimize(fp.capture(model, (x,)))
    return dict(model="fc 64-300-100-10", removable=count_params(model) - oracle,
                removed=count_params(model) - count_params(small), f64_rel=rel_err(model(x), small(x)))


def planted_transformer(name: str, size: str, frac: float = 0.25) -> dict:
    model, inputs, dead = planted(name, size, frac)
    removable = 0
    for path, idx in dead.items():  # each dead unit frees its input row, its bias and its output column
        w = model.get_submodule(path).weight
        nxt = model.get_submodule(path[: -len(MLP[name][0])] + MLP[name][1])
        removable += len(idx) * (w.shape[1 - out_dim(name)] + 1 + nxt.weight.numel() // w.shape[out_dim(name)])
    with torch.no_grad():
        ref = logits(model(*inputs))
        small = fp.minimize(fp.capture(model, inputs))
        err = rel_err(ref, logits(small(*inputs)))
    return dict(model=f"{name} ({size}) MLP units", removable=removable,
                removed=count_params(model) - count_params(small), f64_rel=err)


def random_masks(sparsities: list[float]) -> list[dict]:
    torch.manual_seed(0)
    model = fc((64, 300, 100, 10)).double().eval()
    x = torch.randn(16, 64, dtype=torch.float64)
    gm = fp.capture(model, (x,))
    rows = []
    for s in sparsities:
        masked = fp.mask(gm, s, criterion="random", seed=0)
        small = fp.minimize(masked)
        nonzeros = sum(int((p != 0).sum()) for p in masked.parameters())
        rows.append(dict(sparsity=s, params=count_params(gm), nonzeros=nonzeros, params_left=count_params(small),
                         left_over_nonzeros=count_params(small) / nonzeros))
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=["tiny", "full"], default="tiny")
    a = ap.parse_args(argv)
    planted = [planted_fc()] + [planted_transformer(n, a.size) for n in MLP]
    print(f"{'planted dead structure':<30} {'removable':>11} {'removed':>11} {'fraction':>9} {'f64 rel err':>12}")
    for r in planted:
        r["fraction"] = r["removed"] / r["removable"]
        print(f"{r['model']:<30} {r['removable']:>11,} {r['removed']:>11,} {r['fraction']:>9.3f} {r['f64_rel']:>12.1e}")
    rnd = random_masks([0.5, 0.8, 0.9, 0.95])
    print(f"\n{'FC, random mask':<30} {'params':>11} {'non-zeros':>11} {'params left':>12} {'left/nnz':>9}")
    for r in rnd:
        print(f"{'sparsity ' + format(r['sparsity'], '.0%'):<30} {r['params']:>11,} {r['nonzeros']:>11,} "
              f"{r['params_left']:>12,} {r['left_over_nonzeros']:>9.2f}")
    out = dict(benchmark="oracle", size=a.size, planted=planted, random_masks=rnd)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
