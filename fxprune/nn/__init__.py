"""Modules fxprune's rewrites emit (and users may build by hand)."""
from fxprune.nn.inputs import SelectedInputs, selected_subclass
from fxprune.nn.norm import (CompensatedGroupNorm, CompensatedLayerNorm, CompensatedRMSNorm, compensated_group_norm,
                             compensated_layer_norm, compensated_rms_norm, compensated_softmax)
from fxprune.nn.stdconv import CompensatedStdConv2d, compensated_standardization

__all__ = ["CompensatedLayerNorm", "CompensatedGroupNorm", "CompensatedRMSNorm", "compensated_layer_norm",
           "compensated_group_norm", "compensated_rms_norm", "compensated_softmax", "SelectedInputs",
           "selected_subclass", "CompensatedStdConv2d", "compensated_standardization"]
