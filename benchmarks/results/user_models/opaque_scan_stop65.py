"""Stop 65: the ops without a channel rule (opaque: the analysis freezes every channel they touch) in each model of
benchmarks/user_models.py, read from one ``fp.minimize_module`` call on the dense model (eval mode, the flow's
example batch, labels included). Prints "OPAQUE name op:count ..." per model; the last line counts the models
each op appears in.

    python benchmarks/results/user_models/opaque_scan_stop65.py [NAME...]   (default: every model)
"""
import collections
import os
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
import torch  # noqa: E402,F401

import fxprune as fp  # noqa: E402
import user_models  # noqa: E402
from fxprune.analysis.table import RULES, target_name  # noqa: E402
from torchvision_zoo import stub_meta_registrations  # noqa: E402

stub_meta_registrations()
seen: dict[str, set[str]] = collections.defaultdict(set)
lookup = RULES.lookup


def recorded(node, gm):
    rule = lookup(node, gm)
    if rule is None and node.op in ("call_function", "call_method", "call_module"):
        what = type(gm.get_submodule(node.target)).__qualname__ if node.op == "call_module" else target_name(node.target)
        seen[what].add(node.name)
    return rule


RULES.lookup = recorded
EVERY = list(user_models.TRANSFORMERS) + list(user_models.PLAIN) + user_models.TORCHVISION + list(user_models.TIMM)
models_with: collections.Counter = collections.Counter()
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
        how = f"{type(e).__name__}: {str(e)[:100]}"
    models_with.update(list(seen))
    print("OPAQUE", name, " ".join(f"{k}:{len(v)}" for k, v in sorted(seen.items())) or "-", how.replace("\n", " "),
          flush=True)
print("MODELS WITH", " ".join(f"{k}:{n}" for k, n in models_with.most_common()), flush=True)
