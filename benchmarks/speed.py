"""Pass speed against Torch-Pruning: remove the same dead MLP hidden units from ConvNeXt-Tiny, ViT-Base, GPT-2 small.

    python benchmarks/speed.py                      # default configs, random weights, float64
    python benchmarks/speed.py --size tiny --repeats 3

Each model gets planted dead MLP hidden units (a quarter of each MLP's units: zero input rows; the MLP biases
are drawn from N(0, 0.1), since transformers initializes them to 0 and trained ones are not). fxprune: ``capture`` + ``minimize`` (its default path, the
self-check included), with its default dynamic batch and with static shapes (``dynamic_shapes=None``) side by
side: the cost of dynamic capture and of checking at batch 1 and a larger batch. Torch-Pruning: build the ``DependencyGraph`` and prune the same units from every MLP.
Both run in one process, alternating (with one plain no-grad forward of the model, the unit both times are also
expressed in), ``--repeats`` times; the table shows medians, the ratio, the parameters each leaves and the float64 relative error each leaves against the original model (Torch-Pruning drops a dead
unit's constant output ``act(bias)``; fxprune folds it into the next bias). Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from typing import Any, Callable

import torch
from torch import nn

import fxprune as fp
from fxprune.verify import count_params
from planted import MLP, logits, planted, rel_err

def outputs(m: Any, inputs: tuple[Any, ...]) -> torch.Tensor:
    with torch.no_grad():
        return logits(m(*inputs)).double()


def run_fxprune(model: nn.Module, inputs: tuple[Any, ...], dead: dict[str, list[int]]) -> nn.Module:
    """The default path: dynamic batch capture, minimize checked at the example and at batch 1 and a larger one."""
    return fp.minimize(fp.capture(model, inputs))


def run_fxprune_static(model: nn.Module, inputs: tuple[Any, ...], dead: dict[str, list[int]]) -> nn.Module:
    """Static shapes (``dynamic_shapes=None``): one export at the example's shapes, checked there only."""
    return fp.minimize(fp.capture(model, inputs, dynamic_shapes=None))


def run_forward(model: nn.Module, inputs: tuple[Any, ...], dead: dict[str, list[int]]) -> nn.Module:
    """One no-grad forward of the model: the unit the table expresses both tools' times in."""
    outputs(model, inputs)
    return model


def run_torch_pruning(model: nn.Module, inputs: tuple[Any, ...], dead: dict[str, list[int]]) -> nn.Module:
    import torch_pruning as tp

    m = copy.deepcopy(model)  # Torch-Pruning prunes in place; fxprune is pure: copy for a like-for-like result
    dg = tp.DependencyGraph().build_dependency(m, example_inputs=inputs[0] if len(inputs) == 1 else inputs,
                                               verbose=False)
    for path, idx in dead.items():
        mod = m.get_submodule(path)
        fn = tp.prune_linear_out_channels if isinstance(mod, nn.Linear) else tp.prune_conv_out_channels
        group = dg.get_pruning_group(mod, fn, idxs=idx)
        if dg.check_pruning_group(group):
            group.prune()
    return m


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=["tiny", "full"], default="full")
    ap.add_argument("--models", nargs="+", default=["convnext", "vit", "gpt2"], choices=list(MLP))
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    rows = []
    for name in a.models:
        model, inputs, dead = planted(name, a.size)
        ref = outputs(model, inputs)
        tools: dict[str, Callable[..., nn.Module]] = {"fxprune": run_fxprune, "fxprune-static": run_fxprune_static,
                                                      "torch-pruning": run_torch_pruning, "forward": run_forward}
        times: dict[str, list[float]] = {k: [] for k in tools}
        result: dict[str, Any] = {}
        for _ in range(a.repeats):
            for tool, fn in tools.items():  # alternating
                t0 = time.perf_counter()
                try:
                    out = fn(model, inputs, dead)
                except Exception as e:  # a tool that cannot handle the model: reported, not fatal
                    result[tool] = f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
                    continue
                times[tool].append(time.perf_counter() - t0)
                result[tool] = out
        row: dict[str, Any] = dict(model=name, size=a.size, params=count_params(model),
                                   removable=sum(len(i) for i in dead.values()))
        row["forward_s"] = statistics.median(times.pop("forward"))
        for tool in ("fxprune", "fxprune-static", "torch-pruning"):
            out = result[tool]
            key = tool.replace("-", "_")
            if isinstance(out, str):
                row.update({f"{key}_error": out})
                continue
            row.update({f"{key}_s": statistics.median(times[tool]), f"{key}_params": count_params(out),
                        f"{key}_f64_rel": rel_err(ref, outputs(out, inputs))})
        if "fxprune_s" in row and "torch_pruning_s" in row:
            row["ratio"] = row["fxprune_s"] / row["torch_pruning_s"]
        if "fxprune_s" in row and "fxprune_static_s" in row:
            row["dynamic_over_static"] = row["fxprune_s"] / row["fxprune_static_s"]
        rows.append(row)
        print(f"[speed] {name}: done", file=sys.stderr, flush=True)

    print(f"{'model':<9} {'params':>12} {'tool':<14} {'median s':>9} {'params left':>12} {'f64 rel err':>12}")
    for r in rows:
        for tool in ("fxprune", "fxprune_static", "torch_pruning"):
            if f"{tool}_error" in r:
                print(f"{r['model']:<9} {r['params']:>12,} {tool:<14} failed: {r[f'{tool}_error']}")
                continue
            print(f"{r['model']:<9} {r['params']:>12,} {tool:<14} {r[f'{tool}_s']:>9.2f} {r[f'{tool}_params']:>12,} "
                  f"{r[f'{tool}_f64_rel']:>12.1e}")
        if "ratio" in r:
            print(f"{'':<9} {'':>12} {'fxprune / TP':<14} {r['ratio']:>8.2f}x")
        if "dynamic_over_static" in r:
            print(f"{'':<9} {'':>12} {'dyn / static':<14} {r['dynamic_over_static']:>8.2f}x")
        print(f"{'':<9} {'':>12} {'one forward':<14} {r['forward_s']:>9.2f}   (fxprune = "
              f"{r.get('fxprune_s', float('nan')) / r['forward_s']:.1f} forwards, Torch-Pruning = "
              f"{r.get('torch_pruning_s', float('nan')) / r['forward_s']:.1f})")
    out = dict(benchmark="speed", repeats=a.repeats, rows=rows)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
