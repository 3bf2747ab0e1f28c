"""Normalizations computed from channel statistics, and rotary head_dim pairs: float64, both capture levels.

Each form either removes the planted channels exactly (compared with the eager model, at the example's batch size
and another) or keeps them with a frozen reason that names the op."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

import fxprune as fp
from conftest import snapshot
from fxprune.verify import count_params

METHODS = ["symbolic", "export"]


def check(model: nn.Module, x: torch.Tensor, method: str) -> tuple[nn.Module, list[str]]:
    """Minimize ``model`` (float64); assert it is exact at two batch sizes and untouched; return the result and
    the analysis' frozen reasons."""
    model = model.double().eval()
    x = x.double()
    before = snapshot(model)
    gm = fp.capture(model, (x,), method=method)
    small = fp.minimize(gm)
    assert snapshot(model) == before
    for xs in (x, torch.randn(5, *x.shape[1:], dtype=torch.float64)):
        with torch.no_grad():
            a, b = model(xs), small(xs)
        assert float((a - b).abs().max() / a.abs().max()) <= 1e-9
    return small, [r for g in fp.analyze(gm).groups for r in g.reasons]


class Around(nn.Module):
    """Linear(4, 8) -> form -> Linear(8, 2); hidden units 0-2 write ``value`` and are unread by the second layer
    (so only the form itself can keep them)."""

    def __init__(self, form, value: float) -> None:
        super().__init__()
        self.a, self.b, self.form = nn.Linear(4, 8), nn.Linear(8, 2), form
        with torch.no_grad():
            self.a.weight[:3] = 0
            self.a.bias[:3] = value
            self.b.weight[:, :3] = 0

    def forward(self, x):
        return self.b(self.form(self.a(x)))


