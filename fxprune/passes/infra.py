"""The passes as ``torch.fx.passes.infra`` passes, for ``PassManager`` pipelines.

    from torch.fx.passes.infra.pass_manager import PassManager
    from fxprune.passes import MaskPass, MinimizePass
    result = PassManager([MaskPass(0.9), MinimizePass()])(gm)

Each adapter returns a ``PassResult`` holding a new module (the passes are pure) and an honest ``modified`` flag:
True only when the returned module differs from the given one in its number of calls, its tensors' names, shapes
or values (lowering modules to functional calls, which every pass does, does not count).
``ensures`` checks the module the pass *returned* (``PassBase.__call__`` would check the one it was given): the
graph lints and the module runs on the example inputs recorded at capture.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxprune.errors import InputError
from fxprune.graph.capture import EXAMPLE_INPUTS_KEY
from fxprune.passes.compensate_layernorm import compensate_layernorm
from fxprune.passes.mask import mask
from fxprune.passes.minimize import minimize
from fxprune.passes.release import ReleaseReport, release

__all__ = ["MaskPass", "MinimizePass", "CompensateLayerNormPass", "ReleasePass"]


def _calls(m: nn.Module) -> int:
    return sum(n.op.startswith("call_") for n in m.graph.nodes) if isinstance(m, GraphModule) else 0


def _same(a: nn.Module, b: nn.Module) -> bool:
    """Same tensors (names, shapes, dtypes, values) and as many calls. Lowering ``call_module`` nodes to their
    functional form, which every pass does first, is not a modification."""
    sa, sb = a.state_dict(), b.state_dict()
    return _calls(a) == _calls(b) and sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


class _FxPrunePass(PassBase):
    """Runs ``self.run(gm)``, reports whether anything changed, checks what it returns."""

    def run(self, gm: GraphModule) -> GraphModule:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, graph_module: GraphModule) -> PassResult:
        self.requires(graph_module)
        res = self.call(graph_module)
        self.ensures(res.graph_module)
        return res

    def requires(self, graph_module: GraphModule) -> None:
        if not isinstance(graph_module, GraphModule):
            raise InputError(f"{type(self).__name__} takes a GraphModule from fp.capture, got {type(graph_module).__name__}")

    def call(self, graph_module: GraphModule) -> PassResult:
        out = self.run(graph_module)
        return PassResult(out, not _same(graph_module, out))

    def ensures(self, graph_module: GraphModule) -> None:
        graph_module.graph.lint()
        inputs = graph_module.meta.get(EXAMPLE_INPUTS_KEY)
        if inputs is not None:
            with torch.no_grad():
                graph_module(*inputs)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class MaskPass(_FxPrunePass):
    """:func:`fxprune.mask` as a pass; arguments as there."""

    def __init__(self, sparsity: float | None = None, **kwargs: Any) -> None:
        self.sparsity, self.kwargs = sparsity, kwargs

    def run(self, gm: GraphModule) -> GraphModule:
        return mask(gm, self.sparsity, **self.kwargs)


class MinimizePass(_FxPrunePass):
    """:func:`fxprune.minimize` as a pass (self-check included); arguments as there."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs

    def run(self, gm: GraphModule) -> GraphModule:
        return minimize(gm, **self.kwargs)


class CompensateLayerNormPass(_FxPrunePass):
    """:func:`fxprune.compensate_layernorm` as a pass."""

    def run(self, gm: GraphModule) -> GraphModule:
        return compensate_layernorm(gm)


class ReleasePass(_FxPrunePass):
    """:func:`fxprune.release` as a pass; the last report is kept in ``self.report``."""

    def __init__(self, scale: float = 0.01, **kwargs: Any) -> None:
        self.scale, self.kwargs, self.report = scale, kwargs, None

    def run(self, gm: GraphModule) -> GraphModule:
        out = release(gm, self.scale, **self.kwargs)
        self.report = ReleaseReport.of(out)
        return out
