"""``minimize_checkpoint``: minimize a model that does not fit in memory, from its safetensors checkpoint.

No step holds all the weights:

1. ``build()`` runs with every parameter put on the meta device as it is registered (buffers stay real: they are
   small, and some, like rotary frequencies, are computed in ``__init__`` and are in no checkpoint); persistent
   buffers found in the checkpoint are loaded.
2. The model is captured with torch.export on the meta device. Each parameter of the graph is then *bound* to
   its tensor in the checkpoint (:mod:`fxprune.graph.lazy`): the analysis reads weights one tensor at a time,
   when it needs their facts, and ``minimize`` records how each one is sliced instead of slicing it.
3. The result is written back into the meta model (the user's classes, as :func:`~fxprune.minimize_module`
   does), and :func:`~fxprune.interop.saving.write_module` writes it shard by shard: each tensor is read from the
   checkpoint, sliced, written and dropped. ``fp.load`` reads the directory back.
4. The check runs both models with their weights streamed in: each module's parameters are read when it is
   called and dropped when it returns. It compares the outputs of every block (the children of the model's
   longest ``nn.ModuleList``) and the final outputs, at the example and at the other check shapes of the
   inputs' dynamic dims; a failure raises :class:`EquivalenceError`, and the directory it wrote is removed.

The model's RMSNorm modules keep every channel of the streams they normalize: their compensation in eager code
needs the model's activations (:func:`~fxprune.minimize_module` runs the model for them).
"""
from __future__ import annotations

import contextlib
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.nn.modules.module import register_module_parameter_registration_hook
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from fxprune.graph import lazy
from fxprune.compare import OutputDiff, check, compare, first_failure, precision_of, rtol_for, worst
from fxprune.errors import EquivalenceError, LoadError, UnsupportedError
from fxprune.graph.capture import as_inputs, capture
from fxprune.graph.dynamic import DYNAMIC_KEY, shape_str, shaped_inputs
from fxprune.graph.rebuild import get_attr, named_tensors, tied_names
from fxprune.interop import shards
from fxprune.interop.module import _is_rms_norm, _write_back
from fxprune.interop.saving import MANIFEST, SHARD_BYTES, write_module

__all__ = ["minimize_checkpoint", "forward_streamed", "StreamedResult", "BlockCheck"]


@dataclass(frozen=True)
class BlockCheck:
    """The check at one input shape: the largest relative error of each block's output and of the outputs."""

    shapes: str
    blocks: tuple[float, ...]
    outputs: float


@dataclass(frozen=True)
class StreamedResult:
    directory: Path  # what fp.load reads
    params: tuple[int, int]  # parameters before and after
    checks: list[BlockCheck] = field(default_factory=list)
    bytes_read: int = 0  # weight bytes read from the checkpoint, all steps together


