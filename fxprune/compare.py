"""The one comparator of model outputs and the one checking driver: capture's check, the trainable-modes check,
minimize's self-check, the streamed block-by-block check and ``verify`` all run through :func:`check` and
:func:`compare`.

Outputs are compared leaf by leaf (pytree); the error of one output is ``max |a - b| / max |a|`` (absolute where
the reference is all zero), positions where both hold the same value (infinities included) or both NaN count as
equal. The tolerance follows the lowest floating precision the reference computes in (:func:`precision_of`):
float64 end to end is held to 1e-9; a graph that casts to float32 inside (transformers' RMSNorm does) to float32's.
Both sides of a check compute float32 in IEEE float32 (:func:`ieee_float32`), never in the TF32 a GPU may use.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn
from torch.utils import _pytree as pytree

__all__ = ["Point", "check", "ieee_float32", "OutputDiff", "compare", "rtol_for", "stored_rtol", "float32_rtol",
           "precision_of", "first_failure", "worst", "tensors", "to_dtype", "cast", "rounding_only", "own_rounding",
           "within_own_rounding", "EXACT_RTOL", "NOISE_FACTOR"]

EXACT_RTOL = 1e-9  # float64 relative error that counts as exact
_RTOL = {torch.float64: EXACT_RTOL, torch.float32: 1e-4}
_ORDER = [torch.float64, torch.float32, torch.bfloat16, torch.float16]  # wider first; half precisions last
NOISE_FACTOR = 4  # a float32 difference up to this many times the model's own float32 error is its rounding


def rtol_for(dtype: torch.dtype) -> float:
    """Relative tolerance for results computed in ``dtype``: 1e-9 for float64, 1e-4 for float32, 16 ulps (of 1)
    for half precisions (a constant folded into a half-precision bias rounds coarsely)."""
    return _RTOL.get(dtype, 16 * torch.finfo(dtype).eps)


def stored_rtol(dtype: torch.dtype) -> float:
    """Relative tolerance for a float64 run of a model whose values are stored in ``dtype``: the computation is
    exact to 1e-9, the constants folded into ``dtype`` parameters are rounded to it (8 ulps: 1e-6 for float32)."""
    return EXACT_RTOL if dtype == torch.float64 else 8 * torch.finfo(dtype).eps


def float32_rtol(noise: float) -> float:
    """The tolerance of a float32 comparison with a model whose own float32 outputs are ``noise`` (relative error)
    from its float64 ones: 1e-4, or ``NOISE_FACTOR`` times that noise where the model rounds more than that itself.
    An ill-conditioned network (large activations that nearly cancel, as in an untrained MobileNetV2 with
    BatchNorm: 9e-4) rounds above 1e-4 in float32, and a rewrite of it that sums in another order rounds
    differently by as much. Both lie within the model's own rounding of the exact result, so the difference can
    reach about twice it; where it does, the rewrite's exactness is what the float64 comparison shows."""
    return max(_RTOL[torch.float32], NOISE_FACTOR * noise)


