"""Stop 65: which models of benchmarks/user_models.py hold values that their graph writes into (directly or through
a view) before a later read (``fxprune.analysis.rule.stale_reads``), read from one ``fp.minimize_module`` call on
the dense model (eval mode, the flow's example batch, labels included). Prints "STALE name count nodes|-" per
model and how the call ended.

    python benchmarks/results/user_models/stale_scan_stop65.py [NAME...]   (default: every model)
"""
import os
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
import torch  # noqa: E402,F401

import fxprune as fp  # noqa: E402
import fxprune.analysis.groups as groups  # noqa: E402
import user_models  # noqa: E402
from torchvision_zoo import stub_meta_registrations  # noqa: E402

stub_meta_registrations()
seen = set()
orig = groups.stale_reads


def recorded(gm):
    out = orig(gm)
    seen.update(n.name for n in out)
    return out


groups.stale_reads = recorded
EVERY = list(user_models.TRANSFORMERS) + list(user_models.PLAIN) + user_models.TORCHVISION + list(user_models.TIMM)
for name in sys.argv[1:] or EVERY:
    seen.clear()
    try:
        kind, model = user_models.build(name)
        x, y = user_models.data(kind)
        key = {"wav": "input_values", "mel": "input_features"}.get(kind, "input_ids")
        example = ((x[:8],) if kind in ("img", "plain_wav", "tab") else (x[:8, :-1],) if kind == "plain_lm"
                   else {key: x[:8], "labels": (x if kind in ("lm", "s2s") else y)[:8]})
        model.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fp.minimize_module(model, example)
        how = "ok"
    except Exception as e:  # noqa: BLE001
        how = f"{type(e).__name__}: {str(e)[:150]}"
    print("STALE", name, len(seen), " ".join(sorted(seen)[:12]) or "-", how.replace("\n", " "), flush=True)
