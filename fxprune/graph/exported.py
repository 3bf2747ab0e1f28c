"""``ExportedProgram`` in, ``ExportedProgram`` out: one adapter shared by every pass.

A pass given an ``ExportedProgram`` runs on ``capture(ep, ep.example_inputs)`` (its unlifted module) and the
module it returns is exported again with the same example inputs. Re-exporting (instead of patching the program)
is what keeps the graph signature, the state dict, the constants and every node's ``meta["val"]`` consistent
with the new, smaller parameters: ``torch.export.save``/``load`` round-trip the result and ``ep.module()`` runs.
The re-export declares the input program's dynamic dims again (:meth:`InputDims.export_spec`): the same dims
with the same ranges.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import json
import threading
import zipfile
from typing import Any, Callable, Sequence, TypeVar

import torch
from torch import nn

from fxprune.errors import InputError

__all__ = ["exported_io", "program_inputs", "to_program", "load_program"]

F = TypeVar("F", bound=Callable[..., Any])


def program_inputs(ep: torch.export.ExportedProgram) -> tuple[Any, ...]:
    """The positional example inputs an ExportedProgram was exported with."""
    ex = getattr(ep, "example_inputs", None)
    if ex is None:
        raise InputError("the ExportedProgram carries no example inputs (it was built by hand or loaded from an old "
                         "file): capture it with fp.capture(ep, example_inputs) and pass the GraphModule instead")
    args, kwargs = ex
    if kwargs:
        raise InputError(f"the ExportedProgram was exported with keyword inputs ({', '.join(kwargs)}); fxprune takes "
                         "positional inputs: export with args=(...) only")
    return tuple(args)


def to_program(module: nn.Module, inputs: tuple[Any, ...]) -> torch.export.ExportedProgram:
    """Export ``module`` (a pass's result) on ``inputs``, with the dynamic dims of the program it came from
    (``module.meta["fxprune_input_dims"]``): the same symbols with the same ranges."""
    from fxprune.graph.dynamic import DYNAMIC_KEY

    dims = getattr(module, "meta", {}).get(DYNAMIC_KEY)
    spec = dims.export_spec() if dims is not None else None
    return torch.export.export(module, inputs, dynamic_shapes=spec, strict=False)


_SAFE = threading.local()
_LOAD_LOCK = threading.Lock()
# Packages whose pytree types a program may name and fxprune imports to register them (importing an installed
# package, never code from the file); others need the user's say-so (``imports``, the CLI's ``--import``).
TRUSTED_PYTREE_PACKAGES = ("transformers",)


def _weights_only_load(real: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(real)
    def load(*args: Any, **kwargs: Any) -> Any:
        if getattr(_SAFE, "active", False):  # only inside load_program, only on its thread
            kwargs["weights_only"] = True
        return real(*args, **kwargs)

    load.__wrapped_by_fxprune__ = True  # type: ignore[attr-defined]
    return load


def _read(path: str) -> torch.export.ExportedProgram:
    """``torch.export.load`` with every ``torch.load`` it makes on this thread held to ``weights_only=True``.
    ``torch.load`` is wrapped only while a load runs (other threads pass through unchanged) and restored after."""
    with _LOAD_LOCK:
        real = torch.load
        torch.load = _weights_only_load(real)  # type: ignore[assignment]
        _SAFE.active = True
        logger = logging.getLogger("torch.export")
        level = logger.level
        logger.setLevel(logging.ERROR)  # torch.export.load logs every failed attempt as a warning with a traceback
        try:
            return torch.export.load(path)
        finally:
            _SAFE.active = False
            torch.load = real  # type: ignore[assignment]
            logger.setLevel(level)


def load_program(path: str, imports: Sequence[str] = ()) -> torch.export.ExportedProgram:
    """Read a ``.pt2`` file without unpickling code.

    ``torch.export.load`` unpickles parts of the archive (the sample inputs, constants) and, when the safe loader
    refuses them, retries with ``weights_only=False``: a crafted file could run code. Here that retry is refused
    too, so a file is read as tensors and plain containers only.

    A program whose inputs or outputs are pytree types of another package (transformers' ``ModelOutput``
    classes) needs those types registered: the module that defines a type named in the file is imported when its
    package is in ``TRUSTED_PYTREE_PACKAGES`` or in ``imports`` (modules the caller names, imported first);
    otherwise :class:`InputError` names the type and the package to import.
    """
    for name in imports:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise InputError(f"--import {name}: {e}") from e
    allowed = set(TRUSTED_PYTREE_PACKAGES) | {n.split(".")[0] for n in imports}
    for type_name in sorted(_unregistered_types(path)):
        module, _, _ = type_name.rpartition(".")
        package = type_name.split(".")[0]
        if package not in allowed or importlib.util.find_spec(package) is None:
            raise InputError(
                f"the program's inputs or outputs use the pytree type {type_name}, which is not registered in this "
                f"process: import the package that registers it (fxprune --import {package} ..., or "
                f"load_program(path, imports=['{package}']))")
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise InputError(f"the program uses the pytree type {type_name}, and importing {module} failed: {e}") from e
    return _read(path)


def _unregistered_types(path: str) -> set[str]:
    """Pytree type names in the call signatures of the archive's programs (JSON, read without unpickling) that no
    package has registered in this process."""
    from torch.utils._pytree import SERIALIZED_TYPE_TO_PYTHON_TYPE

    names: set[str] = set()

    def types(spec: Any) -> None:
        if isinstance(spec, dict):
            if isinstance(spec.get("type"), str):
                names.add(spec["type"])
            for child in spec.get("children_spec", []):
                types(child)

    def walk(obj: Any) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                if k in ("in_spec", "out_spec") and isinstance(v, str):
                    try:
                        types(json.loads(v)[1])
                    except (ValueError, IndexError, TypeError):
                        pass
                else:
                    walk(v)
        elif isinstance(obj, list):
            for v in obj:
                walk(v)

    try:
        with zipfile.ZipFile(path) as z:
            for entry in z.namelist():
                if "/models/" in entry and entry.endswith(".json"):
                    walk(json.loads(z.read(entry)))
    except (zipfile.BadZipFile, ValueError, OSError):
        return set()
    return {n for n in names if n not in SERIALIZED_TYPE_TO_PYTHON_TYPE and not n.startswith(("builtins.", "collections."))}


def exported_io(pass_fn: F) -> F:
    """Let ``pass_fn(gm, ...)`` also take an ``ExportedProgram`` and return one (a ``(module, report)`` result
    returns ``(program, report)``)."""

    @functools.wraps(pass_fn)
    def run(gm: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(gm, torch.export.ExportedProgram):
            return pass_fn(gm, *args, **kwargs)
        from fxprune.graph.capture import capture

        inputs = program_inputs(gm)
        out = pass_fn(capture(gm, inputs), *args, **kwargs)
        if isinstance(out, nn.Module):
            return to_program(out, inputs)
        if isinstance(out, tuple) and out and isinstance(out[0], nn.Module):  # (module, report) named tuples
            return type(out)(to_program(out[0], inputs), *out[1:])
        raise TypeError(f"{pass_fn.__name__} returned {type(out).__name__}, not a module")  # pragma: no cover

    return run  # type: ignore[return-value]
