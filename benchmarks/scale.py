"""Scale: capture + minimize of Llama-style models of 0.5B-3B parameters, in forwards of the model and in peak memory
over the weights' bytes; a 7B config analyzed on the meta device.

    python benchmarks/scale.py                        # 0.5B and 1B in float32 and bfloat16, 3B in bfloat16, 7B on meta
    python benchmarks/scale.py --configs 1B --dtypes float32

Each model is transformers' ``LlamaForCausalLM`` with random weights (uniform, +-0.02; norms 1) and planted dead
units: a quarter of every MLP's hidden units (zero rows of ``gate_proj`` and ``up_proj``) and one key/value group
per layer (zero columns of ``o_proj`` for the query heads that read it). Input: one sequence of 32 tokens,
``use_cache=False``. Every config runs in its own subprocess, so its peak RSS (``ru_maxrss``) is its own: it
includes the Python process with torch and transformers loaded (``baseline``, measured before the model is
built), the model, and everything capture and minimize hold at their peak. ``minimize`` runs its default path:
the rewrite is checked end to end against the model at the example and at batch 1 and 2. The 7B config is built
on the meta device (no memory for weights) and captured and analyzed there (``fp.analyze``: the channel groups;
``minimize`` needs values). "floor" is, in forwards, what the default path cannot go below whatever its own
analysis and rewrite cost: torch.export alone (called as ``capture`` calls it) plus the forwards the check runs
(the result at each check shape, the model at each but the example). Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

CONFIGS: dict[str, dict[str, int]] = {
    "0.5B": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=14, num_attention_heads=12,
                 num_key_value_heads=4),
    "1B": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=18, num_attention_heads=16,
               num_key_value_heads=4),
    "3B": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=26, num_attention_heads=24,
               num_key_value_heads=8),
    "7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),
}
DEFAULT_RUNS = [("0.5B", "float32"), ("0.5B", "bfloat16"), ("1B", "float32"), ("1B", "bfloat16"), ("3B", "bfloat16"),
                ("7B", "meta")]
SEQ = 32


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB -> GB


def config(name: str) -> Any:
    """The transformers config of ``CONFIGS[name]``: vocabulary 32,000, no KV cache."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, max_position_embeddings=2048, use_cache=False, **CONFIGS[name])


def build(name: str, dtype: Any, device: str) -> Any:
    import torch
    from transformers import LlamaForCausalLM

    cfg = config(name)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.eval()
    if device == "meta":
        return model
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.uniform_(-0.02, 0.02, generator=g)
        for mod in model.modules():  # rotary inv_freq: a non-persistent buffer, computed from the config
            if hasattr(mod, "inv_freq") and hasattr(mod, "compute_default_rope_parameters"):
                inv, _ = mod.compute_default_rope_parameters(mod.config)
                mod.inv_freq.copy_(inv)
                mod.original_inv_freq.copy_(inv)
        plant(model, g)
    return model


