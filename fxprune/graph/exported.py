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
import inspect
import io
import logging
import json
import re
import threading
import zipfile
from typing import Any, Callable, Sequence, TypeVar

import torch
from torch.fx import GraphModule
from torch import nn

from fxprune.compare import ieee_float32
from fxprune.errors import InputError, LoadError, UnsupportedError

__all__ = ["exported_io", "program_inputs", "to_program", "load_program", "check_archive", "Program"]

F = TypeVar("F", bound=Callable[..., Any])
# What an ``exported_io`` pass takes and gives back: a GraphModule gives a GraphModule, an ExportedProgram an
# ExportedProgram.
Program = TypeVar("Program", GraphModule, torch.export.ExportedProgram)


def program_inputs(ep: torch.export.ExportedProgram) -> tuple[Any, ...]:
    """The example inputs an ExportedProgram was exported with, positionally: its ``args``, then its keyword
    inputs in the order its flat inputs hold them (how fxprune's graph of it takes them:
    :func:`fxprune.graph.capture.program_module`)."""
    ex = getattr(ep, "example_inputs", None)
    if ex is None:
        raise InputError("the ExportedProgram carries no example inputs (it was built by hand or loaded from an old "
                         "file): capture it with fp.capture(ep, example_inputs) and pass the GraphModule instead")
    args, kwargs = ex
    return tuple(args) + tuple(kwargs[k] for k in keyword_names(ep))


def keyword_names(ep: torch.export.ExportedProgram) -> tuple[str, ...]:
    """The names of the keyword inputs ``ep`` was exported with, in the order its flat inputs hold them (empty
    when it takes positional inputs only)."""
    spec = ep.call_spec.in_spec
    if spec is None or spec.num_children != 2 or spec.child(1).type is not dict:
        return ()
    return tuple(spec.child(1).context)


