"""A small ``squeeze_release`` run with a checkpoint, for the kill-and-resume tests.

    python tests/helpers/cycle_run.py CHECKPOINT_DIR OUT.safetensors [--resume] [--kill-at N] [--model fc|bn|export]

Training draws its batches and its noise from the global torch, Python and NumPy RNGs, so a resumed run is
bit-exact only if every one of them is restored. The loop calls ``.train()`` and ``.eval()`` as users' loops do:
``train``/``evaluate`` get copies of the model's own class, whichever tracer analyses it. ``--kill-at N`` sends SIGKILL to this process at the N-th
``train`` call (no cleanup, like a preempted job). The kept model's tensors and the history go to OUT.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import fxprune as fp


class Flattening(nn.Module):
    """Python control flow on ``x.dim()`` stops torch.fx.symbolic_trace, so this one is captured by torch.export."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() > 2:
            x = x.flatten(1)
        return self.body(x)


def build(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "fc":
        return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 3))
    if kind == "bn":  # BatchNorm: the cycle re-estimates its running statistics after every train call
        return nn.Sequential(nn.Linear(12, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Linear(24, 16), nn.BatchNorm1d(16),
                             nn.ReLU(), nn.Linear(16, 3))
    return Flattening()


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 12, generator=g)
    return x, (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint_dir")
    ap.add_argument("out")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--kill-at", type=int, default=0)
    ap.add_argument("--model", default="fc")
    ap.add_argument("--cycles", type=int, default=3)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    x, y = data()
    calls = [0]

    def train(m: nn.Module) -> None:
        calls[0] += 1
        if calls[0] == a.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        m.train()
        for _ in range(3):
            for idx in torch.randperm(len(x)).split(16):  # global torch RNG
                noise = random.gauss(0, 1e-3) + float(np.random.normal(0, 1e-3))  # global Python and NumPy RNGs
                opt.zero_grad()
                (F.cross_entropy(m(x[idx] + noise), y[idx])).backward()
                opt.step()

    @torch.no_grad()
    def evaluate(m: nn.Module) -> float:
        m.eval()
        return float((m(x).argmax(1) == y).float().mean())

    model = build(a.model)
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    res = fp.squeeze_release(model, (x[:8],), train=train, evaluate=evaluate, cycles=a.cycles, sparsity=0.6,
                             mask_steps=2, tolerance=0.2, progress=False, checkpoint_dir=a.checkpoint_dir,
                             resume=a.resume)
    from safetensors.torch import save_file
    save_file({k: v.contiguous().clone() for k, v in res.module.state_dict().items()}, a.out)
    history = [{k: v for k, v in h.items() if not k.endswith("seconds")} for h in res.history]
    with open(a.out + ".json", "w") as f:
        json.dump(dict(history=history, best_cycle=res.best_cycle, calls=calls[0],
                       rng=float(torch.rand(1)), code=str(res.module), cls=type(res.module).__name__), f)


if __name__ == "__main__":
    sys.exit(main())
