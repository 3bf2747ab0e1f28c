"""BatchNorm running statistics re-estimated from the batches a training loop fed the model.

A BatchNorm layer trains on each batch's own statistics and keeps, for eval mode, running averages of them
(``momentum`` 0.1: mostly the last few dozen batches, each taken with the weights of its own step). Where the
weights move fast, as in the fine-tune after a mask step or after ``release`` (capacity that starts near zero and
grows), those averages lag behind the weights the training ends with, and the lag compounds from layer to layer:
measured on the benchmark's ResNet (``docs/results.md``), a release fine-tune that reached a training loss of
0.047 in train mode scored 21% validation accuracy in eval mode, with the last stage's input means up to 3.7
running standard deviations away from the running statistics. Re-estimating them with the final weights (as
``torch.optim.swa_utils.update_bn`` does after weight averaging) gave 94%.

:class:`BatchRecorder` keeps the inputs of the last ``batches`` forward calls the model made in train mode (its
own copies); :func:`recalibrate_batchnorm` resets the running statistics of every ``BatchNorm`` module and
re-estimates them as the plain average over those batches (``momentum=None``), with the BatchNorm modules in
train mode and every other module in eval mode (dropout off: the statistics eval-mode inference sees), no
gradients, nothing else changed (``num_batches_tracked`` keeps its value).
``SyncBatchNorm`` is left alone (its train-mode forward synchronizes ranks).
"""
from __future__ import annotations

import collections
from typing import Any, Iterable

import torch
from torch import nn
from torch.utils._pytree import tree_map

from fxprune.compare import eval_modes
from fxprune.errors import require

__all__ = ["BatchRecorder", "recalibrate_batchnorm", "batchnorms"]


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm modules of ``model`` that keep running statistics (``SyncBatchNorm`` excluded)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and not isinstance(m, nn.SyncBatchNorm) and m.track_running_stats and m.running_mean is not None]


class BatchRecorder:
    """``with BatchRecorder(model, batches) as rec:`` keeps, in ``rec.batches``, the ``(args, kwargs)`` of the
    last ``batches`` calls of ``model`` made while it was in train mode (tensors copied, detached)."""

    def __init__(self, model: nn.Module, batches: int = 16) -> None:
        require("batches", batches, "positive integer")
        self.model, self.batches = model, collections.deque(maxlen=batches)
        self._hook: Any = None

    def _record(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if module.training:
            self.batches.append(tree_map(lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v,
                                         (args, kwargs)))

    def __enter__(self) -> "BatchRecorder":
        self._hook = self.model.register_forward_pre_hook(self._record, with_kwargs=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hook.remove()


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[tuple[tuple[Any, ...], dict[str, Any]]]) -> int:
    """Re-estimate, in place, the running mean and variance of ``model``'s BatchNorm modules as the average over
    ``batches`` (``(args, kwargs)`` pairs, each one call of ``model``), BatchNorm in train mode and every other
    module in eval mode; every module's mode is restored after, and the running statistics too if a call raises.
    Returns the number of batches used (0: nothing changed, for a model without BatchNorm or no batches)."""
    bns, batches = batchnorms(model), list(batches)
    if not bns or not batches:
        return 0
    kept = {bn: (bn.momentum, bn.num_batches_tracked.clone(), bn.running_mean.clone(), bn.running_var.clone())
            for bn in bns}
    ok = False
    try:
        with eval_modes(model):
            for bn in bns:
                bn.reset_running_stats()
                bn.momentum = None  # the cumulative average
                bn.training = True
            for args, kwargs in batches:
                model(*args, **kwargs)
        ok = True
    finally:
        for bn, (momentum, tracked, mean, var) in kept.items():
            bn.momentum = momentum
            bn.num_batches_tracked.copy_(tracked)
            if not ok:
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
    return len(batches)
