"""Pass speed against Torch-Pruning: remove the same dead MLP hidden units from ConvNeXt-Tiny, ViT-Base, GPT-2 small.

    python benchmarks/speed.py                      # default configs, random weights, float64 and float32
    python benchmarks/speed.py --size tiny --repeats 3 --dtypes float32

Each model gets planted dead MLP hidden units (a quarter of each MLP's units: zero input rows; the MLP biases are
drawn from N(0, 0.1), since transformers initializes them to 0 and trained ones are not). fxprune's default path
is ``capture`` + ``minimize``: torch.export with a dynamic batch, the analysis and rewrite, and one end-to-end
check of the result against the model at the example and at batch 1 and the next batch size. Beside it: the
unchecked path (``verify=False``), static shapes (``dynamic_shapes=None``: checked at the example only), and
Torch-Pruning (build the ``DependencyGraph``, prune the same units from every MLP). All run in one process,
alternating (with one plain no-grad forward of the model: the unit the table also expresses times in),
``--repeats`` times; the table shows medians, the ratio to Torch-Pruning, the parameters each leaves and the
relative error each leaves against the original model (computed in the model's dtype) (Torch-Pruning drops a dead unit's constant output
``act(bias)``; fxprune folds it into the next bias), and the default path's parts in forwards: capture (the
model's reference forward and torch.export), analysis + rewrite (the unchecked ``minimize``), and the check (the
default ``minimize`` less the unchecked one). The floor line is what the default path cannot go below
whatever its own analysis costs: torch.export alone (called as ``capture`` calls it) plus the forwards its check
runs (the result at each check shape, the model at each but the example), and that sum over Torch-Pruning's time.
Last line: one JSON object.
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
from torch.fx import GraphModule

import fxprune as fp
from fxprune.graph.capture import _export_batch
from fxprune.verify import count_params
from planted import MLP, Phases, above_floor, check_forwards, logits, planted, rel_err

Parts = dict[str, float]


def outputs(m: Any, inputs: tuple[Any, ...]) -> torch.Tensor:
    with torch.no_grad():
        return logits(m(*inputs)).double()


def _timed(parts: Parts, name: str, fn: Callable[[], Any]) -> Any:
    t0 = time.perf_counter()
    out = fn()
    parts[name] = time.perf_counter() - t0
    return out


def run_fxprune(model: nn.Module, inputs: tuple[Any, ...], dead: dict[str, list[int]], parts: Parts) -> nn.Module:
    """The default path: dynamic batch capture, minimize checked end to end at the example, batch 1 and the next;
    its phases timed (:class:`planted.Phases`)."""
    with Phases() as ph:
        gm = _timed(parts, "capture", lambda: fp.capture(model, inputs))
        out = _timed(parts, "minimize", lambda: fp.minimize(gm))
    parts.update({f"phase:{k}": v for k, v in ph.seconds.items()})
    return out


def run_fxprune_unchecked(model: nn.Module, inputs: tuple[Any, ...], dead: dict[str, list[int]],
                          parts: Parts) -> nn.Module:
    """The default path without the check (``verify=False``)."""
    gm = _timed(parts, "capture", lambda: fp.capture(model, inputs))
    return _timed(parts, "minimize", lambda: fp.minimize(gm, verify=False))


def run_fxprune_static(model: nn.Module, inputs: tuple[Any, ...], dead: dict[str, list[int]], parts: Parts) -> nn.Module:
    """Static shapes (``dynamic_shapes=None``): one export at the example's shapes, checked there only."""
    return fp.minimize(fp.capture(model, inputs, dynamic_shapes=None))


def run_forward(model: nn.Module, inputs: tuple[Any, ...], dead: dict[str, list[int]], parts: Parts) -> nn.Module:
    """One no-grad forward of the model: the unit the table expresses both tools' times in."""
    outputs(model, inputs)
    return model


def run_export(model: nn.Module, inputs: tuple[Any, ...], dead: dict[str, list[int]], parts: Parts) -> nn.Module:
    """torch.export alone, called as ``fp.capture`` calls it (dynamic batch): part of the floor below."""
    _export_batch(model, inputs)
    return model


def run_torch_pruning(model: nn.Module, inputs: tuple[Any, ...], dead: dict[str, list[int]], parts: Parts) -> nn.Module:
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


TOOLS: dict[str, Callable[..., nn.Module]] = {
    "fxprune": run_fxprune, "fxprune-unchecked": run_fxprune_unchecked, "fxprune-static": run_fxprune_static,
    "torch-pruning": run_torch_pruning, "forward": run_forward, "export": run_export}
REPORTED = ("fxprune", "fxprune_unchecked", "fxprune_static", "torch_pruning")


