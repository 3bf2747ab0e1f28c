"""``minimize``: the exact structural rewrite.

Channels that no use can tell apart from a constant are deleted from every tensor of their group: rows of
producers, columns of consumers, entries of per-channel parameters, sizes in reshapes. Constants of removed
channels are folded into the consumers' biases where that is exact. The rewrite repeats to a fixed point
(removing channels exposes new dead ones) and checks its own result: a failed check raises
:class:`~fxprune.errors.EquivalenceError` and returns nothing.
"""
from __future__ import annotations

import copy
import operator
import warnings
from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
from torch import nn
from torch.fx import GraphModule, Node
from torch.utils import _pytree as pytree

from fxprune.analysis.groups import Analysis, reads_whole
from fxprune.analysis.rule import FULL_MEAN, GHOST_PREFIX, GHOST_SUM, Facts, Op, SizeArg, aligned_dim
from fxprune.compare import (cast, check, compare, first_failure, own_rounding, precision_of, rounding_only, rtol_for,
                             to_dtype, within_own_rounding, worst)
from fxprune.errors import EquivalenceError, InputError, require
from fxprune.graph.capture import EXAMPLE_INPUTS_KEY, as_inputs, capture, check_weights
from fxprune.graph.origin import blame_capture, fresh_outputs, origin_model, reference_outputs, takes
from fxprune.graph.dynamic import DYNAMIC_KEY, shape_str, shaped_inputs
from fxprune.graph import lazy
from fxprune.graph.scan import BLOCK_BYTES
from fxprune.graph.rebuild import GraphCopy, accelerator, get_attr, graph_module, rebuild
from fxprune.graph.shapes import annotate, is_annotated, placeholder_inputs
from fxprune.passes.lower import lower_modules
from fxprune.graph.exported import Program, exported_io
from fxprune.verify import random_inputs

__all__ = ["minimize", "self_check", "float64_twin", "MinimizeOptions", "ShapeCheck", "NothingRemovedWarning", "CHECKS_KEY", "KEPT_KEY"]

aten = torch.ops.aten
CHECKS_KEY = "fxprune_checks"  # result meta: the self-check's ShapeChecks
SITE_BIASES_KEY = "fxprune_site_biases"  # result meta: {bias minimize gave one call site of a shared layer: the shared bias}
ROUNDED_KEY = "fxprune_rounded"  # result meta with round_to > 1: per group, its width and the widths kept before/after
SUBNORMALS_KEY = "fxprune_subnormals"  # result meta: {tensor: subnormal floats in it} (and what flushing them moved)
SELECT_PREFIX = "fxprune_select_"  # get_attr targets of the kept positions a split norm's output is read at
INPUT_PREFIX = "fxprune_input_"  # get_attr targets of the kept channels of a model input (read through index_select)
KEPT_KEY = "fxprune_kept"  # result meta: {get_attr target: [None (all kept) or kept indices of the input's tensor, per dim]}
HEADS_KEY = "fxprune_heads"  # result meta with equal_heads: {"tensor:dim": [(heads, head dim) per part] of the input}


@dataclass(frozen=True)
class ShapeCheck:
    """One shape the self-check compared the result at, and the largest relative error over the outputs."""

    shapes: str
    max_rel: float


@dataclass(frozen=True)
class MinimizeOptions:
    verify: bool = True
    max_iterations: int = 32
    rtol: float | None = None  # self-check: max |a - b| <= rtol * max |a|; None: the graph's precision's (compare.rtol_for)
    keep: tuple[tuple[str, str], ...] = ()  # (parameter or buffer name, reason): every channel of it stays
    round_to: int = 1  # every group that loses channels keeps a multiple of this many (or all of them)
    flush_subnormals: bool = False  # zero the result's subnormal floats (not exact: the report says how far)
    # per attention, (its head width, the "tensor:dim"s that may hold its heads, q/k/v): in each set the dims that
    # hold heads of that width (heads x head dim, or one head) keep one head width, the widest of them (a class
    # that reshapes q, k and v with one head width); dims of another width (an output projection) are left out
    equal_heads: tuple[tuple[int, tuple[str, ...]], ...] = ()
    # "tensor:dim"s whose heads stay whole: every channel inside a head stays and only whole heads (or kv groups)
    # go (a class whose head width is also read elsewhere, as rotary tables are)
    whole_heads: tuple[str, ...] = ()
    # ("tensor:dim", k): every group of that dim keeps a multiple of k channels (or all of them), as ``round_to``
    # does for every group; minimize_module aligns stacked expert weights so (torch's grouped_mm, which a mixture
    # of experts calls in eager code, needs rows of a multiple of 16 bytes)
    aligned: tuple[tuple[str, int], ...] = ()
    # a LayerNorm / RMSNorm output channel nothing reads goes even where its input channel stays (read by the
    # statistics): the graph selects the kept outputs after the norm (fxprune.analysis.groups.Analysis); off for
    # modules of the user's class, which cannot
    split_norms: bool = True
    # model inputs (placeholder names; True: every one) a channel may go from where no layer's weight reads it: the
    # graph reads the rest through index_select (fxprune.analysis.groups.input_channels says which inputs can)
    inputs: bool | tuple[str, ...] = True
    # every split of a tensor into parts of one size (``split(int)``, ``chunk``) keeps one width for its parts, the
    # widest part's (eager code that computes the parts' size from one number: minimize_module sets it)
    equal_splits: bool = False


