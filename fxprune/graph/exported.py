"""``ExportedProgram`` in, ``ExportedProgram`` out: one adapter shared by every pass.

A pass given an ``ExportedProgram`` runs on ``capture(ep, ep.example_inputs)`` (its unlifted module) and the
module it returns is exported again with the same example inputs. Re-exporting (instead of patching the program)
is what keeps the graph signature, the state dict, the constants and every node's ``meta["val"]`` consistent
with the new, smaller parameters: ``torch.export.save``/``load`` round-trip the result and ``ep.module()`` runs.
The re-export is static: dynamic dimensions of the input program are not carried over.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

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
    """Export ``module`` (a pass's result) on ``inputs``."""
    return torch.export.export(module, inputs, strict=False)


def load_program(path: str) -> torch.export.ExportedProgram:
    """``torch.export.load`` with every ``torch.load`` it makes held to ``weights_only=True``.

    ``torch.export.load`` unpickles parts of the archive (the sample inputs, constants) and, when the safe loader
    refuses them, retries with ``weights_only=False``: a crafted file could run code. Here that retry is refused
    too, so a file is read as tensors and plain containers only.
    """
    real_load = torch.load

    def weights_only_load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return real_load(*args, **kwargs)

    torch.load = weights_only_load  # type: ignore[assignment]
    try:
        return torch.export.load(path)
    finally:
        torch.load = real_load  # type: ignore[assignment]


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
