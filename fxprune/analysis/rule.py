"""What a channel rule sees and declares.

A rule is an object with up to four methods, each given an :class:`Op` (one graph node):

- ``couple(op, sp)``: relate channel spaces (``sp.unify``, ``sp.structure``), declare *exits* (uses that read
  channels out of their group: contractions, normalizers, outputs) with a tolerance function, or freeze;
- ``facts(op, fx)``: per-channel constants of the output, from the inputs' facts (default: evaluate the op
  on NaN-filled inputs, for ops that propagate NaN; ``None`` otherwise);
- ``rewrite(op, rw)``: adjust the op's non-tensor arguments (shapes, groups, scale) and fold constants of
  removed channels into biases.

Any operand or output dim a rule leaves unrelated is frozen by the driver: never removed, never wrong.
"""
from __future__ import annotations

import copy
import operator
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from torch import nn
from torch.fx import GraphModule, Node

from fxprune.analysis.atoms import Atom, AtomSet
from fxprune.graph.scan import Scan, generation, scan
from fxprune.graph import lazy
from fxprune.graph.rebuild import get_attr
from fxprune.graph.shapes import TensorSpec, hint, is_dynamic_scalar, node_spec
from fxprune.nn.stdconv import STANDARDIZATION_OP, compensated_standardization

__all__ = ["Op", "Spaces", "Facts", "DimFacts", "Rule", "Exit", "Rewrite", "SizeArg", "GHOST_PREFIX", "GHOST_SUM",
           "FULL_MEAN", "aligned_dim", "is_constant"]

GHOST_PREFIX = "fxprune_ghost_"  # get_attr targets of constants that stand in for removed channels: frozen
GHOST_SUM = "fxprune_ghost_sum"  # node meta: this add puts removed channels' contribution back into a sum
FULL_MEAN = "fxprune_full_mean"  # node meta: this div turns a compensated sum over dim <value> into the full mean


class Op:
    """One node, with argument access that works for positional and keyword forms."""

    def __init__(self, node: Node, gm: GraphModule) -> None:
        self.node, self.gm, self.target = node, gm, node.target
        self.module = gm.get_submodule(node.target) if node.op == "call_module" else None
        self._normalized: dict[str, Any] | None | bool = False

    @property
    def normalized(self) -> dict[str, Any] | None:
        """Every argument by its schema name (``torch.fx`` normalization against the op's schema or signature;
        None where the target has none, e.g. tensor methods)."""
        if self._normalized is False:
            self._normalized = None
            if self.node.op == "call_function":
                try:
                    pair = self.node.normalized_arguments(self.gm, normalize_to_only_use_kwargs=True)
                except Exception:  # an overloaded function it cannot resolve without types
                    pair = None
                self._normalized = dict(pair.kwargs) if pair is not None else None
        return self._normalized  # type: ignore[return-value]

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        """Argument ``name`` (position ``i`` in the call as written): by schema name where the op normalizes, else
        positional, then keyword."""
        norm = self.normalized
        if norm is not None and name in norm:
            return norm[name]
        if i < len(self.node.args):
            return self.node.args[i]
        return self.node.kwargs.get(name, default)

    @property
    def name(self) -> str:
        """The op's name without its overload or namespace: ``pad`` for ``F.pad`` and ``aten.pad.default``, a tensor
        method's own name."""
        t = getattr(self.target, "overloadpacket", self.target)
        return t if isinstance(t, str) else str(getattr(t, "__name__", t))

    def has_arg(self, i: int, name: str) -> bool:
        return i < len(self.node.args) or name in self.node.kwargs

    def tensor_args(self) -> list[Node]:
        return [a for a in self.node.all_input_nodes if isinstance(node_spec(a), TensorSpec)]

    def describe(self) -> str:
        from fxprune.analysis.table import target_name

        t = type(self.module) if self.module is not None else self.target
        return f"{target_name(t)} at node '{self.node.name}'"


@dataclass
class Exit:
    """A use that reads channels of ``(value, dim)`` out of their group; ``tolerates(facts)`` says, per
    channel, whether removing it leaves the use's result unchanged (possibly after folding)."""

    value: Node
    dim: int
    tolerates: Callable[["Facts"], torch.Tensor]
    by: str


