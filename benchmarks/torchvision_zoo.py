"""torchvision's model zoo, side by side with Torch-Pruning: exact removal of planted dead units, or a typed refusal.

    python benchmarks/torchvision_zoo.py                         # every classification + segmentation model
    python benchmarks/torchvision_zoo.py resnet18 swin_t         # some of them
    python benchmarks/torchvision_zoo.py --list                  # the names

Every model: random weights, float64, BatchNorm statistics and affines randomized, a random unstructured mask (30%
of every conv/linear weight), and a quarter of the output units of every *bottleneck* layer made dead. A bottleneck
layer is a conv or linear whose output reaches, through BatchNorm, activations, dropout and depthwise convs only,
other convs/linears that contract it (the graph walk is in :func:`bottlenecks`; it reads torch.export's graph,
not fxprune's analysis). Dead means zero weight rows and bias, and zero gamma and beta in the BatchNorm after it:
the unit outputs exactly zero, so removing it is exact for any tool.

fxprune: ``fp.capture`` + ``fp.minimize`` (default path, self-check included), then checked here again in float64
against the planted model on the example and on a fresh input of another batch size. Torch-Pruning: its
``DependencyGraph`` prunes the same units (``get_pruning_group(layer, prune_*_out_channels, idx).prune()``).
Columns: parameters before, planted (the dead rows' parameters: the least an exact removal removes), after each
tool, the float64 relative error each leaves, and the outcome:

- ``exact``: float64 error <= 1e-9 and at least the planted parameters removed;
- ``exact-partial``: exact, fewer removed than planted;
- ``refused``: a typed fxprune error (its message is printed);
- ``WRONG`` / ``CRASH``: what must never happen.

Each model runs in its own subprocess (``--timeout`` seconds). The last line is one JSON object.

torchvision's PyPI wheel is a CUDA build whose C++ ops cannot load here; its import registers meta kernels for
them and fails. :func:`stub_meta_registrations` replaces that module by an empty one first (benchmarks and tests
only; the models do not need those ops). ``make install`` puts torchvision in ``.venv/torchvision``, outside
site-packages, so that nothing else (transformers imports torchvision when it finds it) sees the broken package;
this script adds that folder to ``sys.path``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
import traceback
import types
from typing import Any

import torch
from torch import nn

SEGMENTATION = ["fcn_resnet50", "fcn_resnet101", "deeplabv3_resnet50", "deeplabv3_resnet101", "deeplabv3_mobilenet_v3_large",
                "lraspp_mobilenet_v3_large"]
# Image side per model (small images keep float64 affordable; every model here accepts them). Default 64.
SIDE = {"inception_v3": 96, "googlenet": 64, "maxvit_t": 224, "alexnet": 64}
VIT_SIDE = {"vit_b_16": 32, "vit_b_32": 64, "vit_l_16": 32, "vit_l_32": 64, "vit_h_14": 28}
TOL = 1e-9
PASS_THROUGH = {"relu", "relu_", "relu6", "hardtanh", "hardtanh_", "hardswish", "hardswish_", "silu", "silu_", "gelu", "dropout",
                "clone", "_native_batch_norm_legit_no_training", "batch_norm", "getitem", "native_dropout", "contiguous"}


def stub_meta_registrations() -> None:
    """Let ``import torchvision`` succeed with the CUDA wheel on a CPU torch (see the module docstring)."""
    name = "torchvision._meta_registrations"
    if name not in sys.modules:
        sys.modules[name] = types.ModuleType(name)
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, ".venv", "torchvision")
    if os.path.isdir(here) and os.path.abspath(here) not in map(os.path.abspath, sys.path):
        sys.path.append(os.path.abspath(here))


def names() -> list[str]:
    stub_meta_registrations()
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models)) + SEGMENTATION


def build(name: str, seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The model (float64, eval, BatchNorm randomized) and a batch-2 example input."""
    stub_meta_registrations()
    import torchvision

    torch.manual_seed(seed)
    if name in SEGMENTATION:
        model = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=5, aux_loss=False)
    elif name in VIT_SIDE:
        model = torchvision.models.get_model(name, weights=None, num_classes=10, image_size=VIT_SIDE[name])
    elif name == "inception_v3":
        model = torchvision.models.get_model(name, weights=None, num_classes=10, aux_logits=False, init_weights=False)
    elif name == "googlenet":
        model = torchvision.models.get_model(name, weights=None, num_classes=10, aux_logits=False, init_weights=False)
    else:
        model = torchvision.models.get_model(name, weights=None, num_classes=10)
    model = model.double().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1, generator=g)
                m.running_var.uniform_(0.5, 2, generator=g)
                m.weight.uniform_(0.5, 2, generator=g)
                m.bias.uniform_(-1, 1, generator=g)
    side = VIT_SIDE.get(name, SIDE.get(name, 64))
    return model, (torch.randn(2, 3, side, side, dtype=torch.float64, generator=g),)


def _op(n: torch.fx.Node) -> str:
    t = n.target
    return getattr(t, "__name__", str(t)).split(".")[0] if n.op == "call_function" else ""


