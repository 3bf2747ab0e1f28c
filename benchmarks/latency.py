"""Deployed speedup: CPU latency and weight memory of the minimized model against the same masked model kept dense
and against ``torch.nn.utils.prune``, at 50/80/90/95% sparsity.

    python benchmarks/latency.py                          # FC, ConvNeXt-Tiny, GPT-2 small (default configs)
    python benchmarks/latency.py --models fc --repeats 50

Masks: per-layer magnitude (each weight with ndim >= 2 at the same sparsity; a global threshold on random
weights empties whole layers whose init scale is smallest, making the model constant), on random weights
(untrained), so only rows and columns that happen to be all zero go: this measures what the rewrite gives for a given mask, not what training
under masks gives (see docs/results.md for that). Latency: median of ``--repeats`` forwards after warm-up, the
three variants alternating, float32, ``torch.set_num_threads`` left as is. Memory: bytes of parameters and
floating buffers (torch.nn.utils.prune keeps the original weight and the mask besides: it is counted).
Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

import fxprune as fp
from fxprune import zoo


def fc_model() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
    return model.eval(), (torch.randn(256, 64),)


def build(name: str) -> tuple[nn.Module, tuple[Any, ...]]:
    if name == "fc":
        return fc_model()
    return zoo.build(name, "full")


def weight_bytes(m: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers())
               if t.is_floating_point() or t.dtype == torch.bool)


def torch_prune(model: nn.Module, sparsity: float) -> nn.Module:
    m = copy.deepcopy(model)
    params = [(mod, "weight") for mod in m.modules() if getattr(mod, "weight", None) is not None
              and isinstance(mod.weight, nn.Parameter) and mod.weight.dim() >= 2]
    for mod, name in params:  # per layer, like fp.mask(..., scope="layer")
        prune.l1_unstructured(mod, name, amount=sparsity)
    return m


def latency(fns: dict[str, Any], inputs: tuple[Any, ...], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for f in fns.values():
            f(*inputs)  # warm-up
        for _ in range(repeats):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f(*inputs)
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["fc", "convnext", "gpt2"], choices=["fc", "convnext", "vit", "gpt2"])
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.8, 0.9, 0.95])
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args(argv)
    rows = []
    for name in a.models:
        model, inputs = build(name)
        gm = fp.capture(model, inputs)
        for s in a.sparsities:
            masked = fp.mask(gm, s, scope="layer")
            small = fp.minimize(masked)
            tnp = torch_prune(model, s)
            lat = latency({"masked": masked, "minimized": small, "torch_prune": tnp}, inputs, a.repeats)
            rows.append(dict(model=name, sparsity=s, **{f"{k}_ms": 1e3 * v for k, v in lat.items()},
                             masked_bytes=weight_bytes(masked), minimized_bytes=weight_bytes(small),
                             torch_prune_bytes=weight_bytes(tnp), speedup=lat["masked"] / lat["minimized"]))
            print(f"[latency] {name} at {s:.0%}", file=sys.stderr, flush=True)
    print(f"{'model':<9} {'sparsity':>8} {'masked ms':>10} {'minimized ms':>13} {'nn.utils.prune ms':>18} {'speedup':>8} "
          f"{'masked MB':>10} {'minimized MB':>13} {'prune MB':>9}")
    for r in rows:
        print(f"{r['model']:<9} {r['sparsity']:>8.0%} {r['masked_ms']:>10.2f} {r['minimized_ms']:>13.2f} "
              f"{r['torch_prune_ms']:>18.2f} {r['speedup']:>7.2f}x {r['masked_bytes'] / 1e6:>10.2f} "
              f"{r['minimized_bytes'] / 1e6:>13.2f} {r['torch_prune_bytes'] / 1e6:>9.2f}")
    out = dict(benchmark="latency", repeats=a.repeats, threads=torch.get_num_threads(), rows=rows)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
