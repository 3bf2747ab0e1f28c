"""PyTorch's own transformer layers (``nn.TransformerEncoderLayer``, ``nn.Transformer``, ``nn.MultiheadAttention``).

A symbolic trace keeps each as one call, which froze every channel it touched (nothing removed). Capture takes
torch.export's graph for them, in which attention, the feed-forward units and the norms are ATen ops with rules:
``fp.minimize`` on the graph removes dead feed-forward units and residual-stream channels; ``minimize_module``
removes the units in the user's class and keeps the stream, whose width ``nn.MultiheadAttention`` reads as its
``embed_dim``, with a warning."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune as fp
from conftest import graph_state, snapshot
from fxprune.interop.module import KeptChannelsWarning
from fxprune.verify import count_params

DEAD_UNITS, DEAD_STREAM = 20, [3, 17]


class Encoder(nn.Module):
    """A sequence classifier on ``nn.TransformerEncoder``, batch first or not, norms before or after."""

    def __init__(self, batch_first: bool = True, norm_first: bool = False, d: int = 32) -> None:
        super().__init__()
        self.emb = nn.Linear(8, d)
        layer = nn.TransformerEncoderLayer(d, 4, 64, dropout=0.1, batch_first=batch_first, norm_first=norm_first)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, 3)
        self.batch_first = batch_first

    def forward(self, x):
        h = self.emb(x)
        h = self.enc(h if self.batch_first else h.transpose(0, 1))
        return self.head((h if self.batch_first else h.transpose(0, 1)).mean(1))


class CausalLM(nn.Module):
    """A decoder-only LM: the causal mask made in forward from the input's length."""

    def __init__(self, d: int = 32, vocab: int = 20) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 4, 64, batch_first=True, norm_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        mask = nn.Transformer.generate_square_subsequent_mask(ids.size(1))
        return self.head(self.enc(self.emb(ids), mask=mask, is_causal=True))


