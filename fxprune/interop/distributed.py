"""How ``squeeze_release`` keeps the ranks of a ``torch.distributed`` job on one model.

Training is the user's (``train`` may wrap the module in DistributedDataParallel). fxprune's passes are
deterministic functions of the graph and the weights, so every rank runs them on rank 0's weights; only rank 0 runs
``minimize``'s equivalence check. After each pass rank 0's tensors are broadcast into every rank's result, after an
all-reduce has confirmed that every rank built the same names and shapes. Every decision (which cycle model is
better, which one is kept) uses rank 0's accuracies, broadcast. Without an initialized process group (or with one
rank) every method is a no-op.
"""
from __future__ import annotations

import hashlib
from typing import Callable, TypeVar

import torch
from torch import nn

from fxprune.errors import EquivalenceError

__all__ = ["Ranks", "PeerFailedError"]

T = TypeVar("T")


class PeerFailedError(EquivalenceError):
    """Raised on the ranks whose own run passed when another rank's failed (:meth:`Ranks.run_all`): they stop too,
    rather than wait in a collective the failed rank never reaches."""


class Ranks:
    def __init__(self) -> None:
        import torch.distributed as dist
        self.dist = dist if dist.is_available() and dist.is_initialized() else None
        self.rank = self.dist.get_rank() if self.dist else 0
        self.world = self.dist.get_world_size() if self.dist else 1

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            self.dist.barrier()

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.dist.get_backend() == "nccl" else torch.device("cpu")

    def broadcast_float(self, x: float) -> float:
        """Rank 0's value of ``x`` on every rank."""
        if not self.active:
            return x
        t = torch.tensor([x], dtype=torch.float64, device=self._device())
        self.dist.broadcast(t, 0)
        return float(t.item())

    def broadcast_module(self, m: nn.Module, what: str) -> nn.Module:
        """Check that every rank holds the same tensor names and shapes, then copy rank 0's values into them."""
        if not self.active:
            return m
        state = m.state_dict(keep_vars=True)
        sig = hashlib.sha256(repr([(k, tuple(v.shape), str(v.dtype)) for k, v in state.items()]).encode()).digest()
        h = torch.tensor([int.from_bytes(sig[:7], "little")], dtype=torch.int64, device=self._device())
        lo, hi = h.clone(), h.clone()
        self.dist.all_reduce(lo, op=self.dist.ReduceOp.MIN)
        self.dist.all_reduce(hi, op=self.dist.ReduceOp.MAX)
        if lo.item() != hi.item():
            raise EquivalenceError(f"rank {self.rank}: the ranks built different models at {what} (different tensor "
                                   "names or shapes): they started from different weights or different code")
        with torch.no_grad():
            for t in state.values():
                buf = t.detach()
                moved = buf.to(self._device())
                self.dist.broadcast(moved, 0)
                if moved is not buf:
                    buf.copy_(moved)
        return m

    def run_all(self, fn: Callable[[], T], what: str) -> T:
        """Run ``fn`` (which may raise) and tell the other ranks whether rank 0's run failed, so that no rank waits
        in a collective while rank 0 has stopped."""
        err: BaseException | None = None
        try:
            out = fn()
        except BaseException as e:  # re-raised below, after the other ranks know
            err, out = e, None
        if self.active:
            flag = torch.tensor([1 if err is not None else 0], dtype=torch.int64, device=self._device())
            self.dist.all_reduce(flag, op=self.dist.ReduceOp.MAX)
            if flag.item() and err is None:
                raise PeerFailedError(f"rank {self.rank}: another rank failed at {what}; see its error")
        if err is not None:
            raise err
        return out
