"""Stop 62: timm FasterNet-T0 in float64 with half of each stage's stream channels dead (the norm that opens the
stage and every block's last MLP convolution zero there), minimized as its own class; prints fxprune's warnings,
the parameter counts, the relative difference against the model at three image sizes, the split widths of the
first blocks, and whether fp.save then fp.load into a fresh FasterNet-T0 gives equal outputs.

    OMP_NUM_THREADS=2 python benchmarks/results/user_models/fasternet_float64_stop62.py
"""
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[2]))
from torchvision_zoo import stub_meta_registrations  # noqa: E402

stub_meta_registrations()
import timm  # noqa: E402

import fxprune as fp  # noqa: E402


def build():
    return timm.create_model("fasternet_t0", num_classes=4).double().eval()


torch.manual_seed(0)
m = build()
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    for i, stage in enumerate(m.stages):
        norm = stage.downsample.norm if hasattr(stage.downsample, "norm") else m.patch_embed.norm
        k = torch.randperm(norm.weight.shape[0], generator=g)[: norm.weight.shape[0] // 2]
        norm.weight[k] = 0
        norm.bias[k] = 0
        for block in stage.blocks:
            block.mlp[3].weight[k] = 0
x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = fp.minimize_module(m, (x,))
print([str(w.message)[:300] for w in caught if w.category.__module__.startswith("fxprune")])
print(sum(p.numel() for p in m.parameters()), "->", sum(p.numel() for p in out.parameters()))
with torch.no_grad():
    for shape in [(2, 3, 64, 64), (3, 3, 72, 80), (1, 3, 33, 47)]:
        y = torch.randn(*shape, dtype=torch.float64)
        a, b = m(y), out(y)
        print(shape, float((a - b).abs().max() / a.abs().max()))
print([(b.spatial_mixing.dim_conv3, b.spatial_mixing.dim_untouched) for b in out.modules()
       if type(b).__name__ == "MLPBlock"][:4])
with tempfile.TemporaryDirectory() as d:
    back = fp.load(fp.save(out, d + "/m"), build).eval()
    with torch.no_grad():
        y = torch.randn(2, 3, 40, 56, dtype=torch.float64)
        print("loaded equal:", torch.equal(back(y), out(y)))
