"""``squeeze_release``: the Squeeze-Release cycle driver, on the user's own model.

Each cycle masks gradually (masks held as parametrizations while the user's ``train`` fine-tunes), minimizes
exactly, releases the zeros left inside the kept tensors and fine-tunes again. ``train`` and ``evaluate`` get a copy
of the user's own model, its classes and all (``.train()``/``.eval()``, BatchNorm and dropout, ``.logits``,
``generate()``...); the minimize step is :func:`~fxprune.minimize_module` (checked, fail-closed), so the model kept
is the user's class, smaller. A model that cannot be kept as its own class (torch.export cannot capture it, or its
write-back is unsupported) goes the graph path instead, with a warning that says why; there the eval-mode
BatchNorm and dropout calls of each minimized graph become modules again (:func:`~fxprune.passes.modes.trainable`), so
that ``.train()`` trains them as it trains the user's model. Throughout the ``train``
call of every masking step (the squeeze), fxprune's group lasso (:class:`~fxprune.interop.lasso.GroupLasso`, built
from the model's own channel groups) adds its gradient before each optimizer step and sets what has shrunk to exact
zeros after it, so that whole groups become structure ``minimize`` removes. The fine-tune after release runs
without it: there the released capacity is given back to the loss (the untuned ResNet of ``docs/results.md``,
tuning seeds 10-12: 3.1x, 5.3x, 7.8x with the lasso there too, 14.9x, 11.1x, 7.8x without).

Both the minimized model and the released, fine-tuned one (same size) are candidates; the better one is the cycle's
model. With ``checkpoint_dir`` every complete cycle is written to disk (:mod:`fxprune.interop.checkpoint`) and
``resume=True`` continues from the last one; under ``torch.distributed`` the ranks stay on rank 0's model
(:mod:`fxprune.interop.distributed`). Every object that goes from one cycle to the next is rebuilt from the
previous minimized model and a recorded state (:func:`_rebuilt`), on the uninterrupted path as on the resumed one,
so that both compute the same thing.
"""
from __future__ import annotations

import contextlib
import copy
import os
import sys
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch
from torch import nn
from torch.fx import GraphModule

from fxprune.errors import CaptureError, CheckpointError, EquivalenceError, InputError, UnsupportedError, require
from fxprune.graph.capture import EXAMPLE_INPUTS_KEY, ModelCall, as_inputs, capture, model_call, unwrapped
from fxprune.graph.rebuild import accelerator
from fxprune.interop.batchnorm import BatchRecorder, batchnorms, recalibrate_batchnorm
from fxprune.interop.checkpoint import CycleCheckpoint, fingerprint, set_rng_state
from fxprune.interop.distributed import PeerFailedError, Ranks
from fxprune.interop.lasso import DEFAULT_EVERY, DEFAULT_STRENGTH, GroupLasso
from fxprune.graph.masks import plain_copy, unmasked
from fxprune.interop.module import ClassKept, cache_off, eval_capture, minimize_module_kept
from fxprune.passes.mask import (TargetNotReachedWarning, apply_masks, bake_masks_, group_masks, hold_masks_,
                                 magnitude_masks, prunable, sparsity_schedule)
from fxprune.passes.minimize import minimize
from fxprune.passes.modes import trainable
from fxprune.passes.release import release as release_zeros
from fxprune.verify import count_flops, count_params

__all__ = ["squeeze_release", "SqueezeReleaseResult", "GraphPathWarning", "LittleRemovedWarning", "UntrainedWarning",
           "masks_groups"]


class GraphPathWarning(UserWarning):
    """``squeeze_release`` could not keep the model as its own class and went on with its graph."""


class LittleRemovedWarning(UserWarning):
    """``squeeze_release`` passed cycles yet kept a model at most ``LITTLE`` times smaller: its weight masks left
    few whole channels (the group lasso zeroes few where the loss defends no channel, on a solved task or in a short
    fine-tune, since it then shrinks every group alike), and no cycle masked whole channels, or those that did fell
    outside the tolerance."""


class UntrainedWarning(UserWarning):
    """A ``train`` call of ``squeeze_release`` changed no parameter of the module it was given. Each call gets a copy
    (masks held), so an optimizer built outside ``train``, over the original model's parameters, steps tensors the
    copy does not use: the cycle then masks, minimizes and releases with no fine-tuning in between."""


LITTLE = 1.5  # a kept model at most this many times smaller than the dense one, after passing cycles: little


