"""Scaling: time per graph node of capture, analysis and minimize on stacks of 8 to 512 blocks, and a 1B-parameter
Llama-style config analyzed on the meta device.

    python benchmarks/scaling.py
    python benchmarks/scaling.py --depths 8 32 128 --no-llama

Two families: residual MLP blocks (``x + W2 relu(W1 x)``, width 32, a quarter of the hidden units dead) and
pre-norm transformer blocks (LayerNorm, 4-head self-attention through SDPA, GELU MLP; a quarter of the MLP units
dead), both captured with ``torch.fx.symbolic_trace``. For each depth: the node count and the seconds of each
stage; the exponent ``b`` of ``seconds ~ nodes^b`` is fitted by least squares on log-log (1 = linear total
cost). Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import fxprune as fp


class MLPBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.relu(self.fc1(x)))


class TransformerBlock(nn.Module):
    def __init__(self, d: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(a)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


def stack(kind: str, depth: int) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    d = 32
    blocks = [MLPBlock(d) if kind == "mlp" else TransformerBlock(d) for _ in range(depth)]
    model = nn.Sequential(*blocks).eval()
    with torch.no_grad():
        for blk in blocks:
            blk.fc1.weight[::4] = 0
    x = torch.randn(2, d) if kind == "mlp" else torch.randn(2, 8, d)
    return model, (x,)


def measure(kind: str, depth: int) -> dict:
    model, inputs = stack(kind, depth)
    t0 = time.perf_counter()
    gm = fp.capture(model, inputs, method="symbolic")
    t1 = time.perf_counter()
    fp.analyze(gm)
    t2 = time.perf_counter()
    small = fp.minimize(gm)
    t3 = time.perf_counter()
    nodes = len(gm.graph.nodes)
    removed = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in small.parameters())
    return dict(kind=kind, depth=depth, nodes=nodes, capture_s=t1 - t0, analyze_s=t2 - t1, minimize_s=t3 - t2,
                removed=removed)


def exponent(xs: list[float], ys: list[float]) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def llama_on_meta() -> dict:
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                   num_attention_heads=32, num_key_value_heads=4, vocab_size=32000, use_cache=False)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = transformers.LlamaModel(cfg)
    gm = fp.capture(model, (torch.randint(0, 100, (1, 16), device="meta"),))
    t1 = time.perf_counter()
    groups = fp.analyze(gm)
    t2 = time.perf_counter()
    return dict(params=sum(p.numel() for p in model.parameters()), nodes=len(gm.graph.nodes), capture_s=t1 - t0,
                analyze_s=t2 - t1, groups=len(groups.groups), free_groups=sum(not g.frozen for g in groups.groups),
                peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, rss_before_gb=rss0 / 1e6)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[8, 32, 128, 512])
    ap.add_argument("--kinds", nargs="+", default=["mlp", "transformer"], choices=["mlp", "transformer"])
    ap.add_argument("--no-llama", action="store_true")
    a = ap.parse_args(argv)
    measure("mlp", 2)  # warm-up: first-call costs (imports, fake-tensor mode set-up) are not per node
    rows = []
    for kind in a.kinds:
        for depth in a.depths:
            rows.append(measure(kind, depth))
            print(f"[scaling] {kind} x {depth}: {rows[-1]['nodes']} nodes", file=sys.stderr, flush=True)
    print(f"{'stack':<12} {'blocks':>6} {'nodes':>7} {'capture ms/node':>16} {'analyze ms/node':>16} {'minimize ms/node':>17}")
    for r in rows:
        n = r["nodes"]
        print(f"{r['kind']:<12} {r['depth']:>6} {n:>7} {1e3 * r['capture_s'] / n:>16.3f} {1e3 * r['analyze_s'] / n:>16.3f} "
              f"{1e3 * r['minimize_s'] / n:>17.3f}")
    fits = {}
    for kind in a.kinds:
        rs = [r for r in rows if r["kind"] == kind]
        if len(rs) >= 2:
            fits[kind] = {stage: exponent([r["nodes"] for r in rs], [r[f"{stage}_s"] for r in rs])
                          for stage in ("capture", "analyze", "minimize")}
            print(f"fitted exponent ({kind}): " + ", ".join(f"{k} {v:.2f}" for k, v in fits[kind].items()))
    out = dict(benchmark="scaling", rows=rows, exponents=fits)
    if not a.no_llama:
        ll = llama_on_meta()
        print(f"Llama-style {ll['params'] / 1e9:.2f}B on the meta device: capture {ll['capture_s']:.1f} s, analyze "
              f"{ll['analyze_s']:.1f} s, {ll['nodes']} nodes, {ll['free_groups']} free groups of {ll['groups']}, "
              f"peak RSS {ll['peak_rss_gb']:.2f} GB")
        out["llama_meta"] = ll
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
