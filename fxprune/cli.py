"""The ``fxprune`` command: minimize, verify and inspect ``.pt2`` files (``torch.export.save`` archives).

    fxprune [--import MODULE] minimize IN.pt2 -o OUT.pt2 [--sparsity S] [--report REPORT.json]
                                        # exit 1 and nothing written when the verification fails
    fxprune verify A.pt2 B.pt2          # exit 0: equivalent, 1: not (the error table says where)
    fxprune inspect IN.pt2              # the channel groups: size, members, frozen and why
    fxprune demo                        # export, mask, minimize, verify an embedded CNN

Files are read with ``torch.export.load`` only, with every ``torch.load`` inside it held to
``weights_only=True`` (torch.export.load would otherwise retry unsafe unpickling when the safe loader refuses a
part of the archive), after :func:`~fxprune.graph.exported.check_archive` has refused every entry that only a full
unpickler could read (opaque and custom-object constants, compiled code, payloads the weights-only unpickler
refuses): a crafted file cannot run code. Programs whose inputs or outputs are transformers' output
classes load when transformers is installed; another package's pytree types need ``--import PACKAGE``. The
input program's dynamic dims are kept in the output. Bad input (a missing file, a file that is not a .pt2 archive, a program that does not run on its
own example inputs) exits with status 2 and a one-line message. Progress goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import warnings
import zipfile
from typing import Any, Sequence

import torch

from fxprune.errors import FxPruneError
from fxprune.graph.exported import load_program

__all__ = ["main"]


class CliError(Exception):
    """Bad input on the command line: printed as one line, exit status 2."""


def _say(msg: str) -> None:
    print(f"[fxprune] {msg}", file=sys.stderr, flush=True)


def load(path: str, imports: Sequence[str] = ()) -> torch.export.ExportedProgram:
    """``torch.export.load`` with the checks that turn bad files into one-line errors."""
    if not os.path.isfile(path):
        raise CliError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise CliError(f"{path}: not a .pt2 archive (expected a file written by torch.export.save)")
    try:
        ep = load_program(path, imports)
    except FxPruneError as e:
        raise CliError(f"{path}: {e}") from e
    except Exception as e:
        raise CliError(f"{path}: torch.export.load could not read it ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    return ep


def _minimize(a: argparse.Namespace) -> int:
    import fxprune as fp

    t0 = time.perf_counter()
    _say(f"loading {a.input}")
    prog = load(a.input, a.imports)
    if a.sparsity is not None:
        _say(f"masking to sparsity {a.sparsity}" + (" (whole channels)" if a.structure == "groups" else ""))
        prog = fp.mask(prog, a.sparsity, structure=a.structure, target=a.target)
    _say("minimizing (with its self-check)" + (f", widths rounded up to multiples of {a.round_to}" if a.round_to > 1 else ""))
    small = fp.minimize(prog, round_to=a.round_to)
    _say("verifying")
    rep = fp.verify(prog, small)
    print(rep)
    if rep.ok:
        _say(f"saving {a.output}")
        torch.export.save(small, a.output)
    else:
        _say(f"verification failed: {a.output} not written")
    before, after = rep.params
    report = dict(input=a.input, output=a.output if rep.ok else None, sparsity=a.sparsity, params_before=before,
                  params_after=after, ratio=before / after, max_rel=rep.max_rel, ok=rep.ok,
                  shapes=[dict(shapes=c.shapes, max_rel=c.max_rel) for c in rep.shapes],
                  dynamic=str(small.range_constraints), seconds=round(time.perf_counter() - t0, 3))
    if a.report:
        with open(a.report, "w") as f:
            json.dump(report, f, indent=2)
        _say(f"report written to {a.report}")
    return 0 if rep.ok else 1


def _verify(a: argparse.Namespace) -> int:
    import fxprune as fp

    ea, eb = load(a.a, a.imports), load(a.b, a.imports)
    rep = fp.verify(ea, eb)
    print(rep)
    return 0 if rep.ok else 1


def _inspect(a: argparse.Namespace) -> int:
    import fxprune as fp

    print(fp.analyze(load(a.input, a.imports)))
    return 0


def _demo(a: argparse.Namespace) -> int:
    import fxprune as fp
    from fxprune import zoo

    model, inputs = zoo.build("cnn")
    _say("exporting the embedded CNN (conv + BatchNorm, concatenation, pooling, flatten -> linear)")
    ep = torch.export.export(model, inputs, strict=False)
    _say(f"masking to sparsity {a.sparsity} and minimizing")
    masked = fp.mask(ep, a.sparsity)
    small = fp.minimize(masked)
    print(fp.verify(masked, small))
    return 0


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fxprune", description="Make pruned networks physically smaller, exactly.")
    ap.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                    help="import MODULE first (a package whose pytree types the programs use); repeatable")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("minimize", help="remove every channel that cannot change the output")
    p.add_argument("input", help="a .pt2 file (torch.export.save)")
    p.add_argument("-o", "--output", required=True, help="where to write the minimized .pt2")
    p.add_argument("--sparsity", type=float, default=None, help="magnitude-mask to this sparsity first")
    p.add_argument("--structure", choices=["weights", "groups"], default="weights",
                   help="with --sparsity: single weights, or whole channels of fxprune's groups (sparsity is then "
                        "the fraction of parameters minimize removes)")
    p.add_argument("--target", choices=["params", "flops"], default="params",
                   help="with --structure groups: sparsity is the fraction of the parameters, or of the FLOPs, removed")
    p.add_argument("--round-to", type=int, default=1, metavar="K",
                   help="keep a multiple of K channels in every group that loses channels (8 or 16 for blocked CPU kernels)")
    p.add_argument("--report", default=None, help="write a JSON report here")
    p.set_defaults(run=_minimize)
    p = sub.add_parser("verify", help="check two programs compute the same function")
    p.add_argument("a")
    p.add_argument("b")
    p.set_defaults(run=_verify)
    p = sub.add_parser("inspect", help="print the coupled channel groups")
    p.add_argument("input")
    p.set_defaults(run=_inspect)
    p = sub.add_parser("demo", help="the main job on an embedded model")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.set_defaults(run=_demo)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's own deprecation chatter on load/export
    if hasattr(signal, "SIGPIPE") and argv is None:
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `fxprune inspect x.pt2 | head` ends quietly
    a = _parser().parse_args(argv)
    try:
        return a.run(a)
    except (CliError, FxPruneError) as e:
        print(f"fxprune {a.command}: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