def n_parameters(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


PLANTED = 3 * 4 + 3 + 3 * 2  # the three units' rows, biases and (zero) columns

# form -> values of the planted units it lets go (the others must keep them, with a reason)
FORMS = {
    "l2_norm": (lambda h: h / h.norm(dim=-1, keepdim=True), {0.0}),
    "vector_norm": (lambda h: h / torch.linalg.vector_norm(h, 2, dim=-1, keepdim=True), {0.0}),
    "l2_norm_then_mean_over_channels": (lambda h: (h / torch.linalg.vector_norm(h, dim=-1, keepdim=True)).mean(-1, keepdim=True) + h, {0.0}),
    "rms_by_hand": (lambda h: h * torch.rsqrt((h * h).mean(-1, keepdim=True) + 1e-6), {0.0, 0.7}),
    "layer_norm_by_hand": (lambda h: (h - h.mean(-1, keepdim=True)) / torch.sqrt(((h - h.mean(-1, keepdim=True)) ** 2).mean(-1, keepdim=True) + 1e-5), {0.0, 0.7}),
    "softmax_over_channels": (lambda h: torch.softmax(h, dim=-1), {0.0, 0.7}),
    "log_softmax_over_channels": (lambda h: F.log_softmax(h, dim=-1), {0.0, 0.7}),
    "var": (lambda h: (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, keepdim=True, unbiased=False) + 1e-5), set()),
    "std": (lambda h: (h - h.mean(-1, keepdim=True)) / (h.std(-1, keepdim=True) + 1e-5), set()),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("value", [0.0, 0.7])
@pytest.mark.parametrize("form", sorted(FORMS))
def test_hand_written_norms(form, value, method):
    fn, removable = FORMS[form]
    model = Around(fn, value)
    small, reasons = check(model, torch.randn(3, 4), method)
    if value in removable:  # (a compensated sum may add a small constant buffer: parameters are what must go)
        assert n_parameters(small) == n_parameters(model) - PLANTED and count_params(small) < count_params(model)
    else:
        assert count_params(small) == count_params(model)
        if form in ("var", "std"):
            assert any(f"reduces over dim 1" in r for r in reasons), reasons


class Stream(nn.Module):
    """A residual stream read by LayerNorms, with stream channels 1 and 4 dead (constant in every writer)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.up, self.down, self.out = nn.Linear(4, 6), nn.Linear(6, 12), nn.Linear(12, 6), nn.Linear(6, 2)
        self.n1, self.n2 = nn.LayerNorm(6), nn.LayerNorm(6)
        with torch.no_grad():
            for lin in (self.inp, self.down):
                lin.weight[[1, 4]] = 0
                lin.bias[[1, 4]] = 0
            for n in (self.n1, self.n2):
                n.weight.uniform_(0.5, 2)
                n.bias.uniform_(-1, 1)
                n.weight[[1, 4]] = 0
                n.bias[[1, 4]] = 0

    def forward(self, x):
        h = self.inp(x)
        h = h + self.down(F.gelu(self.up(self.n1(h))))
        return self.out(self.n2(h))


def test_native_layer_norm_from_decomposed_programs():
    """``ep.run_decompositions()`` (ExecuTorch's and Inductor's input) writes ``native_layer_norm``: compensated
    like ``layer_norm``."""
    model = Stream().double().eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: Dim("batch", min=1, max=16)},), strict=False)
    decomposed = ep.run_decompositions()
    assert any(n.target is torch.ops.aten.native_layer_norm.default for n in decomposed.graph.nodes)
    plain, small = fp.minimize(ep), fp.minimize(decomposed)
    assert count_params(small.module()) == count_params(plain.module()) < count_params(model)
    for b in (1, 7):
        xb = torch.randn(b, 4, dtype=torch.float64)
        with torch.no_grad():
            ref = model(xb)
            out = small.module()(xb)
            out = out[0] if isinstance(out, tuple) else out  # (run_decompositions returns the output in a tuple)
            assert float((out - ref).abs().max() / ref.abs().max()) <= 1e-9


class MultiDimNorm(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.a, self.norm, self.b = nn.Conv1d(3, 6, 1), nn.LayerNorm([6, 5]), nn.Conv1d(6, 2, 1)
        with torch.no_grad():
            self.a.weight[:2] = 0
            self.a.bias[:2] = value
            self.norm.weight.uniform_(0.5, 2)
            self.norm.bias.uniform_(-1, 1)
            self.norm.weight[:2] = 0
            self.norm.bias[:2] = 0
            self.b.weight[:, :2] = 0

    def forward(self, x):
        return self.b(self.norm(self.a(x)))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("value", [0.0, 0.7])
def test_layer_norm_over_several_dims_is_compensated(method, value):
    """LayerNorm([C, L]): channels of C holding constants go (their entries repeated over L count in the
    statistics); L is kept whole."""
    model = MultiDimNorm(value)
    small, reasons = check(model, torch.randn(2, 3, 5), method)
    assert count_params(small) == count_params(model) - 2 * (3 + 1) - 2 * 2 * 5 - 2 * 2  # conv rows, LN affine, columns
    assert any("normalizes over dim 2 too" in r for r in reasons), reasons


class Grouped(nn.Module):
    """Conv -> GroupNorm(4 groups of 2) -> ReLU -> Conv: group 1 (channels 2, 3) dead and unread; channel 5 (half of
    group 2) unread only."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.gn, self.b = nn.Conv2d(3, 8, 1), nn.GroupNorm(4, 8), nn.Conv2d(8, 2, 1)
        with torch.no_grad():
            self.a.weight[2:4] = 0
            self.a.bias[2:4] = torch.tensor([0.5, -1.0])
            self.b.weight[:, 2:4] = 0
            self.b.weight[:, 5] = 0
            self.gn.weight.uniform_(0.5, 2)
            self.gn.bias.uniform_(-1, 1)

    def forward(self, x):
        return self.b(torch.relu(self.gn(self.a(x))))


@pytest.mark.parametrize("method", METHODS)
def test_group_norm_loses_a_constant_group_whole_and_keeps_a_channel_only_unread(method):
    """Group 1 holds constants: it goes whole, and the norm is a group norm with 3 groups. Channel 5 is unread but
    not constant: its values enter group 2's statistics, so it stays."""
    model = Grouped()
    small, _ = check(model, torch.randn(2, 3, 5, 5), method)
    assert count_params(small) == count_params(model) - 2 * (3 + 1 + 2 + 2)  # conv rows + bias, GN affine, columns
    gn_weight = [p for n, p in small.named_parameters() if n.startswith("gn")][0]
    assert gn_weight.shape == (6,)
    calls = [n for n in small.graph.nodes if "group_norm" in str(n.target)]
    assert [n.args[1] for n in calls] == [3] or [small.get_submodule(n.target).num_groups
                                                 for n in small.graph.nodes if n.op == "call_module"] == [3]


def test_a_group_norm_that_loses_whole_groups_in_its_class_has_fewer_groups():
    """(minimize_module updated the channels and not the groups: its own check failed with an EquivalenceError.)"""
    model = Grouped().double().eval()
    small = fp.minimize_module(model, (torch.randn(2, 3, 5, 5, dtype=torch.float64),))
    assert type(small.gn) is nn.GroupNorm and (small.gn.num_groups, small.gn.num_channels) == (3, 6)
    _exact_at_other_shapes(model, small, ((2, 3, 5, 5), (4, 3, 7, 3)))


# ---------------------------------------------------------------------------------------------------- rotary
def _llama(heads_with_pair: int = 4):
    """Tiny Llama (4 query heads, 2 kv heads, head_dim 8) in float64 with the rotary pair (1, 5) dead in the query
    projection of ``heads_with_pair`` heads of every layer."""
    from fxprune import zoo

    model, (ids,) = zoo.build("llama")
    model = model.double().eval()
    hd = model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        for layer in model.model.layers:
            q = layer.self_attn.q_proj.weight
            for h in range(heads_with_pair):
                q[h * hd + 1] = 0
                q[h * hd + 1 + hd // 2] = 0
    return model, ids


@pytest.mark.slow
def test_rotary_head_dim_pairs_are_removed_across_heads_and_kv_groups():
    """The pair (i, i + d/2) of every query head is zero: rotary mixes only within the pair, so q.k never reads it.
    Removed from every query and key head (grouped-query sharing included) and from the inv_freq table."""
    model, _ = _llama()
    ids = torch.randint(0, model.config.vocab_size, (2, 8))  # a batch of 2: torch.export specializes a batch of 1
    ep = torch.export.export(model, (ids,), dynamic_shapes=({0: Dim("batch", min=1, max=8), 1: Dim("seq", min=2, max=32)},),
                             strict=False)
    small = fp.minimize(ep).module()
    cfg = model.config
    hidden, layers, kv = cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads
    removed = layers * 2 * hidden * (cfg.num_attention_heads + kv) + 1  # q and k rows of the pair; one inv_freq entry
    assert count_params(model) - count_params(small) == removed
    assert small.get_buffer("model.rotary_emb.inv_freq").shape == (3,)
    for b, t in ((1, 5), (3, 8), (4, 21)):
        x = torch.randint(0, cfg.vocab_size, (b, t))
        with torch.no_grad():
            ref = model(x).logits
            assert float((small(x)[0] - ref).abs().max() / ref.abs().max()) <= 1e-9, (b, t)


@pytest.mark.slow
def test_rotary_pair_dead_in_some_heads_only_stays():
    """Heads keep one head_dim: a pair dead in three of four query heads is not removed."""
    model, ids = _llama(heads_with_pair=3)
    small = fp.minimize(fp.capture(model, (ids,)))
    assert count_params(small) == count_params(model)


def test_compensate_layernorm_checks_its_own_result(monkeypatch):
    """A compensated norm that computed something else would come back unchecked: now EquivalenceError."""
    from fxprune.nn.norm import CompensatedLayerNorm

    net, x = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2)), torch.randn(3, 4)
    gm = fp.capture(net, (x,))
    assert isinstance(fp.compensate_layernorm(gm).get_submodule("1"), CompensatedLayerNorm)
    wrong = CompensatedLayerNorm.from_layer_norm
    monkeypatch.setattr(CompensatedLayerNorm, "from_layer_norm",
                        staticmethod(lambda m: (lambda c: (setattr(c, "eps", 1.0), c)[1])(wrong(m))))
    with pytest.raises(fp.EquivalenceError):
        fp.compensate_layernorm(gm)
    assert isinstance(fp.compensate_layernorm(gm, verify=False).get_submodule("1"), CompensatedLayerNorm)


