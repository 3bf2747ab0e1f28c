"""Stop 66: the parameter channels free in the two captures fxprune reads a model through: the static one the masks
and the group lasso read (`eval_capture`) and the one `minimize_module` reads (every dim the class lets vary dynamic).
Prints per model how many (tensor, dim, index) channels each leaves free and how many only one does.

    python benchmarks/results/user_models/captures_stop66.py NAME...   (models of benchmarks/user_models.py)
"""
import sys, collections, warnings
import os
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))
warnings.filterwarnings("ignore")
import torch, fxprune as fp
import user_models as um
from fxprune.graph.capture import capture, as_inputs
from fxprune.interop.module import cache_off, eval_capture, eval_modes
from fxprune.analysis.groups import Analysis, param_slices
from fxprune.passes.lower import lower_modules
def free_param_channels(gm, names):
    an = Analysis(lower_modules(gm))
    slices, leaves = param_slices(an, names)
    out = set()
    for s in slices:
        for i, c in enumerate(s.channel.tolist()):
            if c >= 0:
                out.add((s.name, s.dim, i))
    return out
for name in sys.argv[1:]:
    kind, model = um.build(name)
    x, y = um.data(kind)
    model.eval()
    inp = um.example_inputs(kind, x, y)
    names = {n for n, _ in model.named_parameters()}
    a = free_param_channels(eval_capture(model, inp), names)
    with cache_off(model):
        gm = capture(model, as_inputs(inp, model), dynamic_shapes="every")
    b = free_param_channels(gm, names)
    diff = collections.Counter((n, d) for n, d, i in a - b)
    diff2 = collections.Counter((n, d) for n, d, i in b - a)
    print(name, "static free", len(a), "every free", len(b), "static-only", sum(diff.values()), "every-only", sum(diff2.values()), flush=True)
    for k, v in list(diff.items())[:8]: print("    static-only", k, v)
    for k, v in list(diff2.items())[:4]: print("    every-only", k, v)
