"""Deployed latency: the masked (dense) model against the minimized one, and the minimized one with widths rounded
up to multiples of 8 and 16 (``fp.minimize(..., round_to=k)``), in the runtimes users deploy with.

    python benchmarks/deployed.py                                   # ConvNeXt-Tiny and ViT-B, eager + onnxruntime
    python benchmarks/deployed.py --models convnext --sparsities 0.5 0.75 --backends eager onnxruntime aoti
    python benchmarks/deployed.py --models resnet50 --backends eager onnxruntime    # torchvision (make install)

Masks, on random (untrained) weights: ``--masks groups`` (default), ``fp.mask(..., structure="groups")`` at the
given sparsity (whole channels of every free group ranked by importance: the irregular widths training leaves);
``--masks units``, the given fraction of every MLP's hidden units (ConvNeXt, ViT, GPT-2; ``latency.unit_masks``:
smallest L2 norm of their input weights) or of every ResNet bottleneck's two inner convolutions' output channels
(with their BatchNorm scale and shift: a zero channel) zeroed whole. FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` on one forward of each variant in eager.

Backends (float32, batch of one, ``--threads`` intra-op threads everywhere): ``eager`` (the GraphModule,
``torch.utils.benchmark`` timing), ``onnxruntime`` (``torch.onnx.export(dynamo=True)``, CPU execution provider,
``ORT_ENABLE_ALL``), ``aoti`` (AOTInductor: ``torch._inductor.aoti_compile_and_package``), ``executorch``
(XNNPACK delegate; skipped with its reason where it does not lower). Each backend's variants are built first
(export, compile and session set-up are not timed), then timed alternating, ``--repeats`` rounds after
``--warmup`` calls each; the table gives the median, the spread (interquartile range over the median), the
speedup over the masked model, the FLOP reduction and their quotient (efficiency). Last line: one JSON object.

Subnormal floats (``fxprune.passes.minimize.subnormals``: nonzero values below the dtype's smallest normal number,
which folded constants can leave and which some CPUs compute with many times slower) are counted in every variant
(column ``subn.``). ``--plant-subnormals F`` adds two variants that show what they would cost in each runtime: the
minimized model with a fraction ``F`` of every weight's entries set to +-1e-39 (``subnormal``; a stress case, not a
result of minimize), and the same with them flushed to zero (``flushed``).

Each (model, sparsity, backend) runs in a child process of its own (``--in-process`` to run them here), so that a
runtime that crashes natively (a segfault in a runtime's library) becomes a row that says so instead of ending the
run.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import torch
from torch import nn

import fxprune as fp
from fxprune.passes.minimize import subnormals
from fxprune.verify import count_flops
from latency import build, unit_masks

Runner = Callable[[], Any]


def resnet50() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    from torchvision_zoo import stub_meta_registrations

    stub_meta_registrations()
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet50().eval(), (torch.randn(1, 3, 224, 224),)


def model_and_inputs(name: str) -> tuple[nn.Module, tuple[Any, ...]]:
    if name == "resnet50":
        return resnet50()
    model, inputs = build(name)
    return model.eval(), tuple(x[:1] for x in inputs)  # a batch of one: what a deployed model serves


def channel_masks(gm: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """ResNet bottlenecks: the ``sparsity`` fraction of conv1's and conv2's output channels (smallest L2 norm)
    zeroed with their BatchNorm scale and shift."""
    params = dict(gm.named_parameters())
    out = {}
    for name, w in params.items():
        if not (name.endswith(("conv1.weight", "conv2.weight")) and ".layer" in f".{name}"):
            continue
        norms = w.detach().flatten(1).norm(dim=1)
        keep = torch.ones(len(norms), dtype=torch.bool)
        keep[norms.argsort()[: int(round(sparsity * len(norms)))]] = False
        out[name] = keep.view(-1, 1, 1, 1).expand_as(w).clone()
        bn = name.replace("conv", "bn").rpartition(".")[0]
        for leaf in ("weight", "bias"):
            out[f"{bn}.{leaf}"] = keep.clone()
    return out


def masked_model(gm: nn.Module, name: str, sparsity: float, kind: str) -> nn.Module:
    if kind == "groups":
        return fp.mask(gm, sparsity, structure="groups")
    return fp.mask(gm, masks=channel_masks(gm, sparsity) if name == "resnet50" else unit_masks(gm, name, sparsity))


def planted_subnormals(m: nn.Module, fraction: float) -> nn.Module:
    """A copy of ``m`` with ``fraction`` of the entries of every weight (dim >= 2) set to +-1e-39 (seeded)."""
    out = copy.deepcopy(m)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if p.dim() >= 2 and p.dtype == torch.float32:
                hit = torch.rand(p.shape, generator=g) < fraction
                p[hit] = torch.where(p[hit] < 0, -1e-39, 1e-39)
    return out


def subnormal_count(m: nn.Module) -> int:
    return sum(r["count"] for r in subnormals(m).values())


# ---------------------------------------------------------------------------------------------------- backends
def eager(m: nn.Module, inputs: tuple[Any, ...], threads: int) -> Runner:
    torch.set_num_threads(threads)

    def run() -> Any:
        with torch.no_grad():
            return m(*inputs)
    return run


def onnxruntime(m: nn.Module, inputs: tuple[Any, ...], threads: int) -> Runner:
    import onnxruntime as ort

    path = os.path.join(tempfile.mkdtemp(), "m.onnx")
    with contextlib.redirect_stdout(sys.stderr):  # the exporter's progress lines: not the table
        torch.onnx.export(m, inputs, path, dynamo=True, external_data=False)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    feed = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), inputs)}
    return lambda: sess.run(None, feed)


def aoti(m: nn.Module, inputs: tuple[Any, ...], threads: int) -> Runner:
    torch.set_num_threads(threads)
    ep = torch.export.export(m, inputs, strict=False)
    path = torch._inductor.aoti_compile_and_package(ep, package_path=os.path.join(tempfile.mkdtemp(), "m.pt2"))
    f = torch._inductor.aoti_load_package(path)

    def run() -> Any:
        with torch.no_grad():
            return f(*inputs)
    return run


def executorch(m: nn.Module, inputs: tuple[Any, ...], threads: int) -> Runner:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    ep = torch.export.export(m, inputs, strict=False)
    pte = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch()
    buffer = pte.buffer
    program = Runtime.get().load_program(buffer)  # held with the buffer for as long as the method runs
    method = program.load_method("forward")

    def run() -> Any:
        assert program is not None and buffer is not None
        return method.execute(list(inputs))
    return run


BACKENDS = {"eager": eager, "onnxruntime": onnxruntime, "aoti": aoti, "executorch": executorch}


def timed(runners: dict[str, Runner], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each runner, the runners alternating round by round."""
    for r in runners.values():
        for _ in range(warmup):
            r()
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(repeats):
        for k, r in runners.items():
            t0 = time.perf_counter()
            r()
            times[k].append(time.perf_counter() - t0)
    return times


