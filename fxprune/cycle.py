"""``squeeze_release``: the Squeeze-Release cycle driver.

Each cycle masks gradually (masks held while the user's ``train`` fine-tunes), minimizes exactly, releases the
zeros left inside the kept tensors and fine-tunes again. Both the minimized model and the released, fine-tuned one
(same size) are candidates; the better one is the cycle's model. Successive cycles find
structure a single pass cannot: the released capacity trains into a shape the next mask can cut along.
"""
from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

from torch import nn
from torch.fx import GraphModule

from fxprune.errors import InputError
from fxprune.graph.capture import as_inputs, capture
from fxprune.passes.mask import MASKS_KEY, bake_masks, hold_masks, mask, sparsity_schedule
from fxprune.passes.minimize import minimize
from fxprune.passes.release import release
from fxprune.verify import _flops, count_params

__all__ = ["squeeze_release", "SqueezeReleaseResult"]


@dataclass
class SqueezeReleaseResult:
    """The model kept (the smallest whose accuracy is within ``tolerance`` of the dense model's, or the dense
    model itself when no cycle got there) and one history row per cycle."""

    module: GraphModule
    history: list[dict[str, Any]]
    dense: dict[str, Any]
    best_cycle: int | None

    @property
    def compression(self) -> float:
        return self.dense["params"] / count_params(self.module)

    def table(self) -> str:
        rows = [f"{'cycle':>5}  {'sparsity':>8}  {'params':>10}  {'compression':>11}  {'FLOPs':>13}  {'accuracy':>8}",
                f"{'dense':>5}  {'':>8}  {self.dense['params']:>10,}  {1.0:>10.2f}x  {self.dense['flops']:>13,}  "
                f"{self.dense['accuracy']:>8.4f}"]
        for h in self.history:
            mark = " *" if h["cycle"] == self.best_cycle else ""
            rows.append(f"{h['cycle']:>5}  {h['sparsity']:>8.3f}  {h['params']:>10,}  {h['compression']:>10.2f}x  "
                        f"{h['flops']:>13,}  {h['accuracy']:>8.4f}{mark}")
        return "\n".join(rows)


def _progress(progress: bool | Callable[[str], None]) -> Callable[[str], None]:
    if callable(progress):
        return progress
    if progress:
        return lambda msg: print(f"[fxprune] {msg}", file=sys.stderr, flush=True)
    return lambda msg: None


def _call_train(train: Callable[[nn.Module], Any], m: nn.Module) -> nn.Module:
    out = train(m)
    return out if isinstance(out, nn.Module) else m


def squeeze_release(model: nn.Module, example_inputs: Sequence[Any], *, train: Callable[[nn.Module], Any],
                    evaluate: Callable[[nn.Module], float], cycles: int = 3,
                    sparsity: float | Sequence[float] | Callable[[int], float] = 0.8, mask_steps: int = 4,
                    scope: Literal["global", "layer"] = "global", include: Sequence[str] | None = None,
                    exclude: Sequence[str] | None = None, release_scale: float = 0.01, tolerance: float = 0.01,
                    seed: int = 0, verify: bool = True, progress: bool | Callable[[str], None] = True) -> SqueezeReleaseResult:
    """Run ``cycles`` of mask -> fine-tune -> minimize -> release -> fine-tune.

    ``train(module)`` fine-tunes in place (it may wrap the module in DistributedDataParallel; the masks are
    parametrizations, so they stay applied) and may return the module. ``evaluate(module)`` returns an accuracy
    (higher is better). ``sparsity`` is each cycle's final mask sparsity of the current (already smaller) model:
    a number, one per cycle, or a function of the cycle index; within a cycle it is reached over ``mask_steps``
    masking steps on a cubic schedule, each followed by ``train``. After ``minimize``, the zeros left are
    released and ``train`` runs again; the cycle's model is the more accurate of the minimized and the released
    one (both have the same parameters). Returns the smallest cycle model whose accuracy is within ``tolerance``
    of the dense model's (or the dense capture), and the per-cycle history.
    """
    if not isinstance(cycles, int) or cycles < 1:
        raise InputError(f"cycles must be a positive integer, got {cycles!r}")
    if not isinstance(mask_steps, int) or mask_steps < 1:
        raise InputError(f"mask_steps must be a positive integer, got {mask_steps!r}")
    if not callable(train) or not callable(evaluate):
        raise InputError("train and evaluate must be callables taking the module")
    say = _progress(progress)
    inputs = as_inputs(example_inputs)
    target = sparsity if callable(sparsity) else (lambda c: sparsity[c]) if isinstance(sparsity, Sequence) else (lambda c: sparsity)
    gm = capture(model, inputs)
    dense = dict(params=count_params(gm), flops=_flops(gm, inputs), accuracy=float(evaluate(gm)))
    say(f"dense: {dense['params']:,} params, accuracy {dense['accuracy']:.4f}")
    history: list[dict[str, Any]] = []
    best, best_cycle, best_params = gm, None, dense["params"]
    work = gm
    for c in range(cycles):
        t0 = time.perf_counter()
        final = float(target(c))
        for step in range(1, mask_steps + 1):
            s = sparsity_schedule(step, mask_steps, final)
            say(f"cycle {c + 1}/{cycles}: mask step {step}/{mask_steps} at sparsity {s:.3f}, fine-tuning")
            work = mask(work, s, scope=scope, include=include, exclude=exclude, seed=seed + c)
            masks = work.meta.get(MASKS_KEY)
            work = bake_masks(_call_train(train, hold_masks(work)))
            work.meta[MASKS_KEY] = masks
        say(f"cycle {c + 1}/{cycles}: minimize")
        small = minimize(work, inputs, verify=verify)
        params = count_params(small)
        acc_min = float(evaluate(small))
        say(f"cycle {c + 1}/{cycles}: release and fine-tune")
        work = _call_train(train, release(small, release_scale, seed=seed + c).module)
        acc_rel = float(evaluate(work))  # same size: the released zeros trained again
        acc, kept = (acc_rel, work) if acc_rel > acc_min else (acc_min, small)
        row = dict(cycle=c + 1, sparsity=final, params=params, flops=_flops(small, inputs), accuracy=acc,
                   accuracy_minimized=acc_min, accuracy_released=acc_rel, compression=dense["params"] / params,
                   seconds=time.perf_counter() - t0)
        if acc >= dense["accuracy"] - tolerance and params < best_params:
            best, best_cycle, best_params = copy.deepcopy(kept), c + 1, params
        history.append(row)
        say(f"cycle {c + 1}/{cycles}: {params:,} params ({row['compression']:.2f}x), accuracy {acc_min:.4f} "
            f"minimized, {acc_rel:.4f} released and fine-tuned")
    return SqueezeReleaseResult(best, history, dense, best_cycle)
