"""squeeze_release(checkpoint_dir=..., resume=True): a killed run resumes to the same model, bit for bit; damaged
or foreign checkpoints are typed errors; a crash while writing loses nothing."""
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fxprune as fp
from fxprune.interop import checkpoint as ckpt_mod

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
import cycle_run  # noqa: E402

HELPER = Path(__file__).parent / "helpers" / "cycle_run.py"


def _run(tmp: Path, ckdir: str, out: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HELPER), str(tmp / ckdir), str(tmp / out), *flags],
                          capture_output=True, text=True, timeout=300)


def _result(tmp: Path, out: str) -> tuple[dict, dict]:
    return load_file(str(tmp / out)), json.loads((tmp / f"{out}.json").read_text())


@pytest.mark.parametrize("model", ["fc", "bn", "export"])
def test_killed_run_resumes_to_the_same_model_bit_for_bit(tmp_path, model):
    whole = _run(tmp_path, "ck-whole", "whole.safetensors", "--model", model)
    assert whole.returncode == 0, whole.stderr
    # 3 train calls per cycle (2 mask steps + the release fine-tune): call 5 is inside cycle 2
    killed = _run(tmp_path, "ck", "never.safetensors", "--model", model, "--kill-at", "5")
    assert killed.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (tmp_path / "ck").iterdir() if p.name.startswith("cycle-")) == ["cycle-0001"]
    resumed = _run(tmp_path, "ck", "resumed.safetensors", "--model", model, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, meta_a = _result(tmp_path, "whole.safetensors")
    b, meta_b = _result(tmp_path, "resumed.safetensors")
    assert a.keys() == b.keys() and a
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert meta_a["history"] == meta_b["history"] and meta_a["best_cycle"] == meta_b["best_cycle"]
    assert meta_a["code"] == meta_b["code"]  # the same modules, the same sizes
    assert meta_a["cls"] == meta_b["cls"] == {"fc": "Sequential", "bn": "Sequential", "export": "Flattening"}[model]  # the user's class
    assert meta_a["rng"] == meta_b["rng"]  # the global RNG is where the uninterrupted run left it
    assert meta_b["calls"] == 2 * 3  # cycles 2 and 3 only: cycle 1 was not trained again
    assert meta_a["history"][-1]["params"] < meta_a["history"][0]["params"] or meta_a["history"][0]["compression"] > 1


def _small_run(ckdir, cycles=2, resume=False, model=None, **kw):
    x, y = cycle_run.data()

    def train(m):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for idx in torch.randperm(len(x)).split(32):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x[idx]), y[idx]).backward()
            opt.step()

    def evaluate(m):
        with torch.no_grad():
            return float((m(x).argmax(1) == y).float().mean())

    torch.manual_seed(7)
    return fp.squeeze_release(model or cycle_run.build("fc"), (x[:8],), train=train, evaluate=evaluate,
                              cycles=cycles, sparsity=0.6, mask_steps=1, tolerance=0.3, progress=False,
                              checkpoint_dir=ckdir, resume=resume, **kw)


def _equal(a, b):
    sa, sb = a.module.state_dict(), b.module.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_crash_while_writing_a_cycle_loses_nothing(tmp_path, monkeypatch):
    whole = _small_run(tmp_path / "whole", cycles=3)
    _small_run(tmp_path / "ck", cycles=2)
    real = ckpt_mod._write

    def crash(path, data):
        if path.name == "state.json":
            raise OSError("disk full (simulated)")
        real(path, data)

    monkeypatch.setattr(ckpt_mod, "_write", crash)
    with pytest.raises(OSError, match="simulated"):
        _small_run(tmp_path / "ck", cycles=3, resume=True)
    monkeypatch.setattr(ckpt_mod, "_write", real)
    names = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert "cycle-0001" in names and "cycle-0002" in names and "cycle-0003" not in names  # the half-written one is a .tmp
    resumed = _small_run(tmp_path / "ck", cycles=3, resume=True)
    assert _equal(whole, resumed)
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "ck").iterdir())


