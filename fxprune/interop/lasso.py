"""``GroupLasso``: structure-inducing training from fxprune's own channel groups.

``minimize`` removes a channel only when it is exactly dead or unread in *every* member of its group (producer rows
and biases, consumer columns, per-channel parameters such as norm weights and layer scales, every tensor of a
residual stream, whole heads). The regularizer is built from those groups (:func:`fxprune.analyze` on a capture of
the model), so that what it pushes to zero is what ``minimize`` can take out; nothing is listed by hand.

For channel ``g`` of a free group, ``w_g`` is the vector of every parameter entry that channel ``g`` owns, ``n_g``
its length. A group mixes tensors of very different scales (a BatchNorm or LayerNorm weight near 1 beside conv
weights near 0.05), so each entry is measured against its own tensor: ``u = w / s_t``, with ``s_t`` the root mean
square of the nonzero entries of the tensor ``t`` it belongs to (a constant, not differentiated). The penalty is
Yuan and Lin's group lasso over those relative entries,

    R = sum_g sqrt(n_g) * ||u_g||_2,      dR/du_i = sum over the groups g of i of  sqrt(n_g) * u_i / ||u_g||,

which is of order 1 on an entry of typical size in its group, whatever the group's size and the tensor's scale.
Training adds ``strength * dR/du`` to the gradients before each optimizer step (a group-lasso gradient
preconditioned by each tensor's scale, in the spirit of Torch-Pruning's ``regularize``); under Adam-type
optimizers, which scale each coordinate's step by its own gradient history, that pulls every entry of a group the
loss does not defend towards zero at about ``lr`` per step, large norm weights and small conv weights alike. A
gradient never lands on zero, so after each optimizer step the **exact-zero step** sets to exact zeros every slice
of a group member (a row, a column, a norm weight's entry; a bias only with its whole group: a zero bias alone
makes nothing constant or unread, and biases that start at zero, BatchNorm's, would be held there) and every whole
group whose root mean square has fallen
to the optimizer's step size, ``threshold * lr`` (the scale at which Adam leaves a weight oscillating about zero),
and to a ``relative`` fraction of its own tensor's scale ``s_t`` (so that a tensor whose scale a normalization
ignores, shrinking as a whole, is never zeroed for it), and keeps what it zeroed at zero for the rest of that
training (as HESSO holds its redundant groups). A zero
producer row or norm weight makes its channel constant there, a zero column leaves it unread: ``minimize`` removes
the channel once every member of its group is so (constants folded), exactly.

:meth:`GroupLasso.attach` installs both around every ``optimizer.step()`` of an optimizer that holds the model's
parameters (``lr`` read from the optimizer's param group), so a training loop needs no change. For a loop of your
own: :meth:`GroupLasso.penalty` (``R``, differentiable, for a loss term), :meth:`GroupLasso.regularize` (after
``backward()``) and :meth:`GroupLasso.step` (after ``optimizer.step()``).
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from fxprune.errors import InputError

__all__ = ["GroupLasso", "group_lasso", "DEFAULT_STRENGTH"]

DEFAULT_STRENGTH = 1e-3  # fxprune.squeeze_release's default ``lasso``
RELATIVE = 0.1  # the exact-zero step takes only slices and groups this small against their own tensors' scale


@dataclass(frozen=True)
class _Slice:
    """Dim ``dim`` of parameter ``name``: position i belongs to group channel ``channel[i]`` (-1: none)."""

    name: str
    dim: int
    channel: torch.Tensor
    bias: bool = False  # a bias (added, never multiplied): zero alone it makes nothing constant or unread


def _leaf_maps(atoms: Any, a: Any) -> dict[int, torch.Tensor] | None:
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
    sizes = [s for s, _ in kids]
    pos = torch.arange(r.size)
    stride = r.size
    for size, m in kids:
        stride //= size
        part = (pos // stride) % size
        for leaf, idx in m.items():
            if leaf in out:
                return None
            out[leaf] = torch.where(idx[part] >= 0, idx[part], -1)
    assert stride == 1, sizes
    return out


def _is_batch_norm(n: Any) -> bool:
    import torch.nn.functional as F

    return n.op == "call_function" and (n.target is F.batch_norm or "batch_norm" in str(n.target)) and bool(n.args)


def _layer_weights(n: Any) -> list[Any]:
    """The weight get_attr of a linear or convolution node ``n`` (empty for anything else)."""
    import torch.nn.functional as F

    if getattr(n, "op", None) != "call_function" or len(n.args) < 2:
        return []
    layer = n.target in (F.linear, F.conv1d, F.conv2d, F.conv3d) or any(
        k in str(n.target) for k in ("aten.linear", "aten.conv", "aten.convolution"))
    w = n.args[1]
    return [w] if layer and getattr(w, "op", None) == "get_attr" else []


def _tensor(model: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Parameter ``name`` of ``model`` and its value: through a mask parametrization, its ``original`` (what the
    optimizer updates) and the masked value the forward sees."""
    path, _, leaf = name.rpartition(".")
    try:
        owner = model.get_submodule(path) if path else model
    except AttributeError:
        return None
    if parametrize.is_parametrized(owner, leaf):
        return owner.parametrizations[leaf].original, getattr(owner, leaf)
    t = owner._parameters.get(leaf)
    return (t, t) if isinstance(t, torch.Tensor) else None