class Spaces:
    """Maps (value, dim) to atoms. get_attr values are keyed by their tensor, so tied weights share atoms."""

    def __init__(self, gm: GraphModule) -> None:
        self.gm = gm
        self.atoms = AtomSet()
        self._atoms: dict[tuple[Any, int], Atom] = {}
        self.touched: set[int] = set()  # atoms related by the rule being applied
        self.meta: set[str] = set()  # operands the rule being applied reads only for metadata
        self.exits: list[Exit] = []
        # (a, da, b, db): a channel of (a, da) may go only with the same channel of (b, db) (a norm's input and
        # output, split: its output's channels can go alone, read out of the full output by a selection)
        self.implications: list[tuple[Node, int, Node, int]] = []
        self.split_norms = False  # whether norms may keep channels of their input that their output loses
        self._specs: dict[Node, TensorSpec | None] = {}  # node_spec is read many times per node: once is enough
        self.param_key: dict[str, str] = {}
        seen: dict[int, str] = {}
        for n in gm.graph.nodes:
            if n.op == "get_attr":
                t = get_attr(gm, n.target)
                key = seen.setdefault(id(t), n.target) if isinstance(t, torch.Tensor) else n.target
                self.param_key[n.target] = key

    def key(self, v: Node) -> Any:
        return ("param", self.param_key[v.target]) if v.op == "get_attr" else v.name

    def spec(self, v: Any) -> TensorSpec | None:
        if not isinstance(v, Node):
            return None
        try:
            return self._specs[v]
        except KeyError:
            pass
        s = node_spec(v)
        if v.op == "get_attr" and s is None:
            t = get_attr(self.gm, v.target)
            s = TensorSpec(tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else None
        s = self._specs[v] = s if isinstance(s, TensorSpec) else None
        return s

    def rank(self, v: Any) -> int:
        s = self.spec(v)
        return -1 if s is None else len(s.shape)

    def of(self, v: Node, dim: int) -> Atom:
        s = self.spec(v)
        assert s is not None, f"{v} is not a tensor"
        d = dim % len(s.shape)
        k = (self.key(v), d)
        a = self._atoms.get(k)
        if a is None:
            a = self._atoms[k] = self.atoms.new(s.shape[d])
            if d in s.dynamic:  # its size varies with the inputs: a batch or sequence dim, never channels
                self.atoms.freeze(a, f"dim {d} of '{v.name}' varies with the inputs' dynamic dims")
        return a

    def has(self, v: Node, dim: int) -> bool:
        """Whether some rule already gave ``(v, dim)`` a space."""
        s = self.spec(v)
        return s is not None and (self.key(v), dim % len(s.shape)) in self._atoms

    def spaces(self) -> dict[tuple[Any, int], Atom]:
        return self._atoms

    def unify(self, a: Node, da: int, b: Node, db: int, why: str = "") -> None:
        x, y = self.of(a, da), self.of(b, db)
        self.touched.update((id(x), id(y)))
        self.atoms.unify(x, y, why)

    def structure(self, v: Node, d: int, kind: str, parts: list[tuple[Node, int]], why: str = "") -> None:
        whole = self.of(v, d)
        atoms = [self.of(p, pd) for p, pd in parts]
        self.touched.add(id(whole))
        self.touched.update(id(a) for a in atoms)
        self.atoms.structure(whole, kind, atoms, why)  # type: ignore[arg-type]

    def structure_atoms(self, whole: Atom, kind: str, parts: list[Atom], why: str = "") -> None:
        self.touched.add(id(whole))
        self.touched.update(id(a) for a in parts)
        self.atoms.structure(whole, kind, parts, why)  # type: ignore[arg-type]

    def meta_dim(self, v: Node, d: int) -> None:
        """Declare that the op reads dim ``d`` of ``v`` only for its size (a broadcast dim of size 1)."""
        self.touched.add(id(self.of(v, d)))

    def meta_only(self, v: Node) -> None:
        """Declare that the op reads ``v`` only for its dtype/device/size, never its channels."""
        self.meta.add(v.name)

    def fresh(self, size: int) -> Atom:
        a = self.atoms.new(size)
        self.touched.add(id(a))
        return a

    def freeze(self, v: Node, d: int, reason: str) -> None:
        a = self.of(v, d)
        self.touched.add(id(a))
        self.atoms.freeze(a, reason)

    def freeze_all(self, v: Node, reason: str) -> None:
        for d in range(max(self.rank(v), 0)):
            self.freeze(v, d, reason)

    def exit(self, v: Node, d: int, tolerates: Callable[["Facts"], torch.Tensor], by: str) -> None:
        a = self.of(v, d)
        self.touched.add(id(a))
        self.exits.append(Exit(v, d % self.rank(v), tolerates, by))

    def implies(self, a: Node, da: int, b: Node, db: int) -> None:
        """Channel k of ``(a, da)`` may be removed only if channel k of ``(b, db)`` is (same size)."""
        self.touched.update((id(self.of(a, da)), id(self.of(b, db))))
        self.implications.append((a, da % self.rank(a), b, db % self.rank(b)))


@dataclass
class DimFacts:
    """Per channel of one dim: whether the slice at that channel is a known constant, and its value."""

    known: torch.Tensor  # bool [size]
    value: torch.Tensor  # float64 [size]

    def zero(self) -> torch.Tensor:
        return self.known & (self.value == 0)

    def with_zeros(self, zero: torch.Tensor) -> "DimFacts":
        """These facts with the channels ``zero`` marks known to be 0 too."""
        return DimFacts(self.known | zero, torch.where(zero, torch.zeros_like(self.value), self.value))


class Facts:
    """Known-constant channels of every float value (None where nothing is known)."""

    def __init__(self, gm: GraphModule, spaces: Spaces, stale: set[Node] = frozenset()) -> None:
        """``stale``: values written into before a later read (:func:`stale_reads`): nothing is known of them."""
        self.gm, self.sp = gm, spaces
        self._stale = {spaces.key(v) for v in stale}
        self._facts: dict[Any, list[DimFacts] | None] = {}
        self._ghost: dict[Any, list[torch.Tensor]] = {}
        self._finite: dict[Any, bool] = {}
        self._host: dict[str, torch.Tensor] = {}  # CPU copies of the constants that live on an accelerator

    def value(self, v: Node) -> torch.Tensor | None:
        """The floating constant ``v`` stands for (:func:`is_constant`: a get_attr node, or a permute/transpose of
        one, as decomposed linears read their weights), in its own dtype and without a copy (a view of the
        parameter: never write to it), infinities included; or None (also where the graph writes into it before a
        later read)."""
        if not is_constant(v) or self.sp.key(v) in self._stale:
            return None
        if v.op == "call_function" and v.target in WEIGHT_NORMS:
            v_, g = self.value(v.args[0]), self.value(v.args[1])
            return None if v_ is None or g is None else v.target(v_, g, *v.args[2:], **v.kwargs)
        p = standardized(v)
        if p is not None:
            P = self.value(p)
            return None if P is None else standardize(v.args[0], P, self.value)
        if v.op != "get_attr":
            src = self.value(v.args[0])
            return None if src is None else v.target(src, *v.args[1:], **v.kwargs)
        t = lazy.value(get_attr(self.gm, v.target))  # a weight left on disk (the streamed path): read now
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.is_meta:
            return None
        if t.device.type != "cpu":  # the analysis works on the CPU: a weight on an accelerator is copied once
            if v.target not in self._host:
                self._host[v.target] = t.detach().cpu()
            return self._host[v.target]
        return t.detach()

    def finite(self, v: Node) -> bool:
        """Whether the constant ``v`` holds finite values only (parameters were checked by the pass:
        ``check_weights``; buffers may hold infinities)."""
        k = self.sp.key(v)
        if k not in self._finite and (v.op == "call_function" and v.target in WEIGHT_NORMS  # (a zero v slice: 0/0)
                                      or standardized(v) is not None):
            t = self.value(v)
            self._finite[k] = t is not None and bool(torch.isfinite(t).all())
        if k not in self._finite:  # rules ask about the same weight several times: answer once
            base = v
            while base.op != "get_attr":
                base = base.args[0]
            t = get_attr(self.gm, base.target)
            if lazy.unbound(t):
                self._finite[k] = False  # no values anywhere: nothing is known about it
            else:
                self._finite[k] = isinstance(t, nn.Parameter) or t.numel() == 0 or t.dim() == 0 or scan(t, keep=True).finite
        return self._finite[k]

    def tensor(self, v: Node) -> torch.Tensor | None:
        """The value of a constant in float64 (a copy), for rules that compute with it (convolutions, norm
        affines); None unless it is floating and finite (a clamp bound or mask fill of -inf/+inf is still a
        constant for :meth:`get` and for evaluation, but sums and products with it say nothing sound). Rules that
        read a large weight use :meth:`value` and convert only the slices they need."""
        t = self.value(v)
        if t is None or not self.finite(v):
            return None
        return t.to(torch.float64)

    def get(self, v: Any) -> list[DimFacts] | None:
        if not isinstance(v, Node):
            return None
        k = self.sp.key(v)
        if k in self._stale:
            return None
        if k not in self._facts:
            self._facts[k] = self._constant_facts(v) if is_constant(v) else None
        return self._facts[k]

    def _constant_facts(self, v: Node) -> list[DimFacts] | None:
        """Facts of a constant from the scan of its tensor (:mod:`fxprune.graph.scan`), permuted like ``v``."""
        if v.op == "call_function" and v.target in WEIGHT_NORMS or standardized(v) is not None:  # (computed)
            t = self.value(v)
            return None if t is None else extract(t.to(torch.float64))
        if v.op != "get_attr":
            src = self.get(v.args[0])
            if src is None:
                return None
            return [src[j] if j is not None else DimFacts(torch.zeros(1, dtype=torch.bool),
                                                             torch.zeros(1, dtype=torch.float64))
                    for j in _view_dims(v, len(src))]
        t = get_attr(self.gm, v.target)
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() == 0 or t.numel() == 0:
            return None
        if lazy.unbound(t):
            return None  # no values anywhere (a constant of a graph captured on meta)
        return _from_scan(scan(t, keep=True))

    def dim(self, v: Any, d: int) -> DimFacts:
        """Facts of one dim (all unknown when nothing is known)."""
        f = self.get(v)
        r = self.sp.rank(v)
        if f is None or r <= 0:
            size = self.sp.spec(v).shape[d] if r > 0 else 1
            return DimFacts(torch.zeros(size, dtype=torch.bool), torch.zeros(size, dtype=torch.float64))
        return f[d % r]

    def peek(self, v: Node) -> list[DimFacts] | None:
        """Facts already recorded for ``v`` (by the op that produced it), without computing any."""
        return self._facts.get(self.sp.key(v))

    def set(self, v: Node, facts: list[DimFacts] | None) -> None:
        k = self.sp.key(v)
        self._facts[k] = None if k in self._stale else facts

    def ghost(self, v: Node, d: int) -> torch.Tensor:
        """Channels of ``v`` at dim ``d`` whose values a rewrite can recompute without the channel itself:
        known constants, or elementwise functions of ghost channels and of values broadcast along ``d``
        (``(c - mean)**2`` in a hand-written LayerNorm). Bool mask."""
        g = self._ghost.get(self.sp.key(v)) if self.sp.key(v) not in self._stale else None
        return g[d % len(g)] if g is not None else self.dim(v, d).known

    def derive_ghost(self, node: Node) -> None:
        """Record :meth:`ghost` masks of the output of an elementwise op, from its operands'."""
        shape = self.sp.spec(node).shape
        masks = []
        for d, n in enumerate(shape):
            m = torch.ones(n, dtype=torch.bool)
            for a in node.all_input_nodes:
                j = aligned_dim(self.sp, a, node, d)
                if j is not None:
                    m &= self.ghost(a, j)
            masks.append(m | self.dim(node, d).known)
        self._ghost[self.sp.key(node)] = masks

    def materialize(self, v: Any, fill: torch.Generator | None = None) -> Any:
        """A float64 tensor of ``v``'s shape: known channels hold their constant, the rest NaN (or, with ``fill``,
        random values drawn from it)."""
        if not isinstance(v, Node):
            return v
        if isinstance(v.meta.get("val"), (int, torch.SymInt)) and not isinstance(v.meta.get("val"), bool):
            return hint(v.meta["val"])  # a size read off a tensor (sym_size): its example value
        t = self.value(v)
        if t is not None:
            return t.to(torch.float64)
        s = self.sp.spec(v)
        if s is None or not s.is_float:
            raise _NotFloat(v)
        if fill is None:
            out = torch.full(s.shape, float("nan"), dtype=torch.float64)
        else:
            out = torch.empty(s.shape, dtype=torch.float64).uniform_(-4.0, 4.0, generator=fill)
        f = self.get(v)
        if f:
            for d, df in enumerate(f):
                if df.known.any():
                    shape = [1] * len(s.shape)
                    shape[d] = -1
                    out = torch.where(df.known.view(shape), df.value.view(shape), out)
        return out


_VIEWS = {torch.ops.aten.permute.default, torch.ops.aten.t.default, torch.ops.aten.transpose.int,
          torch.ops.aten.alias.default, torch.ops.aten.detach.default, torch.ops.aten.numpy_T.default,
          torch.ops.aten.squeeze.dim, torch.ops.aten.unsqueeze.default}


# a weight computed from parameters alone, whose slices are slices of them: weight norm, w = g * v / ||v|| (the
# norm over every dim but ``dim``), as torch.nn.utils.parametrizations.weight_norm and the legacy hook compute it
WEIGHT_NORMS = {torch.ops.aten._weight_norm.default}


def standardized(v: Any) -> Node | None:
    """The parameter (a get_attr node) whose weight standardization ``v`` is, or None: ``v`` is
    ``reshape_as(batch_norm(reshape(p, [1, out, -1]), None, None, None, None, training=True, ...), p)``, as a
    weight-standardized convolution computes its weight (BiT's ``StdConv2d``; NF-Nets' ``ScaledStdConv2d`` with a
    per-row scale of parameters as the batch norm's weight, :func:`row_scale`), in aten ops (torch.export) or as a
    symbolic trace records it (``F.batch_norm``, the tensor methods), or the same with
    :func:`~fxprune.nn.stdconv.compensated_standardization` (or its custom op, as a module minimized before is
    captured) in place of the batch norm (a weight that lost entries of its rows), each step read by the next
    alone."""
    if not (isinstance(v, Node) and v.op in ("call_function", "call_method") and v.target in _AS
            and len(v.users) == 1):
        return None
    norm, p = v.args[:2]
    if not (isinstance(p, Node) and p.op == "get_attr" and isinstance(norm, Node) and len(norm.users) == 1):
        return None
    if norm.target in _BATCH_NORMS:
        if _std_eps(norm) is None:
            return None
    elif norm.target is compensated_standardization or norm.target is STANDARDIZATION_OP:
        if not all(isinstance(a, Node) and a.op == "get_attr" for a in norm.args[1:3]) \
                or std_scale(norm) is not None and row_scale(std_scale(norm)) is None:
            return None
    else:
        return None
    flat = norm.args[0]
    if not (isinstance(flat, Node) and flat.target in _FLAT and flat.args[0] is p and len(flat.users) == 1):
        return None
    shape = flat.args[1] if len(flat.args) == 2 else flat.args[1:]  # (x.reshape(1, out, -1): the sizes as args)
    spec = node_spec(p)
    if not isinstance(spec, TensorSpec) or not isinstance(shape, (list, tuple)) or len(shape) != 3 \
            or shape[0] != 1 or shape[1] != spec.shape[0] or len(spec.shape) < 2:
        return None
    return p


_AS = {torch.ops.aten.reshape_as.default, torch.ops.aten.view_as.default, "reshape_as", "view_as"}
_FLAT = {torch.ops.aten.reshape.default, torch.ops.aten.view.default, "reshape", "view"}
_BATCH_NORMS = {torch.ops.aten.batch_norm.default, torch.nn.functional.batch_norm}


def _std_args(norm: Node) -> dict[str, Any]:
    """A batch norm's arguments by name, defaults filled in (aten's ``batch_norm`` or ``F.batch_norm``)."""
    if norm.target is torch.ops.aten.batch_norm.default:
        names = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps")
    else:
        names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    return {"weight": None, "bias": None, "training": False, "eps": 1e-5} | dict(zip(names, norm.args)) \
        | dict(norm.kwargs)


def _std_eps(norm: Node) -> float | None:
    """The eps of a batch norm that standardizes: training mode, no running statistics, no bias, and no weight or
    a per-row scale of parameters (:func:`row_scale`: NF-Nets' ``gain * scale``); None for any other."""
    given = _std_args(norm)
    if any(given.get(k) is not None for k in ("bias", "running_mean", "running_var")) or given["training"] is not True \
            or given["weight"] is not None and row_scale(given["weight"]) is None:
        return None
    eps = given["eps"]
    return float(eps) if isinstance(eps, (int, float)) else None


def std_scale(norm: Node) -> Node | None:
    """The per-row scale a standardization multiplies by (a batch norm's weight, a compensated standardization's
    last argument), or None."""
    if norm.target in _BATCH_NORMS:
        return _std_args(norm)["weight"]
    return norm.args[5] if len(norm.args) > 5 else norm.kwargs.get("weight")


# how a per-row scale is computed from one parameter: times or over a number, flattened (timm's ScaledStdConv2d:
# ``(self.gain * self.scale).view(-1)``, gain shaped (out, 1, 1, 1))
_MUL_OPS = {operator.mul, torch.mul, torch.ops.aten.mul.Tensor, torch.ops.aten.mul.Scalar, "mul"}
_SCALE_OPS = _MUL_OPS | {operator.truediv, torch.ops.aten.div.Tensor, torch.ops.aten.div.Scalar, "div"}
_FLATTEN_OPS = {torch.ops.aten.view.default, torch.ops.aten.reshape.default, "view", "reshape"}


def row_scale(v: Any) -> Node | None:
    """The parameter (a get_attr node) whose entries ``v`` scales by a number and flattens to one per row, read by
    ``v`` alone at each step; or None."""
    while isinstance(v, Node) and v.op in ("call_function", "call_method") and len(v.users) == 1:
        if v.target in _SCALE_OPS and len(v.args) == 2 and not v.kwargs and isinstance(v.args[1], (int, float)):
            v = v.args[0]
        elif v.target in _FLATTEN_OPS and tuple(v.args[1:]) in (([-1],), (-1,), ((-1,),)):
            v = v.args[0]
        else:
            return None
    return v if isinstance(v, Node) and v.op == "get_attr" and len(v.users) == 1 else None


def _scale_value(v: Node, values: Callable[[Node], torch.Tensor | None]) -> torch.Tensor | None:
    """The value of a :func:`row_scale` chain, one entry per row."""
    if v.op == "get_attr":
        return values(v)
    t = _scale_value(v.args[0], values)
    if t is None:
        return None
    if v.target in _FLATTEN_OPS:
        return t.reshape(-1)
    return t * v.args[1] if v.target in _MUL_OPS else t / v.args[1]


def standardize(norm: Node, p: torch.Tensor, values: Callable[[Node], torch.Tensor | None]) -> torch.Tensor | None:
    """The weight a chain of :func:`standardized` computes from the value ``p`` of its parameter (``norm``: its
    batch norm or compensated standardization; ``values`` reads the latter's sums and a per-row scale)."""
    flat = p.reshape(1, p.shape[0], -1)
    scale = std_scale(norm)
    weight = None if scale is None else _scale_value(scale, values)
    if scale is not None and weight is None:
        return None
    weight = None if weight is None else weight.to(p.dtype)
    if norm.target not in _BATCH_NORMS:
        s1, s2 = values(norm.args[1]), values(norm.args[2])
        if s1 is None or s2 is None:
            return None
        out = compensated_standardization(flat, s1.to(p.dtype), s2.to(p.dtype), *norm.args[3:5], weight)
    else:
        out = torch.nn.functional.batch_norm(flat, None, None, weight, training=True, momentum=0.0,
                                             eps=_std_eps(norm))
    return out.reshape(p.shape)


def is_constant(v: Any) -> bool:
    """Whether ``v`` is a tensor the rewrite slices and adds to through parameters: a get_attr node, or a
    permute/transpose/alias of one (``aten.addmm(b, x, permute(W))`` after decomposition), or a weight norm of
    two (:data:`WEIGHT_NORMS`: its rule lets only the slices go that leave the norms as they are), or a parameter's
    weight standardization (:func:`standardized`: its batch norm's rule keeps the rows' statistics)."""
    if not isinstance(v, Node):
        return False
    if v.op == "get_attr":
        return True
    if standardized(v) is not None:
        return True
    if v.op == "call_function" and v.target in WEIGHT_NORMS:
        return all(is_constant(a) for a in v.args[:2]) and len(v.users) == 1
    return v.op == "call_function" and v.target in _VIEWS and is_constant(v.args[0]) and len(v.users) == 1


def aligned_dim(sp: Spaces, a: Node, out: Node, d: int) -> int | None:
    """The dim of operand ``a`` that broadcasting aligns with dim ``d`` of ``out`` (None when ``a`` is not a
    tensor, has no such dim, or its size there is not ``out``'s: broadcast along it, or an operand that does not
    broadcast with the output at all, as ``x.type_as(other)``'s ``other``, read for its dtype only)."""
    sa, so = sp.spec(a), sp.spec(out)
    if sa is None or so is None:
        return None
    j = d - (len(so.shape) - len(sa.shape))
    if j < 0 or sa.shape[j] != so.shape[d]:
        return None
    return j


class _NotFloat(Exception):
    pass


def extract(t: torch.Tensor) -> list[DimFacts] | None:
    """Per dim of ``t``: channels whose slice is one finite constant (NaN means unknown; an infinite constant is
    not recorded: arithmetic on it says nothing sound about a fold)."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() == 0 or t.numel() == 0:
        return None
    return _from_scan(scan(t))


def _from_scan(s: Scan) -> list[DimFacts]:
    return [DimFacts(*s.constant(d)) for d in range(len(s.lo))]


def _view_dims(v: Node, rank: int) -> list[int | None]:
    """For a view node of :data:`_VIEWS` of a tensor of rank ``rank``: the source dim each of its dims is (None
    for a size-1 dim ``unsqueeze`` inserts)."""
    dims: list[int | None] = list(range(rank))
    t = v.target
    if t is torch.ops.aten.unsqueeze.default:
        d = v.args[1] % (rank + 1)
        return dims[:d] + [None] + dims[d:]
    if t is torch.ops.aten.squeeze.dim:
        d = v.args[1] % rank if rank else 0
        return dims[:d] + dims[d + 1:] if rank and _size_one(v.args[0], d) else dims
    if t is torch.ops.aten.permute.default:
        return [d % rank for d in v.args[1]]
    if t in (torch.ops.aten.t.default, torch.ops.aten.numpy_T.default):
        return dims[::-1]
    if t is torch.ops.aten.transpose.int:
        a, b = v.args[1] % rank, v.args[2] % rank
        dims[a], dims[b] = dims[b], dims[a]
    return dims


def _size_one(v: Node, d: int) -> bool:
    """Whether dim ``d`` of ``v`` has size 1 (squeeze drops only those)."""
    val = v.meta.get("val")
    return val is not None and len(val.shape) > d and val.shape[d] == 1


@dataclass(frozen=True)
class SizeArg:
    """Where an op's target sizes live, for :meth:`Rewrite.resize_sizes`: the list argument at position ``pos``
    (keyword ``name``) whose first entry sizes output dim ``first``; or, with ``varargs``, every positional
    argument from ``pos`` on (``x.view(2, 3)``)."""

    pos: int
    name: str
    first: int = 0
    varargs: bool = False


class Rewrite(Protocol):
    """What a rule's ``rewrite`` may ask of the rewriter (:class:`fxprune.passes.minimize.Rewriter`). Rules say
    what they mean (which argument holds the bias, which dim is the output channel, where the sizes are); the
    rewriter never guesses from an op's name."""

    facts: Facts

    def kept(self, v: Node, d: int) -> torch.Tensor:
        """Bool mask of the channels of ``(v, d)`` that stay."""

    def new(self, v: Any) -> Any:
        """``v``'s counterpart in the new graph (non-nodes as they are)."""

    def set_arg(self, op: Op, pos: int, name: str, value: Any, kwarg_only: bool = False) -> None:
        """Set the new node's argument (positional ``pos`` where it was given so, else keyword ``name``)."""

    def retarget(self, op: Op, target: Any, args: tuple, kwargs: dict) -> None:
        """Make the new node a call of ``target``."""

    def add_to_bias(self, op: Op, bias: Node | None, pos: int, name: str, delta: torch.Tensor, out_dim: int) -> None:
        """Add ``delta`` (indexed like the original output channels, dim ``out_dim`` of the op's output) to the
        bias argument ``bias`` (a get_attr; None: create one at ``pos``/``name``)."""

    def compensate_sum(self, op: Op, x: Node, d: int, removed: torch.Tensor, keepdim: bool, mean: bool) -> None:
        """Replace a sum/mean of ``x`` over ``d`` by the kept channels' sum plus the removed ones' constants."""

    def resize_sizes(self, op: Op, where: SizeArg) -> None:
        """Replace the int sizes at ``where`` by the kept counts of the output dims they size."""

    def buffer(self, op: Op, name: str, value: torch.Tensor) -> Node:
        """A get_attr node of the new graph, before the op's, holding ``value`` (a new constant: not trainable)."""

    def select_after(self, op: Op, target: Any, args: tuple, d: int, positions: torch.Tensor, weight: Any,
                     bias: Any) -> None:
        """Make the new node ``target(*args)``, then select ``positions`` along its dim ``d``, then multiply by
        ``weight`` and add ``bias`` (nodes of the old graph, or None): a norm whose kept outputs are fewer than its
        kept inputs."""


class Rule:
    """Base rule: relate nothing (everything the op touches gets frozen by the driver)."""

    nan_eval = False  # facts by evaluating the op on NaN-filled inputs
    sizes = False  # its int operands are target sizes (a reshape's, an expand's): a size that varies is no arithmetic
    replayable = False  # elementwise: channel k of the output is a function of channel k of the operands

    def couple(self, op: Op, sp: Spaces) -> None:  # pragma: no cover - overridden
        pass

    def facts(self, op: Op, fx: Facts) -> list[DimFacts] | None:
        if not self.nan_eval:
            return None
        return nan_eval(op, fx, sizes=self.sizes)

    def rewrite(self, op: Op, rw: Rewrite) -> None:
        pass

    def input_dim(self, op: Op, v: Node, sp: Spaces) -> int | None:
        """The dim of ``v`` (a model input the op reads) whose channels the op reads through a weight parameter
        alone, so that a channel the weight ignores can be cut from the input (``Analysis``'s ``inputs``); None:
        the op reads every channel of ``v`` some other way, or is no such layer."""
        return None

    def sizes_read(self, op: Op, v: Node, sp: Spaces) -> set[int | None] | None:
        """The dims of ``v`` whose size the op reads, when it reads nothing else of ``v`` (None in the set: every
        dim); None: the op reads ``v`` otherwise."""
        return None


def nan_eval(op: Op, fx: Facts, fn: Callable[..., Any] | None = None, sizes: bool = False,
             confirm: bool = True) -> list[DimFacts] | None:
    """Run the op on materialized inputs (known constants, NaN elsewhere) and read off constant channels. Skipped
    when no operand has a known channel (NaN in, NaN out: nothing to read off).

    An op may map NaN to a number (``sign``, ``nan_to_num``, ``fmax``...) and so make an unknown channel look
    constant. Every constant read off is therefore confirmed by a second run with the unknown entries filled with
    random values: a channel is known only where both runs give the same constant; ``confirm=False`` skips that
    run, for ops that map every NaN entry to NaN (a constant there read no unknown entry). ``sizes``: the op's int
    operands are target sizes (a reshape's), so one that varies with the inputs is no reason to skip."""
    if not any(f is not None and any(bool(df.known.any()) for df in f) for f in map(fx.get, op.tensor_args())):
        return None
    if not sizes and any(is_dynamic_scalar(a) for a in (*op.node.args, *op.node.kwargs.values())):
        return None  # arithmetic with a size that varies (x / seq_len): its value at the example is no fact
    try:
        args, kwargs = _operands(op, fx.materialize)
    except _NotFloat:
        return None
    if fn is None:
        fn = _callable(op)
    with torch.no_grad():
        out = fn(*args, **kwargs)
    facts = extract(out) if isinstance(out, torch.Tensor) else None
    if not facts or not any(bool(f.known.any()) for f in facts) or not confirm:
        return facts
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        args, kwargs = _operands(op, lambda v: fx.materialize(v, g))
        again = extract(fn(*args, **kwargs))
    if again is None:
        return None
    out = []
    for f, a in zip(facts, again):
        known = f.known & a.known & (f.value == a.value)
        out.append(DimFacts(known, torch.where(known, f.value, 0.0)))
    return out


def _operands(op: Op, get: Callable[[Any], Any]) -> tuple[Any, Any]:
    """The op's args and kwargs with nodes materialized by ``get`` and any other device replaced by the CPU (a graph
    captured on meta, its weights streamed in, moves values "to meta"; one on a GPU makes ``arange`` there; the
    materialized values live on the CPU).
    Tensors an in-place op would write into are copies: a materialized weight is the weight itself."""
    writes = _writes(op)

    def fix(a: Any) -> Any:
        if isinstance(a, torch.device) and a.type != "cpu":  # meta, or an accelerator: the analysis runs on the CPU
            return torch.device("cpu")
        return a.clone() if writes and isinstance(a, torch.Tensor) else a

    return tuple(torch.fx.node.map_aggregate(torch.fx.node.map_arg(x, get), fix) for x in (op.node.args, op.node.kwargs))


# ops whose result may share its operand's storage (``contiguous``, ``to`` and ``type_as`` return the operand itself
# when nothing changes): a write into the result is a write into the operand
_ALIASING = frozenset({"slice", "select", "view", "_unsafe_view", "as_strided", "transpose", "permute", "t", "unsqueeze",
                    "squeeze", "expand", "expand_as", "narrow", "diagonal", "alias", "unfold", "view_as", "reshape",
                    "flatten", "unflatten", "movedim", "swapaxes", "swapdims", "split", "split_with_sizes", "chunk",
                    "unbind", "tensor_split", "detach", "getitem", "contiguous", "to", "type_as", "float", "double",
                    "half", "bfloat16", "numpy_T", "_reshape_alias"})


def stale_reads(gm: GraphModule) -> set[Node]:
    """The values an op writes into, directly or through a view, before a later op reads them (or a view of them
    made before the write). An exported graph keeps ``h[:, :2].add_(1)`` as ``add_`` into a ``slice`` of ``h`` and
    RWKV's ``output[:, t] = ...`` as ``copy_`` into a view, and later nodes read ``h`` and ``output`` themselves: what
    they read is not what made them, so no fact read off the op that made them holds there. A value whose only reader
    after the write is the write's own result (an in-place activation, which torch.export and capture re-point
    readers at) keeps its facts: they hold for every read."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}

    def op_on_operand(u: Node) -> Op | None:  # an op reading a value as its first argument
        ok = u.op in ("call_function", "call_method", "call_module") and u.args and isinstance(u.args[0], Node)
        return Op(u, gm) if ok else None

    def shares(u: Node) -> bool:  # u's result is (a view of) its first operand's storage
        op = op_on_operand(u)
        return op is not None and ((u.op != "call_module" and op.name in _ALIASING)
                                   or (_writes(op) and op.name != "setitem"))

    writes: dict[Node, list[int]] = {}  # per storage (the value its views and writes start from): where it is written
    for w in gm.graph.nodes:
        op = op_on_operand(w)
        if op is None or not (_writes(op) or op.name == "setitem"):  # (setitem: a symbolic trace's ``out[:, t] = ...``)
            continue
        root = w.args[0]
        while shares(root):
            root = root.args[0]
        writes.setdefault(root, []).append(order[w])
    stale: set[Node] = set()
    for root, at in writes.items():
        family, todo = {root}, [root]
        while todo:
            v = todo.pop()
            for u in v.users:
                if u not in family and u.args and u.args[0] is v and shares(u):
                    family.add(u)
                    todo.append(u)
        for v in family:  # read after a write that came after it
            last = max((order[u] for u in v.users), default=-1)
            if any(order[v] < w < last for w in at):
                stale.add(v)
    return stale


def _writes(op: Op) -> bool:
    """Whether the op writes into an operand (``relu_``, ``aten.mul_``, ``inplace=True``, ``ReLU(inplace=True)``)."""
    name = op.name
    return ((name.endswith("_") and not name.endswith("__")) or name in ("iadd", "isub", "imul", "itruediv")
            or op.node.kwargs.get("inplace") is True
            or getattr(op.module, "inplace", False) is True)


# a module's float64 eval-mode copy, keyed on the generation (fxprune.graph.scan.fresh: every pass and analysis
# starts one, so a write through ``.data``, which moves no version counter, is seen by the next) and the versions
# of the tensors it was copied from (an in-place write within a generation): on either change it is made again
_F64_MODULES: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple[Any, ...], torch.nn.Module]]" = \
    weakref.WeakKeyDictionary()


def _versions(m: torch.nn.Module) -> tuple[Any, ...] | None:
    try:
        return (generation(), *((id(t), t._version) for t in [*m.parameters(), *m.buffers()]))
    except RuntimeError:  # inference tensors have no version counter: never cached
        return None


def _callable(op: Op) -> Callable[..., Any]:
    if op.node.op == "call_method":
        return lambda self, *a, **k: getattr(self, op.target)(*a, **k)
    if op.module is not None:
        versions = _versions(op.module)
        hit = _F64_MODULES.get(op.module)
        if hit is None or versions is None or hit[0] != versions:
            hit = (versions, copy.deepcopy(op.module).double().eval())
            if versions is not None:
                _F64_MODULES[op.module] = hit
        return hit[1]
    return op.target
