"""``GroupLasso``: structure-inducing training from fxprune's own channel groups.

``minimize`` removes a channel only when it is exactly dead or unread in *every* member of its group (producer rows
and biases, consumer columns, per-channel parameters such as norm weights and layer scales, every tensor of a
residual stream, whole heads). The regularizer is built from those groups (:func:`fxprune.analyze` on a capture
of the model), so that what it pushes to zero is what ``minimize`` can take out; nothing is listed by hand. It
covers the groups one slice per dim can hold (:func:`~fxprune.analysis.groups.param_slices`): of a dim of heads x
head dim, the head-dim channels, not whole heads; a rotary q/k dim (two halves of one group) not at all.

For channel ``g`` of a free group, ``w_g`` is the vector of every parameter entry that channel ``g`` owns, ``n_g``
its length. A group mixes tensors of very different scales (a BatchNorm or LayerNorm weight near 1 beside conv
weights near 0.05), so each entry is measured against its own tensor: ``u = w / s_t``, with ``s_t`` the root mean
square of the nonzero entries of the tensor ``t`` it belongs to (a constant, not differentiated). The penalty is
Yuan and Lin's group lasso over those relative entries,

    R = sum_g sqrt(n_g) * ||u_g||_2,      dR/du_i = sum over the groups g of i of  sqrt(n_g) * u_i / ||u_g||,

which is of order 1 on an entry of typical size in its group, whatever the group's size and the tensor's scale.
Training adds ``strength * dR/du`` to the gradients before each optimizer step (``||u_g||`` and ``s_t`` as of the
last reading of the weights, below; a group-lasso gradient
preconditioned by each tensor's scale, in the spirit of Torch-Pruning's ``regularize``); under Adam-type
optimizers, which scale each coordinate's step by its own gradient history, that pulls every entry of a group the
loss does not defend towards zero at about ``lr`` per step, large norm weights and small conv weights alike. A
gradient never lands on zero, so after each reading the **exact-zero step** sets to exact zeros every slice
of a group member (a row, a column, a norm weight's entry; a bias entry only once the same module's weight entries
of its channel are zero: a zero bias alone makes nothing constant or unread, and biases that start at zero,
BatchNorm's, would be held there) and every whole group whose root mean square has fallen
to the optimizer's step size, ``threshold * lr`` (the scale at which Adam leaves a weight oscillating about zero),
and to a ``relative`` fraction of its own tensor's scale ``s_t`` (so that a tensor whose scale a normalization
ignores, shrinking as a whole, is never zeroed for it), and keeps what it zeroed at zero for the rest of that
training (as HESSO holds its redundant groups). A zero
producer row or norm weight makes its channel constant there, a zero column leaves it unread: ``minimize`` removes
the channel once every member of its group is so (constants folded), exactly.

A group channel whose every LayerNorm / RMSNorm weight entry is zero is carried by none of those norms' outputs,
only by their statistics (the mean and variance over all channels), and a transformer's loss defends such a
residual-stream channel through them: the pull alone does not bring its writers to zero (measured on a ViT,
``docs/results.md``), and ``CompensatedLayerNorm`` makes a removal exact only for a constant channel. The exact-zero
step therefore zeroes all of such a channel, writers included (``statistics_only=True``, the default). That is not a
small step, since the statistics change; inside the cycle its accuracy rule judges it like a masking step. The
rule is on only where every normalization of the model is one whose zero weight entry drops its channel from the
output (``nn.LayerNorm``, ``nn.RMSNorm``, and hand-written ``...LayerNorm`` / ``...RMSNorm`` classes a probe
confirms): a norm without a weight, a group norm or Gemma's ``1 + weight`` turns it off (:func:`_gates`).

:meth:`GroupLasso.attach` installs both around every ``optimizer.step()`` of an optimizer that holds the model's
parameters (``lr`` read from the optimizer's param group), so a training loop needs no change. It reads the weights
after every ``every``-th step only (default 16: a reading is a few dozen small tensor ops per sliced tensor, as
long as a small network's whole training step): that one pass takes the exact-zero step and stores the pull's
coefficients as one full-shape tensor per parameter; the pull before each step is those times the current weights
(one op for all), and what was zeroed is zeroed again after every step (one op). For a loop of your
own: :meth:`GroupLasso.penalty` (``R``, differentiable, for a loss term), :meth:`GroupLasso.regularize` (after
``backward()``) and :meth:`GroupLasso.step` (after ``optimizer.step()``).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import time
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from fxprune.errors import InputError, require
from fxprune.graph.capture import unwrapped
from fxprune.graph.rebuild import attr_owner
from fxprune.passes.mask import HeldMask

__all__ = ["GroupLasso", "group_lasso", "DEFAULT_STRENGTH", "DEFAULT_EVERY"]

DEFAULT_STRENGTH = 1e-3  # fxprune.squeeze_release's default ``lasso``
DEFAULT_EVERY = 16  # optimizer steps per reading of the weights (GroupLasso(every=...), squeeze_release(lasso_every=...))
RELATIVE = 0.1  # the exact-zero step takes only slices and groups this small against their own tensors' scale


@dataclass(frozen=True)
class _Slice:
    """Dim ``dim`` of parameter ``name``: position i belongs to group channel ``channel[i]`` (-1: none)."""

    name: str
    dim: int
    channel: torch.Tensor
    bias: bool = False  # a bias (added, never multiplied): zero alone it makes nothing constant or unread
    gate: bool = False  # a LayerNorm's or RMSNorm's weight: what of a channel the norm's output carries

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
    mask: torch.Tensor | None = None  # a lone fxprune mask parametrization's 0/1 mask: the value is ``param * mask``

    def value(self) -> torch.Tensor:
        return getattr(self.owner, self.leaf) if self.masked else self.param


class _Reading:
    """One pass over the members' current values (no gradient), laid end to end as its :class:`_Plan` says: ``P``, each
    position's sum of squares (float64, every slice one after another); per parameter, its value and its scale
    ``s_t`` (the root mean square of its nonzero entries; 1 when none, or when all their squares underflow)."""

    def __init__(self, plan: "_Plan") -> None:
        self.values = plan.values()
        if not plan.members:  # a model without free groups: nothing to read
            self.scale = self.squares = torch.zeros(0, dtype=torch.float64)
            self.scale_at = self.scale
            return
        squares = torch._foreach_pow(self.values, 2)
        pers = [squares[p].sum(d, dtype=torch.float64) if d else squares[p].to(torch.float64)
                for p, d in zip(plan.param_of, plan.dims)]
        counts = torch.stack([torch.count_nonzero(v) for v in self.values])
        totals = torch.stack([pers[i].sum() for i in plan.first_member])
        squares_at = torch.cat(pers)
        if not plan.cpu:
            counts, totals, squares_at = counts.cpu(), totals.cpu(), squares_at.cpu()
        # (entries so small that their squares underflow count as none: a scale of 0 would divide by zero)
        self.scale = torch.where((counts > 0) & (totals > 0), totals.div(counts).sqrt(), 1.0)
        self.squares = squares_at
        self.scale_at = self.scale[plan.param_pos]  # s_t of every position

    def sums(self, plan: "_Plan", relative: bool = False, keep: torch.Tensor | None = None) -> torch.Tensor:
        """``||w_g||^2`` per group channel, or with ``relative`` ``||u_g||^2`` (each tensor over its own scale); one
        slot more at the end, where positions of no group channel go. ``keep``: only those positions count."""
        squares = self.squares if keep is None else self.squares * keep
        part = squares / self.scale_at.pow(2) if relative else squares
        return torch.zeros(plan.channels + 1, dtype=torch.float64).index_add_(0, plan.channel, part)


class _Plan:
    """The members' positions laid end to end, built once per set of members, so that a step reads and writes every
    slice with a few whole-vector ops (an index_add per group sum, a gather per group coefficient) instead of a
    dozen per slice. ``channel[i]``: the group channel of position ``i`` (``channels`` where none)."""

    def __init__(self, members: list[_Member], channels: int) -> None:
        self.members, self.channels = members, channels
        firsts: dict[int, int] = {}
        for i, m in enumerate(members):
            firsts.setdefault(id(m.param), i)
        self.first_member = list(firsts.values())
        self.firsts = [members[i] for i in self.first_member]
        self.cpu = all(m.param.device.type == "cpu" for m in self.firsts)
        self._direct = [m for m in self.firsts if m.mask is not None]  # values computed here (param * mask)
        self._rates: tuple[Any, ...] | None = None  # the learning rates the step's tensors below were built for
        index = {key: k for k, key in enumerate(firsts)}
        self.param_of = [index[id(m.param)] for m in members]
        self.dims = [[d for d in range(m.param.dim()) if d != m.slice.dim] for m in members]
        self.views = []
        for m in members:
            shape = [1] * m.param.dim()
            shape[m.slice.dim] = -1
            self.views.append(shape)
        lengths = [m.slice.channel.numel() for m in members]
        self.lengths = lengths
        member_pos = torch.repeat_interleave(torch.arange(len(members)), torch.tensor(lengths, dtype=torch.long))
        raw = torch.cat([m.slice.channel for m in members]) if members else torch.zeros(0, dtype=torch.long)
        self.hit = raw >= 0
        self.channel = torch.where(self.hit, raw, channels)
        self.param_pos = torch.tensor(self.param_of, dtype=torch.long)[member_pos]
        self.entries = torch.tensor([m.param.numel() // max(m.param.shape[m.slice.dim], 1) for m in members],
                                    dtype=torch.float64)[member_pos]  # entries a position's slice holds
        self.bias = torch.tensor([m.slice.bias for m in members], dtype=torch.bool)[member_pos]
        self.gate = self.hit & torch.tensor([m.slice.gate for m in members], dtype=torch.bool)[member_pos]
        self.gates = torch.zeros(channels + 1, dtype=torch.long).index_add_(0, self.channel, self.gate.long())
        # the bias rule: per (weight member, group channel) its positions; per (module, group channel) those keys
        owners: dict[int, int] = {}
        owner_of = torch.tensor([owners.setdefault(id(m.owner), len(owners)) for m in members], dtype=torch.long)
        width = channels + 1
        weight = self.hit & ~self.bias
        self.weight_pos = weight.nonzero().squeeze(1)
        keys, self.weight_key = torch.unique(member_pos[weight] * width + self.channel[weight], return_inverse=True)
        self.keys = keys.numel()
        key_owner = owner_of[keys // width] * width + keys % width
        bias = self.hit & self.bias
        self.bias_pos = bias.nonzero().squeeze(1)
        bias_owner = owner_of[member_pos[bias]] * width + self.channel[bias]
        _, where = torch.unique(torch.cat([key_owner, bias_owner]), return_inverse=True)
        self.key_slot, self.bias_slot = where[:len(key_owner)], where[len(key_owner):]
        self.slots = int(where.max()) + 1 if where.numel() else 0
        self.member_pos = member_pos

    def values(self) -> list[torch.Tensor]:
        """Every parameter's current value as the forward reads it, detached: ``original * mask`` for one held by an
        fxprune mask parametrization (its forward, as one op for all of them), the parametrized value for any other."""
        if self._direct:
            products = iter(torch._foreach_mul([m.param.detach() for m in self._direct],
                                               [m.mask.to(m.param.dtype) for m in self._direct]))
        return [next(products) if m.mask is not None else m.value().detach() for m in self.firsts]

    def rates(self, rate: list[float], channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per position and per group channel (the largest of its members'), the learning rate of ``rate`` (one per
        parameter); rebuilt only when the rates change."""
        key = tuple(rate)
        if self._rates is None or self._rates[0] != key:
            rate_at = torch.tensor(rate, dtype=torch.float64)[self.param_pos]
            if len(set(rate)) == 1:
                rates = torch.full((channels + 1,), rate[0], dtype=torch.float64)
            else:
                rates = torch.zeros(channels + 1, dtype=torch.float64).scatter_reduce_(0, self.channel, rate_at,
                                                                                       reduce="amax")
            self._rates = (key, rate_at, rates)
        return self._rates[1], self._rates[2]

    def pieces(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """``flat`` (one entry per position) cut into one view per member, shaped to broadcast along its dim."""
        return [piece.view(shape) for piece, shape in zip(flat.split(self.lengths), self.views)]


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


# Normalizations as the lowered graph calls them (weight: argument 2 of each).
_NORM_CALLS: set[Any] = {F.layer_norm, F.group_norm, F.rms_norm} | _targets(
    "layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm", "group_norm", "native_group_norm")


def _gates(model: nn.Module, gm: Any) -> set[str] | None:
    """The names of the norm weights whose zero entry leaves that channel out of the norm's output (its "gates"):
    every ``nn.LayerNorm`` / ``nn.RMSNorm`` / ``nn.GroupNorm`` (each channel of a group norm goes alone since its
    groups are compensated), and the classes models write for them (``LlamaRMSNorm``, ``ConvNextLayerNorm``,
    ``CompensatedGroupNorm``...: by name) when a probe shows their output is zero with a zero weight (not Gemma's
    ``1 + weight``). None when some normalization of the model is none of those (a norm without a weight, a class
    the probe rejects, one called on a tensor not held as a recognized weight): a channel's norm weights being
    zero then does not say that no norm output carries it."""
    gates: set[str] = set()
    for path, m in model.named_modules():
        named = type(m).__name__.endswith(("LayerNorm", "RMSNorm", "GroupNorm"))
        if not (isinstance(m, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)) or named):
            continue
        w = getattr(m, "weight", None)
        group = isinstance(m, nn.GroupNorm) or type(m).__name__.endswith("GroupNorm")
        direct = (isinstance(m, (nn.LayerNorm, nn.RMSNorm)) or type(m).forward is nn.GroupNorm.forward
                  or named and _zero_weight_zero_output(m, channels_first=group))
        if not direct or not isinstance(w, torch.Tensor) or w.dim() != 1:
            return None
        gates.add(f"{path}.weight" if path else "weight")
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in _NORM_CALLS:
            w = n.args[2] if len(n.args) > 2 else n.kwargs.get("weight")
            if getattr(w, "op", None) != "get_attr" or w.target not in gates:
                return None
    return gates


