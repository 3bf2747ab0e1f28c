"""Hypothesis strategies for random models and masks (the differential tests of ``test_fuzz.py``).

A case is plain data (``Case``): a list of layer specs, a weight seed and per-layer mask specs, so a failing case
prints as something that can be pasted into a regression test and rebuilt with :func:`build`.

Vector layers (input ``(B, width)``):
  ("linear", out) | ("act", name) | ("bn",) | ("res", hidden, act) | ("cat", a, b) | ("gate", hidden)
  ("stream", norm, width, depth, dead)   in-projection, pre-norm residual blocks, final norm (LayerNorm with or
                                         without affine or bias, RMSNorm); ``dead`` stream channels are zero rows
                                         (non-zero biases) in every writer
  ("shared", act1, act2)   one Linear read at two call sites: lin(act1(x)) + lin(act2(x)) (a constant input channel
                           folds to a different constant at each site)
  ("inplace", hidden)      Linear, then in-place relu_, mul_ and add_ on its output
Conv layers (input ``(B, C, S, S)``), followed by ("flatten",) or ("gap",) before vector layers:
  ("conv", out, k, depthwise) | ("act", name) | ("bn2d",) | ("rescv", hidden) | ("catcv", a, b) | ("pool", kind)
  ("cnlast", out)   movedim to channels-last, LayerNorm, Linear, movedim back
  ("gn", groups)    GroupNorm (affine) over the channels: 1 group, 0 for one group per channel, or 2 for two
                    groups (one where the channel count is odd)
Mask specs, one per weight (ndim >= 2), in order of ``named_parameters``:
  ("none",) | ("unstructured", p) | ("rows", frac) | ("cols", frac) | ("rows+cols", frac)
and for BatchNorm weights ("bnzero", frac): a zero scale makes a constant channel (its shift).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "silu": nn.SiLU,
        "leaky_relu": nn.LeakyReLU, "identity": nn.Identity}


@dataclass
class Case:
    layers: list[tuple]
    seed: int
    masks: list[tuple] = field(default_factory=list)
    conv: tuple[int, int] | None = None  # (channels, side) of a conv input; None: vector input
    width: int = 6  # vector input width
    batch: int = 3


class Residual(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Concat(nn.Module):
    def __init__(self, a: nn.Module, b: nn.Module):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), self.b(x)], dim=1)


class Gate(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(d, 2 * hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.proj(x).chunk(2, dim=-1)
        return a * torch.sigmoid(b)


class Shared(nn.Module):
    """One Linear read at two call sites (a head applied twice, a layer shared across depth)."""

    def __init__(self, d: int, act1: str, act2: str):
        super().__init__()
        self.lin, self.act1, self.act2 = nn.Linear(d, d), ACTS[act1](), ACTS[act2]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.act1(x)) + self.lin(self.act2(x))


class InPlace(nn.Module):
    """A Linear whose output is changed in place (relu_, mul_, add_)."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.lin = nn.Linear(d, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        h.relu_()
        h.mul_(2.0)
        h.add_(0.5)
        return h


NORMS = {"layernorm": lambda w: nn.LayerNorm(w), "layernorm_noaffine": lambda w: nn.LayerNorm(w, elementwise_affine=False),
         "layernorm_nobias": lambda w: nn.LayerNorm(w, bias=False), "rmsnorm": lambda w: nn.RMSNorm(w, eps=1e-6)}


class Stream(nn.Module):
    """In-projection to a residual stream, pre-norm MLP blocks, final norm."""

    def __init__(self, d: int, norm: str, width: int, depth: int):
        super().__init__()
        make = lambda: NORMS[norm](width)  # noqa: E731
        self.proj = nn.Linear(d, width)
        self.norms = nn.ModuleList(make() for _ in range(depth))
        self.up = nn.ModuleList(nn.Linear(width, 2 * width) for _ in range(depth))
        self.down = nn.ModuleList(nn.Linear(2 * width, width) for _ in range(depth))
        self.final = make()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        for norm, up, down in zip(self.norms, self.up, self.down):
            x = x + down(F.gelu(up(norm(x))))
        return self.final(x)


class ChannelsLast(nn.Module):
    """ConvNeXt's layout: movedim to channels-last, LayerNorm, Linear, movedim back."""

    def __init__(self, d: int, out: int):
        super().__init__()
        self.norm, self.lin = nn.LayerNorm(d), nn.Linear(d, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.norm(x.movedim(1, -1))).movedim(-1, 1)


