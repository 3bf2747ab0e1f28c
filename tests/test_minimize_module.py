"""``fp.minimize_module``: the user's own classes back, smaller, checked; generate() with the KV cache unchanged."""
from __future__ import annotations

import copy
import math
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune as fp
from conftest import exact_at, graph_state, minimized_purely, snapshot, torchvision
from fxprune import zoo
from fxprune.graph.capture import LabelsLeftOutWarning
from fxprune.verify import count_params

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from planted import logits, planted  # noqa: E402

# relative tolerance per model: transformers' LlamaRMSNorm computes in float32 inside a float64 model
TOL = {"gpt2": 1e-9, "llama": 1e-4, "vit": 1e-9, "convnext": 1e-9, "bert": 1e-9}


def dead_heads(model: nn.Module, name: str) -> int:
    """Make one attention head per layer dead (GPT-2: head 1's query, key and value; Llama: kv head 1 with its two
    query heads); returns the parameters that hold."""
    n = 0
    with torch.no_grad():
        if name == "gpt2":
            for block in model.transformer.h:
                w, b = block.attn.c_attn.weight, block.attn.c_attn.bias  # (32, 96): q | k | v, 4 heads of 8
                for o in (0, 32, 64):
                    w[:, o + 8:o + 16] = 0
                b[64 + 8:64 + 16] = 0
                n += 3 * 8 * 33 + 8 * 32  # c_attn columns and biases, c_proj rows
        else:
            for layer in model.model.layers:
                a = layer.self_attn
                a.q_proj.weight[16:32] = 0
                a.k_proj.weight[8:16] = 0
                a.v_proj.weight[8:16] = 0
                n += 16 * 32 + 2 * 8 * 32 + 32 * 16
    return n


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_causal_lm_comes_back_as_itself_and_generates_the_same(name):
    model, (ids,), dead = planted(name, "tiny")  # a quarter of every MLP's units dead
    planted_params = count_params(model) - count_params(fp.minimize(fp.capture(model, (ids,))))
    heads = dead_heads(model, name)
    zoo.plant_dead_stream(model, name, [3, 7])  # two residual-stream channels dead
    before = snapshot(model)
    small = fp.minimize_module(model, (ids,))
    assert snapshot(model) == before
    assert type(small) is type(model)
    assert count_params(model) - count_params(small) >= planted_params + heads
    assert any("Compensated" in type(m).__name__ for m in small.modules())  # the stream's norms
    for b, t in ((1, 8), (3, 8)):
        x = torch.randint(0, 100, (b, t))
        with torch.no_grad():
            ref, got = logits(model(x)), logits(small(x))
        assert float((ref - got).abs().max() / ref.abs().max()) <= TOL[name]
    model.config.use_cache = small.config.use_cache = True
    for prompt in (torch.randint(0, 100, (1, 5)), torch.randint(0, 100, (1, 11))):
        kw = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False)
        assert torch.equal(model.generate(prompt, **kw), small.generate(prompt, **kw))


@pytest.mark.parametrize("name", ["vit", "convnext", "bert"])
def test_encoders_come_back_as_themselves(name):
    model, (x,), _ = planted(name, "tiny")
    small = fp.minimize_module(model, (x,))
    assert type(small) is type(model) and count_params(small) < count_params(model)
    for xs in (x, torch.cat([x, x, x])):
        with torch.no_grad():
            ref, got = logits(model(xs)), logits(small(xs))
        assert float((ref - got).abs().max() / ref.abs().max()) <= TOL[name]


class _ConvNet(nn.Module):
    def __init__(self, rank: int = 2) -> None:
        super().__init__()
        conv = nn.Conv2d if rank == 2 else nn.Conv3d
        self.a, self.b, self.c = conv(3, 8, 3, padding=1), conv(8, 8, 3, padding=1), conv(8, 4, 1)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x))))).flatten(2).mean(-1)


@pytest.mark.parametrize("rank, fmt", [(2, torch.channels_last), (3, torch.channels_last_3d)])
def test_a_channels_last_model_comes_back_channels_last(rank, fmt):
    """A model moved with ``.to(memory_format=torch.channels_last)``, as one runs it for speed: its sliced weights
    keep that layout (a slice comes out contiguous), with the same function."""
    torch.manual_seed(0)
    model = _ConvNet(rank).double()
    with torch.no_grad():
        model.a.weight[2:5] = 0
        model.a.bias[2:5] = 0
        model.b.weight[:, 6] = 0
    model = model.to(memory_format=fmt)
    x = torch.randn(2, 3, *(6,) * rank, dtype=torch.float64).contiguous(memory_format=fmt)
    small = fp.minimize_module(model, (x,))
    assert small.a.weight.shape[0] == small.b.weight.shape[1] == 4  # 2-4 dead, 6 unread
    weights = [m.weight for m in small.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
    assert all(w.is_contiguous(memory_format=fmt) for w in weights)
    exact_at(model, small, [(3, 3, *(5,) * rank), (1, 3, *(9,) * rank)])
    graph = minimized_purely(model, (x,))  # the graph's weights too (model and graph untouched)
    assert all(p.is_contiguous(memory_format=fmt) for p in graph.parameters() if p.dim() == rank + 2)


def test_torchvision_resnet_comes_back_as_itself():
    torchvision()
    from torchvision_zoo import bottlenecks, build, plant

    model, (x,) = build("resnet18")
    _, planted_params = plant(model, bottlenecks(model, (x,)))
    small = fp.minimize_module(model, (x,))
    assert type(small) is type(model)
    assert count_params(model) - count_params(small) >= planted_params
    conv = small.layer1[0].conv1
    assert conv.out_channels == conv.weight.shape[0] < model.layer1[0].conv1.out_channels
    for xs in (x, torch.randn(3, *x.shape[1:], dtype=x.dtype)):
        with torch.no_grad():
            ref = model(xs)
            assert float((ref - small(xs)).abs().max() / ref.abs().max()) <= 1e-9


def _convnext(torchvision: Any) -> nn.Module:
    """A two-stage torchvision ConvNeXt (stochastic depth on, as convnext_tiny has it), float64, with stream channel 3
    of stage 1 dead: zero out of the stem and in every block's layer scale, so it stays zero down the residual stream,
    and zero in the weights and biases of the norms that read it."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    torch.manual_seed(0)
    model = ConvNeXt([CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 1)], stochastic_depth_prob=0.1,
                     num_classes=5).double().eval()
    with torch.no_grad():
        for p in model.parameters():  # (layer scales start at 1e-6: the blocks would add next to nothing)
            if p.dim() == 3:
                p.fill_(0.5)
        model.features[0][0].weight[3] = 0
        model.features[0][0].bias[3] = 0
        for norm in [model.features[0][1], *(b.block[2] for b in model.features[1]), model.features[2][0]]:
            norm.weight[3] = 0  # what reads the stream: its norms (their statistics read the constant channel)
            norm.bias[3] = 0
        for block in model.features[1]:
            block.layer_scale[3] = 0
    return model


def test_torchvision_convnext_streams_lose_channels_through_stochastic_depth():
    """torchvision's blocks end in ``stochastic_depth`` (a function a symbolic trace keeps as one call): it has a
    channel rule (identity in eval mode, one factor per sample in training), so the residual streams can lose
    channels; and its ``LayerNorm2d``, which calls ``F.layer_norm`` itself, becomes a compensated norm over dim 1
    and keeps its class. Before, the first froze every stream and the second kept every channel a LayerNorm2d
    reads: convnext_tiny came back 1.02x smaller from a user's cycle. Exact at another batch size and image size;
    the input model is unchanged."""
    tv = torchvision()
    model = _convnext(tv)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    groups = fp.analyze(fp.capture(model, (x,)))
    assert not any(r.startswith("no channel rule") for g in groups.groups for r in g.reasons)
    before = snapshot(model)
    small = fp.minimize_module(model, (x,))
    assert type(small) is type(model) and snapshot(model) == before
    assert small.features[0][0].out_channels == 15 and small.features[1][0].layer_scale.shape[0] == 15
    stem_norm = small.features[0][1]
    assert isinstance(stem_norm, tv.models.convnext.LayerNorm2d) and stem_norm.full_size == 16
    assert count_params(small) < count_params(model)
    for xs in (x, torch.randn(3, 3, 40, 48, dtype=torch.float64)):
        with torch.no_grad():
            ref = model(xs)
            assert float((ref - small(xs)).abs().max() / ref.abs().max()) <= 1e-9
    small.train()  # stochastic depth draws again in training mode, on the narrower stream
    torch.manual_seed(1)
    out = small(x)
    assert out.shape == (2, 5) and bool(torch.isfinite(out).all())


class ReadsItsOwnSize(nn.Module):
    """A forward that reshapes with a size no tensor tells: eager code cannot follow the removal."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.half = nn.Linear(4, 8), nn.Linear(4, 2), 4
        with torch.no_grad():
            self.a.weight[[0, 4]] = 0
            self.a.bias[[0, 4]] = 0

    def forward(self, x):
        return self.b(torch.relu(self.a(x)).view(x.shape[0], 2, self.half)).sum(1)


HALF = 4


class ReadsAGlobalSize(ReadsItsOwnSize):
    """The same reshape with a size read from a module-level constant: nothing in the model tells it."""

    def __init__(self) -> None:
        super().__init__()
        del self.half

    def forward(self, x):
        return self.b(torch.relu(self.a(x)).view(x.shape[0], 2, HALF)).sum(1)


def test_a_size_its_caller_keeps_as_an_attribute_keeps_those_channels_with_a_warning():
    model = ReadsItsOwnSize().double().eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.warns(fp.interop.module.KeptChannelsWarning, match="a"):
        small = fp.minimize_module(model, (x,))
    assert small.a.out_features == 8 and torch.allclose(small(x), model(x), rtol=0, atol=1e-12)


def test_a_size_eager_code_cannot_update_fails_closed():
    model = ReadsAGlobalSize().double().eval()
    with pytest.raises(fp.EquivalenceError, match="minimized copy of ReadsAGlobalSize"):
        fp.minimize_module(model, (torch.randn(3, 4, dtype=torch.float64),))


def test_constant_folded_into_a_layer_without_bias_creates_its_bias():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2, bias=False)).double().eval()
    with torch.no_grad():
        model[0].weight[:3] = 0
        model[0].bias[:3] = 0.5
    x = torch.randn(3, 4, dtype=torch.float64)
    small = fp.minimize_module(model, (x,))
    assert isinstance(small[2].bias, nn.Parameter) and small[2].in_features == 5
    with torch.no_grad():
        assert float((model(x) - small(x)).abs().max()) <= 1e-12


@pytest.mark.slow
def test_the_guides_example_runs():
    """docs/guide.md, "From a pruned model to your smaller model": its code block runs and its asserts hold."""
    text = (Path(__file__).parents[1] / "docs" / "guide.md").read_text()
    section = text.split("## From a pruned model to your smaller model", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "docs/guide.md", "exec"), {})


class Scale(nn.Module):
    """A custom module fxprune has no size rule for: its forward reads ``self.width``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width, self.w = width, nn.Parameter(torch.rand(width) + 0.5)

    def forward(self, x):
        return x * self.w.view(1, self.width)


def test_channels_of_a_module_it_cannot_update_stay_with_a_warning():
    model = nn.Sequential(nn.Linear(4, 8), Scale(8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2)).double().eval()
    with torch.no_grad():
        model[0].weight[:3] = 0  # dead units read by Scale: cannot go in eager code
        model[0].bias[:3] = 0
        model[3].weight[:2] = 0  # dead units elsewhere: go
        model[3].bias[:2] = 0
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.warns(fp.interop.module.KeptChannelsWarning, match="'1'|kept every channel of 1"):
        small = fp.minimize_module(model, (x,))
    assert small[1].w.shape == (8,) and small[0].out_features == 8
    assert small[3].out_features == 4 and small[5].in_features == 4
    with torch.no_grad():
        assert float((model(x) - small(x)).abs().max() / model(x).abs().max()) <= 1e-9


class TimmScale(nn.Module):
    """timm's MetaFormer ``Scale`` (PoolFormer, ConvFormer, CAFormer): ``x * scale.view(shape)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.shape, self.scale = (dim, 1, 1), nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        return x * self.scale.view(self.shape)


