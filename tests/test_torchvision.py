"""A sample of torchvision's zoo (the whole zoo: ``benchmarks/torchvision_zoo.py``): float64, randomized BatchNorm,
a random unstructured mask and dead units planted in every bottleneck layer; minimized exactly, at least the planted
parameters removed, checked here on the example and on a fresh input of another batch size."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import torchvision

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

SAMPLE = ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5", "regnet_x_400mf", "squeezenet1_1", "vit_b_32",
          "lraspp_mobilenet_v3_large"]


@pytest.mark.slow
@pytest.mark.parametrize("name", SAMPLE)
def test_zoo_sample_is_exact_with_planted_units_removed(name):
    torchvision()
    from torchvision_zoo import one

    row = one(name, torch_pruning=False)
    assert row["layers"] > 0 and row["planted"] > 0, row  # the walk found bottlenecks to plant in
    fx = row["fxprune"]
    assert fx["outcome"] == "exact", fx
    assert fx["err"] <= 1e-9 and row["params"] - fx["params"] >= row["planted"]
