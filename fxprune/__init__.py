"""fxprune: torch.fx passes that make pruned networks physically smaller, exactly."""
from fxprune.api import analyze, capture, mask, minimize, verify
from fxprune.errors import CaptureError, EquivalenceError, FxPruneError, InputError, MaskError, UnsupportedError

__all__ = ["capture", "analyze", "mask", "minimize", "verify", "FxPruneError", "CaptureError", "EquivalenceError",
           "InputError", "MaskError", "UnsupportedError"]
__version__ = "0.1.0"
