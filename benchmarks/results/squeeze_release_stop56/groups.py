"""Which benchmark networks stop 56's change reaches: the group lasso's channels and slices of each network as the
benchmark builds it, written as JSON, to compare between two versions of fxprune (results.md, stop 56).

    PYTHONPATH=CHECKOUT python benchmarks/results/squeeze_release_stop56/groups.py OUT.json
"""
from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import squeeze_release as sr  # noqa: E402

import fxprune as fp  # noqa: E402

NETWORKS = [("fc", "digits"), ("fc", "mnist1d"), ("convnext", "digits"), ("convnext", "mnist1d"), ("resnet", "digits"),
            ("resnet", "mnist1d"), ("vit", "digits")]

out = {}
for model, data in NETWORKS:
    torch.manual_seed(0)
    net, sample = sr.build(model, data)
    reg = fp.GroupLasso(net, (torch.randn(4, *sample),))
    out[f"{model}-{data}"] = dict(channels=reg.channels,
                                  slices=sorted([s.name, s.dim, s.channel.tolist()] for s in reg.slices))
with open(sys.argv[1], "w") as f:
    json.dump(out, f)
print({k: v["channels"] for k, v in out.items()})
