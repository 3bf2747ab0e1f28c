"""Checkpoints of the Squeeze-Release cycle: one directory per complete cycle, safetensors + JSON, no pickle.

Layout of ``checkpoint_dir``::

    run.json                the model's fingerprint, the settings, the dense model's figures
    cycle-0001/             written as .cycle-0001.tmp, then renamed: a cycle directory is complete or absent
        tensors.safetensors pre/* (weights that went into minimize), mask/* (the masks), work/* (the model the
                            next cycle starts from), best/* (only when this cycle's model became the best)
        state.json          history row, best cycle, module modes, SHA-256 of tensors.safetensors
        rng-rank0.json      every RNG state the cycle uses (torch CPU and CUDA, Python, NumPy), one file per rank

A graph is not stored: ``resume`` re-runs ``minimize`` on each cycle's recorded input weights, starting from the
capture of the same model, and checks that every rebuilt tensor has the recorded name and shape. ``minimize`` is
deterministic, so the rebuilt graphs are the ones the run had.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping

import torch

from fxprune.errors import CheckpointError
from fxprune.interop import shards
from fxprune.interop.saving import file_sha256

__all__ = ["CycleCheckpoint", "fingerprint", "rng_state", "set_rng_state", "FORMAT"]

FORMAT = "fxprune-cycle/1"
RUN, TENSORS, STATE = "run.json", "tensors.safetensors", "state.json"
_CYCLE = re.compile(r"^cycle-(\d{4})$")


def fingerprint(state: Mapping[str, torch.Tensor], inputs: tuple[Any, ...]) -> str:
    """SHA-256 of the tensors' names, dtypes, shapes and bytes and of the example inputs' shapes and dtypes."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    for x in inputs:
        h.update(f"in|{getattr(x, 'dtype', type(x).__name__)}|{tuple(getattr(x, 'shape', ()))}|".encode())
    return h.hexdigest()


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict[str, Any]:
    """Every RNG the cycle or a user's training loop may draw from, as JSON values."""
    out: dict[str, Any] = {"torch": _b64(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    version, internal, gauss = random.getstate()
    out["python"] = [version, list(internal), gauss]
    if "numpy" in sys.modules:
        import numpy as np
        name, keys, pos, has_gauss, cached = np.random.get_state()
        out["numpy"] = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    return out


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        import numpy as np
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is missing or not JSON ({e}): the checkpoint is damaged; resume from an "
                              "intact copy or start again with a new checkpoint_dir") from e


class CycleCheckpoint:
    """The checkpoint directory of one ``squeeze_release`` run (see the module docstring). Under
    ``torch.distributed`` every rank writes its RNG states and rank 0 the rest; the directory must be one that all
    ranks see (one machine, or a shared file system)."""

    def __init__(self, directory: str | os.PathLike, rank: int = 0, barrier: Any = None) -> None:
        self.dir = Path(directory)
        self.rank = rank
        self.barrier = barrier or (lambda: None)

    # ---------------------------------------------------------------------------------------------- reading
    def cycles(self) -> list[int]:
        """The complete cycles on disk, 1..k (a gap means files were removed by hand: an error)."""
        if not self.dir.is_dir():
            return []
        done = sorted(int(m.group(1)) for p in self.dir.iterdir() if (m := _CYCLE.match(p.name)) and p.is_dir())
        if done != list(range(1, len(done) + 1)):
            raise CheckpointError(f"{self.dir} holds cycles {done}: a cycle directory is missing; resume from an "
                                  "intact copy or start again with a new checkpoint_dir")
        return done

    def run_info(self) -> dict[str, Any] | None:
        path = self.dir / RUN
        if not path.exists():
            return None
        info = _json(path)
        if not isinstance(info, dict) or info.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not an fxprune cycle checkpoint (format "
                                  f"{info.get('format') if isinstance(info, dict) else None!r}, expected {FORMAT!r})")
        return info

    def read(self, cycle: int) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any], dict[str, Any]]:
        """Cycle ``cycle``'s tensors by group (pre, mask, work, best), its state and this rank's RNG states."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        d = self.dir / f"cycle-{cycle:04d}"
        state = _json(d / STATE)
        path = d / TENSORS
        if not isinstance(state, dict) or not path.is_file() or file_sha256(path) != state.get("sha256"):
            raise CheckpointError(f"{path} does not match the SHA-256 in {d / STATE}: the checkpoint is damaged; "
                                  "resume from an intact copy or start again with a new checkpoint_dir")
        try:
            flat = load_file(str(path))
        except (SafetensorError, OSError) as e:  # pragma: no cover - the hash matched
            raise CheckpointError(f"{path} is not a safetensors file: {e}") from e
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in flat.items():
            group, _, name = key.partition("/")
            groups.setdefault(group, {})[name] = t
        rng = _json(d / f"rng-rank{self.rank}.json")
        return groups, state, rng

    # ---------------------------------------------------------------------------------------------- writing
    def start(self, info: dict[str, Any]) -> None:
        """Write ``run.json`` (rank 0) and remove half-written cycle directories a crash left."""
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            for p in self.dir.glob(".cycle-*.tmp"):
                shutil.rmtree(p)
            tmp = self.dir / f".{RUN}.tmp"
            _write(tmp, json.dumps(dict(info, format=FORMAT), indent=1).encode())
            os.replace(tmp, self.dir / RUN)
            _fsync_dir(self.dir)
        self.barrier()

    def write(self, cycle: int, tensors: Mapping[str, Mapping[str, torch.Tensor]], state: dict[str, Any]) -> None:
        """Write cycle ``cycle`` to a temporary directory and rename it into place: a crash leaves the previous
        cycles as they were and no partial ``cycle-NNNN``."""
        tmp = self.dir / f".cycle-{cycle:04d}.tmp"
        if self.rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        self.barrier()
        _write(tmp / f"rng-rank{self.rank}.json", json.dumps(rng_state()).encode())
        if self.rank == 0:
            flat = {f"{group}/{name}": t for group, ts in tensors.items() for name, t in ts.items()}
            digest = shards.write(tmp / TENSORS, [(k, t.dtype, tuple(t.shape)) for k, t in flat.items()], flat.__getitem__)
            _write(tmp / STATE, json.dumps(dict(state, sha256=digest), indent=1).encode())
        self.barrier()
        if self.rank == 0:
            _fsync_dir(tmp)
            os.rename(tmp, self.dir / f"cycle-{cycle:04d}")
            _fsync_dir(self.dir)
        self.barrier()
