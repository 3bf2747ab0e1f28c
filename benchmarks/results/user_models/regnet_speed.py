"""One model of benchmarks/user_models.py through the same flow, then dense and kept timed at larger images
(stop 48: why RegNetY-400MF, 10.8x smaller, ran only 1.18x faster at 32x32). Prints FLOPs and eager CPU
milliseconds at batch 32 per image size, and the kept grouped convolutions.

    OMP_NUM_THREADS=1 python benchmarks/results/user_models/regnet_speed.py regnet_y_400mf
"""
from __future__ import annotations

import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", ".."), os.path.join(HERE, "..", "..", "..")]

import user_models  # noqa: E402
from fxprune.verify import count_flops  # noqa: E402


def main(name: str) -> None:
    timed: list[torch.nn.Module] = []  # run() times dense, then kept: keep both
    latency = user_models.latency

    def keep_and_time(m: torch.nn.Module, x: torch.Tensor, n: int = 20) -> float:
        timed.append(m)
        return latency(m, x, n)

    user_models.latency = keep_and_time
    row = user_models.run(name)
    dense, kept = timed
    print(name, row["params"], row["latency_ms"])
    for px in (32, 64, 128, 224):
        x = torch.randn(32, 3, px, px)
        fd, fk = count_flops(dense.eval(), (x[:1],)), count_flops(kept.eval(), (x[:1],))
        td, tk = latency(dense, x, 5), latency(kept, x, 5)
        print(f"{px}px  flops {fd / 1e6:.1f}M -> {fk / 1e6:.1f}M ({fd / fk:.2f}x)  ms {td:.1f} -> {tk:.1f} ({td / tk:.2f}x)")
    for path, m in kept.named_modules():
        if isinstance(m, torch.nn.Conv2d) and m.groups > 1:
            print("  ", path, m.in_channels, m.out_channels, "groups", m.groups)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "regnet_y_400mf")