class Rewriter:
    """Copies a graph node by node, letting each rule adjust its node, then slices every parameter. Implements
    :class:`fxprune.analysis.rule.Rewrite`, the protocol rules rewrite through."""

    def __init__(self, gm: GraphModule, an: Analysis, keep: dict[int, torch.Tensor]) -> None:
        self.gm, self.an, self.keep = gm, an, keep
        self.copy = GraphCopy(gm.graph)
        self.graph, self.env = self.copy.graph, self.copy.env
        self.deltas: dict[str, torch.Tensor] = {}
        self.created: dict[str, torch.Tensor] = {}
        self.buffers: set[str] = set()  # created targets that are constants, not trainable
        self.attr_targets = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        self.sites: dict[str, tuple[Node, torch.Tensor]] = {}  # per-site biases of shared layers: (bias, delta)
        self._readers: dict[str, set[Node]] | None = None

    @property
    def facts(self) -> Facts:
        return self.an.facts

    def kept(self, v: Node, d: int) -> torch.Tensor:
        return self.an.kept(v, d % self.an.spaces.rank(v), self.keep)

    def new(self, v: Any) -> Any:
        return self.env[v] if isinstance(v, Node) else v

    def set_arg(self, op: Op, pos: int, name: str, value: Any, kwarg_only: bool = False) -> None:
        n = self.env[op.node]
        if not kwarg_only and pos < len(n.args):
            args = list(n.args)
            args[pos] = value
            n.args = tuple(args)
        elif not kwarg_only and pos == len(n.args) and name not in n.kwargs:
            n.args = tuple(n.args) + (value,)
        else:
            n.kwargs = {**n.kwargs, name: value}

    def retarget(self, op: Op, target: Any, args: tuple, kwargs: dict) -> None:
        n = self.env[op.node]
        n.op, n.target, n.args, n.kwargs = "call_function", target, args, kwargs

    def add_to_bias(self, op: Op, bias: Node | None, pos: int, name: str, delta: torch.Tensor, out_dim: int) -> None:
        """Add ``delta`` (original channel indexing) to the op's bias, creating one if it has none."""
        if isinstance(bias, Node) and bias.op == "get_attr":
            key = bias.target
            if self.readers(key) <= {op.node}:
                self.deltas[key] = self.deltas.get(key, 0) + delta
                return
            # a bias read at other sites too (a layer applied more than once): the constants folded here are this
            # site's alone, so this site gets a bias of its own and the others keep theirs
            site = f"{op.node.name}_site_bias"
            if site in self.sites:
                self.sites[site] = (bias, self.sites[site][1] + delta)
                return
            self.sites[site] = (bias, delta)
            with self.graph.inserting_before(self.env[op.node]):
                attr = self.graph.get_attr(site)
            self.set_arg(op, pos, name, attr)
            return
        if bias is not None:  # pragma: no cover - the rules tolerate folds into get_attr biases only
            raise EquivalenceError(f"cannot fold a constant into the computed bias of {op.describe()}")
        target = f"{op.node.name}_folded_bias"
        self.created[target] = delta.to(self.an.spaces.spec(op.node).dtype)[self.kept(op.node, out_dim)]
        n = self.env[op.node]
        with self.graph.inserting_before(n):
            attr = self.graph.get_attr(target)
        self.set_arg(op, pos, name, attr)

    def readers(self, target: str) -> set[Node]:
        """The nodes that read the tensor at ``target`` (through any get_attr of it or of a tensor tied to it)."""
        if self._readers is None:
            self._readers = {}
            for n in self.gm.graph.nodes:
                if n.op == "get_attr":
                    key = self.an.spaces.param_key.get(n.target, n.target)
                    self._readers.setdefault(key, set()).update(n.users)
        return self._readers.get(self.an.spaces.param_key.get(target, target), set())

    def kept_indices(self, node: Node, t: torch.Tensor) -> list[torch.Tensor | None]:
        """Per dim of the tensor ``t`` at ``node``: the kept indices, or None where every index is kept."""
        out: list[torch.Tensor | None] = [None] * t.dim()
        for d in range(t.dim()):
            k = self.kept(node, d)
            if not bool(k.all()):
                out[d] = k.nonzero().flatten()
        return out

    def constant(self, prefix: str, value: torch.Tensor) -> Node:
        """A get_attr node (inserted at the current point) holding a new tensor under a fresh target."""
        i = 0
        while f"{prefix}{i}" in self.attr_targets or f"{prefix}{i}" in self.created:
            i += 1
        self.created[f"{prefix}{i}"] = value
        self.buffers.add(f"{prefix}{i}")
        return self.graph.get_attr(f"{prefix}{i}")

    def buffer(self, op: Op, name: str, value: torch.Tensor) -> Node:
        with self.graph.inserting_before(self.env[op.node]):
            return self.constant(f"{op.node.name}_{name}_", value)

    def compensate_sum(self, op: Op, x: Node, d: int, removed: torch.Tensor, keepdim: bool, mean: bool) -> None:
        """Replace ``sum``/``mean`` of ``x`` over dim ``d`` by the sum over the kept channels plus the removed
        channels' contribution, replayed from their constants (:meth:`Facts.ghost`); a mean divides by the
        original width."""
        n = self.env[op.node]
        aten_level = isinstance(op.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket))
        if aten_level:
            sum_, add, mul, div = aten.sum.dim_IntList, aten.add.Tensor, aten.mul.Tensor, aten.div.Tensor
        else:
            sum_, add, mul, div = torch.sum, operator.add, operator.mul, operator.truediv

        def reduce(v: Node) -> Node:
            if aten_level:
                return self.graph.call_function(sum_, (v, [d], keepdim))
            return self.graph.call_function(sum_, (v, d), {"keepdim": keepdim})

        with self.graph.inserting_before(n):
            total = reduce(self.env[x])
            ghost, counts = self._ghost(op, x, d, removed)
            if ghost is not None:
                if counts is not None:
                    ghost = self.graph.call_function(mul, (ghost, counts))
                total = self.graph.call_function(add, (total, reduce(ghost)))
                total.meta[GHOST_SUM] = True
            if mean:
                total = self.graph.call_function(div, (total, self.an.spaces.spec(x).shape[d]))
                total.meta[FULL_MEAN] = d
        self.env[op.node] = total
        self.graph.erase_node(n)

    def select_after(self, op: Op, target: Any, args: tuple, d: int, positions: torch.Tensor, weight: Any,
                     bias: Any) -> None:
        n = self.env[op.node]
        aten_level = isinstance(op.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket))
        select, mul, add = ((aten.index_select.default, aten.mul.Tensor, aten.add.Tensor) if aten_level
                            else (torch.index_select, operator.mul, operator.add))
        n.op, n.target, n.args, n.kwargs = "call_function", target, args, {}
        with self.graph.inserting_after(n):
            index = self.constant(SELECT_PREFIX, positions)
        with self.graph.inserting_after(index):
            out = self.graph.call_function(select, (n, d, index))
        for operand, fn in ((weight, mul), (bias, add)):
            if isinstance(operand, Node):
                with self.graph.inserting_after(out):
                    out = self.graph.call_function(fn, (out, self.new(operand)))
        self.env[op.node] = out

    def select_inputs(self) -> dict[Node, Node]:
        """Each model input that loses channels (``Analysis.inputs``) is read from here on through
        ``index_select`` of its kept channels, held as a constant (``INPUT_PREFIX``). Returns {input: its copy}."""
        out: dict[Node, Node] = {}
        for node, d in ((n, self.an.inputs[n.name]) for n in self.gm.graph.nodes
                        if n.op == "placeholder" and n.name in self.an.inputs):
            kept = self.kept(node, d)
            if bool(kept.all()):
                continue
            aten_level = any(isinstance(u.target, torch._ops.OpOverload) for u in node.users)
            index = self.constant(INPUT_PREFIX, kept.nonzero().flatten())
            out[node] = self.env[node]
            self.env[node] = self.graph.call_function(aten.index_select.default if aten_level else torch.index_select,
                                                      (out[node], d, index))
        return out

    def _ghost(self, op: Op, x: Node, d: int, removed: torch.Tensor) -> tuple[Node | None, Node | None]:
        """Nodes computing the removed channels of ``x`` (dim ``d``), one per distinct tuple of constants they
        depend on, and the multiplicity of each (None when all are 1). (None, None) when they are all zero."""
        fx, sp = self.facts, self.an.spaces
        idx = removed.nonzero().flatten()
        leaves: dict[Node, tuple[int, torch.Tensor]] = {}
        replay: dict[Node, int] = {}
        stack = [(x, d)]
        while stack:
            v, dv = stack.pop()
            if v in leaves or v in replay:
                continue
            f = fx.dim(v, dv)
            if bool(f.known[idx].all()):
                leaves[v] = (dv, f.value[idx])
                continue
            if not bool(fx.ghost(v, dv)[idx].all()):  # pragma: no cover - the exit tolerated only ghosts
                raise EquivalenceError(f"cannot recompute removed channels of '{v.name}' for {op.describe()}")
            replay[v] = dv
            stack.extend((a, j) for a in v.all_input_nodes if (j := aligned_dim(sp, a, v, dv)) is not None)
        if x in leaves and not bool(leaves[x][1].any()):
            return None, None
        order = list(leaves)
        table = torch.stack([leaves[v][1] for v in order], dim=1)
        rows, counts = torch.unique(table, dim=0, return_counts=True)
        emitted: dict[Node, Node] = {}
        for i, v in enumerate(order):
            dv, _ = leaves[v]
            shape = [1] * sp.rank(v)
            shape[dv] = rows.shape[0]
            emitted[v] = self.constant(GHOST_PREFIX, rows[:, i].reshape(shape).to(sp.spec(v).dtype))

        def emit(v: Node) -> Node:  # operands first: the replayed chain is short, so is the recursion
            if v not in emitted:
                def sub(a: Node) -> Node:
                    return emit(a) if aligned_dim(sp, a, v, replay[v]) is not None else self.env[a]

                emitted[v] = self.graph.create_node(v.op, v.target, torch.fx.node.map_arg(v.args, sub),
                                                    torch.fx.node.map_arg(v.kwargs, sub), name=f"{v.name}_ghost")
            return emitted[v]

        count_node = None
        if bool((counts != 1).any()):
            shape = [1] * sp.rank(x)
            shape[d] = rows.shape[0]
            count_node = self.constant(GHOST_PREFIX, counts.reshape(shape).to(sp.spec(x).dtype))
        return emit(x), count_node

    def resize_sizes(self, op: Op, where: SizeArg) -> None:
        """Replace the int sizes at ``where`` by the kept counts of the output dims they size; symbolic sizes
        (sym_size nodes) stay symbolic, in the new graph."""
        n, node = self.env[op.node], op.node
        rank = self.an.spaces.rank(node)
        sizes = list(node.args[where.pos:]) if where.varargs else op.arg(where.pos, where.name)
        if not isinstance(sizes, (list, tuple)):
            return
        new = [self.new(s) for s in sizes]
        changed = False
        for i, s in enumerate(sizes):
            d = where.first + i
            if isinstance(s, int) and s != -1 and d < rank and (k := int(self.kept(node, d).sum())) != s:
                new[i], changed = k, True
        if not changed:
            return
        if where.varargs:
            n.args = (*n.args[:where.pos], *new)
        else:
            self.set_arg(op, where.pos, where.name, new)

    def run(self) -> GraphModule:
        cut: dict[Node, Node] = {}  # model inputs that lose channels: their copies, read through a selection
        last = next((n for n in reversed(self.gm.graph.nodes) if n.op == "placeholder"), None)
        for node in self.gm.graph.nodes:
            self.copy.copy(node)
            if node is last:
                cut = self.select_inputs()  # (after every placeholder, before what reads them)
            rule = self.an.rules.get(node.name)
            if rule is not None:
                rule.rewrite(Op(node, self.gm), self)
        for node, raw in cut.items():  # what reads only the input's metadata or sizes (export's shape guards,
            for user in node.users:   # sym_size) reads the input as the model takes it
                rule = self.an.rules.get(user.name)
                if rule is not None and reads_whole(rule, Op(user, self.gm), node, self.an.spaces):
                    self.env[user].replace_input_with(self.env[node], raw)
        erased: set[Node] = set()
        for site, (bias, delta) in self.sites.items():
            t = get_attr(self.gm, bias.target)
            self.created[site] = lazy.select(t, delta, self.kept_indices(bias, t))
            copy_ = self.env[bias]
            if copy_.graph is self.graph and not copy_.users and copy_ not in erased:  # every site has its own now
                self.graph.erase_node(copy_)
                erased.add(copy_)
        home = accelerator(self.gm)
        tensors: dict[str, torch.Tensor] = {k: t if home is None else t.to(home) for k, t in self.created.items()}
        kept = {k: list(v) for k, v in self.gm.meta.get(KEPT_KEY, {}).items()}
        by_key: dict[str, torch.Tensor] = {}  # tied targets share one tensor
        for node in self.gm.graph.nodes:
            if node.op != "get_attr" or node.target in tensors:
                continue
            key = self.an.spaces.param_key.get(node.target, node.target)
            if key in by_key:
                tensors[node.target] = by_key[key]
                continue
            t = get_attr(self.gm, node.target)
            if not isinstance(t, torch.Tensor):
                continue
            prev = kept.get(node.target)
            idxs = self.kept_indices(node, t)
            for d, idx in enumerate(idxs):
                if idx is not None:
                    if prev is None:
                        prev = kept[node.target] = [None] * t.dim()
                    prev[d] = idx if prev[d] is None else prev[d][idx]  # indices into the original tensor
            delta = self.deltas.get(node.target)
            if delta is not None or any(i is not None for i in idxs):
                t = lazy.select(t, delta, idxs)  # a weight left on disk records the step instead (streamed path)
            tensors[node.target] = by_key[key] = t
        out = rebuild(self.gm, self.graph, tensors, self.buffers, copy_if=lambda t: False)  # see minimize: _detach
        out.meta[KEPT_KEY] = kept
        out.meta[SITE_BIASES_KEY] = {site: bias.target for site, (bias, _) in self.sites.items()}
        out.graph.lint()
        annotate(out, placeholder_inputs(out), out.meta.get(DYNAMIC_KEY))
        return out


