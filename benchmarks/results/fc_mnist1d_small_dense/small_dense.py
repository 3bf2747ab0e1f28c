"""FC on MNIST-1D: how a dense MLP of the target's size does when trained from scratch (results.md, stop 49).

    python benchmarks/results/fc_mnist1d_small_dense/small_dense.py > small_dense.txt   # about 6 min on one core

The benchmark's FC (40 -> 300 -> 100 -> 10, 43,410 parameters) and smaller widths, each trained from scratch with
the benchmark's dense loop and recipe for FC MNIST-1D (``squeeze_release.Trainer``: Adam, lr 3e-3, batches of 64,
the fixed split of seeds 0-2), for the recipe's 60 epochs and for 300. Test accuracy of the last epoch, as the
dense reference is read. Prints a table and, as its last line, one JSON object.
"""
from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import squeeze_release as sr  # noqa: E402

from fxprune.verify import count_params  # noqa: E402

WIDTHS = [(300, 100), (64, 32), (32, 16), (24, 12), (20, 10), (16, 16)]


def main() -> None:
    torch.set_num_threads(1)
    recipe = sr.RECIPES[("fc", "mnist1d")]
    rows = []
    print(f"{'widths':>12} {'params':>7} {'smaller':>8} {'epochs':>6}  test accuracy (seeds 0, 1, 2)   mean")
    for widths in WIDTHS:
        for epochs in (recipe.dense_epochs, 300):
            accs = []
            for seed in (0, 1, 2):
                data = sr.load("mnist1d", seed)
                torch.manual_seed(seed)
                model = sr.fc(40, widths)
                trainer = sr.Trainer(data, (40,), recipe, seed)
                trainer.train(model, epochs, dense=True)
                accs.append(trainer.accuracy(model, "test"))
            n = count_params(model)
            rows.append(dict(widths=list(widths), params=n, epochs=epochs, test=accs))
            print(f"{str(widths):>12} {n:>7,} {43410 / n:>7.1f}x {epochs:>6}  "
                  f"{', '.join(f'{100 * a:.1f}%' for a in accs):>27}  {100 * sum(accs) / 3:.2f}%", flush=True)
    print(json.dumps(dict(benchmark="fc_mnist1d_small_dense", rows=rows)))


if __name__ == "__main__":
    main()