def masks_groups(structure: str, history: Sequence[dict[str, Any]]) -> bool:
    """Whether the next cycle masks whole channels (``squeeze_release``'s ``structure``): always with ``"groups"``,
    never with ``"weights"``; with ``"auto"`` once a cycle did, or once cycles have passed and the best of them kept a
    model at most ``LITTLE`` times smaller (the weight masks stalled). A function of the recorded history only, so a
    resumed run decides as the uninterrupted one."""
    if structure != "auto":
        return structure == "groups"
    passed = [row["compression"] for row in history if row["passed"]]
    return any(row.get("structure") == "groups" for row in history) or (bool(passed) and max(passed) <= LITTLE)


@dataclass
class SqueezeReleaseResult:
    """The model kept (the smallest whose accuracy is within ``tolerance`` of the dense model's, or a copy of the
    dense model itself when no cycle got there; an instance of the user's class unless the run warned that it went
    the graph path) and one history row per cycle."""

    module: nn.Module
    history: list[dict[str, Any]]
    dense: dict[str, Any]
    best_cycle: int | None

    @property
    def compression(self) -> float:
        return self.dense["params"] / count_params(self.module)

    def table(self) -> str:
        rows = [f"{'cycle':>5}  {'sparsity':>8}  {'params':>10}  {'compression':>11}  {'FLOPs':>13}  {'accuracy':>8}  "
                f"{'fxprune share':>13}",
                f"{'dense':>5}  {'':>8}  {self.dense['params']:>10,}  {1.0:>10.2f}x  {self.dense['flops']:>13,}  "
                f"{self.dense['accuracy']:>8.4f}"]
        for h in self.history:
            mark = " *" if h["cycle"] == self.best_cycle else ""
            share = f"{h['fxprune_seconds'] / h['seconds']:>13.1%}" if h.get("seconds") and "fxprune_seconds" in h else ""
            rows.append(f"{h['cycle']:>5}  {h['sparsity']:>8.3f}  {h['params']:>10,}  {h['compression']:>10.2f}x  "
                        f"{h['flops']:>13,}  {h['accuracy']:>8.4f}  {share}{mark}")
        return "\n".join(rows)


def _progress(progress: bool | Callable[[str], None]) -> Callable[[str], None]:
    if callable(progress):
        return progress
    if progress:
        return lambda msg: print(f"[fxprune] {msg}", file=sys.stderr, flush=True)
    return lambda msg: None


class _Clocked:
    """A user's ``train`` or ``evaluate``, with the seconds spent in it summed (the rest of a cycle is fxprune's)."""

    def __init__(self, f: Callable[[nn.Module], Any]) -> None:
        self.f, self.seconds = f, 0.0
        self.warned = False  # (train: an UntrainedWarning was given in this run)
        self.place: ModelCall | None = None  # on the graph path: how the user's class is called (keyword inputs)

    def __call__(self, m: nn.Module) -> Any:
        if self.place is not None:
            _called_as_model(m, self.place)
        t0 = time.perf_counter()
        try:
            return self.f(m)
        finally:
            self.seconds += time.perf_counter() - t0


def _called_as_model(m: nn.Module, place: ModelCall) -> nn.Module:
    """``m`` (a GraphModule that stands in for the user's class) called as that class is: by keyword, inputs with
    defaults left out (transformers' ``Trainer`` calls ``model(**batch)``); a forward pre-hook places them. Set again
    on each graph handed over: a GraphModule's deep copy drops forward hooks."""
    if isinstance(m, GraphModule) and not any(h == place.hook for h in m._forward_pre_hooks.values()):
        m.register_forward_pre_hook(place.hook, with_kwargs=True)
    return m


def _call_train(train: Callable[[nn.Module], Any], m: nn.Module) -> nn.Module:
    """``train(m)``; the module it returned, unwrapped (DistributedDataParallel, ``torch.compile``, DataParallel),
    else ``m``."""
    out = train(m)
    return unwrapped(out) if isinstance(out, nn.Module) else m


def _sums(m: nn.Module) -> list[tuple[float, float]]:
    """Per floating parameter of ``m``, the sum of its entries and their norm (accumulated in float64, with no
    float64 copy of the tensor): what :func:`_trained` compares to tell whether ``train`` changed the model."""
    with torch.no_grad():
        return [(float(torch.sum(p, dtype=torch.float64)), float(torch.linalg.vector_norm(p, dtype=torch.float64)))
                for p in m.parameters() if p.is_floating_point()]


def _score(value: Any) -> float:
    """What ``evaluate`` returned, as a float: a number, or a tensor or NumPy scalar holding one."""
    if isinstance(value, dict):
        keys = ", ".join(repr(k) for k in list(value)[:6])
        raise InputError(f"evaluate returned a dict ({keys}): it must return one number, higher is better. Pick one "
                         "(evaluate=lambda m: trainer.evaluate()['eval_accuracy']); return a loss negated")
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"evaluate must return one number (an accuracy: higher is better), got "
                         f"{type(value).__name__}") from None