def _groups(n: torch.fx.Node) -> Any:
    i = {"convolution": 8, "conv2d": 6}.get(_op(n))
    return n.args[i] if i is not None and len(n.args) > i else 1


def bottlenecks(model: nn.Module, inputs: tuple[Any, ...]) -> dict[str, tuple[list[str], int]]:
    """``{layer path: ([paths of the BatchNorms right after it], groups of the grouped conv reading it, or 1)}`` for
    every conv/linear whose output units are read only by contractions (see the module docstring)."""
    ep = torch.export.export(model, inputs, strict=False)
    sig = ep.graph_signature
    param = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    owner = lambda n: param.get(n.name, "").rsplit(".", 1)[0]  # noqa: E731
    out: dict[str, list[str]] = {}
    for n in ep.graph.nodes:
        if _op(n) not in ("convolution", "linear", "conv2d"):
            continue
        w = n.args[1]
        if not isinstance(w, torch.fx.Node) or w.name not in param:
            continue
        norms: list[str] = []
        groups = 1
        ok, frontier = True, [(n, True)]  # (value, still before any depthwise conv)
        while frontier and ok:
            v, direct = frontier.pop()
            for u in v.users:
                op = _op(u)
                if op in ("convolution", "linear", "conv2d") and u.args[0] is v:
                    if _groups(u) != 1 and _groups(u) == v.meta["val"].shape[1]:
                        frontier.append((u, False))  # depthwise: channel k in, channel k out
                    elif isinstance(_groups(u), int):
                        groups = max(groups, _groups(u))
                    continue
                if op not in PASS_THROUGH:
                    ok = False
                    break
                if op in ("_native_batch_norm_legit_no_training", "batch_norm") and direct:
                    norms.append(owner(u.args[1]))
                frontier.append((u, direct))
        depthwise = _op(n) != "linear" and isinstance(_groups(n), int) and _groups(n) > 1 and _groups(n) == n.args[0].meta["val"].shape[1]
        if ok and n.users and not depthwise:  # a depthwise conv's units are its input's: planted upstream
            out[owner(w)] = (norms, groups)
    return out


def plant(model: nn.Module, sites: dict[str, tuple[list[str], int]], frac: float = 0.25, sparsity: float = 0.3,
          seed: int = 0) -> tuple[dict[str, list[int]], int]:
    """Zero a random ``sparsity`` of every conv/linear weight, then make ``frac`` of every bottleneck's units dead
    (the same units of every group where a grouped conv reads them: a grouped conv keeps one width per group).
    Returns the dead units per layer and the planted parameter count."""
    g = torch.Generator().manual_seed(seed)
    dead: dict[str, list[int]] = {}
    planted = 0
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_((torch.rand(m.weight.shape, generator=g) >= sparsity).to(m.weight.dtype))
        for path, (norms, groups) in sites.items():
            layer = model.get_submodule(path)
            n = layer.weight.shape[0]
            per = n // groups
            local = torch.randperm(per, generator=g)[: max(1, int(frac * per))].tolist()
            idx = sorted(k * per + j for k in range(groups) for j in local)
            if len(idx) >= n:
                continue
            t = torch.tensor(idx)
            layer.weight.index_fill_(0, t, 0.0)
            planted += len(idx) * layer.weight[0].numel()
            if layer.bias is not None:
                layer.bias.index_fill_(0, t, 0.0)
                planted += len(idx)
            for bn in norms:
                norm = model.get_submodule(bn)
                if norm.weight.shape[0] == n:
                    norm.weight.index_fill_(0, t, 0.0)
                    norm.bias.index_fill_(0, t, 0.0)
            dead[path] = idx
    return dead, planted


def _out(y: Any) -> torch.Tensor:
    if isinstance(y, dict):
        y = y["out"]
    return y if isinstance(y, torch.Tensor) else y[0]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-300))


def worst(model: nn.Module, small: Any, inputs: tuple[Any, ...], fresh: tuple[Any, ...]) -> float:
    with torch.no_grad():
        return max(rel(_out(model(*x)), _out(small(*x))) for x in (inputs, fresh))


def run_fxprune(model: nn.Module, inputs: tuple[Any, ...], fresh: tuple[Any, ...]) -> dict[str, Any]:
    import fxprune as fp
    from fxprune.errors import FxPruneError
    from fxprune.verify import count_params

    t0 = time.perf_counter()
    try:
        small = fp.minimize(fp.capture(model, inputs))
    except FxPruneError as e:
        return {"status": "refused", "why": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", "s": time.perf_counter() - t0}
    except Exception as e:  # noqa: BLE001 - what the table counts as a crash
        return {"status": "CRASH", "why": f"{type(e).__name__}: {str(e)[:200]}", "trace": traceback.format_exc()[-2000:],
                "s": time.perf_counter() - t0}
    s = time.perf_counter() - t0
    return {"params": count_params(small), "err": worst(model, small, inputs, fresh), "s": s}


def run_torch_pruning(model: nn.Module, inputs: tuple[Any, ...], fresh: tuple[Any, ...], dead: dict[str, list[int]]) -> dict[str, Any]:
    import torch_pruning as tp

    from fxprune.verify import count_params

    m = copy.deepcopy(model)
    t0 = time.perf_counter()
    try:
        dg = tp.DependencyGraph().build_dependency(m, example_inputs=inputs[0], verbose=False)
        for path, idx in dead.items():
            layer = m.get_submodule(path)
            fn = tp.prune_linear_out_channels if isinstance(layer, nn.Linear) else tp.prune_conv_out_channels
            dg.get_pruning_group(layer, fn, idxs=idx).prune()
        s = time.perf_counter() - t0
        return {"params": count_params(m), "err": worst(model, m, inputs, fresh), "s": s}
    except Exception as e:  # noqa: BLE001 - Torch-Pruning's failures are a column of the table
        return {"status": "fail", "why": f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}",
                "s": time.perf_counter() - t0}


