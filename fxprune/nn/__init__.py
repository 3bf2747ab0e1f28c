"""Modules fxprune's rewrites emit (and users may build by hand)."""
from fxprune.nn.norm import (CompensatedLayerNorm, CompensatedRMSNorm, compensated_layer_norm, compensated_rms_norm,
                             compensated_softmax)

__all__ = ["CompensatedLayerNorm", "CompensatedRMSNorm", "compensated_layer_norm", "compensated_rms_norm", "compensated_softmax"]
