"""Deployed speedup: CPU latency and peak memory of the minimized model against the same masked model kept dense
and against ``torch.nn.utils.prune``, at 50/80/90/95% sparsity.

    python benchmarks/latency.py                          # FC, ConvNeXt-Tiny, GPT-2 small (default configs)
    python benchmarks/latency.py --models fc --repeats 50
    python benchmarks/latency.py --masks weights          # unstructured masks instead of whole units
    python benchmarks/latency.py --device cuda --dtype bfloat16 --batch 64   # on a GPU
    python benchmarks/latency.py --level module           # the user's own class: fp.minimize_module
    python benchmarks/latency.py --models vit gpt2 --stream 0.5   # half the residual stream dead too

Masks, on random (untrained) weights:
- ``units`` (default): the given fraction of every MLP's hidden units, smallest L2 norm of their input weights,
  zeroed whole (the structure Squeeze-Release training ends with); ``torch.nn.utils.prune.ln_structured`` on the
  same units.
- ``weights``: per-layer magnitude masks on every weight with ndim >= 2 (a global threshold on random weights
  empties whole layers whose init scale is smallest, making the model constant); ``l1_unstructured``. Only rows
  and columns that happen to be all zero go: the rewrite can remove little from such a mask.
Latency: median of at least ``--repeats`` forwards (as many as fit in 3 s for fast models) after three warm-up
calls, the three variants alternating, float32,
``torch.set_num_threads`` left as is. Memory: bytes of parameters and floating buffers (torch.nn.utils.prune keeps
the original weight and the mask besides: counted), and peak = those + the most bytes the forward holds at once
(allocation and free events of the torch profiler, ``profile_memory=True``). Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import statistics
import sys
import time
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

import fxprune as fp
from fxprune import zoo
from planted import MLP, out_dim


def fc_model() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
    return model.eval(), (torch.randn(256, 64),)


def build(name: str) -> tuple[nn.Module, tuple[Any, ...]]:
    if name == "fc":
        return fc_model()
    return zoo.build(name, "full")


def plant_stream(model: nn.Module, name: str, fraction: float) -> int:
    """Make the first ``fraction`` of a transformer's residual-stream channels dead (``zoo.plant_dead_stream``):
    minimize then removes them and keeps the norms' statistics with compensated norms. Returns how many."""
    if name not in ("vit", "gpt2"):
        raise SystemExit(f"--stream needs a transformer with one stream width (vit, gpt2), not {name}")
    width = getattr(model.config, "hidden_size", None) or model.config.n_embd
    channels = list(range(round(fraction * width)))
    zoo.plant_dead_stream(model, name, channels)
    return len(channels)


def _mlp_in(name: str) -> tuple[str, int]:
    """A pattern for the weights whose output units a "units" mask removes, and their output dim."""
    if name == "fc":
        return r"^(0|2)\.weight$", 0
    return re.escape(MLP[name][0]) + r"\.weight$", out_dim(name)


def unit_masks(gm: nn.Module, name: str, sparsity: float) -> dict[str, torch.Tensor]:
    """Bool masks (True = keep) zeroing the ``sparsity`` fraction of each MLP's units with the smallest L2 norm."""
    pattern, dim = _mlp_in(name)
    out = {}
    for n, p in gm.named_parameters():
        if re.search(pattern, n):
            norms = p.detach().norm(dim=1 - dim)
            drop = norms.argsort()[: int(round(sparsity * norms.numel()))]
            keep = torch.ones(norms.numel(), dtype=torch.bool)
            keep[drop] = False
            out[n] = keep.unsqueeze(1 - dim).expand_as(p).clone()
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_bytes(f: Any, inputs: tuple[Any, ...], device: str = "cpu") -> int:
    """Weight bytes + the most bytes one forward holds at once (torch profiler allocation and free events; on a
    GPU, CUDA's peak allocation above what was allocated before the forward)."""
    from torch.profiler import ProfilerActivity, profile

    if device.startswith("cuda"):
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with torch.no_grad():
            f(*inputs)
        sync(device)
        return weight_bytes(f) + torch.cuda.max_memory_allocated() - before

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        f(*inputs)
    live = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        peak = max(peak, live)
    return weight_bytes(f) + peak


def weight_bytes(m: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers())
               if t.is_floating_point() or t.dtype == torch.bool)


def torch_prune(model: nn.Module, name: str, sparsity: float, kind: str) -> nn.Module:
    m = copy.deepcopy(model)
    if kind == "units":
        pattern, dim = _mlp_in(name)
        for path, mod in m.named_modules():
            if isinstance(getattr(mod, "weight", None), nn.Parameter) and re.search(pattern, f"{path}.weight"):
                prune.ln_structured(mod, "weight", amount=sparsity, n=2, dim=dim)
        return m
    params = [(mod, "weight") for mod in m.modules() if getattr(mod, "weight", None) is not None
              and isinstance(mod.weight, nn.Parameter) and mod.weight.dim() >= 2]
    for mod, w in params:  # per layer, like fp.mask(..., scope="layer")
        prune.l1_unstructured(mod, w, amount=sparsity)
    return m


