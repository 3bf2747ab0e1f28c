"""Masks held by hold_masks_ stay applied when the user's train wraps the model in DistributedDataParallel, and
squeeze_release under torchrun gives one process's result."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel as DDP

import fxprune as fp

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")


def _worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)  # the same model on every rank
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    gm = fp.mask(fp.capture(net, (torch.randn(4, 6),)), 0.75, scope="layer")
    masks = gm.meta["fxprune_masks"]
    held = fp.hold_masks_(gm)
    ddp = DDP(held)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(100 + rank)  # different data per rank
    for _ in range(5):
        x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        opt.step()
    baked = fp.bake_masks_(held)
    state = {n: p.detach().clone() for n, p in baked.named_parameters()}
    torch.save({"state": state, "masks": masks}, f"{out}.{rank}")
    del ddp, opt  # DDP's reducer holds the process group: release it first, then leave together
    dist.barrier()
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


EXAMPLE = Path(__file__).parent.parent / "examples" / "ddp_squeeze_release.py"


def test_squeeze_release_under_torchrun_matches_one_process(tmp_path):
    """examples/ddp_squeeze_release.py: 2 ranks (gloo) and 1 process with the same global batch give the same kept
    shapes, history and, in float64, weights equal to rounding; every rank wrote its RNG states."""
    pytest.importorskip("sklearn", reason="the example trains on scikit-learn's digits")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(EXAMPLE), "--out", str(tmp_path / "ddp.safetensors"), "--checkpoint-dir",
                          str(tmp_path / "ck")], capture_output=True, text=True, timeout=600, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, str(EXAMPLE), "--out", str(tmp_path / "one.safetensors")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = load_file(str(tmp_path / "ddp.safetensors")), load_file(str(tmp_path / "one.safetensors"))
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-9
    ha, hb = (json.loads((tmp_path / f"{n}.safetensors.json").read_text()) for n in ("ddp", "one"))
    assert ha["world"] == 2 and hb["world"] == 1
    assert [h["params"] for h in ha["history"]] == [h["params"] for h in hb["history"]]
    assert ha["best_cycle"] == hb["best_cycle"] is not None
    # smaller than dense (the parameters: the first layer's kept_inputs, the input pixels it reads, is a buffer)
    assert sum(v.numel() for v in a.values() if v.is_floating_point()) == ha["history"][ha["best_cycle"] - 1]["params"]
    for cycle in (tmp_path / "ck").glob("cycle-*"):
        assert sorted(p.name for p in cycle.glob("rng-rank*.json")) == ["rng-rank0.json", "rng-rank1.json"]
