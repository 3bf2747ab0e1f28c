"""``benchmarks/user_models.py``'s flow with fxprune's weight-norm rule switched off (a layer reading a weight-normed
weight freezes its channels, as before stop 54; the masks stay this stop's). Stop 54, docs/benchmarks.md section 9:

    OMP_NUM_THREADS=1 python benchmarks/results/user_models/no_weight_norm_rule.py wav2vec2

prints one JSON line per model (output: ``no_weight_norm_rule.txt`` here)."""
from __future__ import annotations

import json
import os
import sys

import torch

from fxprune.analysis import rule
from fxprune.analysis.table import RULES

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import user_models  # noqa: E402 (benchmarks/)


def main() -> None:
    del RULES._rules[torch.ops.aten._weight_norm.default]
    rule.WEIGHT_NORMS.clear()  # (the weight is no constant: the layer reading it freezes, as before)
    for name in sys.argv[1:]:
        r = user_models.run(name)
        print(json.dumps({k: r[k] for k in ("model", "params", "cycles", "accuracy")}))


if __name__ == "__main__":
    main()
