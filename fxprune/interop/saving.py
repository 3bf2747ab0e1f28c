"""``save`` / ``load``: a smaller model of the user's own classes, without pickle.

``save(module, directory)`` writes ``model.safetensors`` (every parameter and buffer; tied tensors once) and
``manifest.json``: per module its class, the shapes of its tensors, its size attributes (every integer or tuple of
integers it holds: those its forward reads, fxprune's updaters' included) and,
where fxprune replaced a norm, the replacement and its arguments, and where it made a norm of the user's own class
compensated (a LayerNorm subclass with a forward of its own), the statistics that class now carries; the SHA-256 of
the weights file.
``load(directory, build)`` calls ``build()`` (the original architecture, e.g. ``lambda: GPT2LMHeadModel(config)``),
makes its modules the recorded shapes, and loads the weights. Nothing is unpickled: safetensors holds raw tensors,
the manifest is JSON, and only fxprune's own norm classes can be instantiated from it (a layer that reads a
selection of the model's input, :class:`~fxprune.nn.inputs.SelectedInputs`, is the user's own layer, made to read
the positions its ``kept_inputs`` buffer holds).

transformers' ``save_pretrained``/``from_pretrained`` keep one size per config field for all layers (one
``intermediate_size``, one head count), so a model whose layers lost different numbers of units does not fit a
config; ``load`` rebuilds the architecture from the config and then shrinks each module to its own recorded shape.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from fxprune.errors import InputError, LoadError
from fxprune.interop import shards
from fxprune.nn.inputs import SELECTED_DIMS, SelectedInputs, selected_subclass
from fxprune.nn.norm import CompensatedGroupNorm, CompensatedLayerNorm, CompensatedRMSNorm, compensated_subclass
from fxprune.nn.stdconv import compensate_std_conv_, standardizes
from fxprune.graph.rebuild import attr_owner, named_tensors

__all__ = ["save", "load", "write_module", "file_sha256", "FORMAT", "SHARD_BYTES"]

FORMAT = "fxprune-module/2"  # 2: weights in one or more shards; 1 (read too): one file
_READS = ("fxprune-module/1", FORMAT)
SHARD_BYTES = 2 << 30  # weights per safetensors file
WEIGHTS, MANIFEST = "model.safetensors", "manifest.json"
# the only classes a manifest may ask to construct (with these keyword arguments)
_REPLACEMENTS: dict[str, tuple[type, tuple[str, ...]]] = {
    "CompensatedLayerNorm": (CompensatedLayerNorm, ("kept", "full_size", "eps", "removed_sum", "removed_sq_sum")),
    "CompensatedRMSNorm": (CompensatedRMSNorm, ("kept", "full_size", "eps", "removed_sq_sum", "offset")),
    "CompensatedGroupNorm": (CompensatedGroupNorm, ("kept", "full_channels", "eps", "removed_sum", "removed_sq_sum",
                                                    "kept_per_group")),
}
# what a LayerNorm subclass of the user's that fxprune made compensated carries (its class stays the user's)
_COMPENSATED = ("full_size", "removed_sum", "removed_sq_sum")
_OPTIONAL = {"offset", "kept_per_group"}  # replacement arguments a manifest may lack (added since format 2 was written)
_SIZES = ("in_features", "out_features", "in_channels", "out_channels", "num_features", "num_embeddings",
          "embedding_dim", "normalized_shape", "num_channels", "num_groups", "nf", "split_size", "embed_dim", "num_heads",
          "head_dim", "attention_head_size", "all_head_size", "num_attention_heads")


def _is_size(v: Any) -> bool:
    """An integer, or a tuple or list of them (a shape, split widths): what ``save`` records of a module's
    attributes."""
    return type(v) is int or isinstance(v, (tuple, list)) and bool(v) and all(type(e) is int for e in v)


def _read_only(m: nn.Module, attr: str) -> bool:
    """Whether ``attr`` is a property of ``m``'s class that cannot be set."""
    prop = next((c.__dict__[attr] for c in type(m).__mro__ if attr in c.__dict__), None)
    return isinstance(prop, property) and prop.fset is None


