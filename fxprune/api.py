"""The public entry points (``fxprune.capture``, ``analyze``, ``mask``, ``minimize``, ``verify``)."""
from __future__ import annotations

from torch.fx import GraphModule

from fxprune.analysis.groups import Analysis, ChannelGraph
from fxprune.errors import InputError
from fxprune.graph.capture import capture
from fxprune.graph.shapes import is_annotated
from fxprune.passes.lower import lower_modules
from fxprune.passes.mask import mask
from fxprune.passes.minimize import minimize
from fxprune.verify import verify

__all__ = ["capture", "analyze", "mask", "minimize", "verify"]


def analyze(gm: GraphModule) -> ChannelGraph:
    """The coupled channel groups of a captured graph (see :class:`ChannelGraph`)."""
    if not isinstance(gm, GraphModule):
        raise InputError(f"analyze takes a GraphModule from fp.capture, got {type(gm).__name__}")
    if not is_annotated(gm):
        raise InputError("the graph has no shape annotations: capture it with fp.capture(model, example_inputs)")
    return Analysis(lower_modules(gm)).channel_graph()
