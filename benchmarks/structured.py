"""Structured pruning to a parameter target, side by side with Torch-Pruning: fxprune's structured mask + minimize
against Torch-Pruning's ``BasePruner`` with ``GroupMagnitudeImportance(p=2)``, at the pruning ratio that reaches the
same parameter count.

    python benchmarks/structured.py                                       # five models, 30% and 50%, round_to 1/8/16
    python benchmarks/structured.py --models resnet50 llama --sparsities 0.3 --round-to 1

Models (random weights, float64, eval; BatchNorm statistics and affines randomized as in ``torchvision_zoo.py``):
torchvision ResNet-50, ConvNeXt-Tiny, MobileNetV2 (64x64 images, 10 classes) and ViT-B/16 (32x32 images), and a
transformers Llama (hidden 256, 4 layers, 8 query heads over 4 kv heads, 64 tokens).

fxprune: ``fp.mask(gm, s, structure="groups", round_to=k)`` then ``fp.minimize`` (checked), timed from the
captured graph (capture itself, once per model, in the JSON's ``capture_s``; Llama captured with every dim dynamic,
``dynamic_shapes="every"``, so that it runs at another length). Torch-Pruning: ``BasePruner`` (its
per-layer ratio, the settings of its own examples for each model: classifier ignored; ViT's class token and
position embedding as unwrapped parameters and its heads; Llama's heads, ``prune_num_heads``), ``round_to=k``,
the ratio bisected (8 steps) to the parameter count fxprune reached; the time is one ``step()`` at that ratio.
A tool that has not finished a row in ``--limit`` seconds (default 900) fails it; Torch-Pruning is then not run
again on that model.
Each tool's result is compared in float64 with its own *masked* model, the original with exactly the channels that
tool removed zeroed (every producer of each removed channel: conv/linear rows and biases, norm scales and shifts,
embedding columns, unwrapped parameters), on the example input and on one of another batch size (and for Llama
another length): fxprune is within rounding; what Torch-Pruning differs by is what it drops (the constants of
removed channels that are not zero after an activation or a BatchNorm shift; a LayerNorm's statistics over the
removed stream channels). fxprune's difference is ``fp.verify``'s float64 one (both graphs converted to float64
throughout, dtype casts inside them included); Torch-Pruning's result is the model's own class, run as it is (a
Llama's RMSNorm computes in float32 whatever the weights' dtype). The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import copy
import json
import signal
import sys
import time
import traceback
from typing import Any, Callable

import torch
from torch import nn

import fxprune as fp
from fxprune.verify import count_flops
from torchvision_zoo import build as zoo_build

MODELS = ["resnet50", "convnext_tiny", "mobilenet_v2", "vit_b_16", "llama"]


def build(name: str) -> tuple[nn.Module, tuple[Any, ...], tuple[Any, ...]]:
    """The float64 model, its example inputs and inputs of another batch size (and length)."""
    if name != "llama":
        model, x = zoo_build(name)
        if name == "vit_b_16":
            torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zero-initializes it
        side = x[0].shape[-1]
        return model, x, (torch.randn(3, 3, side, side, dtype=torch.float64),)
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                                   num_key_value_heads=4, vocab_size=1000, max_position_embeddings=256,
                                   use_cache=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).double().eval()
    with torch.no_grad():  # norms away from 1, so that a wrong statistic shows
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    g = torch.Generator().manual_seed(1)
    return model, (torch.randint(0, 1000, (2, 64), generator=g),), (torch.randint(0, 1000, (3, 37), generator=g),)


def count_params(m: nn.Module) -> int:
    """Parameters (what the structured mask's sparsity counts; BatchNorm's running statistics are not in it)."""
    return sum(p.numel() for p in m.parameters())


def logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def rel(a: nn.Module, b: nn.Module, inputs: list[tuple[Any, ...]]) -> float:
    with torch.no_grad():
        errs = []
        for x in inputs:
            ya, yb = logits(a(*x)), logits(b(*x))
            errs.append(float((ya - yb).abs().max() / ya.abs().max().clamp_min(1e-300)))
    return max(errs)


# ---------------------------------------------------------------------------------------------------- fxprune
def run_fxprune(gm: nn.Module, s: float, k: int, inputs: list[tuple[Any, ...]]) -> dict[str, Any]:
    t0 = time.perf_counter()
    masked = fp.mask(gm, s, structure="groups", round_to=k)
    small = fp.minimize(masked)
    sec = time.perf_counter() - t0
    # both graphs run in float64 throughout (fp.verify converts their dtype casts too: Llama's RMSNorm computes in
    # float32 whatever its weights' dtype, and its sums over fewer channels round apart by ~1e-7 in float32)
    err = max(fp.verify(masked, small, x, n_random=0).max_rel["float64"] for x in inputs)
    return dict(params=count_params(small), flops=count_flops(small, inputs[0]), s=sec, err=err)


# ---------------------------------------------------------------------------------------------------- Torch-Pruning
def tp_settings(name: str, model: nn.Module) -> dict[str, Any]:
    """What Torch-Pruning's own examples pass for each model."""
    if name == "llama":
        heads = {}
        for layer in model.model.layers:
            a = layer.self_attn
            heads[a.q_proj] = model.config.num_attention_heads
            heads[a.k_proj] = heads[a.v_proj] = model.config.num_key_value_heads
        return dict(ignored_layers=[model.lm_head], num_heads=heads, prune_num_heads=True, prune_head_dims=False,
                    output_transform=logits)
    if name == "vit_b_16":
        heads = {m: m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
        return dict(ignored_layers=[model.heads], num_heads=heads,
                    unwrapped_parameters=[(model.class_token, 2), (model.encoder.pos_embedding, 2)])
    head = model.classifier if hasattr(model, "classifier") else model.fc
    extra: dict[str, Any] = dict(ignored_layers=[head])
    scales = [(m.layer_scale, 0) for m in model.modules() if hasattr(m, "layer_scale")]
    if scales:
        extra["unwrapped_parameters"] = scales
    return extra


def zero_out(target: Any, idxs: list[int], dims: dict[int, int]) -> None:
    """Zero what produces channels ``idxs`` of ``target`` (the masked model Torch-Pruning's removal stands for)."""
    i = torch.tensor(idxs, dtype=torch.long)
    with torch.no_grad():
        if isinstance(target, nn.Parameter):
            target.index_fill_(dims[id(target)], i, 0.0)
        elif isinstance(target, nn.MultiheadAttention):
            target.out_proj.weight.index_fill_(0, i, 0.0)
            if target.out_proj.bias is not None:
                target.out_proj.bias.index_fill_(0, i, 0.0)
        elif isinstance(target, nn.Embedding):
            target.weight.index_fill_(1, i, 0.0)
        elif isinstance(target, (nn.Linear, nn.Conv2d)) or getattr(target, "weight", None) is not None:
            for p in (target.weight, getattr(target, "bias", None)):
                if isinstance(p, torch.Tensor):
                    p.index_fill_(0 if isinstance(target, (nn.Linear, nn.Conv2d)) else p.dim() - 1, i, 0.0)


def tp_prune(name: str, model: nn.Module, x: tuple[Any, ...], ratio: float, k: int,
             masked: nn.Module | None = None) -> nn.Module:
    """Torch-Pruning on a copy of ``model`` at ``ratio``; with ``masked`` (a copy of ``model``), also zero there
    what it removes."""
    import torch_pruning as tp

    m = copy.deepcopy(model)
    settings = tp_settings(name, m)
    dims = {id(p): d for p, d in settings.get("unwrapped_parameters", [])}
    pruner = tp.pruner.BasePruner(m, x[0] if len(x) == 1 else x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=ratio, round_to=None if k == 1 else k,
                                  head_pruning_ratio=ratio if name == "llama" else 0.0, **settings)
    twin = {id(a): b for a, b in zip(m.modules(), masked.modules())} if masked is not None else {}
    twin.update({id(a): b for a, b in zip(m.parameters(), masked.parameters())} if masked is not None else {})
    for group in pruner.step(interactive=True):
        if masked is not None:
            for dep, idxs in group:
                if dep.handler.__name__ == "prune_out_channels" and id(dep.target.module) in twin:
                    other = twin[id(dep.target.module)]
                    zero_out(other, [int(j) for j in idxs], {id(twin[p]): d for p, d in dims.items() if p in twin})
        group.prune()
    if name == "llama":  # Torch-Pruning's LLM example: the attention modules' head counts follow the pruned widths
        for layer in m.model.layers:
            a = layer.self_attn
            a.num_key_value_groups = a.q_proj.out_features // a.k_proj.out_features
    return m


def run_torch_pruning(name: str, model: nn.Module, x: tuple[Any, ...], k: int, params: int,
                      inputs: list[tuple[Any, ...]]) -> dict[str, Any]:
    lo, hi = 0.0, 0.95
    for _ in range(8):  # the ratio that reaches fxprune's parameter count
        mid = (lo + hi) / 2
        if count_params(tp_prune(name, model, x, mid, k)) > params:
            lo = mid
        else:
            hi = mid
    ratio = min((lo, hi), key=lambda r: abs(count_params(tp_prune(name, model, x, r, k)) - params))
    masked = copy.deepcopy(model)
    t0 = time.perf_counter()
    small = tp_prune(name, model, x, ratio, k, masked)
    sec = time.perf_counter() - t0
    return dict(ratio=ratio, params=count_params(small), flops=count_flops(small, inputs[0]), s=sec,
                err=rel(masked, small, inputs))


def guarded(f: Callable[[], dict[str, Any]], limit: int) -> dict[str, Any]:
    """``f()``, or why it failed: its exception, or ``limit`` seconds passed (an alarm stops it)."""
    def stop(*_: Any) -> None:
        raise TimeoutError(f"did not finish in {limit} s")

    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(limit)
    try:
        return f()
    except Exception as e:  # noqa: BLE001 - what a tool cannot do is a cell of the table
        print(traceback.format_exc()[-1500:], file=sys.stderr)
        return dict(failed=f"{type(e).__name__}: {str(e).splitlines()[0][:140] if str(e) else ''}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.5])
    ap.add_argument("--round-to", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--no-torch-pruning", action="store_true")
    ap.add_argument("--limit", type=int, default=900, help="seconds per tool and row before it counts as failed")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    tp_failed: dict[str, str] = {}
    for name in a.models:
        model, x, other = build(name)
        inputs = [x, other]
        t0 = time.perf_counter()
        gm = fp.capture(model, x, dynamic_shapes="every" if name == "llama" else "batch")
        capture_s = time.perf_counter() - t0
        before, flops = count_params(model), count_flops(model, x)
        for s in a.sparsities:
            for k in a.round_to:
                row: dict[str, Any] = dict(model=name, sparsity=s, round_to=k, params=before, flops=flops,
                                           capture_s=capture_s)
                row["fxprune"] = fx = guarded(lambda: run_fxprune(gm, s, k, inputs), a.limit)
                if not a.no_torch_pruning and "params" in fx and name not in tp_failed:
                    row["torch_pruning"] = tpr = guarded(
                        lambda: run_torch_pruning(name, model, x, k, fx["params"], inputs), a.limit)
                    if "did not finish" in tpr.get("failed", ""):
                        tp_failed[name] = tpr["failed"]  # not tried again at the other targets
                elif name in tp_failed:
                    row["torch_pruning"] = dict(failed=tp_failed[name] + " (at the first target; not run again)")
                rows.append(row)
                print(f"[structured] {name} {s:.0%} round_to={k}: done", file=sys.stderr, flush=True)
    print(f"{'model':<14} {'target':>6} {'k':>3} | {'tool':<13} {'params':>7} {'FLOPs':>7} {'time s':>7} "
          f"{'f64 err vs own mask':>19}")
    for r in rows:
        for tool in ("fxprune", "torch_pruning"):
            c = r.get(tool)
            if c is None:
                continue
            head = f"{r['model']:<14} {r['sparsity']:>6.0%} {r['round_to']:>3} | {tool:<13}"
            if "failed" in c:
                print(f"{head} failed: {c['failed']}")
                continue
            print(f"{head} {1 - c['params'] / r['params']:>7.1%} {1 - c['flops'] / r['flops']:>7.1%} {c['s']:>7.1f} "
                  f"{c['err']:>19.1e}")
    out = dict(benchmark="structured", rows=rows)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