def test_a_metaformer_scale_loses_channels_with_its_shape():
    """(Before: ``shape`` stayed ``(8, 1, 1)``, the check failed and every channel of the scale stayed.)"""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), TimmScale(8), nn.ReLU(), nn.Conv2d(8, 2, 1)).double().eval()
    with torch.no_grad():
        model[0].weight[:3] = 0
        model[0].bias[:3] = 0
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fp.interop.module.KeptChannelsWarning)
        small = fp.minimize_module(model, (x,))
    assert type(small[1]) is TimmScale and small[1].shape == (5, 1, 1) and small[1].scale.shape == (5,)
    for shape in [(2, 3, 6, 6), (5, 3, 9, 4)]:
        xb = torch.randn(*shape, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(small(xb), model(xb), rtol=1e-12, atol=1e-12)


class ConvNormAct(nn.Module):
    """timm's ``ConvNormAct``: a convolution, BatchNorm and an activation."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


def _minimized_without_kept_channels(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """``fp.minimize_module(model, (x,))`` with a ``KeptChannelsWarning`` (a channel its class could not follow)
    an error, and the model asserted untouched."""
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fp.interop.module.KeptChannelsWarning)
        small = fp.minimize_module(model, (x,))
    assert snapshot(model) == before
    return small


class LayerScale2d(nn.Module):
    """timm's ``LayerScale2d``: ``x * gamma.view(1, -1, 1, 1)``; besides ``gamma`` it keeps a float and a bool."""

    def __init__(self, dim: int, init_values: float = 1e-5, inplace: bool = False) -> None:
        super().__init__()
        self.init_values, self.inplace = init_values, inplace
        self.gamma = nn.Parameter(torch.full((dim,), init_values))

    def forward(self, x):
        gamma = self.gamma.view(1, -1, 1, 1)
        return x.mul_(gamma) if self.inplace else x * gamma


class KeepsWidth(nn.Module):
    """An MLP that reshapes its hidden activations with a width it keeps as an integer: fxprune cannot update it."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.hidden, self.fc1, self.fc2 = hidden, nn.Conv2d(dim, hidden, 1), nn.Conv2d(hidden, dim, 1)

    def forward(self, x):
        h = self.fc1(x).relu()
        return self.fc2(h.reshape(x.shape[0], self.hidden, -1).reshape(x.shape[0], self.hidden, *x.shape[2:]))


class ScaledBlock(nn.Module):
    """``x + ls(mlp(x))``, as timm's EfficientFormerV2 blocks."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlp, self.ls = KeepsWidth(dim, 2 * dim), LayerScale2d(dim)

    def forward(self, x):
        return x + self.ls(self.mlp(x))


def test_a_module_that_keeps_no_size_loses_channels_in_its_class() -> None:
    """A class fxprune has no updater for, whose module keeps nothing besides its tensors that a forward could read
    a size from (timm's ``LayerScale2d``: ``gamma``, a float, a bool), is no suspect when a module beside it fails
    the check: the residual stream's dead channels go through it. Before, it was frozen with the module that failed
    (an MLP that reshapes with a width it keeps), and the stream kept every channel; that MLP still keeps its
    hidden channels, with the warning, and the copy is exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), ScaledBlock(8), nn.Conv2d(8, 3, 1)).double().eval()
    with torch.no_grad():
        model[0].weight[[2, 5]] = 0  # stream channels 2 and 5: zero out of the stem and out of the MLP
        model[0].bias[[2, 5]] = 0
        model[1].mlp.fc2.weight[[2, 5]] = 0
        model[1].mlp.fc2.bias[[2, 5]] = 0
        model[1].mlp.fc1.weight[3] = 0  # a dead hidden channel, which the MLP's reshape keeps
        model[1].mlp.fc1.bias[3] = -1.0
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    before = snapshot(model)
    with pytest.warns(fp.interop.module.KeptChannelsWarning) as caught:
        small = fp.minimize_module(model, (x,))
    assert snapshot(model) == before
    assert all(".ls" not in str(w.message) for w in caught)
    assert small[1].ls.gamma.shape == (6,) and small[0].out_channels == small[2].in_channels == 6
    assert small[1].mlp.fc1.out_channels == 16  # (its reshape reads the width it keeps)
    for xi in (x, torch.randn(5, 3, 9, 7, dtype=torch.float64)):  # another batch and image size too
        with torch.no_grad():
            assert float((small(xi) - model(xi)).abs().max()) <= 1e-12


class CrossStage(nn.Module):
    """timm's CSPNet stage: ``conv_exp``'s output split in two halves with ``expand_chs // 2``, one half through a
    residual block, both into ``conv_transition``."""

    def __init__(self, cin: int = 3, expand: int = 16) -> None:
        super().__init__()
        self.expand_chs = expand
        self.conv_exp = ConvNormAct(cin, expand)
        self.block = ConvNormAct(expand // 2, expand // 2)
        self.conv_transition = ConvNormAct(expand, 4)

    def forward(self, x):
        xs, xb = self.conv_exp(x).split(self.expand_chs // 2, dim=1)
        return self.conv_transition(torch.cat([xs, xb + self.block(xb)], dim=1))


class Halves(nn.Module):
    """A channel split with ``chunk(2)``, as CSP-style blocks write it (YOLO's C2f): nothing in the class holds
    the halves' width."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.branch, self.out = nn.Conv2d(3, 12, 1), nn.Conv2d(6, 6, 3, padding=1), nn.Conv2d(12, 4, 1)

    def forward(self, x):
        a, b = self.stem(x).relu().chunk(2, dim=1)
        return self.out(torch.cat([a, self.branch(b).relu()], dim=1))


def _kill(bn_or_conv: nn.Module, channels: list[int]) -> None:
    with torch.no_grad():
        bn_or_conv.weight[channels] = 0
        bn_or_conv.bias[channels] = 0


@pytest.mark.parametrize("cls", [CrossStage, Halves])
def test_halves_of_an_equal_split_keep_one_width(cls):
    """A tensor that eager code splits into parts of one size (``split(expand_chs // 2)``, ``chunk(2)``) loses
    channels from its parts only as many from each: the part that loses fewer keeps some of its removable channels
    (first half: 3 dead, second: 1), and timm's ``CrossStage`` gets its new ``expand_chs``. (Before: the parts
    lost different counts, the class could not split them, and every channel of the split stayed with a
    KeptChannelsWarning.)"""
    model = cls().double().eval()
    first = model.conv_exp.bn if cls is CrossStage else model.stem
    _kill(first, [0, 2, 5] + [9] if cls is CrossStage else [0, 2, 5] + [7])
    if cls is CrossStage:
        _kill(model.block.bn, [1])  # (the second half is a residual stream: its channel 9 dead in both terms)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    small = _minimized_without_kept_channels(model, x)
    assert type(small) is cls
    full = 16 if cls is CrossStage else 12
    width = (small.conv_exp.conv if cls is CrossStage else small.stem).out_channels
    assert width == full - 2 * 1  # one channel from each half: the most both can lose
    if cls is CrossStage:
        assert small.expand_chs == width and small.block.conv.in_channels == width // 2
    exact_at(model, small, [(2, 3, 6, 6), (5, 3, 9, 4)])


def test_equal_splits_is_an_option_of_minimize():
    """``fp.passes.minimize.MinimizeOptions(equal_splits=True)`` on the graph: the parts of a chunk keep one width; without it the
    graph takes each part's own (its split sizes are the graph's)."""
    model = Halves().double().eval()
    _kill(model.stem, [0, 2, 5, 7])
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    gm = fp.capture(model, (x,))
    state = graph_state(gm)
    own = fp.minimize(gm)
    equal = fp.minimize(gm, options=fp.passes.minimize.MinimizeOptions(equal_splits=True))
    assert graph_state(gm) == state  # (the captured graph, node meta included, untouched by both)
    assert own.get_parameter("stem.weight").shape[0] == 8 and equal.get_parameter("stem.weight").shape[0] == 10
    for small in (own, equal):
        exact_at(model, small, [(2, 3, 6, 6), (5, 3, 9, 4)])


class KeyValueAttention(nn.Module):
    """timm's LeViT and TinyViT attention: one projection split per head into q, k (``key_dim`` each) and v
    (``val_dim``), the widths and totals kept as attributes; scores scaled by the number computed at init."""

    def __init__(self, dim: int = 16, key_dim: int = 4, val_dim: int = 6, num_heads: int = 3) -> None:
        super().__init__()
        self.num_heads, self.key_dim, self.val_dim, self.scale = num_heads, key_dim, val_dim, key_dim ** -0.5
        self.key_attn_dim, self.val_attn_dim = key_dim * num_heads, val_dim * num_heads
        self.qkv = nn.Linear(dim, num_heads * (2 * key_dim + val_dim))
        self.proj = nn.Linear(self.val_attn_dim, dim)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, self.num_heads, -1).split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        attn = (q.transpose(1, 2) @ k.permute(0, 2, 3, 1) * self.scale).softmax(-1)
        return self.proj((attn @ v.transpose(1, 2)).transpose(1, 2).reshape(B, N, self.val_attn_dim))


@pytest.mark.parametrize("v_dead", ["unread", "zero"])
def test_an_attention_that_keeps_its_key_and_value_widths_gets_them(v_dead):
    """q/k channels 0 and 1 (q's 0 zero, so k's 0 is unread; k's 1 zero, so q's 1 is) and v channel 2 go in every
    head: the class gets ``key_dim`` 2, ``val_dim`` 5 and the totals. (Before, nothing updated them: the check
    failed and every channel of the projection stayed with a KeptChannelsWarning.) v's channel goes where the
    output projection's columns are zero, and where its own rows are: the attention's output is then zero there
    (before, the product of the unknown weights and the zero channel was not known: it stayed)."""
    model = KeyValueAttention().double().eval()
    with torch.no_grad():
        for h in range(3):
            rows = [h * 14 + 0, h * 14 + 4 + 1] + ([h * 14 + 8 + 2] if v_dead == "zero" else [])
            model.qkv.weight[rows] = 0  # q channel 0, k channel 1 (and v channel 2)
            model.qkv.bias[rows] = 0
            if v_dead == "unread":
                model.proj.weight[:, h * 6 + 2] = 0
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    small = _minimized_without_kept_channels(model, x)
    assert type(small) is KeyValueAttention
    assert (small.key_dim, small.val_dim, small.num_heads) == (2, 5, 3)
    assert (small.key_attn_dim, small.val_attn_dim, small.scale) == (6, 15, 0.5)
    assert small.qkv.out_features == 3 * 9 and small.proj.in_features == 15
    exact_at(model, small, [(2, 5, 16), (3, 9, 16)])


class MixedConv2d(nn.ModuleDict):
    """timm's MixNet convolution: its input split with ``splits``, one child convolution of its own kernel size per
    part (depthwise or not), the outputs concatenated."""

    def __init__(self, splits: list[int], outs: list[int], depthwise: bool) -> None:
        super().__init__()
        for i, (cin, cout) in enumerate(zip(splits, outs)):
            k = 3 + 2 * i
            self.add_module(str(i), nn.Conv2d(cin, cout, k, padding=k // 2, groups=cin if depthwise else 1))
        self.splits, self.in_channels, self.out_channels = list(splits), sum(splits), sum(outs)

    def forward(self, x):
        parts = torch.split(x, self.splits, 1)
        return torch.cat([c(parts[i]) for i, c in enumerate(self.values())], 1)


class MixBlock(nn.Module):
    """A MixNet block: a mixed pointwise expansion, a mixed depthwise conv, a projection."""

    def __init__(self) -> None:
        super().__init__()
        self.pw = MixedConv2d([2, 2], [6, 6], depthwise=False)
        self.dw = MixedConv2d([4, 4, 4], [4, 4, 4], depthwise=True)
        self.pwl = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        return self.pwl(self.dw(self.pw(x).relu()).relu())


def test_a_mixed_convolution_gets_its_new_splits():
    """timm's ``MixedConv2d`` splits its input with a list of widths it keeps (``splits``). Its expansion's dead
    channels fall unevenly on the depthwise conv's parts (3, 1 and 2 of 4): the splits follow them. (Before: the
    split sizes stayed, the copy raised, and every channel stayed with a KeptChannelsWarning.)"""
    torch.manual_seed(0)
    model = MixBlock().double().eval()
    with torch.no_grad():  # expansion channels 0, 1, 2 | 5 | 8, 11 dead: zero rows and biases
        for c, rows in ((model.pw["0"], [0, 1, 2, 5]), (model.pw["1"], [2, 5])):
            c.weight[rows] = 0
            c.bias[rows] = 0
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    small = _minimized_without_kept_channels(model, x)
    assert type(small.dw) is MixedConv2d
    assert small.dw.splits == [1, 3, 2] and small.dw.in_channels == small.dw.out_channels == 6
    assert [c.groups for c in small.dw.values()] == [1, 3, 2] and small.pw.out_channels == 6
    assert small.pwl.in_channels == 6
    exact_at(model, small, [(2, 4, 6, 6), (3, 4, 9, 7)])


class Partial_conv3(nn.Module):  # noqa: N801 (timm's name, which minimize_module reads)
    """timm's FasterNet partial convolution: the first ``dim_conv3`` channels of the stream through a 3x3
    convolution, the other ``dim_untouched`` passed on."""

    def __init__(self, dim: int, n_div: int) -> None:
        super().__init__()
        self.dim_conv3 = dim // n_div
        self.dim_untouched = dim - self.dim_conv3
        self.partial_conv3 = nn.Conv2d(self.dim_conv3, self.dim_conv3, 3, 1, 1, bias=False)

    def forward(self, x):
        x1, x2 = torch.split(x, [self.dim_conv3, self.dim_untouched], dim=1)
        return torch.cat((self.partial_conv3(x1), x2), 1)


class MLPBlock(nn.Module):
    """timm's FasterNet block: the partial convolution, then a pointwise MLP, added to the stream."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv2d(dim, 2 * dim, 1, bias=False), nn.BatchNorm2d(2 * dim), nn.ReLU(),
                                 nn.Conv2d(2 * dim, dim, 1, bias=False))
        self.spatial_mixing = Partial_conv3(dim, 4)

    def forward(self, x):
        return x + self.mlp(self.spatial_mixing(x))


class FasterNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.block, self.head = nn.Conv2d(3, 8, 1), MLPBlock(8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean((2, 3)))


def test_a_partial_convolution_gets_its_new_split():
    """timm's FasterNet splits its stream into the channels its partial convolution reads (``dim_conv3``) and
    those it passes on (``dim_untouched``), both kept as attributes. Stream channels 1 (read by the convolution)
    and 6 (passed on) are dead: the split follows them. (Before: the split sizes stayed, the copy raised, and the
    stream kept its channels with a KeptChannelsWarning.)"""
    torch.manual_seed(0)
    model = FasterNetLike().double().eval()
    with torch.no_grad():  # every writer of stream channels 1 and 6 zero
        for t in (model.stem.weight, model.stem.bias, model.block.mlp[3].weight):
            t[[1, 6]] = 0
        model.block.mlp[1].running_mean.uniform_(-1, 1)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    small = _minimized_without_kept_channels(model, x)
    assert type(small.block.spatial_mixing) is Partial_conv3
    pc = small.block.spatial_mixing
    assert (pc.dim_conv3, pc.dim_untouched) == (1, 5) and small.stem.out_channels == 6
    assert small.block.mlp[0].in_channels == pc.partial_conv3.out_channels + 5
    exact_at(model, small, [(2, 3, 6, 6), (3, 3, 9, 7)])


class LinearBottleneck(nn.Module):
    """timm's ReXNet block: its output wider than its input, the first ``in_channels`` channels added to it."""

    def __init__(self, cin: int = 6, cout: int = 10) -> None:
        super().__init__()
        self.use_shortcut, self.in_channels, self.out_channels = True, cin, cout
        self.conv_exp, self.conv_dw, self.conv_pwl = ConvNormAct(cin, 12), ConvNormAct(12, 12), ConvNormAct(12, cout)

    def forward(self, x):
        shortcut = x
        x = self.conv_pwl(self.conv_dw(self.conv_exp(x)))
        return torch.cat([x[:, 0:self.in_channels] + shortcut, x[:, self.in_channels:]], dim=1)


class ReXNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.block, self.head = ConvNormAct(3, 6), LinearBottleneck(), nn.Conv2d(10, 3, 1)

    def forward(self, x):
        return self.head(self.block(self.stem(x))).mean((2, 3))


def test_a_partial_residual_gets_its_new_widths():
    """timm's ReXNet adds its input to the first ``in_channels`` channels of a wider output, kept as attributes.
    Stream channel 2 (added to) and output channel 8 (passed on) are dead: ``in_channels`` and ``out_channels``
    follow. (Before: the copy sliced at the old width, and the channels stayed with a KeptChannelsWarning.)"""
    torch.manual_seed(0)
    model = ReXNetLike().double().eval()
    _kill(model.stem.bn, [2])
    _kill(model.block.conv_pwl.bn, [2, 8])
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    small = _minimized_without_kept_channels(model, x)
    assert type(small.block) is LinearBottleneck
    assert (small.block.in_channels, small.block.out_channels) == (5, 8) and small.head.in_channels == 8
    exact_at(model, small, [(2, 3, 6, 6), (3, 3, 9, 7)])


class ChannelsFirstNorm(nn.LayerNorm):
    """A LayerNorm subclass with a forward of its own, as ConvNeXt-style models write them."""

    def forward(self, x):
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


class DepthwiseStream(nn.Module):
    """A stream through a depthwise conv and a channels-first LayerNorm, with a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.norm = nn.Conv2d(1, 8, 2, stride=2), ChannelsFirstNorm(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.norm(self.stem(x))
        x = x + self.dw(x)
        return self.head(x.mean((2, 3)))


def test_depthwise_groups_and_a_layer_norm_subclass_follow_a_removed_stream_channel():
    torch.manual_seed(0)
    model = DepthwiseStream().double().eval()
    with torch.no_grad():  # stream channels 2 and 5 are zero in every tensor that carries them
        for t in (model.stem.weight, model.stem.bias, model.norm.weight, model.norm.bias, model.dw.weight, model.dw.bias):
            t[[2, 5]] = 0
        model.head.weight[:, [2, 5]] = 0
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    small = fp.minimize_module(model, (x,))
    assert small.dw.groups == small.dw.in_channels == small.dw.out_channels == 6  # groups updated with the channels
    assert isinstance(small.norm, ChannelsFirstNorm) and small.norm.weight.shape == (6,)  # its own class, compensated
    for xi in (x, torch.randn(5, 1, 12, 12, dtype=torch.float64)):  # another batch and image size too
        with torch.no_grad():
            assert float((small(xi) - model(xi)).abs().max()) <= 1e-12


@pytest.mark.parametrize("dynamic", ["every", ({0: torch.export.Dim.AUTO},)], ids=["symbolic", "export"])
def test_a_grouped_conv_that_loses_channels_within_every_group_keeps_its_groups(dynamic):
    """minimize removes the same position from every group of a grouped conv (RegNet's blocks, 10 groups of 15
    output channels, kept 10 groups of 9): the module's sizes alone read that as whole groups gone (groups 6 of 15),
    and the copy did not run. ``groups`` comes from the graph's convolution, whichever tracer made it: an exported
    graph's aten.conv2d was not read (transformers' RegNet did not run after its second cycle)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1, groups=2), nn.ReLU(),
                          nn.Conv2d(4, 4, 1)).double()
    with torch.no_grad():
        for k in (1, 5):  # input position 1 of both groups: dead
            model[0].weight[k], model[0].bias[k] = 0.0, -1.0
        for k in (0, 2):  # output position 0 of both groups: dead
            model[2].weight[k], model[2].bias[k] = 0.0, -1.0
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    small = fp.minimize_module(model, (x,), dynamic_shapes=dynamic)
    conv = small[2]
    assert (conv.groups, conv.in_channels, conv.out_channels) == (2, 6, 2)
    assert conv.weight.shape == (2, 3, 3, 3) and small[0].out_channels == 6 and small[4].in_channels == 2
    for xi in (x, torch.randn(5, 3, 11, 9, dtype=torch.float64)):  # another batch and image size too
        with torch.no_grad():
            assert float((small(xi) - model(xi)).abs().max()) <= 1e-12


