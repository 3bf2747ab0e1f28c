"""Stop 65: what of this stop's changes each model of benchmarks/user_models.py holds, read from one
``fp.minimize_module`` call on the dense model (eval mode, the flow's example batch, labels included), as the
flow's minimize steps see its graphs:

- STALE: values the graph writes into (directly or through a view) before a later read
  (``fxprune.analysis.rule.stale_reads``);
- INDEX: a symbolic trace's basic indexing of a tensor that ``lower_modules`` lowers to slices
  (``fxprune.passes.lower._tensor_index``);
- EINSUM: einsum calls (``fxprune.analysis.rules.Einsum``).

Prints "SCAN name stale=N index=N einsum=N" with the node names, and how the call ended.

    python benchmarks/results/user_models/graph_scan_stop65.py [NAME...]   (default: every model)
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
import torch  # noqa: E402,F401

import fxprune.analysis.groups as groups  # noqa: E402
import fxprune.passes.lower as lower  # noqa: E402
import user_models  # noqa: E402
from fxprune.analysis.rules import Einsum  # noqa: E402
from torchvision_zoo import stub_meta_registrations  # noqa: E402

stub_meta_registrations()
seen: dict[str, set[str]] = {"stale": set(), "index": set(), "einsum": set()}
stale_reads, tensor_index, couple = groups.stale_reads, lower._tensor_index, Einsum.couple


def recorded_stale(gm):
    out = stale_reads(gm)
    seen["stale"].update(n.name for n in out)
    return out


def recorded_index(n):
    out = tensor_index(n)
    if out:
        seen["index"].add(n.name)
    return out


def recorded_einsum(self, op, sp):
    seen["einsum"].add(op.node.name)
    return couple(self, op, sp)


groups.stale_reads, lower._tensor_index, Einsum.couple = recorded_stale, recorded_index, recorded_einsum
for name in sys.argv[1:] or user_models.names():
    for s in seen.values():
        s.clear()
    e = user_models.minimize_dense(name)
    how = "ok" if e is None else f"{type(e).__name__}: {str(e)[:150]}"
    print("SCAN", name, " ".join(f"{k}={len(v)} {','.join(sorted(v)[:8]) or '-'}" for k, v in seen.items()),
          how.replace("\n", " "), flush=True)