def measure(name: str, size: str, dtype: torch.dtype, repeats: int) -> dict[str, Any]:
    model, inputs, dead = planted(name, size)
    model = model.to(dtype)
    inputs = tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)
    ref = outputs(model, inputs)
    times: dict[str, list[float]] = {k: [] for k in TOOLS}
    parts: dict[str, dict[str, list[float]]] = {k: {} for k in TOOLS}
    result: dict[str, Any] = {}
    for _ in range(repeats):
        for tool, fn in TOOLS.items():  # alternating
            got: Parts = {}
            t0 = time.perf_counter()
            try:
                out = fn(model, inputs, dead, got)
            except Exception as e:  # a tool that cannot handle the model: reported, not fatal
                result[tool] = f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
                continue
            times[tool].append(time.perf_counter() - t0)
            for k, v in got.items():
                parts[tool].setdefault(k, []).append(v)
            result[tool] = out
        if isinstance(result.get("fxprune"), GraphModule):
            times.setdefault("check-forwards", []).append(check_forwards(model, result["fxprune"], inputs))
    row: dict[str, Any] = dict(model=name, size=size, dtype=str(dtype).replace("torch.", ""), params=count_params(model),
                               removable=sum(len(i) for i in dead.values()))
    row["forward_s"] = fwd = statistics.median(times.pop("forward"))
    for tool in REPORTED:
        out = result[tool.replace("_", "-")]
        if isinstance(out, str):
            row[f"{tool}_error"] = out
            continue
        row.update({f"{tool}_s": statistics.median(times[tool.replace("_", "-")]), f"{tool}_params": count_params(out),
                    f"{tool}_rel": rel_err(ref, outputs(out, inputs))})
    if "fxprune_s" in row and "torch_pruning_s" in row:
        row["ratio"] = row["fxprune_s"] / row["torch_pruning_s"]
        if "fxprune_unchecked_s" in row:
            row["unchecked_ratio"] = row["fxprune_unchecked_s"] / row["torch_pruning_s"]
    if times["export"] and times.get("check-forwards"):
        export, check = statistics.median(times["export"]), statistics.median(times["check-forwards"])
        row["floor_s"] = export + check
        row["floor_parts_forwards"] = {"export": export / fwd, "check_forwards": check / fwd}
        if "torch_pruning_s" in row:
            row["floor_ratio"] = row["floor_s"] / row["torch_pruning_s"]
    if "floor_s" in row and "fxprune_s" in row:
        row["floor_x"] = row["fxprune_s"] / row["floor_s"]
        # the phases of one run, the one whose total is the median (medians of the parts need not add up)
        runs = times["fxprune"]
        mid = sorted(range(len(runs)), key=runs.__getitem__)[len(runs) // 2]
        phases = {k[len("phase:"):]: v[mid] for k, v in parts["fxprune"].items() if k.startswith("phase:")}
        row["above_floor_forwards"] = above_floor(phases, runs[mid], export, check, fwd)
    if "fxprune_s" in row and "fxprune_unchecked_s" in row:
        cap = statistics.median(parts["fxprune"]["capture"])
        rewrite = statistics.median(parts["fxprune-unchecked"]["minimize"])
        check = statistics.median(parts["fxprune"]["minimize"]) - rewrite
        row["parts_forwards"] = {"capture": cap / fwd, "analysis_rewrite": rewrite / fwd, "check": check / fwd}
    return row


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=["tiny", "full"], default="full")
    ap.add_argument("--models", nargs="+", default=["convnext", "vit", "gpt2"], choices=list(MLP))
    ap.add_argument("--dtypes", nargs="+", default=["float64", "float32"], choices=["float64", "float32"])
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    rows = []
    for dt in a.dtypes:
        for name in a.models:
            rows.append(measure(name, a.size, getattr(torch, dt), a.repeats))
            print(f"[speed] {name} {dt}: done", file=sys.stderr, flush=True)

    print(f"{'model':<9} {'dtype':<8} {'params':>12} {'tool':<18} {'median s':>9} {'forwards':>9} {'params left':>12} "
          f"{'rel err':>12}")
    for r in rows:
        for tool in REPORTED:
            if f"{tool}_error" in r:
                print(f"{r['model']:<9} {r['dtype']:<8} {r['params']:>12,} {tool:<18} failed: {r[f'{tool}_error']}")
                continue
            print(f"{r['model']:<9} {r['dtype']:<8} {r['params']:>12,} {tool:<18} {r[f'{tool}_s']:>9.2f} "
                  f"{r[f'{tool}_s'] / r['forward_s']:>9.1f} {r[f'{tool}_params']:>12,} {r[f'{tool}_rel']:>12.1e}")
        if "ratio" in r:
            print(f"{'':<31} {'fxprune / TP':<18} {r['ratio']:>8.2f}x   (unchecked {r.get('unchecked_ratio', float('nan')):.2f}x)")
        if "parts_forwards" in r:
            p = r["parts_forwards"]
            print(f"{'':<31} {'default, forwards':<18} capture {p['capture']:.1f} + analysis/rewrite "
                  f"{p['analysis_rewrite']:.1f} + check {p['check']:.1f}   (one forward: {r['forward_s']:.3f} s)")
        if "floor_s" in r:
            f = r["floor_parts_forwards"]
            ratio = f"   = {r['floor_ratio']:.2f}x TP" if "floor_ratio" in r else ""
            print(f"{'':<31} {'floor, forwards':<18} torch.export {f['export']:.1f} + the check's forwards "
                  f"{f['check_forwards']:.1f} = {r['floor_s'] / r['forward_s']:.1f}{ratio}")
        if "floor_x" in r:
            print(f"{'':<31} {'fxprune / floor':<18} {r['floor_x']:>8.2f}x   (fxprune / TP "
                  f"{r.get('ratio', float('nan')):.2f}x)")
            print(f"{'':<31} {'above the floor':<18} " + ", ".join(
                f"{k} {v:.1f}" for k, v in r["above_floor_forwards"].items() if round(v, 1)) + " (forwards)")
    out = dict(benchmark="speed", repeats=a.repeats, rows=rows)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