def vit_with_a_dead_stream_channel(dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor]:
    """transformers' ViT (2 layers, 2 heads of 16) whose widest residual-stream channel is exact zeros in every
    tensor of its group, with head_dim channels 0-1 of both heads dead in layer 0's q and channel 2 in its v; an
    example batch of 4."""
    transformers = pytest.importorskip("transformers", reason="the model comes from transformers (dev dependency)")
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, num_labels=4)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(cfg).to(dtype).eval()
    x = torch.randn(4, 1, 8, 8, dtype=dtype)
    reg = fp.GroupLasso(model, (x,))
    stream = max(range(reg.channels), key=lambda c: sum(int((s.channel == c).sum()) for s in reg.slices))
    with torch.no_grad():
        for m in reg._members(model):
            s, t = m.slice, m.param
            hit = (s.channel == stream).nonzero().flatten()
            if len(hit):
                t.index_fill_(s.dim, hit, 0.0)
        att = model.vit.layers[0].attention
        for lin, rows in ((att.q_proj, [0, 1, 16, 17]), (att.v_proj, [2, 18])):
            lin.weight[rows] = 0
            lin.bias[rows] = 0
    return model, x


def test_vit_stream_channel_goes_and_narrower_heads_are_written_back():
    """transformers' ViTAttention reshapes q/k/v with its own ``head_dim`` and scales by a ``scaling`` it computed
    from it: where head_dim channels go from q/k and from v, q, k and v keep one width (the widest), ``head_dim``
    becomes it and ``scaling`` stays; a dead residual-stream channel, which q/k/v read as input, goes too."""
    model, x = vit_with_a_dead_stream_channel(torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fp.interop.module.KeptChannelsWarning)
        small = fp.minimize_module(model, (x,))
    att, was = small.vit.layers[0].attention, model.vit.layers[0].attention
    assert type(small) is type(model) and att.q_proj.in_features == 31
    # q/k lost two per head, v one: all three keep 15 per head (v's widest), and head_dim says so
    assert (att.q_proj.out_features, att.k_proj.out_features, att.v_proj.out_features) == (30, 30, 30)
    assert att.o_proj.in_features == 30 and att.head_dim == 15 and att.scaling == was.scaling == 16 ** -0.5
    assert small.vit.layers[1].attention.head_dim == 16  # the other layer lost none
    for xi in (x, torch.randn(7, 1, 8, 8, dtype=torch.float64)):
        with torch.no_grad():
            assert float((small(xi).logits - model(xi).logits).abs().max()) <= 1e-10


def test_whole_heads_and_head_dims_go_from_bert_and_vit_classes():
    """A whole head (its q, k and v rows) and head_dim channels go together: the head count attributes follow
    (``num_attention_heads``, ``all_head_size``); the copy is exact at other batch sizes and lengths and saves and
    loads with its narrower heads."""
    transformers = pytest.importorskip("transformers", reason="the model comes from transformers (dev dependency)")
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                                          num_attention_heads=4, intermediate_size=64))
    bert = bert.double().eval()
    with torch.no_grad():
        for layer in bert.encoder.layer:
            a = layer.attention.self
            for lin in (a.query, a.key, a.value):  # head 2 whole
                lin.weight[16:24] = 0
                lin.bias[16:24] = 0
            for h in range(4):  # head_dim channel 3 of every head in k, channel 5 in v
                for lin, d in ((a.key, 3), (a.value, 5)):
                    lin.weight[h * 8 + d] = 0
                    lin.bias[h * 8 + d] = 0
    ids = torch.randint(0, 50, (2, 12))
    before = snapshot(bert)
    small = fp.minimize_module(bert, (ids,))
    assert snapshot(bert) == before and bert.encoder.layer[0].attention.self.attention_head_size == 8  # untouched
    a = small.encoder.layer[0].attention.self
    assert (a.num_attention_heads, a.attention_head_size, a.all_head_size) == (3, 7, 21)
    assert a.query.out_features == a.value.out_features == 21 and small.encoder.layer[0].attention.output.dense.in_features == 21
    back = fp.load(fp.save(small, tempfile.mkdtemp()),
                   lambda: transformers.BertModel(bert.config).double().eval())
    for n in (12, 5, 19):
        x = torch.randint(0, 50, (3, n))
        with torch.no_grad():
            want = bert(x).last_hidden_state
            assert float((small(x).last_hidden_state - want).abs().max()) <= 1e-10
            assert float((back(x).last_hidden_state - want).abs().max()) <= 1e-10


class ScaledAtForward(nn.Module):
    """An attention that computes its scale from ``head_dim`` in its forward (transformers' MPNet, PVT-v2, ESM
    and some 40 more); ``fused``: one ``qkv`` projection and ``scaled_dot_product_attention``'s default scale, from
    the width of q (timm's ``Attention``)."""

    def __init__(self, dim: int = 16, num_heads: int = 2, fused: bool = False) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.fused = num_heads, dim // num_heads, fused
        if fused:
            self.qkv = nn.Linear(dim, 3 * dim)
        else:
            self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        if self.fused:
            q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            q, k, v = (lin(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2) for lin in (self.q, self.k, self.v))
            out = (q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)).softmax(-1) @ v
        return x + self.o(out.transpose(1, 2).reshape(B, N, -1))


@pytest.mark.parametrize("fused", [False, True], ids=["sqrt-in-forward", "fused-sdpa-default-scale"])
def test_attention_scaled_from_its_head_width_in_forward_loses_channels_inside_heads(fused: bool) -> None:
    """A class that computes its scale from ``head_dim`` at every forward would score with the new width: the
    queries are multiplied by sqrt(new / old), so its scores stay, and head_dim channels go (before: the check
    failed and every channel inside the heads stayed, with a ``KeptChannelsWarning``)."""
    torch.manual_seed(0)
    model = nn.Sequential(ScaledAtForward(fused=fused), nn.Linear(16, 3)).double().eval()
    att = model[0]
    q, k, v = (att.qkv.weight[i * 16:(i + 1) * 16] for i in range(3)) if fused else (att.q.weight, att.k.weight, att.v.weight)
    with torch.no_grad():
        for h in range(2):  # head_dim channel 1 of each head in k (and q: a fused qkv splits one head_dim dim
            k[h * 8 + 1] = 0  # into q, k and v, so a channel goes from all three or none), channels 1 and 6 in v
            v[[h * 8 + 1] + ([] if fused else [h * 8 + 6])] = 0
            if fused:
                q[h * 8 + 1] = 0
        for b in [att.qkv.bias] if fused else [att.k.bias, att.v.bias]:
            b.zero_()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    small = _minimized_without_kept_channels(model, x)
    a = small[0]
    assert a.head_dim == 7 and a.num_heads == 2 and a.o.in_features == 14  # (v's widest head keeps 7 of 8)
    assert (a.qkv.out_features == 42) if fused else (a.q.out_features == a.k.out_features == a.v.out_features == 14)
    for xi in (x, torch.randn(2, 9, 16, dtype=torch.float64)):  # another batch and length too
        with torch.no_grad():
            assert float((small(xi) - model(xi)).abs().max()) <= 1e-12


def test_mpnet_loses_channels_inside_its_heads() -> None:
    """transformers' MPNetSelfAttention divides by ``math.sqrt(self.attention_head_size)`` in its forward: its
    narrower heads are written back (before: every channel inside them stayed, with a warning), exact in float64
    at other batch sizes and lengths; the model is untouched."""
    transformers = pytest.importorskip("transformers", reason="the model comes from transformers (dev dependency)")
    torch.manual_seed(0)
    model = transformers.MPNetModel(transformers.MPNetConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=64)).double().eval()
    a = model.encoder.layer[0].attention.attn
    with torch.no_grad():
        for h in range(4):  # head_dim channel 2 of every head in k and in v
            for lin in (a.k, a.v):
                lin.weight[h * 8 + 2] = 0
                lin.bias[h * 8 + 2] = 0
    ids = torch.randint(0, 50, (2, 10))
    small = _minimized_without_kept_channels(model, ids)
    b = small.encoder.layer[0].attention.attn
    assert (b.attention_head_size, b.num_attention_heads, b.all_head_size) == (7, 4, 28) and b.o.in_features == 28
    assert a.attention_head_size == 8
    for n in (10, 4, 17):
        x = torch.randint(0, 50, (3, n))
        with torch.no_grad():
            assert float((small(x).last_hidden_state - model(x).last_hidden_state).abs().max()) <= 1e-10


def test_rope_attention_keeps_its_heads_with_a_warning():
    """Llama's rotary embedding is built for the config's head_dim: narrower v heads cannot be written back (q/k
    keep theirs), so the check fails and v's head channels stay, with the warning."""
    transformers = pytest.importorskip("transformers", reason="the model comes from transformers (dev dependency)")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64)).double().eval()
    with torch.no_grad():
        for h in range(4):
            model.model.layers[0].self_attn.v_proj.weight[h * 8 + 4:h * 8 + 8] = 0
    ids = torch.randint(0, 50, (2, 9))
    with pytest.warns(fp.interop.module.KeptChannelsWarning, match="inside the heads of model.layers.0.self_attn"):
        small = fp.minimize_module(model, (ids,))
    assert small.model.layers[0].self_attn.v_proj.out_features == 32 and small.model.layers[0].self_attn.head_dim == 8
    with torch.no_grad():
        x = torch.randint(0, 50, (3, 14))
        assert float((small(x).logits - model(x).logits).abs().max()) <= 1e-10


