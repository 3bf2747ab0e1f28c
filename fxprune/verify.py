"""``verify``: numerical equivalence of two models, in float32 and float64, with size and FLOP counts."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn
from torch.fx import GraphModule
from torch.utils.flop_counter import FlopCounterMode

from fxprune.compare import (EXACT_RTOL, cast, check, compare, eval_modes, float32_rtol, ieee_float32, stored_rtol,
                             tensors, to_dtype)
from fxprune.errors import InputError, require
from fxprune.graph.capture import EXAMPLE_INPUTS_KEY, as_inputs, program_module
from fxprune.graph.dynamic import DYNAMIC_KEY, InputDims, batch_dims, from_graph, shape_str, shaped_inputs
from fxprune.graph.exported import program_inputs

__all__ = ["verify", "EquivalenceReport", "ShapeError", "count_params", "count_flops", "to_float64", "to_dtype", "EXACT_RTOL"]

@dataclass
class OutputError:
    index: int
    max_abs: dict[str, float]
    max_rel: dict[str, float]
    noise: float = 0.0  # the first model's own float32 relative error against its float64 run (its rounding)

    @property
    def float32_ok(self) -> bool:
        return self.max_rel["float32"] <= float32_rtol(self.noise)


@dataclass
class ShapeError:
    """The largest float64 relative error over the outputs at one set of input shapes."""

    shapes: str
    max_rel: float


@dataclass
class EquivalenceReport:
    """What :func:`verify` measured. ``ok`` is True when the float64 relative error is within ``rtol`` on every
    output and at every input shape, and the float32 one within 1e-4, or within 4x the first model's own float32
    error where that is larger (:func:`fxprune.compare.float32_rtol`)."""

    outputs: list[OutputError]
    params: tuple[int, int]
    flops: tuple[int, int]
    n_inputs: int
    rtol: float = EXACT_RTOL
    notes: list[str] = field(default_factory=list)
    shapes: list[ShapeError] = field(default_factory=list)  # every input shape checked, with its float64 error

    @property
    def max_rel(self) -> dict[str, float]:
        return {k: max((o.max_rel[k] for o in self.outputs), default=0.0) for k in ("float32", "float64")}

    @property
    def ok(self) -> bool:
        r = self.max_rel
        return (r["float64"] <= self.rtol and all(o.float32_ok for o in self.outputs)
                and all(sh.max_rel <= self.rtol for sh in self.shapes))

    def __str__(self) -> str:
        lines = [f"{'output':>6}  {'f32 max abs':>12}  {'f32 max rel':>12}  {'f64 max abs':>12}  {'f64 max rel':>12}"
                 f"  {'own f32 rel':>12}"]
        for o in self.outputs:
            lines.append(f"{o.index:>6}  {o.max_abs['float32']:>12.3e}  {o.max_rel['float32']:>12.3e}  "
                         f"{o.max_abs['float64']:>12.3e}  {o.max_rel['float64']:>12.3e}  {o.noise:>12.3e}")
        (pa, pb), (fa, fb) = self.params, self.flops
        lines.append(f"params  {pa:,} -> {pb:,}  ({pa / max(pb, 1):.2f}x smaller)")
        lines.append(f"FLOPs   {fa:,} -> {fb:,}  ({fa / max(fb, 1):.2f}x fewer)")
        for sh in self.shapes:
            lines.append(f"shapes ({sh.shapes}): f64 max rel {sh.max_rel:.3e}")
        verdict = ("EXACT" if self.rtol <= EXACT_RTOL else "EQUIVALENT") if self.ok else "NOT EQUIVALENT"
        lines.append(f"{verdict} (float64 rel <= {self.rtol:g}) on {self.n_inputs} inputs at {len(self.shapes)} input shapes")
        return "\n".join(lines + self.notes)

    __repr__ = __str__


def count_params(m: nn.Module) -> int:
    """Parameters plus floating-point buffers (what a deployed model stores)."""
    return sum(p.numel() for p in m.parameters()) + sum(b.numel() for b in m.buffers() if b.is_floating_point())


def to_float64(m: nn.Module) -> nn.Module:
    """A float64 copy of ``m``; in a GraphModule, float32 dtype constants in the graph become float64 too."""
    return to_dtype(m, torch.float64)


def random_inputs(xs: Sequence[Any], g: torch.Generator) -> tuple[Any, ...]:
    """Inputs like ``xs`` drawn from ``g``: floats standard normal, integers within ``xs``' range; each on its
    ``x``'s device (drawn on ``g``'s, so the same on every device)."""
    out = []
    for x in xs:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            out.append(torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device))
        elif isinstance(x, torch.Tensor) and x.dtype != torch.bool and x.numel():
            lo, hi = int(x.min()), int(x.max())
            out.append(torch.randint(lo, hi + 1, x.shape, generator=g, dtype=x.dtype).to(x.device))
        else:
            out.append(x)
    return tuple(out)


def count_flops(m: nn.Module, xs: tuple[Any, ...]) -> int:
    """FLOPs of one forward of ``m`` on ``xs``, as ``torch.utils.flop_counter.FlopCounterMode`` counts them
    (matmuls, convolutions, attention). The forward runs in eval mode (modes set back after), so that it changes
    nothing of ``m``: no BatchNorm running statistics move, no dropout draws from the RNG. Its parameters stop
    requiring grad meanwhile: the counter's module tracker fails on a view of one made under ``no_grad`` and passed
    to a submodule (Mamba's ``conv1d.weight.view(...)``)."""
    counter = FlopCounterMode(display=False)
    grads = [p for p in m.parameters() if p.requires_grad]
    try:
        for p in grads:
            p.requires_grad_(False)
        with eval_modes(m), torch.no_grad(), counter:
            m(*xs)
    finally:
        for p in grads:
            p.requires_grad_(True)
    return int(counter.get_total_flops())


@ieee_float32()
def verify(a: nn.Module, b: nn.Module, example_inputs: Sequence[Any] | None = None, *, n_random: int = 2,
           seed: int = 0, rtol: float | None = None) -> EquivalenceReport:
    """Run ``a`` and ``b`` on the example inputs and ``n_random`` seeded random inputs of the same shapes and
    dtypes, in float32 and float64, and report the max abs/relative error per output.

    ``ok`` means float64 relative error <= ``rtol`` and float32 relative error <= 1e-4, or <= 4x ``a``'s own
    float32 error against its float64 run where ``a`` rounds more than that itself (an ill-conditioned network:
    the report's "own f32 rel"; :func:`fxprune.compare.float32_rtol`). The default ``rtol``
    follows the lowest precision the models' parameters are stored in (:func:`fxprune.compare.stored_rtol`): 1e-9
    ("exact") when both hold float64 parameters; 1e-6 for float32 ones, whose folded constants are rounded to
    float32 (run the rewrite on ``model.double()`` to check exactness at 1e-9). Errors come from :func:`fxprune.compare.compare`,
    the comparator capture's check and minimize's self-check use too.

    >>> import torch, fxprune as fp
    >>> net = torch.nn.Linear(3, 2)
    >>> fp.verify(net, net, (torch.randn(4, 3),)).ok
    True
    """
    for what, m in (("a", a), ("b", b)):
        if not isinstance(m, (nn.Module, torch.export.ExportedProgram)):
            raise InputError(f"verify compares two models: {what} is a {type(m).__name__}, not an nn.Module or "
                             "ExportedProgram")
    require("n_random", n_random, "non-negative integer")
    if example_inputs is None and isinstance(a, torch.export.ExportedProgram):
        example_inputs = program_inputs(a)
    dims = _dims(a, b)
    a, b = (program_module(m) if isinstance(m, torch.export.ExportedProgram) else m for m in (a, b))
    if example_inputs is None:
        example_inputs = getattr(a, "meta", {}).get(EXAMPLE_INPUTS_KEY)
    notes = []
    if rtol is None:
        dtypes = {t.dtype for m in (a, b) for t in m.state_dict().values() if t.is_floating_point()} - {torch.float64}
        rtol = max((stored_rtol(d) for d in dtypes), default=EXACT_RTOL)
        if dtypes:
            notes.append(f"{', '.join(sorted(str(d).replace('torch.', '') for d in dtypes))} parameters: float64 tolerance "
                         f"{rtol:g} (constants folded into them are rounded to their precision)")
    inputs = as_inputs(example_inputs, a)
    if dims is None:
        dims = batch_dims(inputs)  # eager models: the batch dim, where the first model takes another batch size
    g = torch.Generator().manual_seed(seed)
    batches = [inputs] + [random_inputs(inputs, g) for _ in range(n_random)]
    batches += [random_inputs(xs, g) for xs in shaped_inputs(dims, inputs)[1:]]
    errs: dict[int, OutputError] = {}
    per_shape: dict[str, float] = {}
    own32: dict[int, Any] = {}  # a's float32 outputs per input point: its own rounding, read in the float64 pass
    for name, dtype in (("float32", torch.float32), ("float64", torch.float64)):
        ma, mb = to_dtype(a, dtype), to_dtype(b, dtype)

        def reference(xs: tuple[Any, ...], ma: nn.Module = ma) -> list[torch.Tensor]:
            try:
                return tensors(ma(*xs))
            except Exception as e:
                raise _cannot_run(e) from e

        # the example and the random inputs must run; a later shape of the range the first model does not take is
        # skipped
        for p in check(reference, lambda xs, mb=mb: tensors(mb(*xs)), [cast(xs, dtype) for xs in batches],
                       required=n_random + 1, skip=InputError):
            key = shape_str(p.inputs)
            if p.error is not None:
                if p.index <= n_random:
                    raise _cannot_run(p.error) from p.error
                per_shape[key] = float("inf")  # the second model fails where the first runs: not equivalent
                for o in errs.values():
                    o.max_abs[name] = o.max_rel[name] = float("inf")
                continue
            if len(p.expected) != len(p.got):
                raise InputError(f"the models return different numbers of tensors ({len(p.expected)} vs {len(p.got)})")
            if name == "float32":
                own32[p.index] = p.expected
            noise = compare(p.expected, own32[p.index]) if name == "float64" and p.index in own32 else []
            for d in p.diffs:
                o = errs.setdefault(d.index, OutputError(d.index, {"float32": 0.0, "float64": 0.0}, {"float32": 0.0, "float64": 0.0}))
                o.max_abs[name] = max(o.max_abs[name], d.max_abs)
                o.max_rel[name] = max(o.max_rel[name], d.max_rel)
                if name == "float64":
                    per_shape[key] = max(per_shape.get(key, 0.0), d.max_rel)
                    if d.index < len(noise) and noise[d.index].problem is None:
                        o.noise = max(o.noise, noise[d.index].max_rel)
    report = EquivalenceReport(
        outputs=[errs[i] for i in sorted(errs)],
        params=(count_params(a), count_params(b)),
        flops=(count_flops(a, inputs), count_flops(b, inputs)),
        n_inputs=len(batches),
        rtol=rtol,
        notes=notes,
        shapes=[ShapeError(k, v) for k, v in per_shape.items()],
    )
    if rtol > EXACT_RTOL and not report.ok and all(o.float32_ok for o in report.outputs) \
            and max((o.noise for o in report.outputs), default=0.0) > float32_rtol(0.0):
        notes.append("the float32 outputs lie within a's own rounding, which is large: a model this ill-conditioned "
                     "can move past the float64 tolerance when constants are rounded to float32, exact rewrite or "
                     "not; to check the rewrite itself, minimize a float64 copy of the model (inputs in float64 too) "
                     "and verify it against that copy: exact is <= 1e-9")
    return report


def _cannot_run(e: Exception) -> InputError:
    return InputError(f"verify could not run the models on the inputs: {type(e).__name__}: {e}")


def _dims(a: Any, b: Any) -> InputDims | None:
    """The dynamic input dims declared by ``a`` (or ``b``): a captured graph's, or an ExportedProgram's."""
    for m in (a, b):
        if isinstance(m, torch.export.ExportedProgram):
            return from_graph(m.module(), m.range_constraints)
        dims = getattr(m, "meta", {}).get(DYNAMIC_KEY) if isinstance(m, GraphModule) else None
        if dims is not None:
            return dims
    return None