class Flatten(nn.Module):
    def __init__(self, gap: bool):
        super().__init__()
        self.gap = gap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3)) if self.gap else x.flatten(1)


def _layer(spec: tuple, d: int, side: int) -> tuple[nn.Module, int, int]:
    """The module of ``spec`` on an input of ``d`` channels (spatial side ``side``): (module, d', side')."""
    kind = spec[0]
    if kind == "linear":
        return nn.Linear(d, spec[1]), spec[1], side
    if kind == "act":
        return ACTS[spec[1]](), d, side
    if kind == "bn":
        return nn.BatchNorm1d(d), d, side
    if kind == "res":
        return Residual(nn.Sequential(nn.Linear(d, spec[1]), ACTS[spec[2]](), nn.Linear(spec[1], d))), d, side
    if kind == "cat":
        return Concat(nn.Linear(d, spec[1]), nn.Linear(d, spec[2])), spec[1] + spec[2], side
    if kind == "gate":
        return Gate(d, spec[1]), spec[1], side
    if kind == "stream":
        return Stream(d, spec[1], spec[2], spec[3]), spec[2], side
    if kind == "shared":
        return Shared(d, spec[1], spec[2]), d, side
    if kind == "inplace":
        return InPlace(d, spec[1]), spec[1], side
    if kind == "gn":
        groups = d if spec[1] == 0 else 2 if spec[1] == 2 and d % 2 == 0 else 1
        return nn.GroupNorm(groups, d), d, side
    if kind == "conv":
        out, k, depthwise = spec[1:]
        out = d if depthwise else out
        return nn.Conv2d(d, out, k, padding=k // 2, groups=d if depthwise else 1), out, side
    if kind == "bn2d":
        return nn.BatchNorm2d(d), d, side
    if kind == "rescv":
        body = nn.Sequential(nn.Conv2d(d, spec[1], 1), nn.ReLU(), nn.Conv2d(spec[1], d, 3, padding=1))
        return Residual(body), d, side
    if kind == "catcv":
        return Concat(nn.Conv2d(d, spec[1], 1), nn.Conv2d(d, spec[2], 3, padding=1)), spec[1] + spec[2], side
    if kind == "cnlast":
        return ChannelsLast(d, spec[1]), spec[1], side
    if kind == "pool":
        pool = nn.MaxPool2d(2) if spec[1] == "max" else nn.AvgPool2d(2)
        return pool, d, side // 2
    if kind in ("flatten", "gap"):
        return Flatten(kind == "gap"), d if kind == "gap" else d * side * side, side
    raise ValueError(f"unknown layer spec {spec!r}")


def _apply_mask(name: str, p: torch.Tensor, spec: tuple, g: torch.Generator) -> None:
    kind = spec[0]
    if kind == "none":
        return
    if kind == "unstructured":
        p.mul_((torch.rand(p.shape, generator=g) >= spec[1]).to(p.dtype))
        return
    if kind == "bnzero":
        p.mul_((torch.rand(p.shape, generator=g) >= spec[1]).to(p.dtype))
        return
    frac = spec[1]
    if "rows" in kind:
        p[torch.rand(p.shape[0], generator=g) < frac] = 0
    if "cols" in kind and p.dim() >= 2 and p.shape[1] > 1:
        p[:, torch.rand(p.shape[1], generator=g) < frac] = 0


def mask_targets(model: nn.Module) -> list[tuple[str, torch.Tensor, bool]]:
    """(name, parameter, is_batchnorm_scale) for every parameter a mask spec applies to, in order."""
    bn = {f"{n}.weight" for n, m in model.named_modules()
          if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm))}
    return [(n, p, n in bn) for n, p in model.named_parameters() if p.dim() >= 2 or n in bn]


