"""ExportedProgram in/out for every pass, PassManager adapters, the command line, ONNX parity, fp.compile, and
the snippets of docs/export-pipelines.md."""
from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

import pytest
import torch
from torch.fx.passes.infra.pass_manager import PassManager

import fxprune as fp
from conftest import graph_state, snapshot
from fxprune import zoo
from fxprune.cli import main
from fxprune.graph.exported import load_program
from fxprune.passes import CompensateLayerNormPass, MaskPass, MinimizePass, ReleasePass
from fxprune.verify import count_params

DOC = pathlib.Path(__file__).parent.parent / "docs" / "export-pipelines.md"


def planted_mlp() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    model, (x,) = zoo.build("residual_mlp")
    model = model.double()
    with torch.no_grad():
        model.blocks[0][0].weight[::2] = 0  # dead hidden units
    return model, (x.double(),)


def program_is_consistent(ep: torch.export.ExportedProgram) -> None:
    """Graph signature, state dict and node metadata agree, and the program survives save/load."""
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    for spec in ep.graph_signature.input_specs:
        if spec.target is not None and spec.target in ep.state_dict:
            val = placeholders[spec.arg.name].meta["val"]
            assert tuple(val.shape) == tuple(ep.state_dict[spec.target].shape), spec.target
    assert all("val" in n.meta for n in ep.graph.nodes if n.op in ("placeholder", "call_function"))


@pytest.mark.parametrize("name", ["mask", "minimize", "compensate_layernorm", "release"])
def test_every_pass_takes_and_returns_an_exported_program(name, tmp_path):
    model, inputs = planted_mlp()
    ep = torch.export.export(model, inputs, strict=False)
    before = snapshot(ep.module())
    run = {"mask": lambda p: fp.mask(p, 0.5), "minimize": fp.minimize, "compensate_layernorm": fp.compensate_layernorm,
           "release": lambda p: fp.release(fp.mask(p, 0.5), 0.01, seed=0)}[name]
    out = run(ep)
    assert isinstance(out, torch.export.ExportedProgram)
    assert snapshot(ep.module()) == before  # the input program is untouched
    program_is_consistent(out)
    torch.export.save(out, tmp_path / "out.pt2")
    back = torch.export.load(tmp_path / "out.pt2")
    assert torch.equal(back.module()(*inputs), out.module()(*inputs))
    if name == "minimize":
        assert count_params(out.module()) < count_params(model)
        assert fp.verify(ep, out).max_rel["float64"] <= 1e-9
    if name == "compensate_layernorm":
        assert fp.verify(ep, out).ok


def test_release_on_a_program_returns_the_program_and_its_report():
    model, inputs = planted_mlp()
    ep = fp.mask(torch.export.export(model, inputs, strict=False), 0.5)
    freed = fp.release(ep, 0.01, seed=0)
    report = fp.ReleaseReport.of(freed)
    assert isinstance(freed, torch.export.ExportedProgram) and report.total > 0


def test_a_program_exported_with_keyword_inputs_comes_back_with_the_same_keywords(tmp_path):
    """transformers programs are often exported with ``kwargs=batch``: the passes take them (the graph places the
    keyword inputs positionally inside) and the result is called with the same keywords, at other shapes too."""
    transformers = pytest.importorskip("transformers", reason="the model comes from transformers (dev dependency)")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, num_labels=3)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).double().eval()
    with torch.no_grad():
        model.bert.encoder.layer[0].intermediate.dense.weight[:8] = 0.0  # 8 of 32 units dead
        model.bert.encoder.layer[0].intermediate.dense.bias[:8] = -5.0
    batch = dict(attention_mask=torch.ones(2, 7, dtype=torch.long), input_ids=torch.randint(0, 50, (2, 7)))
    B, S = torch.export.Dim("B", min=1, max=64), torch.export.Dim("S", min=2, max=32)
    spec = dict(input_ids={0: B, 1: S}, attention_mask={0: B, 1: S})
    ep = torch.export.export(model, (), kwargs=batch, dynamic_shapes=spec, strict=False)
    before, graph_before = snapshot(ep.module()), graph_state(ep.graph_module)
    out = fp.minimize(ep)
    assert snapshot(ep.module()) == before and graph_state(ep.graph_module) == graph_before  # node.meta too
    assert ep.module()(**batch).logits.shape == (2, 3)  # its own module still takes the keywords
    assert set(out.example_inputs[1]) == set(batch) and out.example_inputs[0] == ()
    assert count_params(out.module()) <= count_params(model) - 8 * 2 * 16
    other = dict(input_ids=torch.randint(0, 50, (5, 11)), attention_mask=torch.ones(5, 11, dtype=torch.long))
    torch.testing.assert_close(out.module()(**other).logits, model(**other).logits, rtol=1e-9, atol=1e-12)
    assert fp.verify(ep, out).max_rel["float64"] <= 1e-9
    torch.export.save(out, tmp_path / "out.pt2")
    back = load_program(str(tmp_path / "out.pt2"))
    torch.testing.assert_close(back.module()(**other).logits, model(**other).logits, rtol=1e-9, atol=1e-12)
    result = PassManager([MinimizePass()])(fp.capture(ep, batch))  # the pipeline adapter on its graph
    assert count_params(result.graph_module) == count_params(out.module())
    with pytest.raises(fp.InputError, match="pass exactly its keywords"):
        fp.capture(ep, dict(input_ids=batch["input_ids"]))
    mixed = torch.export.export(model, (batch["input_ids"],), kwargs=dict(attention_mask=batch["attention_mask"]),
                                strict=False)  # positional and keyword inputs at once
    small = fp.minimize(mixed)
    x = batch["input_ids"]
    torch.testing.assert_close(small.module()(x, attention_mask=batch["attention_mask"]).logits,
                               model(x, attention_mask=batch["attention_mask"]).logits, rtol=1e-9, atol=1e-12)


