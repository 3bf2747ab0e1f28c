"""Stop 61: a timm model with a fraction of its norms' channels dead (weight and bias zero) and, where it has
them, of its scaled standardized convolutions' gains, minimized as its own class; prints the parameter counts,
the largest difference at another input size, and fxprune's warnings (a KeptChannelsWarning names what its class
kept).

    PYTHONPATH=.venv/torchvision python benchmarks/results/user_models/dead_channels_stop61.py cspresnet50 [0.5]
"""
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parents[2]))
from torchvision_zoo import stub_meta_registrations  # noqa: E402

stub_meta_registrations()
import timm  # noqa: E402

import fxprune as fp  # noqa: E402

name, frac = sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 0.5
torch.manual_seed(0)
m = timm.create_model(name, num_classes=4).eval()
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    for mod in m.modules():
        if isinstance(mod, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)) and mod.weight is not None:
            k = torch.randperm(mod.weight.shape[0], generator=g)[: int(mod.weight.shape[0] * frac)]
            mod.weight[k] = 0
            mod.bias[k] = 0
        if isinstance(getattr(mod, "gain", None), torch.Tensor) and mod.gain.dim() == 4:
            k = torch.randperm(mod.gain.shape[0], generator=g)[: int(mod.gain.shape[0] * frac)]
            mod.gain[k] = 0
            if mod.bias is not None:
                mod.bias[k] = 0
x = torch.randn(2, 3, 64, 64)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = fp.minimize_module(m, (x,))
n0, n1 = sum(p.numel() for p in m.parameters()), sum(p.numel() for p in out.parameters())
print(name, type(out).__name__, n0, "->", n1, f"{n0 / n1:.2f}x")
with torch.no_grad():
    y = torch.randn(3, 3, 72, 80)
    print("max abs difference at 3x3x72x80:", float((m(y) - out(y)).abs().max()))
for w in caught:
    if w.category.__module__.startswith("fxprune"):
        print(w.category.__name__, str(w.message)[:3000])