def _gqa_llama(transformers: Any) -> nn.Module:
    """A float64 Llama (4 query heads, 2 kv heads, head_dim 8) whose v has channel 3 of every head dead (within the
    heads) and whose kv group 1 is dead (its v rows: what heads 2 and 3 add is zero)."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)).double().eval()
    v = model.model.layers[0].self_attn.v_proj.weight
    with torch.no_grad():
        v[[3, 11]] = 0
        v[8:16] = 0
    return model


def test_rope_attention_loses_a_whole_kv_group_while_channels_inside_heads_stay():
    """The class cannot take a narrower rotary head, but whole kv groups fit it: the channels inside the heads stay
    (one warning says so) and kv group 1 goes with its two query heads, exact at other batch sizes and lengths, with
    greedy generate() equal; the input model is unchanged."""
    transformers = pytest.importorskip("transformers", reason="the model comes from transformers (dev dependency)")
    model = _gqa_llama(transformers)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(fp.interop.module.KeptChannelsWarning, match="whole heads and kv groups still go"):
        small = fp.minimize_module(model, (torch.randint(0, 50, (2, 9)),))
    att = small.model.layers[0].self_attn
    assert type(small) is type(model) and att.head_dim == 8
    assert (att.q_proj.out_features, att.k_proj.out_features, att.v_proj.out_features, att.o_proj.in_features) == (16, 8, 8, 16)
    assert count_params(small) == count_params(model) - 2 * 16 * 32 - 2 * 8 * 32  # q and o: 2 heads; k and v: 1
    for b, n in ((3, 14), (1, 23)):
        x = torch.randint(0, 50, (b, n))
        with torch.no_grad():
            assert float((small(x).logits - model(x).logits).abs().max()) <= 1e-10
    x = torch.randint(0, 50, (1, 6))
    assert torch.equal(model.generate(x, max_new_tokens=6, do_sample=False), small.generate(x, max_new_tokens=6, do_sample=False))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_rope_attention_left_with_one_kv_head_keeps_it_whole_the_next_time():
    """The cycle minimizes its own result again: a Llama left with one kv head (whose v still has a dead channel
    inside it) is one head of its attention's width, not a stream. Before, the second call narrowed that head
    (head_dim 1, the check failed) and then froze v_proj's output channels with a warning naming them; now it keeps
    the channels inside the head at once, exact at other batch sizes and lengths."""
    transformers = pytest.importorskip("transformers", reason="the model comes from transformers (dev dependency)")
    ids = (torch.randint(0, 50, (2, 9)),)
    with pytest.warns(fp.interop.module.KeptChannelsWarning):
        once = fp.minimize_module(_gqa_llama(transformers), ids)
    assert once.model.layers[0].self_attn.v_proj.out_features == 8  # one kv head, its channel 3 still zero
    before = snapshot(once)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        twice = fp.minimize_module(once, ids)
    assert snapshot(once) == before  # the input is untouched
    kept = [str(w.message) for w in caught if issubclass(w.category, fp.interop.module.KeptChannelsWarning)]
    assert any("inside the heads of model.layers.0.self_attn" in m for m in kept), kept
    assert not any("output channels" in m for m in kept), kept
    att = twice.model.layers[0].self_attn
    assert att.head_dim == 8 and (att.q_proj.out_features, att.k_proj.out_features, att.v_proj.out_features) == (16, 8, 8)
    for b, n in ((3, 14), (1, 23)):
        x = torch.randint(0, 50, (b, n))
        with torch.no_grad():
            assert float((twice(x).logits - once(x).logits).abs().max()) <= 1e-10


def test_fused_rotary_attention_loses_a_whole_head():
    """GPT-NeoX's fused query_key_value (per head: q, k, v of ``head_size``; the head count read off the reshape)
    with v channel 3 dead in every head and head 2's q, k and v zero: head 2 goes, the channels inside the others stay, exact at
    other batch sizes and lengths."""
    transformers = pytest.importorskip("transformers", reason="the model comes from transformers (dev dependency)")
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4)).double().eval()
    qkv = model.gpt_neox.layers[0].attention.query_key_value
    with torch.no_grad():
        for h in range(4):
            qkv.weight[h * 24 + 19] = 0
            qkv.bias[h * 24 + 19] = 0
        qkv.weight[2 * 24:3 * 24] = 0  # head 2's q, k and v (a head the group lasso zeroed whole)
        qkv.bias[2 * 24:3 * 24] = 0
    with pytest.warns(fp.interop.module.KeptChannelsWarning, match="inside the heads of gpt_neox.layers.0.attention"):
        small = fp.minimize_module(model, (torch.randint(0, 50, (2, 9)),))
    att = small.gpt_neox.layers[0].attention
    assert (att.query_key_value.out_features, att.dense.in_features, att.head_size) == (72, 24, 8)
    for b, n in ((3, 14), (1, 5)):
        x = torch.randint(0, 50, (b, n))
        with torch.no_grad():
            assert float((small(x).logits - model(x).logits).abs().max()) <= 1e-10


def test_whole_heads_option_keeps_channels_inside_heads_in_the_graph():
    """``MinimizeOptions(whole_heads=...)`` on the graph: without it v loses its dead channel inside the heads, with it
    only kv group 1 goes (q, k, v and o's input by whole heads); both exact."""
    transformers = pytest.importorskip("transformers", reason="the model comes from transformers (dev dependency)")
    from fxprune.passes.minimize import MinimizeOptions
    model = _gqa_llama(transformers)
    x = torch.randint(0, 50, (2, 9))
    with fp.interop.module.cache_off(model):
        gm = fp.capture(model, (x,), dynamic_shapes="every")
    att = "model.layers.0.self_attn"
    dims = tuple(f"{att}.{p}_proj.weight:0" for p in "qkvo")
    sizes = lambda g: tuple(g.get_parameter(f"{att}.{p}_proj.weight").shape[0] for p in "qkv")  # noqa: E731
    assert sizes(fp.minimize(gm)) == (16, 8, 7)
    state, graph = snapshot(gm), graph_state(gm)
    small = fp.minimize(gm, options=MinimizeOptions(whole_heads=dims))
    assert snapshot(gm) == state and graph_state(gm) == graph  # the input graph, its node.meta included
    assert sizes(small) == (16, 8, 8) and small.get_parameter(f"{att}.o_proj.weight").shape == (32, 16)
    report = fp.verify(gm, small, (torch.randint(0, 50, (3, 13)),))
    assert report.ok and report.max_rel["float64"] <= 1e-9
    for bad in (("q_proj.weight",), (0,), f"{att}.q_proj.weight:0"):
        with pytest.raises(fp.InputError, match="whole_heads takes a tuple of 'name:dim' strings"):
            fp.minimize(gm, options=MinimizeOptions(whole_heads=bad))


def test_aligned_option_keeps_a_multiple_of_k_channels_in_the_groups_of_a_dim():
    """``MinimizeOptions(aligned=(("name:dim", k),))``: 6 dead units of 16 leave 10, kept up to 12; exact; the
    input graph untouched; malformed entries are typed errors."""
    from fxprune.passes.minimize import MinimizeOptions
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).double()
    with torch.no_grad():
        model[0].weight[:6] = 0
        model[0].bias[:6] = -1.0
    x = torch.randn(5, 8, dtype=torch.float64)
    gm = fp.capture(model, (x,))
    assert fp.minimize(gm).get_parameter("0.weight").shape == (10, 8)
    state, graph = snapshot(gm), graph_state(gm)
    small = fp.minimize(gm, options=MinimizeOptions(aligned=(("0.weight:0", 4),)))
    assert snapshot(gm) == state and graph_state(gm) == graph
    assert small.get_parameter("0.weight").shape == (12, 8) and small.get_parameter("2.weight").shape == (4, 12)
    assert fp.minimize(gm, options=MinimizeOptions(aligned=(("0.weight:0", 16),))).get_parameter(
        "0.weight").shape == (16, 8)  # rounded up to all of them: the group stays whole
    report = fp.verify(gm, small, (torch.randn(3, 8, dtype=torch.float64),))
    assert report.ok and report.max_rel["float64"] <= 1e-9
    for bad in ((("0.weight", 4),), (("0.weight:0", 0),), ("0.weight:0",)):
        with pytest.raises(fp.InputError, match="aligned takes"):
            fp.minimize(gm, options=MinimizeOptions(aligned=bad))
    mine = fp.minimize_module(model, (x,), aligned=(("0.weight:0", 4),))  # the option through minimize_module
    assert type(mine) is nn.Sequential and mine[0].weight.shape == (12, 8)
    conv = nn.Sequential(nn.Conv1d(3, 16, 3), nn.ReLU(), nn.Conv1d(16, 8, 3)).double()  # 3-D weights, no experts:
    with torch.no_grad():                                                                 # minimize_module aligns
        conv[0].weight[:5] = 0                                                            # nothing
        conv[0].bias[:5] = -1.0
    assert fp.minimize_module(conv, (torch.randn(2, 3, 20, dtype=torch.float64),))[0].weight.shape == (11, 3, 3)


def test_gpt2_as_loaded_with_the_cache_on_keeps_its_class_cache_and_generate():
    """A causal LM as from_pretrained gives it (use_cache=True): captured with the cache off, dead MLP units and a
    head_dim channel dead in q and v go (GPT2Attention's fused c_attn narrows, ``head_dim`` follows, ``scaling``
    stays), and the copy keeps use_cache and greedy generate() with the KV cache equal to the original's, at two
    prompt lengths."""
    transformers = pytest.importorskip("transformers", reason="the model comes from transformers (dev dependency)")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    assert model.config.use_cache
    with torch.no_grad():
        for block in model.transformer.h:
            block.mlp.c_fc.weight[:, :40] = 0  # 40 of 128 MLP units dead (Conv1D weight is (in, out))
            block.mlp.c_fc.bias[:40] = -5.0
        att = model.transformer.h[0].attn.c_attn  # head_dim channel 0 of both heads dead in q and in v
        for col in (0, 16, 64, 80):
            att.weight[:, col] = 0
            att.bias[col] = 0
    ids = torch.randint(0, 64, (2, 10))
    small = fp.minimize_module(model, (ids,))
    assert type(small) is type(model) and small.config.use_cache and model.config.use_cache
    assert small.transformer.h[0].mlp.c_fc.nf == 88 and small.transformer.h[0].attn.c_attn.nf == 90
    assert small.transformer.h[0].attn.head_dim == 15 and small.transformer.h[0].attn.scaling == 16 ** -0.5
    for n in (10, 17):
        x = torch.randint(0, 64, (3, n))
        with torch.no_grad():
            assert float((small(x).logits - model(x).logits).abs().max()) <= 1e-10
        a = model.generate(x[:1], max_new_tokens=12, do_sample=False, pad_token_id=0)
        b = small.generate(x[:1], max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert torch.equal(a, b)


TEXT_ENCODERS = {  # name -> config fields of a tiny one (the rest: transformers' defaults, as users load them)
    "BertModel": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    "AlbertModel": dict(hidden_size=32, embedding_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64),
    "DistilBertModel": dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64),
    "ElectraModel": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    "DebertaV2Model": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
}


@pytest.mark.parametrize("name", sorted(TEXT_ENCODERS))
def test_text_encoders_come_back_accepting_every_sequence_length(name):
    """Their position_ids / token_type_ids buffers are sliced by the sequence length: an index table, not a
    channel. Minimized at 12 tokens, the model runs and is equal at 7 and 17 (it was cut to 13 positions)."""
    transformers = pytest.importorskip("transformers", reason="the models come from transformers (dev dependency)")
    cfg = getattr(transformers, name.replace("Model", "Config"))(vocab_size=100, max_position_embeddings=64,
                                                                 **TEXT_ENCODERS[name])
    torch.manual_seed(0)
    model = getattr(transformers, name)(cfg).double().eval()
    dead = 0
    with torch.no_grad():  # 5 dead units in every MLP's first layer
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.out_features == 64:
                m.weight[:5] = 0
                m.bias[:5] = 0
                dead += 1
    small = fp.minimize_module(model, (torch.randint(0, 100, (2, 12)),))
    assert type(small) is type(model) and count_params(model) - count_params(small) >= dead * 5 * (2 * 32 + 1)
    buffers = dict(model.named_buffers())
    for n, b in small.named_buffers():  # every index table whole
        if not b.is_floating_point():
            assert b.shape == buffers[n].shape, n
    for length in (12, 7, 17):
        x = torch.randint(0, 100, (3, length))
        with torch.no_grad():
            ref, got = model(x).last_hidden_state, small(x).last_hidden_state
        assert float((ref - got).abs().max() / ref.abs().max()) <= 1e-9, length


