"""Stop 65: what the cycle's class probe (``fxprune.cycle._class_kept``) leaves out of the masks and the group lasso
for each benchmark network of benchmarks/squeeze_release.py (nothing: their classes lose every channel, so their
runs are the same as without the probe, which draws no random numbers).

    python benchmarks/results/squeeze_release_stop65/class_probe.py
"""
import os
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
import torch  # noqa: E402

import squeeze_release as sr  # noqa: E402
from fxprune.cycle import _class_kept  # noqa: E402

for model, dataset in [("fc", "digits"), ("fc", "mnist1d"), ("convnext", "digits"), ("convnext", "mnist1d"),
                       ("resnet", "digits"), ("resnet", "mnist1d"), ("vit", "digits")]:
    torch.manual_seed(0)
    net, sample = sr.build(model, dataset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kept = _class_kept(net, (torch.randn(8, *sample),), verify=True)
    print(f"{model:9s} {dataset:8s} keep={dict(kept.keep) if kept else None} "
          f"whole_heads={list(kept.whole_heads) if kept else None}", flush=True)
