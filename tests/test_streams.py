"""Residual streams, CompensatedLayerNorm and attention heads: exact removal where it is exact, freezing elsewhere."""
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune as fp
from conftest import snapshot
from fxprune import zoo
from fxprune.nn import CompensatedLayerNorm, CompensatedRMSNorm, compensated_layer_norm, compensated_rms_norm
from fxprune.passes.compensate_layernorm import uncompensate

DEAD = [1, 4, 9]

# Parameters that read a stream (input dims) and per-channel stream parameters not zeroed by the planting.
READERS = {
    "gpt2": [(r"c_attn\.weight", 0), (r"c_fc\.weight", 0), (r"ln_[12f]\.bias", 0)],
    "llama": [(r"[qkv]_proj\.weight", 1), (r"(gate|up)_proj\.weight", 1), (r"lm_head\.weight", 1)],
    "vit": [(r"[qkv]_proj\.weight", 1), (r"fc1\.weight", 1), (r"classifier\.weight", 1), (r"layernorm\w*\.bias", 0)],
    "bert": [(r"self\.(query|key|value)\.weight", 1), (r"intermediate\.dense\.weight", 1), (r"pooler\.dense\.weight", 1),
             (r"LayerNorm\.bias", 0)],
    "convnext": [(r"dwconv\.(weight|bias)", 0), (r"pwconv1\.weight", 1), (r"downsampling_layer\.1\.weight", 1),
                 (r"classifier\.weight", 1), (r"layer_scale_parameter", 0), (r"layers\.\d+\.layernorm\.bias", 0),
                 (r"downsampling_layer\.0\.bias", 0), (r"convnext\.layernorm\.bias", 0)],
}


def f64(model, inputs):
    return model.double(), tuple(x.double() if x.is_floating_point() else x for x in inputs)


def exact(a, b, inputs) -> float:
    rep = fp.verify(a, b, inputs)
    assert rep.ok, rep
    return rep.max_rel["float64"]


# ---- the modules ------------------------------------------------------------------------------
@pytest.mark.parametrize("constant", [0.0, 0.7])
def test_compensated_layer_norm_matches_the_full_norm(constant):
    ln = nn.LayerNorm(10).double()
    with torch.no_grad():
        ln.weight.uniform_(0.5, 2), ln.bias.uniform_(-1, 1)
    keep = torch.ones(10, dtype=torch.bool)
    keep[[2, 3, 7]] = False
    x = torch.randn(4, 5, 10, dtype=torch.float64)
    values = torch.tensor([constant, -constant, 2 * constant], dtype=torch.float64)
    x[..., ~keep] = values
    small = CompensatedLayerNorm.from_layer_norm(ln).shrink(keep, values)
    assert small.kept == 7 and small.full_size == 10 and small.weight.shape == (7,)
    assert torch.allclose(small(x[..., keep]), ln(x)[..., keep], rtol=1e-13, atol=1e-13)
    plain = F.layer_norm(x[..., keep], (7,), ln.weight[keep], ln.bias[keep])  # plain slicing is not the same
    assert (plain - ln(x)[..., keep]).abs().max() > 1e-3
    x[..., 9] = -0.25  # channel 9 (the last kept one) becomes a constant too: shrinking again accumulates
    again = small.shrink(torch.tensor([True] * 6 + [False]), torch.tensor([-0.25]))
    assert again.kept == 6 and again.full_size == 10
    assert torch.allclose(again(x[..., keep][..., :6]), ln(x)[..., keep][..., :6], rtol=1e-13, atol=1e-13)