def spread(v: list[float]) -> float:
    q = statistics.quantiles(v, n=4)
    return (q[2] - q[0]) / statistics.median(v)


def isolated(name: str, s: float, backend: str, argv: list[str]) -> list[dict]:
    """The rows of one (model, sparsity, backend), measured by a child process given this run's options ``argv``
    (the later ``--models``, ``--sparsities`` and ``--backends`` override them); a child that dies (a native crash,
    a runtime's abort) gives one skipped row with its exit status and last message."""
    p = subprocess.run([sys.executable, __file__, *argv, "--in-process", "--models", name, "--sparsities", str(s),
                        "--backends", backend], capture_output=True, text=True)
    sys.stderr.write(p.stderr)
    lines = p.stdout.strip().splitlines()
    if p.returncode == 0 and lines:
        return json.loads(lines[-1])["rows"]
    died = f"signal {signal.Signals(-p.returncode).name}" if p.returncode < 0 else f"exit status {p.returncode}"
    last = (p.stderr.strip().splitlines() or [""])[-1][:160]
    return [dict(model=name, sparsity=s, backend=backend, skipped=f"the child process died ({died}) {last}".strip())]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["convnext", "vit"], choices=["convnext", "vit", "gpt2", "resnet50"])
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.75])
    ap.add_argument("--backends", nargs="+", default=["eager", "onnxruntime"], choices=list(BACKENDS))
    ap.add_argument("--masks", choices=["groups", "units"], default="groups")
    ap.add_argument("--round-to", type=int, nargs="*", default=[8, 16])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--plant-subnormals", type=float, default=0.0, metavar="F",
                    help="add the minimized model with F of its weights' entries subnormal, and flushed")
    ap.add_argument("--in-process", action="store_true", help="measure here, not in a child process per backend")
    argv = sys.argv[1:] if argv is None else argv
    a = ap.parse_args(argv)
    rows = []
    for name in a.models if not a.in_process else []:
        for s in a.sparsities:
            for backend in a.backends:
                got = isolated(name, s, backend, argv)
                rows += got
                if "skipped" in got[0]:
                    print(f"[deployed] {name} {s:.0%} {backend}: {got[0]['skipped']}", file=sys.stderr, flush=True)
    for name in a.models if a.in_process else []:
        model, inputs = model_and_inputs(name)
        gm = fp.capture(model, inputs)
        for s in a.sparsities:
            masked = masked_model(gm, name, s, a.masks)
            variants = {"masked": masked, "minimized": fp.minimize(masked)}
            for k in a.round_to:
                variants[f"round_to={k}"] = fp.minimize(masked, round_to=k)
            if a.plant_subnormals:
                variants["subnormal"] = planted_subnormals(variants["minimized"], a.plant_subnormals)
                variants["flushed"] = copy.deepcopy(variants["subnormal"])
                subnormals(variants["flushed"], flush=True)
            counts = {v: subnormal_count(m) for v, m in variants.items()}
            flops = {v: count_flops(m, inputs) for v, m in variants.items()}
            for backend in a.backends:
                try:
                    runners = {v: BACKENDS[backend](m, inputs, a.threads) for v, m in variants.items()}
                except Exception as e:  # a runtime that cannot take the model: said, not hidden
                    reason = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                    rows.append(dict(model=name, sparsity=s, backend=backend, skipped=reason))
                    print(f"[deployed] {name} {s:.0%} {backend}: skipped ({reason})", file=sys.stderr, flush=True)
                    continue
                times = timed(runners, a.repeats, a.warmup)
                base = statistics.median(times["masked"])
                for v, t in times.items():
                    med = statistics.median(t)
                    rows.append(dict(model=name, sparsity=s, backend=backend, variant=v, ms=1e3 * med,
                                     spread=spread(t), speedup=base / med, flop_reduction=flops["masked"] / flops[v],
                                     efficiency=(base / med) / (flops["masked"] / flops[v]), subnormals=counts[v]))
                print(f"[deployed] {name} {s:.0%} {backend}: done", file=sys.stderr, flush=True)
    print(f"masks {a.masks}; threads {a.threads}, batch 1, float32, median of {a.repeats} alternating calls after "
          f"{a.warmup} warm-up")
    print(f"{'model':<9} {'masked':>6} {'backend':<12} {'variant':<12} {'ms':>9} {'spread':>7} {'speedup':>8} "
          f"{'FLOPs/':>7} {'effic.':>7} {'subn.':>8}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['model']:<9} {r['sparsity']:>6.0%} {r['backend']:<12} skipped: {r['skipped']}")
            continue
        print(f"{r['model']:<9} {r['sparsity']:>6.0%} {r['backend']:<12} {r['variant']:<12} {r['ms']:>9.3f} "
              f"{r['spread']:>6.1%} {r['speedup']:>7.2f}x {r['flop_reduction']:>6.2f}x {r['efficiency']:>7.2f} "
              f"{r.get('subnormals', 0):>8,}")
    out = dict(benchmark="deployed", masks=a.masks, plant_subnormals=a.plant_subnormals, threads=a.threads, repeats=a.repeats, warmup=a.warmup, rows=rows)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