class _SlicedPositions(nn.Module):
    """A learned position table read up to the input's length (``pos[:, :T]``), then an MLP with dead units."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 32, 8))
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x + self.pos[:, : x.shape[1]])))


def test_a_parameter_sliced_by_the_input_length_keeps_every_row():
    torch.manual_seed(0)
    model = _SlicedPositions().double()
    with torch.no_grad():
        model.fc1.weight[:6] = 0
        model.fc1.bias[:6] = -1.0
    small = fp.minimize_module(model, (torch.randn(2, 10, 8, dtype=torch.float64),))
    assert small.pos.shape == (1, 32, 8) and small.fc1.out_features == 10
    for length in (10, 3, 32):
        x = torch.randn(2, length, 8, dtype=torch.float64)
        with torch.no_grad():
            assert torch.allclose(small(x), model(x), rtol=1e-12, atol=1e-12)


CAUSAL_LMS = {  # name -> (config class, model class, config fields of a tiny one; use_cache stays the default, on)
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(num_key_value_heads=2, head_dim=8)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=8)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(num_key_value_heads=2, pad_token_id=0, eos_token_id=1,
                                                  bos_token_id=1)),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(intermediate_size=None, max_position_embeddings=None)),
    "bart": ("BartConfig", "BartForConditionalGeneration", dict(
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, hidden_size=None, intermediate_size=None, num_hidden_layers=None,
        num_attention_heads=None)),
}
_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
             max_position_embeddings=64)
_FIRST_MLP = ("up_proj", "gate_up_proj", "dense_h_to_4h", "fc1")  # the first MLP layer's name in each family


def assert_same_lm(model: nn.Module, small: nn.Module) -> None:
    """Equal logits in float64 at the example's length (12 tokens) and at 7 and 17, and 12 greedy tokens from
    ``generate()`` (the KV cache on) equal for prompts of 5 and 11 tokens."""
    for length in (12, 7, 17):
        x = torch.randint(3, 100, (3, length))
        with torch.no_grad():
            ref, got = model(x).logits, small(x).logits
        assert float((ref - got).abs().max() / ref.abs().max()) <= 1e-9, length
    for prompt in (torch.randint(3, 100, (1, 5)), torch.randint(3, 100, (1, 11))):
        kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
        assert torch.equal(model.generate(prompt, **kw), small.generate(prompt, **kw))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CAUSAL_LMS))
def test_causal_lms_as_loaded_come_back_as_themselves_and_generate_the_same(name):
    """Default configs (``use_cache=True``, as ``from_pretrained`` gives): the class back with its cache flag,
    smaller by the planted units, equal in float64 at other lengths, 12 greedy tokens equal for two prompts."""
    transformers = pytest.importorskip("transformers", reason="the models come from transformers (dev dependency)")
    cfg_name, model_name, fields = CAUSAL_LMS[name]
    kw = {k: v for k, v in {**_TINY, **fields}.items() if v is not None}
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(getattr(transformers, cfg_name)(**kw)).double().eval()
    assert model.config.use_cache
    planted = 0
    with torch.no_grad():  # 5 dead units in every MLP (rows of its first layer; Phi-3's fused gate_up: gate rows)
        for path, m in model.named_modules():
            if isinstance(m, nn.Linear) and path.rpartition(".")[2] in _FIRST_MLP:
                m.weight[:5] = 0
                if m.bias is not None:
                    m.bias[:5] = 0
                planted += 1
    assert planted
    small = fp.minimize_module(model, (torch.randint(3, 100, (2, 12)),))
    assert type(small) is type(model) and small.config.use_cache
    assert count_params(model) - count_params(small) >= planted * 5 * 2 * 32 // (2 if name == "phi3" else 1)
    assert_same_lm(model, small)


def test_gemma_norms_scaling_by_one_plus_weight_are_compensated_in_the_class():
    """Gemma's RMSNorm scales by ``1 + weight``: the compensated norm keeps that offset, so dead stream channels go
    in the class as they do in the graph (they stayed, frozen after a failed check, when it assumed ``weight``)."""
    transformers = pytest.importorskip("transformers", reason="the model comes from transformers (dev dependency)")
    cfg = transformers.GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=8, vocab_size=100, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.GemmaForCausalLM(cfg).double().eval()
    with torch.no_grad():  # stream channels 3 and 7 dead: embedding columns and the rows written into the stream
        for name, p in model.named_parameters():
            if name.endswith("embed_tokens.weight"):
                p[:, [3, 7]] = 0
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p[[3, 7]] = 0
            elif "norm" in name:
                p.normal_(0, 0.3)
    ids = torch.randint(3, 100, (2, 12))
    small = fp.minimize_module(model, (ids,))
    norms = [m for m in small.modules() if isinstance(m, fp.nn.CompensatedRMSNorm)]
    assert type(small) is type(model) and norms and all(m.offset == 1.0 and m.kept == 30 for m in norms)
    assert small.model.embed_tokens.weight.shape == (100, 30)
    for x in (ids, torch.randint(3, 100, (3, 7))):
        with torch.no_grad():
            ref, got = model(x).logits, small(x).logits
        assert float((ref - got).abs().max() / ref.abs().max()) <= 1e-4  # Gemma's norms compute in float32
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
    prompt = torch.randint(3, 100, (1, 6))
    assert torch.equal(model.generate(prompt, **kw), small.generate(prompt, **kw))


@pytest.mark.slow
def test_mamba_as_loaded_loses_its_unread_inner_channels_in_the_graph_and_in_its_class():
    """Mamba (its cache on, as loaded): the SSM state starts as ``torch.zeros`` of the inner width, the depthwise
    convolution reads ``conv1d.weight.squeeze(1)`` unsqueezed again, per-step outputs are stacked. Inner channels
    nothing reads (out_proj and x_proj columns zero) go in the graph and in the class, exact at other lengths,
    generate() unchanged; the mixer's ``intermediate_size`` follows."""
    transformers = pytest.importorskip("transformers", reason="the model comes from transformers (dev dependency)")
    cfg = transformers.MambaConfig(hidden_size=32, state_size=8, num_hidden_layers=2, vocab_size=100, expand=2,
                                   conv_kernel=4)
    torch.manual_seed(0)
    model = transformers.MambaForCausalLM(cfg).double().eval()
    assert model.config.use_cache
    with torch.no_grad():
        for layer in model.backbone.layers:
            layer.mixer.out_proj.weight[:, :5] = 0
            layer.mixer.x_proj.weight[:, :5] = 0
    ids = torch.randint(3, 100, (2, 12))
    per_channel = 2 * 32 + 4 + 1 + 8 + 1 + 2 + 1 + 32 + 18  # in_proj x and gate rows, conv, A_log, D, dt_proj, out_proj, x_proj
    before = snapshot(model)
    small = fp.minimize_module(model, (ids,))
    assert snapshot(model) == before
    assert type(small) is type(model) and small.config.use_cache
    assert count_params(model) - count_params(small) == 2 * 5 * per_channel
    assert all(layer.mixer.intermediate_size == 59 for layer in small.backbone.layers)
    assert_same_lm(model, small)
    with fp.interop.module.cache_off(model):
        gm = fp.capture(model, (ids,))
    assert count_params(gm) - count_params(fp.minimize(gm)) == 2 * 5 * per_channel


@pytest.mark.slow
def test_mamba_loses_time_step_rank_and_state_channels_in_its_class():
    """A time-step channel ``dt_proj`` does not read and a state channel B never writes go in the graph; the class
    kept them (``x_proj``'s output is split at ``time_step_rank`` and ``ssm_state_size``, which it did not update:
    the flow's Mamba warned "kept the channels of ...x_proj"). The mixer's sizes now follow, exact at another
    length, generate() unchanged."""
    transformers = pytest.importorskip("transformers", reason="the model comes from transformers (dev dependency)")
    cfg = transformers.MambaConfig(hidden_size=32, state_size=8, num_hidden_layers=2, vocab_size=100, expand=2,
                                   conv_kernel=4)
    torch.manual_seed(0)
    model = transformers.MambaForCausalLM(cfg).double().eval()
    rank = model.backbone.layers[0].mixer.time_step_rank
    with torch.no_grad():
        for layer in model.backbone.layers:
            layer.mixer.dt_proj.weight[:, 0] = 0  # time-step channel 0: unread
            layer.mixer.x_proj.weight[rank + 3] = 0  # B's state channel 3: zero, so C's and A's channel 3 are unread
    ids = torch.randint(3, 100, (2, 12))
    small = fp.minimize_module(model, (ids,))
    for layer in small.backbone.layers:
        mixer = layer.mixer
        assert (mixer.time_step_rank, mixer.ssm_state_size) == (rank - 1, 7)
        assert mixer.x_proj.out_features == rank - 1 + 2 * 7 and mixer.A_log.shape == (64, 7)
    assert_same_lm(model, small)


def test_jambas_mamba_mixer_gets_its_sizes_as_mambas_does():
    """Jamba's mixer (``JambaMambaMixer``: Mamba's layout, with RMS norms on the time step, B and C) splits
    ``x_proj``'s output at ``time_step_rank`` and keeps ``intermediate_size``, as Mamba's does, but only Mamba's
    and Falcon-Mamba's classes were known by name: a dead time-step channel made the check fail and the whole mixer
    was kept (the flow's Jamba warned "kept every channel of model.layers.0.mamba"). Mixers are now known by the
    end of their name and the sizes they keep: the inner channels nothing reads and the dead time-step channel go,
    the sizes follow, exact at other batch sizes and lengths, generate() unchanged."""
    transformers = pytest.importorskip("transformers", reason="the model comes from transformers (dev dependency)")
    cfg = transformers.JambaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   num_experts=2, num_experts_per_tok=1, expert_layer_period=2, expert_layer_offset=1,
                                   attn_layer_period=2, attn_layer_offset=1, mamba_d_state=8, mamba_dt_rank=4,
                                   use_mamba_kernels=False)
    torch.manual_seed(0)
    model = transformers.JambaForCausalLM(cfg).eval()  # (float32: its experts' grouped_mm takes no float64)
    mixer = model.model.layers[0].mamba
    with torch.no_grad():
        mixer.out_proj.weight[:, :5] = 0  # inner channels 0-4: unread
        mixer.x_proj.weight[:, :5] = 0
        mixer.x_proj.weight[0] = 0  # time-step channel 0: zero before its norm, unread after it
        mixer.dt_proj.weight[:, 0] = 0
    ids = torch.randint(3, 64, (2, 12))
    before = snapshot(model)
    small = fp.minimize_module(model, (ids,))
    assert type(small) is type(model) and snapshot(model) == before
    kept = small.model.layers[0].mamba
    assert (kept.intermediate_size, kept.time_step_rank, kept.ssm_state_size) == (59, 3, 8)
    assert kept.x_proj.weight.shape == (3 + 2 * 8, 59) and kept.conv1d.out_channels == 59
    _agrees_as_a_causal_lm(model, small, ids)
    _graph_exact_in_float64(model, small, ids, shapes=((3, 12), (1, 12)))  # (the capture holds its length)


def test_pvt_v2_mlp_units_nothing_reads_go_through_its_depthwise_conv():
    """PVTv2's MLP is fc1 -> reshape to an image -> depthwise conv -> fc2: hidden units fc2 never reads go although
    fc1 still writes them (the depthwise conv maps channel k to channel k only; it kept them before), in the class,
    exact at another image size."""
    transformers = pytest.importorskip("transformers", reason="the model comes from transformers (dev dependency)")
    cfg = transformers.PvtV2Config(num_channels=3, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                                   hidden_sizes=[16, 32], patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2],
                                   mlp_ratios=[2, 2], num_labels=3)
    torch.manual_seed(0)
    model = transformers.PvtV2ForImageClassification(cfg).double().eval()
    with torch.no_grad():
        for name, m in model.named_modules():
            if name.endswith("mlp.dense2"):
                m.weight[:, :3] = 0
    small = fp.minimize_module(model, (torch.randn(2, 3, 32, 32, dtype=torch.float64),))
    assert type(small) is type(model)
    # per unit: its dense1 row and bias, its depthwise filter (3x3) and bias, its dense2 column
    assert count_params(model) - count_params(small) == 3 * (16 + 1 + 9 + 1 + 16) + 3 * (32 + 1 + 9 + 1 + 32)
    for side in (32, 48):
        x = torch.randn(3, 3, side, side, dtype=torch.float64)
        with torch.no_grad():
            ref, got = model(x).logits, small(x).logits
        assert float((ref - got).abs().max() / ref.abs().max()) <= 1e-9


def test_a_class_left_with_one_head_narrows_again_in_the_next_cycle():
    """The cycle minimizes its own output again: a ViT whose attention came back with one head (no heads x head
    dim product in its graph any more) still gets one width for q, k and v (was: q/k narrowed alone, the class
    refused it and every head channel stayed, with a warning)."""
    transformers = pytest.importorskip("transformers", reason="the model comes from transformers (dev dependency)")
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=4, intermediate_size=32, num_labels=3)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(cfg).double().eval()
    att = model.vit.layers[0].attention
    with torch.no_grad():
        for lin in (att.q_proj, att.k_proj, att.v_proj):  # heads 1-3 whole
            lin.weight[8:] = 0
            lin.bias[8:] = 0
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    once = fp.minimize_module(model, (x,))
    assert once.vit.layers[0].attention.num_attention_heads == 1 and once.vit.layers[0].attention.head_dim == 8
    att = once.vit.layers[0].attention
    with torch.no_grad():  # now q/k lose head_dim channels 0-2, v channel 5
        att.q_proj.weight[:3] = 0
        att.q_proj.bias[:3] = 0
        att.v_proj.weight[5] = 0
        att.v_proj.bias[5] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", fp.interop.module.KeptChannelsWarning)
        twice = fp.minimize_module(once, (x,))
    att = twice.vit.layers[0].attention
    assert (att.q_proj.out_features, att.k_proj.out_features, att.v_proj.out_features, att.head_dim) == (7, 7, 7, 7)
    for xi in (x, torch.randn(5, 1, 8, 8, dtype=torch.float64)):
        with torch.no_grad():
            assert float((twice(xi).logits - once(xi).logits).abs().max()) <= 1e-10


class _PreNorm(nn.Module):
    def __init__(self, norm: type = nn.LayerNorm) -> None:
        super().__init__()
        self.inp, self.norm, self.out = nn.Linear(4, 8), norm(8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.inp(x)))


def _constant_stream_channel(net: _PreNorm, c: int, value: float) -> None:
    """Channel ``c`` of the stream holds ``value`` everywhere and the norm's output there is its bias alone."""
    with torch.no_grad():
        net.inp.weight[c] = 0
        net.inp.bias[c] = value
        net.norm.weight[c] = 0


@pytest.mark.parametrize("norm", [nn.LayerNorm, nn.RMSNorm])
def test_a_norm_compensated_by_an_earlier_call_gains_the_next_removed_constants(norm):
    """The cycle minimizes its own output again: a norm that an earlier call made a CompensatedLayerNorm or
    CompensatedRMSNorm (torch.export traces through its forward) and whose stream loses another channel holding a
    nonzero constant gets that constant into its removed sums (was: its sums stayed and nothing was returned, or
    in the cycle the check froze channels elsewhere)."""
    torch.manual_seed(0)
    net = _PreNorm(norm).double().eval()
    _constant_stream_channel(net, 0, 1.5)
    x = torch.randn(5, 4, dtype=torch.float64)
    once = fp.minimize_module(net, (x,))
    assert type(once.norm).__name__ == f"Compensated{norm.__name__}" and once.norm.kept == 7
    with torch.no_grad():  # channel 3 of the 7 left: the original's channel 4
        once.inp.weight[3] = 0
        once.inp.bias[3] = -2.0
        once.norm.weight[3] = 0
    before = snapshot(once)
    twice = fp.minimize_module(once, (x,))
    assert snapshot(once) == before and once.norm.removed_sq_sum == 1.5 ** 2  # the input is untouched
    got = twice.norm
    assert (got.kept, got.full_size, got.weight.shape[0]) == (6, 8, 6)
    assert got.removed_sq_sum == pytest.approx(1.5 ** 2 + 2.0 ** 2)
    assert getattr(got, "removed_sum", -0.5) == pytest.approx(1.5 - 2.0)
    for xi in (x, torch.randn(9, 4, dtype=torch.float64)):
        with torch.no_grad():
            assert float((twice(xi) - once(xi)).abs().max()) <= 1e-12