def to_dtype(m: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``m`` in floating dtype ``dtype``, dtype constants inside its graphs included (``m`` itself
    when it is float32 already and float32 is asked for)."""
    from torch.fx import GraphModule

    floats = {torch.float16, torch.bfloat16, torch.float32, torch.float64} - {dtype}
    if all(t.dtype == dtype for t in m.state_dict().values() if t.is_floating_point()) and dtype is torch.float32:
        return m
    out = copy.deepcopy(m).to(dtype)
    swap = lambda a: dtype if a in floats else a  # noqa: E731
    for sub in out.modules():
        if isinstance(sub, GraphModule):
            for n in sub.graph.nodes:
                n.args = pytree.tree_map(swap, n.args)
                n.kwargs = pytree.tree_map(swap, n.kwargs)
            sub.recompile()
    return out


def cast(xs: Any, dtype: torch.dtype) -> Any:
    """``xs`` (inputs: a tuple, dicts and lists inside) with every floating tensor in ``dtype``."""
    return pytree.tree_map(lambda x: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x, xs)


def rounding_only(model: nn.Module, candidate: nn.Module, inputs: Any, out: Any, got: Any,
                  noise: list[float] | None = None, exact: nn.Module | None = None) -> bool:
    """Whether ``candidate``'s float32 outputs ``got`` differ from ``model``'s ``out`` on ``inputs`` by rounding
    only: a float64 copy of ``candidate`` (its float32 constants as they are) is within :func:`stored_rtol` of a
    float64 copy of ``model``, and each float32 output within :func:`float32_rtol` of ``model``'s own float32
    error. False when either copy does not run in float64 (nothing is confirmed then). ``noise`` (a list the caller
    keeps across the inputs it checks, :func:`own_rounding` of them): per output, the largest own error measured
    so far, updated here; the own error used is the larger of it and this input's (one input, a single example,
    may happen to round little where the model rounds much).

    ``exact``: the same rewrite made on a float64 copy of the model, of which ``candidate`` is the float32 copy
    (each floating tensor of ``candidate`` is ``exact``'s rounded to float32: checked here). The float64 half then
    holds ``exact`` to :data:`EXACT_RTOL` instead. A model whose float64 output moves by more than
    :func:`stored_rtol` when constants are rounded to float32 fails the first form for any rewrite that folds one,
    exact or not (an untrained MobileNetV2 with BatchNorm: 6.8e-6, with the folded biases rounded once)."""
    diffs = compare(out, got)
    if any(d.problem is not None for d in diffs):  # a count, shape or integer mismatch is never rounding
        return False
    if exact is not None and not _rounded_copy(candidate, exact):
        return False
    x64 = cast(inputs, torch.float64)
    try:
        with torch.no_grad():
            want = to_dtype(model, torch.float64)(*x64)
    except Exception:  # noqa: BLE001 (a model that runs in float32 only: the float32 difference stands)
        return False
    own = _errors(want, out)
    if noise is not None:
        own = [max(e, noise[i] if i < len(noise) else 0.0) for i, e in enumerate(own)]
        noise[:] = own + noise[len(own):]
    if not within_own_rounding(diffs, own):
        return False
    try:
        with torch.no_grad():
            got64 = exact(*x64) if exact is not None else to_dtype(candidate, torch.float64)(*x64)
    except Exception:  # noqa: BLE001 (a candidate that runs in float32 only: nothing is confirmed)
        return False
    return first_failure(compare(want, got64), EXACT_RTOL if exact is not None else stored_rtol(torch.float32)) is None


def within_own_rounding(diffs: list[OutputDiff], own: list[float]) -> bool:
    """The float32 half of :func:`rounding_only`: each output's difference within :func:`float32_rtol` of the
    model's own float32 error there (``own``, one per output)."""
    return len(own) == len(diffs) > 0 and all(d.ok(float32_rtol(e)) for d, e in zip(diffs, own))


def _rounded_copy(candidate: nn.Module, exact: nn.Module) -> bool:
    """Whether ``candidate`` holds ``exact``'s tensors (the same names and shapes), each float64 one of ``exact``
    rounded to float32 and the others equal."""
    a, b = candidate.state_dict(), exact.state_dict()
    return a.keys() == b.keys() and all(
        x.shape == y.shape and (torch.equal(x, y.float()) and x.dtype == torch.float32 if y.dtype == torch.float64
                                else torch.equal(x, y)) for k in a for x, y in [(a[k], b[k])])


def own_rounding(model: nn.Module, inputs: Any, out: Any) -> list[float]:
    """``model``'s own float32 relative error per output on ``inputs`` (``out``: its float32 outputs there) against
    a float64 copy of it; empty when that copy does not run."""
    try:
        with torch.no_grad():
            want = to_dtype(model, torch.float64)(*cast(inputs, torch.float64))
    except Exception:  # noqa: BLE001 (a model that runs in float32 only)
        return []
    return _errors(want, out)


def _errors(want: Any, out: Any) -> list[float]:
    """Per output, the relative error of ``out`` against ``want`` (0 where they do not compare as numbers)."""
    return [n.max_rel if n.problem is None else 0.0 for n in compare(want, out)]


_FP32_SETTINGS = ("cuda.matmul", "cudnn.conv", "cudnn.rnn", "mkldnn.matmul", "mkldnn.conv", "mkldnn.rnn")
_LEGACY_TF32 = ("cublas", "cudnn")  # torch._C._get_/_set_{name}_allow_tf32 (oneDNN's: Intel GPUs only)


@contextlib.contextmanager
def ieee_float32() -> Iterator[None]:
    """While open, float32 matrix products, convolutions and RNNs compute in IEEE float32, whatever the process
    set: cuDNN convolutions use TF32 on Ampere-or-later GPUs by default (10 bits of mantissa: relative errors near
    1e-3), and ``torch.set_float32_matmul_precision("high")`` does the same for matrix products. A comparison held
    to float32's tolerance would read that rounding as the rewrite's error, and a constant folded in TF32 would be
    off by as much. Both of torch's interfaces are set, the flags it reads itself (``allow_tf32``) and the
    per-op ``fp32_precision`` of torch >= 2.9, so that torch.export, which reads the former, sees a consistent
    state; each comes back as it was."""
    legacy: list[tuple[str, bool]] = []
    for name in _LEGACY_TF32:
        get = getattr(torch._C, f"_get_{name}_allow_tf32", None)
        if get is None:
            continue
        try:
            legacy.append((name, bool(get())))
        except RuntimeError:  # a state mixed through both interfaces: torch cannot say; the per-op settings come back
            legacy.append((name, None))  # type: ignore[arg-type]
    leaves: list[tuple[Any, str]] = []
    for name in _FP32_SETTINGS:
        backend, op = name.split(".")
        owner = getattr(getattr(torch.backends, backend, None), op, None)
        if owner is not None and hasattr(owner, "fp32_precision"):
            leaves.append((owner, owner.fp32_precision))
    try:
        for name, _ in legacy:
            getattr(torch._C, f"_set_{name}_allow_tf32")(False)
        for owner, _ in leaves:
            owner.fp32_precision = "ieee"
        yield
    finally:
        for name, value in legacy:
            if value is not None:
                getattr(torch._C, f"_set_{name}_allow_tf32")(value)
        for owner, value in leaves:
            owner.fp32_precision = value


@contextlib.contextmanager
def eval_modes(model: nn.Module) -> Iterator[nn.Module]:
    """While open, every module of ``model`` is in eval mode (set directly: the module torch.export returns refuses
    ``.eval()``); each module's own mode comes back after."""
    modes = {m: m.training for m in model.modules()}
    try:
        for m in modes:
            m.training = False
        yield model
    finally:
        for m, training in modes.items():
            m.training = training


def precision_of(m: nn.Module) -> torch.dtype:
    """The lowest floating precision ``m`` computes in: its floating parameters and buffers and, for a graph, every
    floating value its nodes carry (``meta["val"]``) on the way to its outputs as floats: a value that reaches them
    only through integers (T5's and MPNet's relative position buckets, a float32 log turned into indices) leaves
    their precision alone. float64 when it holds nothing floating."""
    from torch.fx import GraphModule

    dtypes = {t.dtype for t in list(m.parameters()) + list(m.buffers()) if t.is_floating_point()}
    if isinstance(m, GraphModule):
        for n in _floating_path(m):
            for v in pytree.tree_leaves(n.meta.get("val")):
                if isinstance(v, torch.Tensor) and v.is_floating_point():
                    dtypes.add(v.dtype)
    return max(dtypes, key=lambda d: _ORDER.index(d) if d in _ORDER else len(_ORDER), default=torch.float64)


def _floating_path(gm: Any) -> list[Any]:
    """The nodes of ``gm`` from which a floating value reaches its output: back from the output, through every
    node that carries a floating value or none it knows, not past one whose values are all integers or bools."""
    def floating(n: Any) -> bool:
        vals = [v for v in pytree.tree_leaves(n.meta.get("val")) if isinstance(v, torch.Tensor)]
        return not vals or any(v.is_floating_point() or v.is_complex() for v in vals)

    out = [n for n in gm.graph.nodes if n.op == "output"]
    seen, todo = set(out), list(out)
    while todo:
        for a in todo.pop().all_input_nodes:
            if a not in seen and floating(a):
                seen.add(a)
                todo.append(a)
    return [n for n in gm.graph.nodes if n in seen]


@dataclass(frozen=True)
class OutputDiff:
    """One output: its index, the largest absolute and relative error, and a structural problem (count, shape,
    integer values) that makes the numbers meaningless (None when there is none)."""

    index: int
    max_abs: float
    max_rel: float
    problem: str | None = None

    def ok(self, rtol: float) -> bool:
        return self.problem is None and self.max_rel <= rtol


def tensors(out: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def compare(a: Any, b: Any) -> list[OutputDiff]:
    """Per tensor of the reference outputs ``a``, how far ``b``'s is from it."""
    ta, tb = tensors(a), tensors(b)
    if len(ta) != len(tb):
        return [OutputDiff(0, float("inf"), float("inf"), f"{len(ta)} output tensors vs {len(tb)}")]
    out = []
    for i, (x, y) in enumerate(zip(ta, tb)):
        if x.shape != y.shape:
            out.append(OutputDiff(i, float("inf"), float("inf"), f"shape {tuple(x.shape)} vs {tuple(y.shape)}"))
        elif not x.is_floating_point() or not y.is_floating_point():
            same = torch.equal(x, y)
            out.append(OutputDiff(i, 0.0 if same else float("inf"), 0.0 if same else float("inf"),
                                  None if same else "integer values differ"))
        elif x.numel() == 0 or x.device.type == "meta":
            out.append(OutputDiff(i, 0.0, 0.0))
        else:
            xd, yd = _wide(x, y), _wide(y, x)
            diff = (xd - yd).abs()
            if bool(diff.isnan().any()):  # NaN where both are NaN, or equal infinities, is no difference
                equal = (xd == yd) | (torch.isnan(xd) & torch.isnan(yd))
                diff = torch.where(equal, 0.0, diff)
            err = float(diff.max())
            scale = float(xd.abs().nan_to_num(0.0, posinf=0.0, neginf=0.0).max())  # largest finite |reference|
            out.append(OutputDiff(i, err, err / scale if scale > 0 else err))
    return out


def _wide(x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``x`` in the wider of the two dtypes, at least float32 (a difference of two float32 values is exact in
    float32 when they are close, and half types are widened exactly)."""
    dtype = torch.promote_types(torch.promote_types(x.dtype, other.dtype), torch.float32)
    return x.detach().to(dtype)


def first_failure(diffs: list[OutputDiff], rtol: float) -> OutputDiff | None:
    return next((d for d in diffs if not d.ok(rtol)), None)


def worst(diffs: list[OutputDiff]) -> float:
    """The largest relative error of ``diffs`` (0 when there are none)."""
    return max((d.max_rel for d in diffs), default=0.0)


@dataclass(frozen=True)
class Point:
    """One input point of a check: its position in the points, the inputs, the reference's outputs, and either the
    candidate's outputs and what the comparison found (``diffs``), or what the candidate raised (``error``)."""

    index: int
    inputs: tuple[Any, ...]
    expected: Any
    got: Any = None
    diffs: Any = None
    error: Exception | None = None

    def failure(self, rtol: float) -> OutputDiff | None:
        """The first output outside ``rtol`` (``diffs`` from :func:`compare`), or None."""
        return first_failure(self.diffs, rtol)

    def worst(self) -> float:
        return worst(self.diffs)


def check(reference: Callable[[tuple[Any, ...]], Any], candidate: Callable[[tuple[Any, ...]], Any],
          points: Iterable[tuple[Any, ...]], *, required: int = 1,
          skip: type[BaseException] | tuple[type[BaseException], ...] = Exception,
          diff: Callable[[Any, Any], Any] = compare) -> Iterator[Point]:
    """The one checking driver: at each input point, the ``reference``'s outputs and the ``candidate``'s (both run
    without gradients on the inputs tuple), compared by ``diff``; yields a :class:`Point` per point checked, and
    the caller decides what a difference means (raise with its message, record, carry on).

    A point where the reference raises ``skip`` is one it does not take: skipped, unless it is one of the first
    ``required`` points (the example), where the error propagates. What the candidate raises is yielded
    (``Point.error``), never swallowed."""
    for k, xs in enumerate(points):
        try:
            with torch.no_grad(), ieee_float32():
                expected = reference(xs)
        except skip:
            if k < required:
                raise
            continue
        try:
            with torch.no_grad(), ieee_float32():
                got = candidate(xs)
        except Exception as e:  # noqa: BLE001 (yielded to the caller, which decides)
            yield Point(k, xs, expected, error=e)
            continue
        yield Point(k, xs, expected, got, diff(expected, got))