def _prepare(gm: GraphModule, inputs: tuple[Any, ...] | None) -> GraphModule:
    own = DYNAMIC_KEY not in gm.meta and inputs is not None
    if own:  # a GraphModule the user traced: an annotated copy first (lowering reads shapes: a trace's indexing)
        gm = capture(gm, inputs)
    work = lower_modules(gm)
    if work is gm and not own:  # never annotate the caller's graph in place
        work = graph_module(gm, copy.deepcopy(gm.graph), gm.__class__.__name__)
        work.meta.update(gm.meta)
    if not is_annotated(work) or DYNAMIC_KEY not in work.meta:
        if inputs is None:
            raise InputError("the graph has no shape annotations: pass example_inputs (or capture it with fp.capture)")
        annotate(work, inputs, work.meta[DYNAMIC_KEY])
    return work


@exported_io
def minimize(gm: Program, example_inputs: Sequence[Any] | None = None, *, verify: bool = True,
             round_to: int = 1, options: MinimizeOptions | None = None) -> Program:
    """Delete every channel that provably does not affect the output; return a new, smaller GraphModule.

    ``round_to=k``: every channel group that loses channels keeps a multiple of ``k`` of them (or all of them),
    by keeping some that could go (first those whose removal folds no constant into a bias, then the
    lowest-numbered), so that the widths the kernels see are multiples of ``k`` (the blocks of 8 or 16 channels
    XNNPACK, oneDNN and onnxruntime's NCHWc kernels work in). A width that is a sum of groups (a concatenation, a
    fused q/k/v) or a product (heads x head dim) is then a multiple of ``k`` too; groups that lose nothing keep
    their width as it is. Pass it in ``options`` when giving ``options``.

    >>> import torch, fxprune as fp
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> with torch.no_grad(): net[0].weight[:5] = 0; net[0].bias[:5] = -1.0   # 5 dead neurons
    >>> small = fp.minimize(fp.capture(net, (torch.randn(3, 4),)))
    >>> tuple(small.get_parameter("0.weight").shape)
    (3, 4)
    """
    if options is not None and (verify is not True or round_to != 1):
        raise InputError("give verify and round_to inside options (MinimizeOptions(verify=..., round_to=...)), or "
                         "drop options")
    opts = options or MinimizeOptions(verify=verify, round_to=round_to)
    require("round_to", opts.round_to, "positive integer")
    inputs = as_inputs(example_inputs, gm) if example_inputs is not None else gm.meta.get(EXAMPLE_INPUTS_KEY)
    check_weights(gm, "minimize")
    accelerator(gm)  # one device, or a typed error before any work
    work = work_ref = _prepare(gm, inputs)
    work.meta.pop(KEPT_KEY, None)  # (a previous minimize's: indices here are into this call's input)
    widths: list[dict[str, Any]] = []
    layout: dict[str, list[tuple[int, int]]] = {}
    bad = [repr(e) for e in opts.equal_heads if not (isinstance(e, tuple) and len(e) == 2 and isinstance(e[0], int)
                                                    and all(k.rpartition(":")[2].isdigit() for k in e[1]))]
    if bad:
        raise InputError(f"equal_heads takes (head width, ('name:dim', ...)) per attention, got {bad[0]}")
    bad = ([repr(opts.whole_heads)] if isinstance(opts.whole_heads, str) else
           [repr(k) for k in opts.whole_heads if not (isinstance(k, str) and k.rpartition(":")[2].isdigit())])
    if bad:
        raise InputError(f"whole_heads takes a tuple of 'name:dim' strings (a tensor of the graph and the dim "
                         f"that holds its heads), got {bad[0]}")
    bad = [repr(e) for e in opts.aligned if not (isinstance(e, tuple) and len(e) == 2 and isinstance(e[0], str)
                                                 and e[0].rpartition(":")[2].isdigit() and type(e[1]) is int
                                                 and e[1] > 0)]
    if bad:
        raise InputError(f"aligned takes ('name:dim', k) pairs (a tensor of the graph, one of its dims, a positive "
                         f"integer), got {bad[0]}")
    with torch.no_grad():
        for i in range(opts.max_iterations):
            an = Analysis(work, dict(opts.keep), split_norms=opts.split_norms, inputs=opts.inputs)
            removable = an.removable()
            free = an.fold_free() if opts.round_to > 1 or opts.equal_heads or opts.aligned or opts.equal_splits else {}
            keep = rounded(removable, opts.round_to, free)
            if opts.aligned:
                keep = aligned(an, keep, opts.aligned, free)
            if i == 0:  # the split parameter dims (named: a round renames the split nodes)
                splits = tuple((width, (k,)) for width, k in an.equal_splits()) if opts.equal_splits else ()
            if opts.equal_heads or splits:
                if i == 0:  # the dims that hold heads of their attention's width (one head: no product), and the
                    # parts of splits
                    parted = {k: [(h, leaf.size) for h, leaf in parts]
                              for width, ks in opts.equal_heads + splits for k in ks
                              for parts in [an.heads(*_tensor_dim(k), single=True) or []]
                              if parts and all(leaf.size == width for _, leaf in parts)}
                    layout = {k: parts for k, parts in parted.items()
                              if any(k in ks for _, ks in opts.equal_heads)}
                keep = equal_heads(an, keep, [ks for _, ks in opts.equal_heads + splits], free, set(parted))
            if opts.whole_heads:
                if i == 0:  # the dims that hold heads (one head where a later round leaves one), and those that
                    # hold one head of their attention's width already (a kv projection an earlier call left one)
                    whole = [k for k in opts.whole_heads if an.head_dim_leaves(*_tensor_dim(k)) is not None
                             or k in layout]
                keep = whole_heads(an, keep, whole)
            keep = an.implied(keep)  # (rounding keeps more: a split norm's input keeps what its output keeps)
            if opts.round_to > 1:
                widths += _widths(an, removable, keep, i == 0)
            if not keep:
                if i == 0:
                    _warn_opaque(an)
                break
            work = Rewriter(work, an, keep).run()
        else:  # pragma: no cover - would need > max_iterations cascades
            raise EquivalenceError(f"minimize did not reach a fixed point in {opts.max_iterations} iterations")
    theirs = _storages(gm)
    written = {n for n, t in [*work.named_parameters(), *work.named_buffers()]
               if t.numel() and not t.is_meta and t.untyped_storage().data_ptr() not in theirs}
    result = _detach(work, theirs)
    result.meta[SUBNORMALS_KEY] = subnormals(result, opts.flush_subnormals, written)
    if opts.round_to > 1:
        result.meta[ROUNDED_KEY] = widths
    if opts.equal_heads:
        result.meta[HEADS_KEY] = layout
    if opts.verify:
        if inputs is None:
            inputs = random_inputs(placeholder_inputs(result), torch.Generator().manual_seed(0))
        dims = work_ref.meta.get(DYNAMIC_KEY)
        try:
            checks = self_check(gm, result, inputs, opts, dims)
        except EquivalenceError as e:
            result, checks = _proved_by_twin(gm, work_ref, inputs, opts, dims, written, e)
        result.meta[CHECKS_KEY] = checks
    return result