def test_a_channels_first_norm_compensated_before_gains_the_next_removed_constants():
    """ConvNeXt's channels-first LayerNorm (a subclass whose forward moves dim 1 last), compensated by an earlier
    call, reads the next removed channels' constants at dim 1 of its input (it crashed the cycle: the constants
    were read as if channels were last)."""
    import squeeze_release as sr
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.norm, self.out = nn.Conv2d(2, 8, 1), sr.ChannelsLastNorm(8), nn.Conv2d(8, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.norm(self.inp(x)))

    net = Net().double().eval()
    with torch.no_grad():
        net.inp.weight[0] = 0
        net.inp.bias[0] = 1.5
        net.norm.weight[0] = 0
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    once = fp.minimize_module(net, (x,))
    with torch.no_grad():
        once.inp.weight[3] = 0
        once.inp.bias[3] = -2.0
        once.norm.weight[3] = 0
    twice = fp.minimize_module(once, (x,))
    assert type(twice.norm) is type(once.norm) and twice.norm.weight.shape[0] == 6
    assert twice.norm.removed_sum == pytest.approx(-0.5) and twice.norm.removed_sq_sum == pytest.approx(6.25)
    for xi in (x, torch.randn(3, 2, 5, 4, dtype=torch.float64)):
        with torch.no_grad():
            assert float((twice(xi) - once(xi)).abs().max()) <= 1e-12


@pytest.mark.parametrize("wrap", ["compile", "DataParallel", "both"])
def test_wrapped_models_come_back_as_the_module_inside_smaller(wrap):
    """torch.compile's OptimizedModule and nn.DataParallel compute the module's own function: the module inside is
    minimized and comes back (it was a CaptureError about the inputs' structure); wrap the result again."""
    model, x = zoo.build("residual_mlp")
    with torch.no_grad():
        model.blocks[0][0].weight[:5] = 0
        model.blocks[0][0].bias[:5] = -1.0  # 5 dead ReLU units
    wrapped = {"compile": lambda m: torch.compile(m), "DataParallel": nn.DataParallel,
               "both": lambda m: torch.compile(nn.DataParallel(m))}[wrap](model)
    before = snapshot(model)
    small = fp.minimize_module(wrapped, x)
    assert type(small) is zoo.ResidualMLP and snapshot(model) == before
    assert count_params(model) - count_params(small) == 5 * (24 + 1 + 24)
    x3 = torch.randn(3, 12)
    with torch.no_grad():
        assert torch.allclose(model(x3), small(x3), rtol=1e-5, atol=1e-6)
    assert snapshot(fp.capture(wrapped, x)) == snapshot(fp.capture(model, x))


class _PadsToWindows(nn.Module):
    """Pads its width to a multiple of 4 where it is not (as Swin does for its windows): torch.export with every
    dim dynamic records the branch as a guard and the capture fails; with the batch dynamic it works."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(1, 8, 1), nn.Linear(8, 2)

    def forward(self, x):
        if x.shape[-1] % 4 != 0:
            x = nn.functional.pad(x, (0, 4 - x.shape[-1] % 4))
        b, _, h, w = x.shape
        return self.head(self.conv(x).reshape(b, -1, h // 4, 4, w // 4, 4).mean((2, 3, 4, 5)))


def test_a_class_whose_every_dim_capture_failed_is_captured_with_the_batch_dynamic_next_time(monkeypatch):
    """The cycle calls minimize_module on ever smaller copies of one model: a capture with every dim dynamic that
    failed once (40-60 s of torch.export's shape reasoning on a small Swin) is not tried again."""
    import fxprune.interop.module as module

    torch.manual_seed(0)
    model = _PadsToWindows()
    with torch.no_grad():
        model.conv.weight[:3], model.conv.bias[:3] = 0.0, 0.0
    x = torch.randn(2, 1, 8, 8)
    asked = []
    capture = module.capture
    monkeypatch.setattr(module, "capture", lambda *a, **k: asked.append(k.get("dynamic_shapes")) or capture(*a, **k))
    first = fp.minimize_module(model, (x,))
    n = len(asked)
    second = fp.minimize_module(copy.deepcopy(model), (x,))
    # (then "batch" again where the image sizes the batch-only capture holds static are read off a second capture)
    assert asked[:2] == ["every", "batch"] and set(asked[2:]) == {"batch"} and asked[n] == "batch"
    for small in (first, second):
        assert small.conv.out_channels == 5
        with torch.no_grad():
            xi = torch.randn(3, 1, 8, 8)
            assert torch.allclose(small(xi), model(xi), atol=1e-6)


def _dead_stream_and_expert_channels(model: nn.Module) -> None:
    """Stream channels 3, 7, 11, 20, 25, 30 dead everywhere (embedding columns, the rows written into the stream,
    the norms' weights) and every third of the 64 intermediate channels dead in every expert (gate rows: silu(0) *
    up = 0, and down_proj's columns)."""
    stream, inner = [3, 7, 11, 20, 25, 30], torch.arange(0, 64, 3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("embed_tokens.weight"):
                p[:, stream] = 0
            elif n.endswith(("o_proj.weight", "shared_expert.down_proj.weight")):
                p[stream] = 0
            elif n.endswith("experts.down_proj"):
                p[:, stream] = 0
                p[:, :, inner] = 0
            elif n.endswith("experts.gate_up_proj"):
                p[:, inner] = 0
            elif "norm" in n and p.dim() == 1 and p.shape[0] == 32:
                p[stream] = 0


def _graph_exact_in_float64(model: nn.Module, small: nn.Module, ids: torch.Tensor,
                            shapes: tuple[tuple[int, int], ...] = ((3, 7), (1, 20))) -> None:
    """``fp.minimize`` on ``model``'s graph (the cache off: a graph cannot return it) leaves its input graph alone,
    node.meta included, loses at least what the class lost (the graph needs no alignment), and is exact in float64
    at ``shapes``, other batch sizes and lengths (its grouped matmul is transformers' fallback, which runs in
    float64; the class's eager one does not)."""
    lean = copy.deepcopy(model)
    lean.config.use_cache = False
    gm = fp.capture(lean, (ids,), dynamic_shapes="every")
    state, meta = snapshot(gm), graph_state(gm)
    graph = fp.minimize(gm, (ids,))
    assert snapshot(gm) == state and graph_state(gm) == meta
    assert count_params(graph) <= count_params(small)
    for shape in shapes:
        report = fp.verify(gm, graph, (torch.randint(0, 64, shape),))
        assert report.ok and report.max_rel["float64"] <= 1e-9, report


def _agrees_as_a_causal_lm(model: nn.Module, small: nn.Module, ids: torch.Tensor) -> None:
    """``small``'s logits are ``model``'s (float32) at ``ids`` and at other batch sizes and lengths, and greedy
    ``generate()`` (the cache on) gives the same tokens."""
    for x in (ids, torch.randint(0, 64, (3, 7)), torch.randint(0, 64, (1, 20))):
        with torch.no_grad():
            ref, got = model(x).logits, small(x).logits
        assert float((ref - got).abs().max() / ref.abs().max()) <= 1e-5
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(ids[:1], **kw), small.generate(ids[:1], **kw))


def test_mixtral_experts_lose_channels_dead_in_every_expert_and_the_stream_loses_its_dead_channels():
    """A mixture of experts as loaded (Mixtral, the cache on): tokens reach their experts through data-dependent
    gathers and transformers' grouped matmul over stacked expert weights. Intermediate channels dead in every
    expert go from both stacked weights, and residual-stream channels dead everywhere go from them, the router and
    the rest, in its own class. The kept widths are multiples of 4 (torch's grouped_mm, which the class calls, needs
    rows of 16 bytes: 6 dead stream channels lose 4). Exact at other batch sizes and lengths; generate() agrees; the
    input is left alone. The graph loses at least as much and is exact in float64 (its grouped matmul is
    transformers' fallback, which runs in float64; the class's eager one does not) at other batch sizes and lengths,
    its input graph untouched."""
    transformers = pytest.importorskip("transformers", reason="the model comes from transformers (dev dependency)")
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg).eval()
    assert model.config.use_cache
    _dead_stream_and_expert_channels(model)
    before = snapshot(model)
    ids = torch.randint(0, 64, (2, 12))
    small = fp.minimize_module(model, (ids,))
    assert type(small) is type(model) and snapshot(model) == before and small.config.use_cache
    for layer in small.model.layers:
        assert layer.mlp.experts.gate_up_proj.shape == (4, 2 * 44, 28)  # 42 inner kept, rounded up to 44
        assert layer.mlp.experts.down_proj.shape == (4, 28, 44)
        assert layer.mlp.gate.weight.shape == (4, 28)
    _agrees_as_a_causal_lm(model, small, ids)
    _graph_exact_in_float64(model, small, ids)


def test_a_bfloat16_mixtral_loses_its_dead_expert_channels_through_torchs_grouped_mm():
    """In bfloat16 transformers calls torch's own ``aten._grouped_mm`` where float32 takes its fallback (and so on a
    GPU): that op had no rule, froze every channel it touched, and a Mixtral as loaded in bfloat16 lost nothing
    (the flow: 1.00x, "13 op(s) without a channel rule")."""
    transformers = pytest.importorskip("transformers", reason="the model comes from transformers (dev dependency)")
    from fxprune.compare import rtol_for

    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg).to(torch.bfloat16).eval()
    _dead_stream_and_expert_channels(model)
    ids = torch.randint(0, 64, (2, 12))
    with fp.interop.module.cache_off(model):
        assert any(n.target is torch.ops.aten._grouped_mm.default for n in fp.capture(model, (ids,)).graph.nodes)
    before = snapshot(model)
    small = fp.minimize_module(model, (ids,))
    assert snapshot(model) == before
    for layer in small.model.layers:
        # kept widths of 16 bytes, 8 bfloat16s: 42 inner channels kept become 48; the stream's 26 would be 32
        assert layer.mlp.experts.gate_up_proj.shape == (4, 2 * 48, 32)
        assert layer.mlp.experts.down_proj.shape == (4, 32, 48)
    for x in (ids, torch.randint(0, 64, (3, 7))):  # another batch and length
        with torch.no_grad():
            ref, got = model(x).logits.double(), small(x).logits.double()
        assert float((ref - got).abs().max() / ref.abs().max()) <= rtol_for(torch.bfloat16)


_MOE = {  # config, model, fields: transformers' other stacked-expert mixtures (Mixtral above)
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=4, moe_intermediate_size=64, shared_expert_intermediate_size=32)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(num_experts=4, moe_intermediate_size=64)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=4, eos_token_id=1, pad_token_id=0)),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", dict(num_local_experts=4)),
}


@pytest.mark.parametrize("name", sorted(_MOE))
def test_other_mixtures_of_experts_lose_dead_expert_and_stream_channels_in_their_class(name):
    """Their experts and routers are named like Mixtral's (``...Experts``, ``...TopKRouter``) and hold the same
    stacked tensors: the sizes their forward reads follow, the widths stay multiples of 4, and the copy is exact
    at another batch size and length."""
    transformers = pytest.importorskip("transformers", reason="the models come from transformers (dev dependency)")
    cfg_name, model_name, fields = _MOE[name]
    cfg = getattr(transformers, cfg_name)(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2,
                                          max_position_embeddings=64, **fields)
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(cfg).eval()
    _dead_stream_and_expert_channels(model)
    before = snapshot(model)
    small = fp.minimize_module(model, (torch.randint(0, 64, (2, 12)),))
    assert type(small) is type(model) and snapshot(model) == before
    assert small.model.embed_tokens.weight.shape == (64, 28)
    assert all(layer.mlp.experts.down_proj.shape == (4, 28, 44) for layer in small.model.layers)
    x = torch.randint(0, 64, (3, 7))
    with torch.no_grad():
        ref, got = model(x).logits, small(x).logits
    assert float((ref - got).abs().max() / ref.abs().max()) <= 1e-5


def test_deepseek_v3_loses_latent_attention_channels_and_dead_stream_channels_through_its_router():
    """DeepSeek-V3 as loaded (the cache on): its router is spelled ``...TopkRouter`` and reshapes its input to
    ``hidden_dim``, which was not updated, so dead residual-stream channels stayed (the flow: "kept the channels of
    ...post_attention_layernorm.weight:0"); its multi-head latent attention splits ``kv_a_proj_with_mqa``'s output
    at ``kv_lora_rank``, which no updater set, so a dead latent channel stayed. Now both go, in its own class: exact
    at other batch sizes and lengths, generate() agrees, the input untouched."""
    transformers = pytest.importorskip("transformers", reason="the model comes from transformers (dev dependency)")
    cfg = transformers.DeepseekV3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
                                        num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1,
                                        n_group=1, topk_group=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4,
                                        qk_nope_head_dim=4, v_head_dim=8, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(cfg).eval()
    assert model.config.use_cache
    stream = [3, 7, 11, 20, 25, 30]
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("embed_tokens.weight"):
                p[:, stream] = 0
            elif n.endswith(("o_proj.weight", "mlp.down_proj.weight", "shared_experts.down_proj.weight")):
                p[stream] = 0
            elif n.endswith("experts.down_proj"):
                p[:, stream] = 0
            elif "norm" in n and p.dim() == 1 and p.shape[0] == 32:
                p[stream] = 0
            elif n.endswith("kv_a_proj_with_mqa.weight"):
                p[:3] = 0  # latent channels 0-2: zero before the latent's norm ...
            elif n.endswith("kv_b_proj.weight"):
                p[:, :3] = 0  # ... and unread after it
    before = snapshot(model)
    ids = torch.randint(0, 64, (2, 12))
    small = fp.minimize_module(model, (ids,))
    assert type(small) is type(model) and snapshot(model) == before and small.config.use_cache
    assert small.model.embed_tokens.weight.shape == (64, 28)  # (widths of multiples of 4: grouped_mm)
    layer = small.model.layers[1]
    assert layer.mlp.gate.weight.shape == (4, 28) and layer.mlp.gate.hidden_dim == 28
    for layer in small.model.layers:
        attn = layer.self_attn
        assert attn.kv_lora_rank == 13 and attn.kv_b_proj.weight.shape[1] == 13
        assert attn.kv_a_proj_with_mqa.weight.shape[0] == 13 + 4  # the rotary key's 4 stay
    _agrees_as_a_causal_lm(model, small, ids)
    _graph_exact_in_float64(model, small, ids)


