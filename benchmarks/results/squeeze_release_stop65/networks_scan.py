"""Stop 65: whether this stop's changes reach the benchmark networks' graphs. Each network of
benchmarks/squeeze_release.py on each dataset, captured eval-mode by each method that captures it, lowered as
minimize lowers it: values written into before a later read (``stale_reads``), a symbolic trace's tensor indexing
now lowered to slices (``_tensor_index``), einsum calls.

    python benchmarks/results/squeeze_release_stop65/networks_scan.py
"""
import os
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
import torch  # noqa: E402

import fxprune as fp  # noqa: E402
import squeeze_release as sr  # noqa: E402
from fxprune.analysis.rule import stale_reads  # noqa: E402
from fxprune.passes.lower import _tensor_index, lower_modules  # noqa: E402

for model, dataset in [("fc", "digits"), ("fc", "mnist1d"), ("convnext", "digits"), ("convnext", "mnist1d"),
                       ("resnet", "digits"), ("resnet", "mnist1d"), ("vit", "digits")]:
    net, sample = sr.build(model, dataset)
    net.eval()
    x = torch.randn(4, *sample)
    for method in ("symbolic", "export"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                gm = fp.capture(net, (x,), method=method)
        except fp.CaptureError:
            print(f"{model:9s} {dataset:8s} {method:9s} not captured by this method")
            continue
        index = [n.name for n in gm.graph.nodes if _tensor_index(n)]
        low = lower_modules(gm)
        einsum = [n.name for n in low.graph.nodes if "einsum" in str(n.target)]
        print(f"{model:9s} {dataset:8s} {method:9s} nodes={len(low.graph.nodes):4d} stale={len(stale_reads(low))} "
              f"index={len(index)} einsum={len(einsum)}")