def test_program_without_usable_example_inputs_is_refused():
    model, inputs = planted_mlp()
    ep = torch.export.export(model, inputs, strict=False)
    ep._example_inputs = None
    with pytest.raises(fp.InputError, match="carries no example inputs"):
        fp.minimize(ep)


def test_pass_manager_adapters_report_honestly_and_check_what_they_return():
    model, inputs = planted_mlp()
    gm = fp.capture(model, inputs)
    res = PassManager([MaskPass(0.5), MinimizePass(), CompensateLayerNormPass(), ReleasePass(0.01, seed=0)])(gm)
    assert res.modified and res.graph_module is not gm
    assert MinimizePass()(gm).modified  # the planted units go
    dense = fp.capture(zoo.build("residual_mlp")[0], zoo.build("residual_mlp")[1])
    assert not MinimizePass()(dense).modified  # nothing to remove: not modified, though lowered
    assert not MaskPass(0.0)(dense).modified and MaskPass(0.5)(dense).modified
    assert not CompensateLayerNormPass()(dense).modified

    class Broken(MinimizePass):
        def run(self, g):
            out = super().run(g)
            out.meta = {**out.meta, "fxprune_example_inputs": (torch.randn(2, 3),)}  # wrong width
            return out

    with pytest.raises(RuntimeError):
        Broken()(gm)  # ensures() runs the module the pass returned


# ------------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def pt2(tmp_path):
    model, inputs = planted_mlp()
    path = tmp_path / "in.pt2"
    torch.export.save(torch.export.export(model, inputs, strict=False), path)
    return path


def test_cli_minimize_then_verify_its_output(pt2, tmp_path, capsys):
    out, report = tmp_path / "out.pt2", tmp_path / "report.json"
    assert main(["minimize", str(pt2), "-o", str(out), "--report", str(report)]) == 0
    rep = json.loads(report.read_text())
    assert rep["params_after"] < rep["params_before"] and rep["ok"]
    assert main(["verify", str(pt2), str(out)]) == 0
    assert "EXACT" in capsys.readouterr().out
    masked = tmp_path / "masked.pt2"
    assert main(["minimize", str(pt2), "-o", str(masked), "--sparsity", "0.9"]) == 0
    assert main(["verify", str(pt2), str(masked)]) == 1  # masking changed the function
    assert "NOT EQUIVALENT" in capsys.readouterr().out


def test_cli_inspect_and_demo(pt2, capsys):
    assert main(["inspect", str(pt2)]) == 0
    assert "frozen" in capsys.readouterr().out
    assert main(["demo"]) == 0
    assert "smaller" in capsys.readouterr().out


@pytest.mark.parametrize("content, args, message", [
    (None, ["inspect", "{missing}"], "no such file"),
    (b"\x00garbage" * 50, ["inspect", "{file}"], "not a .pt2 archive"),
    (b"PK\x03\x04" + b"\x00" * 100, ["verify", "{file}", "{file}"], "not a .pt2 archive"),
])
def test_cli_bad_files_exit_2_with_one_line(tmp_path, content, args, message):
    f = tmp_path / "bad.pt2"
    if content is not None:
        f.write_bytes(content)
    argv = [a.format(missing=tmp_path / "nope.pt2", file=f) for a in args]
    proc = subprocess.run([sys.executable, "-m", "fxprune.cli", *argv], capture_output=True, text=True)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


class _RunsCode:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


