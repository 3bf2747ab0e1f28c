"""Transformers models with planted dead MLP hidden units: the workload of ``speed.py`` and ``oracle.py``, and the
MLP layer names ``latency.py`` masks whole units of."""
from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from fxprune import zoo
from fxprune.graph.dynamic import DYNAMIC_KEY, shaped_inputs

# The two layers of each model's MLP: the first's output units are the hidden units, the second reads them.
MLP = {"convnext": ("pwconv1", "pwconv2"), "vit": ("mlp.fc1", "mlp.fc2"), "gpt2": ("mlp.c_fc", "mlp.c_proj"),
       "bert": ("intermediate.dense", "output.dense"), "llama": ("mlp.up_proj", "mlp.down_proj")}


def out_dim(name: str) -> int:
    """The dim of an MLP weight that indexes its output units (transformers' Conv1D, in GPT-2, stores (in, out))."""
    return 1 if name == "gpt2" else 0


def planted(name: str, size: str, frac: float = 0.25) -> tuple[nn.Module, tuple[Any, ...], dict[str, list[int]]]:
    """The model in float64 with ``frac`` of every MLP's hidden units dead (zero input rows; the MLP biases drawn
    from N(0, 0.1), since transformers initializes them to 0 and trained ones are not), and the dead indices per
    first MLP layer."""
    model, inputs = zoo.build(name, size)
    model = model.double().eval()
    inputs = tuple(x.double() if x.is_floating_point() else x for x in inputs)
    dead: dict[str, list[int]] = {}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for path, mod in model.named_modules():
            if not path.endswith(MLP[name][0]):
                continue
            if mod.bias is not None:
                mod.bias.normal_(0.0, 0.1, generator=g)
            w = mod.weight
            n = w.shape[out_dim(name)]
            idx = sorted(torch.randperm(n, generator=g)[: int(frac * n)].tolist())
            w.index_fill_(out_dim(name), torch.tensor(idx), 0.0)
            dead[path] = idx
    return model, inputs, dead


def logits(out: Any) -> torch.Tensor:
    """The tensor to compare of a model's output (a tensor, or a transformers output's logits / first field)."""
    return out if isinstance(out, torch.Tensor) else (out.logits if hasattr(out, "logits") else out[0])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs().max() / a.abs().max()).detach())


def check_forwards(model: nn.Module, result: Any, inputs: tuple[Any, ...]) -> float:
    """Seconds of the forwards ``minimize``'s default check runs, which no faster analysis removes: the result at
    every check shape, the model at every one but the example (its outputs there come with ``capture``)."""
    t0 = time.perf_counter()
    with torch.no_grad():
        for k, xs in enumerate(shaped_inputs(result.meta[DYNAMIC_KEY], inputs)):
            result(*xs)
            if k:
                model(*xs)
    return time.perf_counter() - t0
