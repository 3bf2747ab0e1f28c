"""The public entry points (``fxprune.capture``, ``analyze``, ``mask``, ``minimize``, ``verify``)."""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import torch
from torch.fx import GraphModule

from fxprune.graph.scan import fresh
from fxprune.analysis.groups import Analysis, ChannelGraph
from fxprune.errors import InputError
from fxprune.graph.capture import EXAMPLE_INPUTS_KEY, capture, model_call
from fxprune.graph.exported import program_inputs
from fxprune.graph.shapes import is_annotated
from fxprune.passes.lower import lower_modules
from fxprune.passes.mask import mask
from fxprune.passes.minimize import minimize
from fxprune.verify import verify

__all__ = ["capture", "analyze", "mask", "minimize", "verify", "compile"]


def analyze(gm: GraphModule) -> ChannelGraph:
    """The coupled channel groups of a captured graph or an ExportedProgram (see :class:`ChannelGraph`)."""
    if isinstance(gm, torch.export.ExportedProgram):
        gm = capture(gm, program_inputs(gm))
    if not isinstance(gm, GraphModule):
        raise InputError(f"analyze takes a GraphModule from fp.capture, got {type(gm).__name__}")
    if not is_annotated(gm):
        raise InputError("the graph has no shape annotations: capture it with fp.capture(model, example_inputs)")
    fresh()  # read the weights as they are now
    return Analysis(lower_modules(gm)).channel_graph()


def compile(model: Any, example_inputs: Sequence[Any], *, sparsity: float | None = None, backend: str = "inductor",
            **compile_kwargs: Any) -> Callable[..., Any]:
    """The compile-time entry: capture ``model``, mask it to ``sparsity`` (when given), minimize it (self-check
    included), and hand the smaller graph to ``torch.compile(..., backend=backend)``.

    The result is called as ``model`` is: positional or keyword inputs (``fast(**batch)``), defaults left out.
    Limits: the rewrite happens once, here, for the shapes of ``example_inputs`` (torch.compile may still
    recompile the small model for other shapes, exactly as it would the original); a model that changes its
    weights later is not re-minimized. A ``torch.compile`` backend proper cannot do this job: Dynamo passes
    parameters to backends as graph inputs, and a rewrite may not change the shapes of its inputs.

    >>> import torch, fxprune as fp
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> with torch.no_grad(): net[0].weight[:5] = 0; net[0].bias[:5] = -1.0
    >>> x = torch.randn(3, 4)
    >>> fast = fp.compile(net, (x,), backend="eager")
    >>> torch.allclose(fast(x), net(x))
    True
    """
    gm = capture(model, example_inputs)
    if sparsity is not None:
        gm = mask(gm, sparsity)
    fast = torch.compile(minimize(gm), backend=backend, **compile_kwargs)
    if not isinstance(model, torch.nn.Module) or isinstance(model, GraphModule):
        return fast
    place = model_call(model, gm.meta[EXAMPLE_INPUTS_KEY])  # the graph takes its inputs positionally

    @functools.wraps(fast)
    def run(*args: Any, **kwargs: Any) -> Any:
        return fast(*place(*args, **kwargs))

    return run