State = dict[str, torch.Tensor]


def _state(m: nn.Module) -> State:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _modes(m: nn.Module) -> dict[str, bool]:
    return {name: mod.training for name, mod in m.named_modules()}


def _graph_of(model: nn.Module, inputs: tuple[Any, ...]) -> GraphModule:
    """The graph path's capture of ``model``, which must take the inputs the user's loop passes."""
    gm = capture(model, inputs)
    if len(gm.meta[EXAMPLE_INPUTS_KEY]) != len(inputs):
        raise UnsupportedError(f"squeeze_release cannot go on with the captured graph of {type(model).__name__}: it "
                               "was captured without the labels it was given (LabelsLeftOutWarning), so it cannot "
                               "stand in for the model in a loop that passes them (GraphPathWarning says why its "
                               "class could not be kept)")
    return gm


def _rebuilt(struct: nn.Module, state: State, modes: dict[str, bool]) -> nn.Module:
    """A copy of ``struct`` holding ``state``'s values, in ``modes`` (by module name; others in eval mode)."""
    out = plain_copy(struct)
    have = out.state_dict()
    if set(have) != set(state) or any(have[k].shape != state[k].shape for k in state):
        raise CheckpointError("the recorded tensors do not fit the rebuilt model (names or shapes differ): the "
                              "checkpoint was written by another version of fxprune or for another model")
    with torch.no_grad():
        for k, v in state.items():
            have[k].copy_(v)
    for name, mod in out.named_modules():
        mod.training = modes.get(name, False)
    return out


def _trained(train: Callable[[nn.Module], Any], m: nn.Module, masks: dict[str, torch.Tensor] | None,
             lasso: GroupLasso | None, bn_batches: int) -> nn.Module:
    """``train`` on ``m`` with ``masks`` held as parametrizations and the group lasso attached to every optimizer
    step, then BatchNorm's running statistics re-estimated from the last ``bn_batches`` batches it trained on;
    the trained model with plain parameters (masked entries exact zeros)."""
    home = accelerator(m)  # (None: the CPU)
    held = hold_masks_(m, masks) if masks else m
    with contextlib.ExitStack() as stack:
        rec = stack.enter_context(BatchRecorder(held, bn_batches)) if bn_batches and batchnorms(held) else None
        if lasso is not None:
            stack.enter_context(lasso.attach(held))
        before = _sums(held)
        out = _call_train(train, held)
    if isinstance(train, _Clocked) and not train.warned and _sums(out) == before:
        train.warned = True
        warnings.warn(f"squeeze_release: train changed no parameter of the {type(held).__name__} it was given. Each "
                      "call gets a copy of your model (masks held as parametrizations): build the optimizer inside "
                      "train, from the module it receives, not from your original model (an optimizer over those "
                      "parameters steps tensors the copy does not use)", UntrainedWarning, stacklevel=3)
    if rec is not None:
        recalibrate_batchnorm(out, rec.batches)
    out = bake_masks_(out) if masks else out
    if accelerator(out) != home:  # train moved it (a Trainer puts what it trains on the GPU): the cycle keeps
        out.to(home or "cpu")      # the model where it came, as its inputs are
    return out


OMITTED = {"structure": "weights", "bn_batches": 0, "lasso_every": 1}  # settings a checkpoint records only when
# they differ from these (the values of the versions before them)


def _settings(**kw: Any) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in kw.items()}


def _class_kept(model: nn.Module, inputs: tuple[Any, ...], verify: bool) -> ClassKept | None:
    """What ``model``'s class cannot lose, before any cycle: a copy with the first channel of every free group
    zeroed in every slice of every member (a dead channel of each group, a dead channel inside each head and a dead
    head), minimized as the cycle minimizes (:func:`~fxprune.interop.module.minimize_module_kept`). The masks and
    the group lasso then leave out what it kept: channels pulled to zero there would stay in the class, zeros.
    None where that minimize fails (the cycle's own minimize step then goes its way); it draws no random numbers
    from the caller's generators."""
    from fxprune.analysis.groups import Analysis, param_slices
    from fxprune.passes.lower import lower_modules

    probe = plain_copy(model)
    for m in probe.modules():
        m.training = False
    try:
        with warnings.catch_warnings(), torch.random.fork_rng():  # (CPU and every CUDA device's generator)
            warnings.simplefilter("ignore")  # (the cycle's own minimize steps warn of what they keep)
            an = Analysis(lower_modules(eval_capture(probe, inputs)))
            slices, leaves = param_slices(an, {n for n, _ in probe.named_parameters()})
            first = torch.tensor([offset for offset, _ in leaves], dtype=torch.long)
            with torch.no_grad():
                for sl in slices:
                    at = torch.isin(sl.channel, first).nonzero().flatten()
                    if at.numel():
                        p = probe.get_parameter(sl.name)
                        p.index_fill_(sl.dim, at.to(p.device), 0.0)
            return minimize_module_kept(probe, inputs, verify=verify)[1]
    except (CaptureError, UnsupportedError, EquivalenceError, InputError):
        return None