def to_program(module: nn.Module, inputs: tuple[Any, ...], keywords: tuple[str, ...] = ()) -> torch.export.ExportedProgram:
    """Export ``module`` (a pass's result) on ``inputs``, with the dynamic dims of the program it came from
    (``module.meta["fxprune_input_dims"]``): the same symbols with the same ranges. ``keywords``: the names of the
    last inputs, passed as keyword inputs as the source program was (its call structure stays)."""
    from fxprune.graph.dynamic import DYNAMIC_KEY

    dims = getattr(module, "meta", {}).get(DYNAMIC_KEY)
    spec = dims.export_spec() if dims is not None else None
    if not keywords:
        return torch.export.export(module, inputs, dynamic_shapes=spec, strict=False)
    params = list(inspect.signature(module.forward).parameters)  # a graph's: its placeholders, as captured
    n = len(inputs) - len(keywords)
    if params[n:len(inputs)] != list(keywords):
        raise UnsupportedError(f"the result's inputs are named {params[:len(inputs)]}, the program's keyword inputs "
                               f"{list(keywords)}: it cannot be exported with the same keywords")
    kwargs = dict(zip(keywords, inputs[n:]))
    if spec is not None:
        spec = dict(zip(params[:len(inputs)], spec))  # keyed by name, as torch.export matches keyword inputs
    return torch.export.export(module, tuple(inputs[:n]), kwargs=kwargs, dynamic_shapes=spec, strict=False)


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

    The archive is read first as what it is, a zip of JSON configs and payloads (:func:`check_archive`): a payload
    that only a full unpickler could read raises :class:`~fxprune.errors.LoadError` before anything is deserialized.
    """
    check_archive(path)
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


# Prefixes of the constants' payload files in a .pt2 archive (torch/export/pt2_archive/constants.py) and how
# torch.export.load reads each: tensors with torch.load (held to weights_only here), the two object kinds with
# unpicklers that run whatever the bytes name.
_TENSOR_PREFIX, _SCRIPT_OBJECT_PREFIX, _OPAQUE_OBJECT_PREFIX = "tensor_", "custom_obj_", "opaque_obj_"
_UNSAFE = {_SCRIPT_OBJECT_PREFIX: "a TorchScript custom object, which torch.export.load reads with "
                                  "torch._C._pickle_load_obj",
           _OPAQUE_OBJECT_PREFIX: "an opaque object, which torch.export.load reads with pickle.loads"}


def check_archive(path: str) -> None:
    """Refuse a ``.pt2`` archive that holds anything ``torch.export.load`` would deserialize other than through the
    weights-only unpickler, before any of it is deserialized; raises :class:`~fxprune.errors.LoadError` naming the
    entry.

    Read as zip entries and JSON only: the constants and weights configs (each payload's kind), every pickled
    payload (sample inputs, pickled weights and tensor constants, legacy weight and constant files), tried with
    ``torch.load(weights_only=True)``, and compiled code (an AOTInductor package, which loading would run).
    """
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise LoadError(f"not a .pt2 archive ({e})") from e
    with z:
        names = z.namelist()
        root = names[0].split("/", 1)[0] + "/" if names and "/" in names[0] else ""
        entries = {n[len(root):]: n for n in names if n.startswith(root)}

        def refuse(entry: str, what: str) -> LoadError:
            return LoadError(f"refused before reading it: entry '{entries.get(entry, entry)}' is {what}; a crafted "
                             "file could run code that way, and fxprune reads tensors and plain containers only")

        def pickled(entry: str, what: str) -> None:
            try:
                torch.load(io.BytesIO(z.read(entries[entry])), weights_only=True)
            except Exception as e:
                raise refuse(entry, f"{what} that the weights-only unpickler refuses ({type(e).__name__})") from e

        for entry in entries:
            if entry.startswith("data/aotinductor/"):
                raise refuse(entry, "AOTInductor compiled code, which torch.export.load loads and runs")
        for entry in sorted(entries):
            if entry.startswith("data/sample_inputs/") and entry.endswith(".pt"):
                pickled(entry, "pickled sample inputs")
            elif re.fullmatch(r"data/(weights|constants)/[^/]+\.pt", entry):
                pickled(entry, "a legacy pickled weights or constants file")
            elif re.fullmatch(r"data/(weights|constants)/[^/]+_(weights|constants)_config\.json", entry):
                directory = entry.rsplit("/", 1)[0] + "/"
                try:
                    config = json.loads(z.read(entries[entry])).get("config", {})
                    items = [(str(fqn), str(meta["path_name"]), bool(meta.get("use_pickle"))) for fqn, meta in config.items()]
                except (ValueError, AttributeError, KeyError, TypeError) as e:
                    raise LoadError(f"entry '{entries[entry]}' is not a payload config ({e}): the archive is damaged") from e
                for fqn, file, use_pickle in items:
                    payload = directory + file
                    if directory == "data/constants/" and not file.startswith(_TENSOR_PREFIX):
                        kind = next((v for k, v in _UNSAFE.items() if file.startswith(k)), "a constant of unknown kind")
                        raise refuse(payload, f"constant '{fqn}': {kind}")
                    if use_pickle:
                        if payload not in entries:
                            raise LoadError(f"entry '{root}{payload}' named by '{entries[entry]}' is missing: the "
                                            "archive is damaged")
                        pickled(payload, f"'{fqn}', a pickled tensor")


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
    """Let ``pass_fn(gm, ...)`` also take an ``ExportedProgram`` and return one; the ``fxprune_*`` meta entries
    of the pass's result (its reports) go into the program's ``graph_module.meta``. A pass that takes
    ``example_inputs`` (``minimize``) also takes the user's ``nn.Module`` with them: captured first, a
    GraphModule back."""

    name = pass_fn.__name__.lstrip('_')
    takes_inputs = "example_inputs" in inspect.signature(pass_fn).parameters

    @functools.wraps(pass_fn)
    @ieee_float32()  # a pass folds and compares constants in IEEE float32, whatever TF32 setting the process has
    def run(gm: Any, *args: Any, **kwargs: Any) -> Any:
        from fxprune.graph.capture import CAPTURE_METHOD_KEY, EXAMPLE_INPUTS_KEY, as_inputs, capture

        if not isinstance(gm, (nn.Module, torch.export.ExportedProgram)):
            raise InputError(f"{name} takes a GraphModule (from fp.capture) or an ExportedProgram, got {type(gm).__name__}")
        if takes_inputs and isinstance(gm, nn.Module) and not isinstance(gm, GraphModule):  # fp.minimize(model, inputs)
            inputs = args[0] if args else kwargs.get("example_inputs")
            if inputs is None:
                raise InputError(f"{name} got the module {type(gm).__name__} and no example_inputs: pass them "
                                 f"(fp.{name}(model, example_inputs)) or a GraphModule from fp.capture")
            inputs = as_inputs(inputs, gm)  # keyword inputs placed by the module's forward, as the graph takes them
            gm = capture(gm, inputs)
            args, kwargs = ((inputs, *args[1:]), kwargs) if args else (args, dict(kwargs, example_inputs=inputs))
        if not isinstance(gm, torch.export.ExportedProgram):
            return pass_fn(gm, *args, **kwargs)
        from fxprune.graph.dynamic import DYNAMIC_KEY

        inputs = program_inputs(gm)
        keywords = keyword_names(gm)
        out = pass_fn(capture(gm, inputs), *args, **kwargs)
        if not isinstance(out, nn.Module):  # pragma: no cover
            raise TypeError(f"{pass_fn.__name__} returned {type(out).__name__}, not a module")
        program = to_program(out, inputs, keywords)
        capture_keys = (EXAMPLE_INPUTS_KEY, DYNAMIC_KEY, CAPTURE_METHOD_KEY)  # the graph's own, not reports
        program.graph_module.meta.update({k: v for k, v in getattr(out, "meta", {}).items()
                                          if k.startswith("fxprune_") and k not in capture_keys})
        return program

    return run  # type: ignore[return-value]
