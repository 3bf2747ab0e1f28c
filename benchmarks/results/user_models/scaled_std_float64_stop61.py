"""Stop 61: a timm model with scaled weight-standardized convolutions (NF-ResNet, NF-RegNet, NFNet), half of each
layer's gains (and biases) zero, minimized as its own class and as a graph (torch.export), in float64; prints the
parameter counts, the compensated convolutions, and the relative error against the model at three image sizes (the
graph at the example's only: its capture pins the size).

    PYTHONPATH=.venv/torchvision python benchmarks/results/user_models/scaled_std_float64_stop61.py nf_resnet26
"""
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[2]))
from torchvision_zoo import stub_meta_registrations  # noqa: E402

stub_meta_registrations()
import timm  # noqa: E402

import fxprune as fp  # noqa: E402

name = sys.argv[1]
torch.manual_seed(0)
m = timm.create_model(name, num_classes=4).eval().double()
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    for mod in m.modules():
        if isinstance(getattr(mod, "gain", None), torch.Tensor) and mod.gain.dim() == 4:
            k = torch.randperm(mod.gain.shape[0], generator=g)[: mod.gain.shape[0] // 2]
            mod.gain[k] = 0
            if mod.bias is not None:
                mod.bias[k] = 0
x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = fp.minimize_module(m, (x,))
    gm = fp.minimize(fp.capture(m, (x,), method="export"))
count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
print(name, type(out).__name__, count(m), "->", count(out), "(graph:", count(gm), ")",
      sum(hasattr(c, "removed_sum") for c in out.modules()), "compensated convolutions")
with torch.no_grad():
    for shape in [(2, 3, 64, 64), (3, 3, 72, 80), (1, 3, 33, 47)]:
        y = torch.randn(*shape, dtype=torch.float64)
        a = m(y)
        graph = float((a - gm(y)).abs().max() / a.abs().max()) if shape[2] == 64 else "-"
        print(shape, "class", float((a - out(y)).abs().max() / a.abs().max()), "graph", graph)
for w in caught:
    if w.category.__module__.startswith("fxprune"):
        print(w.category.__name__, str(w.message)[:300])