def _launched(f, *args) -> list[str]:
    """The ATen ops ``f(*args)`` runs that launch a kernel (views and aliases left out)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    views = {"view", "slice", "expand", "t", "transpose", "unsqueeze", "alias", "detach", "_unsafe_view", "unflatten"}
    ops: list[str] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ not in views:
                ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Record():
        f(*args)
    return ops


@pytest.mark.parametrize("removed", [[0.0, 0.0, 0.0], [1.5, 1.5], [0.3, -2.0, 1.1], [2.0], [0.5, -0.5, 0.0, 4.0]])
@pytest.mark.parametrize("ndim", [1, 2])
@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
def test_compensated_layer_norm_eagerly_is_the_full_norm(removed, ndim, affine):
    """Run eagerly, the compensated LayerNorm is one F.layer_norm over the full width with the removed values put
    back (as values of the same sum and sum of squares): the original norm's output on the kept channels, equal to
    the statistics written out (the traced form), contiguous, at float64's precision."""
    from fxprune.nn.norm import compensated_layer_norm

    torch.manual_seed(0)
    shape = (3, 5, 6) if ndim == 1 else (3, 4, 2, 3)
    x = torch.randn(shape, dtype=torch.float64)
    w = torch.randn(shape[-ndim:], dtype=torch.float64) if affine in ("both", "weight") else None
    b = torch.randn(shape[-ndim:], dtype=torch.float64) if affine in ("both", "bias") else None
    c = torch.tensor(removed, dtype=torch.float64)
    full = torch.cat([x.flatten(-ndim), c.expand(*x.shape[:-ndim], len(removed))], -1)
    n = full.shape[-1]
    want = F.layer_norm(full, (n,), None, None, 1e-5)[..., :n - len(removed)].unflatten(-1, shape[-ndim:])
    want = want * w if w is not None else want
    want = want + b if b is not None else want
    args = (w, b, 1e-5, n, float(c.sum()), float((c * c).sum()), ndim)
    got = compensated_layer_norm(x, *args)
    written = torch.export.export(_Call(args), (x,), strict=False).module()(x)  # the statistics written out
    assert got.is_contiguous()
    assert (got - want).abs().max() <= 1e-12 and (written - want).abs().max() <= 1e-12