class GroupLasso:
    """The group lasso over the free channel groups fxprune finds in ``model`` (see the module docstring).

    ``exclude``: parameter-name globs whose slices are left out (never shrunk). Frozen groups (model inputs and
    outputs, ops without a rule) are never regularized.

    >>> import torch, fxprune as fp
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> reg = fp.GroupLasso(net, (torch.randn(3, 4),))
    >>> reg.channels   # the 8 hidden units: row and bias of layer 0, column of layer 2
    8
    >>> with torch.no_grad(): net[0].weight[:3] *= 1e-4; net[0].bias[:3] = 0; net[2].weight[:, :3] *= 1e-4
    >>> reg.step(net, lr=1e-3)     # the three units at the scale of a step become exact zeros
    3
    """

    def __init__(self, model: nn.Module, example_inputs: Sequence[Any], *, strength: float = DEFAULT_STRENGTH,
                 threshold: float = 2.0, relative: float = RELATIVE, exclude: Sequence[str] | None = None) -> None:
        import fnmatch

        from fxprune.analysis.groups import Analysis
        from fxprune.graph.capture import as_inputs, capture
        from fxprune.graph.shapes import TensorSpec
        from fxprune.interop.masks import unmasked
        from fxprune.interop.module import cache_off
        from fxprune.passes.lower import lower_modules

        if not isinstance(strength, (int, float)) or isinstance(strength, bool) or strength < 0:
            raise InputError(f"strength must be a non-negative number, got {strength!r}")
        for name, v in (("threshold", threshold), ("relative", relative)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                raise InputError(f"{name} must be a non-negative number, got {v!r}")
        self.strength, self.threshold, self.relative = float(strength), float(threshold), float(relative)
        plain = unmasked(model)
        modes = {name: m.training for name, m in plain.named_modules()}
        try:  # the groups of the deployed function (dropout off); building draws no randomness from the global RNGs
            for m in plain.modules():  # set directly: the module torch.export returns refuses .eval()
                m.training = False
            with torch.random.fork_rng(devices=[]), cache_off(plain):
                gm = lower_modules(capture(plain, as_inputs(example_inputs), dynamic_shapes=None))
        finally:
            for name, m in plain.named_modules():
                m.training = modes[name]
        an = Analysis(gm)
        sp, atoms = an.spaces, an.spaces.atoms
        names = {n for n, _ in plain.named_parameters()}
        offsets: dict[int, int] = {}
        total = 0
        for leaf in atoms.leaves():
            if not leaf.frozen and leaf.size > 1:
                offsets[id(leaf)] = total
                total += leaf.size
        slices: list[_Slice] = []
        seen: set[tuple[str, int]] = set()
        for node in gm.graph.nodes:
            if node.op != "get_attr" or node.target not in names or not isinstance(sp.spec(node), TensorSpec):
                continue
            if any(fnmatch.fnmatch(node.target, pat) for pat in (exclude or [])):
                continue
            for d in range(sp.rank(node)):
                if (sp.param_key[node.target], d) in seen or not sp.has(node, d):
                    continue
                seen.add((sp.param_key[node.target], d))
                maps = _leaf_maps(atoms, sp.of(node, d))
                if maps is None:
                    continue
                channel = torch.full((sp.of(node, d).size,), -1, dtype=torch.long)
                for leaf, idx in maps.items():
                    if leaf in offsets:
                        hit = idx >= 0
                        channel[hit] = idx[hit] + offsets[leaf]
                if bool((channel >= 0).any()):
                    key = sp.param_key[node.target]
                    slices.append(_Slice(key, d, channel, bias=key.rpartition(".")[2] == "bias"))
        self.slices = slices
        self.channels = total
        # weights whose output goes straight into a BatchNorm: scale-invariant in training, so a pull that shrinks
        # them as a whole costs the loss nothing and leaves the running statistics behind the batch statistics
        self.normalized = {sp.param_key[w.target] for n in gm.graph.nodes if _is_batch_norm(n)
                           for w in _layer_weights(n.args[0]) if w.target in names}
        sizes = torch.zeros(total, dtype=torch.float64)
        shapes = {n: p.shape for n, p in plain.named_parameters()}
        for s in slices:
            per = shapes[s.name].numel() // shapes[s.name][s.dim]
            hit = s.channel >= 0
            sizes.index_add_(0, s.channel[hit], torch.full((int(hit.sum()),), float(per), dtype=torch.float64))
        self.sizes = sizes  # n_g: entries per group channel

    # ---- reading ---------------------------------------------------------------------------------------------
    def _bound(self, model: nn.Module) -> list[tuple[_Slice, torch.Tensor, torch.Tensor]]:
        """Per slice: the parameter the optimizer updates and the value the forward reads (masked, where held)."""
        out = []
        for s in self.slices:
            pair = _tensor(model, s.name)
            if pair is None:
                raise InputError(f"'{s.name}' is not a parameter of {type(model).__name__}: pass the model the "
                                 "GroupLasso was built from (or a copy of it)")
            t, v = pair
            if t.shape[s.dim] != s.channel.numel():
                raise InputError(f"'{s.name}' has {t.shape[s.dim]} entries in dim {s.dim}, the GroupLasso was built "
                                 f"for {s.channel.numel()}: build it again for the changed model")
            out.append((s, t, v))
        return out

    @staticmethod
    def _scale(t: torch.Tensor) -> torch.Tensor:
        """The root mean square of ``t``'s nonzero entries (1 when it has none), no gradient."""
        v = t.detach()
        n = int(torch.count_nonzero(v))
        return v.pow(2).sum().div(n).sqrt() if n else torch.ones((), dtype=v.dtype, device=v.device)

    def _squares(self, bound: list[tuple[_Slice, torch.Tensor, torch.Tensor]], detach: bool,
                 relative: bool = False) -> torch.Tensor:
        """``||w_g||^2`` per group channel, or with ``relative`` ``||u_g||^2`` (each tensor over its own scale)."""
        sq = None
        for s, _, value in bound:
            v = value.detach() if detach else value
            if relative:
                v = v / self._scale(value)
            dims = [d for d in range(v.dim()) if d != s.dim]
            per = v.pow(2).sum(dims) if dims else v.pow(2)
            hit = s.channel >= 0
            part = torch.zeros(self.channels, dtype=per.dtype, device=per.device).index_add(
                0, s.channel[hit].to(per.device), per[hit.to(per.device)])
            sq = part if sq is None else sq + part.to(sq.dtype)
        if sq is None:
            return torch.zeros(self.channels)
        return sq

    def norms(self, model: nn.Module) -> torch.Tensor:
        """``||w_g||`` per group channel (no gradient)."""
        return self._squares(self._bound(model), detach=True).sqrt()

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """``R = sum_g sqrt(n_g) ||u_g||``, differentiable (a term for a loss of your own: ``loss + lam * penalty``;
        its gradient is :meth:`regularize`'s over ``s_t``)."""
        sq = self._squares(self._bound(model), detach=False, relative=True)
        return (sq.add(1e-12).sqrt() * self.sizes.to(sq).sqrt()).sum()

    def _coefficients(self, bound: list[tuple[_Slice, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """``sqrt(n_g) / ||u_g||`` per group channel (0 for a zero group)."""
        norm = self._squares(bound, detach=True, relative=True).to(torch.float64).sqrt()
        return torch.where(norm > 0, self.sizes.sqrt() / norm.clamp_min(1e-300), torch.zeros_like(norm))

    @torch.no_grad()
    def regularize(self, model: nn.Module) -> None:
        """Add ``strength * dR/du`` (``= strength * s_t * dR/dw``) to the parameters' gradients (after ``backward()``,
        before the optimizer step; a parameter without a gradient gets one). Shrinks groups; exact zeros come from
        :meth:`step`."""
        bound = self._bound(model)
        if not bound or self.strength == 0:
            return
        coef = self._coefficients(bound)
        pull: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for s, t, value in bound:
            c = torch.zeros(s.channel.numel(), dtype=torch.float64)
            hit = s.channel >= 0
            c[hit] = coef[s.channel[hit]]
            shape = [1] * t.dim()
            shape[s.dim] = -1
            v = value.detach()
            g = v * c.to(v.dtype).to(v.device).view(shape)
            prev = pull.get(id(t))
            pull[id(t)] = (t, v, g if prev is None else prev[2] + g)
        normalized = {id(t) for s, t, _ in bound if s.name in self.normalized}
        for t, v, g in pull.values():
            g = g * (self.strength / self._scale(v))
            if id(t) in normalized:  # keep the tensor's overall scale: only the pull between its groups is left
                g = g - (g * v).sum() / v.pow(2).sum().clamp_min(1e-30) * v
            if t.grad is None:
                t.grad = g
            else:
                t.grad.add_(g)

    @torch.no_grad()
    def step(self, model: nn.Module, lr: float | dict[int, float], hold: dict[int, torch.Tensor] | None = None) -> int:
        """The exact-zero step. Every slice of a group member (a row, a column, a norm weight's entry...; not a
        bias's entry, which zero alone makes nothing constant or unread) whose root mean square is at most
        ``threshold * lr`` and at most ``relative * s_t`` becomes exact zeros, and so does every group channel with ``||w_g|| <= threshold * lr * sqrt(n_g)`` and ``||u_g|| <= relative *
        sqrt(n_g)`` (``lr``: a number, or per parameter ``id``). With ``hold`` (per
        slice index, the positions zeroed so far; updated), what was zeroed before stays zero. A zero slice makes its
        channel constant (a producer row) or unread (a consumer column) in that member; ``minimize`` removes the
        channel once that holds for its whole group. Returns how many group channels are exact zeros after it."""
        bound = self._bound(model)
        if not bound:
            return 0
        rate = {id(t): float(lr.get(id(t), 0.0)) if isinstance(lr, dict) else float(lr) for _, t, _ in bound}
        rates = torch.zeros(self.channels, dtype=torch.float64)
        for s, t, _ in bound:
            hit = s.channel >= 0
            rates.scatter_reduce_(0, s.channel[hit], torch.full((int(hit.sum()),), rate[id(t)], dtype=torch.float64),
                                  reduce="amax")
        norm = self._squares(bound, detach=True).to(torch.float64).sqrt()
        rel = self._squares(bound, detach=True, relative=True).to(torch.float64).sqrt()
        whole = (norm <= rates * self.threshold * self.sizes.sqrt()) & (rel <= self.relative * self.sizes.sqrt())
        for i, (s, t, v) in enumerate(bound):
            hit = s.channel >= 0
            dims = [d for d in range(v.dim()) if d != s.dim]
            x = v.detach().to(torch.float64)
            rms = (x.pow(2).mean(dims) if dims else x.pow(2)).sqrt().cpu()
            small = (rms <= rate[id(t)] * self.threshold) & (rms <= self.relative * float(self._scale(v)))
            zero = hit & small & (not s.bias)
            zero[hit] |= whole[s.channel[hit]]
            if hold is not None:
                if i in hold:
                    zero |= hold[i]
                hold[i] = zero
            if bool(zero.any()):
                shape = [1] * t.dim()
                shape[s.dim] = -1
                t.mul_((~zero).to(t.dtype).to(t.device).view(shape))
        return int((self._squares(self._bound(model), detach=True) == 0).sum())

    @contextlib.contextmanager
    def attach(self, model: nn.Module) -> Iterator["GroupLasso"]:
        """While open: before every ``optimizer.step()`` of an optimizer holding parameters of ``model``,
        :meth:`regularize`; after it, :meth:`step` with each parameter's learning rate from the optimizer, the groups
        zeroed so far held at zero. Any optimizer and loop, DistributedDataParallel included (both read only the
        weights and the reduced gradients, equal on every rank)."""
        if self.strength == 0:
            yield self
            return
        ids = {id(t) for _, t, _ in self._bound(model)}
        ref = weakref.ref(model)
        held: dict[int, torch.Tensor] = {}

        def ours(optimizer: torch.optim.Optimizer) -> dict[int, float]:
            return {id(p): float(g["lr"]) for g in optimizer.param_groups for p in g["params"] if id(p) in ids}

        def before(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            m = ref()
            if m is not None and ours(optimizer):
                self.regularize(m)

        def after(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            lrs, m = ours(optimizer), ref()
            if lrs and m is not None:
                self.step(m, lrs, held)

        handles = [register_optimizer_step_pre_hook(before), register_optimizer_step_post_hook(after)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()


def group_lasso(model: nn.Module, example_inputs: Sequence[Any]) -> torch.Tensor:
    """``R = sum_g sqrt(n_g) ||u_g||`` over fxprune's free channel groups of ``model``, differentiable: a penalty to add
    to a loss (build a :class:`GroupLasso` once instead when calling it every step)."""
    return GroupLasso(model, example_inputs).penalty(model)
