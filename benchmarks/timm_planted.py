"""Planted dead MLP units in timm models: how many parameters ``fp.minimize`` removes from the graph, and
``fp.minimize_module`` from the model's own class, in float64.

    pip install --no-deps timm              # not a dependency of fxprune; its models need only torch here
    python benchmarks/timm_planted.py gmlp_s16_224 pvt_v2_b0 vit_tiny_patch16_224

Each model is built with random weights, its classifier removed (``reset_classifier(0)``: timm zero-initializes
some heads, which would make the output constant and the check vacuous), in float64, eval mode, batch 2 at its
default input size (64 x 64 for the ViT-, Mixer- and gMLP-style models that take ``img_size``). A quarter of every
MLP's hidden units (rows of ``mlp.fc1`` and its bias, chosen at random) are zero. Reported: parameters before and
after each path, the largest relative difference of the graph's output from the model's, how many ``index_select``
nodes the graph holds (split norms: outputs a LayerNorm keeps fewer of than its inputs), the capture method and
the seconds. Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import fxprune as fp
from fxprune.verify import count_params
from timm_forwards import plant_dead_units
from torchvision_zoo import stub_meta_registrations

SMALL_IMAGE = ("gmlp", "mixer", "vit_", "deit", "eva", "beit", "flexivit", "samvit", "gmixer")


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor, int]:
    stub_meta_registrations()  # timm imports torchvision
    import timm

    torch.manual_seed(0)
    small = any(k in name for k in SMALL_IMAGE)
    model = timm.create_model(name, img_size=64) if small else timm.create_model(name)
    model.reset_classifier(0)
    model = model.double().eval()
    g = torch.Generator().manual_seed(0)
    dead = plant_dead_units(model, g)
    size = (3, 64, 64) if small else model.pretrained_cfg["input_size"]
    return model, torch.randn(2, *size, dtype=torch.float64, generator=g), dead


def run(name: str) -> dict:
    model, x, dead = build(name)
    t0 = time.perf_counter()
    gm = fp.capture(model, (x,))
    small = fp.minimize(gm)
    graph_s = time.perf_counter() - t0
    with torch.no_grad():
        ref = model(x)
        err = float((small(x) - ref).abs().max() / ref.abs().max())
    t0 = time.perf_counter()
    mine = fp.minimize_module(model, (x,))
    module_s = time.perf_counter() - t0
    selects = sum(n.op == "call_function" and "index_select" in str(n.target) for n in small.graph.nodes)
    return dict(model=name, dead_units=dead, params=count_params(model), graph_params=count_params(small),
                module_params=count_params(mine), module_class=type(mine).__name__, rel_err=err, selects=selects,
                capture=gm.meta.get("fxprune_capture_method"), graph_s=round(graph_s, 1), module_s=round(module_s, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="timm model names")
    a = ap.parse_args()
    rows = [run(n) for n in a.models]
    print(f"{'model':<24} {'dead units':>10} {'params':>12} {'graph':>12} {'own class':>12} {'rel err':>8} "
          f"{'selects':>7} {'capture':>8}")
    for r in rows:
        print(f"{r['model']:<24} {r['dead_units']:>10,} {r['params']:>12,} {r['graph_params']:>12,} "
              f"{r['module_params']:>12,} {r['rel_err']:>8.1e} {r['selects']:>7} {r['capture']:>8}")
    print(json.dumps(dict(benchmark="timm_planted", rows=rows)))


if __name__ == "__main__":
    main()
