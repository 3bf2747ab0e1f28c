"""Graph capture and shape annotation (the bottom layer: nothing here knows about channels)."""
from fxprune.graph.capture import capture
from fxprune.graph.shapes import TensorSpec, annotate, node_spec

__all__ = ["capture", "annotate", "node_spec", "TensorSpec"]
