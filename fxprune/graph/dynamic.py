"""Dynamic input dims: which dims of a graph's inputs may vary, over which range, and the shapes to check.

A captured graph records its inputs' dims as :class:`InputDims` in ``gm.meta[DYNAMIC_KEY]``: plain data (ints for
static dims, symbol names or linear expressions in them for dynamic ones, a range per symbol), read once from the
``meta["val"]`` of an exported graph's placeholders without guarding on them, so the input program's shape
environment is never specialized. Passes copy ``gm.meta``, so every pass's result knows them; they drive

- the analysis (a dim that varies is never a channel dim: :func:`fxprune.graph.shapes.annotate` marks it),
- the checks at several shapes (:meth:`InputDims.check_points`, :func:`resize`),
- the re-export of a pass's result with the input program's dims (:meth:`InputDims.export_spec`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import sympy
import torch
from torch.fx import GraphModule

__all__ = ["InputDims", "DYNAMIC_KEY", "from_graph", "batch_dims", "every_dims", "static_dims", "resize", "default_spec",
           "shape_str", "shaped_inputs", "free_shapes"]

DYNAMIC_KEY = "fxprune_input_dims"
INT_OO = None  # no upper bound

Size = int | str  # a static size, or a dynamic one: a symbol name or a linear expression in one ("2*s0 + 1")


@dataclass(frozen=True)
class InputDims:
    """Per positional input: its dims (None for a non-tensor input); per symbol: range and example value."""

    dims: tuple[tuple[Size, ...] | None, ...]
    ranges: dict[str, tuple[int, int | None]]
    hints: dict[str, int]
    # the rewrite must hold past the range too, for a module that runs at any size (minimize_module's copy): the
    # analysis also reads the sizes at twice the example's (fxprune.graph.shapes.annotate, doubled)
    beyond: bool = False
    # input shapes at which dims held static here take other sizes in the model (a capture that could not let them
    # vary: a window that must divide the image); a module that runs at any size is checked there too (free_shapes)
    free: tuple[tuple[tuple[int, ...] | None, ...], ...] = ()

    @property
    def dynamic(self) -> bool:
        return bool(self.ranges)

    def at(self, inputs: Sequence[Any]) -> "InputDims":
        """These dims with the example values read off ``inputs`` (a program traced at other sizes than the
        example's: a batch of 1 is traced as 2)."""
        hints = dict(self.hints)
        for ds, x in zip(self.dims, inputs):
            if ds is None or not isinstance(x, torch.Tensor):
                continue
            for d, n in zip(ds, x.shape):
                if isinstance(d, str) and d in hints:
                    hints[d] = int(n)
        return InputDims(self.dims, self.ranges, hints, self.beyond, self.free)

    def only(self, symbols: Sequence[str]) -> "InputDims":
        """These dims with every symbol but ``symbols`` fixed at its example value."""
        keep = set(symbols)
        dims = tuple(None if ds is None else tuple(d if not isinstance(d, str) or d in keep else _eval(d, self.hints)
                                                   for d in ds) for ds in self.dims)
        return InputDims(dims, {s: r for s, r in self.ranges.items() if s in keep},
                         {s: h for s, h in self.hints.items() if s in keep}, self.beyond, self.free)

    def doubled(self) -> dict[str, int]:
        """Every symbol at twice its example value, within its range or not: a point beyond the captured range
        where that range ends at the example (sizes its guards pin show there)."""
        return {s: 2 * h for s, h in self.hints.items()}

    def beyond_points(self) -> list[dict[str, int]]:
        """Where ``beyond``: :meth:`doubled`, unless it is a check point already; else none."""
        p = self.doubled()
        return [p] if self.beyond and self.dynamic and p not in self.check_points() else []

    def sizes(self, values: dict[str, int]) -> list[tuple[int, ...] | None]:
        """The input shapes at the symbol values ``values``."""
        return [None if ds is None else tuple(_eval(d, values) for d in ds) for ds in self.dims]

    def check_points(self, budget: float = 8.0) -> list[dict[str, int]]:
        """Symbol values to check a rewrite at: the example's, every symbol at its low end (1 where the range
        starts at 2: torch.export's 0/1 specialization is not a runtime guard), every symbol at its high end: its
        upper bound when that keeps the inputs within ``budget`` times the example's size, else the next size
        above the example (a size written into the graph shows at any other size, and this one costs least).
        Only distinct points."""
        if not self.dynamic:
            return [dict(self.hints)]
        low = {s: max(1, lo - 1) if lo == 2 else max(lo, 1) for s, (lo, _) in self.ranges.items()}
        high = {}
        for s, (lo, hi) in self.ranges.items():
            h = self.hints[s]
            big = hi if hi is not None and hi <= budget * max(h, 1) else h + 1
            high[s] = max(big, lo)
        points: list[dict[str, int]] = []
        for p in (dict(self.hints), low, high):
            if p not in points:
                points.append(p)
        return points

    def export_spec(self) -> tuple[Any, ...] | None:
        """A ``dynamic_shapes`` argument for ``torch.export.export`` that declares these dims again: one
        ``Dim`` per symbol with its range; a linear expression ``a*s + b`` becomes the derived dim; anything else
        ``Dim.AUTO``. None when nothing is dynamic."""
        if not self.dynamic:
            return None
        dims = {s: torch.export.Dim(_dim_name(s), min=lo) if hi is None else torch.export.Dim(_dim_name(s), min=lo, max=hi)
                for s, (lo, hi) in self.ranges.items()}
        spec: list[Any] = []
        for ds in self.dims:
            if ds is None:
                spec.append(None)
                continue
            entry = {}
            for i, d in enumerate(ds):
                if isinstance(d, str):
                    entry[i] = _as_dim(d, dims)
            spec.append(entry or None)
        return tuple(spec)

    def describe(self) -> str:
        def one(ds: tuple[Size, ...] | None) -> str:
            return "-" if ds is None else "(" + ", ".join(str(d) for d in ds) + ")"

        rng = ", ".join(f"{s} in [{lo}, {'inf' if hi is None else hi}]" for s, (lo, hi) in self.ranges.items())
        return ", ".join(one(ds) for ds in self.dims) + (f"; {rng}" if rng else " (static)")


def _dim_name(symbol: str) -> str:
    return f"dim_{symbol}"


def _as_dim(expr: str, dims: dict[str, Any]) -> Any:
    e = sympy.sympify(expr)
    if isinstance(e, sympy.Symbol):
        return dims[str(e)]
    syms = list(e.free_symbols)
    if len(syms) == 1:
        s = syms[0]
        poly = sympy.Poly(e, s)
        if poly.degree() == 1:
            a, b = (int(c) for c in poly.all_coeffs())
            return a * dims[str(s)] + b if a != 1 else dims[str(s)] + b
    return torch.export.Dim.AUTO


def _eval(d: Size, values: dict[str, int]) -> int:
    if isinstance(d, int):
        return d
    if d in values:
        return int(values[d])
    return int(sympy.sympify(d).subs({sympy.Symbol(k): v for k, v in values.items()}))


def _placeholders(gm: GraphModule) -> list[Any]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def _finite(bound: Any) -> int | None:
    """A range bound as an int, None for an infinite one (sympy's oo or torch's int_oo)."""
    try:
        return int(bound) if bool(bound.is_finite) else None
    except (TypeError, AttributeError, ValueError, OverflowError):
        return None


def from_graph(gm: GraphModule, range_constraints: dict[Any, Any] | None = None) -> InputDims:
    """The input dims of a graph whose placeholders carry symbolic ``meta["val"]`` (an exported program's), read
    without guarding: ``SymInt.node.expr`` and ``.hint`` only, so the program's shape environment is unchanged.
    Ranges come from the program's ``range_constraints`` when given (the shape environment's own ranges start
    at 2 where torch.export's 0/1 rule applies, the program's at the bound the user declared)."""
    declared = {str(k): v for k, v in (range_constraints or {}).items()}
    dims: list[tuple[Size, ...] | None] = []
    ranges: dict[str, tuple[int, int | None]] = {}
    hints: dict[str, int] = {}
    for n in _placeholders(gm):
        v = n.meta.get("val")
        if not isinstance(v, torch.Tensor):
            dims.append(None)
            continue
        ds: list[Size] = []
        for s in v.shape:
            if isinstance(s, int):
                ds.append(int(s))
                continue
            expr, env = s.node.expr, s.node.shape_env
            if expr.is_number:
                ds.append(int(expr))
                continue
            ds.append(str(expr))
            for sym in expr.free_symbols:
                name = str(sym)
                if name in ranges:
                    continue
                vr = declared.get(name, env.var_to_range.get(sym))
                lo = _finite(vr.lower) if vr is not None else None
                hi = _finite(vr.upper) if vr is not None else None
                lo = 0 if lo is None else lo
                ranges[name] = (lo, hi)
                hint = (env.backed_var_to_val if hasattr(env, "backed_var_to_val") else env.var_to_val).get(sym)
                if hint is None:
                    raise ValueError(f"input dim {expr} of '{n.name}' has no example value (an unbacked size)")
                hints[name] = int(hint)
        dims.append(tuple(ds))
    return InputDims(tuple(dims), ranges, hints)


def batch_dims(inputs: Sequence[Any]) -> InputDims:
    """Dim 0 of every tensor input that has the first tensor input's dim 0 as one dynamic ``batch`` in [1, inf)
    (for module-level graphs: they compute the same function at every batch size their code accepts)."""
    tensors = [x for x in inputs if isinstance(x, torch.Tensor) and x.dim() > 0]
    if not tensors:
        return static_dims(inputs)
    b = int(tensors[0].shape[0])
    dims = tuple(None if not isinstance(x, torch.Tensor) else
                 tuple(["batch" if i == 0 and x.dim() > 0 and int(x.shape[0]) == b else int(s) for i, s in enumerate(x.shape)])
                 for x in inputs)
    return InputDims(dims, {"batch": (1, INT_OO)}, {"batch": b})


def every_dims(inputs: Sequence[Any]) -> InputDims:
    """Every dim of every tensor input dynamic in [1, inf) but those of size 1 after dim 0 (a broadcast or a single
    channel, as torch.export's 0/1 rule has it): one symbol per (dim index, example size), so that inputs that
    share a length (ids and their mask) vary together. What a symbolic trace is probed with (:meth:`InputDims.only`
    keeps the symbols the graph runs at another value of)."""
    names: dict[tuple[int, int], str] = {}
    dims: list[tuple[Size, ...] | None] = []
    for x in inputs:
        if not isinstance(x, torch.Tensor):
            dims.append(None)
            continue
        dims.append(tuple(int(n) if n == 1 and d > 0 else names.setdefault((d, int(n)), f"e{len(names)}")
                          for d, n in enumerate(x.shape)))
    return InputDims(tuple(dims), {s: (1, INT_OO) for s in names.values()}, {s: n for (_, n), s in names.items()})


def static_dims(inputs: Sequence[Any]) -> InputDims:
    return InputDims(tuple(tuple(int(s) for s in x.shape) if isinstance(x, torch.Tensor) else None for x in inputs), {}, {})


def default_spec(inputs: Sequence[Any], every: bool = False) -> tuple[Any, ...]:
    """fxprune's default ``dynamic_shapes`` for torch.export: ``Dim.AUTO`` on dim 0 (``every``: on every dim) of
    every tensor input with at least one dim, so torch.export keeps the batch (and, with ``every``, the sequence
    length, the image size...) dynamic wherever the model allows it and makes it static where the model needs a
    fixed size."""
    return tuple({d: torch.export.Dim.AUTO for d in range(x.dim() if every else 1)}
                 if isinstance(x, torch.Tensor) and x.dim() > 0 else None for x in inputs)


def resize(inputs: Sequence[Any], shapes: Sequence[tuple[int, ...] | None]) -> tuple[Any, ...]:
    """``inputs`` at ``shapes``: every dim cycles through the example's entries (token ids stay valid ids, masks
    stay masks; a longer sequence repeats the example's)."""
    out = []
    for x, shape in zip(inputs, shapes):
        if not isinstance(x, torch.Tensor) or shape is None or tuple(x.shape) == tuple(shape):
            out.append(x)
            continue
        for d, n in enumerate(shape):
            if x.shape[d] != n:
                x = x.index_select(d, torch.arange(n, device=x.device) % x.shape[d])
        out.append(x)
    return tuple(out)


def shaped_inputs(dims: "InputDims | None", inputs: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """``inputs`` (the same object) followed by the inputs at every other check point of ``dims``, at twice
    the example's sizes where ``dims.beyond``, and at ``dims.free``."""
    out = [inputs]
    if dims is None:
        return out
    for p in dims.check_points()[1:] + dims.beyond_points():
        out.append(resize(inputs, dims.sizes(p)))
    out.extend(resize(inputs, shapes) for shapes in dims.free)
    return out


def free_shapes(dims: "InputDims | None", inputs: Sequence[Any],
                takes: Callable[[tuple[Any, ...]], bool]) -> tuple[tuple[tuple[int, ...] | None, ...], ...]:
    """Input shapes past those ``dims`` lets vary, where ``takes`` (the model run there) says the model runs: for a
    module that runs at any size the model takes (``minimize_module``'s copy), where the capture held some dims
    static. Each group of dims :func:`every_dims` varies together (one dim index, one example size) that ``dims``
    holds static everywhere is tried alone at twice its size; those the model takes are then varied together, to
    twice and to one more than their example sizes (a window that must divide the image, or pads it: the model
    may take only one of the two; the check skips a shape the model rejects). ``dims`` None: every dim is static."""
    every = every_dims(inputs)
    dynamic = set()
    for i, ds in enumerate(every.dims):
        held = dims.dims[i] if dims is not None and i < len(dims.dims) else None
        for d, s in enumerate(ds or ()):
            if isinstance(s, str) and dims is not None and (held is None or not isinstance(held[d], int)):
                dynamic.add(s)
    free = [s for s, n in every.hints.items() if s not in dynamic and n > 0
            and takes(resize(inputs, every.sizes({**every.hints, s: 2 * n})))]
    if not free:
        return ()
    return tuple(tuple(every.sizes({**every.hints, **{s: grow(every.hints[s]) for s in free}}))
                 for grow in (lambda n: 2 * n, lambda n: n + 1))


def shape_str(inputs: Sequence[Any]) -> str:
    return ", ".join("x".join(str(s) for s in x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in inputs)
