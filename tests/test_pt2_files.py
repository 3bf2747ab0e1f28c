"""`.pt2` files of real models through the command line: transformers programs load, their dynamic dims survive,
other packages' pytree types need --import, a failed verification exits non-zero and writes nothing, and the
weights-only loading never leaks out of the call."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch
from torch.export import Dim

import fxprune as fp
from fxprune.cli import main
from fxprune.graph.exported import load_program
from test_dynamic import at, logits, planted

pytestmark = pytest.mark.filterwarnings("ignore")
HELPERS = pathlib.Path(__file__).parent / "helpers"


def cli(*argv: str, cwd: pathlib.Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(HELPERS)}
    return subprocess.run([sys.executable, "-m", "fxprune.cli", *argv], capture_output=True, text=True, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def gpt2_pt2(tmp_path_factory) -> pathlib.Path:
    model, (x,), _ = planted("gpt2")
    ds = ({0: Dim("batch", min=1, max=16), 1: Dim("seq", min=2, max=32)},)
    path = tmp_path_factory.mktemp("pt2") / "gpt2.pt2"
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=ds, strict=False), str(path))
    return path


def test_cli_minimizes_a_saved_gpt2_and_keeps_its_dims(gpt2_pt2, tmp_path):
    out = tmp_path / "small.pt2"
    proc = cli("minimize", str(gpt2_pt2), "-o", str(out))  # a fresh process: transformers' types load by themselves
    assert proc.returncode == 0, proc.stderr
    assert "EXACT" in proc.stdout and "shapes (1x1)" in proc.stdout
    small, orig = load_program(str(out)), load_program(str(gpt2_pt2))
    assert {str(k): str(v) for k, v in small.range_constraints.items()} == {str(k): str(v) for k, v in orig.range_constraints.items()}
    xi = at(torch.zeros(2, 16, dtype=torch.long), 3, 7)
    with torch.no_grad():
        a, b = logits(orig.module()(xi)), logits(small.module()(xi))
    assert float((a - b).abs().max() / a.abs().max()) <= 1e-9
    proc = cli("verify", str(gpt2_pt2), str(out))
    assert proc.returncode == 0, proc.stderr


def test_cli_minimize_exits_1_and_writes_nothing_when_verification_fails(gpt2_pt2, tmp_path, monkeypatch):
    real = fp.verify

    def failing(a, b, *args, **kwargs):
        rep = real(a, b, *args, **kwargs)
        rep.shapes[0].max_rel = 1.0  # as if the result differed at one shape
        return rep

    monkeypatch.setattr(fp, "verify", failing)
    out = tmp_path / "never.pt2"
    assert main(["minimize", str(gpt2_pt2), "-o", str(out)]) == 1
    assert not out.exists()


def test_other_packages_pytree_types_need_import(tmp_path):
    sys.path.insert(0, str(HELPERS))
    try:
        import pytree_box
    finally:
        sys.path.remove(str(HELPERS))
    path = tmp_path / "boxed.pt2"
    torch.export.save(torch.export.export(pytree_box.Boxed(), (torch.randn(3, 4),), strict=False), str(path))
    proc = cli("inspect", str(path))
    assert proc.returncode == 2
    assert "pytree_box.Box" in proc.stderr and "--import pytree_box" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = cli("--import", "pytree_box", "inspect", str(path))
    assert proc.returncode == 0, proc.stderr


def test_weights_only_loading_does_not_leak(gpt2_pt2):
    before = torch.load
    load_program(str(gpt2_pt2))
    assert torch.load is before
