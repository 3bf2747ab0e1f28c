"""List the ATen ops in the torch.export graphs of the reference transformers models.

    python scripts/list_aten_ops.py                 # print "model<TAB>op<TAB>count"
    python scripts/list_aten_ops.py --write FILE    # write the sorted op list (tests/data/aten_ops.txt)

tests/test_rule_table.py checks that FILE is current and that every op in it has a channel rule or is
deliberately opaque.
"""
from __future__ import annotations

import argparse
import collections
import warnings

import torch

from fxprune.zoo import TRANSFORMERS, build


def export_ops() -> dict[str, collections.Counter]:
    out = {}
    for name in TRANSFORMERS:
        model, inputs = build(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = torch.export.export(model, inputs, strict=False).module()
        ops: collections.Counter = collections.Counter()
        for sub in gm.modules():
            if isinstance(sub, torch.fx.GraphModule):
                ops.update(str(n.target) for n in sub.graph.nodes if n.op == "call_function")
        out[name] = ops
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", metavar="FILE")
    args = ap.parse_args()
    ops = export_ops()
    if args.write:
        names = sorted({op for c in ops.values() for op in c})
        with open(args.write, "w") as f:
            f.write("\n".join(names) + "\n")
        print(f"wrote {len(names)} ops to {args.write}")
        return
    for model, c in ops.items():
        for op, n in sorted(c.items()):
            print(f"{model}\t{op}\t{n}")


if __name__ == "__main__":
    main()