def _group_masks(work: nn.Module, inputs: tuple[Any, ...], sparsity: float, include: Sequence[str] | None,
                 exclude: Sequence[str] | None, keep: dict[str, str], whole_heads: set[str]) -> dict[str, torch.Tensor]:
    """Structured masks of ``work`` (whole channels of its groups, but those its class keeps), read off a capture of
    it in eval mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TargetNotReachedWarning)  # the cycle reports what it reached
        return group_masks(eval_capture(work, inputs), sparsity, include=include, exclude=exclude, keep=keep,
                           whole_heads=sorted(whole_heads))[0]


def squeeze_release(model: nn.Module, example_inputs: Sequence[Any], *, train: Callable[[nn.Module], Any],
                    evaluate: Callable[[nn.Module], float], cycles: int = 3,
                    sparsity: float | Sequence[float] | Callable[[int], float] = 0.8, mask_steps: int = 4,
                    scope: Literal["global", "layer"] = "global", include: Sequence[str] | None = None,
                    exclude: Sequence[str] | None = None, structure: Literal["auto", "weights", "groups"] = "auto",
                    release_scale: float = 0.01, release: bool = True,
                    lasso: float = DEFAULT_STRENGTH, lasso_every: int = DEFAULT_EVERY, tolerance: float = 0.01, backoff: bool = True, seed: int = 0,
                    bn_batches: int = 16, verify: bool = True,
                    progress: bool | Callable[[str], None] = True, checkpoint_dir: str | os.PathLike | None = None,
                    resume: bool = False) -> SqueezeReleaseResult:
    """Run ``cycles`` of mask -> fine-tune -> minimize -> release -> fine-tune on a copy of ``model``.

    ``train(module)`` fine-tunes in place, with any optimizer and loop (it may wrap the module in
    DistributedDataParallel, or hand it to transformers' ``Trainer``; the masks are parametrizations, so they stay
    applied) and may return the module. ``module`` is a copy of ``model``'s own classes. ``evaluate(module)`` returns an accuracy
    (higher is better). ``sparsity`` is each cycle's final mask sparsity of the current (already smaller) model:
    a number, one per cycle, or a function of the cycle index; within a cycle it is reached over ``mask_steps``
    masking steps on a cubic schedule, each followed by ``train``. After ``minimize``, the zeros left are
    released and ``train`` runs again; the cycle's model is the more accurate of the minimized and the released
    one (both have the same parameters). ``release=False`` is the ablation: the zeros left stay held at zero
    during that fine-tune (same training, no released capacity). ``lasso`` is the strength of the group lasso over
    fxprune's channel groups (:class:`~fxprune.interop.lasso.GroupLasso`; it acts around every optimizer step
    inside the masking steps' ``train`` calls, with that step's learning rate, not in the fine-tune after release;
    0 turns it off); ``lasso_every=k`` reads the weights for it
    every k optimizer steps (default 16; ``GroupLasso(every=k)``: zeros held in between, 1 reads at every step); ``exclude`` globs are
    neither masked nor regularized. ``structure="weights"`` masks single weights (magnitude), leaving it to the
    group lasso to make whole channels zero; ``structure="groups"`` masks whole channels of fxprune's groups
    (:func:`~fxprune.passes.mask.group_masks`: the mask step's sparsity is then the fraction of the model's
    parameters that minimize removes); ``structure="auto"`` (the default) masks weights until cycles have passed
    with the best of them at most ``LITTLE`` (1.5) times smaller, and whole channels from the next cycle on
    (:func:`masks_groups`; the history's ``structure`` says which each cycle used). After every ``train`` call, the running statistics of the model's
    BatchNorm modules are re-estimated from the last ``bn_batches`` batches that call fed the model in train mode,
    with the weights it ended with (:func:`~fxprune.interop.batchnorm.recalibrate_batchnorm`: the running averages
    lag behind weights that move fast, as after a mask step or a release; 0 keeps what training left). Returns the smallest cycle model whose accuracy
    is within ``tolerance`` of the dense model's (or the dense capture), and the per-cycle history.

    ``backoff=True``: a cycle whose model falls outside ``tolerance`` is not built on. The next cycle starts again
    from the best model so far (the dense one if none) with half the step: the kept fraction of its mask
    square-rooted (sparsity ``s`` becomes ``1 - (1 - s) ** 0.5``) and the lasso strength halved
    (:func:`stepped`). Like a trust region, every failed cycle halves the step once more and every passing one
    doubles it back, up to the schedule's; a passing cycle that removed nothing doubles the lasso strength
    instead (the sparsity stays the schedule's; at most four times the strength). The history records the step (``step``, the halvings in force), the
    sparsity and strength used, and whether the cycle passed (``passed``). ``backoff=False``: every cycle builds
    on the one before, at the schedule's sparsity and the full strength.

    ``checkpoint_dir`` writes every complete cycle there (safetensors + JSON: the weights, the masks, the
    history, every RNG state, the global torch RNG included); ``resume=True`` continues from the last complete
    cycle (or starts, when the directory holds none) and ends with the same model, bit for bit, as an
    uninterrupted run, provided ``train`` and ``evaluate`` draw randomness only from the global RNGs (torch,
    Python, NumPy) or from state of their own that the caller restores. A checkpoint of another model, of other
    settings, or a damaged one raises :class:`~fxprune.errors.CheckpointError`. Under ``torch.distributed`` the
    ranks run the passes on rank 0's weights and decide on rank 0's accuracies
    (:mod:`fxprune.interop.distributed`).
    """
    require("cycles", cycles, "positive integer")
    require("mask_steps", mask_steps, "positive integer")
    if not callable(train) or not callable(evaluate):
        raise InputError("train and evaluate must be callables taking the module")
    if structure not in ("auto", "weights", "groups"):
        raise InputError(f"structure must be 'auto', 'weights' or 'groups', got {structure!r}")
    if resume and checkpoint_dir is None:
        raise InputError("resume=True needs checkpoint_dir: the directory an earlier run wrote its cycles to")
    ranks = Ranks()
    say = _progress(progress) if ranks.rank == 0 else _progress(False)
    train, evaluate = _Clocked(train), _Clocked(evaluate)  # the seconds spent in the user's code, per cycle
    inputs = as_inputs(example_inputs, model)
    given = [] if callable(sparsity) else list(sparsity) if isinstance(sparsity, Sequence) else [sparsity]
    for s in given:
        require("sparsity", s, "number in [0, 1)", note=" (or one per cycle, or a function of the cycle)")
    if isinstance(sparsity, Sequence) and len(given) < cycles:
        raise InputError(f"sparsity gives {len(given)} values for {cycles} cycles: give one per cycle")
    target = sparsity if callable(sparsity) else (lambda c: sparsity[c]) if isinstance(sparsity, Sequence) else (lambda c: sparsity)
    require("lasso_every", lasso_every, "positive integer")
    require("lasso", lasso, "non-negative number", note=" (0 turns the group lasso off)")
    require("bn_batches", bn_batches, "non-negative integer", note=" (0 keeps the running statistics training left)")
    model = unwrapped(model)  # torch.compile, DataParallel, DDP: the cycle works on (a copy of) the module inside
    base = unmasked(model)
    base = plain_copy(base) if base is model else base  # (plain: a state a forward left in the model is no weight)
    graph_path = isinstance(base, GraphModule)
    settings = _settings(mask_steps=mask_steps, scope=scope, include=include, exclude=exclude,
                         release_scale=release_scale, release=release, tolerance=tolerance, seed=seed, lasso=lasso,
                         backoff=backoff, **{k: v for k, v in dict(structure=structure, bn_batches=bn_batches,
                                                                  lasso_every=lasso_every).items() if v != OMITTED[k]})
    ckpt = CycleCheckpoint(checkpoint_dir, ranks.rank, ranks.barrier) if checkpoint_dir is not None else None
    dense, done = None, []
    if ckpt is not None:
        dense, done = _open(ckpt, base, inputs, settings, ranks.world, resume)
    if dense is None:
        dense = dict(params=count_params(base), flops=count_flops(base, inputs),
                     accuracy=ranks.broadcast_float(_score(evaluate(plain_copy(base)))))
        if ckpt is not None:
            ckpt.start(dict(fingerprint=fingerprint(base.state_dict(), inputs), settings=settings, dense=dense,
                            world=ranks.world))
    say(f"dense: {dense['params']:,} params, accuracy {dense['accuracy']:.4f}")

    held: dict[str, str] = {}  # tensors (or "name:dim") minimize_module kept because the class cannot lose them
    inside: set[str] = set()  # head dims ("name:dim") whose channels inside the heads the class keeps

    def hold(kept: ClassKept | None) -> None:  # what the class cannot lose: out of the later masks and group lasso
        if kept is not None:
            held.update(kept.keep)
            inside.update(kept.whole_heads)

    if not graph_path and (lasso or structure != "weights"):
        say("probing which channel groups the model's class can lose")
        hold(_class_kept(base, inputs, verify))

    def minimized(pre: nn.Module) -> nn.Module:  # a failure on one rank stops every rank
        nonlocal graph_path
        check = verify and ranks.rank == 0
        pre = plain_copy(pre)
        for m in pre.modules():  # the deployed function: dropout off, BatchNorm on its running statistics (set
            m.training = False   # directly: the module torch.export returns refuses .eval())
        if not graph_path:
            try:
                # every rank checks here: what the check freezes decides the shapes, which the ranks must share
                out, kept = ranks.run_all(lambda: minimize_module_kept(pre, inputs, verify=verify), "minimize")
                hold(kept)
                return out
            except (CaptureError, UnsupportedError, EquivalenceError) as e:
                # an EquivalenceError: a copy of the class that differs (the graph is checked on its own below, and
                # raises where it is at fault); never another rank's failure, which stops this rank too
                if isinstance(e, PeerFailedError):
                    raise
                graph_path = True
                train.place = evaluate.place = model_call(pre, inputs)  # (the user's class, read before its
                # graph stands in for it)
                warnings.warn(f"squeeze_release could not keep {type(pre).__name__} as its own class "
                              f"({str(e).splitlines()[0]}); it goes on with the captured graph, and train/evaluate "
                              "receive GraphModules from here on", GraphPathWarning, stacklevel=3)
        with cache_off(pre):  # (torch.export cannot return transformers' KV cache: the graph returns none)
            gm = ranks.run_all(lambda: minimize(_graph_of(pre, inputs), inputs, verify=check), "minimize")
        out, baked = trainable(gm, inputs if check else None)  # BatchNorm and dropout switch with .train() again
        if baked:
            warnings.warn(f"squeeze_release: {len(baked)} BatchNorm/dropout call(s) of the graph keep the eval mode "
                          f"they were captured in ({', '.join(baked[:4])}): train/evaluate run them as in eval mode",
                          GraphPathWarning, stacklevel=3)
        return out

    history: list[dict[str, Any]] = []
    best, best_cycle, best_params = base, None, dense["params"]
    best_struct, level = base, 0  # the structure the best model has; the step's halvings so far (backoff)
    struct, work = base, base
    if done:  # rebuild the models of the complete cycles by re-running minimize on their recorded inputs
        for j in done:
            say(f"resume: rebuilding cycle {j}/{len(done)} from {checkpoint_dir}")
            groups, st, rng = ckpt.read(j)
            if st["row"]["target"] != float(target(j - 1)):
                raise CheckpointError(f"cycle {j} ran at sparsity {st['row']['target']}, this call asks for "
                                      f"{float(target(j - 1))}: resume with the same sparsity schedule")
            struct = minimized(_rebuilt(struct, groups["pre"], st["pre_modes"]))
            if {k: list(v.shape) for k, v in struct.state_dict().items()} != st["shapes"]:
                raise CheckpointError(f"cycle {j} rebuilt to other shapes than the run recorded: the checkpoint "
                                      "was written by another version of fxprune")
            if "best" in groups:
                best, best_cycle, best_params = _rebuilt(struct, groups["best"], st["best_modes"]), j, st["row"]["params"]
                best_struct = struct
            history.append(st["row"])
            if backoff and not st["row"]["passed"]:  # the next cycle started from the best model
                struct = best_struct
            level = _next_level(level, st["row"], backoff)
        work = _rebuilt(struct, groups["work"], st["work_modes"])
        set_rng_state(rng)
    lassos: dict[int, tuple[Any, GroupLasso]] = {}  # per structure (its module, weakly): its groups, read once

    def lasso_for(shape: nn.Module, m: nn.Module, strength: float) -> GroupLasso | None:
        """The group lasso for ``m`` (a model of structure ``shape``) at ``strength``: the groups are the
        structure's (what its graph couples; the weights do not enter), so a structure's is built once, at its first
        use."""
        if not strength:
            return None
        ref, reg = lassos.get(id(shape), (None, None))
        if reg is None or ref() is not shape:
            reg = GroupLasso(m, inputs, strength=strength, exclude=exclude, every=lasso_every, keep=held,
                             whole_heads=tuple(sorted(inside)))
            lassos[id(shape)] = (weakref.ref(shape), reg)
        reg = copy.copy(reg)
        reg.strength, reg.seconds = strength, 0.0
        return reg

    for c in range(len(done), cycles):
        t0, start_params = time.perf_counter(), count_params(work)
        user0 = train.seconds + evaluate.seconds
        final, strength = stepped(float(target(c)), lasso, level)
        reg = lasso_for(struct, work, strength)
        lasso_s = 0.0
        groups_now = masks_groups(structure, history)
        if groups_now and structure == "auto" and not masks_groups(structure, history[:-1]):
            say(f"cycle {c + 1}/{cycles}: the weight masks kept a model at most {LITTLE}x smaller in cycles that "
                "passed; whole channels are masked from here on (structure='auto')")
        masks: dict[str, torch.Tensor] = {}
        for step in range(1, mask_steps + 1):
            s = sparsity_schedule(step, mask_steps, final)
            say(f"cycle {c + 1}/{cycles}: mask step {step}/{mask_steps} at sparsity {s:.3f}, fine-tuning")
            work = _rebuilt(work, _state(work), _modes(work))
            step_masks = (_group_masks(work, inputs, s, include, exclude, held, inside) if groups_now else
                          magnitude_masks(work, s, scope=scope, include=include, exclude=exclude, seed=seed + c))
            masks = apply_masks(work, step_masks, masks)
            work = _trained(train, work, masks, reg, bn_batches)
        say(f"cycle {c + 1}/{cycles}: minimize")
        ranks.broadcast_module(work, f"cycle {c + 1}'s masked model")
        pre_state, pre_modes = _state(work), _modes(work)
        struct = minimized(_rebuilt(struct, pre_state, pre_modes))
        ranks.broadcast_module(struct, f"cycle {c + 1}'s minimized model")
        small_state = _state(struct)
        small_modes = {name: pre_modes.get(name, False) for name, _ in struct.named_modules()}
        small = _rebuilt(struct, small_state, small_modes)
        params = count_params(small)
        acc_min = ranks.broadcast_float(_score(evaluate(_rebuilt(struct, small_state, small_modes))))
        lasso_s += reg.seconds if reg is not None else 0.0
        if release:  # the group lasso is off here: the released capacity goes back to the loss
            say(f"cycle {c + 1}/{cycles}: release and fine-tune")
            work = _trained(train, release_zeros(small, release_scale, seed=seed + c), None, None, bn_batches)
        else:
            say(f"cycle {c + 1}/{cycles}: fine-tune with the zeros held")
            zeros = {n: p.detach() != 0 for n, p in prunable(small, include, exclude, computed=True).items()}
            work = _trained(train, small, zeros, None, bn_batches)
        ranks.broadcast_module(work, f"cycle {c + 1}'s fine-tuned model")
        work_state, work_modes = _state(work), _modes(work)
        acc_rel = ranks.broadcast_float(_score(evaluate(_rebuilt(struct, work_state, work_modes))))
        work = _rebuilt(struct, work_state, work_modes)
        acc, kept_state, kept_modes = ((acc_rel, work_state, work_modes) if acc_rel > acc_min
                                       else (acc_min, small_state, small_modes))
        passed = acc >= dense["accuracy"] - tolerance
        seconds = time.perf_counter() - t0
        user_s = train.seconds + evaluate.seconds - user0 - lasso_s  # the lasso's hooks run inside train
        row = dict(cycle=c + 1, target=float(target(c)), sparsity=final, lasso=strength, step=level,
                   structure="groups" if groups_now else "weights", params=params,
                   flops=count_flops(small, inputs), accuracy=acc, accuracy_minimized=acc_min, accuracy_released=acc_rel,
                   compression=dense["params"] / params, passed=passed, start_params=start_params,
                   seconds=seconds, user_seconds=user_s, fxprune_seconds=seconds - user_s, lasso_seconds=lasso_s)
        improved = passed and params < best_params
        if improved:
            best, best_cycle, best_params = _rebuilt(struct, kept_state, kept_modes), c + 1, params
            best_struct = struct
        history.append(row)
        say(f"cycle {c + 1}/{cycles}: {params:,} params ({row['compression']:.2f}x), accuracy {acc_min:.4f} "
            f"minimized, {acc_rel:.4f} {'released' if release else 'held'} and fine-tuned")
        if backoff and not passed:  # start again from the best model, with half the step
            say(f"cycle {c + 1}/{cycles}: outside the tolerance; the next cycle starts from "
                f"{'the dense model' if best_cycle is None else f'cycle {best_cycle}'} with half the step")
            struct = best_struct
            work_state, work_modes = _state(best), _modes(best)
            work = _rebuilt(struct, work_state, work_modes)
        level = _next_level(level, row, backoff)
        if ckpt is not None:  # "work": what the next cycle starts from
            tensors = {"pre": pre_state, "mask": masks, "work": work_state, **({"best": kept_state} if improved else {})}
            ckpt.write(c + 1, tensors, dict(row=row, pre_modes=pre_modes, work_modes=work_modes,
                                            best_modes=kept_modes if improved else None,
                                            shapes={k: list(v.shape) for k, v in small_state.items()}))
    result = SqueezeReleaseResult(best if train.place is None else _called_as_model(best, train.place), history,
                                  dense, best_cycle)
    if any(row["passed"] for row in history) and result.compression <= LITTLE:
        _warn_little(result, structure, lasso)
    return result


def _warn_little(result: SqueezeReleaseResult, structure: str, lasso: float) -> None:
    start = f"squeeze_release kept a model only {result.compression:.2f}x smaller although cycles passed: "
    rows = [row for row in result.history if row.get("structure") == "groups"]
    if any(row["passed"] for row in rows):
        msg = ("masking whole channels removed little as well: the sparsity asks little, or most channels are in "
               "frozen groups (fp.analyze says why) or excluded")
    elif rows:
        msg = ("the cycles that masked whole channels fell outside the tolerance; a smaller sparsity, more cycles "
               "(backoff halves the step after each failure) or a larger tolerance let them pass")
    else:
        why = ("the group lasso zeroed few (a loss that defends no channel lets it shrink all alike)" if lasso
               else "the group lasso is off (lasso=0)")
        then = ("With structure='auto' a cycle after this one would mask whole channels: give more cycles, or "
                "structure='groups'" if structure == "auto" else "structure='groups' masks whole channels of "
                "fxprune's groups instead")
        msg = f"the weight masks left few whole channels, and {why}. {then} (guide, the cycle)"
    warnings.warn(start + msg, LittleRemovedWarning, stacklevel=3)


def _next_level(level: int, row: dict[str, Any], backoff: bool) -> int:
    """The step's halvings for the cycle after ``row``'s: one more after a failed cycle (counted from the schedule's
    step: a cycle that failed with the strength doubled ran at the schedule's sparsity, so the next one halves it);
    after a passing one, one fewer when it removed nothing (down to ``-MAX_DOUBLINGS``: the strength doubled that
    often), else one fewer down to 0 (the schedule's step)."""
    if not backoff:
        return 0
    if not row["passed"]:
        return max(level, 0) + 1
    if row["params"] >= row["start_params"]:
        return max(-MAX_DOUBLINGS, level - 1)
    return max(0, level - 1) if level > 0 else level


MAX_DOUBLINGS = 2


def stepped(sparsity: float, lasso: float, level: int) -> tuple[float, float]:
    """A cycle's mask sparsity and lasso strength at step ``level`` (``squeeze_release``'s backoff): ``level > 0``
    halvings raise the kept fraction ``1 - sparsity`` to ``0.5 ** level`` and multiply the strength by
    ``0.5 ** level``; ``level < 0`` (a stalled run) keeps the sparsity and multiplies the strength by
    ``2 ** -level``."""
    if level < 0:
        return sparsity, lasso * 2.0 ** -level
    half = 0.5 ** level
    return 1.0 - (1.0 - sparsity) ** half, lasso * half


def _open(ckpt: CycleCheckpoint, gm: nn.Module, inputs: tuple[Any, ...], settings: dict[str, Any], world: int,
          resume: bool) -> tuple[dict[str, Any] | None, list[int]]:
    """The dense figures and the complete cycles of an existing checkpoint, after checking that it belongs to this
    model, these settings and this number of ranks."""
    info, done = ckpt.run_info(), ckpt.cycles()
    if info is None and not done:
        return None, []
    if not resume:
        raise CheckpointError(f"{ckpt.dir} already holds a squeeze_release checkpoint ({len(done)} cycles): pass "
                              "resume=True to continue it, or an empty checkpoint_dir to start again")
    if info is None:
        raise CheckpointError(f"{ckpt.dir} has cycle directories but no run.json: the checkpoint is damaged")
    if info.get("fingerprint") != fingerprint(gm.state_dict(), inputs):
        raise CheckpointError(f"{ckpt.dir} was written for another model (its weights or example input shapes "
                              "differ): pass the model and inputs of that run, or a new checkpoint_dir")
    wrote = info.get("settings", {})
    changed = sorted(k for k in set(settings) | set(wrote)
                     if wrote.get(k, OMITTED.get(k)) != settings.get(k, OMITTED.get(k)))
    if changed:
        was = ", ".join(f"{k}={wrote.get(k, OMITTED.get(k))!r}" for k in changed)
        raise CheckpointError(f"{ckpt.dir} was written with other settings ({was}): "
                              "resume with the same settings (only cycles may grow)")
    if info.get("world") != world:
        raise CheckpointError(f"{ckpt.dir} was written by {info.get('world')} process(es), this job has {world}: "
                              "resume with the same number of ranks")
    return info["dense"], done