def test_cli_refuses_archives_that_would_run_code(pt2, tmp_path, monkeypatch):
    """torch.export.load unpickles the sample inputs and retries with weights_only=False when the safe loader
    refuses; fxprune holds every load inside it to weights_only=True."""
    import io
    import zipfile

    evil = tmp_path / "evil.pt2"
    buf = io.BytesIO()
    torch.save(_RunsCode(), buf)
    with zipfile.ZipFile(pt2) as src, zipfile.ZipFile(evil, "w") as dst:
        for item in src.infolist():
            data = buf.getvalue() if item.filename.endswith("sample_inputs/model.pt") else src.read(item)
            dst.writestr(item, data)
    monkeypatch.chdir(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "fxprune.cli", "inspect", str(evil)], capture_output=True, text=True)
    assert not (tmp_path / "pwned").exists()
    assert proc.returncode == 2 and "refused" in proc.stderr and "sample_inputs" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_bad_sparsity_exits_2(pt2, tmp_path, capsys):
    assert main(["minimize", str(pt2), "-o", str(tmp_path / "o.pt2"), "--sparsity", "1.5"]) == 2
    assert "sparsity must be a number in [0, 1)" in capsys.readouterr().err


def test_cli_target_flops_without_groups_exits_2(pt2, tmp_path, capsys):
    """--target is passed on, not dropped: FLOPs are a target only for whole channels (--structure groups)."""
    assert main(["minimize", str(pt2), "-o", str(tmp_path / "o.pt2"), "--sparsity", "0.5", "--target", "flops"]) == 2
    assert "target must be 'params' or (with structure='groups') 'flops'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ the doc page


def test_export_pipeline_doc_snippets_run(tmp_path, monkeypatch):
    pytest.importorskip("transformers", reason="the doc's model comes from transformers (dev dependency)")
    pytest.importorskip("onnxruntime", reason="the doc runs onnxruntime (dev dependency)")
    pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript (dev dependency)")
    pytest.importorskip("executorch", reason="the doc lowers to ExecuTorch (dev dependency)")
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 6
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), scope)
    # the worked pipeline did what the page says: smaller, exact in float64, saved, ONNX written
    assert count_params(scope["loaded"].module()) < count_params(scope["model"])
    assert scope["report"].max_rel["float64"] <= 1e-9
    assert (tmp_path / "vit_small.pt2").exists() and (tmp_path / "vit_small.onnx").exists()


def test_the_input_guards_of_an_exported_module_freeze_nothing():
    """``ExportedProgram.module()`` calls ``_guards_fn`` on the inputs: a dead unit behind it is still removed, with
    no warning that blames the guards."""
    import warnings

    from fxprune.passes.minimize import NothingRemovedWarning

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight[1], model[0].bias[1] = 0.0, -1.0  # unit 1 is dead
    x = torch.randn(2, 3)
    gm = torch.export.export(model, (x,), strict=False).module()
    assert any(n.target == "_guards_fn" for n in gm.graph.nodes)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NothingRemovedWarning)
        out = fp.minimize(gm, (x,))
    assert count_params(out) == count_params(model) - 3 - 1 - 2  # its row, bias and column
    assert "GuardsFn" not in str(fp.analyze(gm))


def test_a_weight_read_through_dot_T_is_followed():
    """Falcon's linear layers compute ``x @ w.T`` (``aten.numpy_T`` in an exported graph): lowered as
    ``linear(x, w)``, the hidden units form a free group whose dead unit goes, in the graph and in the class."""

    class DotT(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w1, self.b1 = torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(6))
            self.w2 = torch.nn.Parameter(torch.randn(3, 6))

        def forward(self, x):
            return torch.relu(x @ self.w1.T + self.b1) @ self.w2.T

    m = DotT().double()
    with torch.no_grad():
        m.w1[2], m.b1[2] = 0.0, -1.0  # unit 2 is dead
    x = torch.randn(5, 4, dtype=torch.float64)
    gm = torch.export.export(m, (x,), strict=False).module()
    assert any("numpy_T" in str(n.target) for n in gm.graph.nodes)
    hidden = fp.analyze(gm).group_of("w1", 0)
    assert hidden is not None and not hidden.frozen
    out = fp.minimize(gm, (x,))
    assert count_params(out) == count_params(m) - 4 - 1 - 3  # its row, bias entry and column
    torch.testing.assert_close(out(x), m(x), rtol=1e-12, atol=1e-12)  # (exported with a static batch: its guards)
    small = fp.minimize_module(m, (x,))
    assert type(small) is DotT and small.w1.shape == (5, 4) and small.w2.shape == (3, 5)
    for xi in (x, torch.randn(2, 4, dtype=torch.float64)):
        torch.testing.assert_close(small(xi), m(xi), rtol=1e-12, atol=1e-12)