def test_resume_on_an_empty_directory_starts_and_a_finished_run_returns_at_once(tmp_path):
    first = _small_run(tmp_path / "ck", cycles=2, resume=True)
    again = _small_run(tmp_path / "ck", cycles=2, resume=True)
    assert _equal(first, again) and [h["cycle"] for h in again.history] == [1, 2]
    assert again.history == first.history


def test_a_run_that_switches_to_whole_channels_resumes_past_the_switch(tmp_path):
    """``structure="auto"`` decides each cycle's masks from the recorded history, so a run resumed after its stalled
    cycle 1 switches as the uninterrupted one did, to the same model; a resume under other ``structure`` is refused,
    and so is one that leaves out a setting the checkpoint recorded (the default it stands for differs)."""
    whole = _small_run(tmp_path / "whole", cycles=3, lasso=0.0)
    assert [h["structure"] for h in whole.history][:2] == ["weights", "groups"]  # cycle 1 stalled (weight masks)
    _small_run(tmp_path / "ck", cycles=1, lasso=0.0)
    resumed = _small_run(tmp_path / "ck", cycles=3, resume=True, lasso=0.0)
    rows = lambda r: [{k: v for k, v in h.items() if not k.endswith("seconds")} for h in r.history]  # noqa: E731
    assert _equal(whole, resumed) and rows(resumed) == rows(whole)
    with pytest.raises(fp.CheckpointError, match="other settings.*structure='auto'"):
        _small_run(tmp_path / "ck", cycles=4, resume=True, lasso=0.0, structure="weights")
    _small_run(tmp_path / "groups", cycles=1, lasso=0.0, structure="groups")
    with pytest.raises(fp.CheckpointError, match="other settings.*structure='groups'"):
        _small_run(tmp_path / "groups", cycles=2, resume=True, lasso=0.0, structure="weights")


def test_damaged_or_foreign_checkpoints_are_typed_errors(tmp_path):
    _small_run(tmp_path / "ck", cycles=2)
    with pytest.raises(fp.CheckpointError, match="resume=True"):  # never overwritten silently
        _small_run(tmp_path / "ck", cycles=2)
    other = cycle_run.build("fc")
    with torch.no_grad():
        other[0].weight.add_(1.0)
    with pytest.raises(fp.CheckpointError, match="another model"):
        _small_run(tmp_path / "ck", cycles=3, resume=True, model=other)
    with pytest.raises(fp.CheckpointError, match="other settings.*release_scale"):
        _small_run(tmp_path / "ck", cycles=3, resume=True, release_scale=0.5)

    data = tmp_path / "ck" / "cycle-0001" / "tensors.safetensors"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(fp.CheckpointError, match="damaged"):
        _small_run(tmp_path / "ck", cycles=3, resume=True)
    assert isinstance(fp.CheckpointError("x"), fp.LoadError)
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))  # repaired

    (tmp_path / "ck" / "cycle-0002" / "state.json").write_text("{not json")
    with pytest.raises(fp.CheckpointError, match="not JSON"):
        _small_run(tmp_path / "ck", cycles=3, resume=True)

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "run.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(fp.CheckpointError, match="not an fxprune cycle checkpoint"):
        _small_run(tmp_path / "bad", resume=True)
    with pytest.raises(fp.InputError, match="checkpoint_dir"):
        _small_run(None, resume=True)


def test_checkpoint_holds_no_pickle_and_the_rng_states(tmp_path):
    _small_run(tmp_path / "ck", cycles=1)
    d = tmp_path / "ck" / "cycle-0001"
    assert sorted(p.name for p in d.iterdir()) == ["rng-rank0.json", "state.json", "tensors.safetensors"]
    groups = {k.split("/")[0] for k in load_file(str(d / "tensors.safetensors"))}
    assert {"pre", "mask", "work"} <= groups
    rng = json.loads((d / "rng-rank0.json").read_text())
    assert {"torch", "python", "numpy"} <= set(rng)
    for p in (tmp_path / "ck").rglob("*"):  # nothing but JSON and safetensors: no pickle anywhere
        if p.is_file():
            assert p.suffix in (".json", ".safetensors"), p
            json.loads(p.read_text()) if p.suffix == ".json" else load_file(str(p))
