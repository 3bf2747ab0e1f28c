"""Small reference models with random weights, for tests, examples and benchmarks.

Transformers models are built from configs (nothing is downloaded); ``transformers`` is imported lazily.
Each builder returns ``(model.eval(), example_inputs)``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

__all__ = ["TRANSFORMERS", "STREAM_PARAMS", "plant_dead_stream", "build", "ResidualMLP", "SmallCNN", "GatedMLP"]


def _hf(name: str, size: str = "tiny", head: bool = False) -> tuple[nn.Module, tuple[Any, ...]]:
    import transformers as tf

    tf.logging.set_verbosity_error()
    tiny = size == "tiny"
    ids = lambda: (torch.randint(0, 100, (1, 8)),)  # noqa: E731
    if name == "gpt2":
        cfg = tf.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64, use_cache=False) if tiny else tf.GPT2Config(use_cache=False)
        return tf.GPT2LMHeadModel(cfg).eval(), ids()
    if name == "llama":
        cfg = tf.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=64, use_cache=False)
        return tf.LlamaForCausalLM(cfg).eval(), ids()
    if name == "bert":
        cfg = tf.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                            max_position_embeddings=64)
        return (tf.BertForSequenceClassification if head else tf.BertModel)(cfg).eval(), ids()
    if name == "vit":
        cfg = tf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
                           patch_size=4) if tiny else tf.ViTConfig()
        return (tf.ViTForImageClassification if head else tf.ViTModel)(cfg).eval(), (torch.randn(1, 3, cfg.image_size, cfg.image_size),)
    if name == "convnext":
        cfg = tf.ConvNextConfig(num_channels=3, hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, image_size=32) if tiny else tf.ConvNextConfig()
        model = (tf.ConvNextForImageClassification if head else tf.ConvNextModel)(cfg).eval()
        return model, (torch.randn(1, 3, 32 if tiny else 224, 32 if tiny else 224),)
    raise KeyError(name)


TRANSFORMERS = ("convnext", "vit", "bert", "gpt2", "llama")

# Where each transformers architecture's residual stream lives: (parameter-name pattern, dim along the stream).
# Zeroing these at a channel makes it a dead stream channel: every writer writes a constant into it and every
# norm's weight there is zero (so the norm writes its bias: a constant the readers fold).
STREAM_PARAMS: dict[str, list[tuple[str, int]]] = {
    "gpt2": [(r"wte\.weight", 1), (r"wpe\.weight", 1), (r"ln_[12f]\.weight", 0), (r"c_proj\.weight", 1), (r"c_proj\.bias", 0)],
    "llama": [(r"embed_tokens\.weight", 1), (r"(input|post_attention)_layernorm\.weight", 0), (r"model\.norm\.weight", 0),
              (r"(o_proj|down_proj)\.weight", 0)],
    "vit": [(r"cls_token", 2), (r"position_embeddings", 2), (r"projection\.(weight|bias)", 0), (r"layernorm\w*\.weight", 0),
            (r"(o_proj|fc2)\.(weight|bias)", 0)],
    "bert": [(r"embeddings\.\w+_embeddings\.weight", 1), (r"LayerNorm\.weight", 0), (r"output\.dense\.(weight|bias)", 0)],
    "convnext": [(r"patch_embeddings\.(weight|bias)", 0), (r"embeddings\.layernorm\.(weight|bias)", 0),
                 (r"layers\.\d+\.layernorm\.weight", 0), (r"pwconv2\.(weight|bias)", 0), (r"downsampling_layer\.0\.weight", 0),
                 (r"downsampling_layer\.1\.(weight|bias)", 0), (r"convnext\.layernorm\.weight", 0)],
}


def plant_dead_stream(model: nn.Module, name: str, channels: list[int]) -> list[str]:
    """Make ``channels`` of every residual stream of a transformers model dead (see ``STREAM_PARAMS``); returns
    the names of the parameters changed. The model's function changes; what matters is that the channels
    then provably do not affect it."""
    import re

    changed = []
    with torch.no_grad():
        for pname, p in model.named_parameters():
            for pattern, dim in STREAM_PARAMS[name]:
                if re.search(pattern, pname):
                    p.index_fill_(dim, torch.tensor(channels), 0.0)
                    changed.append(pname)
                    break
    return changed


class ResidualMLP(nn.Module):
    def __init__(self, d_in: int = 12, width: int = 24, depth: int = 3, d_out: int = 5, act: Callable[[], nn.Module] = nn.ReLU):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, 2 * width), act(), nn.Linear(2 * width, width)) for _ in range(depth))
        self.out = nn.Linear(width, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for b in self.blocks:
            h = h + b(h)
        return self.out(h)


class GatedMLP(nn.Module):
    """SwiGLU-style: one projection chunked into gate and value."""

    def __init__(self, d: int = 16, hidden: int = 32):
        super().__init__()
        self.up = nn.Linear(d, 2 * hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.up(x).chunk(2, dim=-1)
        return self.down(nn.functional.silu(gate) * value)


class SmallCNN(nn.Module):
    """conv+BN, depthwise, grouped conv, concatenated branches, pooling, flatten->linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.dw, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16)
        self.g = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.b1, self.b2 = nn.Conv2d(16, 8, 1), nn.Conv2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 10)
        with torch.no_grad():
            for bn in (self.bn1, self.bn2):
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2)
                bn.weight.uniform_(0.5, 2)
                bn.bias.uniform_(-1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.c1(x)))
        h = torch.relu(self.bn2(self.dw(h)))
        h = torch.relu(self.g(h))
        h = torch.cat([self.b1(h), torch.relu(self.b2(h))], 1)
        h = nn.functional.max_pool2d(h, 2)
        return self.fc(torch.flatten(h, 1))


def build(name: str, size: str = "tiny", seed: int = 0, head: bool = False) -> tuple[nn.Module, tuple[Any, ...]]:
    """A reference model and example inputs: 'residual_mlp', 'gated_mlp', 'cnn' or a transformers name
    (``head=True``: BERT, ViT and ConvNeXt with a classification head, so the stream is not the output)."""
    torch.manual_seed(seed)
    if name == "residual_mlp":
        return ResidualMLP().eval(), (torch.randn(4, 12),)
    if name == "gated_mlp":
        return GatedMLP().eval(), (torch.randn(4, 16),)
    if name == "cnn":
        return SmallCNN().eval(), (torch.randn(2, 3, 8, 8),)
    return _hf(name, size, head)
