"""Channel atoms: a union-find over channel spaces with sum and product structure.

Every channel space (one dim of one value) is an *atom* of a fixed size. Rules relate atoms:

- ``unify(a, b)``: channel k of ``a`` is channel k of ``b`` (elementwise ops, weight rows <-> outputs);
- ``structure(a, "sum", [p, q])``: ``a`` is the concatenation of ``p`` then ``q`` (cat, split);
- ``structure(a, "prod", [h, d])``: ``a`` is ``h`` x ``d`` row-major (reshape into heads, grouped convs).

The *leaves* (root atoms without structure) are the channel groups: removing channel k of a leaf removes
every index that maps to it in every space that contains it. Two sums over one space with different cuts (slices
at different offsets) are both cut at every boundary of either; other incompatible structures freeze instead of
guessing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

__all__ = ["Atom", "AtomSet"]

Kind = Literal["sum", "prod"]


@dataclass(eq=False)
class Atom:
    size: int
    parent: "Atom | None" = None
    kind: Kind | None = None
    children: list["Atom"] = field(default_factory=list)
    frozen: dict[str, None] = field(default_factory=dict)  # reasons, as an insertion-ordered set

    def __repr__(self) -> str:
        return f"Atom(size={self.size}, kind={self.kind}, frozen={bool(self.frozen)})"


class AtomSet:
    """The union-find. Atoms are created by :meth:`new` and related by unify/structure/freeze."""

    def __init__(self) -> None:
        self.atoms: list[Atom] = []

    def new(self, size: int) -> Atom:
        a = Atom(int(size))
        self.atoms.append(a)
        return a

    def find(self, a: Atom) -> Atom:
        root = a
        while root.parent is not None:
            root = root.parent
        while a.parent is not None:  # path compression
            a.parent, a = root, a.parent
        return root

    def freeze(self, a: Atom, reason: str) -> None:
        self.find(a).frozen.setdefault(reason)

    def unify(self, a: Atom, b: Atom, why: str = "") -> None:
        ra, rb = self.find(a), self.find(b)
        if ra is rb:
            return
        if ra.size != rb.size:
            self.freeze(ra, f"size mismatch {ra.size} vs {rb.size} {why}".strip())
            self.freeze(rb, f"size mismatch {ra.size} vs {rb.size} {why}".strip())
            return
        rb.parent = ra
        ra.frozen.update(rb.frozen)
        if rb.kind is not None:
            self._merge_structure(ra, rb.kind, rb.children, why)

    def structure(self, a: Atom, kind: Kind, parts: list[Atom], why: str = "") -> None:
        """Declare ``a`` to be the sum (concatenation) or product (row-major) of ``parts``."""
        total = sum(p.size for p in parts) if kind == "sum" else _prod(p.size for p in parts)
        r = self.find(a)
        if total != r.size:
            for x in (r, *parts):
                self.freeze(x, f"{kind} of sizes {[p.size for p in parts]} != {r.size} {why}".strip())
            return
        if len(parts) == 1:
            self.unify(r, parts[0], why)
            return
        self._merge_structure(r, kind, parts, why)

    def _merge_structure(self, r: Atom, kind: Kind, parts: list[Atom], why: str) -> None:
        if r.kind is None:
            r.kind, r.children = kind, list(parts)
            return
        if r.kind == kind and [self.find(c).size for c in r.children] == [self.find(p).size for p in parts]:
            for c, p in zip(list(r.children), parts):
                self.unify(c, p, why)
            return
        if r.kind == kind == "sum":  # two cuts of one concatenation (slices at different offsets): cut both finer
            ours, theirs = self._refined(r.children, parts, why), self._refined(parts, r.children, why)
            if ours is not None and theirs is not None:
                for c, p in zip(ours, theirs):
                    self.unify(c, p, why)
                return
        reason = (f"incompatible channel structures ({r.kind} {[self.find(c).size for c in r.children]} "
                  f"vs {kind} {[self.find(p).size for p in parts]}) {why}").strip()
        for a in (r, *parts):
            self.freeze(a, reason)

    def _refined(self, parts: list[Atom], other: list[Atom], why: str) -> list[Atom] | None:
        """``parts`` (a concatenation) cut at every boundary of ``other`` (another cut of the same whole) too: the
        finest parts, in order, each part that a boundary falls inside declared the sum of its new pieces. None
        where such a part cannot take that structure (it is already a product: heads)."""
        bounds, at = set(), 0
        for p in other:
            at += self.find(p).size
            bounds.add(at)
        out: list[Atom] = []
        start = 0
        for p in parts:
            size = self.find(p).size
            cuts = sorted(b - start for b in bounds if start < b < start + size)
            start += size
            if not cuts:
                out.append(p)
                continue
            edges = [0, *cuts, size]
            pieces = [self.new(b - a) for a, b in zip(edges, edges[1:])]
            self.structure(p, "sum", pieces, why)
            if self.find(p).kind != "sum":
                return None
            out.extend(pieces)
        return out

    # ---- resolution -------------------------------------------------------------------------
    def settle(self) -> None:
        """Push freezes down into structure children (a frozen atom keeps all of its indices)."""
        changed = True
        while changed:
            changed = False
            for a in self.atoms:
                r = self.find(a)
                if r is a and r.frozen and r.kind is not None:
                    for c in r.children:
                        rc = self.find(c)
                        if not rc.frozen:
                            rc.frozen.setdefault(f"part of a frozen space ({next(iter(r.frozen))})")
                            changed = True

    def leaves(self) -> list[Atom]:
        seen: dict[int, Atom] = {}
        for a in self.atoms:
            r = self.find(a)
            if r.kind is None:
                seen.setdefault(id(r), r)
        return list(seen.values())

    def leaves_of(self, a: Atom) -> list[Atom]:
        r = self.find(a)
        if r.kind is None:
            return [r]
        out: list[Atom] = []
        for c in r.children:
            out.extend(x for x in self.leaves_of(c) if all(x is not y for y in out))
        return out

    def kept_mask(self, a: Atom, leaf_kept: dict[int, torch.Tensor]) -> torch.Tensor:
        """Bool mask over the indices of ``a``: kept iff every leaf channel it maps to is kept."""
        r = self.find(a)
        if r.kind is None:
            m = leaf_kept.get(id(r))
            return torch.ones(r.size, dtype=torch.bool) if m is None else m
        masks = [self.kept_mask(c, leaf_kept) for c in r.children]
        if r.kind == "sum":
            return torch.cat(masks)
        out = masks[0]
        for m in masks[1:]:
            out = (out[:, None] & m[None, :]).reshape(-1)
        return out

    def pull_back(self, a: Atom, ok: torch.Tensor, into: dict[int, torch.Tensor]) -> None:
        """AND the per-index tolerance ``ok`` of ``a`` into its leaves (a leaf channel is removable only
        if every index that maps to it tolerates removal)."""
        r = self.find(a)
        if r.kind is None:
            prev = into.get(id(r))
            into[id(r)] = ok.clone() if prev is None else prev & ok
            return
        sizes = [self.find(c).size for c in r.children]
        if r.kind == "sum":
            for c, part in zip(r.children, torch.split(ok, sizes)):
                self.pull_back(c, part, into)
            return
        grid = ok.reshape(sizes)
        for i, c in enumerate(r.children):
            other = [d for d in range(len(sizes)) if d != i]
            self.pull_back(c, grid.permute(i, *other).reshape(sizes[i], -1).all(dim=1), into)


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out
