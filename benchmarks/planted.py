"""Transformers models with planted dead MLP hidden units: the workload of ``speed.py`` and ``oracle.py``, and the
MLP layer names ``latency.py`` masks whole units of."""
from __future__ import annotations

import importlib
import time
from typing import Any

import torch
from torch import nn

from fxprune import zoo
from fxprune.graph.dynamic import DYNAMIC_KEY, shaped_inputs

# The two layers of each model's MLP: the first's output units are the hidden units, the second reads them.
MLP = {"convnext": ("pwconv1", "pwconv2"), "vit": ("mlp.fc1", "mlp.fc2"), "gpt2": ("mlp.c_fc", "mlp.c_proj"),
       "bert": ("intermediate.dense", "output.dense"), "llama": ("mlp.up_proj", "mlp.down_proj")}


def out_dim(name: str) -> int:
    """The dim of an MLP weight that indexes its output units (transformers' Conv1D, in GPT-2, stores (in, out))."""
    return 1 if name == "gpt2" else 0


def planted(name: str, size: str, frac: float = 0.25) -> tuple[nn.Module, tuple[Any, ...], dict[str, list[int]]]:
    """The model in float64 with ``frac`` of every MLP's hidden units dead (zero input rows; the MLP biases drawn
    from N(0, 0.1), since transformers initializes them to 0 and trained ones are not), and the dead indices per
    first MLP layer."""
    model, inputs = zoo.build(name, size)
    model = model.double().eval()
    inputs = tuple(x.double() if x.is_floating_point() else x for x in inputs)
    dead: dict[str, list[int]] = {}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for path, mod in model.named_modules():
            if not path.endswith(MLP[name][0]):
                continue
            if mod.bias is not None:
                mod.bias.normal_(0.0, 0.1, generator=g)
            w = mod.weight
            n = w.shape[out_dim(name)]
            idx = sorted(torch.randperm(n, generator=g)[: int(frac * n)].tolist())
            w.index_fill_(out_dim(name), torch.tensor(idx), 0.0)
            dead[path] = idx
    return model, inputs, dead


# The parts of fxprune's default path (capture + minimize) that ``Phases`` times, by where they are looked up:
# (module, attribute, phase). Each phase's seconds are its own (exclusive): a part timed inside another (the
# annotation inside the rewrite) counts for itself only.
PHASES = (
    ("fxprune.graph.capture", "_run", "reference forward"),
    ("fxprune.graph.capture", "_export_batch", "torch.export"),
    ("fxprune.graph.capture", "_program_module", "ep.module()"),
    ("fxprune.graph.capture", "annotate", "annotate shapes"),
    ("fxprune.passes.minimize", "annotate", "annotate shapes"),
    ("fxprune.passes.minimize", "check_weights", "weight scan"),
    ("fxprune.passes.minimize", "_prepare", "lowering"),
    ("fxprune.analysis.groups", "Analysis.__init__", "analysis"),
    ("fxprune.analysis.groups", "Analysis.removable", "analysis"),
    ("fxprune.passes.minimize", "Rewriter.run", "rewrite"),
    ("fxprune.passes.minimize", "_detach", "copies"),
    ("fxprune.passes.minimize", "subnormals", "subnormal scan"),
    ("fxprune.passes.minimize", "self_check", "check"),
)


class Phases:
    """``with Phases() as ph: ...``: the seconds spent in each phase of :data:`PHASES` (``ph.seconds``, each
    exclusive of the phases timed inside it) and how often each ran (``ph.calls``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._inner: list[float] = []  # per open phase: the seconds of the phases timed inside it so far
        self._undo: list[tuple[Any, str, Any]] = []

    def _timed(self, f: Any, phase: str) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._inner.append(0.0)
            t0 = time.perf_counter()
            try:
                return f(*args, **kwargs)
            finally:
                took = time.perf_counter() - t0
                self.seconds[phase] = self.seconds.get(phase, 0.0) + took - self._inner.pop()
                self.calls[phase] = self.calls.get(phase, 0) + 1
                if self._inner:
                    self._inner[-1] += took
        return timed

    def __enter__(self) -> "Phases":
        for module, attr, phase in PHASES:
            owner: Any = importlib.import_module(module)
            *path, name = attr.split(".")
            for p in path:
                owner = getattr(owner, p)
            f = vars(owner)[name]
            self._undo.append((owner, name, f))
            setattr(owner, name, self._timed(f, phase))
        return self

    def __exit__(self, *exc: Any) -> None:
        for owner, name, f in reversed(self._undo):
            setattr(owner, name, f)
        self._undo.clear()


def above_floor(phases: dict[str, float], total: float, export: float, check_forwards: float,
                forward: float) -> dict[str, float]:
    """What of the default path's ``total`` seconds lies above its floor (torch.export as capture calls it, plus
    the check's forwards), by phase, in forwards: each phase but torch.export and the check whole; the check's
    own work beyond its forwards (comparisons, inputs); torch.export's run here against the floor's (noise, in
    either direction); the rest of the two calls (``other``). The values sum to ``total`` less the floor."""
    out = {k: v / forward for k, v in sorted(phases.items(), key=lambda kv: -kv[1])
           if k not in ("torch.export", "check")}
    out["check beyond its forwards"] = (phases.get("check", 0.0) - check_forwards) / forward
    out["torch.export against the floor's"] = (phases.get("torch.export", 0.0) - export) / forward
    out["other"] = (total - sum(phases.values())) / forward
    return out


def logits(out: Any) -> torch.Tensor:
    """The tensor to compare of a model's output (a tensor, or a transformers output's logits / first field)."""
    return out if isinstance(out, torch.Tensor) else (out.logits if hasattr(out, "logits") else out[0])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs().max() / a.abs().max()).detach())


def check_forwards(model: nn.Module, result: Any, inputs: tuple[Any, ...]) -> float:
    """Seconds of the forwards ``minimize``'s default check runs, which no faster analysis removes: the result at
    every check shape, the model at every one but the example (its outputs there come with ``capture``)."""
    t0 = time.perf_counter()
    with torch.no_grad():
        for k, xs in enumerate(shaped_inputs(result.meta[DYNAMIC_KEY], inputs)):
            result(*xs)
            if k:
                model(*xs)
    return time.perf_counter() - t0
