"""Why torchvision's ConvNeXt-Tiny keeps its channels in ``benchmarks/user_models.py`` (benchmarks.md, section 9).

    python benchmarks/results/user_models/convnext_tiny_lasso.py 1e-3   # the lasso strength; about 4 min
    python benchmarks/results/user_models/convnext_tiny_lasso.py 1e-4

The flow's model, data and loop (6 dense epochs, AdamW at lr 3e-3, batches of 32), then three epochs with
``fp.GroupLasso`` attached at the strength given: after each, the groups that are exact zeros and the median over
groups of ``||w_g||`` against its value before the first.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import user_models as um  # noqa: E402

import fxprune as fp  # noqa: E402


def main(strength: float) -> None:
    kind, model = um.build("convnext_tiny")
    x, y = um.data(kind)

    def train(m: torch.nn.Module, epochs: int) -> None:
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-3)
        m.train()
        for _ in range(epochs):
            for idx in torch.randperm(um.N).split(32):
                opt.zero_grad()
                F.cross_entropy(m(x[idx]), y[idx]).backward()
                opt.step()

    train(model, 6)
    reg = fp.GroupLasso(model, (x[:8],), strength=strength)
    start = reg.norms(model)
    print(f"strength {strength:g}: {reg.channels} group channels")
    for epoch in range(3):
        with reg.attach(model):
            train(model, 1)
        n = reg.norms(model)
        print(f"epoch {epoch + 1}: {int((n == 0).sum())} exact-zero groups, median ||w_g|| "
              f"{float((n / start.clamp_min(1e-12)).median()):.3f} of its start", flush=True)
    with torch.no_grad():
        model.eval()
        print(f"accuracy {float((model(x[:128]).argmax(-1) == y[:128]).float().mean()):.3f}")


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 1e-3)
