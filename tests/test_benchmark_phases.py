"""benchmarks/planted.py's phase timer, which speed.py and scale.py use to name what lies above the floor: each
phase counted once (a phase inside another is not counted twice), the library left as it was, and the parts above
the floor summing to the total less the floor."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import fxprune as fp

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
planted = pytest.importorskip("planted", reason="benchmarks/planted.py needs transformers (fxprune.zoo)")


def test_phases_are_exclusive_cover_the_path_and_are_undone():
    import fxprune.passes.minimize as mn

    before = (mn.annotate, mn.Rewriter.run, mn.self_check)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        net[0].weight[:3] = 0
        net[0].bias[:3] = -1.0
    x = torch.randn(5, 4)
    with planted.Phases() as ph:
        t0 = time.perf_counter()
        small = fp.minimize(fp.capture(net, (x,)))
        total = time.perf_counter() - t0
    assert small.get_parameter("0.weight").shape == (5, 4)
    assert {"reference forward", "annotate shapes", "analysis", "rewrite", "check"} <= set(ph.seconds)
    assert ph.calls["analysis"] >= 2 and ph.calls["annotate shapes"] >= 2  # two rounds; capture and the rewrite
    assert 0 < sum(ph.seconds.values()) <= total  # exclusive: nested phases are not counted twice
    assert (mn.annotate, mn.Rewriter.run, mn.self_check) == before

    parts = planted.above_floor(ph.seconds, total, export=0.001, check_forwards=0.0005, forward=0.01)
    assert sum(parts.values()) == pytest.approx((total - 0.001 - 0.0005) / 0.01)