class Seq2Seq(nn.Module):
    """``nn.Transformer``: an encoder, and a decoder with cross-attention to its output."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.emb = nn.Linear(6, d)
        self.tr = nn.Transformer(d, 4, 1, 1, 64, batch_first=True)
        self.head = nn.Linear(d, 5)

    def forward(self, src, tgt):
        return self.head(self.tr(self.emb(src), self.emb(tgt)))


def layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer))]


def plant(model: nn.Module, stream: bool = False) -> nn.Module:
    """Dead feed-forward units in every layer; with ``stream``, residual-stream channels nothing writes (the
    embedding's, every residual branch's and every norm's entries zero)."""
    with torch.no_grad():
        for layer in layers(model):
            layer.linear1.weight[:DEAD_UNITS] = 0
            layer.linear1.bias[:DEAD_UNITS] = 0
            if stream:
                layer.self_attn.out_proj.weight[DEAD_STREAM] = 0
                layer.self_attn.out_proj.bias[DEAD_STREAM] = 0
                layer.linear2.weight[DEAD_STREAM] = 0
                layer.linear2.bias[DEAD_STREAM] = 0
                for norm in (layer.norm1, layer.norm2):
                    norm.weight[DEAD_STREAM] = 0
                    norm.bias[DEAD_STREAM] = 0
        if stream:
            model.emb.weight[DEAD_STREAM] = 0
            model.emb.bias[DEAD_STREAM] = 0
    return model


def unit_params(model: nn.Module) -> int:
    """The parameters of the planted dead units: a row and bias entry of linear1, a column of linear2."""
    return sum(DEAD_UNITS * (layer.linear1.in_features + 1 + layer.linear2.out_features) for layer in layers(model))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
def test_the_graph_loses_dead_units_and_stream_channels_of_transformer_layers(batch_first, norm_first):
    model = plant(Encoder(batch_first, norm_first).double().eval(), stream=True)
    x = torch.randn(4, 10, 8, dtype=torch.float64)
    before = snapshot(model)
    gm = fp.capture(model, (x,))
    assert gm.meta["fxprune_capture_method"] == "export"
    state = graph_state(gm)
    small = fp.minimize(gm)
    d, f, qkv = 32 - len(DEAD_STREAM), 64 - DEAD_UNITS, 3 * 32  # attention's q/k/v widths stay
    layer = (qkv * d + qkv) + (d * 32 + d) + (f * d + f) + (d * f + d) + 4 * d  # in_proj, out_proj, FFN, norms
    assert count_params(small) == (8 * d + d) + 2 * layer + (3 * d + 3)
    for b in (1, 5):  # the captured graph's batch is dynamic
        xb = torch.randn(b, 10, 8, dtype=torch.float64)
        assert torch.allclose(small(xb), model(xb), rtol=1e-9, atol=1e-12)
    assert snapshot(model) == before and graph_state(gm) == state


@pytest.mark.parametrize("batch_first", [True, False])
def test_their_class_loses_dead_units_and_keeps_the_stream_multihead_attention_reads(batch_first):
    model = plant(Encoder(batch_first).double().eval(), stream=True)
    x = torch.randn(4, 10, 8, dtype=torch.float64)
    before = snapshot(model)
    with pytest.warns(KeptChannelsWarning, match="self_attn"):
        small = fp.minimize_module(model, (x,))
    assert type(small) is Encoder and isinstance(small.enc, nn.TransformerEncoder)
    assert [layer.linear1.out_features for layer in layers(small)] == [64 - DEAD_UNITS] * 2
    assert count_params(model) - count_params(small) == unit_params(model)
    small.eval()
    for b, n in ((1, 10), (3, 7), (5, 13)):  # another batch and length
        xb = torch.randn(b, n, 8, dtype=torch.float64)
        with torch.no_grad():  # (eval under no_grad: PyTorch's fused fast path of the layers)
            assert torch.allclose(small(xb), model(xb), rtol=1e-9, atol=1e-12)
        assert torch.allclose(small(xb), model(xb), rtol=1e-9, atol=1e-12)
    assert snapshot(model) == before


@pytest.mark.parametrize("name", ["causal", "seq2seq"])
def test_causal_masks_and_cross_attention_keep_their_class_and_lose_dead_units(name):
    if name == "causal":
        model = plant(CausalLM().double().eval())
        make = lambda b, n: (torch.randint(0, 20, (b, n)),)  # noqa: E731
    else:
        model = plant(Seq2Seq().double().eval())
        make = lambda b, n: (torch.randn(b, n, 6, dtype=torch.float64),  # noqa: E731
                             torch.randn(b, n - 1, 6, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("error", KeptChannelsWarning)  # no stream channel was dead: nothing to keep
        small = fp.minimize_module(model, make(4, 10))
    assert type(small) is type(model)
    assert count_params(model) - count_params(small) == unit_params(model)
    for b, n in ((1, 10), (3, 6)):
        xb = make(b, n)
        assert torch.allclose(small(*xb), model(*xb), rtol=1e-9, atol=1e-12)


def test_the_cycle_trains_and_shrinks_a_plain_pytorch_transformer_in_its_class():
    """An ordinary loop (``.train()``, AdamW, ``.eval()``): the model comes back as its own class with fewer
    feed-forward units, training and switching modes as before."""
    g = torch.Generator().manual_seed(0)
    step = torch.randint(1, 3, (128, 1), generator=g)
    seqs = (torch.randint(0, 20, (128, 1), generator=g) + step * torch.arange(12)) % 20
    model = CausalLM()

    def train(m, epochs=2):
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
        m.train()
        for _ in range(epochs):
            for idx in torch.randperm(128, generator=g).split(32):
                opt.zero_grad()
                F.cross_entropy(m(seqs[idx, :-1]).flatten(0, 1), seqs[idx, 1:].flatten()).backward()
                opt.step()

    @torch.no_grad()
    def evaluate(m):
        m.eval()
        return float((m(seqs[:, :-1]).argmax(-1) == seqs[:, 1:]).float().mean())

    train(model, 4)
    res = fp.squeeze_release(model, (seqs[:8, :-1],), train=train, evaluate=evaluate, cycles=2, tolerance=0.05,
                             progress=False)
    kept = res.module
    assert type(kept) is CausalLM and res.compression > 1.2
    assert sum(layer.linear1.out_features for layer in layers(kept)) < 2 * 64
    assert evaluate(kept) >= res.dense["accuracy"] - 0.05
    train(kept, 1)  # still trains and switches modes
    assert kept.training is True