def _proved_by_twin(gm: GraphModule, work: GraphModule, inputs: tuple[Any, ...], opts: MinimizeOptions, dims: Any,
                    written: set[str], error: EquivalenceError) -> tuple[GraphModule, list[ShapeCheck]]:
    """The float32 copy of :func:`float64_twin` of ``work`` (``gm`` prepared, its input dims ``dims``) and its
    checks against the twin, where they pass; else ``error`` (the float32 result's) is raised."""
    exact = float64_twin(work, inputs, opts) if error.rounding else None
    if exact is not None:
        try:
            result = to_dtype(exact, torch.float32)
            annotate(result, cast(placeholder_inputs(exact), torch.float32), dims)
            result.meta[SUBNORMALS_KEY] = subnormals(result, False, written)
            return result, self_check(gm, result, inputs, opts, dims, exact)
        except Exception:  # noqa: BLE001 (the twin does not run or pass either: the float32 result's error stands)
            pass
    raise error


def float64_twin(gm: GraphModule, inputs: tuple[Any, ...], opts: MinimizeOptions) -> GraphModule | None:
    """``minimize`` (unchecked, ``opts`` otherwise) of a float64 copy of ``gm``, a graph that computes in float32
    (its tensors and floating inputs float32, no other tolerance asked, no subnormals flushed); None otherwise, or
    where the copy does not minimize.

    The self-check's last resort for a model so sensitive that rounding constants to float32 moves its float64
    output past :func:`fxprune.compare.stored_rtol`, exact rewrite or not (an untrained MobileNetV2 with BatchNorm:
    6.8e-6 with its folded biases rounded once; its own float32 error is 1.9e-2). Its float32 copy is then the
    candidate, checked against the twin (:func:`fxprune.compare.rounding_only`): the twin within 1e-9 of the
    model in float64, the copy's tensors the twin's rounded to float32, its float32 outputs within the model's own
    rounding."""
    floats = [t for t in [*gm.state_dict().values(), *pytree.tree_leaves(inputs)]
              if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if (precision_of(gm) != torch.float32 or opts.rtol is not None or opts.flush_subnormals
            or any(t.dtype != torch.float32 for t in floats)):
        return None
    twin = to_dtype(gm, torch.float64)
    try:
        annotate(twin, cast(inputs, torch.float64), gm.meta.get(DYNAMIC_KEY))
        return minimize(twin, options=replace(opts, verify=False))
    except Exception:  # noqa: BLE001 (a graph that does not run in float64: nothing confirms the rewrite)
        return None


def subnormals(m: nn.Module, flush: bool = False, names: set[str] | None = None) -> dict[str, dict[str, Any]]:
    """Per floating parameter or buffer of ``m`` that holds subnormal values (nonzero, smaller in magnitude than the
    dtype's smallest normal number: folded constants can land there, and CPUs without flush-to-zero compute with
    them tens of times slower): how many, and the largest. ``flush=True`` sets them to zero in place
    (``"flushed": True``): the function moves by at most those values times what reads them. ``names``: only those
    tensors (``minimize`` reads the ones it wrote, not the unchanged ones it copied from its input)."""
    out: dict[str, dict[str, Any]] = {}
    tensors = dict(m.named_parameters())
    tensors.update(m.named_buffers())
    for name, t in tensors.items():
        if names is not None and name not in names:
            continue
        if not t.is_floating_point() or t.is_meta or not _any_subnormal(t.detach()):
            continue
        tiny = torch.finfo(t.dtype).tiny
        sub = (t != 0) & (t.abs() < tiny)
        n = int(sub.sum())
        if n:
            out[name] = dict(count=n, max_abs=float(t.detach()[sub].abs().max()), flushed=flush)
            if flush:
                with torch.no_grad():
                    t.masked_fill_(sub, 0.0)
    return out


_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _any_subnormal(t: torch.Tensor) -> bool:
    """Whether ``t`` holds a subnormal value, in one pass over its bits: with ``m`` an entry's bits without the
    sign, it is subnormal when ``0 < m < bits(tiny)``; ``(m - 1) & mask`` wraps 0 to the top, so the smallest of
    those is below ``bits(tiny) - 1`` exactly then (a float8 or other dtype without an integer twin: True, and
    the caller counts)."""
    it = _BITS.get(t.dtype)
    if it is None or t.numel() == 0:
        return t.numel() > 0
    mask = (1 << (torch.finfo(t.dtype).bits - 1)) - 1
    tiny = int(torch.tensor(torch.finfo(t.dtype).tiny, dtype=t.dtype).view(it))
    bits = t.reshape(-1).view(it)
    step = max(1, BLOCK_BYTES // t.element_size())  # in blocks that stay in cache: the tensor is read once
    k = torch.empty(min(step, bits.numel()), dtype=it, device=t.device)
    for i in range(0, bits.numel(), step):
        b = bits[i:i + step]
        block = k[:b.numel()]
        torch.bitwise_and(b, mask, out=block).sub_(1).bitwise_and_(mask)
        if bool(block.amin() < tiny - 1):
            return True
    return False


def _widths(an: Analysis, removable: dict[int, torch.Tensor], keep: dict[int, torch.Tensor],
            first: bool) -> list[dict[str, Any]]:
    """Per group that loses channels: a parameter dim that holds it, its width, and the widths kept before and after
    rounding."""
    names: dict[int, str] = {}
    for (key, d), a in an.spaces.spaces().items():
        if isinstance(key, tuple) and key[0] == "param":
            for leaf in an.spaces.atoms.leaves_of(a):
                names.setdefault(id(leaf), f"{key[1]}:{d}")
    out = []
    for k, m in removable.items():
        after = int(keep[k].sum()) if k in keep else m.numel()
        if after < m.numel() or first:  # later rounds find the channels rounding kept removable again: no news
            out.append(dict(group=names.get(k, "?"), width=m.numel(), kept=int(m.sum()), rounded=after))
    return out


def rounded(keep: dict[int, torch.Tensor], k: int, fold_free: dict[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
    """``keep`` (per group, the channels to keep) with each group's kept count raised to a multiple of ``k`` (or to
    all of its channels) by keeping removable channels: first those ``fold_free`` marks (their removal would fold
    no constant into a bias, so keeping them changes nothing else), then the others, lowest-numbered first within
    each (every channel of a group holds the same slices, so each saves as much); groups left whole are dropped."""
    if k == 1:
        return keep
    out = {}
    for key, m in keep.items():
        m = _multiple(m, k, (fold_free or {}).get(key))
        if not bool(m.all()):
            out[key] = m
    return out


def _multiple(m: torch.Tensor, k: int, free: torch.Tensor | None) -> torch.Tensor:
    """Kept-mask ``m`` widened (:func:`_widened`) to a multiple of ``k`` kept channels, or to all of them."""
    return _widened(m, min(-(-int(m.sum()) // k) * k, m.numel()), free)


def aligned(an: Analysis, keep: dict[int, torch.Tensor], keys: Sequence[tuple[str, int]],
            fold_free: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """``keep`` with every group of each ``"tensor:dim"`` of ``keys`` keeping a multiple of its ``k`` channels (or
    all of them), by keeping removable channels as :func:`rounded` does: the dim's width is then a multiple of
    ``k`` too (a sum of such groups, or of parts that share one)."""
    out = dict(keep)
    for key, k in keys:
        for leaf in an.leaves(*_tensor_dim(key)):
            g = id(leaf)
            if g in out:
                _put(out, g, _multiple(out[g], k, fold_free.get(g)))
    return out


def equal_heads(an: Analysis, keep: dict[int, torch.Tensor], sets: Sequence[Sequence[str]],
                fold_free: dict[int, torch.Tensor], known: set[str]) -> dict[int, torch.Tensor]:
    """``keep`` with, in each set of ``"tensor:dim"`` (:attr:`MinimizeOptions.equal_heads`), every head-dim group
    (:meth:`Analysis.heads`) of the ``known`` dims (found to hold heads in the first round; one head where a round
    leaves one) keeping as many channels as the one that keeps most, by keeping removable channels as
    :func:`rounded` does. A set whose head dims differ in size is left as it is."""
    out = dict(keep)
    for names in sets:
        leaves = {id(leaf): leaf for k in names if k in known
                  for _, leaf in an.heads(*_tensor_dim(k), single=True) or ()}
        if len({leaf.size for leaf in leaves.values()}) != 1:
            continue
        width = max(int(out[g].sum()) if g in out else leaf.size for g, leaf in leaves.items())
        for g in leaves.keys() & out.keys():
            _put(out, g, _widened(out[g], width, fold_free.get(g)))
    return out


def _put(keep: dict[int, torch.Tensor], g: int, m: torch.Tensor) -> None:
    """Group ``g`` keeps ``m``; a group that keeps every channel leaves ``keep`` (nothing of it goes)."""
    if bool(m.all()):
        keep.pop(g, None)
    else:
        keep[g] = m


def whole_heads(an: Analysis, keep: dict[int, torch.Tensor], keys: Sequence[str]) -> dict[int, torch.Tensor]:
    """``keep`` with every channel inside a head of the dims ``keys`` (``"tensor:dim"``, found to hold heads in the
    first round; :attr:`MinimizeOptions.whole_heads`, :meth:`Analysis.head_dim_leaves`) kept: only whole heads go.
    Keeping a removable channel is always exact."""
    out = dict(keep)
    for k in keys:
        for leaf in an.head_dim_leaves(*_tensor_dim(k), single=True) or ():
            out.pop(id(leaf), None)
    return out


def _widened(m: torch.Tensor, target: int, free: torch.Tensor | None) -> torch.Tensor:
    """Kept-mask ``m`` with removable channels kept until ``target`` are: first those ``free`` marks (their removal
    would fold no constant into a bias, so keeping them changes nothing else), lowest-numbered first."""
    free = torch.zeros_like(m) if free is None else free
    order = (~m).nonzero().flatten()
    order = order[torch.argsort((~free[order]).to(torch.int8), stable=True)]  # fold-free first, in index order
    m = m.clone()
    m[order[:target - int(m.sum())]] = True
    return m


def _tensor_dim(key: str) -> tuple[str, int]:
    name, _, dim = key.rpartition(":")
    return name, int(dim)


class NothingRemovedWarning(UserWarning):
    """``minimize`` removed nothing while ops without a channel rule froze channels."""


def _warn_opaque(an: Analysis) -> None:
    """Say which ops without a channel rule froze channels when nothing could be removed."""
    ops: dict[str, None] = {}
    for leaf in an.spaces.atoms.leaves():
        for reason in leaf.frozen:
            if reason.startswith("no channel rule for "):
                ops.setdefault(reason[len("no channel rule for "):])
    if ops:
        names = list(ops)
        warnings.warn(f"minimize removed nothing; {len(names)} op(s) without a channel rule froze the channels they "
                      f"touch: {'; '.join(names[:5])}{' ...' if len(names) > 5 else ''} (fp.analyze(gm) shows every "
                      "group and why it is frozen)", NothingRemovedWarning, stacklevel=3)


def _storages(m: GraphModule) -> set[int]:
    """The storages of every tensor ``m`` holds or reads through a get_attr (meta tensors have none)."""
    ts = list(m.parameters()) + list(m.buffers())
    ts += [t for n in m.graph.nodes if n.op == "get_attr" and isinstance(t := get_attr(m, n.target), torch.Tensor)]
    return {t.untyped_storage().data_ptr() for t in ts if t.numel() and not t.is_meta}


def _detach(work: GraphModule, theirs: set[int]) -> GraphModule:
    """``work`` with a copy of every tensor it still shares with the input (whose storages are ``theirs``, and so
    with the user's model): the rewrite shares unchanged tensors between its iterations, and copies each of them
    once, here."""
    if not theirs & _storages(work):
        return work
    return rebuild(work, work.graph, {}, copy_if=lambda t: t.numel() > 0 and t.untyped_storage().data_ptr() in theirs)


def self_check(ref: GraphModule, new: Any, inputs: tuple[Any, ...], opts: MinimizeOptions | None = None,
               dims: Any = None, exact: nn.Module | None = None) -> list[ShapeCheck]:
    """Compare ``new`` with the model ``ref`` was captured from (end to end: :func:`reference_outputs`) at the
    example inputs and at the other check points of the inputs' dynamic dims (their low and high ends:
    :meth:`InputDims.check_points`); raise at the first shape where they differ: :class:`CaptureError` when the
    captured graph itself already differs there (:func:`blame_capture`), else :class:`EquivalenceError`. Shapes
    the model or the captured graph rejects are skipped. Returns what was checked.

    ``exact``: the same rewrite in float64 (:func:`float64_twin`, or the model written from it), of which ``new``
    is the float32 copy; a float32 difference is then rounding where ``exact`` is exact and the float32 outputs lie
    within the model's own rounding (:func:`fxprune.compare.rounding_only`)."""
    opts = opts or MinimizeOptions()
    dims = dims if dims is not None else ref.meta.get(DYNAMIC_KEY)
    precision = precision_of(ref)
    rtol = opts.rtol if opts.rtol is not None else rtol_for(precision)

    def same(a: Any, b: Any) -> bool:
        return first_failure(compare(a, b), rtol) is None

    checked: list[ShapeCheck] = []
    noise: list[float] = []  # the model's own float32 error per output: the largest at the example and shapes so far
    example: tuple[Any, Any] | None = None
    for p in check(lambda xs: reference_outputs(ref, xs), lambda xs: new(*xs), shaped_inputs(dims, inputs),
                   skip=InputError):  # a shape the model does not take: nothing to compare
        xs, out = p.inputs, p.expected
        example = example or (xs, out)
        where = f"at input shapes ({shape_str(xs)})"
        if p.error is not None:
            e = p.error
            if p.index and not takes(ref, xs):
                continue  # the captured graph's own range ends before this shape
            blame_capture(ref, xs, out, same)
            raise EquivalenceError(f"minimize's result does not run {where}, where its input does: "
                                   f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; nothing returned") from e
        diffs, bad = p.diffs, p.failure(rtol)
        if bad is not None:  # confirm with the model run now (a record made stale by a write it cannot see)
            out = fresh_outputs(ref, xs)
            diffs = compare(out, p.got)
            bad = first_failure(diffs, rtol)
        rounding = False  # only the float64 half of the rounding rule failed (see float64_twin)
        if bad is not None and precision == torch.float32 and opts.rtol is None:
            model = origin_model(ref)
            if not noise and example[0] is not xs:  # the model's own rounding on the example too
                noise[:] = own_rounding(model, *example)
            if rounding_only(model, new, xs, out, p.got, noise, exact):
                bad = None  # exact in float64; in float32 within the model's own rounding (an ill-conditioned model)
            else:
                rounding = within_own_rounding(diffs, noise)  # (False for a count or shape problem)
        if bad is not None:
            blame_capture(ref, xs, out, same)
        if bad is not None and bad.problem is not None:
            raise EquivalenceError(f"minimize changed output {bad.index} {where} ({bad.problem}); nothing returned")
        if bad is not None:
            err = EquivalenceError(
                f"minimize's self-check failed on output {bad.index} {where}: relative error {bad.max_rel:.3e} "
                f"(max abs {bad.max_abs:.3e}; allowed {rtol:g}, the tolerance of {precision}, the lowest precision the "
                "graph computes in). The rewrite is wrong; nothing was returned. Please report this model; "
                "fp.analyze(gm) shows the groups involved.")
            err.rounding = rounding
            raise err
        checked.append(ShapeCheck(shape_str(xs), worst(diffs)))
    return checked