def outcome(r: dict[str, Any], before: int, planted: int) -> str:
    if "status" in r:
        return r["status"]
    if not r["err"] <= TOL:
        return "WRONG"
    return "exact" if before - r["params"] >= planted else "exact-partial"


def one(name: str, torch_pruning: bool = True) -> dict[str, Any]:
    from fxprune.verify import count_params

    torch.set_num_threads(max(1, int(os.environ.get("ZOO_THREADS", "2"))))
    model, inputs = build(name)
    dead, planted = plant(model, bottlenecks(model, inputs))
    side = inputs[0].shape[-1]
    fresh = (torch.randn(3, 3, side, side, dtype=torch.float64),)
    before = count_params(model)
    row: dict[str, Any] = {"model": name, "params": before, "planted": planted, "layers": len(dead)}
    fx = run_fxprune(model, inputs, fresh)
    row["fxprune"] = {**fx, "outcome": outcome(fx, before, planted)}
    if torch_pruning:
        tp_ = run_torch_pruning(model, inputs, fresh, dead)
        row["torch_pruning"] = {**tp_, "outcome": outcome(tp_, before, planted)}
    return row


def _subprocess(name: str, timeout: float, torch_pruning: bool) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--one", name] + ([] if torch_pruning else ["--no-torch-pruning"])
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"model": name, "fxprune": {"outcome": "timeout"}, "torch_pruning": {"outcome": "-"}}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["?"]
        return {"model": name, "fxprune": {"outcome": "CRASH", "why": f"subprocess exit {p.returncode}: {tail[0][:200]}"},
                "torch_pruning": {"outcome": "-"}}
    return json.loads(lines[-1])


def table(rows: list[dict[str, Any]]) -> str:
    def cell(r: dict[str, Any]) -> str:
        if "params" not in r:
            return f"{'-':>12} {'-':>8} {r.get('outcome', '-'):>13}"
        return f"{r['params']:>12,} {r['err']:>8.1e} {r['outcome']:>13}"

    head = f"{'model':<30} {'params':>12} {'planted':>10} | {'fxprune':>12} {'err':>8} {'':>13} | {'Torch-Pruning':>12} {'err':>8} {'':>13}"
    lines = [head, "-" * len(head)]
    for r in rows:
        fx, tp_ = r.get("fxprune", {}), r.get("torch_pruning", {})
        lines.append(f"{r['model']:<30} {r.get('params', 0):>12,} {r.get('planted', 0):>10,} | {cell(fx)} | {cell(tp_)}")
    for r in rows:
        for tool in ("fxprune", "torch_pruning"):
            if r.get(tool, {}).get("why"):
                lines.append(f"  {r['model']} [{tool}] {r[tool]['outcome']}: {r[tool]['why']}")
    return "\n".join(lines)


def summary(rows: list[dict[str, Any]], tool: str) -> dict[str, Any]:
    outs = [r.get(tool, {}).get("outcome", "-") for r in rows]
    count = lambda k: sum(o == k for o in outs)  # noqa: E731
    not_refused = len(outs) - count("refused")
    return {"models": len(outs), "exact": count("exact"), "exact_partial": count("exact-partial"), "refused": count("refused"),
            "wrong": count("WRONG"), "crash": count("CRASH") + count("timeout") + count("fail"),
            "planted_removed_frac": round(count("exact") / max(not_refused, 1), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--no-torch-pruning", action="store_true")
    ap.add_argument("--timeout", type=float, default=1800)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one, not a.no_torch_pruning)))
        return
    todo = a.models or names()
    if a.list:
        print("\n".join(todo))
        return
    rows = []
    for name in todo:
        t0 = time.perf_counter()
        rows.append(_subprocess(name, a.timeout, not a.no_torch_pruning))
        fx = rows[-1]["fxprune"]
        print(f"# {name}: {fx.get('outcome')} ({time.perf_counter() - t0:.0f} s) {fx.get('why', '')}", file=sys.stderr, flush=True)
    print(table(rows))
    print(json.dumps({"benchmark": "torchvision_zoo", "fxprune": summary(rows, "fxprune"),
                      "torch_pruning": summary(rows, "torch_pruning"), "rows": rows}))


if __name__ == "__main__":
    main()
