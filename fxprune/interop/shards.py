"""safetensors files read and written one tensor at a time.

``safetensors`` maps a whole file into memory and writes a file from a dict of every tensor in it; the streamed
path must hold one tensor at a time and stay under a cap on its address space, which a mapping of a file larger
than the cap breaks. The format is simple (an 8-byte little-endian header length, a JSON header of
``{name: {dtype, shape, data_offsets}}``, the raw bytes), so :class:`Reader` reads a tensor with one seek and one
read into a new tensor, and :func:`write` writes the header from the names, dtypes and shapes and then each tensor
as it is produced. The files are ordinary safetensors files (``safetensors.torch.load_file`` reads them). No
pickle anywhere.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Callable, Iterable

import torch

from fxprune.errors import LoadError

__all__ = ["Reader", "write", "DTYPES"]

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 << 20  # safetensors' own limit on the header's size


class Reader:
    """The tensors of one safetensors file, or of every ``*.safetensors`` file of a directory (a sharded
    checkpoint), by name. ``bytes_read`` counts what :meth:`read` has read."""

    def __init__(self, path: str | os.PathLike) -> None:
        p = Path(path)
        files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
        if not files or not all(f.is_file() for f in files):
            raise LoadError(f"{p}: no safetensors file there (pass a .safetensors file or a directory of them)")
        self.entries: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int, int]] = {}
        for f in files:
            for name, entry in _header(f).items():
                if name in self.entries:
                    raise LoadError(f"tensor '{name}' is in both {self.entries[name][0].name} and {f.name}")
                self.entries[name] = (f, *entry)
        self.bytes_read = 0

    def keys(self) -> list[str]:
        return list(self.entries)

    def spec(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        _, dtype, shape, _, _ = self._entry(name)
        return dtype, shape

    def read(self, name: str) -> torch.Tensor:
        """A new tensor holding ``name``'s values (read from the file now)."""
        f, dtype, shape, begin, end = self._entry(name)
        buf = torch.empty(end - begin, dtype=torch.uint8)
        with open(f, "rb") as fh:
            fh.seek(begin)
            if fh.readinto(buf.numpy()) != end - begin:
                raise LoadError(f"{f} ends inside tensor '{name}': the file is truncated")
        self.bytes_read += end - begin
        return buf.view(dtype).reshape(shape)

    def _entry(self, name: str) -> tuple[Path, torch.dtype, tuple[int, ...], int, int]:
        try:
            return self.entries[name]
        except KeyError:
            raise LoadError(f"no tensor '{name}' in the checkpoint") from None


def _header(f: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    """name -> (dtype, shape, absolute begin, absolute end), checked against the file's size."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= min(_MAX_HEADER, size - 8):
            raise LoadError(f"{f} is not a safetensors file (no valid header length)")
        try:
            header = json.loads(fh.read(n))
        except ValueError as e:
            raise LoadError(f"{f} is not a safetensors file (header is not JSON: {e})") from e
    if not isinstance(header, dict):
        raise LoadError(f"{f} is not a safetensors file (header is not a JSON object)")
    out = {}
    base = 8 + n
    for name, e in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[e["dtype"]]
            shape = tuple(int(s) for s in e["shape"])
            begin, end = (int(x) for x in e["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise LoadError(f"{f}: entry '{name}' is not a safetensors tensor entry ({err!r})") from err
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes or begin < 0 or base + end > size:
            raise LoadError(f"{f}: tensor '{name}' does not fit the file (offsets {begin}-{end}, {nbytes} bytes "
                            f"expected, file {size} bytes): truncated or damaged")
        out[name] = (dtype, shape, base + begin, base + end)
    return out


def write(path: str | os.PathLike, specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
          fetch: Callable[[str], torch.Tensor]) -> str:
    """Write a safetensors file holding, for each ``(name, dtype, shape)`` of ``specs``, ``fetch(name)`` (called
    once per name, in order; it must have that dtype and shape). Returns the SHA-256 of the file."""
    specs = list(specs)
    header: dict[str, dict[str, object]] = {}
    offset = 0
    for name, dtype, shape in specs:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    h = hashlib.sha256()
    with open(path, "wb") as fh:
        for chunk in (struct.pack("<Q", len(raw)), raw):
            fh.write(chunk)
            h.update(chunk)
        for name, dtype, shape in specs:
            t = fetch(name)
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(f"'{name}': got {t.dtype} {tuple(t.shape)}, the header says {dtype} {tuple(shape)}")
            data = memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
            fh.write(data)
            h.update(data)
        fh.flush()
        os.fsync(fh.fileno())
    return h.hexdigest()