def _qualname(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(module: nn.Module, directory: str | os.PathLike, *, max_shard_bytes: int = SHARD_BYTES) -> Path:
    """Write ``module`` to ``directory`` as safetensors weights and a JSON manifest (see the module docstring);
    weights above ``max_shard_bytes`` are split into several files.

    >>> import tempfile, torch, fxprune as fp
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    >>> d = fp.save(net, tempfile.mkdtemp())
    >>> back = fp.load(d, lambda: torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)))
    >>> back[0]
    Linear(in_features=4, out_features=3, bias=True)
    """
    if not isinstance(module, nn.Module):
        raise InputError(f"save writes an nn.Module, got {type(module).__name__}")
    return write_module(module, directory, lambda name, t: t.detach(), max_shard_bytes)


def write_module(module: nn.Module, directory: str | os.PathLike, fetch: Callable[[str, torch.Tensor], torch.Tensor],
                 max_shard_bytes: int = SHARD_BYTES) -> Path:
    """:func:`save`, with the value of each tensor given by ``fetch(name, tensor)`` when its shard is written (the
    module's tensors may be on the meta device: only their shapes and dtypes are read here). At most one tensor
    is held at a time."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    ties: dict[str, str] = {}
    seen: dict[int, str] = {}
    modules: dict[str, Any] = {}
    for path, m in module.named_modules():
        entry: dict[str, Any] = {"class": _qualname(m), "tensors": {}, "sizes": {}}
        own = list(m._parameters.items()) + list(m._buffers.items())
        for name, t in own:
            full = f"{path}.{name}" if path else name
            if t is None:
                continue
            entry["tensors"][name] = {"shape": list(t.shape), "parameter": isinstance(t, nn.Parameter),
                                      "requires_grad": bool(t.requires_grad)}
            if id(t) in seen:
                ties[full] = seen[id(t)]
            else:
                seen[id(t)] = full
                tensors[full] = t
        for attr in _SIZES:
            v = getattr(m, attr, None)
            if isinstance(v, (int, tuple)) and not isinstance(v, bool):
                entry["sizes"][attr] = list(v) if isinstance(v, tuple) else v
        for attr, v in vars(m).items():  # and every other size its forward may read (an updater's: expand_chs,
            # MetaFormer's shape, an attention's attn_dim...)
            if not attr.startswith("_") and attr not in entry["sizes"] and _is_size(v):
                entry["sizes"][attr] = list(v) if isinstance(v, (tuple, list)) else v
        if type(m).__name__ in _REPLACEMENTS and type(m).__module__.startswith("fxprune."):
            _, fields = _REPLACEMENTS[type(m).__name__]
            entry["replacement"] = {"class": type(m).__name__, "args": {f: getattr(m, f) for f in fields}}
            if isinstance(m, CompensatedGroupNorm) and "activation" in m._modules:  # (BiT's norm, activation after)
                entry["replacement"]["activation"] = getattr(m, "_fxprune_after", ["activation"])
        if isinstance(m, SelectedInputs):  # a layer of the user's class that reads the model input's kept channels
            entry["selected"] = True
        if hasattr(type(m), "_fxprune_standardizes"):  # the user's weight-standardized conv, made compensated
            entry["standardized"] = {"full_size": m.full_size}
        if hasattr(type(m), "_fxprune_compensates"):  # the user's norm class, made compensated (keeps its name)
            entry["compensated"] = {"channels_first": type(m)._fxprune_compensates[1]} | {
                f: getattr(m, f) for f in _COMPENSATED}
        modules[path] = entry
    groups: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    n = len(groups)
    files = [WEIGHTS] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    hashes = {}
    for fname, names in zip(files, groups):
        tmp = out / (fname + ".tmp")
        specs = [(k, tensors[k].dtype, tuple(tensors[k].shape)) for k in names]
        hashes[fname] = shards.write(tmp, specs, lambda k: fetch(k, tensors[k]))
        os.replace(tmp, out / fname)
    manifest = {"format": FORMAT, "class": _qualname(module), "modules": modules, "ties": ties, "shards": hashes}
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)
    return out


def _compensate(m: nn.Module, path: str, entry: dict[str, Any]) -> None:
    """Make ``m`` (built by the user's code) the compensated norm the manifest records for it. A LayerNorm whose
    normalized width shrank without that record (a file written before fxprune recorded it) cannot be rebuilt
    exactly: :class:`LoadError`."""
    rec = entry.get("compensated")
    if rec is None:
        shape = entry["sizes"].get("normalized_shape")
        if isinstance(m, nn.LayerNorm) and shape is not None and tuple(shape) != tuple(m.normalized_shape):
            raise LoadError(f"module '{path}' is a LayerNorm whose width shrank from {tuple(m.normalized_shape)} to "
                            f"{tuple(shape)} but the manifest lacks the statistics of its removed channels (a file "
                            "written before fxprune recorded them): loading it would change what the model computes; save the "
                            "minimized model again with this fxprune")
        return
    ok = (isinstance(m, nn.LayerNorm) and isinstance(rec, dict) and set(rec) == {"channels_first", *_COMPENSATED}
          and isinstance(rec["channels_first"], bool) and type(rec["full_size"]) is int
          and all(isinstance(rec[f], (int, float)) and not isinstance(rec[f], bool) for f in _COMPENSATED[1:]))
    if not ok:
        raise LoadError(f"module '{path}': the manifest's compensated norm record {rec!r} does not fit a "
                        f"{type(m).__name__} (a LayerNorm with full_size, removed_sum, removed_sq_sum)")
    m.__class__ = compensated_subclass(type(m), rec["channels_first"])
    m.full_size, m.removed_sum, m.removed_sq_sum = rec["full_size"], float(rec["removed_sum"]), float(rec["removed_sq_sum"])


def _standardize(m: nn.Module, path: str, entry: dict[str, Any]) -> None:
    """Make ``m`` (built by the user's code) the compensated weight-standardized convolution the manifest records
    for it (:func:`~fxprune.nn.stdconv.std_conv_subclass`; its sums are loaded with the weights)."""
    rec = entry.get("standardized")
    if rec is None:
        return
    specs = [entry["tensors"].get(k) for k in ("removed_sum", "removed_sq_sum")]
    if not standardizes(m) or not isinstance(rec, dict) or set(rec) != {"full_size"} or type(rec["full_size"]) is not int \
            or not all(isinstance(t, dict) and t.get("parameter") is False and len(t.get("shape", ())) == 1 for t in specs):
        raise LoadError(f"module '{path}': the manifest's standardized convolution record {rec!r} does not fit a "
                        f"{type(m).__name__} (a weight-standardized Conv2d with full_size and two 1-D buffers of sums)")
    compensate_std_conv_(m, rec["full_size"], torch.empty(0), torch.empty(0))


def _select(m: nn.Module, path: str, entry: dict[str, Any]) -> None:
    """Make ``m`` (built by the user's code) read the model input's kept channels, as the manifest records for it
    (:class:`~fxprune.nn.inputs.SelectedInputs`; the positions are loaded with the weights)."""
    if "selected" not in entry:
        return
    spec = entry["tensors"].get("kept_inputs")
    if entry["selected"] is not True or type(m) not in SELECTED_DIMS or not isinstance(spec, dict) \
            or spec.get("parameter") is not False or len(spec.get("shape", ())) != 1:
        raise LoadError(f"module '{path}': the manifest's input selection does not fit a {type(m).__name__} (an "
                        f"nn.Linear or nn.Conv1d/2d/3d with a 1-D buffer kept_inputs)")
    m.__class__ = selected_subclass(type(m))
    m.register_buffer("kept_inputs", torch.empty(0, dtype=torch.long))


def _check_selections(model: nn.Module) -> None:
    """The positions a loaded layer reads its input at (``kept_inputs``): distinct, increasing, non-negative
    integers, one per input channel of its weight, as ``minimize`` writes them."""
    for path, m in model.named_modules():
        if isinstance(m, SelectedInputs):
            k = m.kept_inputs
            ok = (k.dtype == torch.long and k.numel() == m.weight.shape[1]  # (a linear's or ungrouped conv's inputs)
                  and (k.numel() == 0 or bool((k[0] >= 0) & (k[1:] > k[:-1]).all())))
            if not ok:
                raise LoadError(f"module '{path}': kept_inputs is not a list of increasing input positions, one per "
                                "input channel of its weight: the file was not written by fp.save")


def load(directory: str | os.PathLike, build: Callable[[], nn.Module]) -> nn.Module:
    """The module :func:`save` wrote: ``build()`` makes the original architecture, its modules take the recorded
    shapes (fxprune's norm replacements included), then the weights are loaded, one tensor at a time. Raises
    :class:`LoadError` when the files are damaged or do not describe what ``build()`` makes."""
    src = Path(directory)
    try:
        manifest = json.loads((src / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise LoadError(f"{src / MANIFEST} is missing or not JSON ({e}): not a directory fp.save wrote") from e
    if not isinstance(manifest, dict) or manifest.get("format") not in _READS:
        raise LoadError(f"{src / MANIFEST} is not an fxprune manifest (format {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                        f"expected one of {_READS})")
    # format 1: one weights file and its hash; format 2: {file: hash} of the shards
    hashes = manifest.get("shards") if manifest["format"] == FORMAT else {WEIGHTS: manifest.get("sha256")}
    if not isinstance(hashes, dict) or not hashes:
        raise LoadError(f"{src / MANIFEST} names no weights file: save the model again")
    state: dict[str, shards.Reader] = {}
    for fname, digest in hashes.items():
        weights = src / str(fname)
        if Path(str(fname)).name != fname or not weights.is_file() or file_sha256(weights) != digest:
            raise LoadError(f"{weights} does not match the manifest's SHA-256: the weights file is missing, damaged "
                            "or was replaced; save the model again")
        reader = shards.Reader(weights)
        state.update({k: reader for k in reader.keys()})
    model = build()
    if _qualname(model) != manifest["class"]:
        raise LoadError(f"build() made a {_qualname(model)}, the manifest describes a {manifest['class']}: pass the "
                        "builder of the model that was saved")
    for path, entry in sorted(manifest["modules"].items(), key=lambda kv: kv[0].count(".")):
        try:
            m = model.get_submodule(path)
        except AttributeError as e:
            raise LoadError(f"the manifest has a module '{path}' that build()'s model lacks: a different "
                            "architecture or config") from e
        repl = entry.get("replacement")
        if repl is not None:
            cls, fields = _REPLACEMENTS.get(repl.get("class"), (None, ()))
            args = set(repl.get("args", {}))  # files written before "offset" existed lack it (its default: 0)
            if cls is None or not args <= set(fields) or set(fields) - args - _OPTIONAL \
                    or not set(repl) <= {"class", "args", "activation"}:
                raise LoadError(f"module '{path}': unknown replacement {repl.get('class')!r} in the manifest")
            built, m = m, cls(**repl["args"])
            for name in [n for n in m._parameters if n not in entry["tensors"]]:  # a norm without weights (or bias)
                m._parameters[name] = None
            if "activation" in repl:  # the modules the user's norm applied after it (its activation): build()'s
                names = repl["activation"]
                if not isinstance(names, list) or not names or not all(
                        isinstance(n, str) and isinstance(built._modules.get(n), nn.Module) for n in names):
                    raise LoadError(f"module '{path}': the manifest's norm applies modules {names!r} of build()'s "
                                    f"{type(built).__name__} after it, which it lacks: a different architecture")
                m.activation = (built._modules[names[0]] if len(names) == 1
                                else nn.Sequential(*(built._modules[n] for n in names)))
            setattr(*attr_owner(model, path), m)
        elif _qualname(m) != entry["class"]:
            raise LoadError(f"module '{path}' is a {_qualname(m)} in build()'s model, a {entry['class']} in the "
                            "manifest: a different architecture")
        else:
            _compensate(m, path, entry)
            _standardize(m, path, entry)
            _select(m, path, entry)
        for name, spec in entry["tensors"].items():
            if name not in m._parameters and name not in m._buffers and not (name == "bias" and hasattr(m, "bias")):
                raise LoadError(f"module '{path}' has no tensor '{name}' in build()'s model: a different architecture")
            full = f"{path}.{name}" if path else name
            stored = full if full in state else manifest["ties"].get(full)
            old = getattr(m, name, None)
            dtype = state[stored].spec(stored)[0] if stored in state else (old.dtype if isinstance(old, torch.Tensor) else torch.get_default_dtype())
            empty = torch.empty(spec["shape"], dtype=dtype)
            if spec["parameter"]:
                m._parameters[name] = nn.Parameter(empty, requires_grad=spec["requires_grad"])
            else:
                m._buffers[name] = empty
        for attr, v in entry["sizes"].items():
            v = tuple(v) if isinstance(v, list) else v
            if not isinstance(attr, str) or not attr.isidentifier() or not _is_size(v):
                raise LoadError(f"module '{path}': the manifest's size {attr}={v!r} is no integer or tuple of "
                                "integers: a damaged manifest; save the model again")
            built = getattr(m, attr, None)
            # a size build()'s module holds as one (or a standard size attribute): set; another attribute (one a
            # forward set, which build()'s module has not yet), or a property without a setter (timm's
            # ConvNormAct.in_channels, read off its convolution, which gets its own): left alone
            if _read_only(m, attr):
                continue
            if attr in _SIZES or _is_size(built) and isinstance(built, (tuple, list)) == isinstance(v, tuple):
                setattr(m, attr, list(v) if isinstance(built, list) else v)  # (as build() holds it: MixNet's splits)
    for full, first in manifest["ties"].items():
        owner, _, leaf = full.rpartition(".")
        fo, _, fl = first.rpartition(".")
        src_mod = model.get_submodule(fo) if fo else model
        dst_mod = model.get_submodule(owner) if owner else model
        t = getattr(src_mod, fl)
        (dst_mod._parameters if isinstance(t, nn.Parameter) else dst_mod._buffers)[leaf] = t
    everything = named_tensors(model)
    expected = {k for k, _ in everything if k not in manifest["ties"]}  # non-persistent buffers (inv_freq) included
    if set(state) != expected:
        missing, extra = sorted(expected - set(state))[:5], sorted(set(state) - expected)[:5]
        raise LoadError(f"the weights do not fit build()'s model (missing {missing}, unexpected {extra})")
    with torch.no_grad():
        for name, reader in state.items():
            t = getattr(*attr_owner(model, name))
            shape = reader.spec(name)[1]
            if tuple(t.shape) != shape:
                raise LoadError(f"'{name}' has shape {shape} in the file, {tuple(t.shape)} in the model")
            t.copy_(reader.read(name))
    _check_selections(model)
    return model