class _StateWidth(nn.Module):
    """Adds a state it makes ``config.hidden_size`` wide when the cache is on, as RWKV's attention reads the state
    its model made from the config."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config, self.b = config, nn.Linear(8, 3)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.config.use_cache:
            h = h + torch.zeros(h.shape[0], self.config.hidden_size, dtype=h.dtype)
        return self.b(h)


class _Cached(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        import types

        self.config = types.SimpleNamespace(use_cache=True, hidden_size=8)
        self.a, self.m = nn.Linear(4, 8), _StateWidth(self.config)
        with torch.no_grad():
            self.a.weight[:3], self.a.bias[:3] = 0.0, -1.0  # 3 dead units

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(torch.relu(self.a(x)))


def test_a_copy_that_fails_with_its_cache_on_keeps_the_channels_it_fails_on():
    """minimize_module captures and checks a model with ``config.use_cache`` off (torch.export cannot return a
    cache), and gives the copy back with it on, as the model was loaded. A class that makes its cache from its
    config (RWKV's state, ``config.hidden_size`` wide: the flow's RWKV raised at its third cycle) failed only then,
    in the user's hands. The copy is now also run with the cache on: where it raises, the channels of the module
    that raised stay (KeptChannelsWarning), and the copy runs and is exact as loaded. Without a cache the same dead
    units go."""
    from fxprune.interop.module import KeptChannelsWarning

    net = _Cached().double().eval()
    x = torch.randn(5, 4, dtype=torch.float64)
    before = snapshot(net)
    with pytest.warns(KeptChannelsWarning, match="m.b.weight:1"):
        small = fp.minimize_module(net, (x,))
    assert snapshot(net) == before and net.config.use_cache and small.config.use_cache
    assert small.a.out_features == 8
    exact_at(net, small, [(5, 4), (2, 4)])
    net.config.use_cache = False  # no cache: the state is never made, and the dead units go
    small = fp.minimize_module(net, (x,))
    assert small.a.out_features == 5 and not small.config.use_cache
    exact_at(net, small, [(5, 4), (2, 4)])


def test_options_add_to_its_own_and_bad_ones_are_refused():
    """``keep``, ``equal_heads`` and ``whole_heads`` from the caller used to collide with the ones minimize_module
    sets (a TypeError: multiple values for a keyword); now they add to them. A graph-only or unknown option is an
    InputError that says what it takes."""
    from fxprune.interop.module import KeptChannelsWarning

    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        net[0].weight[:3] = 0
        net[0].bias[:3] = -1.0  # 3 dead units in each hidden layer
        net[2].weight[:3] = 0
        net[2].bias[:3] = -1.0
    x = torch.randn(5, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KeptChannelsWarning)  # the caller's keep is not fxprune's to report
        small = fp.minimize_module(net, (x,), keep=(("2.weight:0", "mine"),), equal_heads=(), whole_heads=())
    assert (small[0].out_features, small[2].out_features) == (5, 8)  # layer 2's channels stay, as asked
    assert fp.verify(net, small, (x,)).ok
    with pytest.raises(fp.InputError, match="unknown option.*round_too.*round_to"):
        fp.minimize_module(net, (x,), round_too=8)
    with pytest.raises(fp.InputError, match="split_norms"):
        fp.minimize_module(net, (x,), split_norms=True)


class _Modulation(nn.Module):
    """Splits its input projection's output at its own input width, read off the input (FocalNet's modulation):
    the class cannot take q channels the graph removes while the stream keeps its width."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.proj_in = nn.Linear(d, 2 * d + 2)
        self.proj_out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1]
        q, ctx, gates = torch.split(self.proj_in(x), (c, c, 2), -1)
        return self.proj_out(q * torch.tanh(ctx) * gates[..., :1])


class _SplitBlocks(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.mods = nn.ModuleList(_Modulation(d) for _ in range(2))
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, d)) for _ in range(2))
        self.head = nn.Linear(d, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for mod, mlp in zip(self.mods, self.mlps):
            x = x + mod(x)
            x = x + mlp(x)
        return self.head(x)


def test_a_forward_that_raises_on_a_size_of_another_tensor_keeps_those_channels():
    """The copy raised (split sizes) and no module or caller attribute was suspect: minimize_module raised
    EquivalenceError, and the cycle with it (transformers' FocalNet; SegFormer's sequence reduction reshapes its
    convolution's output to its input width alike). Now the dims that changed in the module whose forward raised
    (every module of its class) are kept, and the rest still goes."""
    from fxprune.interop.module import KeptChannelsWarning

    torch.manual_seed(0)
    net = _SplitBlocks().double()
    with torch.no_grad():
        for mod, mlp in zip(net.mods, net.mlps):
            mod.proj_in.weight[:3], mod.proj_in.bias[:3] = 0.0, 0.0  # 3 q channels always zero
            mlp[0].weight[:5], mlp[0].bias[:5] = 0.0, -1.0  # 5 dead hidden units
    x = torch.randn(4, 5, 8, dtype=torch.float64)
    before = copy.deepcopy(net.state_dict())
    with pytest.warns(KeptChannelsWarning, match=r"mods\.0\.proj_\w+\.\w+:\d"):
        small = fp.minimize_module(net, (x,))
    assert type(small) is _SplitBlocks
    assert all(m.proj_in.out_features == 18 for m in small.mods)  # the class splits at the stream's width
    assert all(m[0].out_features == 11 for m in small.mlps)  # the MLPs still lose their dead units
    for xi in (x, torch.randn(2, 9, 8, dtype=torch.float64)):  # another batch and length
        with torch.no_grad():
            assert float((small(xi) - net(xi)).abs().max() / net(xi).abs().max()) <= 1e-12
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_t5_attention_loses_whole_heads_and_head_dims_in_its_class():
    """T5's attention keeps its sizes as ``n_heads``, ``key_value_proj_dim`` and ``inner_dim``: they were not
    written back, so every q/k/v output channel stayed frozen (T5 came back 1.51x smaller in the user flow, 5.09x
    now). A whole head and head-dim channels go; the copy is exact at other batch sizes and lengths, generate()
    the same."""
    transformers = pytest.importorskip("transformers", reason="the model comes from transformers (dev dependency)")
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=40, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
                                num_heads=4, decoder_start_token_id=0)
    t5 = transformers.T5ForConditionalGeneration(cfg).double().eval()
    attentions = [m for m in t5.modules() if type(m).__name__ == "T5Attention"]
    with torch.no_grad():
        for a in attentions:  # head 2 whole, head-dim channel 5 of every head in v
            for lin in (a.q, a.k, a.v):
                lin.weight[16:24] = 0
            for h in range(4):
                a.v.weight[h * 8 + 5] = 0
    ids = torch.randint(0, 40, (2, 9))
    before = snapshot(t5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fp.interop.module.KeptChannelsWarning)
        small = fp.minimize_module(t5, {"input_ids": ids, "labels": ids})
    assert snapshot(t5) == before and type(small) is type(t5)
    for a in (m for m in small.modules() if type(m).__name__ == "T5Attention"):
        assert (a.n_heads, a.inner_dim, a.o.in_features) == (3, 3 * a.key_value_proj_dim, a.inner_dim)
    assert count_params(small) < count_params(t5)
    for b, n in ((2, 9), (3, 5), (1, 14)):
        x = torch.randint(0, 40, (b, n))
        with torch.no_grad():
            want, got = t5(input_ids=x, labels=x).logits, small(input_ids=x, labels=x).logits
        assert float((got - want).abs().max() / want.abs().max()) <= 1e-9
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(t5.generate(ids[:1], **kw), small.generate(ids[:1], **kw))


class _RootToken(nn.Module):
    """A class token held by the model itself, and a forward that reshapes with its own width."""

    def __init__(self) -> None:
        super().__init__()
        self.width = 8
        self.emb, self.head = nn.Linear(4, 8), nn.Linear(8, 2)
        self.token = nn.Parameter(torch.randn(1, 1, 8))

    def forward(self, x):
        h = torch.cat([self.token.expand(x.shape[0], -1, -1), self.emb(x)], 1)
        return self.head(h.reshape(-1, self.width)).reshape(x.shape[0], -1, 2)


def test_a_kept_tensor_of_the_model_itself_is_named_by_its_class():
    """The warning named the model's own tensors by their module path, which is empty: "every channel of , emb"
    (torchvision's ViT: its class token and `hidden_dim`)."""
    model = _RootToken().double().eval()
    with torch.no_grad():
        model.emb.weight[3] = 0
        model.emb.bias[3] = 0
        model.token[..., 3] = 0
    with pytest.warns(fp.interop.module.KeptChannelsWarning) as caught:
        small = fp.minimize_module(model, (torch.randn(2, 5, 4, dtype=torch.float64),))
    message = str(caught[0].message)
    assert "every channel of _RootToken (its own tensors)" in message and " , " not in message and "of ," not in message
    x = torch.randn(3, 7, 4, dtype=torch.float64)
    assert torch.allclose(small(x), model(x), rtol=1e-12, atol=1e-12)


def test_a_layer_norm_without_weights_is_compensated_in_the_class():
    """A stream channel holding a constant goes through ``nn.LayerNorm(elementwise_affine=False)`` (Data2VecAudio's
    positional conv): the compensated norm's kept width was read off its weight, which it has none of, and
    minimize_module raised AttributeError."""
    torch.manual_seed(0)
    net = _PreNorm(lambda n: nn.LayerNorm(n, elementwise_affine=False)).double().eval()
    with torch.no_grad():
        net.inp.weight[2] = 0
        net.inp.bias[2] = 0.75
        net.out.weight[:, 2] = 0  # the norm's output there is unread
    x = torch.randn(5, 4, dtype=torch.float64)
    before = snapshot(net)
    small = fp.minimize_module(net, (x,))
    assert snapshot(net) == before
    norm = small.norm
    assert type(norm).__name__ == "CompensatedLayerNorm" and norm.weight is None and (norm.kept, norm.full_size) == (7, 8)
    for xi in (x, torch.randn(9, 4, dtype=torch.float64)):
        with torch.no_grad():
            assert float((small(xi) - net(xi)).abs().max()) <= 1e-12


class PermutingNorm(nn.LayerNorm):
    """SqueezeBERT's norm of (N, C, W) activations: it calls ``nn.LayerNorm.forward`` by name, not ``super()``."""

    def forward(self, x):
        return nn.LayerNorm.forward(self, x.permute(0, 2, 1)).permute(0, 2, 1)


class ScaledNorm(nn.LayerNorm):
    """A norm whose forward calls ``nn.LayerNorm.forward`` by name and does more: no form fxprune can compensate."""

    def forward(self, x):
        return 2.0 * nn.LayerNorm.forward(self, x)


class _ConvStream(nn.Module):
    def __init__(self, norm: type) -> None:
        super().__init__()
        self.inp, self.norm, self.out = nn.Conv1d(2, 8, 1), norm(8), nn.Conv1d(8, 3, 1)

    def forward(self, x):
        return self.out(self.norm(self.inp(x)))


def _dead_stream_channel(net: nn.Module) -> None:
    with torch.no_grad():
        net.inp.weight[2] = 0
        net.inp.bias[2] = 1.5
        net.norm.weight[2] = 0


def test_a_norm_subclass_calling_layer_norm_forward_by_name_is_compensated_over_dim_1():
    """SqueezeBERT: the compensated subclass reached no compensated norm (its forward names ``nn.LayerNorm.forward``),
    so the copy was wrong, and minimize_module raised EquivalenceError with nothing to freeze. Its forward is a
    norm over dim 1: it becomes the compensated one, in its own class."""
    torch.manual_seed(0)
    net = _ConvStream(PermutingNorm).double().eval()
    _dead_stream_channel(net)
    x = torch.randn(3, 2, 5, dtype=torch.float64)
    before = snapshot(net)
    small = fp.minimize_module(net, (x,))
    assert snapshot(net) == before and type(net.norm) is PermutingNorm  # (its class is not made compensated)
    assert isinstance(small.norm, PermutingNorm) and small.norm.weight.shape == (7,) and small.norm.full_size == 8
    for xi in (x, torch.randn(4, 2, 9, dtype=torch.float64)):  # another batch and length
        with torch.no_grad():
            assert float((small(xi) - net(xi)).abs().max()) <= 1e-12


def test_a_norm_subclass_with_no_compensable_form_keeps_its_channels():
    """A LayerNorm subclass whose forward neither reaches ``super().forward`` nor is a norm over dim 1: its stream
    keeps its channels, with a warning (was: EquivalenceError)."""
    torch.manual_seed(0)
    net = _PreNorm(ScaledNorm).double().eval()
    _constant_stream_channel(net, 2, 1.5)
    x = torch.randn(5, 4, dtype=torch.float64)
    with pytest.warns(fp.interop.module.KeptChannelsWarning, match="norm"):
        small = fp.minimize_module(net, (x,))
    assert type(small.norm) is ScaledNorm and small.norm.weight.shape == (8,)
    for xi in (x, torch.randn(9, 4, dtype=torch.float64)):
        with torch.no_grad():
            assert float((small(xi) - net(xi)).abs().max()) <= 1e-12


class TimmLayerNorm(nn.LayerNorm):
    """timm's ``LayerNorm``: its own forward calls ``F.layer_norm`` over the last dim, never ``super().forward``."""

    def forward(self, x):
        return torch.nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


def test_a_norm_subclass_computing_layer_norm_itself_is_compensated():
    """timm's ViTs: the norms of the residual stream are such a subclass. A CompensatedLayerNorm stands in for each
    (before, no form fitted and the whole stream kept its channels: timm's ViT-Tiny, 1.00x with three dead stream
    channels planted, now 1.02x)."""
    torch.manual_seed(0)
    net = _PreNorm(TimmLayerNorm).double().eval()
    _constant_stream_channel(net, 2, 1.5)
    x = torch.randn(5, 4, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fp.interop.module.KeptChannelsWarning)
        small = fp.minimize_module(net, (x,))
    assert type(net.norm) is TimmLayerNorm
    assert type(small.norm) is fp.nn.CompensatedLayerNorm and small.norm.weight.shape == (7,)
    for xi in (x, torch.randn(9, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)):
        with torch.no_grad():
            assert float((small(xi) - net(xi)).abs().max()) <= 1e-12


