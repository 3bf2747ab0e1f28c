"""Channel rules for module-level (symbolic trace) and ATen-level (torch.export) graphs.

One class per rule family; each family is registered for all its targets in one line at the bottom.
Modules with parameters (nn.Linear, nn.ConvNd, ...) are lowered to their functional form before analysis
(:mod:`fxprune.passes.lower`), so ``F.linear`` and ``aten.linear`` share one rule.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.export._unlift import GuardsFn
from torch.fx import Node

from fxprune.graph.scan import BLOCK_BYTES
from fxprune.analysis.rule import (DimFacts, Facts, Op, Rewrite, Rule, SizeArg, Spaces, extract, is_constant, nan_eval,
                                   standardized, std_scale)
from fxprune.analysis.table import RULES, ByName
from fxprune.graph.masks import weight_norm_kept
from fxprune.graph.shapes import TensorSpec, is_dynamic_scalar, node_spec
from fxprune.nn.norm import (compensated_group_norm, compensated_layer_norm, compensated_rms_norm, compensated_softmax,
                             shrunk_groups)
from fxprune.nn.stdconv import STANDARDIZATION_OP, compensated_standardization

aten = torch.ops.aten

__all__ = ["register"]


def register(rule: Rule, *keys: Any) -> None:
    """Register ``rule`` for every key (duplicates within the call are folded, across calls rejected)."""
    unique: list[Any] = []
    for k in keys:
        if all(k is not u for u in unique):
            unique.append(k)
    RULES.register(rule, *unique)


def _unknown(size: int) -> DimFacts:
    return DimFacts(torch.zeros(size, dtype=torch.bool), torch.zeros(size, dtype=torch.float64))


def _dims(dim: Any, rank: int) -> list[int]:
    if dim is None:
        return list(range(rank))
    if isinstance(dim, int):
        return [dim % rank]
    return [d % rank for d in dim]


def _shape(sp: Spaces, v: Any) -> tuple[int, ...]:
    s = sp.spec(v)
    return () if s is None else s.shape


def _varies(sp: Spaces, v: Any, dims: Any) -> bool:
    """Whether any of ``dims`` of ``v`` varies with the inputs' dynamic dims."""
    s = sp.spec(v)
    return s is not None and any(isinstance(d, int) and d % max(len(s.shape), 1) in s.dynamic for d in dims)


def _zeros_only(facts: list[DimFacts] | None) -> list[DimFacts] | None:
    """Only the zero facts: what a sum (or an average with padding) over a dim of varying size keeps at every size."""
    return None if facts is None else [DimFacts(f.zero(), torch.zeros_like(f.value)) for f in facts]


def _out_facts(op: Op, sp: Spaces, fill: dict[int, DimFacts]) -> list[DimFacts] | None:
    shape = _shape(sp, op.node)
    if not shape:
        return None
    return [fill.get(d, _unknown(n)) for d, n in enumerate(shape)]


# ---------------------------------------------------------------------------------------------
class Elementwise(Rule):
    """Output channel k is a function of channel k of each operand (numpy broadcasting)."""

    nan_eval = True
    replayable = True

    def facts(self, op: Op, fx: Facts) -> list[DimFacts] | None:
        return nan_eval(op, fx, confirm=not _nan_to_nan(op))

    def couple(self, op: Op, sp: Spaces) -> None:
        for a in op.tensor_args():
            _broadcast(op, sp, a)


def _broadcast(op: Op, sp: Spaces, a: Node) -> None:
    """Unify each dim of ``a`` with the output's dim it meets under numpy broadcasting (a size-1 dim broadcast
    against a larger one is read for its size only)."""
    out, s = _shape(sp, op.node), _shape(sp, a)
    for j, n in enumerate(s):
        i = j + len(out) - len(s)
        if i >= 0 and n == out[i]:
            sp.unify(a, j, op.node, i, f"by {op.describe()}")
        elif n == 1:
            sp.meta_dim(a, j)


class Dropout(Elementwise):
    """Identity in eval mode (or p == 0); random in training mode, so no facts then."""

    replayable = False

    def facts(self, op: Op, fx: Facts) -> list[DimFacts] | None:
        if op.module is not None:
            train, p = op.module.training, op.module.p
        elif isinstance(op.target, torch._ops.OpOverloadPacket | torch._ops.OpOverload):
            train, p = op.arg(2, "train"), op.arg(1, "p")
        else:
            train, p = op.arg(2, "training", True), op.arg(1, "p", 0.5)
        return super().facts(op, fx) if (not train or p == 0) else None


class StochasticDepth(Dropout):
    """torchvision's ``stochastic_depth(input, p, mode, training)``: identity in eval mode (or p == 0); in training
    mode each sample (``"row"``) or the whole batch (``"batch"``) is zeroed or scaled, every channel alike."""

    def facts(self, op: Op, fx: Facts) -> list[DimFacts] | None:
        train, p = op.arg(3, "training", True), op.arg(1, "p")
        return Elementwise.facts(self, op, fx) if (not train or p == 0) else None


class Mul(Elementwise):
    """Elementwise product: a channel that is exactly zero in one factor is zero in the product."""

    def facts(self, op: Op, fx: Facts) -> list[DimFacts] | None:
        out = nan_eval(op, fx, confirm=False)  # NaN times anything is NaN
        shape = _shape(fx.sp, op.node)
        if not shape:
            return out
        out = out or [_unknown(n) for n in shape]
        for a in op.tensor_args():
            s = _shape(fx.sp, a)
            for j, n in enumerate(s):
                i = j + len(shape) - len(s)
                if i >= 0 and n == shape[i] and fx.get(a):
                    z = fx.dim(a, j).zero()
                    out[i] = out[i].with_zeros(z)
        return out


class TypeAs(Elementwise):
    """``x.type_as(other)``: elementwise in ``x``; ``other`` is read for its dtype only (Funnel casts a token mask to
    its hidden states' dtype: their sizes need not broadcast)."""

    def couple(self, op: Op, sp: Spaces) -> None:
        x, other = op.arg(0, "self"), op.arg(1, "other")
        if isinstance(other, Node) and other is not x:
            sp.meta_only(other)
        if isinstance(x, Node):
            for d in range(sp.rank(op.node)):
                sp.unify(x, d, op.node, d, f"by {op.describe()}")


class Passive(Rule):
    """Reads only dtype/device of its tensor operands (creation ops like new_ones, metadata asserts)."""

    def couple(self, op: Op, sp: Spaces) -> None:
        for a in op.tensor_args():
            sp.meta_only(a)


class AssertMetadata(Passive):
    def couple(self, op: Op, sp: Spaces) -> None:
        if op.arg(1, "size") is None and op.arg(2, "stride") is None:
            super().couple(op, sp)


class InputGuards(Passive):
    """The shape guards ``ExportedProgram.module()`` runs on the graph's inputs (``_guards_fn``, no output): inputs
    keep their shapes, so guards on placeholders alone see no change; a guard on anything else freezes it."""

    def couple(self, op: Op, sp: Spaces) -> None:
        if all(a.op == "placeholder" for a in op.tensor_args()):
            super().couple(op, sp)



# ---------------------------------------------------------------------------------------------
class Linear(Rule):
    """y = x W^T + b (F.linear / aten.linear) and y = b + x W (aten.addmm, GPT-2's Conv1D)."""

    def operands(self, op: Op) -> tuple[Node, Node, Node | None, int]:
        """(x, weight, bias, weight's input dim)."""
        if op.target is aten.addmm.default:
            return op.arg(1, "mat1"), op.arg(2, "mat2"), op.arg(0, "self"), 0
        return op.arg(0, "input"), op.arg(1, "weight"), op.arg(2, "bias"), 1

    def couple(self, op: Op, sp: Spaces) -> None:
        x, w, b, win = self.operands(op)
        if op.target is aten.addmm.default and (op.arg(3, "beta", 1) != 1 or op.arg(4, "alpha", 1) != 1):
            return  # scaled addmm: let the driver freeze it
        y = op.node
        r = sp.rank(x)
        for d in range(r - 1):
            sp.unify(x, d, y, d, f"by {op.describe()}")
        sp.unify(x, r - 1, w, win, f"by {op.describe()}")
        sp.unify(y, r - 1, w, 1 - win, f"by {op.describe()}")
        if b is not None:
            sp.unify(y, r - 1, b, sp.rank(b) - 1, f"by {op.describe()}")
            for d in range(sp.rank(b) - 1):
                sp.meta_dim(b, d)

        foldable = _is_param(w) and (b is None or _is_attr(b))

        def tolerates(fx: Facts) -> torch.Tensor:
            xf = fx.dim(x, -1)
            return (xf.known if foldable else xf.zero()) | fx.dim(w, win).zero()

        sp.exit(x, r - 1, tolerates, op.describe() + ("" if foldable else " (computed weight or bias: folds only zeros)"))

    def input_dim(self, op: Op, v: Node, sp: Spaces) -> int | None:
        x, w, b, _ = self.operands(op)
        scaled = op.target is aten.addmm.default and (op.arg(3, "beta", 1) != 1 or op.arg(4, "alpha", 1) != 1)
        return sp.rank(v) - 1 if x is v and v is not w and v is not b and _is_param(w) and not scaled else None

    def facts(self, op: Op, fx: Facts) -> list[DimFacts] | None:
        """Output unit o is constant when its weights on every unknown input channel are zero; its value is the
        bias plus its weights on the known channels times their constants. The weight is read in its own dtype,
        and only the rows and columns that matter are converted to float64."""
        x, w, b, win = self.operands(op)
        W = fx.value(w)
        if W is None or not fx.finite(w):
            return None
        W = W if win == 1 else W.t()  # [out, in]
        B = None
        if b is not None:
            B = fx.tensor(b)
            if B is None or B.dim() != 1:
                return None
        xf = fx.dim(x, -1)
        if bool(xf.known.all()):
            const = torch.ones(W.shape[0], dtype=torch.bool)
        else:
            const = fx.dim(w, 1 - win).zero()  # units whose weights are all zero
            if bool(xf.known.any()):
                const = const | ~_reads(W, (~xf.known).nonzero().flatten())
        value = torch.zeros(W.shape[0], dtype=torch.float64)
        rows, cols = const.nonzero().flatten(), (xf.known & (xf.value != 0)).nonzero().flatten()
        if rows.numel() and cols.numel():
            value[rows] = W.index_select(0, rows).index_select(1, cols).to(torch.float64) @ xf.value[cols]
        if B is not None:
            value = value + B
        return _out_facts(op, fx.sp, {len(_shape(fx.sp, op.node)) - 1: DimFacts(const, torch.where(const, value, 0.0))})

    def rewrite(self, op: Op, rw: Rewrite) -> None:
        x, w, b, win = self.operands(op)
        removed = ~rw.kept(x, -1)
        xf = rw.facts.dim(x, -1)
        fold = removed & xf.known & (xf.value != 0)
        if not fold.any():
            return
        W = rw.facts.value(w)
        W = W if win == 1 else W.t()
        idx = fold.nonzero().flatten()
        delta = W.index_select(1, idx).to(torch.float64) @ xf.value[idx]
        rw.add_to_bias(op, b, 0 if op.target is aten.addmm.default else 2, "bias", delta, out_dim=-1)


