"""Residual-stream channels removed exactly from transformers models, and what plain slicing would do instead.

    python examples/streams.py [--models gpt2 llama vit bert convnext] [--size tiny|full] [--dead 3]

For each model (random weights, float64), ``--dead`` channels of every residual stream are made dead with
``fxprune.zoo.plant_dead_stream`` (embedding columns, writers' rows and biases, norm weights set to zero).
``fp.minimize`` removes them from every tensor of the stream, rewriting the norms that read the stream into
CompensatedLayerNorm form. The table shows the stream width, the parameters, the float64 error against the
planted model, and the float64 error of the same rewrite with the norms' compensation stripped (plain slicing).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import fxprune as fp
from fxprune import zoo
from fxprune.analysis.rule import FULL_MEAN, GHOST_SUM
from fxprune.passes.compensate_layernorm import uncompensate


def run(name: str, size: str, dead: int) -> dict:
    model, inputs = zoo.build(name, size=size, head=True)
    model = model.double()
    inputs = tuple(t.double() if t.is_floating_point() else t for t in inputs)
    zoo.plant_dead_stream(model, name, list(range(1, 1 + 3 * dead, 3)))
    gm = fp.capture(model, inputs)
    t0 = time.perf_counter()
    small = fp.minimize(gm, inputs)
    seconds = time.perf_counter() - t0
    rep = fp.verify(gm, small, inputs)
    plain = fp.verify(gm, uncompensate(small), inputs)
    widths = sorted({(tuple(gm.get_parameter(n).shape)[0], tuple(p.shape)[0]) for n, p in small.named_parameters()
                     if n.endswith(("ln_f.weight", "model.norm.weight", "layernorm.weight", "embeddings.LayerNorm.weight",
                                    "downsampling_layer.0.weight"))})
    compensated = sum(1 for n in small.graph.nodes if "compensated" in str(n.target) or FULL_MEAN in n.meta or GHOST_SUM in n.meta)
    return dict(model=name, stream=", ".join(f"{a}->{b}" for a, b in widths), params_before=rep.params[0],
                params_after=rep.params[1], f64_rel=rep.max_rel["float64"], plain_f64_rel=plain.max_rel["float64"],
                compensated_ops=compensated, exact=rep.ok, minimize_s=round(seconds, 2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=list(zoo.TRANSFORMERS))
    ap.add_argument("--size", default="tiny", choices=["tiny", "full"])
    ap.add_argument("--dead", type=int, default=3, help="dead channels planted per stream")
    args = ap.parse_args()
    rows = [run(m, args.size, args.dead) for m in args.models]
    print(f"| model | stream width | params | float64 rel. error | plain slicing, float64 rel. error | compensated ops |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        plain = f"{r['plain_f64_rel']:.1e}" if r["compensated_ops"] else "-"
        print(f"| {r['model']} | {r['stream']} | {r['params_before']:,} -> {r['params_after']:,} | {r['f64_rel']:.1e} | {plain} "
              f"| {r['compensated_ops']} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