class _Call(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.args = args

    def forward(self, x):
        from fxprune.nn.norm import compensated_layer_norm

        return compensated_layer_norm(x, *self.args)


def test_compensated_layer_norm_eagerly_launches_three_kernels_not_seventeen():
    """A compressed transformer's norms: on a GPU a small model's time is the kernels it launches, and the
    statistics written out took seventeen per norm (a 36x ViT ran 2.5x slower than the dense one on an H200).
    Eagerly: pad, layer_norm, addcmul. Exported, the graph holds the written-out form (what a compiler fuses and
    fxprune's analysis reads)."""
    from fxprune.nn.norm import CompensatedLayerNorm

    ln = CompensatedLayerNorm(8, full_size=20, eps=1e-5)
    x = torch.randn(4, 7, 8)
    assert _launched(ln, x) == ["constant_pad_nd", "native_layer_norm", "addcmul"]
    assert len(_launched(nn.LayerNorm(8), x)) == 1
    ep = torch.export.export(ln, (x,), strict=False)
    ops = {n.target.__name__.split(".")[0] for n in ep.graph.nodes if n.op == "call_function"}
    assert "rsqrt" in ops and "native_layer_norm" not in ops and "constant_pad_nd" not in ops


# ------------------------------------------------------------------------------------- one-group GroupNorm
class _GNBlock(nn.Module):
    def __init__(self, c: int, norm: type[nn.Module]) -> None:
        super().__init__()
        self.norm, self.mix = norm(c), nn.Conv2d(c, c, 1)
        self.norm2, self.mlp = norm(c), nn.Sequential(nn.Conv2d(c, 2 * c, 1), nn.GELU(), nn.Conv2d(2 * c, c, 1))

    def forward(self, x):
        x = x + self.mix(self.norm(x))
        return x + self.mlp(self.norm2(x))


class GroupNormStream(nn.Module):
    """A PoolFormer-like residual stream of 8 channels, each block normalizing it with ``GroupNorm(1, 8)``
    (statistics over the channels and every position). Channels ``dead`` hold the nonzero constants the stem's bias
    writes, and no block reads or writes them."""

    def __init__(self, norm: type[nn.Module] = lambda c: nn.GroupNorm(1, c), dead: tuple[int, ...] = (1, 4, 6)):
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.blocks = nn.Sequential(_GNBlock(8, norm), _GNBlock(8, norm))
        with torch.no_grad():
            for b in self.blocks:
                b.norm.weight.uniform_(0.5, 2), b.norm.bias.uniform_(-1, 1)
                b.norm2.weight.uniform_(0.5, 2), b.norm2.bias.uniform_(-1, 1)
        self.kill(list(dead))

    @torch.no_grad()
    def kill(self, dead: list[int], value: float = 0.5) -> None:
        self.stem.weight[dead] = 0.0
        self.stem.bias[dead] = torch.linspace(-value, 2 * value, len(dead)).to(self.stem.bias)
        for b in self.blocks:
            for norm in (b.norm, b.norm2):  # the normalized dead channels are their norm's bias: constants
                norm.weight[dead] = 0.0
            for layer in (b.mix, b.mlp[2]):
                layer.weight[dead] = 0.0
                layer.bias[dead] = 0.0

    def forward(self, x):
        return self.head(self.blocks(self.stem(x))).mean((2, 3))


def _exact_at_other_shapes(model: nn.Module, small: nn.Module, shapes=((2, 3, 6, 6), (5, 3, 6, 6), (3, 3, 9, 5))):
    for shape in shapes:
        x = torch.randn(*shape, dtype=torch.float64)
        with torch.no_grad():
            a, b = model(x), small(x)
        assert float((a - b).abs().max() / a.abs().max()) <= 1e-9, shape


def _stream_params(width: int) -> int:
    """GroupNormStream's parameters with a stream ``width`` wide (its MLPs keep their 16 hidden units)."""
    block = 2 * 2 * width + (width * width + width) + (16 * width + 16) + (width * 16 + width)
    return (width * 27 + width) + 2 * block + (4 * width + 4)


def _groups(n: int) -> type[nn.Module]:
    return (lambda c: nn.GroupNorm(n, c)) if n > 1 else (lambda c: nn.GroupNorm(1, c))


@pytest.mark.parametrize("groups", [1, 4])  # 4: groups of 2, each of 3 loses one of its two channels
@pytest.mark.parametrize("method", METHODS)
def test_group_norm_stream_loses_constant_channels_exactly(method, groups):
    from conftest import graph_state

    model = GroupNormStream(norm=_groups(groups)).double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    dims = {"x": {0: Dim("b", min=1, max=64), 2: Dim("h", min=2, max=64), 3: Dim("w", min=2, max=64)}}
    gm = fp.capture(model, (x,), method=method, **({"dynamic_shapes": dims} if method == "export" else {}))
    before, state = snapshot(model), graph_state(gm)
    small = fp.minimize(gm)
    assert snapshot(model) == before and graph_state(gm) == state
    assert count_params(model) == _stream_params(8) and count_params(small) == _stream_params(5)
    _exact_at_other_shapes(model, small)  # another batch, and another image size: the positions are counted at run time


@pytest.mark.parametrize("removed", [[0.0, 0.0], [1.5, 1.5], [0.3, -2.0, 1.1], [2.0]])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("spatial", [(), (7,), (4, 5), (2, 3, 2)])
def test_compensated_group_norm_eagerly_and_traced_is_the_full_norm(removed, affine, spatial, monkeypatch):
    from fxprune.nn import norm as N

    C = 6
    x = torch.randn(3, C, *spatial, dtype=torch.float64)
    gone = torch.tensor([0, 2, 5][: len(removed)])
    x[:, gone] = torch.tensor(removed, dtype=torch.float64).reshape(-1, *(1,) * len(spatial))
    w, b = (torch.randn(C, dtype=torch.float64), torch.randn(C, dtype=torch.float64)) if affine else (None, None)
    keep = torch.ones(C, dtype=torch.bool)
    keep[gone] = False
    ref = F.group_norm(x, 1, w, b, 1e-5)[:, keep]
    c = torch.tensor(removed, dtype=torch.float64)
    args = (x[:, keep], w[keep] if affine else None, b[keep] if affine else None, 1e-5, C, float(c.sum()), float((c * c).sum()))
    assert torch.allclose(N.compensated_group_norm(*args), ref, rtol=1e-12, atol=1e-12)
    monkeypatch.setattr(N, "_traced", lambda t: True)  # the written-out statistics torch.export and compile see
    assert torch.allclose(N.compensated_group_norm(*args), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gone", [[1], [0, 1, 2], [3, 4, 5, 6, 7, 8], [0, 5, 7, 10, 11], [2, 3, 4, 9, 10, 11]])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("spatial", [(), (7,), (4, 5)])
def test_compensated_group_norm_with_groups_eagerly_and_traced_is_the_full_norm(gone, affine, spatial, monkeypatch):
    """Four groups of three; the removed channels hold constants (alike in a group, or not; a group may lose all
    of its channels and stay in the call)."""
    from fxprune.nn import norm as N

    G, C = 4, 12
    x = torch.randn(3, C, *spatial, dtype=torch.float64)
    values = torch.linspace(-1.5, 2.0, len(gone), dtype=torch.float64)
    x[:, gone] = values.reshape(-1, *(1,) * len(spatial))
    w, b = (torch.randn(C, dtype=torch.float64), torch.randn(C, dtype=torch.float64)) if affine else (None, None)
    keep = torch.ones(C, dtype=torch.bool)
    keep[gone] = False
    ref = F.group_norm(x, G, w, b, 1e-5)[:, keep]
    of = [torch.tensor([c // 3 == g for c in gone]) for g in range(G)]  # the removed constants of each group
    s1, s2 = tuple(float(values[m].sum()) for m in of), tuple(float((values[m] ** 2).sum()) for m in of)
    kept = tuple(int(k) for k in keep.reshape(G, 3).sum(1))
    args = (x[:, keep], w[keep] if affine else None, b[keep] if affine else None, 1e-5, C, s1, s2, kept)
    assert torch.allclose(N.compensated_group_norm(*args), ref, rtol=1e-12, atol=1e-12)
    monkeypatch.setattr(N, "_traced", lambda t: True)  # the split and cat form torch.export sees
    assert torch.allclose(N.compensated_group_norm(*args), ref, rtol=1e-12, atol=1e-12)


def test_compensated_group_norm_module_shrinks_group_by_group_and_refuses_a_layout_that_does_not_fit():
    gn = nn.GroupNorm(3, 6).double()
    with torch.no_grad():
        gn.weight.uniform_(0.5, 2), gn.bias.uniform_(-1, 1)
    x = torch.randn(4, 6, 5, dtype=torch.float64)
    x[:, [0, 1, 4]] = torch.tensor([0.5, -0.25, 2.0], dtype=torch.float64).reshape(3, 1)
    small = fp.nn.CompensatedGroupNorm.from_group_norm(gn).shrink(torch.tensor([0, 0, 1, 1, 0, 1], dtype=torch.bool),
                                                                   torch.tensor([0.5, -0.25, 2.0]))
    assert (small.kept_per_group, small.full_channels) == ((2, 1), 4)  # group 0 lost both channels: it went
    keep = [2, 3, 5]
    assert torch.allclose(small(x[:, keep]), gn(x)[:, keep], rtol=1e-12, atol=1e-12)
    once_more = small.shrink(torch.tensor([1, 0, 1], dtype=torch.bool), torch.tensor([0.0]))
    x[:, 3] = 0.0
    assert once_more.kept_per_group == (1, 1)
    assert torch.allclose(once_more(x[:, [2, 5]]), gn(x)[:, [2, 5]], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="kept_per_group"):
        fp.nn.CompensatedGroupNorm(3, 6, kept_per_group=(2, 2, 2))  # 6 channels in the groups, 3 kept
    with pytest.raises(ValueError, match="does not fit"):
        fp.nn.compensated_group_norm(x[:, :3], None, None, 1e-5, 6, (0.0, 0.0), (0.0, 0.0), (1, 1))


class _ShapeBranch(GroupNormStream):
    """The same model with a forward a symbolic trace cannot follow: minimize_module captures it with torch.export,
    which traces through a compensated norm's forward."""

    def forward(self, x):
        if x.shape[-1] > 1:
            x = x * 1.0
        return super().forward(x)


@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("cls", [GroupNormStream, _ShapeBranch])
def test_minimize_module_compensates_group_norms_and_again_in_a_second_call(cls, groups):
    """Four groups: channels 1, 4 and 6 go from groups 0, 2 and 3; then channels 0 and 2 die. Channel 2 goes from
    group 1, and channel 0 empties group 0, which goes, except through torch.export (``_ShapeBranch``): the traced
    norm splits its input by group, and fxprune keeps one channel of every part it splits."""
    model = cls(norm=_groups(groups)).double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    small = fp.minimize_module(model, (x,))
    assert type(small) is cls and small.stem.weight.shape[0] == 5
    norm = small.blocks[0].norm
    assert isinstance(norm, fp.nn.CompensatedGroupNorm) and (norm.kept, norm.full_channels) == (5, 8)
    assert norm.kept_per_group == ((1, 2, 1, 1) if groups == 4 else None)
    _exact_at_other_shapes(model, small)
    small.kill([0, 1], value=0.3)  # the cycle's next round: two more stream channels dead in the kept model
    again = fp.minimize_module(small, (x,))
    norm = again.blocks[1].norm2
    whole = groups == 4 and cls is GroupNormStream  # (group 0 goes)
    assert again.stem.weight.shape[0] == (3 if groups == 1 or whole else 4)
    assert norm.full_channels == (6 if whole else 8)
    assert norm.kept_per_group == (None if groups == 1 else (1, 1, 1) if whole else (1, 1, 1, 1))
    _exact_at_other_shapes(small, again)


class _OwnGroupNorm(nn.GroupNorm):
    """timm's ``GroupNorm1``: a one-group norm whose forward calls ``F.group_norm`` itself."""

    def __init__(self, c: int) -> None:
        super().__init__(1, c)

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class _ScaledGroupNorm(_OwnGroupNorm):
    """A forward of its own that is not GroupNorm's function."""

    def forward(self, x):
        return 2.0 * super().forward(x)


def test_a_group_norm_class_with_a_forward_of_its_own_is_compensated_where_it_computes_group_norm():
    from fxprune.interop.module import KeptChannelsWarning

    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    model = GroupNormStream(norm=_OwnGroupNorm).double().eval()
    small = fp.minimize_module(model, (x,))  # its forward is GroupNorm's function (a probe says so)
    assert isinstance(small.blocks[0].norm, fp.nn.CompensatedGroupNorm) and small.stem.weight.shape[0] == 5
    _exact_at_other_shapes(model, small)
    model = GroupNormStream(norm=_ScaledGroupNorm).double().eval()
    with pytest.warns(KeptChannelsWarning, match="blocks.0.norm") as got:
        small = fp.minimize_module(model, (x,))
    assert not any("heads" in str(w.message) for w in got)  # (it has none: no warning about them)
    assert isinstance(small.blocks[0].norm, _ScaledGroupNorm) and small.stem.weight.shape[0] == 8
    _exact_at_other_shapes(model, small)


def poolformer_with_dead_stream_channels(dtype: torch.dtype = torch.float64) -> nn.Module:
    """A tiny transformers PoolFormer (its stream normalized by ``PoolFormerGroupNorm``, ``nn.GroupNorm(1, C)``) whose
    stage-0 stream channels 2 and 9 are zero (the next stage's strided, padded conv reads them)."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.PoolFormerConfig(num_channels=3, hidden_sizes=[16, 32], depths=[1, 1], num_encoder_blocks=2, num_labels=4)
    model = tf.PoolFormerForImageClassification(cfg).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("poolformer.encoder.patch_embeddings.0.", "poolformer.encoder.block.0.0.output.conv2")) \
                    or name.startswith("poolformer.encoder.block.0.0.") and name.endswith("norm.weight"):
                p.index_fill_(0, torch.tensor([2, 9]), 0.0)
    return model


def test_poolformer_stream_loses_channels_as_its_own_class():
    pytest.importorskip("transformers")
    model = poolformer_with_dead_stream_channels()
    before = snapshot(model)
    small = fp.minimize_module(model, (torch.randn(2, 3, 32, 32, dtype=torch.float64),))
    assert snapshot(model) == before and type(small) is type(model)
    # per dead channel: its stem row (3x7x7 + bias), 2 layer scales, 2 norms' weight and bias, the MLP's conv1
    # column (64) and conv2 row (64 + bias), the next stage's patch embedding column (32x3x3)
    assert count_params(model) - count_params(small) == 2 * (3 * 49 + 1 + 2 + 4 + 64 + 65 + 32 * 9)
    assert isinstance(small.poolformer.encoder.block[0][0].before_norm, fp.nn.CompensatedGroupNorm)
    for shape in ((2, 3, 32, 32), (3, 3, 40, 24)):
        x = torch.randn(*shape, dtype=torch.float64)
        with torch.no_grad():
            a, b = model(x).logits, small(x).logits
        assert float((a - b).abs().max() / a.abs().max()) <= 1e-9


class _GroupNorms(nn.Module):
    """A one-group GroupNorm as a module and as a call, and one with two groups."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.one, self.two = nn.Conv2d(3, 4, 1), nn.GroupNorm(1, 4), nn.GroupNorm(2, 4)

    def forward(self, x):
        return self.two(F.group_norm(self.one(self.conv(x)), 1))


@pytest.mark.parametrize("method", METHODS)
def test_compensate_layernorm_makes_group_norms_compensated(method):
    from conftest import graph_state
    from fxprune.nn import compensated_group_norm

    model = _GroupNorms().double().eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    gm = fp.capture(model, (x,), method=method)
    state = graph_state(gm)
    comp = fp.compensate_layernorm(gm)
    assert graph_state(gm) == state
    calls = [n for n in comp.graph.nodes if n.target is compensated_group_norm]
    modules = [m for m in comp.modules() if isinstance(m, fp.nn.CompensatedGroupNorm)]
    assert len(calls) + len(modules) == 3  # (symbolic: the modules stay modules; export: all are calls)
    groups = [n.args[7] for n in calls if len(n.args) > 7] + [m.kept_per_group for m in modules if m.kept_per_group]
    assert groups == [(2, 2)]  # the two-group norm, nothing removed yet
    with torch.no_grad():
        assert torch.allclose(comp(x), model(x), rtol=1e-12, atol=1e-12)