def test_compensated_rms_norm_matches_the_full_norm():
    norm = nn.RMSNorm(8, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
    keep = torch.tensor([True, False, True, True, False, True, True, True])
    x = torch.randn(3, 8, dtype=torch.float64)
    x[:, ~keep] = torch.tensor([0.0, 1.5], dtype=torch.float64)
    small = CompensatedRMSNorm.from_rms_norm(norm).shrink(keep, torch.tensor([0.0, 1.5]))
    assert torch.allclose(small(x[:, keep]), norm(x)[:, keep], rtol=1e-13, atol=1e-13)
    assert "full_size=8" in repr(small)


def test_compensated_norm_errors_name_the_problem():
    cln = CompensatedLayerNorm(4)
    with pytest.raises(ValueError, match="shape"):
        cln.shrink(torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least one"):
        cln.shrink(torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="one constant per removed channel"):
        cln.shrink(torch.tensor([True, False, False, True]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="one dim"):
        CompensatedLayerNorm.from_layer_norm(nn.LayerNorm([2, 3]))
    with pytest.raises(ValueError, match="kept"):
        CompensatedLayerNorm(5, full_size=4)


# ---- the pass --------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, d: int, norm: type = nn.LayerNorm):
        super().__init__()
        self.norm, self.fc1, self.fc2 = norm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class Stream(nn.Module):
    def __init__(self, d: int = 16, norm: type = nn.LayerNorm):
        super().__init__()
        self.inp, self.blocks, self.out = nn.Linear(6, d), nn.ModuleList([Block(d, norm), Block(d, norm)]), nn.Linear(d, 3)
        self.final = norm(d)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.out(self.final(h))

    def plant(self, dead: list[int]) -> None:
        with torch.no_grad():
            self.inp.weight[dead] = 0
            self.inp.bias[dead] = 0
            for b in self.blocks:
                b.fc2.weight[dead] = 0
                b.fc2.bias[dead] = 0
                b.norm.weight[dead] = 0
            self.final.weight[dead] = 0


@pytest.mark.parametrize("norm", [nn.LayerNorm, nn.RMSNorm])
@pytest.mark.parametrize("method", ["symbolic", "export"])
def test_compensate_layernorm_is_the_same_function_and_pure(norm, method):
    model, x = f64(Stream(norm=norm), (torch.randn(5, 6),))
    gm = fp.capture(model, x, method=method)
    before = snapshot(gm)
    comp = fp.compensate_layernorm(gm)
    assert snapshot(gm) == before
    assert not any(isinstance(m, (nn.LayerNorm, nn.RMSNorm)) for m in comp.modules())
    n = sum(isinstance(m, (CompensatedLayerNorm, CompensatedRMSNorm)) for m in comp.modules())
    n += sum(n.target in (compensated_layer_norm, compensated_rms_norm) for n in comp.graph.nodes)
    assert n == 3
    assert exact(gm, comp, x) <= 1e-12
    with torch.no_grad():
        next(iter(comp.parameters())).add_(1.0)
    assert snapshot(gm) == before


@pytest.mark.parametrize("norm", [nn.LayerNorm, nn.RMSNorm])
@pytest.mark.parametrize("first", [False, True])
def test_minimize_removes_stream_channels_through_norms(norm, first):
    model, x = f64(Stream(norm=norm), (torch.randn(5, 6),))
    model.plant(DEAD)
    gm = fp.capture(model, x)
    src = fp.compensate_layernorm(gm) if first else gm
    small = fp.minimize(src, x)
    assert exact(gm, small, x) <= 1e-9
    assert small.get_parameter("inp.weight").shape == (13, 6)
    assert small.get_parameter("out.weight").shape == (3, 13)
    norms = [p for n, p in small.named_parameters() if ("norm" in n or "final" in n) and n.endswith("weight")]
    assert [tuple(p.shape) for p in norms] == [(13,)] * 3
    assert fp.verify(gm, uncompensate(small), x).max_rel["float64"] > 1e-3


class HandNorms(nn.Module):
    """LayerNorm and RMSNorm written with mean / pow / sqrt, as transformers models do."""

    def __init__(self, d: int = 12):
        super().__init__()
        self.inp, self.out = nn.Linear(5, d), nn.Linear(d, 2)
        self.w1, self.b1, self.w2 = (nn.Parameter(torch.rand(d) + 0.5) for _ in range(3))

    def forward(self, x):
        h = self.inp(x)
        u = h.mean(-1, keepdim=True)
        s = (h - u).pow(2).mean(-1, keepdim=True)
        h = (h - u) / torch.sqrt(s + 1e-6) * self.w1 + self.b1
        h = self.w2 * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))
        return self.out(h)


@pytest.mark.parametrize("method", ["symbolic", "export"])
@pytest.mark.parametrize("bias", [0.0, 0.3])
def test_hand_written_norms_are_compensated_at_the_reductions(method, bias):
    model, x = f64(HandNorms(), (torch.randn(4, 5),))
    with torch.no_grad():
        model.inp.weight[[0, 7]] = 0
        model.inp.bias[[0, 7]] = bias  # a non-zero constant too: the ghost (c - mean)^2 is replayed
        model.w1[[0, 7]] = 0
        model.b1[[0, 7]] = 0.0
    gm = fp.capture(model, x, method=method)
    small = fp.minimize(gm, x)
    assert exact(gm, small, x) <= 1e-9
    assert small.get_parameter("inp.weight").shape == (10, 5)
    ghosts = [n for n, b in small.named_buffers() if n.startswith("fxprune_ghost_")]
    assert ghosts  # (c - mean)^2 of the variance is not a constant even when c == 0
    assert not any(n.startswith("fxprune_ghost_") for n, _ in small.named_parameters())
    assert fp.verify(gm, uncompensate(small), x).max_rel["float64"] > 1e-3
    assert fp.minimize(small, x).state_dict().keys() == small.state_dict().keys()  # fixed point: ghosts stay


# ---- transformers streams ----------------------------------------------------------------------
def _dims(table, p_name):
    return [d for pattern, d in table if re.search(pattern, p_name)][:1]


@pytest.mark.parametrize("name", ["gpt2", "llama", "convnext", "vit", "bert"])
def test_dead_stream_channels_leave_every_tensor_of_the_stream(name):
    model, x = f64(*zoo.build(name, head=True))
    assert zoo.plant_dead_stream(model, name, DEAD)
    gm = fp.capture(model, x)
    small = fp.minimize(gm, x)
    assert exact(gm, small, x) <= 1e-9
    checked = 0
    for p_name, p in model.named_parameters():
        for d in _dims(zoo.STREAM_PARAMS[name], p_name) + _dims(READERS[name], p_name):
            assert small.get_parameter(p_name).shape[d] == p.shape[d] - len(DEAD), p_name
            checked += 1
    assert checked >= 10
    assert fp.verify(gm, uncompensate(small), x).max_rel["float64"] > 1e-3  # compensation is what makes it exact
    if name == "gpt2":  # the LM head stays tied to the embedding
        assert small.get_parameter("lm_head.weight") is small.get_parameter("transformer.wte.weight")


def test_convnext_tiny_full_size_random_mask_and_planted_units():
    model, x = zoo.build("convnext", size="full", head=True)
    gm = fp.capture(model, x)
    masked = fp.mask(gm, 0.9, criterion="random", seed=0)
    units = [0, 5, 17]
    with torch.no_grad():
        for p_name, p in masked.named_parameters():
            if p_name.endswith("pwconv1.weight"):
                p[units] = 0
                masked.get_parameter(p_name[:-6] + "bias")[units] = 0.5
    small = fp.minimize(masked, x)
    rep = fp.verify(masked.double(), small.double(), tuple(t.double() for t in x), n_random=0)
    assert rep.ok and rep.max_rel["float64"] <= 1e-9
    blocks = 0
    for p_name, p in masked.named_parameters():
        if p_name.endswith("pwconv1.weight"):
            kept_w, kept_b = small.get_parameter(p_name), small.get_parameter(p_name[:-6] + "bias")
            assert kept_w.shape[0] <= p.shape[0] - len(units)
            assert not ((kept_w == 0).all(dim=1) & (kept_b == 0.5)).any(), p_name  # no planted unit survives
            blocks += 1
    assert blocks == 18


# ---- attention -------------------------------------------------------------------------------
def _plant_attention(model, name, head, qk_dim, v_dim, hd=8):
    with torch.no_grad():
        for p_name, p in model.named_parameters():
            if name == "gpt2" and "c_attn" in p_name:
                d = p.shape[-1] // 3
                cols = [part * d + h * hd + j for part in range(3) for h in range(d // hd) for j in range(hd)
                        if h == head or (part < 2 and j == qk_dim) or (part == 2 and j == v_dim)]
                p.index_fill_(p.dim() - 1, torch.tensor(cols), 0.0)
            if name == "vit" and re.search(r"[qkv]_proj", p_name):
                rows = [h * hd + j for h in range(p.shape[0] // hd) for j in range(hd)
                        if h == head or ("v_proj" not in p_name and j == qk_dim) or ("v_proj" in p_name and j == v_dim)]
                p.index_fill_(0, torch.tensor(rows), 0.0)


@pytest.mark.parametrize("name", ["gpt2", "vit"])
def test_dead_heads_and_head_dim_channels(name):
    model, x = f64(*zoo.build(name, head=True))
    _plant_attention(model, name, head=1, qk_dim=2, v_dim=3)
    gm = fp.capture(model, x)
    small = fp.minimize(gm, x)
    assert exact(gm, small, x) <= 1e-9
    if name == "gpt2":
        assert small.get_parameter("transformer.h.0.attn.c_attn.weight").shape == (32, 3 * 21)  # 3 heads x 7
        assert small.get_parameter("transformer.h.0.attn.c_proj.weight").shape == (21, 32)
    else:
        for proj in "qkv":
            assert small.get_parameter(f"vit.layers.0.attention.{proj}_proj.weight").shape == (21, 32)
        assert small.get_parameter("vit.layers.0.attention.o_proj.weight").shape == (32, 21)
    scales = [n.kwargs.get("scale") for n in small.graph.nodes if "scaled_dot_product" in str(n.target)]
    assert scales and all(s == pytest.approx(1 / math.sqrt(8)) for s in scales)  # the original head_dim's scale


def test_grouped_query_attention_removes_whole_kv_groups_only():
    model, x = f64(*zoo.build("llama"))
    with torch.no_grad():
        for layer in model.model.layers:
            a = layer.self_attn
            a.k_proj.weight[8:16] = 0  # kv head 1 ...
            a.v_proj.weight[8:16] = 0
            a.q_proj.weight[16:32] = 0  # ... and the two query heads that read it
    gm = fp.capture(model, x)
    small = fp.minimize(gm, x)
    assert exact(gm, small, x) <= 1e-9
    assert small.get_parameter("model.layers.0.self_attn.q_proj.weight").shape == (16, 32)
    assert small.get_parameter("model.layers.0.self_attn.k_proj.weight").shape == (8, 32)
    assert small.get_parameter("model.layers.0.self_attn.o_proj.weight").shape == (32, 16)

    model, x = f64(*zoo.build("llama"))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight[24:32] = 0  # a lone query head: its kv head still serves another
    small = fp.minimize(fp.capture(model, x), x)
    assert small.get_parameter("model.layers.0.self_attn.q_proj.weight").shape == (32, 32)


def test_rotary_head_dim_halves_are_one_group_of_pairs():
    """Rotary embeddings pair head_dim channel i with i + d/2: the two halves of q/k head_dim and inv_freq are one
    free group of d/2 channels (removal: tests/test_norms.py)."""
    model, x = zoo.build("llama")
    cg = fp.analyze(fp.capture(model, x))
    head_dim = [g for g in cg.groups if any("q_proj_weight" in n for n, _ in g.spaces) and g.size == 4]
    assert len(head_dim) == 1 and not head_dim[0].frozen, head_dim
    assert any("inv_freq" in n for n, _ in head_dim[0].spaces)
