"""The boundary between the user's eager modules and fxprune's graphs (masks held outside the weights are read by
:mod:`fxprune.graph.masks`, below every layer that captures)."""
from fxprune.graph.masks import held_masks, unmasked

__all__ = ["held_masks", "unmasked"]  # (minimize_module: fxprune.interop.module, imported by fxprune itself)
