"""The analysis driver: apply every node's rule, freeze what no rule explains, group channels, and
work out which channels can be removed exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Collection, Iterable, Mapping

import torch
from torch.fx import GraphModule, Node
from torch.utils import _pytree as pytree

from fxprune.analysis.atoms import Atom
from fxprune.analysis.rule import GHOST_PREFIX, Facts, Op, Spaces, stale_reads
from fxprune.analysis.table import RULES, target_name
from fxprune.graph.capture import on_meta
from fxprune.graph.shapes import TensorSpec, node_spec

from fxprune.analysis.rules import Passive  # (importing it registers the rule table)

__all__ = ["Analysis", "ChannelGraph", "ChannelGroup", "ParamSlice", "param_slices", "input_channels", "reads_whole"]

# splits into parts of one size: by the parts' size (split(int)), or into a number of parts (chunk)
_SPLIT_BY_SIZE = {torch.ops.aten.split.Tensor, torch.split, "split"}
_EQUAL_SPLITS = _SPLIT_BY_SIZE | {torch.ops.aten.chunk.default, torch.chunk, "chunk"}


@dataclass
class ChannelGroup:
    """Coupled channel spaces: channel k is removed from every member at once, or from none."""

    id: int
    size: int
    spaces: list[tuple[str, int]]
    frozen: bool
    reasons: list[str] = field(default_factory=list)

    def __contains__(self, space: tuple[str, int]) -> bool:
        return space in self.spaces


@dataclass
class ChannelGraph:
    """Result of :func:`fxprune.analyze`: the channel groups of a graph."""

    groups: list[ChannelGroup]

    def group_of(self, node_name: str, dim: int) -> ChannelGroup | None:
        """The group whose channels are those of ``(node_name, dim)`` (the group of a leaf space)."""
        for g in self.groups:
            if (node_name, dim) in g.spaces:
                return g
        return None

    def __str__(self) -> str:
        rows = [f"{'group':>5}  {'size':>6}  {'spaces':>6}  {'state':<8}  members / reason"]
        for g in sorted(self.groups, key=lambda g: (-len(g.spaces), g.id)):
            if g.size == 1:
                continue
            members = ", ".join(f"{n}:{d}" for n, d in g.spaces[:4]) + (f", … (+{len(g.spaces) - 4})" if len(g.spaces) > 4 else "")
            state = "frozen" if g.frozen else "free"
            rows.append(f"{g.id:>5}  {g.size:>6}  {len(g.spaces):>6}  {state:<8}  {members}")
            if g.frozen:
                rows.append(f"{'':>33}  why: {g.reasons[0]}" + (f" (+{len(g.reasons) - 1} more)" if len(g.reasons) > 1 else ""))
        return "\n".join(rows)

    __repr__ = __str__


class Analysis:
    """Spaces and facts of one graph, and the removal plan derived from them."""

    def __init__(self, gm: GraphModule, keep: Mapping[str, str] | None = None, split_norms: bool = False,
                 inputs: bool | Collection[str] = True) -> None:
        """``keep``: parameter/buffer names whose channels must all stay, with the reason (frozen); a key
        ``"name:dim"`` freezes that dim only. ``split_norms``: a LayerNorm / RMSNorm's output channels (with its
        weight and bias) form groups apart from its input's, so that an output channel nothing reads can go while
        the statistics keep reading its input channel (the graph then selects the kept outputs after the norm;
        a module of the user's class cannot, so ``minimize_module`` and the group lasso leave it off).
        ``inputs``: the model inputs (placeholder names; True: all of them) whose channels may go where
        :func:`input_channels` allows it: a channel no layer's weight reads is then cut at the input (the graph
        selects the others); every other dim of a model input, and every dim of the other inputs, is frozen."""
        self.gm = gm
        self.keep = dict(keep or {})
        self.spaces = Spaces(gm)
        self.inputs = {k: d for k, d in input_channels(gm, self.spaces).items()
                       if inputs is True or inputs and k in inputs}
        self.spaces.split_norms = split_norms
        self.rules: dict[str, Any] = {}
        self.stale = stale_reads(gm)  # values written into before a later read: no facts, constants frozen
        self._couple()
        self.spaces.atoms.settle()
        self.facts = Facts(gm, self.spaces, self.stale)
        # Facts read weight values; a model on the meta device has none, so its analysis is the coupling alone
        # (unless its weights are bound to a reader: the streamed path, fxprune.graph.lazy).
        if not on_meta(gm):
            self._facts()

    # ---- coupling -----------------------------------------------------------------------
    def _couple(self) -> None:
        sp, gm = self.spaces, self.gm
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                if isinstance(node_spec(node), TensorSpec):
                    for d in range(sp.rank(node)):
                        if d != self.inputs.get(node.name):
                            sp.freeze(node, d, f"model input '{node.name}'")
                continue
            if node.op == "get_attr":
                if str(node.target).startswith(GHOST_PREFIX):
                    sp.freeze_all(node, "constant standing in for removed channels")
                elif node in self.stale and isinstance(sp.spec(node), TensorSpec):
                    sp.freeze_all(node, f"'{node.target}' is written into by the graph before a later read")
                elif node.target in self.keep and isinstance(sp.spec(node), TensorSpec):
                    sp.freeze_all(node, self.keep[node.target])
                elif isinstance(sp.spec(node), TensorSpec):  # "name:dim": that dim only
                    for d in range(sp.rank(node)):
                        if f"{node.target}:{d}" in self.keep:
                            sp.freeze(node, d, self.keep[f"{node.target}:{d}"])
                continue
            if node.op == "output":
                for v in pytree.tree_leaves(node.args[0]):
                    if isinstance(v, Node) and isinstance(sp.spec(v), TensorSpec):
                        sp.freeze_all(v, f"model output '{v.name}'")
                continue
            op = Op(node, gm)
            rule = RULES.lookup(node, gm)
            operands = op.tensor_args()
            outputs = [node] if isinstance(sp.spec(node), TensorSpec) else []
            if rule is None:
                reason = f"no channel rule for {op.describe()}"
                for v in operands + outputs:
                    sp.freeze_all(v, reason)
                continue
            self.rules[node.name] = rule
            sp.touched, sp.meta = set(), set()
            whole = [a for a in operands if a.op == "placeholder" and a.name in self.inputs]
            if whole and len(whole) == len(operands) and not outputs \
                    and all(rule.sizes_read(op, a, sp) is not None for a in whole):
                for a in whole:  # sizes of the input as the model takes it: the rewrite keeps them reading it
                    sp.meta_only(a)
                continue
            rule.couple(op, sp)
            for v in operands + outputs:
                if v.name in sp.meta:
                    continue
                for d in range(sp.rank(v)):
                    if id(sp.of(v, d)) not in sp.touched:
                        sp.freeze(v, d, f"dim {d} of '{v.name}' is not a channel dim of {op.describe()}")

    # ---- facts --------------------------------------------------------------------------
    def _facts(self) -> None:
        for node in self.gm.graph.nodes:
            rule = self.rules.get(node.name)
            if rule is None or not isinstance(node_spec(node), (TensorSpec, list)):
                continue
            res = rule.facts(Op(node, self.gm), self.facts)
            if res is not None or self.facts.peek(node) is None:
                self.facts.set(node, res)
            if rule.replayable and isinstance(node_spec(node), TensorSpec):
                self.facts.derive_ghost(node)

    # ---- removal plan -------------------------------------------------------------------
    def removable(self) -> dict[int, torch.Tensor]:
        """Per leaf atom (by id): the bool mask of channels to KEEP. Frozen leaves keep everything."""
        atoms = self.spaces.atoms
        ok: dict[int, torch.Tensor] = {}
        for e in self.spaces.exits:
            atoms.pull_back(self.spaces.of(e.value, e.dim), e.tolerates(self.facts).to(torch.bool), ok)
        keep: dict[int, torch.Tensor] = {}
        for leaf in atoms.leaves():
            if leaf.frozen or leaf.size == 0:  # (an empty dim: nothing to remove)
                continue
            rem = ok.get(id(leaf), torch.ones(leaf.size, dtype=torch.bool))
            if bool(rem.all()):
                rem = rem.clone()
                rem[0] = False  # never remove a whole group: keep one channel
            if rem.any():
                keep[id(leaf)] = ~rem
        return self.implied(keep)

    def implied(self, keep: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """``keep`` with every implication of the spaces held (:meth:`Spaces.implies`): a channel kept on the side
        that must lose it first is kept on the other side too; until nothing changes. Leaves that then keep
        everything drop out."""
        atoms, sp = self.spaces.atoms, self.spaces
        if not sp.implications:
            return keep
        keep = dict(keep)
        changed = True
        while changed:
            changed = False
            for a, da, b, db in sp.implications:
                need = atoms.kept_mask(sp.of(b, db), keep) & ~atoms.kept_mask(sp.of(a, da), keep)
                if not bool(need.any()):
                    continue
                ok: dict[int, torch.Tensor] = {}
                atoms.pull_back(sp.of(a, da), ~need, ok)  # a leaf channel any needed index maps to stays
                for leaf, m in ok.items():
                    if leaf in keep:
                        keep[leaf] = keep[leaf] | ~m
                        if bool(keep[leaf].all()):
                            del keep[leaf]
                changed = True
        return keep

    def fold_free(self) -> dict[int, torch.Tensor]:
        """Per leaf atom (by id): the channels that reach no exit as a known nonzero constant, so that removing them
        folds nothing into a bias (what width rounding keeps back first)."""
        out: dict[int, torch.Tensor] = {}
        for e in self.spaces.exits:
            f = self.facts.dim(e.value, e.dim)
            self.spaces.atoms.pull_back(self.spaces.of(e.value, e.dim), ~(f.known & (f.value != 0)), out)
        return out

    def kept(self, v: Node, d: int, keep: dict[int, torch.Tensor]) -> torch.Tensor:
        return self.spaces.atoms.kept_mask(self.spaces.of(v, d), keep)

    def heads(self, target: str, dim: int, single: bool = False) -> list[tuple[int, Atom]] | None:
        """Dim ``dim`` of tensor ``target`` as heads x head dim: per part (one part, or each part of a concatenation
        such as a fused q/k/v), the number of heads and the head-dim group (the product's last factor, a group
        shared by every head). None where the dim is not such a product (or the tensor is not in the graph).
        ``single``: a part without structure is one head (a reshape into one head is no product: its size-1 dim
        is skipped), for a dim known to hold heads."""
        atoms = self.spaces.atoms
        parts = self._parts(target, dim)
        if parts is None:
            return None
        out = []
        for part in parts:
            last = atoms.find(part.children[-1]) if part.kind == "prod" and len(part.children) > 1 else None
            if last is None and single and part.kind is None:
                last = part
            if last is None or last.kind is not None:
                return None
            lead = atoms.find(part.children[0]) if part.kind == "prod" and len(part.children) > 2 else None
            if lead is not None and lead.frozen and lead.kind is None:  # copies x heads x head dim, the copies
                # kept whole (timm's fused q/k/v: a reshape to (3, heads, head dim), unbound): one part per copy
                out.extend([(part.size // lead.size // last.size, last)] * lead.size)
                continue
            out.append((part.size // last.size, last))
        return out

    def head_dim_leaves(self, target: str, dim: int, single: bool = False) -> list[Atom] | None:
        """The leaf groups inside the head dim of dim ``dim`` of tensor ``target``: per part (see :meth:`heads`) that
        is heads x head dim, every leaf of its last factor (a rotary head dim is a sum of two halves that share a
        leaf); a part without that product, all of its leaves (one head). None where the tensor or dim is not in
        the graph, or no part is such a product (nothing tells its heads from a stream) and not ``single`` (a dim
        known to hold heads, left with one)."""
        parts = self._parts(target, dim)
        if parts is None or not single and not any(p.kind == "prod" and len(p.children) > 1 for p in parts):
            return None
        return self._leaves_of([p.children[-1] if p.kind == "prod" and len(p.children) > 1 else p for p in parts])

    def hold_inside_heads(self, keys: Iterable[str], reason: str) -> None:
        """Freeze the channels inside the heads of the dims ``keys`` (``"tensor:dim"``, as
        :attr:`~fxprune.passes.minimize.MinimizeOptions.whole_heads`): whole heads stay free."""
        for k in keys:
            name, _, d = k.rpartition(":")
            for leaf in self.head_dim_leaves(name, int(d), single=True) or ():
                self.spaces.atoms.freeze(leaf, reason)

    def leaves(self, target: str, dim: int) -> list[Atom]:
        """Every leaf group of dim ``dim`` of tensor ``target`` (none where it is not in the graph)."""
        return self._leaves_of(self._parts(target, dim) or [])

    def _leaves_of(self, parts: list[Atom]) -> list[Atom]:
        """The leaves of ``parts``, each once (parts may share one: a rotary head dim's two halves)."""
        out: list[Atom] = []
        for part in parts:
            out.extend(x for x in self.spaces.atoms.leaves_of(part) if all(x is not y for y in out))
        return out

    def equal_splits(self) -> list[tuple[int, str]]:
        """Per split of a tensor into parts of one size (``split(int)``, ``chunk``, as eager code writes a split
        whose sizes it computes from one number): that size and a parameter dim (``"name:dim"``) whose channels
        are the split tensor's, for :meth:`heads` to read the parts off. Splits whose tensor holds no parameter's
        channels are left out."""
        atoms = self.spaces.atoms
        params: dict[int, str] = {}
        for (key, d), a in self.spaces.spaces().items():
            if isinstance(key, tuple) and key[0] == "param":
                params.setdefault(id(atoms.find(a)), f"{key[1]}:{d}")
        out = []
        for n in self.gm.graph.nodes:
            if n.target not in _EQUAL_SPLITS or n.op not in ("call_function", "call_method"):
                continue
            x = n.args[0]
            by, dim = (list(n.args[1:3]) + [None, None])[:2]
            by = next((n.kwargs[k] for k in ("split_size", "split_size_or_sections", "chunks") if k in n.kwargs), by)
            dim = n.kwargs.get("dim", 0 if dim is None else dim)
            spec = self.spaces.spec(x)
            if type(by) is not int or by < 1 or type(dim) is not int or spec is None or not spec.shape \
                    or not self.spaces.has(x, dim):
                continue
            size = spec.shape[dim]
            width = by if n.target in _SPLIT_BY_SIZE else -(-size // by)  # (chunk: parts of ceil(size / chunks))
            key = params.get(id(atoms.find(self.spaces.of(x, dim))))
            if key is not None and size > width:
                out.append((width, key))
        return out

    def _parts(self, target: str, dim: int) -> list[Atom] | None:
        """Dim ``dim`` of tensor ``target``: the parts of its concatenation (or itself as one part); None where the
        tensor or dim is not in the graph."""
        atoms = self.spaces.atoms
        a = self.spaces.spaces().get((("param", self.spaces.param_key.get(target, target)), dim))
        if a is None:
            return None
        root = atoms.find(a)
        return [atoms.find(c) for c in root.children] if root.kind == "sum" else [root]

    # ---- report -------------------------------------------------------------------------
    def channel_graph(self) -> ChannelGraph:
        sp, atoms = self.spaces, self.spaces.atoms
        names: dict[Any, list[str]] = {}
        for n in self.gm.graph.nodes:
            names.setdefault(sp.key(n) if n.op == "get_attr" else n.name, []).append(n.name)
        members: dict[int, list[tuple[str, int]]] = {}
        for (key, d), a in sp.spaces().items():
            for leaf in atoms.leaves_of(a):
                for name in names.get(key, [str(key)]):
                    members.setdefault(id(leaf), []).append((name, d))
        groups = []
        for i, leaf in enumerate(atoms.leaves()):
            if id(leaf) in members:
                groups.append(ChannelGroup(i, leaf.size, members[id(leaf)], bool(leaf.frozen), list(leaf.frozen)))
        return ChannelGraph(groups)


def input_channels(gm: GraphModule, sp: Spaces | None = None) -> dict[str, int]:
    """Per model input (placeholder name) whose channels a cut can select: the dim that holds them. An input
    qualifies when every op that reads it is a layer that reads it only through a weight parameter (a linear layer
    or an ungrouped convolution, :meth:`~fxprune.analysis.rule.Rule.input_dim`), all at the same dim, of a fixed
    size above 1. Ops that read only its metadata (export's shape guards) or its sizes (``sym_size``,
    ``x.shape[0]``) may read it too: they go on reading the whole input (:func:`reads_whole`)."""
    sp = sp or Spaces(gm)
    out: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        spec = node_spec(node)
        if not isinstance(spec, TensorSpec) or not spec.is_float:
            continue
        dims = set()
        for user in node.users:
            rule = RULES.lookup(user, gm) if user.op in ("call_function", "call_method", "call_module") else None
            op = Op(user, gm)
            if rule is None or not reads_whole(rule, op, node, sp):
                dims.add(rule.input_dim(op, node, sp) if rule is not None else None)
        d = dims.pop() if len(dims) == 1 else None
        if d is not None and d not in spec.dynamic and spec.shape[d] > 1:
            out[node.name] = d
    return out


def reads_whole(rule: Any, op: Op, v: Node, sp: Spaces) -> bool:
    """Whether ``op`` reads only the metadata or the sizes of the model input ``v``: where ``v`` loses channels, it
    goes on reading ``v`` as the model takes it (its sizes are those of the input, the cut ones included)."""
    return isinstance(rule, Passive) or rule.sizes_read(op, v, sp) is not None


# ---- parameters by group channel ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamSlice:
    """Dim ``dim`` of parameter ``name``: position i belongs to group channel ``channel[i]`` (-1: none). Group
    channels number the channels of every free group (``leaves``: each group's first channel and size)."""

    name: str
    dim: int
    channel: torch.Tensor


def _leaf_maps(atoms: Any, a: Atom) -> dict[int, torch.Tensor] | None:
    """Per leaf atom (by id) under ``a``: the leaf channel each index of ``a`` maps to (-1 where none). None when a
    leaf appears twice under ``a`` (no group can then be read off it)."""
    r = atoms.find(a)
    if r.kind is None:
        return {id(r): torch.arange(r.size)}
    kids = [(atoms.find(c).size, _leaf_maps(atoms, c)) for c in r.children]
    if any(m is None for _, m in kids):
        return None
    out: dict[int, torch.Tensor] = {}
    if r.kind == "sum":
        offset = 0
        for size, m in kids:
            for leaf, idx in m.items():
                if leaf in out:
                    return None
                out[leaf] = torch.full((r.size,), -1, dtype=torch.long)
                out[leaf][offset:offset + size] = idx
            offset += size
        return out
    pos = torch.arange(r.size)
    stride = r.size
    for size, m in kids:
        stride //= size
        part = (pos // stride) % size
        for leaf, idx in m.items():
            if leaf in out:
                return None
            out[leaf] = torch.where(idx[part] >= 0, idx[part], -1)
    return out


def param_slices(an: Analysis, names: set[str]) -> tuple[list[ParamSlice], list[tuple[int, int]]]:
    """Every dim of the parameters ``names`` (get_attr targets of ``an.gm``) that holds channels of a free group
    (size > 1), as :class:`ParamSlice` over one numbering of those groups' channels; and per group its first
    channel and size. Tied parameters appear once (under their first name)."""
    sp, atoms = an.spaces, an.spaces.atoms
    offsets: dict[int, int] = {}
    leaves: list[tuple[int, int]] = []
    total = 0
    for leaf in atoms.leaves():
        if not leaf.frozen and leaf.size > 1:
            offsets[id(leaf)] = total
            leaves.append((total, leaf.size))
            total += leaf.size
    out: list[ParamSlice] = []
    seen: set[tuple[str, int]] = set()
    for node in an.gm.graph.nodes:
        if node.op != "get_attr" or node.target not in names or not isinstance(sp.spec(node), TensorSpec):
            continue
        for d in range(sp.rank(node)):
            key = sp.param_key[node.target]
            if (key, d) in seen or not sp.has(node, d):
                continue
            seen.add((key, d))
            maps = _leaf_maps(atoms, sp.of(node, d))
            if maps is None:
                continue
            channel = torch.full((sp.of(node, d).size,), -1, dtype=torch.long)
            for leaf, idx in maps.items():
                if leaf in offsets:
                    hit = idx >= 0
                    channel[hit] = idx[hit] + offsets[leaf]
            if bool((channel >= 0).any()):
                out.append(ParamSlice(key, d, channel))
    return out, leaves
