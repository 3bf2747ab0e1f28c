"""Stop 59: minimize the model SAVE.pt holds (written by past_range.py: the last model the cycle handed to
minimize_module, and its inputs) with the checkout on PYTHONPATH, then compare the copy against the model in
float64 at the example's image size and three others. Prints "SIZE shape relative-error" per size.

    PYTHONPATH=CHECKOUT python benchmarks/results/user_models/float64_sizes.py SAVE.pt
"""
import copy
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
from torchvision_zoo import stub_meta_registrations  # noqa: E402

stub_meta_registrations()
import fxprune as fp  # noqa: E402

saved = torch.load(sys.argv[1], weights_only=False)  # (a file this script's own runs wrote: not untrusted input)
model, inputs = saved["model"].eval(), saved["inputs"]
print("fxprune from", os.path.dirname(fp.__file__))
try:
    small = fp.minimize_module(model, inputs)
except Exception as e:  # noqa: BLE001
    print("REFUSED", type(e).__name__, str(e)[:200])
    raise SystemExit(0)
m64, s64 = copy.deepcopy(model).double(), copy.deepcopy(small).double()
torch.manual_seed(0)
b, c, h, w = inputs[0].shape
for size in [(h, w), (2 * h, 2 * w), (h + 1, w + 1), (h + h // 2, w + w // 2)]:
    x = torch.randn(2, c, *size, dtype=torch.float64)
    with torch.no_grad():
        ref, got = m64(x), s64(x)
        ref, got = getattr(ref, "logits", ref), getattr(got, "logits", got)
    print("SIZE", tuple(x.shape), float((ref - got).abs().max() / ref.abs().max()))
