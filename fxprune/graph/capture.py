"""``capture``: any PyTorch model -> an annotated ``torch.fx.GraphModule``.

``method="auto"`` tries ``torch.fx.symbolic_trace`` (module-level graphs, readable node names) and falls
back to ``torch.export.export(..., strict=False).module()`` (ATen-level graphs; works on nearly every
model, HF transformers included). Either way every node ends annotated with ``meta["val"]`` and the
captured graph is checked to reproduce the model's output on the example inputs.
"""
from __future__ import annotations

import traceback
from typing import Any, Literal, Sequence

import torch
from torch import nn
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from fxprune.errors import CaptureError, InputError
from fxprune.graph.shapes import annotate, is_annotated

__all__ = ["capture", "as_inputs", "EXAMPLE_INPUTS_KEY"]

EXAMPLE_INPUTS_KEY = "fxprune_example_inputs"
Method = Literal["auto", "symbolic", "export"]


def as_inputs(example_inputs: Any) -> tuple[Any, ...]:
    """Normalize example inputs to a tuple (a lone tensor becomes a 1-tuple)."""
    if example_inputs is None:
        raise InputError("example_inputs is None: pass a tuple of tensors the model accepts, e.g. (torch.randn(1, 3, 32, 32),)")
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    if isinstance(example_inputs, dict):
        raise InputError("example_inputs is a dict: pass positional inputs as a tuple (keyword inputs are not supported yet)")
    raise InputError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")


def _run(model: Any, inputs: tuple[Any, ...], what: str) -> Any:
    try:
        with torch.no_grad():
            return model(*inputs)
    except Exception as e:  # the model rejected the inputs
        shapes = ", ".join(f"{tuple(x.shape)}:{x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__ for x in inputs)
        raise InputError(
            f"{what} failed on the example inputs ({shapes}): {type(e).__name__}: {e}. "
            "Pass inputs of the shapes and dtypes the model's forward expects."
        ) from e


def _same_outputs(a: Any, b: Any) -> bool:
    la, lb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    ta = [x for x in la if isinstance(x, torch.Tensor)]
    tb = [x for x in lb if isinstance(x, torch.Tensor)]
    if len(ta) != len(tb):
        return False
    return all(x.shape == y.shape and torch.allclose(x, y, rtol=1e-4, atol=1e-5, equal_nan=True) for x, y in zip(ta, tb))


def _symbolic(model: nn.Module, inputs: tuple[Any, ...], reference: Any) -> GraphModule:
    gm = torch.fx.symbolic_trace(model)
    try:
        annotate(gm, inputs)
    except Exception:  # fake propagation unsupported by some op: fall back to real shapes
        from torch.fx.passes.shape_prop import ShapeProp

        ShapeProp(gm).propagate(*inputs)
    if not _same_outputs(reference, _run(gm, inputs, "the symbolically traced graph")):
        raise RuntimeError("the symbolic trace does not reproduce the model's outputs (control flow baked in?)")
    return gm


def _export(model: nn.Module, inputs: tuple[Any, ...], reference: Any) -> GraphModule:
    ep = torch.export.export(model, inputs, strict=False)
    gm = ep.module()
    if not _same_outputs(reference, _run(gm, inputs, "the exported graph")):
        raise RuntimeError("the exported graph does not reproduce the model's outputs")
    return gm


def capture(model: Any, example_inputs: Any, method: Method = "auto") -> GraphModule:
    """Capture ``model`` as a GraphModule whose every node carries its shape and dtype.

    >>> import torch, fxprune as fp
    >>> gm = fp.capture(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()), (torch.randn(2, 4),))
    >>> [n.op for n in gm.graph.nodes]
    ['placeholder', 'call_module', 'call_module', 'output']
    >>> tuple(next(iter(gm.graph.nodes)).meta["val"].shape)
    (2, 4)
    """
    if method not in ("auto", "symbolic", "export"):
        raise CaptureError(f"method must be 'auto', 'symbolic' or 'export', got {method!r}")
    inputs = as_inputs(example_inputs)
    if isinstance(model, torch.export.ExportedProgram):
        gm = model.module()
        _run(gm, inputs, "the exported program")
        gm.meta[EXAMPLE_INPUTS_KEY] = inputs
        return gm
    if isinstance(model, GraphModule):
        _run(model, inputs, "the GraphModule")
        if not is_annotated(model):
            annotate(model, inputs)
        model.meta[EXAMPLE_INPUTS_KEY] = inputs
        return model
    if not isinstance(model, nn.Module):
        raise CaptureError(f"capture takes an nn.Module, GraphModule or ExportedProgram, got {type(model).__name__}")

    reference = _run(model, inputs, "the model")
    tracers = {"symbolic": _symbolic, "export": _export}
    order = ["symbolic", "export"] if method == "auto" else [method]
    failures: list[str] = []
    for name in order:
        try:
            gm = tracers[name](model, inputs, reference)
        except InputError:
            raise
        except Exception as e:
            last = traceback.extract_tb(e.__traceback__)[-1]
            failures.append(f"  {name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (at {last.filename.rsplit('/', 1)[-1]}:{last.lineno})")
            continue
        gm.meta[EXAMPLE_INPUTS_KEY] = inputs
        gm.meta["fxprune_capture_method"] = name
        return gm
    hint = (
        "try method='export' (torch.export handles control flow on shapes and HF models)"
        if method == "symbolic"
        else "make the model traceable: remove data-dependent Python control flow, or pass an ExportedProgram "
        "you exported yourself (torch.export.export(model, args, strict=False))"
    )
    raise CaptureError(f"could not capture {type(model).__name__}:\n" + "\n".join(failures) + f"\nWhat to try: {hint}.")
