"""Pure graph passes: each takes a GraphModule (or an ExportedProgram) and returns a new one, never touching its
input. ``MaskPass``, ``MinimizePass``, ``CompensateLayerNormPass`` and ``ReleasePass`` wrap them for
``torch.fx.passes.infra.pass_manager.PassManager``."""
from fxprune.passes.infra import CompensateLayerNormPass, MaskPass, MinimizePass, ReleasePass

__all__ = ["MaskPass", "MinimizePass", "CompensateLayerNormPass", "ReleasePass"]