def latency(fns: dict[str, Any], inputs: tuple[Any, ...], repeats: int, budget_s: float = 3.0,
            device: str = "cpu") -> dict[str, float]:
    """Median seconds per forward of each variant, alternating; at least ``repeats`` rounds, more for fast models
    (as many as fit in ``budget_s``), after three warm-up calls each (on a GPU, each forward waits for its kernels)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        t0 = time.perf_counter()
        for f in fns.values():
            for _ in range(3):
                f(*inputs)  # warm-up
        sync(device)
        per_round = (time.perf_counter() - t0) / 3
        rounds = max(repeats, min(2000, int(budget_s / max(per_round, 1e-9))))
        for _ in range(rounds):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f(*inputs)
                sync(device)
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["fc", "convnext", "gpt2"], choices=["fc", "convnext", "vit", "gpt2"])
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.8, 0.9, 0.95])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--masks", choices=["units", "weights"], default="units")
    ap.add_argument("--device", default="cpu", help="where the models run (cuda: a GPU)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    ap.add_argument("--batch", type=int, default=None, help="repeat the example inputs to this batch size")
    ap.add_argument("--stream", type=float, default=0.0,
                    help="also make this fraction of the residual stream's channels dead (vit, gpt2): the minimized "
                         "model's norms are then compensated ones")
    ap.add_argument("--level", choices=["graph", "module"], default="graph",
                    help="graph: fp.capture's graph, masked and minimized; module: the model's own class with the "
                         "masks applied, and fp.minimize_module's result")
    a = ap.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    rows = []
    for name in a.models:
        model, inputs = build(name)
        stream = plant_stream(model, name, a.stream) if a.stream else 0
        if a.batch:
            inputs = tuple(x.repeat(a.batch // x.shape[0], *[1] * (x.dim() - 1)) if isinstance(x, torch.Tensor) else x
                           for x in inputs)
        model = model.to(a.device, dtype)
        inputs = tuple(x.to(a.device, dtype) if x.is_floating_point() else x.to(a.device) for x in inputs)
        gm = fp.capture(model, inputs)
        for s in a.sparsities:
            masked = fp.mask(gm, masks=unit_masks(gm, name, s)) if a.masks == "units" else fp.mask(gm, s, scope="layer")
            small = fp.minimize(masked)
            if a.level == "module":  # the same masks on the user's class (torch.export and FX keep parameter names)
                held = masked.meta["fxprune_masks"]
                masked = copy.deepcopy(model)
                with torch.no_grad():
                    for n, p in masked.named_parameters():
                        if n in held:
                            p.mul_(held[n].to(p.device, p.dtype))
                small = fp.minimize_module(masked, inputs)
            tnp = torch_prune(model, name, s, a.masks)
            variants = {"masked": masked, "minimized": small, "torch_prune": tnp}
            lat = latency(variants, inputs, a.repeats, device=a.device)
            rows.append(dict(model=name, sparsity=s, masks=a.masks, stream_channels_removed=stream, **{f"{k}_ms": 1e3 * v for k, v in lat.items()},
                             **{f"{k}_bytes": weight_bytes(v) for k, v in variants.items()},
                             **{f"{k}_peak_bytes": peak_bytes(v, inputs, a.device) for k, v in variants.items()},
                             speedup=lat["masked"] / lat["minimized"]))
            print(f"[latency] {name} at {s:.0%}", file=sys.stderr, flush=True)
    print(f"masks: {a.masks}; stream channels dead: {a.stream:.0%}; level {a.level}; {a.device}, {a.dtype}, inputs {[tuple(x.shape) for x in inputs]}; "
          "MB = weights / peak (weights + most bytes held during the forward)")
    print(f"{'model':<9} {'sparsity':>8} {'masked ms':>10} {'minimized ms':>13} {'prune ms':>9} {'speedup':>8} "
          f"{'masked MB':>14} {'minimized MB':>14} {'prune MB':>14}")
    for r in rows:
        mb = {k: f"{r[f'{k}_bytes'] / 1e6:.2f} / {r[f'{k}_peak_bytes'] / 1e6:.2f}" for k in ("masked", "minimized", "torch_prune")}
        print(f"{r['model']:<9} {r['sparsity']:>8.0%} {r['masked_ms']:>10.2f} {r['minimized_ms']:>13.2f} "
              f"{r['torch_prune_ms']:>9.2f} {r['speedup']:>7.2f}x {mb['masked']:>14} {mb['minimized']:>14} "
              f"{mb['torch_prune']:>14}")
    out = dict(benchmark="latency", repeats=a.repeats, threads=torch.get_num_threads(), device=a.device,
               dtype=a.dtype, batch=a.batch, level=a.level, stream=a.stream, rows=rows)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