class _EmptyOnMeta(TorchFunctionMode):
    """``torch.empty`` without a device makes a meta tensor: layers allocate their weights that way, so no memory
    is taken for them (buffers are made by arange/zeros/ones and stay real)."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.empty and kwargs.get("device") is None:
            kwargs = {**kwargs, "device": "meta"}
        return func(*args, **kwargs)


_BUILDING = threading.local()  # set on the thread that builds a model under _parameters_on_meta


def _to_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> nn.Parameter | None:
    """torch's parameter-registration hook: on the building thread only, a new parameter goes to the meta device."""
    if getattr(_BUILDING, "active", False) and param is not None and param.device.type != "meta":
        return nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
    return None


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside the block, on this thread, goes to the meta device (buffers stay where
    they are made): torch's global parameter-registration hook, which passes other threads' parameters through,
    held only for the block (no method of nn.Module is replaced)."""
    handle = register_module_parameter_registration_hook(_to_meta)
    _BUILDING.active = True
    try:
        with _EmptyOnMeta():
            yield
    finally:
        _BUILDING.active = False
        handle.remove()


def _keys(model: nn.Module, reader: shards.Reader) -> dict[str, str]:
    """Model name -> checkpoint key for every parameter (a tied one may be stored under any of its names); raises
    :class:`LoadError` naming what is missing or shaped differently."""
    stored = set(reader.keys())
    keys: dict[str, str] = {}
    missing, wrong = [], []
    params = {id(p) for p in model.parameters()}
    for ident, names in tied_names(model).items():
        key = next((n for n in names if n in stored), None)
        if key is None:
            if ident in params:  # a buffer missing from the checkpoint keeps the value build() gave it
                missing.append(names[0])
            continue
        shape = reader.spec(key)[1]
        obj = get_attr(model, names[0])
        if shape != tuple(obj.shape):
            wrong.append(f"{key}: {shape} in the checkpoint, {tuple(obj.shape)} in the model")
        keys.update({n: key for n in names})
    if missing or wrong:
        raise LoadError(f"the checkpoint does not fit build()'s model: missing {missing[:5]}"
                        f"{' ...' if len(missing) > 5 else ''}, shaped differently {wrong[:5]}: pass the checkpoint "
                        "of the architecture build() makes")
    return keys


def _build(build: Callable[[], nn.Module], reader: shards.Reader) -> tuple[nn.Module, Callable[[str], torch.Tensor]]:
    """``build()``'s model with parameters on meta and buffers loaded, and ``read(name)``: the checkpoint's tensor
    for the model's parameter or buffer ``name``, in the model's dtype."""
    with _parameters_on_meta():
        model = build()
    if not isinstance(model, nn.Module):
        raise UnsupportedError(f"build() returned a {type(model).__name__}, not an nn.Module")
    model.eval()
    keys = _keys(model, reader)
    dtypes = {n: t.dtype for n, t in named_tensors(model)}

    def read(name: str) -> torch.Tensor:
        return reader.read(keys[name]).to(dtypes[name])

    for path, m in model.named_modules():
        for name, b in list(m._buffers.items()):
            full = f"{path}.{name}" if path else name
            if b is not None and full in keys:
                m._buffers[name] = read(full)
            elif b is not None and b.is_meta:
                raise UnsupportedError(f"buffer '{full}' has no values: build() made it with torch.empty and the "
                                       "checkpoint does not hold it")
    return model, read


def _capture_on_meta(model: nn.Module, inputs: tuple[Any, ...], dynamic_shapes: Any) -> torch.fx.GraphModule:
    """The model captured with torch.export on the meta device, then given back its real buffers."""
    real = {}
    for path, m in model.named_modules():
        for name, b in list(m._buffers.items()):
            if b is not None:
                real[(path, name)] = b
                m._buffers[name] = b.to("meta")
    meta_inputs = pytree.tree_map_only(torch.Tensor, lambda x: x.to("meta"), inputs)
    try:
        gm = capture(model, meta_inputs, method="export", dynamic_shapes=dynamic_shapes)
    finally:
        for (path, name), b in real.items():
            model.get_submodule(path)._buffers[name] = b
    for name, _ in list(gm.named_buffers()):
        owner, _, leaf = name.rpartition(".")
        if (owner, leaf) in real:
            gm.get_submodule(owner)._buffers[leaf] = real[(owner, leaf)]
    return gm


def minimize_checkpoint(build: Callable[[], nn.Module], checkpoint: str | Any, example_inputs: Sequence[Any],
                        directory: str | Any, *, dynamic_shapes: Any = "batch", verify: bool = True,
                        max_shard_bytes: int = SHARD_BYTES, **options: Any) -> StreamedResult:
    """Minimize the model ``build()`` makes, with the weights of ``checkpoint`` (a safetensors file or a directory
    of them), into ``directory`` (``fp.load(directory, build)`` reads it), never holding all the weights: see the
    module docstring. ``options`` are :class:`~fxprune.passes.minimize.MinimizeOptions` fields.

    >>> import tempfile, torch, fxprune as fp
    >>> from safetensors.torch import save_file
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> with torch.no_grad(): net[0].weight[:5] = 0; net[0].bias[:5] = -1.0
    >>> d = tempfile.mkdtemp(); save_file(net.state_dict(), d + "/net.safetensors")
    >>> build = lambda: torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> r = fp.minimize_checkpoint(build, d + "/net.safetensors", (torch.randn(3, 4),), d + "/small")
    >>> r.params, fp.load(r.directory, build)[0]
    ((58, 23), Linear(in_features=4, out_features=3, bias=True))
    """
    from fxprune.passes.minimize import KEPT_KEY, MinimizeOptions, minimize

    reader = shards.Reader(checkpoint)
    out_dir = Path(directory)
    if (out_dir / MANIFEST).exists() or (out_dir.exists() and any(out_dir.iterdir())):
        raise UnsupportedError(f"{out_dir} is not empty: minimize_checkpoint writes a new directory")
    model, read = _build(build, reader)
    inputs = as_inputs(example_inputs, model)
    before = sum(p.numel() for p in model.parameters())
    gm = _capture_on_meta(model, inputs, dynamic_shapes)
    keep = {f"{path}.weight": f"'{path}' is an RMSNorm: its compensation needs the model's activations, which the "
            "streamed path does not compute (fp.minimize_module does)"
            for path, m in model.named_modules() if _is_rms_norm(m)}

    with lazy.binding():
        for name, p in gm.named_parameters():  # export keeps the model's names; _build checked they are all stored
            lazy.bind(p, read, name)
        while True:
            small = minimize(gm, options=MinimizeOptions(verify=False, keep=tuple(keep.items()), split_norms=False, **options))
            out, stale = _write_back(model, small, inputs)
            if not stale:
                break
            for path in stale:  # modules whose sizes cannot be updated in eager code keep their channels
                m = model.get_submodule(path)
                for name, _ in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
                    keep[f"{path}.{name}"] = f"the forward of '{path}' reads sizes fxprune cannot update"
        produced = dict(named_tensors(small))

        def fetch(name: str, t: torch.Tensor) -> torch.Tensor:
            if not t.is_meta:
                return t.detach()
            src = produced.get(name)
            if src is None:  # a tied name: any alias the graph kept
                src = next(produced[n] for n in tied_names(out)[id(t)] if n in produced)
            return lazy.value(src).to(t.dtype)

        try:
            write_module(out, out_dir, fetch, max_shard_bytes)
        except BaseException:
            shutil.rmtree(out_dir, ignore_errors=True)  # nothing half-written stays behind
            raise
    after = sum(p.numel() for p in out.parameters())
    checks: list[BlockCheck] = []
    if verify:
        try:
            checks = _check(model, read, out, out_dir, inputs, gm.meta.get(DYNAMIC_KEY), small.meta.get(KEPT_KEY, {}))
        except BaseException:
            shutil.rmtree(out_dir, ignore_errors=True)
            raise
    return StreamedResult(out_dir, (before, after), checks, reader.bytes_read)


@contextlib.contextmanager
def _streamed(model: nn.Module, read: Callable[[str], torch.Tensor]) -> Iterator[None]:
    """While active, each module's own parameters are read (``read(name)``) when it is called and put back on
    the meta device when it returns."""
    handles = []
    for path, m in model.named_modules():
        names = [(n, f"{path}.{n}" if path else n) for n, p in m._parameters.items() if p is not None and p.is_meta]
        if not names:
            continue

        def load(mod: nn.Module, args: Any, names: list[tuple[str, str]] = names) -> None:
            for local, full in names:
                mod._parameters[local] = nn.Parameter(read(full), requires_grad=False)

        def drop(mod: nn.Module, args: Any, result: Any, names: list[tuple[str, str]] = names,
                 metas: dict[str, nn.Parameter] = {n: m._parameters[n] for n, _ in names}) -> None:
            mod._parameters.update(metas)

        handles += [m.register_forward_pre_hook(load), m.register_forward_hook(drop)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The children of the model's longest ``nn.ModuleList`` (its layers), or none."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def forward_streamed(build: Callable[[], nn.Module], checkpoint: str | Any, inputs: Sequence[Any], **kwargs: Any) -> Any:
    """``build()``'s model called on ``inputs`` (and keyword arguments ``kwargs``) with the weights of
    ``checkpoint``, each module's read when it is called and dropped when it returns: the outputs of a model
    that does not fit in memory (for example to compare with a minimized one)."""
    model, read = _build(build, shards.Reader(checkpoint))
    return _run(model, read, as_inputs(inputs, model), kwargs)[1]


def _run(model: nn.Module, read: Callable[[str], torch.Tensor], xs: tuple[Any, ...],
         kwargs: dict[str, Any] | None = None) -> tuple[list[Any], Any]:
    """The outputs of each block and of the model, its weights streamed in."""
    seen: list[Any] = []
    hooks = [b.register_forward_hook(lambda mod, a, r: seen.append(pytree.tree_leaves(r)[0])) for b in _blocks(model)]
    try:
        with _streamed(model, read), torch.no_grad():
            out = model(*xs, **(kwargs or {}))
    except RuntimeError as e:
        if "meta" in str(e):
            raise UnsupportedError(f"{type(model).__name__}'s forward reads a parameter outside the module that owns "
                                   f"it, so its weights cannot be streamed in: {str(e).splitlines()[0]}") from e
        raise
    finally:
        for h in hooks:
            h.remove()
    return seen, out


def _streams(model: nn.Module, kept: dict[str, list[Any]]) -> dict[tuple[int, int], torch.Tensor]:
    """(original width, kept width) -> the kept channels, for every width some tensor lost channels from in one
    way only: a residual stream's channels (every tensor of the stream keeps the same ones)."""
    seen: dict[tuple[int, int], set[tuple[int, ...]]] = {}
    for name, per_dim in kept.items():
        try:
            shape = get_attr(model, name).shape
        except AttributeError:
            continue
        for d, idx in enumerate(per_dim):
            if idx is not None:
                seen.setdefault((shape[d], len(idx)), set()).add(tuple(int(i) for i in idx))
    return {k: torch.tensor(next(iter(v))) for k, v in seen.items() if len(v) == 1}


