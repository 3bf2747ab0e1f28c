"""Stop 59: which models of benchmarks/user_models.py have dims their capture holds static but the model takes at
other sizes (``fxprune.graph.dynamic.free_shapes``), and how many second captures ``minimize_module`` made
(``_captured_beyond``: where the graph does not propagate at such sizes), read from one ``fp.minimize_module``
call on the dense model (built as the flow builds it, its example batch). Prints "FREE name shapes|none
captures=N", how the call ended ("ok", or the error) and its time.

    python benchmarks/results/user_models/free_scan.py NAME...
"""
import os
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
import torch  # noqa: E402

import fxprune as fp  # noqa: E402
import fxprune.interop.module as mod  # noqa: E402
import user_models  # noqa: E402
from torchvision_zoo import stub_meta_registrations  # noqa: E402

stub_meta_registrations()  # (before transformers imports torchvision: PYTHONPATH=.venv/torchvision for its models)

seen, second = [], []
orig, orig_second = mod.free_shapes, getattr(mod, "_captured_beyond", None)


def recorded(*a, **k):
    out = orig(*a, **k)
    seen.append(out)
    return out


def captured(*a, **k):
    out = orig_second(*a, **k)
    second.extend(out)
    return out


mod.free_shapes = recorded
if orig_second is not None:
    mod._captured_beyond = captured
for name in sys.argv[1:]:
    kind, model = user_models.build(name)
    x, y = user_models.data(kind)
    key = {"wav": "input_values", "mel": "input_features"}.get(kind, "input_ids")
    example = ((x[:8],) if kind in ("img", "plain_wav", "tab") else (x[:8, :-1],) if kind == "plain_lm"
               else {key: x[:8]})
    model.eval()
    seen.clear()
    second.clear()
    t = time.time()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fp.minimize_module(model, example)
        how = "ok"
    except Exception as e:  # noqa: BLE001
        how = f"{type(e).__name__}: {str(e)[:200]}"
    shapes = seen[0] if seen else None
    print("FREE", name, shapes or "none", f"captures={len(second)}", how, f"{time.time() - t:.1f}s", flush=True)
