import pytest
import torch
from torch import nn

import fxprune as fp
from fxprune.zoo import build


def test_residual_stream_is_one_group():
    m, x = build("residual_mlp")
    cg = fp.analyze(fp.capture(m, x))
    stream = cg.group_of("inp", 1)
    assert stream is not None and not stream.frozen and stream.size == 24
    names = {n for n, _ in stream.spaces}
    assert {"inp", "add", "add_1", "add_2", "blocks_0_2", "blocks_2_2", "out_weight"} <= names
    hidden = cg.group_of("blocks_0_0", 1)
    assert hidden is not stream and hidden.size == 48 and not hidden.frozen


def test_gpt2_hidden_size_is_one_unfrozen_group_with_tied_head():
    m, x = build("gpt2")
    gm = fp.capture(m, x)
    cg = fp.analyze(gm)
    emb = next(n.name for n in gm.graph.nodes if n.op == "get_attr" and n.target == "transformer.wte.weight")
    g = cg.group_of(emb, 1)
    assert g is not None and g.size == 32 and not g.frozen, g
    attrs = {n.name: n.target for n in gm.graph.nodes if n.op == "get_attr"}
    targets = {attrs.get(name) for name, _ in g.spaces}
    assert "transformer.wpe.weight" in targets
    # the head is tied to the embedding: one tensor, so its weight's hidden dim is in the group too
    head = next(n for n in gm.graph.nodes if n.op == "output").args[0][0]
    head_weight = head.args[1]
    assert gm.get_parameter(head_weight.target) is gm.get_parameter("transformer.wte.weight")
    assert (head_weight.name, 1) in g.spaces
    for block in range(2):
        assert f"transformer.h.{block}.attn.c_attn.weight" in targets
        assert f"transformer.h.{block}.mlp.c_proj.bias" in targets
    assert "transformer.ln_f.weight" in targets
    text = str(cg)
    assert "free" in text and "32" in text


class FFTHidden(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        return self.b(h + torch.fft.fft(h, dim=-1).real)


@pytest.mark.parametrize("method", ["symbolic", "export"])
def test_op_without_rule_freezes_with_reason(method):
    gm = fp.capture(FFTHidden().eval(), (torch.randn(2, 4),), method=method)
    g = fp.analyze(gm).group_of("a_weight", 0)
    assert g.frozen
    assert any("fft" in r for r in g.reasons), g.reasons


def test_concat_and_groups_in_cnn():
    m, x = build("cnn")
    cg = fp.analyze(fp.capture(m, x))
    b1, b2 = cg.group_of("b1", 1), cg.group_of("b2", 1)
    assert b1 is not b2 and not b1.frozen and not b2.frozen
    spatial = cg.group_of("c1", 2)
    assert spatial.frozen


def test_analysis_on_transformers_gives_free_mlp_groups():
    for name in ("vit", "bert", "llama", "convnext"):
        m, x = build(name)
        cg = fp.analyze(fp.capture(m, x))
        free = [g for g in cg.groups if not g.frozen and g.size == 64]
        assert free or name == "convnext", name
        assert any(not g.frozen and g.size > 1 for g in cg.groups), name