def _check(model: nn.Module, read: Callable[[str], torch.Tensor], out: nn.Module, out_dir: Path,
           inputs: tuple[Any, ...], dims: Any, kept: dict[str, list[Any]]) -> list[BlockCheck]:
    """Compare ``out`` (read from ``out_dir``) with ``model`` (read from the checkpoint), block by block; a block
    output whose stream lost channels is compared on the kept ones (the others are constants the next block's
    compensated norm accounts for, and the final outputs are compared whole)."""
    written = shards.Reader(out_dir)
    ties = {n: names[0] for names in tied_names(out).values() for n in names}
    rtol = rtol_for(precision_of(model))
    streams = _streams(model, kept)

    def blockwise(ref: tuple[list[Any], Any], got: tuple[list[Any], Any]) -> tuple[list[list[OutputDiff]], list[OutputDiff]]:
        blocks = []
        for a, b in zip(ref[0], got[0]):
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() and a.shape[-1] != b.shape[-1]:
                a = a[..., streams[(a.shape[-1], b.shape[-1])]]  # a block writing a stream that lost channels
            blocks.append(compare(a, b))
        return blocks, compare(ref[1], got[1])

    checks, points = [], shaped_inputs(dims, inputs)
    for p in check(lambda xs: _run(model, read, xs),
                   lambda xs: _run(out, lambda n: written.read(n if n in written.entries else ties[n]), xs),
                   points, required=len(points), diff=blockwise):  # every point runs on both
        if p.error is not None:
            raise p.error
        where = f"at input shapes ({shape_str(p.inputs)})"
        blocks, diffs = p.diffs
        worsts = []
        for i, block in enumerate(blocks):
            bad = first_failure(block, rtol)
            if bad is not None:
                raise EquivalenceError(f"block {i}'s output differs {where} (relative error {bad.max_rel:.3e}, allowed "
                                       f"{rtol:g}); the result was removed. Please report this model.")
            worsts.append(worst(block))
        bad = first_failure(diffs, rtol)
        if bad is not None or len(p.expected[0]) != len(p.got[0]):
            what = "its blocks ran a different number of times" if bad is None else \
                bad.problem or f"relative error {bad.max_rel:.3e}, allowed {rtol:g}"
            raise EquivalenceError(f"the outputs differ {where} ({what}); the result was removed. Please report "
                                   "this model.")
        checks.append(BlockCheck(shape_str(p.inputs), tuple(worsts), worst(diffs)))
    return checks
