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
of a group member (a row, a column, a norm weight's entry; a bias entry only once the same module's weight entries
of its channel are zero: a zero bias alone makes nothing constant or unread, and biases that start at zero,
BatchNorm's, would be held there) and every whole group whose root mean square has fallen
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
import functools
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
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

    @functools.cached_property
    def hit(self) -> torch.Tensor:
        """Positions that belong to a group channel."""
        return self.channel >= 0

    @functools.cached_property
    def channels(self) -> torch.Tensor:
        """The group channel of each position in :attr:`hit`."""
        return self.channel[self.hit]

    @functools.cached_property
    def safe(self) -> torch.Tensor:
        """``channel`` with -1 read as 0 (for gathers masked by :attr:`hit`)."""
        return self.channel.clamp_min(0)


@dataclass(frozen=True)
class _Member:
    """A slice resolved on one model: the parameter the optimizer updates and where the forward reads its value
    (through a mask parametrization, ``original`` times the mask)."""

    slice: _Slice
    param: torch.Tensor
    owner: nn.Module
    leaf: str
    masked: bool

    def value(self) -> torch.Tensor:
        return getattr(self.owner, self.leaf) if self.masked else self.param


class _Reading:
    """One pass over the members' current values (no gradient): per slice, each position's sum of squares (float64);
    per parameter, its value and its scale ``s_t`` (the root mean square of its nonzero entries; 1 when none)."""

    def __init__(self, members: list[_Member]) -> None:
        self.values: dict[int, torch.Tensor] = {}
        self.scales: dict[int, torch.Tensor] = {}
        self.squares: list[torch.Tensor] = []
        for m in members:
            key = id(m.param)
            if key not in self.values:
                self.values[key] = m.value().detach()
            v = self.values[key]
            dims = [d for d in range(v.dim()) if d != m.slice.dim]
            per = v.pow(2).sum(dims, dtype=torch.float64) if dims else v.pow(2).to(torch.float64)
            self.squares.append(per.cpu())
            if key not in self.scales:
                n = int(torch.count_nonzero(v))
                self.scales[key] = per.sum().div(n).sqrt().cpu() if n else torch.ones((), dtype=torch.float64)

    def sums(self, members: list[_Member], channels: int, relative: bool = False) -> torch.Tensor:
        """``||w_g||^2`` per group channel, or with ``relative`` ``||u_g||^2`` (each tensor over its own scale)."""
        out = torch.zeros(channels, dtype=torch.float64)
        for m, per in zip(members, self.squares):
            part = per[m.slice.hit]
            out.index_add_(0, m.slice.channels, part / self.scales[id(m.param)].pow(2) if relative else part)
        return out

    def both(self, members: list[_Member], channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``||w_g||^2`` and ``||u_g||^2`` per group channel, in one pass over the members."""
        out = torch.zeros(channels, dtype=torch.float64)
        rel = torch.zeros(channels, dtype=torch.float64)
        for m, per in zip(members, self.squares):
            part = per[m.slice.hit]
            out.index_add_(0, m.slice.channels, part)
            rel.index_add_(0, m.slice.channels, part / self.scales[id(m.param)].pow(2))
        return out, rel


def _targets(*names: str) -> set[Any]:
    """The overloads (but the ``out=`` ones) of the aten ops ``names`` that this torch has."""
    ops = [getattr(torch.ops.aten, n) for n in names if hasattr(torch.ops.aten, n)]
    return {getattr(op, o) for op in ops for o in op.overloads() if not o.endswith("out")}


# Where a weight's output goes straight into a BatchNorm: the functional and aten forms of the normalization (after
# lower_modules) and of the layers whose weight it follows.
_BATCH_NORMS: set[Any] = {F.batch_norm} | _targets(
    "batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit", "native_batch_norm",
    "_batch_norm_with_update", "_batch_norm_no_update")
_LAYERS: set[Any] = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
                     F.conv_transpose3d} | _targets("linear", "conv1d", "conv2d", "conv3d", "convolution",
                                                     "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")


def _is_batch_norm(n: Any) -> bool:
    return n.op == "call_function" and n.target in _BATCH_NORMS and bool(n.args)


def _layer_weights(n: Any) -> list[Any]:
    """The weight get_attr of a linear or convolution node ``n`` (empty for anything else)."""
    if getattr(n, "op", None) != "call_function" or n.target not in _LAYERS or len(n.args) < 2:
        return []
    w = n.args[1]
    return [w] if getattr(w, "op", None) == "get_attr" else []


def _member(model: nn.Module, s: _Slice) -> _Member | None:
    """Slice ``s`` resolved on ``model`` (None where ``model`` has no such parameter)."""
    path, _, leaf = s.name.rpartition(".")
    try:
        owner = model.get_submodule(path) if path else model
    except AttributeError:
        return None
    if parametrize.is_parametrized(owner, leaf):
        return _Member(s, owner.parametrizations[leaf].original, owner, leaf, True)
    t = owner._parameters.get(leaf)
    return _Member(s, t, owner, leaf, False) if isinstance(t, torch.Tensor) else None


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

        from fxprune.analysis.groups import Analysis, param_slices
        from fxprune.graph.masks import unmasked
        from fxprune.interop.module import eval_capture
        from fxprune.passes.lower import lower_modules

        if not isinstance(strength, (int, float)) or isinstance(strength, bool) or strength < 0:
            raise InputError(f"strength must be a non-negative number, got {strength!r}")
        for name, v in (("threshold", threshold), ("relative", relative)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                raise InputError(f"{name} must be a non-negative number, got {v!r}")
        self.strength, self.threshold, self.relative = float(strength), float(threshold), float(relative)
        self.seconds = 0.0  # spent in the optimizer-step hooks of attach() (the cycle's share of training time)
        self._totals: dict[int, torch.Tensor] = {}  # per slice (by id): its positions per group channel
        plain = unmasked(model)
        gm = lower_modules(eval_capture(plain, example_inputs))  # the groups of the deployed function (dropout off)
        an = Analysis(gm)
        sp = an.spaces
        names = {n for n, _ in plain.named_parameters()
                 if not any(fnmatch.fnmatch(n, pat) for pat in (exclude or []))}
        found, leaves = param_slices(an, names)
        total = sum(size for _, size in leaves)
        slices = [_Slice(s.name, s.dim, s.channel, bias=s.name.rpartition(".")[2] == "bias") for s in found]
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
    def _members(self, model: nn.Module) -> list[_Member]:
        """Every slice resolved on ``model`` (checked against what the GroupLasso was built for)."""
        out = []
        for s in self.slices:
            m = _member(model, s)
            if m is None:
                raise InputError(f"'{s.name}' is not a parameter of {type(model).__name__}: pass the model the "
                                 "GroupLasso was built from (or a copy of it)")
            if m.param.shape[s.dim] != s.channel.numel():
                raise InputError(f"'{s.name}' has {m.param.shape[s.dim]} entries in dim {s.dim}, the GroupLasso was "
                                 f"built for {s.channel.numel()}: build it again for the changed model")
            out.append(m)
        return out

    def norms(self, model: nn.Module) -> torch.Tensor:
        """``||w_g||`` per group channel (no gradient)."""
        members = self._members(model)
        return _Reading(members).sums(members, self.channels).sqrt()

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """``R = sum_g sqrt(n_g) ||u_g||``, differentiable (a term for a loss of your own: ``loss + lam * penalty``;
        its gradient is :meth:`regularize`'s over ``s_t``)."""
        members = self._members(model)
        scales = _Reading(members).scales
        sq = None
        for m in members:
            v = m.value()
            u = v / scales[id(m.param)].to(v)
            dims = [d for d in range(v.dim()) if d != m.slice.dim]
            per = u.pow(2).sum(dims) if dims else u.pow(2)
            if sq is None:
                sq = torch.zeros(self.channels, dtype=per.dtype, device=per.device)
            sq = sq.index_add(0, m.slice.channels.to(per.device), per[m.slice.hit.to(per.device)].to(sq.dtype))
        if sq is None:
            return torch.zeros(())
        return (sq.add(1e-12).sqrt() * self.sizes.to(sq).sqrt()).sum()

    @torch.no_grad()
    def regularize(self, model: nn.Module) -> None:
        """Add ``strength * dR/du`` (``= strength * s_t * dR/dw``) to the parameters' gradients (after ``backward()``,
        before the optimizer step; a parameter without a gradient gets one). Shrinks groups; exact zeros come from
        :meth:`step`."""
        self._regularize(self._members(model))

    @torch.no_grad()
    def _regularize(self, members: list[_Member]) -> None:
        if not members or self.strength == 0:
            return
        r = _Reading(members)
        norm = r.sums(members, self.channels, relative=True).sqrt()
        coef = torch.where(norm > 0, self.sizes.sqrt() / norm.clamp_min(1e-300), torch.zeros_like(norm))
        pull: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for m in members:
            t, s = m.param, m.slice
            v = r.values[id(t)]
            shape = [1] * t.dim()
            shape[s.dim] = -1
            c = torch.where(s.hit, coef[s.safe], 0.0)
            g = v * c.to(v.dtype).to(v.device).view(shape)
            prev = pull.get(id(t))
            pull[id(t)] = (t, g if prev is None else prev[1] + g)
        normalized = {id(m.param) for m in members if m.slice.name in self.normalized}
        for key, (t, g) in pull.items():
            v = r.values[key]
            g = g * (self.strength / r.scales[key]).to(g)
            if key in normalized:  # keep the tensor's overall scale: only the pull between its groups is left
                g = g - (g * v).sum() / v.pow(2).sum().clamp_min(1e-30) * v
            if t.grad is None:
                t.grad = g
            else:
                t.grad.add_(g)

    @torch.no_grad()
    def step(self, model: nn.Module, lr: float | dict[int, float], hold: dict[int, torch.Tensor] | None = None) -> int:
        """The exact-zero step. Every slice of a group member (a row, a column, a norm weight's entry...; a bias's
        entry only once the same module's weight entries of its channel are zero, since a zero bias alone makes
        nothing constant or unread) whose root mean square is at most
        ``threshold * lr`` and at most ``relative * s_t`` becomes exact zeros, and so does every group channel with
        ``||w_g|| <= threshold * lr * sqrt(n_g)`` and ``||u_g|| <= relative * sqrt(n_g)`` (``lr``: a number, or per
        parameter ``id``). With ``hold`` (per slice index, the positions zeroed so far; updated), what was zeroed
        before stays zero. A zero slice makes its channel constant (a producer row) or unread (a consumer column) in
        that member; ``minimize`` removes the channel once that holds for its whole group. Returns how many group
        channels are exact zeros after it."""
        members = self._members(model)
        self._step(members, lr, hold)
        return int((_Reading(members).sums(members, self.channels) == 0).sum()) if members else 0

    @torch.no_grad()
    def _step(self, members: list[_Member], lr: float | dict[int, float], hold: dict[int, torch.Tensor] | None) -> None:
        if not members:
            return
        rate = {id(m.param): float(lr.get(id(m.param), 0.0)) if isinstance(lr, dict) else float(lr) for m in members}
        if len(set(rate.values())) == 1:
            rates = torch.full((self.channels,), next(iter(rate.values())), dtype=torch.float64)
        else:
            rates = torch.zeros(self.channels, dtype=torch.float64)
            for m in members:
                rates.scatter_reduce_(0, m.slice.channels, torch.full((m.slice.channels.numel(),), rate[id(m.param)],
                                                                       dtype=torch.float64), reduce="amax")
        r = _Reading(members)
        root = self.sizes.sqrt()
        w2, u2 = r.both(members, self.channels)
        whole = (w2.sqrt() <= rates * self.threshold * root) & (u2.sqrt() <= self.relative * root)
        # per module, the group channels whose weight entries there are all zero after this step: its bias entry
        # for such a channel may go alone (the channel is then constant in that member, or unread)
        dead: dict[int, torch.Tensor] = {}
        order = sorted(range(len(members)), key=lambda i: members[i].slice.bias)  # weights first
        for i in order:
            m, per = members[i], r.squares[i]
            t, s = m.param, m.slice
            rms = per.div(t.numel() // max(t.shape[s.dim], 1)).sqrt()
            zero = s.hit & whole[s.safe]
            small = s.hit & (rms <= rate[id(t)] * self.threshold) & (rms <= self.relative * r.scales[id(t)])
            if s.bias:
                gone = dead.get(id(m.owner))
                if gone is not None:
                    zero |= small & gone[s.safe]
            else:
                zero |= small
            if hold is not None:
                if i in hold:
                    zero |= hold[i]
                hold[i] = zero
            if not s.bias:
                total = self._totals.get(id(s))
                if total is None:  # per group channel, how many of this slice's positions hold it (fixed)
                    total = self._totals[id(s)] = torch.zeros(self.channels, dtype=torch.long).index_add_(
                        0, s.channels, torch.ones_like(s.channels))
                alive = torch.zeros(self.channels, dtype=torch.long)
                alive.index_add_(0, s.channels, ((~zero[s.hit]) & (per[s.hit] > 0)).long())
                mine = (total > 0) & (alive == 0)
                dead[id(m.owner)] = mine if id(m.owner) not in dead else dead[id(m.owner)] | mine
            if bool(zero.any()):
                shape = [1] * t.dim()
                shape[s.dim] = -1
                t.mul_((~zero).to(t.dtype).to(t.device).view(shape))

    @contextlib.contextmanager
    def attach(self, model: nn.Module) -> Iterator["GroupLasso"]:
        """While open: before every ``optimizer.step()`` of an optimizer holding parameters of ``model``,
        :meth:`regularize`; after it, :meth:`step` with each parameter's learning rate from the optimizer, the groups
        zeroed so far held at zero. Any optimizer and loop, DistributedDataParallel included (both read only the
        weights and the reduced gradients, equal on every rank)."""
        if self.strength == 0:
            yield self
            return
        members = self._members(model)  # resolved once: the same parameters for the whole training
        ids = {id(m.param) for m in members}
        held: dict[int, torch.Tensor] = {}

        def ours(optimizer: torch.optim.Optimizer) -> dict[int, float]:
            return {id(p): float(g["lr"]) for g in optimizer.param_groups for p in g["params"] if id(p) in ids}

        def before(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            t0 = time.perf_counter()
            if ours(optimizer):
                self._regularize(members)
            self.seconds += time.perf_counter() - t0

        def after(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            t0 = time.perf_counter()
            lrs = ours(optimizer)
            if lrs:
                self._step(members, lrs, held)
            self.seconds += time.perf_counter() - t0

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