def _reads(W: torch.Tensor, cols: torch.Tensor, first: int = 8) -> torch.Tensor:
    """Per row of ``W``: whether any of its entries in columns ``cols`` is nonzero. The ``first`` columns are
    read for every row (in a dense weight they settle almost every row), the rest only for the rows still open,
    in row blocks, so the gathered columns never take more than a block of memory."""
    out = torch.zeros(W.shape[0], dtype=torch.bool)
    if W.shape[0] == 0 or cols.numel() == 0:
        return out
    out |= (W.index_select(1, cols[:first]) != 0).any(dim=1)
    rest, open_rows = cols[first:], (~out).nonzero().flatten()
    if not rest.numel() or not open_rows.numel():
        return out
    step = max(1, BLOCK_BYTES // max(1, rest.numel() * W.element_size()))
    for i in range(0, open_rows.numel(), step):
        rows = open_rows[i:i + step]
        out[rows] = (W.index_select(0, rows).index_select(1, rest) != 0).any(dim=1)
    return out


class Conv(Rule):
    """N-d convolution, grouped and depthwise included: channels = groups x per-group channels."""

    def operands(self, op: Op) -> dict[str, Any]:
        if op.target is aten.convolution.default:
            return dict(x=op.arg(0, "input"), w=op.arg(1, "weight"), b=op.arg(2, "bias"), stride=op.arg(3, "stride"),
                        padding=op.arg(4, "padding"), dilation=op.arg(5, "dilation"), transposed=op.arg(6, "transposed"),
                        groups=op.arg(8, "groups"), groups_pos=8)
        return dict(x=op.arg(0, "input"), w=op.arg(1, "weight"), b=op.arg(2, "bias", None), stride=op.arg(3, "stride", 1),
                    padding=op.arg(4, "padding", 0), dilation=op.arg(5, "dilation", 1), transposed=False,
                    groups=op.arg(6, "groups", 1), groups_pos=6)

    def couple(self, op: Op, sp: Spaces) -> None:
        o = self.operands(op)
        x, w, b, y, G = o["x"], o["w"], o["b"], op.node, o["groups"]
        if o["transposed"] or not isinstance(G, int) or sp.rank(x) != sp.rank(w):
            return  # transposed or unbatched conv: frozen by the driver
        if _computed_weight(op, sp, x, w):  # weight standardization (StdConv), weight norm...: nothing to slice
            return
        sp.unify(x, 0, y, 0, f"by {op.describe()}")
        if b is not None:
            sp.unify(y, 1, b, 0, f"by {op.describe()}")
        sp.unify(y, 1, w, 0, f"by {op.describe()}")
        cout, cin_g = _shape(sp, w)[:2]
        if G == 1:
            sp.unify(x, 1, w, 1, f"by {op.describe()}")
        elif cin_g == 1 and cout == G:  # depthwise: channel k in -> channel k out, one group: no exit
            sp.unify(x, 1, y, 1, f"by {op.describe()}")
            sp.meta_dim(w, 1)
            return
        else:
            g = sp.fresh(G)
            per_out = sp.fresh(_shape(sp, w)[0] // G)
            sp.structure_atoms(sp.of(x, 1), "prod", [g, sp.of(w, 1)], f"groups of {op.describe()}")
            sp.structure_atoms(sp.of(y, 1), "prod", [g, per_out], f"groups of {op.describe()}")
        padded = _padded(o["padding"])

        def tolerates(fx: Facts) -> torch.Tensor:
            W = fx.tensor(w)
            if W is None:  # a weight fxprune cannot read as finite numbers: even a zero input may meet NaN there
                return torch.zeros(_shape(fx.sp, x)[1], dtype=torch.bool)
            cout, cin_g = W.shape[:2]
            zero_col = (W.reshape(G, cout // G, cin_g, -1) == 0).all(dim=3).all(dim=1).reshape(-1)
            xf = fx.dim(x, 1)
            foldable = xf.known & ((xf.value == 0) | (not padded and (b is None or _is_attr(b))))
            return zero_col | foldable

        sp.exit(x, 1, tolerates, op.describe())

    def input_dim(self, op: Op, v: Node, sp: Spaces) -> int | None:
        o = self.operands(op)
        plain = not o["transposed"] and o["groups"] == 1 and sp.rank(v) == sp.rank(o["w"]) and _is_param(o["w"])
        return 1 if plain and o["x"] is v and v is not o["w"] and v is not o["b"] else None

    def facts(self, op: Op, fx: Facts) -> list[DimFacts] | None:
        """Output channel o is constant when no tap that ever lands on real input (not padding) weighs an unknown
        input channel. Its value is bias + sum of known inputs x taps, read off channel-level sums when that is
        the same at every position (no padding, or every contributing input is zero), else from a convolution of
        the known constants."""
        o = self.operands(op)
        x, w, b, G = o["x"], o["w"], o["b"], o["groups"]
        W = fx.tensor(w)
        if W is None or o["transposed"] or not isinstance(G, int):
            return None
        xs, ys = _shape(fx.sp, x), _shape(fx.sp, op.node)
        if len(xs) != W.dim() or len(ys) != W.dim():
            return None
        cout, cin_g = W.shape[:2]
        # Spatial dims that vary with the inputs: which taps meet padding, and what border positions see, change
        # with the size, so every tap counts and a constant that padding would make position-dependent is unknown.
        dyn_spatial = any(d >= 2 for d in fx.sp.spec(x).dynamic)
        taps = (torch.ones(W.shape[2:], dtype=W.dtype) if dyn_spatial else
                _real_taps(W.shape[2:], xs[2:], ys[2:], o["stride"], o["padding"], o["dilation"]))
        Wr = (W * taps).reshape(G, cout // G, cin_g, -1)  # taps that never touch real input weigh nothing
        touches = (Wr != 0).any(dim=3)  # [G, out/G, in/G]
        xf = fx.dim(x, 1)
        unknown = ~xf.known.reshape(G, 1, cin_g)
        depends = (touches & unknown).any(dim=2).reshape(-1)
        if bool(depends.all()):
            return _out_facts(op, fx.sp, {1: _unknown(cout)})
        constants = torch.where(xf.known, xf.value, 0.0)  # known input channels' values, 0 elsewhere
        c = constants.reshape(G, 1, cin_g)
        contributes = (touches & (c != 0)).any(dim=2).reshape(-1) & ~depends
        if dyn_spatial and _padded(o["padding"]):
            depends = depends | contributes
        elif _padded(o["padding"]) and bool(contributes.any()):  # border positions see fewer taps: convolve
            xin = constants.reshape(1, -1, *[1] * (len(xs) - 2)).expand(1, -1, *xs[2:])
            Bv = fx.tensor(b) if b is not None else None
            with torch.no_grad():
                val = _CONV[W.dim() - 2](xin, W, Bv, stride=o["stride"], padding=o["padding"], dilation=o["dilation"],
                                         groups=G)
            facts = extract(val)
            if facts is None:
                return None
            f = facts[1]
            known = f.known & ~depends
            return _out_facts(op, fx.sp, {1: DimFacts(known, torch.where(known, f.value, 0.0))})
        value = (Wr.sum(dim=3) * c).sum(dim=2).reshape(-1)
        if b is not None:
            B = fx.tensor(b)
            if B is None or B.dim() != 1:
                return None
            value = value + B
        return _out_facts(op, fx.sp, {1: DimFacts(~depends, torch.where(depends, 0.0, value))})

    def rewrite(self, op: Op, rw: Rewrite) -> None:
        o = self.operands(op)
        x, w, b, G = o["x"], o["w"], o["b"], o["groups"]
        if G != 1 and _shape(rw.facts.sp, w)[1] == 1 and _shape(rw.facts.sp, w)[0] == G:
            rw.set_arg(op, o["groups_pos"], "groups", int(rw.kept(op.node, 1).sum()))
        elif G != 1:
            kept_groups = rw.kept(op.node, 1).reshape(G, -1).any(dim=1)
            rw.set_arg(op, o["groups_pos"], "groups", int(kept_groups.sum()))
        removed = ~rw.kept(x, 1)
        xf = rw.facts.dim(x, 1)
        fold = removed & xf.known & (xf.value != 0)
        if not fold.any():
            return
        W = rw.facts.tensor(w)
        cout, cin_g = W.shape[:2]
        taps = W.reshape(G, cout // G, cin_g, -1).sum(dim=3)  # [G, out/G, in/G]
        c = torch.where(fold, xf.value, 0.0).reshape(G, cin_g)
        delta = torch.einsum("goi,gi->go", taps, c).reshape(-1)
        rw.add_to_bias(op, b, 2, "bias", delta, out_dim=1)


class ConvTranspose(Rule):
    """N-d transposed convolution of one group: the weight is (in, out, *kernel), so input channel i is the
    weight's dim 0 and output channel o its dim 1 (with the bias). Every input scatters its taps over the output,
    overlapping and cut at the borders, so a constant input makes no constant output: an input channel goes
    where its weight slice is zero or it is zero itself, and an output channel is constant (its bias) where every
    input that reaches it is zero. Grouped ones are frozen."""

    def operands(self, op: Op) -> tuple[Any, Any, Any, Any]:
        groups = op.arg(6, "groups", 1)
        return op.arg(0, "input"), op.arg(1, "weight"), op.arg(2, "bias", None), groups

    def couple(self, op: Op, sp: Spaces) -> None:
        x, w, b, groups = self.operands(op)
        if groups != 1 or sp.rank(x) != sp.rank(w):
            return  # grouped or unbatched: frozen by the driver
        if _computed_weight(op, sp, x, w):
            return
        y = op.node
        sp.unify(x, 0, y, 0, f"by {op.describe()}")
        sp.unify(x, 1, w, 0, f"by {op.describe()}")
        sp.unify(y, 1, w, 1, f"by {op.describe()}")
        if b is not None:
            sp.unify(y, 1, b, 0, f"by {op.describe()}")

        def tolerates(fx: Facts) -> torch.Tensor:
            W = fx.tensor(w)
            if W is None:  # (not finite: see Conv)
                return torch.zeros(_shape(fx.sp, x)[1], dtype=torch.bool)
            zero_row = (W.reshape(W.shape[0], -1) == 0).all(dim=1)
            xf = fx.dim(x, 1)
            return zero_row | (xf.known & (xf.value == 0))

        sp.exit(x, 1, tolerates, op.describe())

    def facts(self, op: Op, fx: Facts) -> list[DimFacts] | None:
        x, w, b, groups = self.operands(op)
        W = fx.tensor(w)
        if W is None or groups != 1 or len(_shape(fx.sp, x)) != W.dim():
            return None
        xf = fx.dim(x, 1)
        silent = xf.known & (xf.value == 0)  # inputs that add nothing anywhere
        reaches = (W.transpose(0, 1).reshape(W.shape[1], W.shape[0], -1) != 0).any(dim=2)  # [out, in]
        constant = ~(reaches & ~silent).any(dim=1)
        value = torch.zeros(W.shape[1], dtype=torch.float64)
        if b is not None:
            B = fx.tensor(b)
            if B is None or B.dim() != 1:
                return None
            value = B.to(torch.float64)
        return _out_facts(op, fx.sp, {1: DimFacts(constant, torch.where(constant, value, 0.0))})


def _computed_weight(op: Op, sp: Spaces, x: Node, w: Any) -> bool:
    """Whether the weight of a (transposed) convolution is computed in the forward rather than a parameter; if so,
    its input, weight and output are frozen (nothing to slice)."""
    if _is_param(w):
        return False
    sp.freeze_all(w, f"the weight of {op.describe()} is computed in the forward, not a parameter: cannot slice it")
    sp.freeze_all(x, f"reads {op.describe()}, whose weight is computed in the forward")
    sp.freeze_all(op.node, f"written by {op.describe()}, whose weight is computed in the forward")
    return True


def _is_param(v: Any) -> bool:
    """Whether ``v`` is a tensor the rewrite can slice and add to: a parameter or buffer (get_attr), possibly
    permuted (:func:`~fxprune.analysis.rule.is_constant`)."""
    return is_constant(v)


def _is_attr(v: Any) -> bool:
    """Whether ``v`` is a get_attr node: a bias the rewrite can add a folded constant to."""
    return isinstance(v, Node) and v.op == "get_attr"


def _padded(padding: Any) -> bool:
    if isinstance(padding, str):
        return padding != "valid"
    if isinstance(padding, int):
        return padding != 0
    return any(p != 0 for p in padding)


def _real_taps(kernel: Any, in_size: Any, out_size: Any, stride: Any, padding: Any, dilation: Any) -> torch.Tensor:
    """Float mask of kernel shape: 1 where a tap lands on real input (not padding) at some output position.
    Padding it cannot read (a mode string other than valid/same) counts every tap as real."""
    k = len(kernel)

    def per_dim(v: Any) -> list[int]:
        return list(v) * (k if len(v) == 1 else 1) if isinstance(v, (list, tuple)) else [v] * k

    stride, dilation = per_dim(stride), per_dim(dilation)
    if padding == "valid":
        padding = [0] * k
    elif padding == "same":
        padding = [dilation[j] * (kernel[j] - 1) // 2 for j in range(k)]
    elif isinstance(padding, str):
        return torch.ones(kernel, dtype=torch.float64)
    padding = per_dim(padding)
    mask = torch.ones(kernel, dtype=torch.float64)
    for j in range(k):
        pos = (torch.arange(out_size[j])[:, None] * stride[j] - padding[j]
               + torch.arange(kernel[j])[None, :] * dilation[j])
        real = ((pos >= 0) & (pos < in_size[j])).any(dim=0).to(torch.float64)
        shape = [1] * k
        shape[j] = -1
        mask = mask * real.view(shape)
    return mask


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class Embedding(Rule):
    """y[..., k] = W[idx, k]: output channels are the table's columns."""

    def operands(self, op: Op) -> tuple[Node, Node]:
        if op.node.op == "call_function" and isinstance(op.target, torch._ops.OpOverload):
            return op.arg(0, "weight"), op.arg(1, "indices")
        return op.arg(1, "weight"), op.arg(0, "input")

    def couple(self, op: Op, sp: Spaces) -> None:
        w, idx = self.operands(op)
        r = sp.rank(op.node)
        sp.unify(op.node, r - 1, w, 1, f"by {op.describe()}")
        for d in range(r - 1):
            sp.unify(op.node, d, idx, d, f"by {op.describe()}")

    def facts(self, op: Op, fx: Facts) -> list[DimFacts] | None:
        w, _ = self.operands(op)
        W = fx.get(w)
        return None if not W else _out_facts(op, fx.sp, {sp_last(fx.sp, op.node): W[1]})


def sp_last(sp: Spaces, v: Node) -> int:
    return sp.rank(v) - 1


class BatchNorm(Rule):
    """Per-channel affine along dim 1 (eval mode); training-mode statistics are still per channel."""

    def operands(self, op: Op) -> tuple[Node, list[Any], bool]:
        t = op.target
        if t is aten._native_batch_norm_legit_no_training.default:
            return op.arg(0, "input"), [op.arg(i, n) for i, n in enumerate(["weight", "bias", "running_mean", "running_var"], 1)], False
        if t is aten.batch_norm.default:
            return op.arg(0, "input"), [op.arg(i, n) for i, n in enumerate(["weight", "bias", "running_mean", "running_var"], 1)], bool(op.arg(5, "training"))
        return op.arg(0, "input"), [op.arg(3, "weight"), op.arg(4, "bias"), op.arg(1, "running_mean"), op.arg(2, "running_var")], bool(op.arg(5, "training", False))

    def outputs(self, op: Op) -> list[Node]:
        if op.target is aten._native_batch_norm_legit_no_training.default:
            return [u for u in op.node.users if u.target is operator.getitem and u.args[1] == 0]
        return [op.node]

    def couple(self, op: Op, sp: Spaces) -> None:
        x, params, _ = self.operands(op)
        for y in self.outputs(op):
            for d in range(sp.rank(x)):
                sp.unify(x, d, y, d, f"by {op.describe()}")
        for p in params:
            if isinstance(p, Node):
                sp.unify(x, 1, p, 0, f"by {op.describe()}")

    def facts(self, op: Op, fx: Facts) -> list[DimFacts] | None:
        _, _, training = self.operands(op)
        if training or op.target is aten._native_batch_norm_legit_no_training.default:
            return None  # (tuple output: the getitem user computes its facts)
        return self.zero_scaled(op, fx, nan_eval(op, fx))

    def rewrite(self, op: Op, rw: Rewrite) -> None:
        """A weight standardization (:func:`~fxprune.analysis.rule.standardized`) whose rows lose entries (the input
        channels its convolution no longer reads) becomes :func:`~fxprune.nn.stdconv.compensated_standardization`,
        with each kept row's removed entries summed (the parameter's values) into two buffers."""
        x = op.arg(0, "input")
        sums = _removed_row_sums(rw, op.node, x)
        if sums is None:
            return
        rows, dtype = rw.kept(x, 1), node_spec(x).dtype
        s1, s2 = (rw.buffer(op, name, t[rows].to(dtype)) for name, t in zip(("removed_sum", "removed_sq_sum"), sums))
        scale = std_scale(op.node)  # (each row times a scale: NF-Nets' gain)
        rw.retarget(op, compensated_standardization, (rw.new(x), s1, s2, _shape(rw.facts.sp, x)[2], op.arg(7, "eps"))
                    + (() if scale is None else (rw.new(scale),)), {})

    def zero_scaled(self, op: Op, fx: Facts, out: list[DimFacts] | None) -> list[DimFacts] | None:
        """``out`` (eval mode) with every channel whose weight is exactly 0 known as its bias, whatever its input: a
        finite input times a zero factor is zero, as :class:`Mul` holds (a BatchNorm the group lasso zeroed)."""
        x, (w, b, mean, var), _ = self.operands(op)
        if not isinstance(w, Node) or not isinstance(mean, Node) or not isinstance(var, Node):
            return out
        scale = fx.materialize(w)
        bias = fx.materialize(b) if isinstance(b, Node) else torch.zeros_like(scale)
        eps = op.arg(6 if op.target is aten._native_batch_norm_legit_no_training.default else 7, "eps", 1e-5)
        var = fx.materialize(var)
        dead = ((scale == 0) & bias.isfinite() & fx.materialize(mean).isfinite() & var.isfinite()
                & (var + eps > 0))
        if scale.dim() != 1 or not bool(dead.any()):
            return out
        out = list(out) if out else [_unknown(n) for n in _shape(fx.sp, x)]
        out[1] = DimFacts(out[1].known | dead, torch.where(dead, bias.to(out[1].value.dtype), out[1].value))
        return out


def _removed_row_sums(rw: Rewrite, norm: Node, flat: Node) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Where ``norm`` (a batch norm or compensated standardization of ``flat``, the reshape of a parameter to (1,
    rows, entries)) is a weight standardization (:func:`~fxprune.analysis.rule.standardized`) whose rows lose
    entries: per row (all of them), the sum and the sum of squares of the entries that go, in float64; else
    None."""
    user = next(iter(norm.users), None)
    p = standardized(user) if len(norm.users) == 1 else None
    if p is None or bool(rw.kept(flat, 2).all()):
        return None
    P = rw.facts.value(p).to(torch.float64)
    rows = P.reshape(P.shape[0], -1)[:, ~rw.kept(flat, 2)]
    return rows.sum(1), (rows * rows).sum(1)


class CompensatedStandardization(Rule):
    """:func:`~fxprune.nn.stdconv.compensated_standardization` (a weight standardization whose rows lost entries,
    written by :meth:`BatchNorm.rewrite`; its custom op where a compensated module of the user's class was
    captured): the rows are its channels, with its two buffers of sums; rows that lose more entries add them to the
    sums."""

    def couple(self, op: Op, sp: Spaces) -> None:
        x, s1, s2 = op.node.args[:3]
        for d in range(sp.rank(x)):
            sp.unify(x, d, op.node, d, f"by {op.describe()}")
        for v in (s1, s2, std_scale(op.node)):
            if v is not None:
                sp.unify(v, 0, op.node, 1, f"by {op.describe()}")

    def rewrite(self, op: Op, rw: Rewrite) -> None:
        x, s1, s2, full, eps = op.node.args[:5]
        scale = std_scale(op.node)
        if op.target is STANDARDIZATION_OP:  # (the custom op of a capture: the function in the result)
            rw.retarget(op, compensated_standardization, (rw.new(x), rw.new(s1), rw.new(s2), full, eps)
                        + (() if scale is None else (rw.new(scale),)), {})
        sums = _removed_row_sums(rw, op.node, x)
        if sums is not None:  # (indexed like all the rows: add_to_bias slices them)
            rw.add_to_bias(op, s1, 1, "removed_sum", sums[0], out_dim=1)
            rw.add_to_bias(op, s2, 2, "removed_sq_sum", sums[1], out_dim=1)


class Recurrent(Rule):
    """``aten.lstm`` / ``gru`` / ``rnn_tanh`` / ``rnn_relu`` (``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` in an exported graph),
    one or two directions, no projection. Each layer's (and direction's) weights are (gates x hidden, in) and
    (gates x hidden, hidden), its biases (gates x hidden): their rows are a product of the gates (never removed)
    and the hidden units. The class holds one ``hidden_size`` for every layer and direction, so their hidden units
    are one group, with the states' last dim and the output's (both directions' units, one after the other, where
    there are two). The input features are each first-layer weight's dim 1 (an exit: a feature goes where it is
    zero or its columns are); a layer's units are read by its own recurrence and the next layer's input weights
    (exits: a unit goes where those columns are zero or the unit is dead, in every direction). A unit is dead, its
    output zero at every step, where the candidate gate's rows and biases are zero and its initial cell (LSTM) or
    hidden (GRU, RNN) state is: the state then stays zero."""

    GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
    CANDIDATE = {"lstm": 2, "gru": 2, "rnn_tanh": 0, "rnn_relu": 0}  # the gate whose zero keeps the state at zero

    def operands(self, op: Op) -> dict[str, Any] | None:
        x, hx, params = op.arg(0, "input"), op.arg(1, "hx"), op.arg(2, "params")
        biases, layers, dirs = op.arg(3, "has_biases"), op.arg(4, "num_layers"), 2 if op.arg(7, "bidirectional") else 1
        per = 4 if biases else 2
        if not isinstance(params, (list, tuple)) or len(params) != per * layers * dirs:
            return None  # a projection (weight_hr): frozen by the driver
        hx = list(hx) if isinstance(hx, (list, tuple)) else [hx]
        cells = [[dict(w_ih=params[per * (i * dirs + d)], w_hh=params[per * (i * dirs + d) + 1],
                       b=list(params[per * (i * dirs + d) + 2:per * (i * dirs + d) + per])) for d in range(dirs)]
                 for i in range(layers)]
        return dict(kind=op.name, x=x, hx=hx, layers=cells, dirs=dirs, batch_first=bool(op.arg(8, "batch_first")))

    def outputs(self, op: Op) -> dict[int, Node]:
        return {u.args[1]: u for u in op.node.users if u.target is operator.getitem}

    def couple(self, op: Op, sp: Spaces) -> None:
        o = self.operands(op)
        if o is None or not all(_is_param(p) for layer in o["layers"] for cell in layer
                                for p in (cell["w_ih"], cell["w_hh"], *cell["b"])):
            return
        x, dirs, why = o["x"], o["dirs"], f"hidden units of {op.describe()}"
        anchor = o["layers"][0][0]["w_hh"]  # (its dim 1: the hidden units)
        h = sp.of(anchor, 1)
        out = self.outputs(op)
        batch, time = (0, 1) if o["batch_first"] else (1, 0)

        def units(v: Node, d: int) -> None:  # a dim of the hidden units, of each direction one after the other
            if dirs == 1:
                sp.unify(v, d, anchor, 1, why)
            else:
                sp.structure_atoms(sp.of(v, d), "sum", [h] * dirs, why)

        for i, layer in enumerate(o["layers"]):
            for cell in layer:
                sp.unify(cell["w_hh"], 1, anchor, 1, why)
                gates = sp.fresh(self.GATES[o["kind"]])
                sp.atoms.freeze(gates, f"the gates of {op.describe()}")
                for p in (cell["w_ih"], cell["w_hh"], *cell["b"]):
                    sp.structure_atoms(sp.of(p, 0), "prod", [gates, h], f"gates x hidden units of {op.describe()}")
                if i == 0:
                    sp.unify(x, -1, cell["w_ih"], 1, f"by {op.describe()}")
                else:
                    units(cell["w_ih"], 1)
        for state in o["hx"]:
            if isinstance(state, Node):
                sp.unify(state, 2, anchor, 1, why)
                sp.unify(state, 1, x, batch, f"by {op.describe()}")
        for k, node in out.items():
            if k == 0:
                for d in (batch, time):
                    sp.unify(node, d, x, d, f"by {op.describe()}")
                units(node, 2)
            else:  # the final states: (layers x directions, batch, hidden)
                sp.unify(node, 1, x, batch, f"by {op.describe()}")
                sp.unify(node, 2, anchor, 1, why)

        def first(fx: Facts) -> torch.Tensor:
            xf = fx.dim(x, -1)
            Ws = [fx.tensor(c["w_ih"]) for c in o["layers"][0]]
            if any(W is None for W in Ws):  # (not finite: even a zero input may meet NaN there)
                return torch.zeros(xf.known.shape, dtype=torch.bool)
            unread = torch.stack([(W == 0).all(dim=0) for W in Ws]).all(dim=0)
            return unread | (xf.known & (xf.value == 0))

        def reads(layer: int, key: str) -> Callable[[Facts], torch.Tensor]:
            def tolerates(fx: Facts) -> torch.Tensor:
                src = layer if key == "w_hh" else layer - 1  # the layer whose units these columns read
                dead = self.dead(fx, o)[src]  # [directions, hidden]
                ok = torch.ones(dead.shape[1], dtype=torch.bool)
                for d, cell in enumerate(o["layers"][layer]):
                    W = fx.tensor(cell[key])
                    if W is None:  # (not finite: even a dead unit's zero may meet NaN there)
                        return torch.zeros(dead.shape[1], dtype=torch.bool)
                    cols = (W == 0).all(dim=0).reshape(-1, dead.shape[1])  # [directions read, hidden]
                    if key == "w_hh":
                        ok &= cols[0] | dead[d]
                    else:
                        ok &= (cols | dead).all(dim=0)
                return ok
            return tolerates

        sp.exit(x, -1, first, op.describe())
        for i in range(len(o["layers"])):
            sp.exit(anchor, 1, reads(i, "w_hh"), op.describe())
            if i > 0:
                sp.exit(anchor, 1, reads(i, "w_ih"), op.describe())

    def dead(self, fx: Facts, o: dict[str, Any]) -> torch.Tensor:
        """[layer, direction, hidden]: the units whose output is zero at every step."""
        c = self.CANDIDATE[o["kind"]]
        layers, dirs = len(o["layers"]), o["dirs"]
        hidden = _shape(fx.sp, o["layers"][0][0]["w_hh"])[1]
        out = torch.zeros(layers, dirs, hidden, dtype=torch.bool)
        state = o["hx"][1] if o["kind"] == "lstm" else o["hx"][0]  # the state a zero candidate keeps at zero
        if not isinstance(state, Node) or fx.get(state) is None:
            return out
        start = fx.dim(state, 2)
        zero_start = start.known & (start.value == 0)  # (every layer and direction alike: a fact of the dim)
        rows = slice(c * hidden, (c + 1) * hidden)
        for i, layer in enumerate(o["layers"]):
            for d, cell in enumerate(layer):
                Wi, Wh = fx.tensor(cell["w_ih"]), fx.tensor(cell["w_hh"])
                bs = [fx.tensor(b) for b in cell["b"]]
                if Wi is None or Wh is None or any(b is None for b in bs):
                    continue
                zero = (Wi[rows] == 0).all(dim=1) & (Wh[rows] == 0).all(dim=1) & zero_start
                if bs and o["kind"] == "gru":  # r gates the recurrent bias: each must be zero
                    zero &= (bs[0][rows] == 0) & (bs[1][rows] == 0)
                elif bs:
                    zero &= (bs[0][rows] + bs[1][rows]) == 0
                out[i, d] = zero
        return out

    def facts(self, op: Op, fx: Facts) -> list[DimFacts] | None:
        o = self.operands(op)
        out = self.outputs(op)
        if o is None or 0 not in out:
            return None
        dead = self.dead(fx, o)[-1].reshape(-1)  # the last layer's, direction after direction
        shape = _shape(fx.sp, out[0])
        if not shape or dead.numel() != shape[2]:
            return None
        fx.set(out[0], [_unknown(shape[0]), _unknown(shape[1]),
                        DimFacts(dead, torch.zeros(shape[2], dtype=torch.float64))])
        return None


class Scan(Rule):
    """``cumsum`` / ``cumprod`` / ``logcumsumexp`` / ``diff`` along one dim: each slice is scanned on its own, so the
    other dims pass through; the scanned dim is positions (left unrelated: frozen). Facts by evaluation (a constant
    channel stays constant only where the scan keeps it: zeros under a sum, anything under a difference); along a
    dim of varying size only zeros, which hold at every size."""

    def dim(self, op: Op, sp: Spaces) -> int | None:
        d = op.arg(2, "dim", -1) if op.name == "diff" else op.arg(1, "dim")
        r = sp.rank(op.node)
        return d % r if isinstance(d, int) and r > 0 else None

    def couple(self, op: Op, sp: Spaces) -> None:
        dim, rank = self.dim(op, sp), sp.rank(op.node)
        if dim is None:
            return
        for a in op.tensor_args():
            if sp.rank(a) == rank:  # the input, and diff's prepend/append
                for d in range(rank):
                    if d != dim:
                        sp.unify(a, d, op.node, d, f"by {op.describe()}")

    def facts(self, op: Op, fx: Facts) -> list[DimFacts] | None:
        dim, out = self.dim(op, fx.sp), nan_eval(op, fx)
        return _zeros_only(out) if dim is not None and _varies(fx.sp, op.node.args[0], [dim]) else out


class Triangle(Rule):
    """``triu`` / ``tril``: which entries of the last two dims stay depends on their positions (frozen); the dims
    before them pass through (a batch of masks, of heads)."""

    nan_eval = True

    def couple(self, op: Op, sp: Spaces) -> None:
        x, rank = op.arg(0, "input"), sp.rank(op.node)
        for d in range(rank - 2):
            sp.unify(x, d, op.node, d, f"by {op.describe()}")


class PixelShuffle(Rule):
    """``pixel_shuffle(x, r)``: (..., C r r, H, W) -> (..., C, H r, W r), input channel (c r + i) r + j to output
    channel c at sub-position (i, j). The input's channel dim is the product of the output's channels and two
    factors of r that become positions (frozen); ``pixel_unshuffle`` is the inverse."""

    nan_eval = True

    def __init__(self, inverse: bool = False) -> None:
        self.inverse = inverse

    def couple(self, op: Op, sp: Spaces) -> None:
        x, y = op.arg(0, "input"), op.node
        r = (getattr(op.module, "downscale_factor" if self.inverse else "upscale_factor", None) if op.module is not None
             else op.arg(1, "downscale_factor" if self.inverse else "upscale_factor"))
        rank = sp.rank(x)
        if not isinstance(r, int) or rank < 3 or sp.rank(y) != rank:
            return
        for d in range(rank - 3):
            sp.unify(x, d, y, d, f"by {op.describe()}")
        few, many = (x, y) if self.inverse else (y, x)
        subs = [sp.fresh(r), sp.fresh(r)]
        for a in subs:
            sp.atoms.freeze(a, f"sub-positions of {op.describe()}")
        sp.structure_atoms(sp.of(many, rank - 3), "prod", [sp.of(few, rank - 3), *subs], f"by {op.describe()}")


class Unfold(Rule):
    """``unfold`` (im2col): (N, C, H, W) -> (N, C kh kw, positions), input channel c to output channels
    (c kh + i) kw + j; ``fold`` (col2im) is the inverse (overlapping blocks summed). The blocks' side is a product
    of the image side's channels and the kernel's two sizes (frozen); positions are left unrelated."""

    nan_eval = True

    def __init__(self, fold: bool = False) -> None:
        self.fold = fold

    def couple(self, op: Op, sp: Spaces) -> None:
        x, y = op.arg(0, "input"), op.node
        ks = op.module.kernel_size if op.module is not None else op.arg(2 if self.fold else 1, "kernel_size")
        ks = (ks, ks) if isinstance(ks, int) else tuple(ks)
        blocks, image = (x, y) if self.fold else (y, x)
        if len(ks) != 2 or not all(isinstance(k, int) for k in ks) or sp.rank(image) != 4 or sp.rank(blocks) != 3:
            return  # an unbatched call: frozen by the driver
        sp.unify(x, 0, y, 0, f"by {op.describe()}")
        sizes = [sp.fresh(k) for k in ks]
        for a in sizes:
            sp.atoms.freeze(a, f"kernel positions of {op.describe()}")
        sp.structure_atoms(sp.of(blocks, 1), "prod", [sp.of(image, 1), *sizes], f"by {op.describe()}")


class ChannelShuffle(Rule):
    """``channel_shuffle(x, g)``: channel i k + j (group i of g, k channels each) goes to j g + i; the input's dim 1
    is the product (groups, k), the output's (k, groups). The groups stay (their count is the op's argument)."""

    nan_eval = True

    def couple(self, op: Op, sp: Spaces) -> None:
        x, y = op.arg(0, "input"), op.node
        g = op.module.groups if op.module is not None else op.arg(1, "groups")
        rank = sp.rank(x)
        if not isinstance(g, int) or rank < 2 or _shape(sp, x)[1] % g:
            return
        for d in range(rank):
            if d != 1:
                sp.unify(x, d, y, d, f"by {op.describe()}")
        groups, per = sp.fresh(g), sp.fresh(_shape(sp, x)[1] // g)
        sp.atoms.freeze(groups, f"the groups of {op.describe()}")
        sp.structure_atoms(sp.of(x, 1), "prod", [groups, per], f"by {op.describe()}")
        sp.structure_atoms(sp.of(y, 1), "prod", [per, groups], f"by {op.describe()}")


class GLU(Rule):
    """``glu(x, dim)``: the first half of ``dim`` times the sigmoid of the second; output channel k reads input
    channels k and k + half, so the input's dim is the output's twice over."""

    def couple(self, op: Op, sp: Spaces) -> None:
        x, y = op.arg(0, "input"), op.node
        dim = op.module.dim if op.module is not None else op.arg(1, "dim", -1)
        rank = sp.rank(x)
        if not isinstance(dim, int) or rank < 1 or sp.rank(y) != rank:
            return
        dim %= rank
        for d in range(rank):
            if d != dim:
                sp.unify(x, d, y, d, f"by {op.describe()}")
        out = sp.of(y, dim)
        sp.structure_atoms(sp.of(x, dim), "sum", [out, out], f"halves of {op.describe()}")

    def facts(self, op: Op, fx: Facts) -> list[DimFacts] | None:
        """By evaluation; and, as for a product, a zero channel of the first half is zero whatever its gate."""
        out = nan_eval(op, fx)
        x, shape = op.arg(0, "input"), _shape(fx.sp, op.node)
        dim = op.module.dim if op.module is not None else op.arg(1, "dim", -1)
        if not shape or not isinstance(dim, int) or fx.get(x) is None:
            return out
        dim %= len(shape)
        out = out or [_unknown(n) for n in shape]
        f = fx.dim(x, dim)
        zero = f.known[:shape[dim]] & (f.value[:shape[dim]] == 0)
        out[dim] = out[dim].with_zeros(zero)
        return out


class PerChannel(Rule):
    """An op over each channel of dim 1 on its own (dim 0 of a 1-D input), with per-channel parameters at
    ``params`` (name -> position): ``prelu``'s slopes, instance norm's affine and running statistics. Every dim
    passes through; a parameter of one entry (one slope for all channels) is read whole. Facts by evaluation:
    instance norm takes a constant channel of each sample to its bias."""

    nan_eval = True

    def __init__(self, **params: int) -> None:
        self.params = params

    def couple(self, op: Op, sp: Spaces) -> None:
        x = op.arg(0, "input")
        rank = sp.rank(x)
        for d in range(rank):
            sp.unify(x, d, op.node, d, f"by {op.describe()}")
        c = 1 if rank > 1 else 0
        for name, i in self.params.items():
            p = op.arg(i, name)
            if not isinstance(p, Node):
                continue
            if _shape(sp, p)[:1] == _shape(sp, x)[c:c + 1]:
                sp.unify(x, c, p, 0, f"by {op.describe()}")
            else:
                sp.meta_dim(p, 0)


class TupleGetItem(Rule):
    """``operator.getitem`` on a multi-output op: spaces and facts come from the producing op's rule."""

    def couple(self, op: Op, sp: Spaces) -> None:
        for d in range(max(sp.rank(op.node), 0)):
            if sp.has(op.node, d):  # related by the producing op's rule; otherwise frozen by the driver
                sp.meta_dim(op.node, d)

    def facts(self, op: Op, fx: Facts) -> list[DimFacts] | None:
        src, i = op.node.args
        if isinstance(src, Node) and src.target is aten._native_batch_norm_legit_no_training.default and i == 0:
            out = None
            if fx.get(src.args[0]):
                try:
                    args = torch.fx.node.map_arg(src.args, fx.materialize)
                except Exception:
                    return None
                with torch.no_grad():
                    out = extract(src.target(*args)[0])
            return BatchNorm().zero_scaled(Op(src, op.gm), fx, out)
        return fx.peek(op.node)


class Norm(Rule):
    """LayerNorm / RMSNorm over trailing dims and GroupNorm over dim 1: they read every channel they normalize.

    A layer_norm or rms_norm tolerates removing channels of its first normalized dim that hold known constants:
    its rewrite turns it into :func:`~fxprune.nn.compensated_layer_norm` (or the RMS one), which keeps the
    statistics of everything it normalized. A group_norm does too (constant channels, the same at every position:
    :func:`~fxprune.nn.compensated_group_norm`, which counts the positions at run time); with several groups, each
    group keeps its own statistics, and a group that loses every channel goes whole (its statistics are its
    own: the norm is a group_norm with fewer groups again). native_group_norm tolerates nothing."""

    _LAYER = (aten.layer_norm.default, F.layer_norm)
    _RMS = (aten.rms_norm.default, getattr(F, "rms_norm", None))
    _GROUP = (aten.group_norm.default, F.group_norm)

    def operands(self, op: Op) -> tuple[Node, list[int], Any, Any]:
        """(x, normalized dims, weight, bias)."""
        x = op.arg(0, "input")
        r = len(node_spec(x).shape)
        t = op.target
        if t in (aten.group_norm.default, F.group_norm, aten.native_group_norm.default):
            return x, [1], op.arg(2, "weight"), op.arg(3, "bias")
        shape = op.arg(1, "normalized_shape")
        nd = list(range(r - len(shape), r))
        if t in self._RMS:
            return x, nd, op.arg(2, "weight"), None
        return x, nd, op.arg(2, "weight"), op.arg(3, "bias")

    def compensable(self, op: Op) -> bool:
        """A layer/RMS norm whose first normalized dim holds the channels; any further normalized dims (LayerNorm
        over ``[C, L]``) are static and kept whole. A group norm (over dim 1 and every position; with several
        groups, each group's), whose channels divide into its groups."""
        if op.target in self._GROUP:
            G, C = op.arg(1, "num_groups"), node_spec(op.arg(0, "input")).shape[1]
            return G == 1 or isinstance(G, int) and isinstance(C, int) and G > 1 and C % G == 0
        if op.target not in self._LAYER + self._RMS:
            return False
        x, nd, _, _ = self.operands(op)
        dynamic = node_spec(x).dynamic
        return not any(d in dynamic for d in nd[1:])

    def compensated(self, op: Op, new: Callable[[Any], Any], full: int, s1: Any, s2: Any, ndim: int,
                    affine: bool = True, groups: tuple[int, ...] | None = None) -> tuple[Callable[..., Any], tuple]:
        """Target and args of the compensated call that replaces this norm once entries holding constants (sum
        ``s1``, sum of squares ``s2``) are gone from normalized dims of ``full`` entries in all (``new`` maps
        operands to the new graph); ``affine=False``: without weight and bias. ``groups``: a group norm's kept
        channels per group (``s1``, ``s2`` per group)."""
        x, w = op.arg(0, "input"), op.arg(2, "weight") if affine else None
        if op.target in self._GROUP:  # (full: the channels; s1, s2: the removed constants at one position)
            b = op.arg(3, "bias") if affine else None
            extra = (tuple(groups),) if groups is not None else ()
            return compensated_group_norm, (new(x), new(w), new(b), op.arg(4, "eps", 1e-5), full, s1, s2, *extra)
        if op.target in self._RMS:
            return compensated_rms_norm, (new(x), new(w), op.arg(3, "eps"), full, s2, ndim)
        b = op.arg(3, "bias") if affine else None
        return compensated_layer_norm, (new(x), new(w), new(b), op.arg(4, "eps", 1e-5), full, s1, s2, ndim)

    def outputs(self, op: Op) -> list[Node]:
        if op.target in (aten.native_layer_norm.default, aten.native_group_norm.default):
            return [u for u in op.node.users if u.target is operator.getitem and u.args[1] == 0]
        return [op.node]

    def splits(self, op: Op, sp: Spaces) -> bool:
        """Whether this norm's output channels form groups apart from its input's (``Spaces.split_norms``): a
        layer / RMS norm over one dim, called as such (not a compensated one, whose later selection would need
        its own sums), with one output."""
        return (sp.split_norms and type(self) is Norm and op.target in self._LAYER + self._RMS
                and len(self.operands(op)[1]) == 1 and self.outputs(op) == [op.node])

    def couple(self, op: Op, sp: Spaces) -> None:
        x, nd, w, b = self.operands(op)
        r = sp.rank(x)
        split = self.splits(op, sp)  # the output's channels (and the affine's) apart: an output channel may go alone
        for y in self.outputs(op):
            for d in range(r):
                if not (split and d == nd[0]):
                    sp.unify(x, d, y, d, f"by {op.describe()}")
        for p in (w, b):
            if isinstance(p, Node):
                for i, d in enumerate(nd if len(nd) == sp.rank(p) else [1]):
                    sp.unify(op.node if split else x, d, p, i, f"by {op.describe()}")
        if split:
            sp.implies(x, nd[0], op.node, nd[0])  # an input channel goes (compensated) only with its output
        if self.compensable(op):
            sp.exit(x, nd[0], lambda fx: fx.dim(x, nd[0]).known, f"{op.describe()} (compensates constant channels)")
            for d in nd[1:]:
                sp.freeze(x, d, f"{op.describe()} normalizes over dim {d} too: it is kept whole")
            return
        why = f"{op.describe()} reads every channel of the dims it normalizes (no compensation for this form)"
        for d in nd:
            sp.freeze(x, d, why)

    def facts(self, op: Op, fx: Facts) -> list[DimFacts] | None:
        x, nd, w, b = self.operands(op)
        if op.target in self._GROUP and not self.compensable(op):
            return nan_eval(op, fx)  # a group whose inputs are all constant normalizes to constants
        if op.target in (aten.native_layer_norm.default, aten.native_group_norm.default) or len(nd) != 1:
            return None
        W = fx.tensor(w) if isinstance(w, Node) else None
        if W is None:
            return None
        B = fx.tensor(b) if isinstance(b, Node) else torch.zeros_like(W)
        if B is None:
            return None
        z = W == 0
        return _out_facts(op, fx.sp, {nd[0]: DimFacts(z, torch.where(z, B, 0.0))})

    def removed_constants(self, op: Op, rw: Rewrite) -> tuple[float, float, int] | None:
        """Sum and sum of squares of the entries this rewrite removes from the normalized dims (constants of
        the removed channels of the first normalized dim, repeated over the others), and those dims' current
        element count; None when nothing is removed."""
        x, nd, _, _ = self.operands(op)
        removed = ~rw.kept(x, nd[0])
        if not self.compensable(op) or not removed.any():
            return None
        shape = _shape(rw.facts.sp, x)
        rest = math.prod(shape[d] for d in nd[1:])
        c = rw.facts.dim(x, nd[0]).value[removed]
        return rest * float(c.sum()), rest * float((c * c).sum()), math.prod(shape[d] for d in nd)

    def group_removal(self, op: Op, rw: Rewrite, groups: tuple[int, ...], s1: tuple[float, ...],
                      s2: tuple[float, ...]) -> tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...]] | None:
        """A group norm's kept channels per group and its removed constants' sums per group (at one position) once
        this rewrite's channels are gone, from ``groups`` kept channels per group before it; groups that lose every
        channel are dropped. None when nothing is removed."""
        x = op.arg(0, "input")
        kept = rw.kept(x, 1)
        if bool(kept.all()):
            return None
        return shrunk_groups(groups, s1, s2, kept, rw.facts.dim(x, 1).value[~kept])

    def rewrite(self, op: Op, rw: Rewrite) -> None:
        if op.target in self._GROUP and op.arg(1, "num_groups") != 1:
            G = op.arg(1, "num_groups")
            C = _shape(rw.facts.sp, op.arg(0, "input"))[1]
            got = self.group_removal(op, rw, (C // G,) * G, (0.0,) * G, (0.0,) * G)
            if got is None:
                return
            groups, s1, s2 = got
            if all(k == C // G for k in groups):  # whole groups only: a group norm with fewer groups
                rw.set_arg(op, 1, "num_groups", len(groups))
            else:
                rw.retarget(op, *self.compensated(op, rw.new, C // G * len(groups), s1, s2, 1, groups=groups), {})
            return
        x, nd, w, b = self.operands(op)
        if self.splits(op, rw.facts.sp):
            kin, kout = rw.kept(x, nd[0]), rw.kept(op.node, nd[0])
            if not torch.equal(kin, kout):  # outputs that go alone: normalize what stays in, select, then affine
                got = self.removed_constants(op, rw) or (0.0, 0.0, _shape(rw.facts.sp, x)[nd[0]])
                target, args = self.compensated(op, rw.new, got[2], got[0], got[1], 1, affine=False)
                positions = kout[kin].nonzero().flatten()  # the kept outputs among the normalized kept inputs
                rw.select_after(op, target, args, nd[0] - len(_shape(rw.facts.sp, x)), positions, w, b)
                return
        got = self.removed_constants(op, rw)
        if got is None:
            return
        s1, s2, full = got
        rw.retarget(op, *self.compensated(op, rw.new, full, s1, s2, len(self.operands(op)[1])), {})


class CompensatedNorm(Norm):
    """:func:`~fxprune.nn.compensated_layer_norm` / ``compensated_group_norm`` / ``compensated_rms_norm``: removing
    more constant channels adds their constants to the removed sums; the full width stays."""

    def operands(self, op: Op) -> tuple[Node, list[int], Any, Any]:
        x = op.arg(0, "input")
        if op.target is compensated_group_norm:
            return x, [1], op.arg(1, "weight"), op.arg(2, "bias")
        r = len(node_spec(x).shape)
        nd = list(range(r - op.arg(5 if op.target is compensated_rms_norm else 7, "ndim", 1), r))
        if op.target is compensated_rms_norm:
            return x, nd, op.arg(1, "weight"), None
        return x, nd, op.arg(1, "weight"), op.arg(2, "bias")

    def compensable(self, op: Op) -> bool:
        return True

    def rewrite(self, op: Op, rw: Rewrite) -> None:
        groups = op.arg(7, "kept_per_group") if op.target is compensated_group_norm else None
        if groups is not None:
            full = op.arg(4, "full_channels")
            got = self.group_removal(op, rw, groups, op.arg(5, "removed_sum"), op.arg(6, "removed_sq_sum"))
            if got is not None:
                rw.set_arg(op, 4, "full_channels", full // len(groups) * len(got[0]))
                for i, name, v in ((5, "removed_sum", got[1]), (6, "removed_sq_sum", got[2]), (7, "kept_per_group", got[0])):
                    rw.set_arg(op, i, name, v)
            return
        got = self.removed_constants(op, rw)
        if got is None:
            return
        s1, s2, _ = got
        if op.target is compensated_rms_norm:
            rw.set_arg(op, 4, "removed_sq_sum", op.arg(4, "removed_sq_sum", 0.0) + s2)
        else:
            rw.set_arg(op, 5, "removed_sum", op.arg(5, "removed_sum", 0.0) + s1)
            rw.set_arg(op, 6, "removed_sq_sum", op.arg(6, "removed_sq_sum", 0.0) + s2)


class Reduce(Rule):
    """mean/sum/amax/... over some dims: the reduced dims are read whole; the others pass through.

    A sum or mean over one channel dim tolerates removing channels whose values are known functions of
    constants (:meth:`Facts.ghost`): the rewrite adds their contribution back from a small constant
    tensor, and a mean divides by the original width."""

    nan_eval = True

    def __init__(self, mode: str | None = None, dim_pos: int = 1, keepdim_pos: int = 2) -> None:
        self.mode, self.dim_pos, self.keepdim_pos = mode, dim_pos, keepdim_pos

    def reduced(self, op: Op, sp: Spaces) -> tuple[Node, list[int], bool]:
        x = op.arg(0, "input") if op.node.op != "call_method" else op.node.args[0]
        dim = op.arg(self.dim_pos, "dim")
        if op.module is not None:
            dim = None
        return x, _dims(dim, sp.rank(x)), bool(op.arg(self.keepdim_pos, "keepdim", False))

    def facts(self, op: Op, fx: Facts) -> list[DimFacts] | None:
        """Over a dim whose size varies, a constant's mean, max and min are that constant at every size and a sum
        of zeros is zero; a sum of a non-zero constant (or its variance, logsumexp) depends on the size."""
        x, red, _ = self.reduced(op, fx.sp)
        out = nan_eval(op, fx)
        if out is None or not _varies(fx.sp, x, red):
            return out
        if self.mode == "mean" or any(k in op.name for k in ("amax", "amin")):
            return out
        return _zeros_only(out) if self.mode in ("sum", "norm") else None

    def compensable(self, op: Op, red: list[int]) -> bool:
        return self.mode in ("sum", "mean") and len(red) == 1 and op.node.kwargs.get("dtype") is None

    @staticmethod
    def positive_order(op: Op) -> bool:
        """A p-norm with p > 0 (2 by default): zero entries add nothing to it."""
        p = op.arg(1, "ord" if "ord" in (op.normalized or {}) else "p", None)
        return p is None or p == "fro" or (isinstance(p, (int, float)) and p > 0)

    def couple(self, op: Op, sp: Spaces) -> None:
        x, red, keep = self.reduced(op, sp)
        j = 0
        for d in range(sp.rank(x)):
            if d in red:
                if self.compensable(op, red):
                    tol = lambda fx, d=d: fx.ghost(x, d)  # noqa: E731
                elif self.mode == "sum" or (self.mode == "norm" and self.positive_order(op)):
                    tol = lambda fx, d=d: fx.dim(x, d).zero()  # noqa: E731  (zeros add nothing)
                else:
                    sp.freeze(x, d, f"{op.describe()} reduces over dim {d}: its result (a variance, a maximum...) "
                                    "changes when channels go, and fxprune has no compensation for it")
                    if keep:
                        sp.freeze(op.node, j, f"reduced by {op.describe()}")
                        j += 1
                    continue
                sp.exit(x, d, tol, f"{op.describe()} (reduces over it)")
                if keep:
                    j += 1
                continue
            sp.unify(x, d, op.node, j, f"by {op.describe()}")
            j += 1

    def rewrite(self, op: Op, rw: Rewrite) -> None:
        x, red, keep = self.reduced(op, rw.facts.sp)
        if not self.compensable(op, red):
            return
        d = red[0]
        removed = ~rw.kept(x, d)
        if not removed.any() or (self.mode == "sum" and bool(rw.facts.dim(x, d).zero()[removed].all())):
            return
        rw.compensate_sum(op, x, d, removed, keep, mean=self.mode == "mean")


def legacy_softmax_dim(ndim: int) -> int:
    """The dim softmax takes when called with ``dim=None`` (torch's deprecated implicit choice)."""
    return 0 if ndim in (0, 1, 3) else 1


class Softmax(Rule):
    """softmax / log_softmax: other dims pass through; the normalized dim tolerates removing channels with known
    constant logits: the rewrite becomes :func:`~fxprune.nn.compensated_softmax`, whose normalizer adds their
    ``exp`` back (their own outputs must go unread downstream: they are not constant)."""

    nan_eval = True
    _LOG = {aten._log_softmax, aten.log_softmax, F.log_softmax, torch.log_softmax, "log_softmax"}

    @staticmethod
    def dim(op: Op, sp: Spaces) -> int:
        """The normalized dim (``dim=None``: the dim torch's legacy rule picks for the input's rank)."""
        r, dim = sp.rank(op.node.args[0]), op.arg(1, "dim")
        return (legacy_softmax_dim(r) if dim is None else dim) % r

    def couple(self, op: Op, sp: Spaces) -> None:
        x = op.node.args[0]
        dim = self.dim(op, sp)
        for d in range(sp.rank(x)):
            sp.unify(x, d, op.node, d, f"by {op.describe()}")
        if dim in sp.spec(x).dynamic:
            sp.exit(x, dim, lambda fx, n=_shape(sp, x)[dim]: torch.zeros(n, dtype=torch.bool), f"{op.describe()} (normalizes over it)")
        else:
            sp.exit(x, dim, lambda fx: fx.dim(x, dim).known, f"{op.describe()} (compensates constant logits)")

    def facts(self, op: Op, fx: Facts) -> list[DimFacts] | None:
        x = op.node.args[0]
        if _varies(fx.sp, x, [self.dim(op, fx.sp)]):
            return None  # softmax of a constant over a dim of varying size is 1/size
        return nan_eval(op, fx)

    def rewrite(self, op: Op, rw: Rewrite) -> None:
        x = op.node.args[0]
        d = self.dim(op, rw.facts.sp)
        removed = ~rw.kept(x, d)
        if not removed.any():
            return
        c = rw.facts.dim(x, d).value[removed]
        lse = float(torch.logsumexp(c, 0))
        if op.target is compensated_softmax:
            lse = float(torch.logaddexp(torch.tensor(op.arg(2, "removed_lse"), dtype=torch.float64), torch.tensor(lse)))
            rw.set_arg(op, 2, "removed_lse", lse)
            return
        rw.retarget(op, compensated_softmax, (rw.new(x), d, lse, op.target in self._LOG or
                                              getattr(op.target, "overloadpacket", None) in self._LOG),
                    {"dtype": self.out_dtype(op, rw.facts.sp)})

    @staticmethod
    def out_dtype(op: Op, sp: Spaces) -> torch.dtype | None:
        """The dtype the call computes in when it differs from its input's: ``dtype=`` (positional after ``dim``;
        ``F.softmax`` has ``_stacklevel`` between them), or aten's ``half_to_float``."""
        args, kwargs, t = op.node.args, op.node.kwargs, op.target
        if getattr(t, "overloadpacket", None) in (aten._softmax, aten._log_softmax):
            half = args[2] if len(args) > 2 else kwargs.get("half_to_float", False)
            return torch.float32 if half else None
        at = 3 if t in (F.softmax, F.log_softmax) else 2
        return kwargs.get("dtype", args[at] if len(args) > at else None)


class Pool(Rule):
    """Pooling over the trailing ``n`` spatial dims: batch and channel dims pass through."""

    nan_eval = True
    _AVG_ARGS = (("padding", 0), ("count_include_pad", True), ("divisor_override", None))

    def __init__(self, n: int) -> None:
        self.n = n

    def outputs(self, op: Op) -> list[Node]:
        if isinstance(node_spec(op.node), list):
            return [u for u in op.node.users if u.target is operator.getitem and u.args[1] == 0]
        return [op.node]

    def couple(self, op: Op, sp: Spaces) -> None:
        x = op.node.args[0]
        for y in self.outputs(op):
            for d in range(sp.rank(x) - self.n):
                sp.unify(x, d, y, d, f"by {op.describe()}")

    def facts(self, op: Op, fx: Facts) -> list[DimFacts] | None:
        if isinstance(node_spec(op.node), list):
            return None
        out = nan_eval(op, fx)
        x = op.node.args[0]
        # spatial dims of varying size: where windows meet padding changes with the size; zero stays zero
        return out if self.keeps_constants(op) or not _varies(fx.sp, x, range(-self.n, 0)) else _zeros_only(out)

    def keeps_constants(self, op: Op) -> bool:
        """Whether every window holds only input entries, or counts only those, so that a constant channel pools
        to its constant at any size: adaptive and max pools (a max ignores its -inf padding), an average with no
        padding (``ceil_mode``'s partial windows divide by what they hold) or with ``count_include_pad=False``.
        An average that counts its zero padding (the default), or divides by ``divisor_override``, does not."""
        m = op.module
        name = type(m).__name__.lower() if m is not None else op.name
        if "adaptive" in name or "max" in name:
            return True
        if "avg" not in name:
            return False
        # (self, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override), or the module's
        padding, include, divisor = ((getattr(m, k, d) for k, d in self._AVG_ARGS) if m is not None else
                                     (op.arg(i, k, d) for i, (k, d) in zip((3, 5, 6), self._AVG_ARGS)))
        pads = padding if isinstance(padding, (tuple, list)) else (padding,)
        return divisor is None and (not include or all(p == 0 for p in pads))


class Resize(Rule):
    """Interpolation (``F.interpolate``, ``aten.upsample_*``) over the spatial dims after (N, C): batch and channel
    pass through. Nearest modes copy a constant channel's constant to any size; the interpolating ones weigh it by
    weights that sum to one, so at sizes that vary only a zero channel is known."""

    nan_eval = True
    sizes = True  # (the output size may be read off the input)

    def couple(self, op: Op, sp: Spaces) -> None:
        x = op.arg(0, "input")
        for d in range(min(2, sp.rank(x))):
            sp.unify(x, d, op.node, d, f"by {op.describe()}")

    def facts(self, op: Op, fx: Facts) -> list[DimFacts] | None:
        out = nan_eval(op, fx, sizes=True)
        x = op.arg(0, "input")
        nearest = "nearest" in op.name or (op.name == "interpolate"
                                           and op.arg(3, "mode", "nearest") in ("nearest", "nearest-exact"))
        return out if nearest or not _varies(fx.sp, x, range(2, fx.sp.rank(x))) else _zeros_only(out)


class Pad(Rule):
    """Padding (``F.pad``, ``aten.pad``, ``constant_pad_nd``, reflection / replication pads): the dims it pads change
    size and are left unrelated (frozen); a dim it does not pad (a ``(0, 0)`` pair, or no pair) passes through, so
    the channels of a ``(N, H, W, C)`` tensor padded in H and W (Swin's windows) or of an ``(N, C, H, W)`` one (a
    "same" convolution's input) are still channels."""

    _CONSTANT = {"constant_pad_nd": 2, "pad": 3}  # the position of the fill value, where there is one

    def pads(self, op: Op) -> list[Any]:
        """(before, after) per dim from the last backwards, flattened: ints, or the nodes of sizes that vary."""
        return list(op.arg(1, "padding" if op.name.startswith(("reflection", "replication")) else "pad"))

    def padded(self, op: Op, rank: int) -> set[int]:
        pads = self.pads(op)
        return {rank - 1 - i for i in range(len(pads) // 2)
                if not (type(pads[2 * i]) is int and type(pads[2 * i + 1]) is int and pads[2 * i] == pads[2 * i + 1] == 0)}

    def couple(self, op: Op, sp: Spaces) -> None:
        x = op.arg(0, "input")
        padded = self.padded(op, sp.rank(x))
        for d in range(sp.rank(x)):
            if d not in padded:
                sp.unify(x, d, op.node, d, f"by {op.describe()}")

    def facts(self, op: Op, fx: Facts) -> list[DimFacts] | None:
        """A reflection or replication copies a constant channel's constant; a constant fill of 0 keeps only zero
        channels constant (a channel of another constant then holds two values); another fill, nothing."""
        mode = op.arg(2, "mode", "constant") if op.name == "pad" else \
            "constant" if op.name == "constant_pad_nd" else "copies"
        if mode == "constant":
            pos = self._CONSTANT[op.name]
            if (op.arg(pos, "value", None) or 0) != 0:
                return None
            return _zeros_only(nan_eval(op, fx, sizes=True))
        return nan_eval(op, fx, sizes=True)


# ---------------------------------------------------------------------------------------------
class Reshape(Rule):
    """view/reshape/flatten/unflatten/(un)squeeze: dims are matched by products of sizes; a dim split into
    several (heads) becomes a product of atoms."""

    nan_eval = True
    sizes = True

    def couple(self, op: Op, sp: Spaces) -> None:
        x = op.node.args[0]
        ins, outs = _shape(sp, x), _shape(sp, op.node)
        for seg_in, seg_out in _segments(ins, outs):
            why = f"by {op.describe()}"
            if len(seg_in) == 1 and len(seg_out) == 1:
                sp.unify(x, seg_in[0], op.node, seg_out[0], why)
            elif len(seg_in) == 1:
                sp.structure(x, seg_in[0], "prod", [(op.node, d) for d in seg_out], why)
            elif len(seg_out) == 1:
                sp.structure(op.node, seg_out[0], "prod", [(x, d) for d in seg_in], why)
            else:
                mid = sp.fresh(math.prod(ins[d] for d in seg_in))
                sp.structure_atoms(mid, "prod", [sp.of(x, d) for d in seg_in], why)
                sp.structure_atoms(mid, "prod", [sp.of(op.node, d) for d in seg_out], why)
        for d, n in enumerate(ins):
            if n == 1:
                sp.meta_dim(x, d)

    def rewrite(self, op: Op, rw: Rewrite) -> None:
        where = _size_arg(op, rw.facts.sp)
        if where is not None:
            rw.resize_sizes(op, where)


class ReshapeAs(Reshape):
    """reshape_as/view_as(x, other): a reshape of ``x`` to ``other``'s shape, which the op reads at run time, so
    each dim of the output and of ``other`` is one channel space (LeViT reshapes a BatchNorm's flattened output back
    to its input's shape)."""

    def couple(self, op: Op, sp: Spaces) -> None:
        super().couple(op, sp)
        _same_shape(op, sp, op.node.args[1])

    def rewrite(self, op: Op, rw: Rewrite) -> None:
        pass  # (no sizes of its own: ``other`` loses what the output loses)


def _same_shape(op: Op, sp: Spaces, other: Node) -> None:
    """Unify each dim of ``op``'s output with that dim of ``other``, whose shape the op reads (a size-1 dim is read
    for its size only); its values are not read."""
    for d, n in enumerate(_shape(sp, other)):
        if n == 1:
            sp.meta_dim(other, d)
        else:
            sp.unify(other, d, op.node, d, f"by {op.describe()} (the shape it reads)")
    sp.meta_only(other)


_UNFLATTEN = {aten.unflatten, torch.unflatten, "unflatten"}
_SIZED = {aten.view, aten.reshape, aten._unsafe_view, aten.expand, aten.broadcast_to, torch.reshape, torch.broadcast_to,
          "view", "reshape", "expand", "broadcast_to"}


def _size_arg(op: Op, sp: Spaces) -> SizeArg | None:
    """Where a reshape/expand holds its target sizes (None for flatten/squeeze/unsqueeze: they hold none)."""
    t = getattr(op.target, "overloadpacket", op.target)
    if t in _UNFLATTEN:
        return SizeArg(2, "sizes", first=op.arg(1, "dim") % sp.rank(op.node.args[0]))
    if t not in _SIZED:
        return None
    name = "shape" if t in (aten.reshape, torch.reshape, "reshape") else "size"
    if isinstance(t, str) and not (len(op.node.args) == 2 and isinstance(op.node.args[1], (list, tuple))):
        return SizeArg(1, name, varargs=True)  # x.view(2, 3)
    return SizeArg(1, name)


def _segments(ins: tuple[int, ...], outs: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    a = [d for d, n in enumerate(ins) if n != 1]
    b = [d for d, n in enumerate(outs) if n != 1]
    segs: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) and j < len(b):
        si, sj = [a[i]], [b[j]]
        pi, pj = ins[a[i]], outs[b[j]]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj and i < len(a):
                si.append(a[i]); pi *= ins[a[i]]; i += 1
            elif pj < pi and j < len(b):
                sj.append(b[j]); pj *= outs[b[j]]; j += 1
            else:
                return segs
        segs.append((si, sj))
    return segs


class WeightNorm(Rule):
    """``aten._weight_norm(v, g, dim)``: ``w = g * v / ||v||``, the norm over every dim of ``v`` but ``dim`` (a conv
    or linear under ``torch.nn.utils.parametrizations.weight_norm``, or the legacy hook). Every dim of ``w`` is
    ``v``'s, and dim ``dim`` is ``g``'s too: ``w`` is sliced by slicing ``v`` and ``g``. A slice along ``dim`` has
    a norm of its own. A slice along any other dim enters the norm of every slice across it: where such slices go,
    ``g`` is scaled by the kept part's norm over the whole's (``||v'|| / ||v||``), so each kept entry of ``w`` is
    what it was; a row left with zeros only gets ``g = 0`` and a 1 in ``v`` (its ``w`` is zero either way, and
    ``0 / 0`` would be NaN). ``dim=-1``: one norm over the whole tensor."""

    nan_eval = True

    @staticmethod
    def _dims(op: Op, r: int) -> tuple[int | None, list[int]]:
        dim = op.arg(2, "dim", 0)
        own = None if dim == -1 else dim % r
        return own, [d for d in range(r) if d != own]

    def couple(self, op: Op, sp: Spaces) -> None:
        v, g = op.node.args[:2]
        r = sp.rank(v)
        own, _ = self._dims(op, r)
        why = f"by {op.describe()}"
        for d in range(r):
            sp.unify(v, d, op.node, d, why)
        for d in range(sp.rank(g)):
            if d == own and sp.rank(g) == r:
                sp.unify(g, d, op.node, d, why)
            else:
                sp.meta_dim(g, d)
        targets = {getattr(v, "target", None), getattr(g, "target", None)}
        if any(n.op == "get_attr" and n.target in targets and set(n.users) - {op.node} for n in op.node.graph.nodes):
            for d in self._dims(op, r)[1]:  # (g and v read elsewhere too: one scaling cannot serve both)
                sp.freeze(op.node, d, f"{op.describe()}'s v and g are read elsewhere too: their norms stay")

    def rewrite(self, op: Op, rw: Rewrite) -> None:
        v, g = op.node.args[:2]
        V, G = rw.facts.value(v).to("cpu", torch.float64), rw.facts.value(g).to("cpu", torch.float64)
        own, others = self._dims(op, V.dim())
        keep = torch.ones(V.shape, dtype=torch.bool)
        for d in others:
            keep &= rw.kept(v, d).reshape([-1 if e == d else 1 for e in range(V.dim())])
        if bool(keep.all()):
            return
        G2, V2 = weight_norm_kept(V, G, op.arg(2, "dim", 0), keep)
        rw.add_to_bias(op, g, 1, "g", G2 - G, own or 0)  # (a delta to a tensor only this op reads)
        fix = torch.where(keep, V2 - V, torch.zeros_like(V))  # (the 1 of a row left with zeros)
        if bool(fix.any()):
            rw.add_to_bias(op, v, 0, "v", fix, own or 0)


class IndexSelect(Rule):
    """index_select(x, d, index): the other dims pass through; dim d of ``x`` is read at the positions the index
    names (whatever they are), so its channels stay. Output channel k is ``x``'s channel ``index[k]``: with an
    index held as a tensor of the graph (a split norm's selection of its kept outputs, the kept channels of a model
    input), an output channel nothing reads goes with its entry of the index; a computed index freezes them."""

    nan_eval = True

    def couple(self, op: Op, sp: Spaces) -> None:
        x, index = op.node.args[0], op.node.args[2]
        r = sp.rank(x)
        d = op.node.args[1] % r
        for i in range(r):
            if i != d:
                sp.unify(x, i, op.node, i, f"by {op.describe()}")
        why = f"{op.describe()} reads dim {d} at the positions its index names"
        sp.freeze(x, d, why)
        if _is_attr(index) and sp.rank(index) == 1:
            sp.unify(op.node, d, index, 0, f"by {op.describe()}")
            return
        sp.freeze(op.node, d, why)
        if isinstance(index, Node):
            sp.freeze_all(index, why)


class IndexRows(Rule):
    """``x[idx]`` (``aten.index.Tensor`` with one index tensor): a gather of whole rows of dim 0, as a mixture of
    experts routes its tokens. The other dims pass through, with their constant channels (every row gathered is
    a row of ``x``); dim 0 is read at the positions the index names, so it stays. Other index forms are left to
    the driver (frozen)."""

    def couple(self, op: Op, sp: Spaces) -> None:
        if not self._rows(op):
            return
        x, (index,) = op.node.args[0], op.node.args[1]
        r = sp.rank(x)
        for i in range(1, r):
            sp.unify(x, i, op.node, i, f"by {op.describe()}")
        why = f"{op.describe()} reads dim 0 at the rows its index names"
        sp.freeze(x, 0, why)
        sp.freeze(op.node, 0, why)
        sp.freeze_all(index, why)

    def facts(self, op: Op, fx: Facts) -> list[DimFacts] | None:
        x = op.node.args[0]
        if fx.get(x) is None or not self._rows(op):
            return None
        return _out_facts(op, fx.sp, {i: fx.dim(x, i) for i in range(1, fx.sp.rank(x))})

    @staticmethod
    def _rows(op: Op) -> bool:
        """One 1-D integer index (a bool mask, or an index of more dims, gives another shape of output)."""
        indices = op.node.args[1]
        if not (isinstance(indices, (list, tuple)) and len(indices) == 1 and isinstance(indices[0], Node)):
            return False
        spec = node_spec(indices[0])
        return spec is not None and spec.dtype not in (torch.bool, torch.uint8) and len(spec.shape) == 1


class GroupedMM(Rule):
    """transformers' ``grouped_mm_fallback(input [S, K], weight [E, K, N], offs [E])``, and torch's own
    ``aten._grouped_mm`` in that layout without a bias (what transformers calls for a bfloat16 model, and on a GPU):
    the rows of ``input`` are tokens sorted by expert (``offs``, the cumulative counts), and row s of the output is
    row s times the weight of its expert (rows past the last offset stay zero). Input channel k is weight dim 1,
    output channel n weight dim 2, whatever the expert: a channel goes only if it goes in every expert. No bias, so
    nothing is folded: an input channel leaves only where it is zero or every expert's weights on it are. Other
    layouts (batched 3-D inputs, a bias) have no rule: their channels freeze."""

    def couple(self, op: Op, sp: Spaces) -> None:
        x, w = op.node.args[0], op.node.args[1]
        y = op.node
        if sp.rank(x) != 2 or sp.rank(w) != 3 or op.arg(3, "bias") is not None:
            return
        sp.unify(x, 0, y, 0, f"by {op.describe()}")
        sp.unify(x, 1, w, 1, f"by {op.describe()}")
        sp.unify(y, 1, w, 2, f"by {op.describe()}")

        def tolerates(fx: Facts) -> torch.Tensor:
            return fx.dim(x, 1).zero() | fx.dim(w, 1).zero()

        sp.exit(x, 1, tolerates, op.describe() + " (no bias: folds only zeros)")

    def facts(self, op: Op, fx: Facts) -> list[DimFacts] | None:
        """Output channel n is zero when every expert's weights on n are zero over the input channels not known
        to be zero."""
        x, w = op.node.args[0], op.node.args[1]
        W = fx.value(w)
        if W is None or W.dim() != 3 or not fx.finite(w) or op.arg(3, "bias") is not None:
            return None
        live = ~fx.dim(x, 1).zero()
        const = ~(W[:, live, :] != 0).any(1).any(0)
        return _out_facts(op, fx.sp, {1: DimFacts(const, torch.zeros(const.shape, dtype=torch.float64))})


class Permute(Rule):
    """permute/transpose/t/.T/movedim: output dim i is input dim perm[i]."""

    nan_eval = True

    def perm(self, op: Op, r: int) -> list[int]:
        base = op.name
        args = op.node.args[1:]
        if base in ("transpose", "swapaxes"):
            d0, d1 = args[0] % r, args[1] % r
            p = list(range(r))
            p[d0], p[d1] = p[d1], p[d0]
            return p
        if base in ("t", "numpy_T"):  # .t() / aten.t; .T (aten.numpy_T: every dim reversed)
            return list(range(r))[::-1]
        if base in ("movedim", "moveaxis"):
            kw = op.node.kwargs
            src = args[0] if len(args) > 0 else kw.get("source")
            dst = args[1] if len(args) > 1 else kw.get("destination")
            src = [s % r for s in ([src] if isinstance(src, int) else src)]
            dst = [d % r for d in ([dst] if isinstance(dst, int) else dst)]
            p: list[int | None] = [None] * r
            for s_, d_ in zip(src, dst):
                p[d_] = s_
            rest = iter(i for i in range(r) if i not in src)
            return [i if i is not None else next(rest) for i in p]
        dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
        if not dims:
            dims = op.node.kwargs.get("dims")
        return [d % r for d in dims]

    def couple(self, op: Op, sp: Spaces) -> None:
        x = op.node.args[0]
        for i, j in enumerate(self.perm(op, sp.rank(x))):
            sp.unify(x, j, op.node, i, f"by {op.describe()}")


class Expand(Rule):
    """expand/expand_as: broadcast dims of size 1; existing dims pass through."""

    nan_eval = True
    sizes = True

    def couple(self, op: Op, sp: Spaces) -> None:
        x = op.node.args[0]
        s, out = _shape(sp, x), _shape(sp, op.node)
        for j, n in enumerate(s):
            i = j + len(out) - len(s)
            if n == out[i]:
                sp.unify(x, j, op.node, i, f"by {op.describe()}")
            else:
                sp.meta_dim(x, j)
        if getattr(op.target, "overloadpacket", op.target) in (aten.expand_as, "expand_as"):
            _same_shape(op, sp, op.node.args[1])

    def rewrite(self, op: Op, rw: Rewrite) -> None:
        where = _size_arg(op, rw.facts.sp)
        if where is not None:
            rw.resize_sizes(op, where)


class Cat(Rule):
    """cat along dim d: the output's dim d is the concatenation of the inputs' dims d."""

    nan_eval = True

    def couple(self, op: Op, sp: Spaces) -> None:
        parts = [t for t in op.arg(0, "tensors") if sp.rank(t) > 0]
        r = sp.rank(op.node)
        d = op.arg(1, "dim", 0) % r
        for p in parts:
            for e in range(r):
                if e != d:
                    sp.unify(p, e, op.node, e, f"by {op.describe()}")
        sp.structure(op.node, d, "sum", [(p, d) for p in parts], f"by {op.describe()}")


class Stack(Rule):
    """stack along a new dim d: every other dim of the output is that dim of each input; the new one (one index per
    input) stays whole."""

    nan_eval = True

    def couple(self, op: Op, sp: Spaces) -> None:
        parts = list(op.arg(0, "tensors"))
        r = sp.rank(op.node)
        d = op.arg(1, "dim", 0) % r
        for p in parts:
            if sp.rank(p) != r - 1:
                return  # frozen by the driver
            for e in range(r - 1):
                sp.unify(p, e, op.node, e if e < d else e + 1, f"by {op.describe()}")
        sp.freeze(op.node, d, f"stacked by {op.describe()}")  # (an index that went would take its input along)


class Split(Rule):
    """split/chunk along dim d into getitem outputs: the input's dim d is the concatenation of the parts."""

    def parts(self, op: Op, sp: Spaces) -> tuple[Node, int, list[int]]:
        x = op.node.args[0]
        t = op.target
        spec = node_spec(op.node)
        dim = op.arg(2, "dim", 0) if t not in ("chunk", torch.chunk, aten.chunk.default) else op.arg(2, "dim", 0)
        dim = dim % sp.rank(x)
        return x, dim, [s.shape[dim] for s in spec]

    def couple(self, op: Op, sp: Spaces) -> None:
        x, d, sizes = self.parts(op, sp)
        users = {u.args[1]: u for u in op.node.users if u.target is operator.getitem}
        if len(users) != len(op.node.users):
            return  # used as a whole: frozen
        for u in users.values():
            for e in range(sp.rank(x)):
                if e != d:
                    sp.unify(x, e, u, e, f"by {op.describe()}")
        # an empty piece (a tensor_split at the end of the dim) holds no part of it
        whole = [(n, users.get(i)) for i, n in enumerate(sizes) if n > 0]
        if len(whole) == 1:  # the one non-empty piece is the whole dim
            n, u = whole[0]
            if u is None:
                sp.meta_dim(x, d)
            else:
                sp.unify(x, d, u, d, f"by {op.describe()}")
            return
        pieces = [sp.fresh(n) if u is None else sp.of(u, d) for n, u in whole]
        sp.structure_atoms(sp.of(x, d), "sum", pieces, f"by {op.describe()}")

    def facts(self, op: Op, fx: Facts) -> list[DimFacts] | None:
        x, d, sizes = self.parts(op, fx.sp)
        if not fx.get(x):
            return None
        parts = torch.split(fx.materialize(x), sizes, dim=d)
        for u in op.node.users:
            if u.target is operator.getitem:
                fx.set(u, extract(parts[u.args[1]]))
        return None

    def rewrite(self, op: Op, rw: Rewrite) -> None:
        x, d, sizes = self.parts(op, rw.facts.sp)
        kept = torch.split(rw.kept(x, d), sizes)
        new = [int(k.sum()) for k in kept]
        if new == sizes:
            return
        if isinstance(op.target, torch._ops.OpOverload):
            rw.retarget(op, aten.split_with_sizes.default, (rw.new(x), new, d), {})
        else:
            rw.retarget(op, torch.split, (rw.new(x), new), {"dim": d})


class Unbind(Rule):
    """unbind along dim d into getitem outputs, one per index (timm's ``q, k, v = qkv.unbind(0)``): every other dim
    of the input is that dim of each output; dim d stays whole, as a select's does."""

    @staticmethod
    def dim(op: Op, sp: Spaces) -> int:
        return op.arg(1, "dim", 0) % sp.rank(op.node.args[0])

    def couple(self, op: Op, sp: Spaces) -> None:
        x, d = op.node.args[0], self.dim(op, sp)
        if any(u.target is not operator.getitem for u in op.node.users):
            return  # used as a whole: frozen by the driver
        sp.freeze(x, d, f"unbound by {op.describe()}")
        for u in op.node.users:
            for e in range(sp.rank(x)):
                if e != d:
                    sp.unify(x, e, u, e - (e > d), f"by {op.describe()}")

    def facts(self, op: Op, fx: Facts) -> list[DimFacts] | None:
        x = op.node.args[0]
        if not fx.get(x):
            return None
        parts = torch.unbind(fx.materialize(x), self.dim(op, fx.sp))
        for u in op.node.users:
            if u.target is operator.getitem:
                fx.set(u, extract(parts[u.args[1]]))
        return None


class Slice(Rule):
    """aten.slice / aten.select: a full slice passes through; a contiguous one with known bounds makes the sliced
    dim the concatenation of what comes before, the slice and what comes after (so ``x[..., :d/2]`` and
    ``x[..., d/2:]`` of rotary embeddings pair channel i with i + d/2); one with a step ``k`` that starts in the
    first ``k`` and runs to the end of a dim of a multiple of ``k`` (GPT-OSS's ``gate_up[..., ::2]`` and
    ``[..., 1::2]``) makes the dim the product of its output's channels and ``k`` phases (frozen): channel j goes
    with every position ``j * k + p``; any other (a bound read off a dynamic size, select) freezes its dim."""

    nan_eval = True

    @staticmethod
    def bounds(op: Op, n: int) -> tuple[int, int] | None:
        """(start, end) of a step-1 slice with int bounds, clamped into [0, n]; None otherwise."""
        start, end, step = op.arg(2, "start", None), op.arg(3, "end", None), op.arg(4, "step", 1)
        if step != 1 or not all(b is None or isinstance(b, int) for b in (start, end)):
            return None
        lo = 0 if start is None else (start + n if start < 0 else start)
        hi = n if end is None else (end + n if end < 0 else end)
        lo, hi = min(max(lo, 0), n), min(max(hi, 0), n)
        return (lo, hi) if lo < hi else None

    @staticmethod
    def stride(op: Op, n: int) -> int | None:
        """The step of a slice with a step > 1 that starts in ``[0, step)`` and runs to the end of a dim of ``n``, a
        multiple of the step (its rewrite changes nothing: the kept channels stay interleaved); None otherwise."""
        start, end, step = op.arg(2, "start", None), op.arg(3, "end", None), op.arg(4, "step", 1)
        start = 0 if start is None else start
        if not (isinstance(step, int) and step > 1 and isinstance(start, int) and 0 <= start < step and n % step == 0
                and (end is None or isinstance(end, int) and end >= n)):
            return None
        return step

    def couple(self, op: Op, sp: Spaces) -> None:
        x = op.node.args[0]
        r = sp.rank(x)
        d = op.arg(1, "dim", 0) % r
        if op.target is aten.select.int:
            sp.freeze(x, d, f"indexed by {op.describe()}")
            for e in range(r):
                if e != d:
                    sp.unify(x, e, op.node, e - (e > d), f"by {op.describe()}")
            return
        n = _shape(sp, x)[d]
        # a bound read off a dynamic size (a Node) is not known to cover the dim: partial, the dim freezes
        static = d not in sp.spec(x).dynamic
        span = self.bounds(op, n) if static else None
        step = self.stride(op, n) if static else None
        for e in range(r):
            if e != d:
                sp.unify(x, e, op.node, e, f"by {op.describe()}")
        why = f"by {op.describe()}"
        if span == (0, n):
            sp.unify(x, d, op.node, d, why)
        elif step is not None:
            phases = sp.fresh(step)
            sp.atoms.freeze(phases, f"the phases of a strided slice, {op.describe()}")
            sp.structure_atoms(sp.of(x, d), "prod", [sp.of(op.node, d), phases], why)
        elif span is None:
            sp.freeze(x, d, f"sliced by {op.describe()}")
            sp.freeze(op.node, d, f"sliced by {op.describe()}")
        else:
            lo, hi = span
            parts = ([sp.fresh(lo)] if lo else []) + [sp.of(op.node, d)] + ([sp.fresh(n - hi)] if hi < n else [])
            sp.structure_atoms(sp.of(x, d), "sum", parts, why)

    def facts(self, op: Op, fx: Facts) -> list[DimFacts] | None:
        """With a bound read off a dynamic size (Swin's ``x[:, :H, :W]`` after padding): the other dims' facts, as
        they are (a channel constant at every position is that constant at any of them); none of the sliced dim
        (which positions it keeps depends on the size)."""
        if not any(is_dynamic_scalar(a) for a in (*op.node.args, *op.node.kwargs.values())):
            return super().facts(op, fx)
        xf = fx.get(op.node.args[0])
        if xf is None or op.target is aten.select.int:
            return None
        d = op.arg(1, "dim", 0) % len(xf)
        return [_unknown(_shape(fx.sp, op.node)[d]) if e == d else f for e, f in enumerate(xf)]

    def rewrite(self, op: Op, rw: Rewrite) -> None:
        if op.target is aten.select.int:
            return
        x = op.node.args[0]
        d = op.arg(1, "dim", 0) % rw.facts.sp.rank(x)
        kept = rw.kept(x, d)
        span = self.bounds(op, kept.numel())
        if span is None or bool(kept.all()):
            return
        lo, hi = span
        start = int(kept[:lo].sum())
        rw.set_arg(op, 2, "start", start)
        rw.set_arg(op, 3, "end", start + int(kept[lo:hi].sum()))


class Matmul(Rule):
    """a @ b: the contracted dims of a and b are one space; it leaves the group only where a factor is 0."""

    factors = (0, 1)  # the positions of a and b

    def couple(self, op: Op, sp: Spaces) -> None:
        a, b = (op.node.args[i] for i in self.factors)
        ra, rb, ro = sp.rank(a), sp.rank(b), sp.rank(op.node)
        if ra < 2 or rb < 2:
            return
        sp.unify(a, ra - 1, b, rb - 2, f"contracted by {op.describe()}")
        sp.unify(a, ra - 2, op.node, ro - 2, f"by {op.describe()}")
        sp.unify(b, rb - 1, op.node, ro - 1, f"by {op.describe()}")
        for v, r in ((a, ra), (b, rb)):
            s = _shape(sp, v)
            for j in range(r - 2):
                i = j + ro - r
                if s[j] == _shape(sp, op.node)[i]:
                    sp.unify(v, j, op.node, i, f"by {op.describe()}")
                else:
                    sp.meta_dim(v, j)
        sp.exit(a, ra - 1, lambda fx: fx.dim(a, -1).zero() | fx.dim(b, -2).zero(), op.describe())

    def facts(self, op: Op, fx: Facts) -> list[DimFacts] | None:
        """As evaluated, and: a row of ``a`` that is zero gives a zero row of the product, a column of ``b`` that is
        zero a zero column, whatever the other factor (a finite factor times zeros, as :class:`Mul` holds:
        attention weights times a dead channel of v)."""
        out = nan_eval(op, fx)
        a, b = (op.node.args[i] for i in self.factors)
        ra, rb, ro = fx.sp.rank(a), fx.sp.rank(b), fx.sp.rank(op.node)
        if ra < 2 or rb < 2:
            return out
        for v, dv, do in ((a, -2, ro - 2), (b, -1, ro - 1)):
            if not fx.get(v):
                continue
            z = fx.dim(v, dv).zero()
            if bool(z.any()):
                out = list(out) if out else [_unknown(n) for n in _shape(fx.sp, op.node)]
                out[do] = out[do].with_zeros(z)
        return out


class Baddbmm(Matmul):
    """``baddbmm(input, batch1, batch2, beta=1, alpha=1)`` = beta * input + alpha * (batch1 @ batch2) (BLOOM adds
    its ALiBi bias to the attention scores so, WavLM its relative position bias): the product as :class:`Matmul`,
    ``input`` elementwise with the output (broadcast). A zero row of the product is no zero of the sum: its facts
    are the evaluation's only."""

    factors = (1, 2)

    def couple(self, op: Op, sp: Spaces) -> None:
        super().couple(op, sp)
        if isinstance(op.node.args[0], Node):
            _broadcast(op, sp, op.node.args[0])

    def facts(self, op: Op, fx: Facts) -> list[DimFacts] | None:
        return nan_eval(op, fx)  # (beta = 0 ignores a NaN input: the confirming run sees it)


class Repeat(Rule):
    """``x.repeat(*counts)`` tiles ``x``: output dim i is ``counts[i]`` copies of x's dim i, a product (copies,
    channels); ``repeat_interleave(x, count, dim)`` repeats each entry: a product (channels, copies). The copies
    are frozen (removing some would change a count the op holds); the channels inside each copy stay free, and the
    counts need no rewrite. Leading dims the counts add are copies; a tensor of counts, an ``output_size``, or
    ``repeat_interleave`` without a dim (it flattens) leave the op to the driver."""

    nan_eval = True
    sizes = True  # (a count may vary with the inputs: BLOOM repeats its ALiBi bias per example)

    def __init__(self, interleave: bool = False) -> None:
        self.interleave = interleave

    def couple(self, op: Op, sp: Spaces) -> None:
        x, out = op.node.args[0], _shape(sp, op.node)
        s = _shape(sp, x)
        if self.interleave:
            count, dim = op.arg(1, "repeats"), op.arg(2, "dim")
            if not isinstance(count, int) or dim is None or op.arg(3, "output_size") is not None:
                return
            counts = [1] * len(s)
            counts[dim % len(s)] = count
        else:
            counts = list(op.node.args[1:])
            if len(counts) == 1 and isinstance(counts[0], (list, tuple)):
                counts = list(counts[0])
            if len(counts) < len(s):
                return
        why = f"by {op.describe()}"
        lead = len(out) - len(s)
        for i in range(lead):
            sp.freeze(op.node, i, f"copies made {why}")
        for j, n in enumerate(s):
            i, c = j + lead, counts[j + lead]
            if isinstance(c, int) and c == 1:
                sp.unify(x, j, op.node, i, why)
            elif n == 0:  # (an empty dim: the driver freezes it)
                continue
            elif n == 1:
                sp.meta_dim(x, j)
                sp.freeze(op.node, i, f"copies made {why}")
            else:
                copies = sp.fresh(out[i] // n)
                sp.atoms.freeze(copies, f"copies made {why}")
                parts = [sp.of(x, j), copies] if self.interleave else [copies, sp.of(x, j)]
                sp.structure_atoms(sp.of(op.node, i), "prod", parts, why)


class Einsum(Rule):
    """``torch.einsum(equation, *operands)`` (``aten.einsum``: torch.export keeps it whole): the dims that carry one
    letter are one space (a size-1 dim broadcast against a larger one is frozen); a letter absent from the output
    is contracted, an exit that leaves the group only where a factor is 0 (a letter of one operand alone is summed:
    that operand must be 0). A letter repeated within one operand (a diagonal) and an ellipsis are frozen. The
    equation reads no size, so the call needs no change."""

    @staticmethod
    def terms(op: Op) -> tuple[list[Node], list[str], str] | None:
        """The operands, their letters and the output's letters; None where the rule does not apply."""
        eq, *rest = op.node.args
        operands = list(rest[0]) if rest and isinstance(rest[0], (list, tuple)) else rest  # (aten: a list, a path)
        if not isinstance(eq, str) or "." in eq or not operands or not all(isinstance(v, Node) for v in operands):
            return None
        eq = eq.replace(" ", "")
        lhs, arrow, out = eq.partition("->")
        ins = lhs.split(",")
        if not arrow:  # implicit output: the letters that appear once, in alphabetical order
            every = "".join(ins)
            out = "".join(sorted(c for c in set(every) if every.count(c) == 1))
        if len(ins) != len(operands) or not all(c.isalpha() for c in "".join(ins) + out):
            return None
        return operands, ins, out

    def couple(self, op: Op, sp: Spaces) -> None:
        t = self.terms(op)
        if t is None:
            return
        operands, ins, out = t
        why = f"by {op.describe()}"
        if any(sp.rank(v) != len(s) for v, s in zip(operands, ins)) or sp.rank(op.node) != len(out):
            return
        for letter in dict.fromkeys("".join(ins)):
            seen = [(v, s.index(letter)) for v, s in zip(operands, ins) if s.count(letter) == 1]
            if any(s.count(letter) > 1 for s in ins):
                continue  # a diagonal: frozen by the driver
            if letter in out:
                seen.append((op.node, out.index(letter)))
            size = max(_shape(sp, v)[d] for v, d in seen)
            whole = [(v, d) for v, d in seen if _shape(sp, v)[d] == size]
            if len(whole) != len(seen) and size != 1:
                continue  # a dim broadcast: its occurrences are frozen by the driver
            for v, d in whole[1:]:
                sp.unify(whole[0][0], whole[0][1], v, d, why)
            if letter not in out and len(whole) == len(seen):
                v0, d0 = whole[0]
                sp.exit(v0, d0, lambda fx, w=tuple(whole): _any_zero(fx, w), op.describe())

    def facts(self, op: Op, fx: Facts) -> list[DimFacts] | None:
        """As evaluated, and: a channel of an output letter that is zero in any operand is zero in the output,
        whatever the other factors (finite factors times zeros, as :class:`Matmul` holds)."""
        out = nan_eval(op, fx)
        t = self.terms(op)
        if t is None:
            return out
        operands, ins, letters = t
        if any(fx.sp.rank(v) != len(s) for v, s in zip(operands, ins)) or fx.sp.rank(op.node) != len(letters):
            return out
        shape = _shape(fx.sp, op.node)
        for v, s in zip(operands, ins):
            if not fx.get(v):
                continue
            for d, letter in enumerate(s):
                if letter in letters and s.count(letter) == 1 and _shape(fx.sp, v)[d] == shape[letters.index(letter)]:
                    z = fx.dim(v, d).zero()
                    if bool(z.any()):
                        out = list(out) if out else [_unknown(n) for n in shape]
                        out[letters.index(letter)] = out[letters.index(letter)].with_zeros(z)
        return out


def _any_zero(fx: Facts, where: tuple[tuple[Node, int], ...]) -> torch.Tensor:
    z = fx.dim(*where[0]).zero()
    for v, d in where[1:]:
        z = z | fx.dim(v, d).zero()
    return z


class SDPA(Rule):
    """scaled_dot_product_attention(q, k, v): q/k head_dim are contracted; v's head_dim is the output's."""

    def couple(self, op: Op, sp: Spaces) -> None:
        q, k, v = op.node.args[:3]
        y = op.node
        r = sp.rank(q)
        if not (sp.rank(k) == sp.rank(v) == r >= 3):
            return
        why = f"by {op.describe()}"
        sq, sk = _shape(sp, q), _shape(sp, k)
        for d in range(r - 2):
            sp.unify(q, d, y, d, why)
            if sk[d] == sq[d]:
                sp.unify(k, d, q, d, why)
            elif sk[d] and sq[d] % sk[d] == 0:  # grouped-query heads: query head i reads kv head i // n_rep
                sp.structure_atoms(sp.of(q, d), "prod", [sp.of(k, d), sp.fresh(sq[d] // sk[d])], why)
            sp.unify(k, d, v, d, why)
        sp.unify(q, r - 2, y, r - 2, why)
        sp.unify(k, r - 2, v, r - 2, why)
        sp.unify(q, r - 1, k, r - 1, why)
        sp.unify(v, r - 1, y, r - 1, why)
        sp.exit(q, r - 1, lambda fx: fx.dim(q, -1).zero() | fx.dim(k, -1).zero(), op.describe())
        mask = op.arg(3, "attn_mask")
        if isinstance(mask, Node):
            ms, ys = _shape(sp, mask), _shape(sp, y)[:-1] + (_shape(sp, k)[-2],)
            for j, n in enumerate(ms):
                i = j + len(ys) - len(ms)
                if n == ys[i] and i < r - 2:
                    sp.unify(mask, j, y, i, why)
                elif n == ys[i] and i == r - 2:
                    sp.unify(mask, j, q, r - 2, why)
                elif n == ys[i]:
                    sp.unify(mask, j, k, r - 2, why)
                else:
                    sp.meta_dim(mask, j)

    def facts(self, op: Op, fx: Facts) -> list[DimFacts] | None:
        """Each output row is a convex combination of v's rows: where v is constant along a head_dim channel,
        or over a whole head (a batch dim), so is the output."""
        v, y = op.node.args[2], op.node
        if op.arg(4, "dropout_p", 0.0) != 0.0 or not fx.get(v):
            return None
        r, sv, sy = fx.sp.rank(y), _shape(fx.sp, v), _shape(fx.sp, y)
        fill = {r - 1: fx.dim(v, -1)}
        for d in range(r - 2):
            if sv[d] == sy[d]:
                fill[d] = fx.dim(v, d)
        return _out_facts(op, fx.sp, fill)

    def rewrite(self, op: Op, rw: Rewrite) -> None:
        q = op.node.args[0]
        if bool(rw.kept(q, -1).all()) or op.arg(6, "scale") is not None:
            return
        rw.set_arg(op, 6, "scale", 1.0 / math.sqrt(_shape(rw.facts.sp, q)[-1]), kwarg_only=True)


class Creation(Passive):
    """Tensor creation from sizes (new_ones, zeros, full...): fresh dims, frozen by the driver."""


class Like(Elementwise):
    """``zeros_like(x)``, ``ones_like``, ``full_like``, ``empty_like``: a tensor of ``x``'s shape whose channel k
    sits where ``x``'s does (a channel goes from both, or from neither); its values read nothing of ``x``: the
    constant it is filled with, or none for ``empty_like``'s unset memory."""

    def facts(self, op: Op, fx: Facts) -> list[DimFacts] | None:
        if op.name == "empty_like":
            return None
        return super().facts(op, fx)


class MinMax(Elementwise):
    """``torch.min(a, b)`` / ``torch.max(a, b)`` (and the methods) as a symbolic trace records them: elementwise when
    the second operand is a tensor; otherwise a reduction (``torch.min(x, dim)``), which relates nothing (frozen)."""

    @staticmethod
    def _binary(op: Op) -> bool:
        other = op.node.args[1] if len(op.node.args) == 2 and not op.node.kwargs else None
        return isinstance(other, Node) and isinstance(other.meta.get("val"), torch.Tensor)  # (not a dim computed)

    def facts(self, op: Op, fx: Facts) -> list[DimFacts] | None:
        return super().facts(op, fx) if self._binary(op) else None

    def couple(self, op: Op, sp: Spaces) -> None:
        if self._binary(op):
            super().couple(op, sp)


class SymSize(Rule):
    """``aten.sym_size.int(x, d)``: reads the size of dim ``d`` of ``x`` (frozen: a size that changed would change
    what it computes) and nothing else of ``x``."""

    def couple(self, op: Op, sp: Spaces) -> None:
        x = op.node.args[0]
        read = self.sizes_read(op, x, sp)
        if read is not None:
            _read_sizes(op, sp, x, sp.rank(x), read)

    def sizes_read(self, op: Op, v: Node, sp: Spaces) -> set[int | None] | None:
        x, d = op.node.args[0], op.node.args[1]
        r = sp.rank(x)
        return {d % r} if x is v and isinstance(d, int) and r > 0 else None


def _read_sizes(op: Op, sp: Spaces, x: Node, r: int, read: set[int | None]) -> None:
    """The dims of ``x`` (rank ``r``) whose size ``op`` reads (every dim when ``read`` holds None) are frozen; ``op``
    reads the others as metadata only."""
    for e in range(r):
        if None in read or e in read:
            sp.freeze(x, e, f"its size is read by {op.describe()}")
        else:
            sp.meta_dim(x, e)


class Attribute(Rule):
    """A symbolic trace's tensor attributes and size reads. ``x.T`` / ``x.mT`` (``getattr``): every dim reversed /
    the last two swapped, as ``permute``. ``x.shape`` and ``x.size()`` / ``x.size(d)``: the dims whose size is
    read (``x.shape[d]``, ``x.size(d)``; every dim when the whole shape escapes) are frozen, like ``sym_size``;
    nothing else of ``x`` is read. ``x.dtype``, ``x.device``, ``x.ndim`` and the like read its metadata only. Any
    other attribute (``x.real``) relates nothing (frozen)."""

    nan_eval = True
    METADATA = frozenset({"dtype", "device", "ndim", "layout", "is_cuda", "is_floating_point", "requires_grad"})

    def couple(self, op: Op, sp: Spaces) -> None:
        x = op.node.args[0] if op.node.args else None
        r = sp.rank(x) if isinstance(x, Node) else -1
        if r <= 0:
            return
        attr = op.node.args[1] if op.node.op == "call_function" and len(op.node.args) == 2 else None
        if attr in self.METADATA:  # (what removing channels never changes)
            sp.meta_only(x)
            return
        if attr in ("T", "mT") and (attr == "T" or r >= 2):
            perm = list(range(r))[::-1] if attr == "T" else [*range(r - 2), r - 1, r - 2]
            for i, j in enumerate(perm):
                sp.unify(x, j, op.node, i, f"by {op.describe()}")
            return
        read = self.sizes_read(op, x, sp)
        if read is not None:
            _read_sizes(op, sp, x, r, read)

    def sizes_read(self, op: Op, v: Node, sp: Spaces) -> set[int | None] | None:
        x = op.node.args[0] if op.node.args else None
        r = sp.rank(x) if x is v else -1
        if r <= 0:
            return None
        if op.node.op == "call_function":
            if len(op.node.args) != 2 or op.node.args[1] != "shape":
                return None
            return {u.args[1] % r if u.target is operator.getitem and isinstance(u.args[1], int) else None
                    for u in op.node.users}
        d = op.arg(1, "dim")  # x.size(d) / x.size()
        return {d % r if isinstance(d, int) else None}


class Filled(Passive):
    """A tensor of one value everywhere, from a list of sizes (``aten.zeros``/``ones``/``full``/``empty`` and their
    ``new_*`` forms): every channel holds the same, so any dim may lose channels, the sizes following (a state that
    starts at zeros, as a recurrent scan's does). Sizes that are not plain ints or symbols keep it frozen."""

    def _sizes(self, op: Op) -> SizeArg | None:
        t = getattr(op.target, "overloadpacket", op.target)
        pos = 1 if t in (aten.new_zeros, aten.new_ones, aten.new_full, aten.new_empty) else 0
        sizes = op.arg(pos, "size")
        if not isinstance(sizes, (list, tuple)) or not all(isinstance(s, (int, Node)) for s in sizes):
            return None
        return SizeArg(pos, "size")

    def couple(self, op: Op, sp: Spaces) -> None:
        super().couple(op, sp)
        if self._sizes(op) is not None:
            for d in range(sp.rank(op.node)):
                sp.meta_dim(op.node, d)

    def facts(self, op: Op, fx: Facts) -> list[DimFacts] | None:
        t = getattr(op.target, "overloadpacket", op.target)
        value = {aten.zeros: 0.0, aten.new_zeros: 0.0, aten.ones: 1.0, aten.new_ones: 1.0}.get(t)
        if t in (aten.full, aten.new_full):
            value = op.arg(2 if t is aten.new_full else 1, "fill_value")
        shape = _shape(fx.sp, op.node)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not shape or not math.isfinite(value):
            return None
        return [DimFacts(torch.ones(n, dtype=torch.bool), torch.full((n,), float(value), dtype=torch.float64))
                for n in shape]

    def rewrite(self, op: Op, rw: Rewrite) -> None:
        where = self._sizes(op)
        if where is not None:
            rw.resize_sizes(op, where)


# ---------------------------------------------------------------------------------------------
# in-place activations an exported graph keeps (timm's ``act_layer(inplace=True)``: aten.leaky_relu_); the op's result
# is what later nodes read (torch.export re-points a mutated tensor at it); a symbolic trace's are checked at capture
_IN_PLACE_ACTIVATIONS = ["leaky_relu_", "elu_", "hardswish_", "hardsigmoid_", "mish_", "sigmoid_", "tanh_", "clamp_",
                         "clamp_min_", "clamp_max_"]
_ELEMENTWISE_MODULES = [nn.ReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Hardtanh, nn.ReLU6,
                        nn.Softplus, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Identity, nn.SELU, nn.CELU, nn.Tanhshrink,
                        nn.LogSigmoid, nn.Softsign, nn.Threshold]
_UNARY = ["relu", "gelu", "silu", "sigmoid", "tanh", "neg", "abs", "exp", "sqrt", "rsqrt", "erf", "clamp", "hardtanh",
          "leaky_relu", "elu", "hardswish", "hardsigmoid", "mish", "softplus", "clone", "alias", "detach", "detach_", "relu6",
          "log", "sin", "cos", "square", "reciprocal", "sign", "_to_copy", "lift_fresh_copy", "contiguous", "clamp_min",
          "clamp_max", "pow", "to", "relu_", "silu_", "gelu_", "hardtanh_", "selu", "celu", "log_sigmoid",
          "logsigmoid", "softsign", "threshold", "expm1", "log1p", *_IN_PLACE_ACTIVATIONS]
_BINARY = ["add", "sub", "div", "maximum", "minimum", "where", "rsub", "eq", "ne", "le", "lt", "ge", "gt",
           "__and__", "__or__", "logical_and", "logical_or", "logical_not", "bitwise_not", "add_", "masked_fill",
           "floor_divide", "remainder", "addcmul", "addcdiv", "lerp", "subtract", "divide",
           "true_divide"]  # (and three operands: ResMLP's affine is torch.addcmul(beta, alpha, x))


def _aten(*names: str) -> list[Any]:
    return [getattr(aten, n) for n in names if hasattr(aten, n)]


def _torch(*names: str) -> list[Any]:
    out = []
    for n in names:
        for ns in (torch, F):
            if hasattr(ns, n) and callable(getattr(ns, n)):
                out.append(getattr(ns, n))
    return out


# Elementwise ops that map a NaN entry of any operand to NaN (IEEE arithmetic, and the activations and clamps
# built on it): a channel their evaluation on NaN-filled operands finds constant read no unknown entry, so
# ``nan_eval`` skips its confirming run for them. Not here: what can turn NaN into a number (``sign``, ``pow``
# with exponent 0, ``where``, ``masked_fill``...). tests/test_soundness.py checks every elementwise op's facts on
# random inputs.
_NAN_TO_NAN_NAMES = ["relu", "gelu", "silu", "sigmoid", "tanh", "neg", "abs", "exp", "sqrt", "rsqrt", "erf", "log",
                     "expm1", "log1p",
                     "sin", "cos", "square", "reciprocal", "elu", "leaky_relu", "hardswish", "hardsigmoid", "mish",
                     "softplus", "relu6", "hardtanh", "clamp", "clamp_min", "clamp_max", "clone", "alias", "detach",
                     "contiguous", "_to_copy", "lift_fresh_copy", "add", "sub", "div", "rsub", "maximum", "minimum",
                     "subtract", "divide", "true_divide",
                     "relu_", "silu_", "gelu_", "hardtanh_", "add_", *_IN_PLACE_ACTIVATIONS]
_NAN_TO_NAN: set[Any] = {nn.ReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Hardtanh, nn.ReLU6,
                         nn.Softplus, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Identity,
                         operator.add, operator.sub, operator.truediv, operator.neg, operator.iadd,
                         *_NAN_TO_NAN_NAMES, *_aten(*_NAN_TO_NAN_NAMES), *_torch(*_NAN_TO_NAN_NAMES)}


def _nan_to_nan(op: Op) -> bool:
    key = type(op.module) if op.module is not None else getattr(op.target, "overloadpacket", op.target)
    return key in _NAN_TO_NAN


register(Elementwise(), *_ELEMENTWISE_MODULES, *_aten(*_UNARY, *_BINARY), *_torch(*_UNARY, *_BINARY),
         *[m for m in _UNARY + _BINARY + ["float", "double", "half", "bfloat16"] if m not in ("mul",)],
         operator.add, operator.sub, operator.truediv, operator.neg, operator.iadd, operator.pos, operator.pow,
         operator.gt, operator.lt, operator.ge, operator.le, operator.eq, operator.ne,  # (a symbolic trace's ``h > 0``)
         aten.min.other, aten.max.other)  # (``torch.min(a, b)``: Apertus' xIELU; not the reductions min.dim, max.dim)
register(MinMax(), torch.min, torch.max, "min", "max")
register(TypeAs(), aten.type_as, "type_as")
register(Mul(), aten.mul, aten.mul_, torch.mul, "mul", "mul_", operator.mul, operator.imul,
         aten.multiply, torch.multiply, "multiply")  # (ConvBERT's torch.multiply)
register(IndexSelect(), aten.index_select, torch.index_select, "index_select")
register(IndexRows(), aten.index.Tensor)
register(GroupedMM(), ByName("transformers.grouped_mm_fallback.default"), *_aten("_grouped_mm"))
register(Dropout(), nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
         F.dropout, aten.dropout, aten.dropout_, aten.feature_dropout, aten.alpha_dropout, aten.feature_alpha_dropout)
register(StochasticDepth(), ByName("torchvision.ops.stochastic_depth.stochastic_depth"))
register(Linear(), F.linear, aten.linear, aten.addmm.default)
register(Conv(), F.conv1d, F.conv2d, F.conv3d, aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution.default)
register(ConvTranspose(), F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, aten.conv_transpose1d,
         aten.conv_transpose2d, aten.conv_transpose3d)
register(Embedding(), F.embedding, aten.embedding)
register(BatchNorm(), F.batch_norm, aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default)
register(CompensatedNorm(), compensated_layer_norm, compensated_group_norm, compensated_rms_norm)
register(CompensatedStandardization(), compensated_standardization, STANDARDIZATION_OP)
register(Norm(), F.layer_norm, F.group_norm, aten.layer_norm, aten.native_layer_norm, aten.group_norm,
         aten.native_group_norm, aten.rms_norm, *([F.rms_norm] if hasattr(F, "rms_norm") else []))
register(Recurrent(), aten.lstm.input, aten.gru.input, aten.rnn_tanh.input, aten.rnn_relu.input)
register(Scan(), aten.cumsum, aten.cumprod, aten.logcumsumexp, aten.diff, torch.cumsum, torch.cumprod,
         torch.logcumsumexp, torch.diff, "cumsum", "cumprod", "logcumsumexp", "diff")
register(Triangle(), aten.triu, aten.tril, torch.triu, torch.tril, "triu", "tril")
register(PixelShuffle(), aten.pixel_shuffle, F.pixel_shuffle, nn.PixelShuffle)
register(PixelShuffle(inverse=True), aten.pixel_unshuffle, F.pixel_unshuffle, nn.PixelUnshuffle)
register(Unfold(), aten.im2col, F.unfold, nn.Unfold)
register(Unfold(fold=True), aten.col2im, F.fold, nn.Fold)
register(ChannelShuffle(), aten.channel_shuffle, aten.native_channel_shuffle, nn.ChannelShuffle,
         *([F.channel_shuffle] if hasattr(F, "channel_shuffle") else []))
register(GLU(), aten.glu, F.glu, nn.GLU)
register(PerChannel(weight=1), aten.prelu, F.prelu, torch.prelu)
register(PerChannel(weight=1, bias=2, running_mean=3, running_var=4), aten.instance_norm)
register(PerChannel(running_mean=1, running_var=2, weight=3, bias=4), F.instance_norm)
register(TupleGetItem(), operator.getitem)
register(Reduce(), aten.amax, aten.amin, aten.var, aten.std, aten.logsumexp,
         torch.amax, torch.amin, torch.var, torch.std, torch.logsumexp, "amax", "amin", "var", "std")
register(Reduce("mean"), aten.mean.dim, torch.mean, "mean")
register(Reduce("sum"), aten.sum.dim_IntList, torch.sum, "sum")
register(Reduce("norm", dim_pos=2, keepdim_pos=3), aten.linalg_vector_norm, torch.linalg.vector_norm, torch.norm, "norm")
register(Softmax(), aten._softmax, aten.softmax, aten._log_softmax, aten.log_softmax, F.softmax, F.log_softmax,
         torch.softmax, torch.log_softmax, "softmax", "log_softmax", compensated_softmax)
register(Pool(1), F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d, F.adaptive_max_pool1d, aten.max_pool1d,
         aten.avg_pool1d, aten.adaptive_avg_pool1d, nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d)
register(Pool(2), F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, aten.max_pool2d,
         aten.max_pool2d_with_indices, aten.avg_pool2d, aten.adaptive_avg_pool2d, aten._adaptive_avg_pool2d,
         nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
register(Pool(3), F.max_pool3d, F.avg_pool3d, F.adaptive_avg_pool3d, aten.max_pool3d, aten.avg_pool3d,
         aten.adaptive_avg_pool3d, nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d)
register(Resize(), F.interpolate, aten.upsample_nearest1d, aten.upsample_nearest2d, aten.upsample_nearest3d,
         aten._upsample_nearest_exact1d, aten._upsample_nearest_exact2d, aten._upsample_nearest_exact3d,
         aten.upsample_linear1d, aten.upsample_bilinear2d, aten.upsample_bicubic2d, aten.upsample_trilinear3d,
         aten._upsample_bilinear2d_aa, aten._upsample_bicubic2d_aa)
register(Pad(), F.pad, aten.pad, aten.constant_pad_nd, aten.reflection_pad1d, aten.reflection_pad2d,
         aten.reflection_pad3d, aten.replication_pad1d, aten.replication_pad2d, aten.replication_pad3d)
register(Reshape(), aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten, aten.squeeze,
         aten.unsqueeze, torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.unflatten,
         "view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze")
register(Permute(), aten.permute, aten.transpose, aten.t, aten.numpy_T, aten.movedim, aten.moveaxis, torch.permute, torch.transpose, torch.t,
         torch.swapaxes, torch.movedim, torch.moveaxis, "permute", "transpose", "t", "swapaxes", "movedim", "moveaxis")
register(Expand(), aten.expand, aten.expand_as, aten.broadcast_to, torch.broadcast_to, "expand", "expand_as",
         "broadcast_to")
register(ReshapeAs(), aten.reshape_as, aten.view_as, "reshape_as", "view_as")
register(Cat(), aten.cat, torch.cat, torch.concat, torch.concatenate)
register(Stack(), aten.stack, torch.stack)
register(Split(), aten.split.Tensor, aten.split_with_sizes, aten.chunk, aten.tensor_split.indices, torch.split, torch.chunk,
         "split", "chunk")
register(Slice(), aten.slice.Tensor, aten.select.int)
register(Unbind(), aten.unbind.int, torch.unbind, "unbind")
register(Einsum(), aten.einsum, torch.einsum)
register(Baddbmm(), aten.baddbmm, torch.baddbmm, "baddbmm")
register(Repeat(), aten.repeat, "repeat")
register(Repeat(interleave=True), aten.repeat_interleave.self_int, torch.repeat_interleave, "repeat_interleave")
register(Matmul(), aten.matmul, aten.mm, aten.bmm, torch.matmul, torch.mm, torch.bmm, operator.matmul, "matmul", "bmm", "mm")
register(SDPA(), aten.scaled_dot_product_attention, F.scaled_dot_product_attention)
register(Creation(), aten.arange, aten.scalar_tensor, torch.arange, "new_ones", "new_zeros", "new_full", "new_empty")
register(Like(), aten.zeros_like, aten.ones_like, aten.full_like, aten.empty_like, torch.zeros_like, torch.ones_like,
         torch.full_like, torch.empty_like)
register(Filled(), aten.new_ones, aten.new_zeros, aten.new_full, aten.new_empty, aten.zeros, aten.ones, aten.full,
         aten.empty)
register(AssertMetadata(), aten._assert_tensor_metadata.default)
register(WeightNorm(), aten._weight_norm.default)
register(SymSize(), aten.sym_size.int)
register(Attribute(), getattr, "size")
register(InputGuards(), GuardsFn)
