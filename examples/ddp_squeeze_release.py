"""Squeeze-Release with data-parallel fine-tuning: torchrun, 2 processes, gloo on CPU.

    torchrun --standalone --nproc_per_node 2 examples/ddp_squeeze_release.py --out ddp.safetensors
    python examples/ddp_squeeze_release.py --out single.safetensors     # one process, the same global batch

Every rank builds the same model and data; each global batch of 64 is split between the ranks (rank r takes rows
r, r + world, ...), and DistributedDataParallel averages the gradients, so one step sees the same mean gradient as
one process on the whole batch, up to the order of the float additions. ``fp.squeeze_release`` keeps the ranks on
one model: the passes run on rank 0's weights, rank 0's tensors are broadcast after each, and rank 0's accuracies
make every decision (see fxprune/interop/distributed.py). Rank 0 writes the kept model (safetensors) and the history
(JSON beside it). In float64 the two commands above give the same kept shapes and weights equal to ~1e-12
(tests/test_ddp.py runs both and compares).
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import fxprune as fp


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="where rank 0 writes the kept model (safetensors)")
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--checkpoint-dir", default=None)
    a = ap.parse_args()
    distributed = "RANK" in os.environ  # set by torchrun
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same model on every rank
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0), torch.tensor(y)
    x_tr, y_tr, x_va, y_va = x[:1200], y[:1200], x[1200:], y[1200:]
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)).double()
    calls = [0]

    def train(m: nn.Module) -> nn.Module:
        calls[0] += 1
        g = torch.Generator().manual_seed(calls[0])  # the same global order on every rank
        net = DDP(m) if distributed else m
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        for _ in range(a.epochs):
            for batch in torch.randperm(len(x_tr), generator=g).split(64):
                mine = batch[rank::world]  # this rank's share of the global batch
                opt.zero_grad()
                F.cross_entropy(net(x_tr[mine]), y_tr[mine]).backward()
                opt.step()
        return m

    @torch.no_grad()
    def evaluate(m: nn.Module) -> float:
        return float((m(x_va).argmax(1) == y_va).float().mean())

    for _ in range(3):  # the dense model
        train(model)
    res = fp.squeeze_release(model, (x_tr[:8],), train=train, evaluate=evaluate, cycles=a.cycles, sparsity=0.9,
                             mask_steps=2, tolerance=0.02, progress=rank == 0, checkpoint_dir=a.checkpoint_dir)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in res.module.state_dict().items()}, a.out)
        with open(a.out + ".json", "w") as f:
            json.dump(dict(world=world, best_cycle=res.best_cycle,
                           history=[{k: v for k, v in h.items() if k != "seconds"} for h in res.history]), f)
        print(res.table())
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
