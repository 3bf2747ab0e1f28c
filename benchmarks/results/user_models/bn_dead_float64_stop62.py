"""Stop 62: a timm model (default ReXNet-1.0) in float64 with half of each BatchNorm's channels dead (weight and
bias zero), minimized as its own class; prints fxprune's warnings, the parameter counts, the relative difference
against the model at three image sizes, the first split widths of its MixedConv2d modules (MixNet), and whether
fp.save then fp.load into a fresh model gives equal outputs. A second argument, an image size, builds the model for
it (``img_size``: models whose attention holds its token count, EfficientFormerV2) and varies the batch only.

    OMP_NUM_THREADS=2 python benchmarks/results/user_models/bn_dead_float64_stop62.py [rexnet_100 | mixnet_s | ...]
    OMP_NUM_THREADS=2 python benchmarks/results/user_models/bn_dead_float64_stop62.py efficientformerv2_s0 32
"""
import sys, warnings, torch
from torch import nn
sys.path.insert(0, str(__import__('pathlib').Path(__file__).parents[2]))
from torchvision_zoo import stub_meta_registrations
stub_meta_registrations()
import timm, fxprune as fp
NAME = sys.argv[1] if len(sys.argv) > 1 else "rexnet_100"
SIZE = int(sys.argv[2]) if len(sys.argv) > 2 else None
KW = {"img_size": SIZE} if SIZE else {}
torch.manual_seed(0)
m = timm.create_model(NAME, num_classes=4, **KW).double().eval()
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            k = torch.randperm(mod.weight.shape[0], generator=g)[: mod.weight.shape[0] // 2]
            mod.weight[k] = 0; mod.bias[k] = 0
x = torch.randn(2, 3, SIZE or 64, SIZE or 64, dtype=torch.float64)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = fp.minimize_module(m, (x,))
print([str(w.message)[:200] for w in caught if w.category.__module__.startswith("fxprune")])
print(sum(p.numel() for p in m.parameters()), sum(p.numel() for p in out.parameters()))
with torch.no_grad():
    for shape in [(b, 3, SIZE, SIZE) for b in (2, 5, 1)] if SIZE else [(2, 3, 64, 64), (3, 3, 72, 80), (1, 3, 33, 47)]:
        y = torch.randn(*shape, dtype=torch.float64)
        a, b = m(y), out(y)
        print(shape, float((a - b).abs().max() / a.abs().max()))
print([mod.splits for mod in out.modules() if type(mod).__name__ == "MixedConv2d"][:6])
import tempfile  # noqa: E402


def build():
    return timm.create_model(NAME, num_classes=4, **KW).double().eval()


with tempfile.TemporaryDirectory() as d:  # saved and loaded into build()'s model
    back = fp.load(fp.save(out, d + "/m"), build).eval()
    with torch.no_grad():
        y = torch.randn(2, 3, SIZE or 40, SIZE or 56, dtype=torch.float64)
        print("loaded equal:", torch.equal(back(y), out(y)))
