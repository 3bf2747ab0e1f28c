"""Crafted `.pt2` archives: a payload planted in each place an archive can hold one is refused before anything is
deserialized (exit 2, one line naming the entry), and never runs. A clean archive with the same kinds of
entries loads."""
from __future__ import annotations

import io
import json
import pathlib
import pickle
import subprocess
import sys

import pytest
import torch

from fxprune.errors import LoadError
from fxprune.graph.exported import check_archive, load_program


class _Touch:
    """Unpickling this creates the file ``marker``: proof that the payload ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _WithConstant(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)
        self.shift = torch.randn(3)  # a tensor constant: the archive gets a constants config and a payload

    def forward(self, x):
        return self.lin(x) + self.shift


@pytest.fixture
def archive(tmp_path) -> pathlib.Path:
    path = tmp_path / "clean.pt2"
    torch.export.save(torch.export.export(_WithConstant(), (torch.randn(2, 4),), strict=False), str(path))
    return path


def _rewrite(src: pathlib.Path, dst: pathlib.Path, change) -> pathlib.Path:
    """Copy the archive entry by entry; ``change(name, data)`` returns the new bytes (or None to drop it), and may
    add entries through the returned dict under the key ``"+name"``."""
    import zipfile

    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst, "w") as b:
        extra: dict[str, bytes] = {}
        for item in a.infolist():
            data = change(item.filename, a.read(item), extra)
            if data is not None:
                b.writestr(item.filename, data)
        for name, data in extra.items():
            b.writestr(name, data)
    return dst


def _payload(marker: pathlib.Path) -> bytes:
    return pickle.dumps(_Touch(str(marker)))


def _torch_payload(marker: pathlib.Path) -> bytes:
    buf = io.BytesIO()
    torch.save(_Touch(str(marker)), buf)
    return buf.getvalue()


def _config_entry(name: str, key: str, path_name: str, use_pickle: bool):
    def change(filename: str, data: bytes, extra: dict) -> bytes:
        if not filename.endswith(name):
            return data
        cfg = json.loads(data)
        meta = cfg["config"][key]
        meta["path_name"], meta["use_pickle"] = path_name, use_pickle
        return json.dumps(cfg).encode()
    return change


# kind -> (config, entry, directory, payload file, how the payload is pickled)
CONFIG_PAYLOADS = {
    "opaque object": ("constants", "shift", "constants", "opaque_obj_0", _payload),
    "custom object": ("constants", "shift", "constants", "custom_obj_0", _payload),
    "pickled constant": ("constants", "shift", "constants", "tensor_9", _torch_payload),
    "pickled weight": ("weights", "lin.weight", "weights", "weight_9", _torch_payload),
}


def _plant(kind: str, archive: pathlib.Path, tmp: pathlib.Path, marker: pathlib.Path) -> pathlib.Path:
    root = archive.stem
    if kind in CONFIG_PAYLOADS:  # a config entry pointed at a planted payload file
        config, key, directory, name, pickler = CONFIG_PAYLOADS[kind]
        cfg = _config_entry(f"model_{config}_config.json", key, name, True)
        file, body = f"{root}/data/{directory}/{name}", pickler(marker)
    elif kind == "sample inputs":
        def cfg(filename, data, extra):
            return _torch_payload(marker) if filename.endswith("sample_inputs/model.pt") else data
        file, body = None, None
    elif kind == "compiled code":
        cfg = lambda filename, data, extra: data  # noqa: E731
        file, body = f"{root}/data/aotinductor/model/model.so", b"\x7fELF"
    else:  # pragma: no cover
        raise ValueError(kind)

    def change(filename, data, extra):
        if file is not None:
            extra[file] = body
        return cfg(filename, data, extra)

    return _rewrite(archive, tmp / f"{kind.replace(' ', '_')}.pt2", change)


KINDS = ["opaque object", "custom object", "pickled constant", "pickled weight", "sample inputs", "compiled code"]
NAMED = {"opaque object": "opaque_obj_0", "custom object": "custom_obj_0", "pickled constant": "tensor_9",
         "pickled weight": "weight_9", "sample inputs": "sample_inputs/model.pt", "compiled code": "aotinductor"}


@pytest.mark.parametrize("kind", KINDS)
def test_cli_refuses_each_planted_payload_and_none_runs(kind, archive, tmp_path):
    marker = tmp_path / f"ran-{kind.replace(' ', '_')}"
    evil = _plant(kind, archive, tmp_path, marker)
    for command in (["inspect", str(evil)], ["minimize", str(evil), "-o", str(tmp_path / "out.pt2")]):
        proc = subprocess.run([sys.executable, "-m", "fxprune.cli", *command], capture_output=True, text=True,
                              cwd=tmp_path)
        assert not marker.exists(), f"the {kind} payload ran"
        assert proc.returncode == 2, proc.stderr
        lines = [ln for ln in proc.stderr.strip().splitlines() if not ln.startswith("[fxprune] ")]  # progress
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert NAMED[kind] in lines[0] and "refused" in lines[0], lines[0]
    assert not (tmp_path / "out.pt2").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_load_program_raises_load_error_before_deserializing(kind, archive, tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    evil = _plant(kind, archive, tmp_path, marker)
    calls = []
    monkeypatch.setattr(torch.export, "load", lambda *a, **k: calls.append(a))
    with pytest.raises(LoadError, match=NAMED[kind]):
        load_program(str(evil))
    assert calls == [] and not marker.exists()


def test_clean_archive_with_constants_and_pickled_tensors_loads(archive, tmp_path):
    check_archive(str(archive))
    ep = load_program(str(archive))
    x = torch.randn(2, 4)
    ref = torch.export.load(str(archive)).module()(x)
    assert torch.equal(ep.module()(x), ref)
    # a pickled tensor constant that is only a tensor passes the weights-only check
    buf = io.BytesIO()
    torch.save(torch.arange(3.0), buf)
    cfg = _config_entry("model_constants_config.json", "shift", "tensor_7", True)

    def change(filename, data, extra):
        extra[f"{archive.stem}/data/constants/tensor_7"] = buf.getvalue()
        return cfg(filename, data, extra)

    plain = _rewrite(archive, tmp_path / "plain.pt2", change)
    check_archive(str(plain))
    assert torch.equal(load_program(str(plain)).module()(x), torch.export.load(str(archive)).module()(x) - ep.constants["shift"] + torch.arange(3.0))