def _zero_weight_zero_output(m: nn.Module, channels_first: bool = False) -> bool:
    """Whether a copy of the norm ``m`` with its weight (and bias) zeroed gives zeros on a probe of its width
    (``channels_first``: a group norm's, channels at dim 1)."""
    probe = copy.deepcopy(m)
    w = getattr(probe, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 1:
        return False
    with torch.no_grad():
        w.zero_()
        if isinstance(getattr(probe, "bias", None), torch.Tensor):
            probe.bias.zero_()
        try:
            shape = (2, w.shape[0], 3) if channels_first else (2, 3, w.shape[0])
            out = probe(torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(w.dtype))
        except Exception:  # (a norm over another layout: not recognized)
            return False
    return isinstance(out, torch.Tensor) and bool((out == 0).all())


def _member(model: nn.Module, s: _Slice) -> _Member | None:
    """Slice ``s`` resolved on ``model`` (None where ``model`` has no such parameter)."""
    try:
        owner, leaf = attr_owner(model, s.name)
    except AttributeError:
        return None
    if parametrize.is_parametrized(owner, leaf):
        chain = owner.parametrizations[leaf]
        mask = getattr(chain[0], "mask", None) if len(chain) == 1 and isinstance(chain[0], HeldMask) else None
        return _Member(s, chain.original, owner, leaf, True, mask)
    t = owner._parameters.get(leaf)
    return _Member(s, t, owner, leaf, False) if isinstance(t, torch.Tensor) else None


class GroupLasso:
    """The group lasso over the free channel groups fxprune finds in ``model`` (see the module docstring).

    ``exclude``: parameter-name globs whose slices are left out (never shrunk). Frozen groups (model outputs, ops
    without a rule) are never regularized, nor model inputs but for one case: ``inputs="linear"`` (the default), the
    features of an input that linear layers of ``model``'s class read through their weights alone (a table, a
    flattened image: :func:`~fxprune.interop.module.selectable_inputs`), whose columns the loss defends as it
    defends any channel; ``True``, also the channels convolutions read so (an image's colors); ``False``, none.
    (Measured: on the image models of ``benchmarks/user_models.py``, pulling at the colors cost compression;
    benchmarks.md, section 9, stop 56.) ``every``:
    inside :meth:`attach`, read the weights (group norms, scales, the exact-zero decisions) every ``every``
    optimizer steps (default 16; 1: every step); new zeros come up to ``every - 1`` steps later.
    ``statistics_only``: zero every slice of a group channel once all its LayerNorm / RMSNorm weight entries are
    zero (see the module docstring); ``False`` leaves such channels to the pull. ``keep`` (tensor name, or
    ``"name:dim"`` -> reason) and ``whole_heads`` (``"name:dim"`` of head dims) leave out groups as
    :class:`~fxprune.passes.minimize.MinimizeOptions` keeps them: those of ``keep`` wholly, the channels inside the
    heads of ``whole_heads`` (whole heads are still pulled). ``fp.squeeze_release`` passes what
    :func:`~fxprune.minimize_module` kept because the model's class cannot lose it.

    >>> import torch, fxprune as fp
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> reg = fp.GroupLasso(net, (torch.randn(3, 4),))
    >>> reg.channels   # the 8 hidden units (row and bias of layer 0, column of layer 2), the 4 input features
    12
    >>> with torch.no_grad(): net[0].weight[:3] *= 1e-4; net[0].bias[:3] = 0; net[2].weight[:, :3] *= 1e-4
    >>> reg.step(net, lr=1e-3)     # the three units at the scale of a step become exact zeros
    3
    """

    def __init__(self, model: nn.Module, example_inputs: Sequence[Any], *, strength: float = DEFAULT_STRENGTH,
                 threshold: float = 2.0, relative: float = RELATIVE, exclude: Sequence[str] | None = None,
                 every: int = DEFAULT_EVERY, statistics_only: bool = True,
                 inputs: bool | Literal["linear"] = "linear", keep: Mapping[str, str] | None = None,
                 whole_heads: Sequence[str] = ()) -> None:
        import fnmatch

        from fxprune.analysis.groups import Analysis, param_slices
        from fxprune.graph.shapes import node_spec
        from fxprune.passes.mask import weight_sources
        from fxprune.graph.masks import unmasked
        from fxprune.interop.module import eval_capture, selectable_inputs
        from fxprune.passes.lower import lower_modules

        if not isinstance(model, nn.Module):
            raise InputError(f"GroupLasso takes the model to be trained (an nn.Module), got {type(model).__name__}")
        for name, v in (("strength", strength), ("threshold", threshold), ("relative", relative)):
            require(name, v, "non-negative number")
        require("every", every, "positive integer")
        if inputs not in (True, False, "linear"):
            raise InputError(f"inputs must be 'linear', True or False, got {inputs!r}")
        self.strength, self.threshold, self.relative = float(strength), float(threshold), float(relative)
        self.every, self.statistics_only = every, bool(statistics_only)
        self.seconds = 0.0  # spent in the optimizer-step hooks of attach() (the cycle's share of training time)
        plain = unmasked(unwrapped(model))  # (parameter names are the module's inside DDP, DataParallel, compile)
        gm = lower_modules(eval_capture(plain, example_inputs))  # the groups of the deployed function (dropout off)
        chosen = selectable_inputs(plain, gm) if inputs else {}  # per input the class may cut, the dim its layers read
        if inputs == "linear":  # a linear layer reads the last dim (a convolution reads dim 1 of 3 or more)
            ranks = {n.name: len(node_spec(n).shape) for n in gm.graph.nodes if n.name in chosen}
            chosen = {k: d for k, d in chosen.items() if d == ranks[k] - 1}
        an = Analysis(gm, dict(keep or {}), inputs=set(chosen))
        an.hold_inside_heads(whole_heads, "its class keeps the channels inside these heads")
        sp = an.spaces
        names = {n for n, _ in plain.named_parameters()
                 if not any(fnmatch.fnmatch(n, pat) for pat in (exclude or []))}
        # a weight norm's direction v: w does not shrink with it (g * v / ||v||), and a zero row of v is 0 / 0 = NaN;
        # its scale g is pulled (a zero entry of g zeroes that row of w)
        names -= {n for n, role in weight_sources(plain).items() if role != "scale"}
        found, leaves = param_slices(an, names)
        total = sum(size for _, size in leaves)
        gates = _gates(plain, gm)
        self.statistics_only = self.statistics_only and gates is not None
        gates = gates or set()
        slices = [_Slice(s.name, s.dim, s.channel, bias=s.name.rpartition(".")[2] == "bias", gate=s.name in gates)
                  for s in found]
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
        self._root = torch.cat([sizes.sqrt(), torch.zeros(1, dtype=torch.float64)])  # sqrt(n_g); 0 for no group

    # ---- reading ---------------------------------------------------------------------------------------------
    def _members(self, model: nn.Module) -> list[_Member]:
        """Every slice resolved on ``model`` (checked against what the GroupLasso was built for)."""
        model = unwrapped(model)
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
        plan = _Plan(self._members(model), self.channels)
        return _Reading(plan).sums(plan)[:-1].sqrt()

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """``R = sum_g sqrt(n_g) ||u_g||``, differentiable (a term for a loss of your own: ``loss + lam * penalty``;
        its gradient is :meth:`regularize`'s over ``s_t``)."""
        plan = _Plan(self._members(model), self.channels)
        scales = _Reading(plan).scale
        sq = None
        for m, p, dims in zip(plan.members, plan.param_of, plan.dims):
            v = m.value()
            u = v / scales[p].to(v)
            per = u.pow(2).sum(dims) if dims else u.pow(2)
            if sq is None:
                sq = torch.zeros(self.channels, dtype=per.dtype, device=per.device)
            sq = sq.index_add(0, m.slice.channels.to(per.device), per[m.slice.hit.to(per.device)].to(sq.dtype))
        if sq is None:
            return torch.zeros(())
        return (sq.add(1e-12).sqrt() * self.sizes.to(sq).sqrt()).sum()

    @torch.no_grad()
    def regularize(self, model: nn.Module, lr: float | None = None) -> None:
        """Add ``strength * dR/du`` (``= strength * s_t * dR/dw``) to the parameters' gradients (after ``backward()``,
        before the optimizer step; a parameter without a gradient gets one). Shrinks groups; exact zeros come from
        :meth:`step`. ``lr`` (the step's learning rate, as :meth:`attach` reads it): each value's pull is capped so
        that a plain gradient step takes it to zero at most, never past it."""
        self._regularize(_Plan(self._members(model), self.channels), lr)

    @torch.no_grad()
    def _regularize(self, plan: _Plan, lr: float | None = None) -> None:
        if plan.members and self.strength != 0:
            rate = None if lr is None else [float(lr)] * len(plan.firsts)
            self._pull_with(plan, self._coefficients(plan, _Reading(plan), rate=rate))

    def _coefficients(self, plan: _Plan, r: _Reading, keep: torch.Tensor | None = None,
                      rate: list[float] | None = None) -> dict[str, Any]:
        """The pull per unit of value, from the reading ``r``: per parameter a full-shape tensor (``strength / s_t``
        times the sum of its slices' ``sqrt(n_g) / ||u_g||``, its mask folded in), and which parameters feed a
        BatchNorm. ``keep``: positions the exact-zero step has just zeroed (False) count as zero. ``rate``: each
        parameter's learning rate; a coefficient is then at most ``1 / rate``, so that a plain gradient step's pull
        takes a value to zero at most, never past it (past it, a group smaller than ``rate * strength`` flips sign
        and grows at every step until the weights overflow)."""
        norm = r.sums(plan, relative=True, keep=keep)[:-1].sqrt()
        coef = torch.where(norm > 0, self._root[:-1] / norm.clamp_min(1e-300), torch.zeros_like(norm))
        at = torch.cat([coef, coef.new_zeros(1)])[plan.channel]  # each position's coefficient (0: no group)
        kinds = {(m.param.dtype, m.param.device) for m in plan.firsts}
        cast = {(dtype, device): plan.pieces(at.to(dtype).to(device)) for dtype, device in kinds}
        full = [torch.zeros_like(m.param) for m in plan.firsts]
        for i, (p, m) in enumerate(zip(plan.param_of, plan.members)):
            full[p].add_(cast[m.param.dtype, m.param.device][i])
        torch._foreach_mul_(full, (self.strength / r.scale).tolist())
        for p, m in enumerate(plan.firsts):
            if m.mask is not None:  # (multiplied with the parameter itself, not its masked value)
                full[p].mul_(m.mask.to(full[p].dtype))
        capped = [p for p, lr in enumerate(rate or []) if lr > 0]
        if capped:
            torch._foreach_clamp_max_([full[p] for p in capped], [1.0 / rate[p] for p in capped])  # type: ignore[index]
        kept = [p for p, m in enumerate(plan.firsts) if m.slice.name in self.normalized]
        return {"full": full, "kept": kept, "plain": [p for p in range(len(full)) if p not in kept]}

    @staticmethod
    def _pull_with(plan: _Plan, coefficients: dict[str, Any]) -> None:
        """Add the pull, :meth:`_coefficients`' ``full`` times each parameter's current value, to its gradient (one op
        for every parameter; a parameter without a gradient gets one). A weight that feeds a BatchNorm keeps its
        overall scale: only the part of its pull across its groups is added (projected off its current value)."""
        full, kept, plain = coefficients["full"], coefficients["kept"], coefficients["plain"]
        factors = [m.param.detach() if m.mask is not None or not m.masked else m.value().detach() for m in plan.firsts]
        for m in plan.firsts:
            if m.param.grad is None:
                m.param.grad = torch.zeros_like(m.param)
        grads = [m.param.grad for m in plan.firsts]
        torch._foreach_addcmul_([grads[p] for p in plain], [factors[p] for p in plain], [full[p] for p in plain])
        for p in kept:
            m = plan.firsts[p]
            v = m.value().detach() if m.masked else factors[p]
            g = full[p] * factors[p]
            grads[p].add_(g - (g * v).sum() / v.pow(2).sum().clamp_min(1e-30) * v)

    @torch.no_grad()
    def step(self, model: nn.Module, lr: float | dict[int, float], hold: dict[str, Any] | None = None) -> int:
        """The exact-zero step. Every slice of a group member (a row, a column, a norm weight's entry...; a bias's
        entry only once the same module's weight entries of its channel are zero, since a zero bias alone makes
        nothing constant or unread) whose root mean square is at most
        ``threshold * lr`` and at most ``relative * s_t`` becomes exact zeros, and so does every group channel with
        ``||w_g|| <= threshold * lr * sqrt(n_g)`` and ``||u_g|| <= relative * sqrt(n_g)`` (``lr``: a number, or per
        parameter ``id``), and every group channel whose LayerNorm / RMSNorm weight entries are all zero
        (``statistics_only``). With ``hold`` (a dict the step keeps what it zeroed in; pass the same one each step), what
        was zeroed before stays zero. A zero slice makes its channel constant (a producer row) or unread (a consumer
        column) in that member; ``minimize`` removes the channel once that holds for its whole group. Returns how many
        group channels are exact zeros after it."""
        plan = _Plan(self._members(model), self.channels)
        self._step(plan, lr, hold)
        return int((_Reading(plan).sums(plan)[:-1] == 0).sum()) if plan.members else 0

    @torch.no_grad()
    def _step(self, plan: _Plan, lr: float | dict[int, float] | list[float], hold: dict[str, Any] | None,
              coefficients: dict[str, Any] | None = None) -> None:
        """:meth:`step`; with ``coefficients`` (a dict), the pull's coefficients for the next steps go into it, read
        from the same pass over the weights."""
        if not plan.members:
            return
        if isinstance(lr, list):  # (attach: one per parameter already)
            rate = lr
        else:
            rate = [float(lr.get(id(m.param), 0.0)) if isinstance(lr, dict) else float(lr) for m in plan.firsts]
        rate_at, rates = plan.rates(rate, self.channels)
        r = _Reading(plan)
        root = self._root
        w2, u2 = r.sums(plan), r.sums(plan, relative=True)
        whole = (w2.sqrt() <= rates * self.threshold * root) & (u2.sqrt() <= self.relative * root)
        rms = r.squares.div(plan.entries).sqrt()
        small = plan.hit & (rms <= rate_at * self.threshold) & (rms <= self.relative * r.scale_at)
        zero = (plan.hit & whole[plan.channel]) | (small & ~plan.bias)
        if hold is not None and "zero" in hold:
            zero |= hold["zero"]
        if self.statistics_only and plan.gates.any():  # channels only the norms' statistics still read: all of it
            carried = torch.zeros_like(plan.gates).index_add_(0, plan.channel, (plan.gate & ~zero & (r.squares > 0)).long())
            zero |= plan.hit & ((plan.gates > 0) & (carried == 0))[plan.channel]
        # per module, the group channels whose weight entries there are all zero after this step: its bias entry
        # for such a channel may go alone (the channel is then constant in that member, or unread)
        alive = ((~zero) & (r.squares > 0))[plan.weight_pos].long()
        gone = torch.zeros(plan.keys, dtype=torch.long).index_add_(0, plan.weight_key, alive) == 0
        dead = torch.zeros(plan.slots, dtype=torch.long).index_add_(0, plan.key_slot, gone.long()) > 0
        zero[plan.bias_pos] |= small[plan.bias_pos] & dead[plan.bias_slot]
        if hold is not None:
            hold["zero"] = zero
        hits = torch.zeros(len(plan.members), dtype=torch.long).index_add_(0, plan.member_pos, zero.long()).tolist()
        keep = ~zero
        hit = [i for i, k in enumerate(hits) if k]
        kinds = {(plan.members[i].param.dtype, plan.members[i].param.device) for i in hit}
        cast = {(dtype, device): plan.pieces(keep.to(dtype).to(device)) for dtype, device in kinds}
        writes = ([plan.members[i].param for i in hit],
                  [cast[plan.members[i].param.dtype, plan.members[i].param.device][i] for i in hit])
        if hit:  # (a parameter appears once per dim: no two in-place products on one tensor share a shape)
            torch._foreach_mul_(*writes)
        if hold is not None:
            hold["writes"] = writes
        if coefficients is not None and self.strength != 0:
            coefficients.update(self._coefficients(plan, r, keep, rate))

    @staticmethod
    @torch.no_grad()
    def _hold(hold: dict[str, Any]) -> None:
        """Zero again what the last exact-zero step zeroed (one in-place product per slice that has zeros)."""
        params, keeps = hold.get("writes", ([], []))
        if params:
            torch._foreach_mul_(params, keeps)

    @contextlib.contextmanager
    def attach(self, model: nn.Module) -> Iterator["GroupLasso"]:
        """While open: before every ``optimizer.step()`` of an optimizer holding parameters of ``model``, the pull
        (:meth:`regularize`'s); after every ``every``-th (the constructor's; default 16), :meth:`step` with each
        parameter's learning rate from the optimizer, whose pass over the weights also refreshes the pull's
        coefficients; after every other step, what was zeroed is zeroed again, so held zeros stay exact zeros. Any
        optimizer and loop, DistributedDataParallel included (both read only the weights and the reduced gradients,
        equal on every rank). ``every=1`` reads after every step."""
        if self.strength == 0:
            yield self
            return
        plan = _Plan(self._members(model), self.channels)  # resolved once: the same parameters for the whole training
        ids = {id(m.param) for m in plan.members}
        placed = [m.param.device for m in plan.firsts]
        held: dict[str, Any] = {}
        coefficients: dict[str, Any] = {}
        steps = [0]  # optimizer steps taken on our parameters
        where: dict[int, tuple[Any, list[int | None] | None]] = {}  # per optimizer: its layout, ours()'s answer

        def ours(optimizer: torch.optim.Optimizer) -> list[int | None] | None:
            """Each parameter's param group in ``optimizer`` (None for one it does not hold); None when it holds
            none of them. Worked out again only when its groups change."""
            layout = tuple((id(g["params"]), len(g["params"])) for g in optimizer.param_groups)
            if id(optimizer) not in where or where[id(optimizer)][0] != layout:
                at = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"] if id(p) in ids}
                index = [at.get(id(m.param)) for m in plan.firsts]
                where[id(optimizer)] = (layout, None if all(i is None for i in index) else index)
            return where[id(optimizer)][1]

        def follow() -> None:
            """The model moved to another device since the plan was made (``model.to(device)`` inside the loop, as
            transformers' Trainer does): the masks there are new tensors and what the steps cached sits on the old
            device. The members are resolved again, the pull is read again at the next step, and the held zeros'
            factors follow their parameters."""
            nonlocal plan, placed
            if [m.param.device for m in plan.firsts] == placed:
                return
            plan = _Plan(self._members(model), self.channels)
            placed = [m.param.device for m in plan.firsts]
            coefficients.clear()
            if "writes" in held:
                params, keeps = held["writes"]
                held["writes"] = (params, [k.to(p.device) for p, k in zip(params, keeps)])

        def before(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            t0 = time.perf_counter()
            follow()
            if ours(optimizer) is not None and plan.members:
                if not coefficients:  # (the first step: nothing read yet)
                    groups, index = optimizer.param_groups, ours(optimizer)
                    rate = [0.0 if i is None else float(groups[i]["lr"]) for i in index]  # type: ignore[union-attr]
                    coefficients.update(self._coefficients(plan, _Reading(plan), rate=rate))
                self._pull_with(plan, coefficients)
            self.seconds += time.perf_counter() - t0

        def after(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            t0 = time.perf_counter()
            index = ours(optimizer)
            if index is not None:
                if steps[0] % self.every == 0:
                    groups = optimizer.param_groups
                    lrs = [0.0 if i is None else float(groups[i]["lr"]) for i in index]
                    self._step(plan, lrs, held, coefficients)
                else:
                    self._hold(held)
                steps[0] += 1
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
