"""Stop 65: the ops without a channel rule (opaque: the analysis freezes every channel they touch) in each model of
benchmarks/user_models.py, read from one ``fp.minimize_module`` call on the dense model (eval mode, the flow's
example batch, labels included). Prints "OPAQUE name op:count ..." per model; the last line counts the models
each op appears in.

    python benchmarks/results/user_models/opaque_scan_stop65.py [NAME...]   (default: every model)
"""
import collections
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
import torch  # noqa: E402,F401

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
models_with: collections.Counter = collections.Counter()
for name in sys.argv[1:] or user_models.names():
    seen.clear()
    e = user_models.minimize_dense(name)
    how = "ok" if e is None else f"{type(e).__name__}: {str(e)[:100]}"
    models_with.update(list(seen))
    print("OPAQUE", name, " ".join(f"{k}:{len(v)}" for k, v in sorted(seen.items())) or "-", how.replace("\n", " "),
          flush=True)
print("MODELS WITH", " ".join(f"{k}:{n}" for k, n in models_with.most_common()), flush=True)
