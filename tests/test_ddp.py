"""Masks held by hold_masks stay applied when the user's train wraps the model in DistributedDataParallel."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import fxprune as fp

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")


def _worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)  # the same model on every rank
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    gm = fp.mask(fp.capture(net, (torch.randn(4, 6),)), 0.75, scope="layer")
    masks = gm.meta["fxprune_masks"]
    held = fp.hold_masks(gm)
    ddp = DDP(held)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(100 + rank)  # different data per rank
    for _ in range(5):
        x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        opt.step()
    baked = fp.bake_masks(held)
    state = {n: p.detach().clone() for n, p in baked.named_parameters()}
    torch.save({"state": state, "masks": masks}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_masks_stay_applied_under_ddp(tmp_path):
    init = f"file://{tmp_path / 'store'}"
    out = str(tmp_path / "result")
    mp.spawn(_worker, args=(2, init, out), nprocs=2, join=True)
    r0, r1 = (torch.load(f"{out}.{r}") for r in range(2))
    assert r0["state"].keys() == r1["state"].keys()
    for name, p in r0["state"].items():
        assert torch.equal(p, r1["state"][name]), name  # replicas stayed in sync
    for name, m in r0["masks"].items():
        w = r0["state"][name]
        assert (w[~m] == 0).all(), name  # masked entries are still exact zeros
        assert (w[m] != 0).all(), name  # and the kept ones are weights