def build(case: Case) -> tuple[nn.Module, torch.Tensor]:
    """The float64 model of ``case`` (eval mode, weights from ``case.seed``, masks applied) and an input."""
    with torch.random.fork_rng():
        torch.manual_seed(case.seed)
        d, side = (case.conv if case.conv else (case.width, 0))
        mods = []
        for spec in case.layers:
            m, d, side = _layer(spec, d, side)
            mods.append(m)
        mods.append(nn.Linear(d, 4))
        model = nn.Sequential(*mods).double().eval()
        g = torch.Generator().manual_seed(case.seed + 1)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.running_mean.normal_(generator=g)
                    m.running_var.uniform_(0.5, 2.0, generator=g)
                    m.bias.normal_(generator=g)
            for (name, p, _), spec in zip(mask_targets(model), case.masks):
                _apply_mask(name, p, spec, g)
            for spec_i, spec in enumerate(case.layers):
                if spec[0] == "stream" and spec[4]:
                    s = mods[spec_i]
                    for lin in [s.proj, *s.down]:
                        lin.weight[list(spec[4])] = 0
        shape = (case.batch, *((case.conv[0], case.conv[1], case.conv[1]) if case.conv else (case.width,)))
        x = torch.randn(shape, generator=g, dtype=torch.float64)
    return model, x

# ----------------------------------------------------------------------------------------------- strategies


widths = st.integers(1, 6)
acts = st.sampled_from(sorted(ACTS))


@st.composite
def vector_layers(draw: Any, n: int) -> list[tuple]:
    out = []
    for _ in range(n):
        kind = draw(st.sampled_from(["linear", "act", "bn", "res", "cat", "gate", "stream", "shared", "inplace"]))
        if kind == "linear":
            out.append(("linear", draw(widths)))
        elif kind == "act":
            out.append(("act", draw(acts)))
        elif kind == "bn":
            out.append(("bn",))
        elif kind == "res":
            out.append(("res", draw(widths), draw(acts)))
        elif kind == "cat":
            out.append(("cat", draw(widths), draw(widths)))
        elif kind == "gate":
            out.append(("gate", draw(widths)))
        elif kind == "shared":
            out.append(("shared", draw(acts), draw(acts)))
        elif kind == "inplace":
            out.append(("inplace", draw(widths)))
        else:
            w = draw(st.integers(2, 6))
            dead = draw(st.lists(st.integers(0, w - 1), max_size=w - 1, unique=True))
            out.append(("stream", draw(st.sampled_from(sorted(NORMS))), w, draw(st.integers(1, 2)),
                        tuple(sorted(dead))))
    return out


@st.composite
def conv_layers(draw: Any, n: int, side: int) -> list[tuple]:
    out = []
    for _ in range(n):
        kind = draw(st.sampled_from(["conv", "act", "bn2d", "rescv", "catcv", "cnlast", "pool", "gn"]))
        if kind == "conv":
            out.append(("conv", draw(widths), draw(st.sampled_from([1, 3])), draw(st.booleans())))
        elif kind == "act":
            out.append(("act", draw(acts)))
        elif kind == "bn2d":
            out.append(("bn2d",))
        elif kind == "rescv":
            out.append(("rescv", draw(widths)))
        elif kind == "catcv":
            out.append(("catcv", draw(widths), draw(widths)))
        elif kind == "cnlast":
            out.append(("cnlast", draw(widths)))
        elif kind == "gn":
            out.append(("gn", draw(st.sampled_from([0, 1, 2]))))  # (2: where it divides the channel count)
        elif side >= 2:
            out.append(("pool", draw(st.sampled_from(["max", "avg"]))))
            side //= 2
    return out


def mask_spec(bn_scale: bool) -> st.SearchStrategy[tuple]:
    frac = st.sampled_from([0.25, 0.5, 0.75, 1.0])
    if bn_scale:
        return st.one_of(st.just(("none",)), st.tuples(st.just("bnzero"), frac))
    return st.one_of(st.just(("none",)), st.tuples(st.just("unstructured"), st.sampled_from([0.3, 0.6, 0.9])),
                     st.tuples(st.sampled_from(["rows", "cols", "rows+cols"]), frac))


@st.composite
def cases(draw: Any) -> Case:
    """A random model (vector or conv) with random masks."""
    seed = draw(st.integers(0, 2**16))
    if draw(st.booleans()):
        case = Case(layers=draw(vector_layers(draw(st.integers(1, 5)))), seed=seed, width=draw(st.integers(1, 6)))
    else:
        side = draw(st.sampled_from([4, 6]))
        layers = draw(conv_layers(draw(st.integers(1, 4)), side)) + [(draw(st.sampled_from(["flatten", "gap"])),)]
        layers += draw(vector_layers(draw(st.integers(0, 2))))
        case = Case(layers=layers, seed=seed, conv=(draw(st.integers(1, 3)), side))
    model, _ = build(case)
    case.masks = [draw(mask_spec(bn)) for _, _, bn in mask_targets(model)]
    return case
