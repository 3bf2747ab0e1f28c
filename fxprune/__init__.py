"""fxprune: torch.fx passes that make pruned networks physically smaller, exactly."""
import warnings as _warnings

# torch >= 2.10 deprecates its own LeafSpec class and warns whenever copy or pickle rebuilds one (every deep copy
# of an exported graph does: its code generator holds pytree specs). The warning names torch's code, not the
# user's, and fxprune copies graphs in every pass: it is hidden where copyreg raises it, nowhere else.
_warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning,
                         module="copyreg")
from fxprune.api import analyze, capture, compile, mask, minimize, verify
from fxprune.cycle import SqueezeReleaseResult, squeeze_release
from fxprune.interop.lasso import GroupLasso, group_lasso
from fxprune.interop.module import minimize_module
from fxprune.interop.saving import load, save
from fxprune.interop.stream import StreamedResult, minimize_checkpoint
from fxprune.errors import CaptureError, CheckpointError, EquivalenceError, FxPruneError, InputError, LoadError, MaskError, UnsupportedError
from fxprune.passes.compensate_layernorm import compensate_layernorm
from fxprune.passes.mask import bake_masks, bake_masks_, hold_masks, hold_masks_, sparsity_schedule
from fxprune.passes.release import ReleaseReport, release

__all__ = ["capture", "analyze", "compile", "mask", "minimize", "minimize_module", "minimize_checkpoint", "StreamedResult", "verify", "compensate_layernorm", "release", "ReleaseReport", "squeeze_release",
           "SqueezeReleaseResult", "GroupLasso", "group_lasso", "hold_masks_", "bake_masks_", "hold_masks", "bake_masks", "sparsity_schedule",
           "FxPruneError", "CaptureError", "EquivalenceError",
           "InputError", "MaskError", "UnsupportedError", "LoadError", "CheckpointError", "save", "load"]
__version__ = "0.1.0"