def plant(model: Any, g: Any) -> int:
    """Dead MLP units and one dead kv group per layer; returns the parameters that become removable (lower bound)."""
    import torch

    cfg = model.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    per_group = cfg.num_attention_heads // cfg.num_key_value_heads
    removable = 0
    for layer in model.model.layers:
        n = cfg.intermediate_size
        dead = torch.randperm(n, generator=g)[: n // 4]
        layer.mlp.gate_proj.weight[dead] = 0
        layer.mlp.up_proj.weight[dead] = 0
        removable += len(dead) * 3 * cfg.hidden_size
        grp = int(torch.randint(cfg.num_key_value_heads, (1,), generator=g))
        cols = slice(grp * per_group * hd, (grp + 1) * per_group * hd)
        layer.self_attn.o_proj.weight[:, cols] = 0
        removable += 2 * per_group * hd * cfg.hidden_size + 2 * hd * cfg.hidden_size
    return removable


def one(name: str, dtype_name: str) -> dict[str, Any]:
    """Runs in the subprocess: build, time a forward, capture, minimize; report."""
    import torch

    import fxprune as fp
    from fxprune.graph.capture import _export_batch
    from fxprune.verify import count_params
    from planted import Phases, above_floor, check_forwards

    base = rss_gb()
    meta = dtype_name == "meta"
    dtype = torch.float32 if meta else getattr(torch, dtype_name)
    t0 = time.perf_counter()
    model = build(name, dtype, "meta" if meta else "cpu")
    built = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, 32000, (1, SEQ), device="meta" if meta else "cpu")
    row: dict[str, Any] = dict(config=name, dtype=dtype_name, params=params, build_s=built, baseline_gb=base)
    if meta:
        t0 = time.perf_counter()
        gm = fp.capture(model, (ids,))
        row["capture_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        cg = fp.analyze(gm)
        row["analyze_s"] = time.perf_counter() - t0
        row["groups"] = len(cg.groups)
        row["peak_rss_gb"] = rss_gb()
        return row
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        with torch.no_grad():
            model(ids)
        times.append(time.perf_counter() - t0)
    fwd = statistics.median(times)
    with Phases() as ph:
        t0 = time.perf_counter()
        gm = fp.capture(model, (ids,))
        cap = time.perf_counter() - t0
        t0 = time.perf_counter()
        small = fp.minimize(gm)
        mini = time.perf_counter() - t0
    t0 = time.perf_counter()
    _export_batch(model, (ids,))  # the floor: torch.export as capture calls it, plus the check's forwards
    export = time.perf_counter() - t0
    check = check_forwards(model, small, (ids,))
    floor = export + check
    row.update(weights_gb=weights, forward_s=fwd, capture_s=cap, minimize_s=mini, export_s=export, floor_s=floor,
               floor_forwards=floor / fwd, floor_x=(cap + mini) / floor,
               above_floor_forwards=above_floor(ph.seconds, cap + mini, export, check, fwd),
               forwards=(cap + mini) / fwd, params_left=count_params(small),
               checks=[(c.shapes, c.max_rel) for c in small.meta["fxprune_checks"]], peak_rss_gb=rss_gb())
    row["rss_over_weights"] = row["peak_rss_gb"] / weights
    del gm, small
    tp = torch_pruning(model, ids)  # after the peak RSS is read: its copy of the model is its own
    if isinstance(tp, str):
        row["torch_pruning_error"] = tp
    else:
        row.update(torch_pruning_s=tp, torch_pruning_forwards=tp / fwd, over_torch_pruning=(cap + mini) / tp)
    return row


def torch_pruning(model: Any, ids: Any) -> float | str:
    """Seconds Torch-Pruning takes to remove the same dead MLP units (a copy of the model, as fxprune leaves the
    user's untouched; its ``DependencyGraph``; one pruning group per layer), or why it could not."""
    import copy

    import torch

    try:
        import torch_pruning as tp
    except ImportError:
        return "torch_pruning is not installed"
    t0 = time.perf_counter()
    try:
        m = copy.deepcopy(model)
        dg = tp.DependencyGraph().build_dependency(m, example_inputs=ids, verbose=False)
        for layer in m.model.layers:
            dead = (layer.mlp.gate_proj.weight == 0).all(dim=1).nonzero().flatten().tolist()
            group = dg.get_pruning_group(layer.mlp.gate_proj, tp.prune_linear_out_channels, idxs=dead)
            if dg.check_pruning_group(group):
                group.prune()
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
    took = time.perf_counter() - t0
    with torch.no_grad():
        m(ids)  # the pruned model runs
    return took


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS))
    ap.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16", "meta"])
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # internal: run one config in this process
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(one(*a.one)))
        return {}
    runs = [(c, d) for c, d in DEFAULT_RUNS if (a.configs is None or c in a.configs) and (a.dtypes is None or d in a.dtypes)]
    if a.configs and a.dtypes:
        runs = [(c, d) for c in a.configs for d in a.dtypes]
    rows = []
    for c, d in runs:
        p = subprocess.run([sys.executable, __file__, "--one", c, d], capture_output=True, text=True)
        if p.returncode != 0:
            rows.append(dict(config=c, dtype=d, error=(p.stderr.strip().splitlines() or ["?"])[-1][:200]))
        else:
            rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
        print(f"[scale] {c} {d}: done", file=sys.stderr, flush=True)
    print(f"{'config':<6} {'dtype':<9} {'params':>14} {'forward s':>10} {'capture s':>10} {'minimize s':>11} "
          f"{'forwards':>9} {'floor':>6} {'/floor':>7} {'params left':>14} {'peak RSS GB':>12} {'RSS/weights':>12}")
    for r in rows:
        if "error" in r:
            print(f"{r['config']:<6} {r['dtype']:<9} failed: {r['error']}")
        elif r["dtype"] == "meta":
            print(f"{r['config']:<6} {r['dtype']:<9} {r['params']:>14,} {'-':>10} {r['capture_s']:>10.1f} "
                  f"{'analyze ' + format(r['analyze_s'], '.1f'):>11} {'-':>9} {'-':>6} {'-':>7} {'-':>14} {r['peak_rss_gb']:>12.2f} {'-':>12}")
        else:
            print(f"{r['config']:<6} {r['dtype']:<9} {r['params']:>14,} {r['forward_s']:>10.2f} {r['capture_s']:>10.1f} "
                  f"{r['minimize_s']:>11.1f} {r['forwards']:>9.1f} {r['floor_forwards']:>6.1f} {r['floor_x']:>6.2f}x "
                  f"{r['params_left']:>14,} {r['peak_rss_gb']:>12.2f} {r['rss_over_weights']:>12.2f}")
    for r in rows:
        if "above_floor_forwards" in r:
            tp = (f"Torch-Pruning {r['torch_pruning_forwards']:.1f} forwards, fxprune / TP {r['over_torch_pruning']:.2f}x"
                  if "torch_pruning_s" in r else f"Torch-Pruning failed: {r.get('torch_pruning_error')}")
            print(f"{r['config']} {r['dtype']}: fxprune / floor {r['floor_x']:.2f}x ({tp}); above the floor "
                  "(forwards): " + ", ".join(f"{k} {v:.1f}" for k, v in r["above_floor_forwards"].items() if round(v, 1)))
    out = dict(benchmark="scale", seq=SEQ, rows=rows)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
