"""timm models (none of them in a test or a rule) through ``fp.minimize_module``: does the user's class come back,
smaller, and right? Random weights, eval mode; the first quarter of the output rows of every Linear and Conv2d
with at least 8 of them is zeroed (with its bias), which leaves whatever that makes removable; batch 2 at 64x64
(``--native``: at the model's own input size, for those that take no other), checked at batch 3. Prints per model the parameters before and after, whether the class came back, the float32
relative error of the copy at the other batch, and the seconds, or the error it raised.

timm is not a dependency (``pip install --no-deps --target DIR timm``, then ``PYTHONPATH=DIR``); torchvision's
stub is set up as in the zoo benchmarks.

    OMP_NUM_THREADS=1 python benchmarks/results/timm_minimize/timm_minimize.py resnet18 efficientnet_b0 ...
    OMP_NUM_THREADS=1 python benchmarks/results/timm_minimize/timm_minimize.py --native vit_tiny_patch16_224 ...
"""
from __future__ import annotations

import os
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", ".."), os.path.join(HERE, "..", "..", "..")]

from torchvision_zoo import stub_meta_registrations  # noqa: E402

stub_meta_registrations()
import timm  # noqa: E402
import torch  # noqa: E402

import fxprune as fp  # noqa: E402
from fxprune.verify import count_params  # noqa: E402


def main(names: list[str]) -> None:
    warnings.simplefilter("ignore")
    native = "--native" in names
    for name in (n for n in names if n != "--native"):
        t0 = time.time()
        try:
            torch.manual_seed(0)
            m = timm.create_model(name, pretrained=False, num_classes=4).eval()
            with torch.no_grad():
                for mod in m.modules():
                    if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and mod.weight.shape[0] >= 8:
                        k = mod.weight.shape[0] // 4
                        mod.weight[:k] = 0
                        if mod.bias is not None:
                            mod.bias[:k] = 0
            size = tuple(m.pretrained_cfg["input_size"][1:]) if native else (64, 64)
            small = fp.minimize_module(m, (torch.randn(2, 3, *size),))
            x = torch.randn(3, 3, *size)
            with torch.no_grad():
                a, b = m(x), small(x)
            err = float((a - b).abs().max() / a.abs().max())
            print(f"{name:24} {count_params(m):>11,} -> {count_params(small):>11,} "
                  f"{count_params(m) / count_params(small):6.2f}x  own class: {type(small) is type(m)}  "
                  f"f32 rel {err:.1e}  {time.time() - t0:.0f} s", flush=True)
        except Exception as e:  # noqa: BLE001 (reported)
            print(f"{name:24} FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