def test_a_causal_lm_whose_loss_ties_its_inputs_sizes_is_minimized_with_its_labels():
    """XGLM's loss ties the numel of ``input_ids`` and ``labels``: torch.export refuses every dim dynamic, and the
    capture went on without the labels, a graph the check then could not call with them (CaptureError). Every dim
    failing, minimize_module captures with the batch dynamic, labels and all (it had warned that the labels were
    left out; in the user flow it then raised CaptureError: its check called that graph with the labels)."""
    transformers = pytest.importorskip("transformers", reason="the model comes from transformers (dev dependency)")
    torch.manual_seed(0)
    model = transformers.XGLMForCausalLM(transformers.XGLMConfig(
        vocab_size=32, d_model=32, num_layers=1, attention_heads=4, ffn_dim=64, max_position_embeddings=64)).eval()
    fc1 = model.model.layers[0].fc1
    with torch.no_grad():
        fc1.weight[:5] = 0
        fc1.bias[:5] = -1.0  # (GELU(-1) is no zero: the constant goes into fc2's bias)
    ids = torch.randint(0, 32, (8, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error", LabelsLeftOutWarning)
        small = fp.minimize_module(model, {"input_ids": ids, "labels": ids.clone()})  # (one tensor twice ties them)
    assert type(small) is type(model) and small.model.layers[0].fc1.out_features == 59 and small.config.use_cache
    for batch in (ids, torch.randint(0, 32, (3, 7))):  # another batch and length
        with torch.no_grad():
            a, b = model(input_ids=batch, labels=batch), small(input_ids=batch, labels=batch)
        assert float((a.logits - b.logits).abs().max()) <= 1e-4 and float((a.loss - b.loss).abs()) <= 1e-4


def test_a_bfloat16_llama_as_loaded_compensates_its_rms_norms_in_the_class():
    """An LLM loaded in bfloat16: the probe that reads what a hand-written RMSNorm scales by (weight or 1 + weight)
    compared its bfloat16 output with float64 at 1e-4, failed, and the class kept its whole stream (the cycle's
    Llama in bfloat16 kept 2.2x where float32 keeps 3.0x). The probe runs on a float64 copy of the norm."""
    transformers = pytest.importorskip("transformers", reason="the model comes from transformers (dev dependency)")
    from fxprune.compare import rtol_for

    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    with torch.no_grad():  # stream channel 5 holds 0.5 everywhere, and no norm passes it on
        model.model.embed_tokens.weight[:, 5] = 0.5
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[5] = 0
            layer.mlp.down_proj.weight[5] = 0
            layer.input_layernorm.weight[5] = layer.post_attention_layernorm.weight[5] = 0
        model.model.norm.weight[5] = 0
    ids = torch.randint(0, 32, (4, 12))
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fp.interop.module.KeptChannelsWarning)
        small = fp.minimize_module(model, (ids,))
    assert snapshot(model) == before and small.model.embed_tokens.weight.shape == (32, 31) and small.dtype == torch.bfloat16
    norms = [m for m in small.modules() if isinstance(m, fp.nn.CompensatedRMSNorm)]
    assert len(norms) == 5 and all(m.removed_sq_sum == 0.25 for m in norms)
    for x in (ids, torch.randint(0, 32, (3, 7))):  # another batch and length
        with torch.no_grad():
            ref, got = model(x).logits.double(), small(x).logits.double()
        assert float((ref - got).abs().max() / ref.abs().max()) <= rtol_for(torch.bfloat16)


class _PinnedMap(nn.Module):
    """Three stride-2 convolutions take an 8x8 image to a 1x1 map, which torch.export pins (images up to 8 pixels)
    while the class runs at any size; a depthwise convolution with padding then reads that map. ``math.prod`` of
    the sizes makes the symbolic trace fail, so the capture is torch.export's."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = (nn.Conv2d(c, 8, 3, 2, 1) for c in (3, 8, 8))
        self.dw = nn.Conv2d(8, 8, 3, 1, 1, groups=8)
        self.pw = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c3(torch.relu(self.c2(torch.relu(self.c1(x))))))
        return self.pw(self.dw(x)).sum((2, 3)) / math.prod(x.shape[2:])


def test_the_copy_is_exact_at_sizes_past_those_the_capture_pins():
    # On a 1x1 map only the centre tap of a 3x3 convolution with padding meets real input: the channels whose
    # centre taps are 0 are constants there. The captured range (images of 2 to 8 pixels) ends in a 1x1 map, but a
    # 16-pixel image gives a 2x2 map, where the other taps count: the copy keeps those channels (before, it folded
    # them and differed from the model by 5e-3 at 16x16, unchecked).
    torch.manual_seed(0)
    model = _PinnedMap().eval()
    with torch.no_grad():
        model.dw.weight[:4, :, 1, 1] = 0
    ep = torch.export.export(model, (torch.randn(2, 3, 8, 8),), dynamic_shapes=({0: torch.export.Dim.AUTO,
                                                                                 2: torch.export.Dim.AUTO,
                                                                                 3: torch.export.Dim.AUTO},),
                             strict=False)
    assert any(hi == 8 for hi in (r.upper for r in ep.range_constraints.values()))  # the pinned range
    before = snapshot(model)
    small = fp.minimize_module(model, (torch.randn(2, 3, 8, 8),))
    assert snapshot(model) == before
    assert type(small) is _PinnedMap
    assert small.dw.out_channels == 8  # the taps that meet padding at 8 pixels meet input at 16
    exact_at(copy.deepcopy(model).double(), copy.deepcopy(small).double(),
             [(2, 3, 8, 8), (1, 3, 16, 16), (3, 3, 5, 7), (2, 3, 32, 24)])


def test_a_copy_of_a_capture_that_holds_the_image_size_static_is_exact_at_other_sizes():
    # With the batch alone dynamic (as where the every-dim capture fails or export specializes the image: timm's
    # MobileViT-v2), the analysis saw only the 8-pixel image, whose third map is 1x1: the channels whose centre taps
    # are 0 read as constants. Before, the copy folded them and was returned unchecked at 16 pixels (wrong there);
    # now the analysis also reads the sizes where the model takes other image sizes (here the graph propagates
    # there; where it does not, a second capture), and the copy keeps them.
    torch.manual_seed(0)
    model = _PinnedMap().eval()
    with torch.no_grad():
        model.dw.weight[:4, :, 1, 1] = 0
        model.pw.weight[:, 6:] = 0  # two channels nothing reads: they go at any size
    before = snapshot(model)
    small = fp.minimize_module(model, (torch.randn(2, 3, 8, 8),), dynamic_shapes="batch")
    assert snapshot(model) == before
    assert type(small) is _PinnedMap and small.dw.out_channels == 6 and small.c3.out_channels == 6
    exact_at(copy.deepcopy(model).double(), copy.deepcopy(small).double(),
             [(2, 3, 8, 8), (1, 3, 16, 16), (3, 3, 24, 8), (1, 3, 16, 13)])


def test_a_copy_whose_capture_pins_a_view_is_analysed_at_twice_the_size_by_a_second_capture():
    # ShuffleNetV2's channel shuffle views its map with the sizes it reads; at 32 pixels stage 4's map is 1x1, and
    # torch.export writes those 1s into the view, so the graph does not propagate at 64 pixels. The channels of
    # stage4[1]'s depthwise convolution whose centre taps are 0 are constants on a 1x1 map only. Before, the copy
    # folded them and the check refused it at 64x64 (CaptureError; the cycle went on with the graph). Now a second
    # capture at 64 pixels says which sizes vary: the copy keeps them, and is the class.
    tv = torchvision()
    torch.manual_seed(0)
    model = tv.models.ShuffleNetV2([1, 1, 2], [8, 16, 32, 64, 64], num_classes=4).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
        model.stage4[1].branch2[3].weight[:8, :, 1, 1] = 0
        model.fc.weight[:, :6] = 0  # six of conv5's channels nothing reads: they go at any size
    before = snapshot(model)
    small = fp.minimize_module(model, (torch.randn(2, 3, 32, 32),))
    assert snapshot(model) == before
    assert type(small) is type(model)
    assert small.stage4[1].branch2[3].out_channels == 32 and small.conv5[0].out_channels == 58
    exact_at(copy.deepcopy(model).double(), copy.deepcopy(small).double(),
             [(2, 3, 32, 32), (1, 3, 64, 64), (3, 3, 48, 40), (2, 3, 17, 17)])


class _PadsToFour(nn.Module):
    """Pads its map's width to a multiple of 4 (as Swin pads to its windows), an ``if`` on a size: torch.export
    holds the image size static, the class takes any."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if h.shape[-1] % 4:
            h = nn.functional.pad(h, (0, 4 - h.shape[-1] % 4))
        return self.b(h)


def test_a_copy_is_checked_at_sizes_the_capture_held_static_but_the_class_takes():
    # Channel 2 of `a` is the constant 0.5. At the example's 16 pixels nothing is padded, and b folds it into its
    # bias; at 17 the padded column holds 0 there, not 0.5, so that copy differs (relative error 0.14, returned
    # unchecked before). The check now runs the copy where the model runs and the capture does not vary the size.
    torch.manual_seed(0)
    model = _PadsToFour().eval()
    with torch.no_grad():
        model.a.weight[2] = 0
        model.a.bias[2] = 0.5
    x = torch.randn(2, 3, 16, 16)
    before = snapshot(model)
    with pytest.raises(fp.CaptureError, match="17x17"):
        fp.minimize_module(model, (x,))
    assert snapshot(model) == before
    with torch.no_grad():  # a channel that is 0 is 0 in the padding too: that copy is exact at every size
        model.a.bias[2] = 0
    small = fp.minimize_module(model, (x,))
    assert type(small) is _PadsToFour and small.a.out_channels == 7
    exact_at(copy.deepcopy(model).double(), copy.deepcopy(small).double(),
             [(2, 3, 16, 16), (1, 3, 17, 30), (3, 3, 9, 5)])


def test_a_copy_that_differs_past_the_captured_range_fails_closed(monkeypatch):
    # The check runs the copy at twice the example's sizes too. With the analysis blind to every size but the
    # example's and its batch (as before: no other check point propagates), the copy folds those channels, and the
    # check refuses it at 16x16 rather than return it.
    from fxprune.graph import shapes

    monkeypatch.setattr(shapes, "runs_at", lambda *a, **k: False)
    torch.manual_seed(0)
    model = _PinnedMap().eval()
    with torch.no_grad():
        model.dw.weight[:4, :, 1, 1] = 0
    with pytest.raises((fp.EquivalenceError, fp.CaptureError), match="16x16"):
        fp.minimize_module(model, (torch.randn(2, 3, 8, 8),))


class OwnGroupNorm(nn.GroupNorm):
    """A GroupNorm with a forward of its own that computes GroupNorm (timm's ``GroupNorm``)."""

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def test_a_group_norm_with_a_forward_of_its_own_loses_a_channel_its_groups_no_longer_divide():
    """The probe that tells such a norm computes GroupNorm runs at the width its groups divide: the channels it
    lost (here one of eight, in two groups) do not make it fail and keep them."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 1), OwnGroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 4, 1)).double().eval()
    with torch.no_grad():
        net[0].weight[5] = 0
        net[0].bias[5] = 0.5  # channel 5 holds 0.5 everywhere: it goes, its constant kept in its group's sums
        net[1].weight[5] = 0
        net[1].bias[5] = 0
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no channel kept for want of a size update)
        small = fp.minimize_module(net, (x,))
    assert small[0].weight.shape[0] == 7 and small[3].weight.shape[1] == 7
    exact_at(net, small, [(2, 3, 6, 6), (3, 3, 9, 7)])


class _LossOnLabelledRowsWithWidth(nn.Module):
    """A classifier whose loss keeps the labelled rows through a data-dependent branch (DeBERTa's: captured without
    its labels) and whose forward reads its first hidden width from an attribute (a size fxprune cannot update)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 3)
        self.width = 16

    def forward(self, x, labels=None):
        h = torch.relu(self.fc1(x)).reshape(x.shape[0], self.width)
        logits = self.fc3(torch.relu(self.fc2(h)))
        if labels is None:
            return {"logits": logits}
        keep = (labels >= 0).nonzero()[:, 0]
        loss = F.cross_entropy(logits[keep], labels[keep]) if keep.size(0) > 0 else logits.sum() * 0
        return {"loss": loss, "logits": logits}


def test_a_model_captured_without_its_labels_keeps_what_its_class_cannot_lose():
    """A copy that fails its check is blamed on the capture only where the captured graph fails too. The graph of
    a model captured without its labels was run with them (ValueError: the inputs' tree spec), so the check raised
    CaptureError and minimize_module gave up: transformers' DeBERTa (v1) crashed the cycle that way. The checks
    now call the graph and the copy with the inputs the graph was captured from."""
    torch.manual_seed(0)
    model = _LossOnLabelledRowsWithWidth().double()
    with torch.no_grad():
        model.fc1.weight[:4], model.fc1.bias[:4] = 0.0, -1.0  # 4 dead units the class cannot lose (self.width)
        model.fc2.weight[:3], model.fc2.bias[:3] = 0.0, -1.0  # 3 it can
    batch = {"x": torch.randn(8, 6, dtype=torch.float64), "labels": torch.randint(0, 3, (8,))}
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LabelsLeftOutWarning)
        with pytest.warns(fp.interop.module.KeptChannelsWarning, match="fc1"):
            small = fp.minimize_module(model, batch)
    assert snapshot(model) == before
    assert type(small) is type(model) and small.fc1.out_features == 16 and small.fc2.out_features == 13
    for b in (8, 3):  # the example's batch and another
        x, labels = torch.randn(b, 6, dtype=torch.float64), torch.randint(0, 3, (b,))
        with torch.no_grad():
            out, ref = small(x, labels), model(x, labels)
        assert float((out["logits"] - ref["logits"]).abs().max()) <= 1e-12
        assert float((out["loss"] - ref["loss"]).abs()) <= 1e-12
