"""Structured masks to a target on the five models of the Torch-Pruning comparison (``benchmarks/structured.py``):
torchvision ResNet-50, ConvNeXt-Tiny, MobileNetV2, ViT-B/16 and a transformers Llama. ``minimize`` removes the
fraction asked within a point and is exact against the masked model at two batch sizes (Llama: two lengths too);
frozen groups (the model's input and output channels) keep every channel; heads go whole."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import fxprune as fp
from fxprune.passes.mask import REACHED_KEY

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

VISION = {"resnet50": ("conv1.weight", "fc.weight"), "convnext_tiny": ("features.0.0.weight", "classifier.2.weight"),
          "mobilenet_v2": ("features.0.0.weight", "classifier.1.weight"), "vit_b_16": ("conv_proj.weight", "heads.head.weight")}


def count_params(m) -> int:
    """Parameters only (what ``sparsity`` counts; ``fxprune.verify.count_params`` adds BatchNorm's statistics)."""
    return sum(p.numel() for p in m.parameters())


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _exact(small, masked, batches) -> None:
    with torch.no_grad():
        for x in batches:
            a, b = _logits(masked(*x)), _logits(small(*x))
            assert float((a - b).abs().max() / a.abs().max()) <= 1e-9


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VISION))
def test_torchvision_models_reach_the_target_exactly(name):
    pytest.importorskip("torchvision_zoo", reason="benchmarks/torchvision_zoo.py builds the models")
    from torchvision_zoo import build

    model, x = build(name)  # float64, BatchNorm randomized
    if name == "vit_b_16":
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zero-initializes it: outputs all 0
    gm = fp.capture(model, x)
    sparsity = 0.3 if name == "vit_b_16" else 0.5
    masked = fp.mask(gm, sparsity, structure="groups")
    small = fp.minimize(masked)
    removed = 1 - count_params(small) / count_params(gm)
    assert abs(removed - sparsity) <= 0.01 and abs(masked.meta[REACHED_KEY] - removed) <= 1e-9
    side = x[0].shape[-1]
    _exact(small, masked, [x, (torch.randn(3, 3, side, side, dtype=torch.float64),)])
    stem, head = VISION[name]
    assert bool((masked.get_parameter(stem) != 0).flatten(2).any(2).any(0).all())  # every input channel read
    assert bool((masked.get_parameter(head) != 0).any(1).all())  # every output unit kept
    if name == "vit_b_16":
        heads = model.encoder.layers[0].self_attention.num_heads
        for n, p in masked.named_parameters():
            if n.endswith("in_proj_weight"):
                dead = (p == 0).all(1).view(3, heads, -1)
                whole = dead.all(2, keepdim=True) | dead.all(1, keepdim=True)
                assert bool((dead == whole).all()), n


def test_llama_reaches_the_target_exactly_at_other_lengths():
    transformers = pytest.importorskip("transformers", reason="the model comes from transformers (dev dependency)")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=8,
                                   num_key_value_heads=4, vocab_size=200, max_position_embeddings=64, use_cache=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).double().eval()
    ids = torch.randint(0, 200, (2, 12))
    gm = fp.capture(model, (ids,), dynamic_shapes="every")
    for sparsity in (0.3, 0.5):
        masked = fp.mask(gm, sparsity, structure="groups")
        small = fp.minimize(masked)
        removed = 1 - count_params(small) / count_params(gm)
        assert abs(removed - sparsity) <= 0.01, (removed, sparsity)
        for x in (ids, torch.randint(0, 200, (3, 12)), torch.randint(0, 200, (2, 21))):
            # fp.verify runs both graphs in float64 throughout: Llama's RMSNorm casts to float32 whatever the
            # weights' dtype, and its float32 sums over 64 or 59 channels round apart by ~1e-7
            rep = fp.verify(masked, small, (x,), n_random=0)
            assert rep.ok and rep.max_rel["float64"] <= 1e-9, rep
        assert small.get_parameter("lm_head.weight").shape[0] == 200  # the vocabulary (an output) stays whole
        q = masked.get_parameter("model.layers.0.self_attn.q_proj.weight")
        dead = (q == 0).all(1).view(8, -1)  # query heads x head dim
        assert bool((dead == (dead.all(1, keepdim=True) | dead.all(0, keepdim=True))).all())
