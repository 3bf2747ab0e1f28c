"""``minimize_module``: the user's own model, smaller, with the same classes.

The model is captured with torch.export (whose graphs keep the model's parameter names), minimized, and the
result's tensors are written back into a copy of the model: every parameter and buffer gets its new shape and
values (folded constants included), tied parameters stay tied, a bias is created where a constant was folded into
a layer that had none, and the attributes the modules' forward code reads are updated (``in_features``,
``out_channels``, ``normalized_shape``, ``num_features``, ``embedding_dim``, transformers' ``Conv1D.nf``...).
The copy is then checked against the model at the example and at other batch sizes. Modules whose size
attributes it cannot update keep their channels (the rewrite runs again with their tensors frozen, and a warning
names them); a forward that reads a size no module exposes makes the check fail, and nothing is returned.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import warnings
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree

from fxprune.compare import cast, compare, eval_modes, ieee_float32, to_dtype, worst
from fxprune.errors import CaptureError, EquivalenceError, InputError, UnsupportedError
from fxprune.graph.capture import BATCH, CAPTURE_METHOD_KEY, EVERY, EXAMPLE_INPUTS_KEY, as_inputs, capture, unwrapped
from fxprune.graph.rebuild import attr_owner, get_attr, tied_names
from fxprune.graph.masks import plain_copy, unmasked
from fxprune.graph.shapes import annotate, runs_at
from fxprune.graph.dynamic import DYNAMIC_KEY, free_shapes, resize
from fxprune.graph.origin import reference_outputs, takes
from fxprune.nn.inputs import SELECTED_DIMS, selected_subclass
from fxprune.nn.norm import (compensated_group_norm, compensated_layer_norm, compensated_rms_norm, compensated_subclass,
                             shrunk_groups)
from fxprune.nn.stdconv import compensate_std_conv_, compensated_standardization, one_op, standardizes

__all__ = ["minimize_module", "minimize_module_kept", "ClassKept", "cache_off", "eval_capture", "selectable_inputs",
           "KeptChannelsWarning", "SIZE_ATTRIBUTES", "BY_CLASS_NAME", "BY_NAME_SUFFIX"]


def _linear(m: nn.Linear) -> None:
    m.out_features, m.in_features = m.weight.shape


def _conv(m: nn.modules.conv._ConvNd) -> None:
    """Grouped and depthwise convs: ``groups`` follows the kept output channels where whole groups went. minimize
    also removes channels within every group alike; the write-back sets ``groups`` and ``out_channels`` from the
    graph's convolution first (:func:`_graph_groups`), and this keeps them."""
    out = m.weight.shape[0]
    per_group = m.out_channels // m.groups  # the attributes still hold the old sizes
    if m.groups > 1 and out % per_group == 0:
        m.groups = out // per_group
    m.out_channels = out
    m.in_channels = m.weight.shape[1] * m.groups


def _conv_transpose(m: nn.modules.conv._ConvTransposeNd) -> None:
    """The weight is (in, out / groups, *kernel); only convs of one group lose channels."""
    m.in_channels, m.out_channels = m.weight.shape[0], m.weight.shape[1] * m.groups


def _recurrent(m: nn.RNNBase) -> None:
    """``nn.LSTM``/``GRU``/``RNN``: sizes from the first layer's weights; the forward reads the weights through
    ``_flat_weights``, a list made when the module was built, which must hold the new tensors."""
    m.hidden_size, m.input_size = m.weight_hh_l0.shape[1], m.weight_ih_l0.shape[1]
    m._init_flat_weights()


def _norm(m: nn.Module) -> None:
    if getattr(m, "weight", None) is not None:
        m.normalized_shape = tuple(m.weight.shape)


def _batch_norm(m: nn.Module) -> None:  # (and instance norm: the same attributes)
    m.num_features = (m.weight if m.weight is not None else m.running_mean).shape[0]


def _embedding(m: nn.Embedding) -> None:
    m.num_embeddings, m.embedding_dim = m.weight.shape


def _group_norm(m: nn.GroupNorm) -> None:
    if m.weight is not None:  # (whole groups removed: as many fewer groups, each of the same width)
        per = m.num_channels // m.num_groups
        m.num_channels = m.weight.shape[0]
        m.num_groups = m.num_channels // per


# module type -> updates the attributes its forward reads from its (new) tensors
SIZE_ATTRIBUTES: dict[type, Callable[[Any], None]] = {
    nn.Linear: _linear, nn.Conv1d: _conv, nn.Conv2d: _conv, nn.Conv3d: _conv, nn.LayerNorm: _norm,
    nn.BatchNorm1d: _batch_norm, nn.BatchNorm2d: _batch_norm, nn.BatchNorm3d: _batch_norm, nn.SyncBatchNorm: _batch_norm,
    nn.Embedding: _embedding,
    nn.LSTM: _recurrent, nn.GRU: _recurrent, nn.RNN: _recurrent,
    nn.ConvTranspose1d: _conv_transpose, nn.ConvTranspose2d: _conv_transpose, nn.ConvTranspose3d: _conv_transpose,
    nn.GroupNorm: _group_norm, nn.PReLU: lambda m: setattr(m, "num_parameters", m.weight.shape[0]),
    **dict.fromkeys((nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d), _batch_norm),
}
if hasattr(nn, "RMSNorm"):
    SIZE_ATTRIBUTES[nn.RMSNorm] = _norm


def _gpt2_attention(m: nn.Module) -> None:
    """transformers' GPT2Attention splits c_attn's output in three and reads heads of ``head_dim``."""
    m.split_size = m.embed_dim = m.c_attn.nf // 3
    m.num_heads = m.split_size // m.head_dim


# transformers classes, by name (transformers is not imported here): class name -> attribute update
def _mamba_mixer(m: nn.Module) -> None:
    """transformers' Mamba mixers: the inner width their depthwise convolution carries, and the widths they split
    ``x_proj``'s output at (the time-step rank ``dt_proj`` reads, then B and C, each as wide as the state)."""
    m.intermediate_size = m.conv1d.out_channels
    m.time_step_rank = m.dt_proj.in_features
    m.ssm_state_size = m.A_log.shape[1]


def _cross_stage(m: nn.Module) -> None:
    """timm's CSPNet ``CrossStage`` / ``CrossStage3``: ``conv_exp``'s output is split with ``expand_chs // 2``."""
    m.expand_chs = m.conv_exp.conv.weight.shape[0]


def _mixed_conv(m: nn.Module) -> None:
    """timm's ``MixedConv2d`` (MixNet, MDConv): its input split with ``splits`` (one width per child convolution,
    each with its own kernel size), the parts' outputs concatenated."""
    convs = list(m.values())
    m.splits = [c.in_channels for c in convs]
    m.in_channels, m.out_channels = sum(m.splits), sum(c.out_channels for c in convs)


def _partial_conv_block(m: nn.Module) -> None:
    """timm's FasterNet ``MLPBlock``: its ``spatial_mixing`` (``Partial_conv3``) splits the stream into the
    ``dim_conv3`` channels its convolution reads and the ``dim_untouched`` it passes on, and ``mlp`` reads the
    convolution's output beside the latter. (Any other ``MLPBlock``, torchvision's: nothing to update.)"""
    pc = getattr(m, "spatial_mixing", None)
    if type(pc).__name__ == "Partial_conv3" and isinstance(getattr(m, "mlp", None), nn.Sequential):
        conv = pc.partial_conv3
        pc.dim_conv3, pc.dim_untouched = conv.in_channels, m.mlp[0].in_channels - conv.out_channels


def _partial_residual(m: nn.Module) -> None:
    """timm's ReXNet ``LinearBottleneck``: the first ``in_channels`` channels of its output are added to its input
    (``x[:, 0:self.in_channels] + shortcut``), the rest of its ``out_channels`` passed on. (Any other
    ``LinearBottleneck``: nothing to update.)"""
    if not (isinstance(getattr(m, "use_shortcut", None), bool) and isinstance(getattr(m, "conv_pwl", None), nn.Module)
            and isinstance(getattr(m, "conv_dw", None), nn.Module)):
        return
    first = m.conv_exp if getattr(m, "conv_exp", None) is not None else m.conv_dw
    first, last = getattr(first, "conv", first), getattr(m.conv_pwl, "conv", m.conv_pwl)
    if isinstance(first, nn.Conv2d) and isinstance(last, nn.Conv2d):
        m.in_channels, m.out_channels = first.in_channels, last.out_channels


BY_CLASS_NAME: dict[str, Callable[[Any], None]] = {
    "Conv1D": lambda c: setattr(c, "nf", c.weight.shape[1]),  # GPT-2's Conv1D: weight is (in, out)
    "GPT2Attention": _gpt2_attention,
    # timm's CSPNet stages split their expansion in two halves of ``expand_chs // 2`` (kept equal: equal_splits)
    "CrossStage": _cross_stage,
    "CrossStage3": _cross_stage,
    "MixedConv2d": _mixed_conv,
    "MLPBlock": _partial_conv_block,
    "LinearBottleneck": _partial_residual,
}


def _stacked_experts(m: nn.Module) -> None:
    """transformers' experts stacked in 3-D weights, (experts, hidden, intermediate) for ``down_proj``."""
    if isinstance(getattr(m, "hidden_dim", None), int):
        m.hidden_dim = m.down_proj.shape[1]
    if isinstance(getattr(m, "intermediate_dim", None), int):
        m.intermediate_dim = m.down_proj.shape[2]


def _router(m: nn.Module) -> None:
    """transformers' top-k router, which reshapes its input to (-1, hidden_dim)."""
    if isinstance(getattr(m, "hidden_dim", None), int):
        m.hidden_dim = m.weight.shape[1]


def _latent_attention(m: nn.Module) -> None:
    """Multi-head latent attention (DeepSeek-V2/V3, MiniCPM3, Kimi...): splits ``kv_a_proj_with_mqa``'s output into
    ``kv_lora_rank`` latent channels and the rotary key's ``qk_rope_head_dim`` (never narrowed: rotary), and views
    the latent as ``kv_lora_rank`` wide; ``kv_b_proj`` reads the latent."""
    m.kv_lora_rank = m.kv_b_proj.weight.shape[1]


def _channel_scale(m: nn.Module) -> None:
    """timm's MetaFormer ``Scale`` (PoolFormer, ConvFormer, CAFormer): ``x * scale.view(shape)``, ``shape`` being
    ``(dim, 1, 1)`` or ``(dim,)``."""
    m.shape = (m.scale.shape[0], *m.shape[1:])


# classes by the end of their name (transformers' Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, PhiMoE... name theirs so;
# timm's MetaFormer), for a module that holds the tensors the updater reads
BY_NAME_SUFFIX: dict[str | tuple[str, ...], tuple[Callable[[Any], bool], Callable[[Any], None]]] = {
    "Experts": (lambda m: all(isinstance(getattr(m, t, None), torch.Tensor) and getattr(m, t).dim() == 3
                              for t in ("gate_up_proj", "down_proj"))
                and m.gate_up_proj.shape[2] == m.down_proj.shape[1], _stacked_experts),  # Mixtral's layout
    ("TopKRouter", "TopkRouter"): (lambda m: isinstance(getattr(m, "weight", None), torch.Tensor)
                                   and m.weight.dim() == 2, _router),  # (DeepSeek-V2/V3, GLM-4-MoE... spell it Topk)
    # Mamba's, Falcon-Mamba's, Jamba's and Zamba's mixers (the selective scan's layout, by the sizes they keep)
    "MambaMixer": (lambda m: all(isinstance(getattr(m, a, None), int)
                                 for a in ("intermediate_size", "time_step_rank", "ssm_state_size"))
                   and all(hasattr(m, c) for c in ("conv1d", "dt_proj", "A_log")), _mamba_mixer),
    "Attention": (lambda m: isinstance(getattr(m, "kv_lora_rank", None), int)
                  and isinstance(getattr(getattr(m, "kv_b_proj", None), "weight", None), torch.Tensor),
                  _latent_attention),
    "Scale": (lambda m: isinstance(getattr(m, "scale", None), torch.Tensor) and m.scale.dim() == 1
              and isinstance(getattr(m, "shape", None), tuple) and len(m.shape) in (1, 3), _channel_scale),
}


# an attention's head width and head count, as attention classes name them (ViT, BERT, GPT-2... in transformers)
HEAD_WIDTH = ("head_dim", "attention_head_size", "head_size", "key_value_proj_dim")  # (the last: T5's)
HEAD_COUNT = ("num_heads", "num_attention_heads", "n_heads")
HEAD_TOTAL = ("all_head_size", "inner_dim", "attn_dim")  # heads x head width (the last: timm's)


def _head_sets(model: nn.Module) -> tuple[tuple[int, tuple[str, ...]], ...]:
    """Per module that keeps a head width (``head_dim``): that width and the output dims of its children's weights
    (q, k, v; minimize leaves out the others, whose dims hold no heads of that width), to keep one head width for
    all of them."""
    sets = []
    for path, m in model.named_modules():
        width = _width(m)
        if width is None:
            continue
        dims = [f"{path}.{name}.weight:{1 if type(c).__name__ == 'Conv1D' else 0}".lstrip(".")
                for name, c in m.named_children() if isinstance(getattr(c, "weight", None), torch.Tensor)]
        if dims:
            sets.append((width, tuple(dims)))
    return tuple(sets)


QUERY = ("q", "query", "q_proj", "q_lin", "to_q", "wq", "q_linear", "query_proj")  # a query projection's child
QUERY_KEY_VALUE = ("qkv", "c_attn", "qkv_proj", "Wqkv")  # one child for q, k, v (its first third the queries)


def _query_rows(m: nn.Module, layout: dict[str, list[tuple[int, int]]], path: str) -> tuple[torch.Tensor, ...]:
    """The tensors that make ``m``'s queries (its query child's weight and bias, or the first third of a fused
    q/k/v child's rows), or none where it has no child of those names or a fused child holds other than three
    parts of heads."""
    for name, child in m.named_children():
        w, b = getattr(child, "weight", None), getattr(child, "bias", None)
        if not isinstance(w, torch.Tensor) or not (name in QUERY or name in QUERY_KEY_VALUE):
            continue
        dim = 1 if type(child).__name__ == "Conv1D" else 0
        rows = w.shape[dim]
        if name in QUERY_KEY_VALUE:
            if len(layout.get(f"{path}.{name}.weight:{dim}".lstrip("."), ())) != 3 or rows % 3:
                return ()
            rows //= 3
        return tuple(t.narrow(d, 0, rows) for t, d in ((w, dim), (b, 0)) if isinstance(t, torch.Tensor))
    return ()


def _width(m: nn.Module) -> int | None:
    return next((getattr(m, a) for a in HEAD_WIDTH if type(getattr(m, a, None)) is int), None)


def _rescale_queries(out: nn.Module, model: nn.Module, paths: set[str],
                     layout: dict[str, list[tuple[int, int]]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Multiply the queries of ``out``'s attention modules at ``paths`` by ``sqrt(new / old)``, their head width in
    ``out`` over the one in ``model``: a class that computes its scale from the width in its forward
    (``/ math.sqrt(self.head_dim)``, ``scaled_dot_product_attention``'s default) then scores as with the old width.
    Returns each tensor changed with its values before, to undo it."""
    before = []
    with torch.no_grad():
        for p in sorted(paths):
            m = out.get_submodule(p)
            factor = math.sqrt(_width(m) / _width(model.get_submodule(p)))
            for t in _query_rows(m, layout, p):
                before.append((t, t.clone()))
                t.mul_(factor)
    return before


def _narrowed_queries(model: nn.Module, out: nn.Module, layout: dict[str, list[tuple[int, int]]]) -> set[str]:
    """The attention modules of ``out`` whose head width is not ``model``'s and whose queries :func:`_query_rows`
    finds (``layout``: the rewrite's head layout, ``HEADS_KEY``)."""
    return {p for p, m in out.named_modules() if _width(m) is not None
            and _width(m) != _width(model.get_submodule(p)) and _query_rows(m, layout, p)}


def _error(want: Any, copy_: nn.Module, inputs: tuple[Any, ...]) -> float:
    """The largest relative error of ``copy_``'s outputs on ``inputs`` against ``want`` (inf where it raises)."""
    try:
        with torch.no_grad():
            return worst(compare(want, copy_(*inputs)))
    except Exception:  # noqa: BLE001 (a copy that does not run is the farther one)
        return float("inf")


def _set_heads(m: nn.Module, path: str, kept: dict[str, list[Any]], layout: dict[str, list[tuple[int, int]]]) -> bool:
    """Give an attention module whose q/k/v lost head-dim channels (or whole heads) its new head width and count,
    read off the kept indices of its children's head-structured dims (each part: heads x head dim); False where
    none changed or they disagree (then the check decides, and the channels stay if it fails). The scaling the
    module computed from its old width is left as it is: the scores must not change (a class that computes its
    scale from the width in its forward: :func:`_rescale_queries`)."""
    found = set()
    for key, parts in layout.items():
        name, _, dim = key.rpartition(":")
        if name.rpartition(".")[0].rpartition(".")[0] != path:
            continue
        idx = (kept.get(name) or [None] * (int(dim) + 1))[int(dim)]
        start = 0
        for heads, width in parts:
            if idx is None:
                found.add((heads, width))
            else:
                mine = idx[(idx >= start) & (idx < start + heads * width)] - start
                n = len(torch.unique(mine // width))
                found.add((n, len(mine) // n) if n else (0, 0))
            start += heads * width
    if len(found) != 1 or next(iter(found))[1] == 0:
        return False
    heads, width = next(iter(found))
    for a in HEAD_WIDTH:
        if type(getattr(m, a, None)) is int:
            setattr(m, a, width)
    for a in HEAD_COUNT:
        if type(getattr(m, a, None)) is int:
            setattr(m, a, heads)
    for a in HEAD_TOTAL:
        if type(getattr(m, a, None)) is int:
            setattr(m, a, heads * width)
    return True


def _updater(m: nn.Module) -> Callable[[Any], None] | None:
    for cls in type(m).__mro__:
        if cls in SIZE_ATTRIBUTES:
            return SIZE_ATTRIBUTES[cls]
    return _by_name(m)


def _by_name(m: nn.Module) -> Callable[[Any], None] | None:
    """The updater of a class known by its name (:data:`BY_CLASS_NAME`) or the end of its name
    (:data:`BY_NAME_SUFFIX`)."""
    name = type(m).__name__
    if name in BY_CLASS_NAME:
        return BY_CLASS_NAME[name]
    return next((update for suffix, (fits, update) in BY_NAME_SUFFIX.items() if name.endswith(suffix) and fits(m)),
                None)


# attentions that split their fused projection per head into parts of their own widths, kept as attributes with
# the head count (``view(B, N, num_heads, -1).split([key_dim, key_dim, val_dim], dim=3)``: timm's TinyViT and LeViT):
# the child that projects, and its parts; totals they also keep, and the width they are products of
KEY_VALUE_PARTS = {"qkv": ("key_dim", "key_dim", "val_dim"), "kv": ("key_dim", "val_dim")}
KEY_VALUE_TOTALS = {"key_attn_dim": "key_dim", "nh_kd": "key_dim", "val_attn_dim": "val_dim", "out_dim": "val_dim",
                    "dh": "val_dim"}


def _set_key_value_dims(m: nn.Module, path: str, kept: dict[str, list[Any]]) -> bool:
    """Give an attention of :data:`KEY_VALUE_PARTS`' form whose fused projection lost rows its new ``key_dim``,
    ``val_dim``, head count and the totals it keeps, read off the kept rows (heads x parts); False where nothing
    changed, or the heads kept different widths (then the check decides, and the channels stay if it fails). The
    scaling the module computed from its old ``key_dim`` is left as it is: the scores must not change."""
    if not all(type(getattr(m, a, None)) is int for a in ("key_dim", "val_dim", "num_heads")):
        return False
    child, parts = next(((c, p) for c, p in KEY_VALUE_PARTS.items() if isinstance(getattr(m, c, None), nn.Module)),
                        (None, ()))
    if child is None:
        return False
    name = next((f"{path}.{child}.{n}".lstrip(".") for n, p in getattr(m, child).named_parameters()
                 if n.rpartition(".")[2] == "weight" and p.dim() >= 2), None)
    rows = (kept.get(name) or [None])[0] if name else None
    if rows is None:
        return False
    sizes = [getattr(m, a) for a in parts]
    per, starts = sum(sizes), [sum(sizes[:i]) for i in range(len(sizes))]
    heads = torch.unique(rows // per)
    widths = {tuple(int(((r >= a) & (r < a + n)).sum()) for a, n in zip(starts, sizes))
              for r in (rows[rows // per == h] % per for h in heads)}
    if len(widths) != 1:
        return False
    found = dict.fromkeys(parts)
    for a, w in zip(parts, next(iter(widths))):
        if found[a] not in (None, w):
            return False  # (q and k of one head: one width)
        found[a] = w
    old = {a: getattr(m, a) * m.num_heads for a in ("key_dim", "val_dim")}  # (the totals they were)
    totals = [t for t, width in KEY_VALUE_TOTALS.items()
              if type(getattr(m, t, None)) is int and getattr(m, t) == old[width]]
    for a, w in found.items():
        setattr(m, a, w)
    m.num_heads = len(heads)
    for t in totals:
        setattr(m, t, found[KEY_VALUE_TOTALS[t]] * len(heads))
    return True


@contextlib.contextmanager
def cache_off(model: nn.Module) -> Iterator[dict[str, bool]]:
    """While open, every ``config.use_cache`` of ``model``'s modules (transformers' causal LMs as loaded) is False:
    torch.export cannot return their KV caches, and the channels do not depend on it. Yields the flags it turned
    off (module path -> value) and restores them after."""
    changed: dict[str, bool] = {}
    for path, m in model.named_modules():
        cfg = getattr(m, "config", None)
        if getattr(cfg, "use_cache", False) is True and not any(cfg is getattr(model.get_submodule(p), "config", None)
                                                                for p in changed):
            changed[path] = True
            cfg.use_cache = False
    try:
        yield changed
    finally:
        for path in changed:
            model.get_submodule(path).config.use_cache = True


@contextlib.contextmanager
def _cache_on(model: nn.Module, paths: Sequence[str]) -> Iterator[None]:
    """While open, ``config.use_cache`` is True at ``paths`` (those :func:`cache_off` turned off), False again
    after."""
    for path in paths:
        model.get_submodule(path).config.use_cache = True
    try:
        yield
    finally:
        for path in paths:
            model.get_submodule(path).config.use_cache = False


# outputs that hold a model's cache (a narrower copy's cache holds fewer channels): not compared
CACHE_OUTPUTS = ("past_key_values", "cache", "state", "cache_params", "mems")


def _uncached(out: Any) -> Any:
    if isinstance(out, Mapping):  # (transformers' ModelOutput)
        return {k: v for k, v in out.items() if k not in CACHE_OUTPUTS}
    leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    return leaves[:1]  # (a tuple: its first tensor, the logits or the loss)


def _cache_check(model: nn.Module, out: nn.Module, inputs: tuple[Any, ...], cached: Sequence[str]) -> None:
    """The copy as the model is loaded, its cache on (the copy was checked with it off, as captured): it runs on the
    example inputs, in eval mode, and its outputs but the caches are the model's, as close as they were with the
    cache off (or within float32's tolerance). A class that makes its cache from its config (RWKV's state,
    ``config.hidden_size`` wide) raises here when its stream narrowed. Raises :class:`EquivalenceError` (its
    ``cache`` True) where the copy raises or differs."""
    if not cached:
        return
    from fxprune.compare import first_failure, precision_of, rtol_for

    with eval_modes(model), eval_modes(out), torch.no_grad(), torch.random.fork_rng(devices=[]):
        off = worst(compare(_uncached(model(*inputs)), _uncached(out(*inputs))))
        with _cache_on(model, cached), _cache_on(out, cached):
            try:
                want = _uncached(model(*inputs))
            except Exception:  # noqa: BLE001 (the model itself does not run so: nothing to hold the copy to)
                return
            try:
                got = _uncached(out(*inputs))
            except Exception as exc:  # noqa: BLE001 (reported as the check's failure)
                raise _cached_error(model, f"raises with its cache on (config.use_cache, as loaded): "
                                           f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    bad = first_failure(compare(want, got), max(2.0 * off, rtol_for(precision_of(model))))
    if bad is not None:
        raise _cached_error(model, f"differs from it with its cache on (config.use_cache, as loaded): output "
                                   f"{bad.index}, relative error {bad.max_rel:.3g}"
                                   + (f" ({bad.problem})" if bad.problem else ""))


def _cached_error(model: nn.Module, what: str) -> EquivalenceError:
    """The check's failure with the cache on: ``cache`` True, so that what to freeze is found with it on too."""
    err = EquivalenceError(f"the minimized copy of {type(model).__name__} {what}")
    err.cache = True  # type: ignore[attr-defined]
    return err


def eval_capture(model: nn.Module, example_inputs: Sequence[Any]) -> torch.fx.GraphModule:
    """A static-shape capture of ``model`` as deployed: every module in eval mode (set directly: the module
    torch.export returns refuses ``.eval()``) and the KV cache off, drawing no randomness from the global RNGs;
    ``model``'s modes are restored afterwards. What the group lasso and the structured masks read groups off."""
    with eval_modes(model), torch.random.fork_rng(devices=[]), cache_off(model), one_op():
        return capture(model, as_inputs(example_inputs, model), dynamic_shapes=None)


@ieee_float32()  # (constants folded and compared in IEEE float32, whatever TF32 setting the process has)
def minimize_module(model: nn.Module, example_inputs: Sequence[Any], *, dynamic_shapes: Any = "every",
                    verify: bool = True, **options: Any) -> nn.Module:
    """A copy of ``model`` (same classes, ``generate()``, hooks and all) with every channel removed that
    :func:`fxprune.minimize` removes from its graph and eager code can follow, checked against ``model``.

    A module whose tensors would change but whose size attributes fxprune does not know how to update (a class
    without an entry in ``SIZE_ATTRIBUTES`` / ``BY_CLASS_NAME`` / ``BY_NAME_SUFFIX``) keeps its channels when the check fails: the
    rewrite runs again with them frozen, and a warning names the modules. So do the output channels of a layer
    whose caller keeps a divisor of their old count as an attribute and reads it in a way fxprune cannot follow,
    frozen first where the copy raised (that module's class), then given back group by group where the check
    passes without them. An attention that keeps its head width as an attribute (``head_dim``,
    ``attention_head_size``) gets one width for q, k and v (the widest they keep) and its new width and head count
    written back; its ``scaling`` stays. If the check still fails (a forward that reads a size no module exposes),
    :class:`EquivalenceError` and nothing is returned. ``options`` are
    :class:`~fxprune.passes.minimize.MinimizeOptions` fields (``round_to``, ``rtol``...); ``keep``,
    ``equal_heads``, ``whole_heads`` and ``aligned`` add to those it sets itself, and ``split_norms`` (which the
    user's class cannot express) and unknown names raise :class:`InputError`. The analysis, the rewrite and the
    check run with the KV cache off (:func:`cache_off`); the copy keeps the user's ``use_cache``, and where the
    cache was on it is checked once more with it on, at the example (:func:`_cache_check`): where it raises there,
    the channels of the module that raised stay.
    ``dynamic_shapes``: by default (``"every"``) every dim of every tensor input is captured dynamic where the
    model allows it, so that what the class accepts (other sequence lengths, image sizes) is analysed and checked,
    and a buffer indexed by a length (``position_ids``) is never cut to the example's; a model torch.export cannot
    capture so is captured with the batch dynamic (``"batch"``) instead, and so are later calls for its class and
    input shapes (:data:`_EVERY_FAILED`); or torch.export's spec.

    >>> import torch, fxprune as fp
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> with torch.no_grad(): net[0].weight[:5] = 0; net[0].bias[:5] = -1.0
    >>> small = fp.minimize_module(net, (torch.randn(3, 4),))
    >>> small
    Sequential(
      (0): Linear(in_features=4, out_features=3, bias=True)
      (1): ReLU()
      (2): Linear(in_features=3, out_features=2, bias=True)
    )
    """
    return _in_class(model, example_inputs, dynamic_shapes=dynamic_shapes, verify=verify, **options)[0]


@dataclasses.dataclass(frozen=True)
class ClassKept:
    """What :func:`minimize_module` kept because the model's class cannot lose it (and warned of), in the terms of
    :class:`~fxprune.passes.minimize.MinimizeOptions`: ``keep`` (a tensor's name, or ``"name:dim"`` -> why) and
    ``whole_heads`` (``"name:dim"`` of head dims whose channels inside the heads stay; whole heads may go)."""

    keep: Mapping[str, str]
    whole_heads: tuple[str, ...]


def minimize_module_kept(model: nn.Module, example_inputs: Sequence[Any], *, dynamic_shapes: Any = "every",
                         verify: bool = True, **options: Any) -> tuple[nn.Module, ClassKept]:
    """:func:`minimize_module`, and what it kept because the class cannot lose it (:class:`ClassKept`):
    ``fp.squeeze_release`` leaves those groups out of its later masks and group lasso."""
    return _in_class(model, example_inputs, dynamic_shapes=dynamic_shapes, verify=verify, **options)


def _in_class(model: nn.Module, example_inputs: Sequence[Any], *, dynamic_shapes: Any = "every",
              verify: bool = True, **options: Any) -> tuple[nn.Module, ClassKept]:
    model = unwrapped(model)  # torch.compile, DataParallel, DDP: the module inside comes back, smaller
    if not isinstance(model, nn.Module) or isinstance(model, torch.fx.GraphModule):
        got = "a GraphModule" if isinstance(model, torch.fx.GraphModule) else type(model).__name__
        raise InputError(f"minimize_module takes the user's nn.Module, got {got} (for graphs use fp.minimize)")
    with cache_off(model) as changed, one_op():  # (a compensated standardization captured as one op)
        out, kept = _minimize_module(model, example_inputs, dynamic_shapes=dynamic_shapes, verify=verify,
                                     cached=tuple(changed), **options)
    for path in changed:
        out.get_submodule(path).config.use_cache = True
    return out, kept


SHARED_REASON = ("a layer applied at several call sites folds other constants at each, and its class holds one "
                 "bias")


def _minimize_module(model: nn.Module, example_inputs: Sequence[Any], *, dynamic_shapes: Any = "every",
                     verify: bool = True, cached: tuple[str, ...] = (), **options: Any) -> tuple[nn.Module, ClassKept]:
    """The body of :func:`minimize_module_kept`, with the cache already off (``cached``: the modules whose
    ``config.use_cache`` it turned off, on again for :func:`_cache_check`)."""
    from fxprune.passes.minimize import HEADS_KEY, SITE_BIASES_KEY, MinimizeOptions, float64_twin, minimize, self_check

    names = {f.name for f in dataclasses.fields(MinimizeOptions)} - {"verify"}
    unknown = sorted(options.keys() - names)
    if unknown:
        raise InputError(f"minimize_module got unknown option(s) {', '.join(unknown)}: it takes verify and the fields "
                         f"of MinimizeOptions ({', '.join(sorted(names - {'split_norms'}))})")
    if options.pop("split_norms", False):
        raise InputError("split_norms=True selects a norm's kept outputs inside the graph, which the user's class "
                         "cannot express: use fp.minimize on the graph for it")
    theirs = dict(keep=tuple(options.pop("keep", ())), equal_heads=tuple(options.pop("equal_heads", ())),
                  whole_heads=tuple(options.pop("whole_heads", ())))  # added to those minimize_module sets
    inputs = as_inputs(example_inputs, model)
    key = _signature(model, inputs)
    spec = dynamic_shapes
    try:  # every dim the model's code lets vary stays dynamic: an index table sliced by a length is no channel
        if dynamic_shapes == EVERY and key in _EVERY_FAILED:
            raise CaptureError("every dim dynamic failed before for this class and these input shapes")
        gm = capture(model, inputs, dynamic_shapes=dynamic_shapes)  # (a symbolic trace first: cheaper than export)
    except CaptureError:
        if dynamic_shapes != EVERY:
            raise
        _EVERY_FAILED.add(key)
        spec = BATCH
        gm = capture(model, inputs, method="export", dynamic_shapes=BATCH)
    # every check runs the graph, the model and its copy on what the graph was captured from: a model whose loss
    # could not be captured was captured without its labels (the logits the loss reads, which the copy must keep)
    inputs = gm.meta[EXAMPLE_INPUTS_KEY]
    # the copy runs at any size the model takes, also where the capture's guards pin a size (every image up to 32
    # pixels ends in a 1x1 map): a size that varies beyond the captured range is no fact to rewrite by; and where
    # the capture held a dim static that the model takes at other sizes (a window that must divide the image), the
    # copy is analysed (and checked) at such sizes too
    if DYNAMIC_KEY in gm.meta:
        dims = gm.meta[DYNAMIC_KEY]
        free = free_shapes(dims, inputs, lambda xs: takes(model, xs))
        gm.meta[DYNAMIC_KEY] = dims = dataclasses.replace(dims, beyond=True, free=free)
        annotate(gm, inputs, dims, _captured_beyond(model, inputs, gm, dims, spec))
    keep: dict[str, str] = {}
    asked = options.pop("inputs", True)  # the caller's, within those the class can cut
    selectable = tuple(n for n in selectable_inputs(model, gm) if asked is True or asked and n in asked)
    heads = _head_sets(model)
    # stacked expert weights (the 3-D tensors of a transformers ...Experts module): kept widths of a multiple of 16
    # bytes, as torch's grouped_mm needs (a convolution's 3-D weight is no such tensor)
    stacked = tuple((f"{path}.{n}".lstrip(".") + f":{d}", max(1, 16 // p.element_size()))
                    for path, m in model.named_modules() if type(m).__name__.endswith("Experts")
                    for n, p in m.named_parameters(recurse=False) if p.dim() == 3 for d in (1, 2))
    stacked += tuple(options.pop("aligned", ()))  # and the caller's own
    whole: list[str] = []  # head dims tried with whole heads only, before their projections are frozen
    rescaled: set[str] = set()  # attention modules whose queries are rescaled to their new head width
    options.setdefault("equal_splits", True)  # (eager code splits into parts of one size: split(int), chunk)

    def attempt(frozen: dict[str, str]) -> tuple[nn.Module, list[str], list[str], Any, EquivalenceError | None]:
        # one end-to-end check: the copy against the model; the graph is checked only to say which step failed
        while True:  # a layer applied at several sites cannot hold a bias per site: keep its channels
            opts = MinimizeOptions(verify=False, keep=tuple(frozen.items()) + theirs["keep"],
                                   equal_heads=heads + theirs["equal_heads"], aligned=stacked,
                                   whole_heads=tuple(whole) + theirs["whole_heads"], split_norms=False,
                                   inputs=selectable, **options)
            small = minimize(gm, options=opts)
            shared = {f"{bias.rpartition('.')[0]}.weight" if bias.endswith(".bias") else bias: SHARED_REASON
                      for bias in small.meta.get(SITE_BIASES_KEY, {}).values()}
            if not shared.keys() - frozen.keys():
                break
            frozen.update(shared)  # the caller's dict: the kept layers are reported with the others
        suspects: list[str] = []
        out, stale = _write_back(model, small, inputs, suspects)
        rescaled.clear()
        layout = small.meta.get(HEADS_KEY, {})
        narrowed = _narrowed_queries(model, out, layout)
        if narrowed:  # does the class compute its scale from the head width in its forward? The copy closer to the
            # model says (the other is off by the ratio of the widths' square roots in every score)
            want = reference_outputs(gm, inputs)
            plain = _error(want, out, inputs)
            undo = _rescale_queries(out, model, narrowed, layout)
            if _error(want, out, inputs) < plain:
                rescaled.update(narrowed)
            else:
                with torch.no_grad():
                    for t, was in undo:
                        t.copy_(was)
        if not verify:
            return out, stale, suspects, small, None
        try:
            self_check(gm, out, inputs, opts)
        except EquivalenceError as e:
            graph = float64_twin(gm, inputs, opts) if e.rounding else None  # (only where the float32 half passed:
            # a copy off by more than the model's own rounding is no rounding, and the twin costs float64 copies)
            if graph is not None:  # the same rewrite in float64, its float32 copy checked against it
                try:
                    twin_suspects: list[str] = []
                    exact, twin_stale = _write_back(to_dtype(model, torch.float64), graph,
                                                    cast(inputs, torch.float64), twin_suspects)
                    _rescale_queries(exact, model, rescaled, graph.meta.get(HEADS_KEY, {}))
                    twin = to_dtype(exact, torch.float32)
                    self_check(gm, twin, inputs, opts, exact=exact)
                    _cache_check(model, twin, inputs, cached)
                    return twin, twin_stale, twin_suspects, graph, None
                except Exception:  # noqa: BLE001 (the twin does not pass either: the copy's error stands)
                    pass
            return out, stale, suspects, (small, opts), e
        try:
            _cache_check(model, out, inputs, cached)
        except EquivalenceError as e:
            return out, stale, suspects, (small, opts), e
        return out, stale, suspects, small, None

    while True:
        out, stale, suspects, small, e = attempt(keep)
        if e is None:
            if keep:
                out, keep = _thaw(attempt, out, keep, model)
            break
        small, opts = small
        with _cache_on(out, cached if getattr(e, "cache", False) else ()):  # (where the copy fails as loaded)
            more = _to_freeze(model, out, inputs, stale, suspects, keep)
        headed = [k for _, dims in heads if more.keys() & set(dims) and not set(dims) <= set(whole) for k in dims]
        if headed:  # first keep the channels inside those heads: whole heads and kv groups may still go
            whole.extend(k for k in headed if k not in whole)
            continue
        if not more:
            self_check(gm, small, inputs, opts)  # raises if the capture or the graph rewrite is at fault
            raise EquivalenceError(f"the minimized copy of {type(model).__name__} differs from it: {e} Modules whose "
                                   f"sizes it could not update: {', '.join(stale) or 'none'}; fp.minimize gives "
                                   "the graph, which is right") from e
        keep.update(more)
    if keep:
        modules = sorted({k.rpartition('.')[0] for k in keep if ":" not in k})  # (whole: the head dims, below)
        shown = [m or f"{type(model).__name__} (its own tensors)" for m in modules]  # "": the model's parameters
        dims = sorted(k for k in keep if ":" in k and k.rpartition('.')[0] not in modules)  # "layer.weight:0"
        what = ", ".join(([f"every channel of {', '.join(shown)}"] if modules else [])
                         + ([f"the channels of {', '.join(dims)} (tensor:dim) and those tied to them"] if dims else []))
        why = ("their forward (or their caller's) reads sizes fxprune cannot update in eager code"
               if any(r != SHARED_REASON for r in keep.values()) else "")
        if any(r == SHARED_REASON for r in keep.values()):
            why = "; ".join(filter(None, [why, SHARED_REASON]))
        warnings.warn(f"minimize_module kept {what}: {why} (fp.minimize on the graph removes them)",
                      KeptChannelsWarning, stacklevel=4)
    inside = sorted({k.rpartition(".")[0].rpartition(".")[0] for k in whole if k not in keep} - {""})
    if inside:
        warnings.warn(f"minimize_module kept every channel inside the heads of {', '.join(inside)}: their class "
                      "reads one head width in more places than fxprune updates (rotary tables, a reshape); whole "
                      "heads and kv groups still go (fp.minimize on the graph removes the rest)",
                      KeptChannelsWarning, stacklevel=4)
    return out, ClassKept(dict(keep), tuple(k for k in whole if k not in keep))


def _captured_beyond(model: nn.Module, inputs: tuple[Any, ...], gm: torch.fx.GraphModule, dims: Any,
                     spec: Any) -> list[torch.fx.GraphModule]:
    """The model exported again at sizes the copy will run at but ``gm`` (exported) does not propagate at:
    :func:`~fxprune.graph.shapes.annotate` reads which sizes vary off the graphs. At twice the example's dynamic
    sizes (a view with a size export pinned: ShuffleNet's channel shuffle of the 1x1 map every image up to 32
    pixels ends in); at ``dims.free``'s first shape (twice the sizes the capture held static: export specialized
    the image size of timm's MobileViT-v2). A capture that fails is left out."""
    if gm.meta.get(CAPTURE_METHOD_KEY) != "export":
        return []
    out = []
    for shape in [dims.sizes(p) for p in dims.beyond_points()][:1] + list(dims.free[:1]):
        big = resize(inputs, shape)
        if runs_at(gm, big, guards=False) or not takes(model, big):  # (a model that rejects them: no export)
            continue
        try:
            out.append(capture(model, big, method="export", dynamic_shapes=spec))
        except (CaptureError, InputError, UnsupportedError):
            continue
    return out


# (class, input shapes and dtypes) whose capture with every dim dynamic failed: later calls (the cycle's, on ever
# smaller copies of the same model) capture with the batch dynamic straight away. torch.export spends 40-60 s in
# symbolic shape reasoning before it refuses a small Swin's spatial dims (its windows must divide them).
_EVERY_FAILED: set[tuple[Any, ...]] = set()


def _signature(model: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    return (type(model), tuple((tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else type(t)
                               for t in pytree.tree_leaves(inputs)))


def _thaw(attempt: Callable[[dict[str, str]], Any], out: nn.Module, keep: dict[str, str],
          model: nn.Module) -> tuple[nn.Module, dict[str, str]]:
    """After a passing check with suspects frozen, give back what the copy does not need frozen: the suspects are
    grouped by the child's name and dim under its caller's class (``ViTAttention.o_proj:0``, its weight and bias:
    every layer alike), and each group is tried unfrozen once (at most 8 more rewrites); a group whose check passes
    stays unfrozen."""
    groups: dict[tuple[str, str, str], list[str]] = {}
    for k in keep:
        if ":" in k:
            child = k.rpartition(":")[0].rpartition(".")[0]
            parent = child.rpartition(".")[0]
            dim = k.rpartition(":")[2]  # each dim of the child apart, its tensors together (a weight's dim 0 and
            # its bias hold one output channel: one of them still frozen would hold it, and its check pass unfrozen)
            groups.setdefault((type(model.get_submodule(parent)).__name__, child.rpartition(".")[2], dim),
                              []).append(k)
    if len(groups) < 2:
        return out, keep
    for key in sorted(groups)[:8]:
        trial = {k: v for k, v in keep.items() if k not in groups[key]}
        new, _, _, _, e = attempt(trial)
        if e is None:
            out, keep = new, trial
    return out, keep


def _to_freeze(model: nn.Module, out: nn.Module, inputs: tuple[Any, ...], stale: list[str], suspects: list[str],
               keep: dict[str, str]) -> dict[str, str]:
    """What to freeze after a failed check, as few as it can: when the copy raises, the suspects and stale modules
    under the module that was running (or its caller) and every module of the same class (each layer of a model
    fails alike); otherwise, or when that names nothing new, every suspect first, then every stale module (where
    the copy raised, those that keep a size: :func:`_keeps_sizes`); when
    there are none, the dims that changed in the module that was running and in every module of its class, or
    else in its caller's, unless that is the model itself (a forward that reads a size from another tensor:
    FocalNet's modulation splits its input projection's output at its own input width, SegFormer's sequence
    reduction reshapes its convolution's output to its input width)."""
    def stale_tensors(paths: list[str]) -> dict[str, str]:
        found = {}
        for path in paths:  # every tensor of the modules it could not update
            m = model.get_submodule(path)
            why = f"the forward of '{path}' ({type(m).__name__}) reads sizes fxprune cannot update in eager code"
            for name, _ in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
                if f"{path}.{name}" not in keep:
                    found[f"{path}.{name}"] = why
        return found

    why = "its caller may reshape it with a size it keeps as an attribute"
    running = _raising_modules(out, inputs)
    if running:
        classes = {type(m) for m in running}
        of_class = lambda path: type(out.get_submodule(path)) in classes  # noqa: E731
        near = {k: why for k in suspects if k not in keep and of_class(k.rpartition(":")[0].rpartition(".")[0].rpartition(".")[0])}
        # a stale module that keeps no size (timm's LayerScale2d) reads its sizes off its tensors: it made nothing
        # else raise, so it is frozen only where its own class raised
        stale = [p for p in stale if of_class(p) or _keeps_sizes(out.get_submodule(p))]
        near |= stale_tensors([p for p in stale if of_class(p) or of_class(p.rpartition(".")[0])])
        if near:
            return near
    first = {k: why for k in suspects if k not in keep}
    if first or stale:
        return first or stale_tensors(stale)
    for m in reversed(running):  # (not the model itself: freezing all it changed is no finding)
        found = _changed_dims(model, out, type(m), keep) if m is not out else {}
        if found:
            return found
    return {}


def _changed_dims(model: nn.Module, out: nn.Module, cls: type, keep: dict[str, str]) -> dict[str, str]:
    """``"name:dim"`` of every dim that changed size in the tensors of the modules of class ``cls`` in ``out``
    (their children's included) and is not in ``keep``."""
    found: dict[str, str] = {}
    for path, m in out.named_modules():
        if type(m) is not cls:
            continue
        why = f"the forward of '{path}' ({cls.__name__}) raised with them changed: it reads a size fxprune cannot see"
        for name, t in [*m.named_parameters(), *m.named_buffers()]:
            full = f"{path}.{name}".lstrip(".")
            try:
                owner, leaf = attr_owner(model, full)
            except AttributeError:  # (a module the write-back added)
                continue
            old = getattr(owner, leaf, None)
            if isinstance(old, torch.Tensor) and old.dim() == t.dim():
                found.update({f"{full}:{d}": why for d, (a, b) in enumerate(zip(old.shape, t.shape))
                              if a != b and f"{full}:{d}" not in keep})
    return found


def _raising_modules(out: nn.Module, inputs: tuple[Any, ...]) -> list[nn.Module]:
    """The innermost module running when ``out`` raised on ``inputs``, and its caller (none when it runs)."""
    stack: list[nn.Module] = []
    handles = []
    def enter(mod: nn.Module, args: Any) -> None:
        stack.append(mod)

    def leave(mod: nn.Module, args: Any, result: Any) -> None:
        stack.pop()

    for m in out.modules():
        handles.append(m.register_forward_pre_hook(enter))
        handles.append(m.register_forward_hook(leave))
    try:
        with torch.no_grad():
            out(*inputs)
    except Exception:
        return stack[-2:]
    finally:
        for h in handles:
            h.remove()
    return []


class KeptChannelsWarning(UserWarning):
    """``minimize_module`` left channels of modules whose size attributes it cannot update."""


def _recompute_weight_norms(out: nn.Module, changed: set[str]) -> None:
    """The weight a legacy ``torch.nn.utils.weight_norm`` hook keeps as a plain attribute (recomputed before each
    forward), recomputed now from its sliced ``weight_g``/``weight_v``: the size updaters read its shape."""
    from torch.nn.utils.weight_norm import WeightNorm

    for path in changed:
        m = out.get_submodule(path)
        for hook in m._forward_pre_hooks.values():
            if isinstance(hook, WeightNorm):
                with torch.no_grad():
                    setattr(m, hook.name, hook.compute_weight(m))


def selectable_inputs(model: nn.Module, gm: torch.fx.GraphModule) -> dict[str, int]:
    """The inputs of ``gm`` (a capture of ``model``) whose channels a copy of ``model``'s class can cut, each with
    the dim that holds them (:func:`fxprune.analysis.groups.input_channels`): every layer reading the input is an
    ``nn.Linear`` or ``nn.Conv1d/2d/3d`` of exactly that class, called as itself, and the copy's layer then reads
    the input's kept channels (:class:`~fxprune.nn.inputs.SelectedInputs`). For a GraphModule, every input
    ``input_channels`` finds (the graph selects them itself)."""
    from fxprune.analysis.groups import input_channels
    from fxprune.analysis.rules import Conv, Linear
    from fxprune.analysis.table import RULES
    from fxprune.passes.lower import lower_modules

    lowered = lower_modules(gm)
    found = input_channels(lowered)
    if isinstance(model, torch.fx.GraphModule):
        return found
    readers: dict[str, list[torch.fx.Node]] = {}  # per layer, the nodes that read its weight
    for w in lowered.graph.nodes:
        if w.op == "get_attr" and str(w.target).endswith(".weight"):
            readers.setdefault(_owner(w.target), []).extend(w.users)
    out = {}
    for n in lowered.graph.nodes:
        if n.op != "placeholder" or n.name not in found:
            continue
        layers = [(u, _layer_path(u)) for u in n.users  # (input_channels: the others read metadata or sizes)
                  if u.op == "call_function" and isinstance(RULES.lookup(u, lowered), (Linear, Conv))]
        if all(path is not None and _module_path(u) == path and type(model.get_submodule(path)) in SELECTED_DIMS
               and all(r.args[0] is n for r in readers.get(path, ())) for u, path in layers):
            out[n.name] = found[n.name]  # (a layer also applied to another tensor would select that one's too)
    return out


def _layer_path(n: torch.fx.Node) -> str | None:
    """The path of the module whose weight parameter the linear or convolution ``n`` reads (None: a computed one)."""
    w = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
    return _owner(w.target) if isinstance(w, torch.fx.Node) and w.op == "get_attr" else None


def _select_inputs(small: torch.fx.GraphModule, out: nn.Module) -> tuple[set[str], list[str]]:
    """The layers of ``out`` that read a model input ``small`` cut channels from, made to read its kept channels
    (:func:`~fxprune.nn.inputs.selected_subclass`, ``kept_inputs``). Returns their paths, and those of the layers
    that cannot (stale: their channels stay)."""
    from fxprune.passes.minimize import INPUT_PREFIX

    done, stale = set(), []
    for n in small.graph.nodes:
        if n.op != "get_attr" or not str(n.target).startswith(INPUT_PREFIX):
            continue
        for u in (u for sel in n.users for u in sel.users):
            path = _layer_path(u)
            m = out.get_submodule(path) if path is not None else None
            if m is None or type(m) not in SELECTED_DIMS or _module_path(u) != path:  # (selectable_inputs: never)
                stale.append(path if path is not None else _module_path(u) or "")
                continue
            m.__class__ = selected_subclass(type(m))
            m.register_buffer("kept_inputs", get_attr(small, n.target).detach().clone().to(m.weight.device))
            done.add(path)
    return done, stale


def _owner(name: str) -> str:
    """The path of the module whose forward reads the tensor ``name``: its parent's, or for a parametrized
    tensor (``conv.parametrizations.weight.original0``: weight norm's g) the parametrized module's."""
    parts = name.split(".")[:-1]
    return ".".join(parts[:parts.index("parametrizations")] if "parametrizations" in parts else parts)


def _write_back(model: nn.Module, small: torch.fx.GraphModule, inputs: tuple[Any, ...],
                suspects: list[str] | None = None) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` holding ``small``'s tensors and sizes; the paths of modules whose tensors changed but
    whose size attributes could not be updated. ``suspects`` (when given) gains the paths of changed modules whose
    caller keeps one of their old sizes as an attribute (it may read it in its forward)."""
    from fxprune.passes.minimize import HEADS_KEY, KEPT_KEY

    out = unmasked(model)
    out = plain_copy(out) if out is model else out
    state = dict(small.named_parameters()) | dict(small.named_buffers())
    changed: set[str] = set()
    shrunk: dict[str, list[tuple[list[str], int, int]]] = {}  # module path -> (tensor names, dim, old size) changed
    for names in tied_names(out).values():
        new = next((state[n] for n in names if n in state), None)
        if new is None:
            continue
        old_owner, old_leaf = attr_owner(out, names[0])
        old = getattr(old_owner, old_leaf)
        if new.shape == old.shape and not new.is_meta and torch.equal(new, old.to(new.dtype)):
            continue
        value = nn.Parameter(new.detach().clone().to(old.dtype), requires_grad=old.requires_grad) \
            if isinstance(old, nn.Parameter) else new.detach().clone().to(old.dtype)
        for n in names:
            owner, leaf = attr_owner(out, n)
            if isinstance(value, nn.Parameter):
                owner._parameters[leaf] = value
            else:
                owner._buffers[leaf] = value
            if new.shape != old.shape:
                changed.add(_owner(n))
                shrunk.setdefault(_owner(n), []).extend(
                    (names, d, int(a)) for d, (a, b) in enumerate(zip(old.shape, new.shape)) if a != b and a > 1)
    changed |= _created_biases(small, out)
    selected, cannot = _select_inputs(small, out)
    changed |= selected
    _recompute_weight_norms(out, changed)
    # norms made compensated now, from the graph's arguments (group norms of a class whose own forward computes
    # something else: stale, their channels stay)
    compensated, own_forward = _compensated_norms(small, out)
    standardized, unknown = _compensated_std_convs(small, out)
    changed |= compensated | standardized
    own_forward |= unknown
    # attention modules whose heads narrowed get their head width and count first (GPT-2's updater reads them)
    narrowed = {p for p, m in out.named_modules() if any(_inside(c, p) for c in changed)
                and (_set_heads(m, p, small.meta.get(KEPT_KEY, {}), small.meta.get(HEADS_KEY, {}))
                     or _set_key_value_dims(m, p, small.meta.get(KEPT_KEY, {})))}
    changed |= narrowed
    # containers whose forward reads their children's sizes (attention head counts, a latent attention's rank) are
    # updated after them
    changed |= {p for p, m in out.named_modules() if _by_name(m) is not None and any(_inside(c, p) for c in changed)}
    stale = sorted(own_forward | set(cannot))
    groups = _graph_groups(small)
    for path in sorted(changed, key=lambda p: -p.count(".")):
        if path in compensated or path in own_forward:
            continue
        m = out.get_submodule(path)
        update = _updater(m)
        if hasattr(m, "removed_sq_sum") and (hasattr(m, "full_size") or hasattr(m, "full_channels")) \
                and not standardizes(m):
            # a norm fxprune compensated before
            if not _recompensate(model, out, path, small.meta.get(KEPT_KEY, {}), inputs):
                stale.append(path)
        elif update is not None:
            if path in groups and isinstance(m, nn.modules.conv._ConvNd):
                m.groups, m.out_channels = groups[path], m.weight.shape[0]  # the graph's (_conv reads them)
            update(m)
        elif path in narrowed:
            pass
        elif _is_rms_norm(m):
            try:
                _compensate_rms_module(model, out, path, small.meta.get(KEPT_KEY, {}), inputs)
            except UnsupportedError:  # (a scale it cannot read, channels it cannot find): its channels stay
                stale.append(path)
        elif type(m).__module__.split(".")[0] != "fxprune":
            stale.append(path)
    _count_bare_instance_norms(out, inputs)
    # the module that calls a changed one and keeps an integer attribute that divides the old size of the child's
    # output channels (an attention's ``head_dim`` or ``all_head_size``) may reshape that output with it: those
    # output dims are suspects ("name:dim"), frozen only if the check fails. Input dims are the caller's own input.
    for path, dims in shrunk.items() if suspects is not None else ():
        parent = out.get_submodule(path.rpartition(".")[0])
        if path in stale:
            continue
        sizes = [v for key, v in vars(parent).items() if not key.startswith("_") and type(v) is int and v > 1]
        child = out.get_submodule(path)
        for names, d, size in dims:
            output = d == 0 if isinstance(child, (nn.Linear, nn.modules.conv._ConvNd)) else True
            if output and any(size % v == 0 for v in sizes):
                suspects.extend(f"{n}:{d}" for n in names)
    return out, stale


def _keeps_sizes(m: nn.Module) -> bool:
    """Whether a module keeps anything besides its tensors that its forward could read a size from: an integer (not
    a bool), a container, or any other object (a config). Numbers, bools, strings and functions are no sizes: a
    module holding only those (timm's ``LayerScale2d``: ``gamma``, ``init_values``, ``inplace``) reads its sizes
    off its tensors, which are written; it may still compute something else over them (ConvNeXt-V2's global
    response norm, a mean over channels), so it stays stale."""
    for key, v in vars(m).items():
        if key.startswith("_") or key == "training" or v is None or isinstance(v, (bool, float, str, torch.Tensor)):
            continue
        if callable(v) and not isinstance(v, (nn.Module, type)):  # (a function it calls: F.gelu)
            continue
        return True
    return False


def _inside(path: str, parent: str) -> bool:
    """Whether module ``path`` is inside module ``parent`` ("" being the model itself)."""
    return path.startswith(parent + ".") if parent else bool(path)


def _count_bare_instance_norms(out: nn.Module, inputs: tuple[Any, ...]) -> None:
    """``num_features`` of the instance norms that hold no tensor (no affine, no running statistics), whose channels
    no tensor shows: read off their inputs in one forward of ``out`` at the example (in eval mode, drawing no
    randomness). Their forward does not use it, but warns at every call where it differs from the input's
    channels."""
    bare = [m for m in out.modules() if isinstance(m, nn.modules.instancenorm._InstanceNorm)
            and m.weight is None and m.running_mean is None]
    if not bare:
        return
    seen: dict[nn.Module, int] = {}

    def enter(m: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]
        seen.setdefault(m, x.shape[x.dim() - m._get_no_batch_dim()])

    handles = [m.register_forward_pre_hook(enter) for m in bare]
    try:
        with torch.no_grad(), eval_modes(out), torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (the warning this is to silence)
            out(*inputs)
    except Exception:  # noqa: BLE001 (a copy that cannot run yet: the check after the write-back says why)
        pass
    finally:
        for h in handles:
            h.remove()
    for m, channels in seen.items():
        m.num_features = channels


def _is_rms_norm(m: nn.Module) -> bool:
    """A hand-written RMSNorm module (transformers' ``LlamaRMSNorm`` and kin): a 1-D weight and an epsilon."""
    w = getattr(m, "weight", None)
    return (type(m).__name__.endswith("RMSNorm") and isinstance(w, torch.Tensor) and w.dim() == 1
            and isinstance(getattr(m, "variance_epsilon", getattr(m, "eps", None)), float))


def _compensate_rms_module(model: nn.Module, out: nn.Module, path: str, kept: dict[str, list[Any]],
                           inputs: tuple[Any, ...]) -> None:
    """Replace the RMSNorm module at ``path`` of ``out``, whose stream lost channels, by a
    :class:`~fxprune.nn.CompensatedRMSNorm` whose sum of squares adds the removed channels' constants. Those are
    read off the original model's input to that module at the example (and must be constant there)."""
    from fxprune.nn.norm import CompensatedRMSNorm

    idx = (kept.get(f"{path}.weight") or [None])[0]
    if idx is None:
        raise UnsupportedError(f"no record of which channels of '{path}' were kept")
    orig = model.get_submodule(path)
    values = _removed_constants(model, path, idx, inputs)
    new_mod = out.get_submodule(path)
    eps = getattr(orig, "variance_epsilon", getattr(orig, "eps", None))
    repl = CompensatedRMSNorm(int(idx.numel()), orig.weight.shape[0], eps, float((values ** 2).sum()),
                              dtype=new_mod.weight.dtype, offset=_rms_offset(orig, eps))
    repl.weight = nn.Parameter(new_mod.weight.detach().clone(), requires_grad=new_mod.weight.requires_grad)
    parent, leaf = attr_owner(out, path)
    setattr(parent, leaf, repl)


def _removed_constants(model: nn.Module, path: str, idx: torch.Tensor, inputs: tuple[Any, ...]) -> torch.Tensor:
    """The constants the channels of the norm at ``path`` that ``idx`` does not keep hold in the original model
    (read off its input to that module at the example, channels last, or at dim 1 for a channels-first norm), in
    float64. Raises :class:`UnsupportedError` where they are not constant there or no dim holds the channels."""
    orig = model.get_submodule(path)
    full = orig.weight.shape[0]
    removed = torch.ones(full, dtype=torch.bool, device=orig.weight.device)
    removed[idx] = False
    seen: list[torch.Tensor] = []
    handle = orig.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        handle.remove()
    x = seen[0]
    if hasattr(orig, "full_channels"):  # a compensated group norm: its channels are dim 1
        dim = 1 if x.dim() > 1 and x.shape[1] == full else None
    else:
        dim = -1 if x.shape[-1] == full else 1 if x.dim() > 2 and x.shape[1] == full else None
    if dim is None:
        raise UnsupportedError(f"no dim of the input of '{path}' ({tuple(x.shape)}) holds its {full} channels")
    values = x.movedim(dim, -1).reshape(-1, full)[:, removed].to(torch.float64)
    if not bool((values == values[:1]).all()):
        raise UnsupportedError(f"the channels removed from the stream read by '{path}' are not constant")
    return values[0]


def _recompensate(model: nn.Module, out: nn.Module, path: str, kept: dict[str, list[Any]],
                  inputs: tuple[Any, ...]) -> bool:
    """A norm fxprune compensated in an earlier call (the cycle minimizes its own output again) whose stream lost
    more channels: its removed sums gain what the newly removed channels hold (torch.export traces through its
    forward, so the graph's rewrite of those sums cannot be written back as the module's arguments). False where
    the kept channels are not on record (a norm without weight): then its channels stay."""
    idx = (kept.get(f"{path}.weight") or [None])[0]
    if idx is None or getattr(model.get_submodule(path), "weight", None) is None:
        return False
    try:
        values = _removed_constants(model, path, idx, inputs)
    except UnsupportedError:
        return False
    norm = out.get_submodule(path)
    if getattr(norm, "kept_per_group", None) is not None:  # a group norm: the sums per group
        keep = torch.zeros(norm.kept, dtype=torch.bool)
        keep[idx.cpu()] = True
        per = norm.full_channels // len(norm.kept_per_group)
        norm.kept_per_group, norm.removed_sum, norm.removed_sq_sum = shrunk_groups(
            norm.kept_per_group, norm.removed_sum, norm.removed_sq_sum, keep, values.cpu())
        norm.kept, norm.full_channels = int(idx.numel()), per * len(norm.kept_per_group)
        return True
    norm.removed_sq_sum = float(norm.removed_sq_sum) + float((values ** 2).sum())
    if hasattr(norm, "removed_sum"):
        norm.removed_sum = float(norm.removed_sum) + float(values.sum())
    if hasattr(norm, "kept"):
        norm.kept = int(idx.numel())
    if hasattr(norm, "normalized_shape"):
        norm.normalized_shape = (int(idx.numel()),)
    return True


def _rms_offset(norm: nn.Module, eps: float | None) -> float:
    """What a hand-written RMSNorm scales by, read off the module itself on a probe: ``weight`` (offset 0, Llama's)
    or ``1 + weight`` (offset 1, Gemma's). Anything else raises :class:`UnsupportedError` (its channels stay)."""
    w = norm.weight.detach().to("cpu", torch.float64)
    x = torch.randn(3, w.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    probe = copy.deepcopy(norm).to("cpu", torch.float64)  # (a bfloat16 norm rounds past the tolerance)
    with torch.no_grad():
        got = probe(x)
    base = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + (eps if eps is not None else torch.finfo(x.dtype).eps))
    for offset in (0.0, 1.0):
        if torch.allclose(got, base * (offset + w), rtol=1e-4, atol=1e-6):
            return offset
    raise UnsupportedError(f"{type(norm).__name__} scales its normalized input by neither its weight nor 1 + weight")


# convolution ops -> the position of their groups argument: a symbolic trace calls torch.convNd, torch.export keeps
# aten.convNd, a decomposed graph has aten.convolution
_CONVS = {torch.conv1d: 6, torch.conv2d: 6, torch.conv3d: 6, torch.ops.aten.convolution.default: 8,
          **{getattr(getattr(torch.ops.aten, f"conv{d}d"), overload): 6 for d in (1, 2, 3)
             for overload in ("default", "padding")}}


def _graph_groups(small: torch.fx.GraphModule) -> dict[str, int]:
    """The ``groups`` of each convolution of ``small``, by the path of the module whose weight it reads: the sizes
    of a module cannot tell 10 groups of 9 output channels from 6 groups of 15."""
    out = {}
    for n in small.graph.nodes:
        pos = _CONVS.get(n.target) if n.op == "call_function" else None
        if pos is None:
            continue
        groups = n.args[pos] if len(n.args) > pos else n.kwargs.get("groups", 1)
        w = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
        if isinstance(groups, int) and isinstance(w, torch.fx.Node) and w.op == "get_attr":
            out[w.target.rpartition(".")[0]] = groups
    return out


def _module_path(node: torch.fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    return list(stack.values())[-1][0] if stack else None


def _compensated_std_convs(small: torch.fx.GraphModule, out: nn.Module) -> tuple[set[str], set[str]]:
    """Weight-standardized convolutions whose weight minimize compensated (input channels removed): made
    :class:`~fxprune.nn.stdconv.CompensatedStdConv2d` subclasses of their class, with the removed entries' sums of
    the graph. Returns those, and the modules of another class computing such a weight (their channels stay)."""
    done, other = set(), set()
    for n in small.graph.nodes:
        if n.target is not compensated_standardization:
            continue
        path = _module_path(n)
        old = out.get_submodule(path) if path is not None else None
        if not standardizes(old):
            if path is None:
                raise UnsupportedError(f"minimize compensated a weight standardization ({n.name}) no module computes")
            other.add(path)
            continue
        s1, s2 = (get_attr(small, a.target) for a in n.args[1:3])
        compensate_std_conv_(old, n.args[3], s1, s2)
        done.add(path)
    return done, other


def _created_biases(small: torch.fx.GraphModule, out: nn.Module) -> set[str]:
    """Biases minimize created to fold a constant into a layer that had none: registered on that layer."""
    done = set()
    for n in small.graph.nodes:
        if n.op != "get_attr" or not n.target.endswith("_folded_bias"):
            continue
        users = list(n.users)
        path = _module_path(users[0]) if len(users) == 1 else None
        layer = out.get_submodule(path) if path is not None else None
        if layer is None or getattr(layer, "bias", "missing") is not None:
            raise UnsupportedError(f"minimize folded a constant into a bias that no module of the model holds "
                                   f"({n.target}); minimize the graph instead (fp.minimize)")
        weight = layer.weight
        layer.bias = nn.Parameter(get_attr(small, n.target).detach().clone().to(weight.dtype), requires_grad=weight.requires_grad)
        done.add(path)
    return done


@torch.no_grad()
def _subclass_form(norm: nn.LayerNorm) -> bool | str | None:
    """How a LayerNorm subclass with a forward of its own can be compensated, probed on random inputs (channels in
    dim 1 and last, of 3 and 4 dims): ``False`` where its forward reaches ``super().forward`` (made compensated, the
    output changes with statistics that differ); ``True`` where it never does and is a norm over dim 1 (torchvision's
    ``LayerNorm2d``, SqueezeBERT's ``nn.LayerNorm.forward(self, x.permute(0, 2, 1))``); ``"replace"`` where it never
    does and is ``nn.LayerNorm``'s own function, over the last dim (timm's ``LayerNorm`` calls ``F.layer_norm``
    itself): a :class:`CompensatedLayerNorm` stands in for it; ``None`` where it is none of these (its channels must
    stay)."""
    w = norm.weight
    size = w.shape[0] if w is not None else norm.normalized_shape[0]
    dtype = w.dtype if w is not None else torch.float32
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, size, 3, 3, generator=g).to(dtype), torch.randn(2, size, 3, generator=g).to(dtype)]
    norm = copy.deepcopy(norm)  # (its weight may be the kept one already: its sizes follow)
    norm.normalized_shape = (size,)
    probe = copy.deepcopy(norm)
    probe.__class__ = compensated_subclass(type(norm))
    probe.full_size, probe.removed_sum, probe.removed_sq_sum = size + 1, 1.0, 4.0
    for form in [f for x in xs for f in (x, x.movedim(1, -1))]:
        try:
            if not torch.equal(probe(form), norm(form)):
                return False  # it reaches super().forward
        except Exception:  # noqa: BLE001 (a layout this norm does not take)
            continue
    for form, last in ((True, False), ("replace", True)):
        for x in xs:
            x = x.movedim(1, -1) if last else x
            try:
                out = norm(x)
            except Exception:  # noqa: BLE001
                continue
            ref = torch.nn.functional.layer_norm(x if last else x.movedim(1, -1), (size,), w, norm.bias, norm.eps)
            ref = ref if last else ref.movedim(-1, 1)
            if out.shape == ref.shape and bool(torch.allclose(out, ref, rtol=1e-5, atol=1e-6)):
                return form
            break  # (the first layout it takes decides)
    return None


@torch.no_grad()
def _a_group_norm(norm: nn.GroupNorm) -> bool:
    """Whether ``norm`` computes ``nn.GroupNorm``'s function: its forward is GroupNorm's, or one of its own (timm's
    ``GroupNorm1`` calls ``F.group_norm`` itself) gives the same on a probe. Then a ``CompensatedGroupNorm`` can
    stand in for it."""
    return type(norm).forward is nn.GroupNorm.forward or _computes_group_norm_then(norm, [])


# children a GroupNorm subclass applies after the norm, in order: transformers' BitGroupNormActivation, timm's
# GroupNormAct / GroupNorm1Act
AFTER_NORM = (("activation",), ("drop", "act"))


def _after_norm(norm: nn.Module) -> tuple[str, ...] | None:
    """The names of the children (:data:`AFTER_NORM`) a GroupNorm subclass applies after ``F.group_norm`` in its
    forward, as a probe shows; else None."""
    for names in AFTER_NORM:
        mods = [norm._modules.get(n) for n in names]
        if all(isinstance(m, nn.Module) for m in mods) and _computes_group_norm_then(norm, mods):
            return names
    return None


def _computes_group_norm_then(norm: nn.Module, after: list[nn.Module]) -> bool:
    """Whether ``norm`` (a GroupNorm subclass) computes ``F.group_norm`` and then each module of ``after``, on a
    probe at the width its ``num_groups`` divides (its affine, possibly sliced already, stands aside; its children's
    modes are restored after)."""
    w = getattr(norm, "weight", None)
    if not isinstance(norm, nn.GroupNorm) or w is None:
        return False
    probe = copy.copy(norm)
    probe._parameters = dict(norm._parameters)
    g = torch.Generator().manual_seed(0)
    x, pw, pb = (torch.randn(*shape, generator=g).to(w.device, w.dtype)
                 for shape in ((2, norm.num_channels, 3, 4), (norm.num_channels,), (norm.num_channels,)))
    probe.weight, probe.bias = nn.Parameter(pw), nn.Parameter(pb)
    try:
        with torch.no_grad(), eval_modes(norm):
            got = probe(x)
            ref = torch.nn.functional.group_norm(x, norm.num_groups, pw, pb, norm.eps)
            for m in after:
                ref = m(ref)
    except Exception:  # noqa: BLE001 (a layout this norm does not take)
        return False
    return isinstance(got, torch.Tensor) and got.shape == ref.shape and bool(torch.allclose(got, ref, rtol=1e-5, atol=1e-6))


def _compensated_norms(small: torch.fx.GraphModule, out: nn.Module) -> tuple[set[str], set[str]]:
    """Norms minimize turned into compensated ones (stream channels removed): replaced by the modules. Returns
    those, and the group norms whose class has a forward of its own that computes something else than GroupNorm
    (their channels must stay)."""
    from fxprune.nn.norm import CompensatedGroupNorm, CompensatedLayerNorm, CompensatedRMSNorm

    done, own_forward = set(), set()
    for n in small.graph.nodes:
        if n.target not in (compensated_layer_norm, compensated_rms_norm, compensated_group_norm):
            continue
        path = _module_path(n)
        if path is None:
            raise UnsupportedError(f"minimize compensated a norm ({n.name}) that no module of the model is")
        args = list(n.args)
        if n.target is compensated_group_norm:
            old = out.get_submodule(path)
            if type(old) is CompensatedGroupNorm and small.meta.get(CAPTURE_METHOD_KEY) == "export":
                continue  # the group norm inside a grouped one's forward, traced through: _recompensate's to update
            after = None
            if not (type(old) is CompensatedGroupNorm  # (one made by an earlier call: a symbolic trace keeps its call)
                    or isinstance(old, nn.GroupNorm) and _a_group_norm(old)):
                after = _after_norm(old)
                if after is None:
                    own_forward.add(path)
                    continue
            w, b = (get_attr(small, a.target) if a is not None else None for a in args[1:3])
            new = CompensatedGroupNorm(n.meta["val"].shape[1], args[4], args[3], args[5], args[6], affine=w is not None,
                                       dtype=w.dtype if w is not None else None,
                                       kept_per_group=args[7] if len(args) > 7 else None)
            for name, t, src in (("weight", w, old.weight), ("bias", b, old.bias)):
                if t is not None:
                    setattr(new, name, nn.Parameter(t.detach().clone(), requires_grad=src.requires_grad))
            if after is not None:  # (BiT's norm applies its activation after the norm: the new one does too)
                new.activation = (old._modules[after[0]] if len(after) == 1
                                  else nn.Sequential(*(old._modules[n] for n in after)))
                new._fxprune_after = list(after)  # (the user's names, for fp.load to find them in build()'s module)
            elif type(old) is CompensatedGroupNorm and "activation" in old._modules:
                new.activation, new._fxprune_after = old.activation, getattr(old, "_fxprune_after", ["activation"])
            setattr(*attr_owner(out, path), new)
            done.add(path)
            continue
        ndim = args[7 if n.target is compensated_layer_norm else 5] if len(args) > (7 if n.target is compensated_layer_norm else 5) else 1
        if ndim != 1:
            raise UnsupportedError(f"the norm at '{path}' normalizes over {ndim} dims: no module form of its compensation yet")
        old = out.get_submodule(path)
        w = get_attr(small, args[1].target) if args[1] is not None else None
        kept = int(n.meta["val"].shape[-1])  # (a norm without weight has no tensor that says it)
        own = (n.target is compensated_layer_norm and isinstance(old, nn.LayerNorm)
               and type(old).forward is not nn.LayerNorm.forward)
        form = _subclass_form(old) if own else "replace"
        if form is None:
            own_forward.add(path)
            continue
        if form != "replace":
            # a LayerNorm subclass with a forward of its own (channels-first norms call super().forward on a moved
            # view): the module keeps its class, and the LayerNorm its forward reaches becomes the compensated one
            # (or, for a norm over dim 1 that calls F.layer_norm itself, its forward the compensated norm over dim 1)
            b = get_attr(small, args[2].target) if args[2] is not None else None
            old.__class__ = compensated_subclass(type(old), form)
            old.full_size, old.removed_sum, old.removed_sq_sum = int(args[4]), float(args[5]), float(args[6])
            old.eps, old.normalized_shape = float(args[3]), (kept,)
            if w is not None:
                old.weight = nn.Parameter(w.detach().clone(), requires_grad=old.weight.requires_grad)
            if b is not None:
                old.bias = nn.Parameter(b.detach().clone(), requires_grad=old.bias.requires_grad)
            done.add(path)
            continue
        if n.target is compensated_layer_norm:
            b = get_attr(small, args[2].target) if args[2] is not None else None
            new = CompensatedLayerNorm(kept, args[4], args[3], args[5], args[6], elementwise_affine=w is not None,
                                       bias=b is not None, dtype=w.dtype if w is not None else None)
            if b is not None:
                new.bias = nn.Parameter(b.detach().clone())
        else:
            new = CompensatedRMSNorm(kept, args[3], args[2], args[4], elementwise_affine=w is not None,
                                     dtype=w.dtype if w is not None else None)
        if w is not None:
            new.weight = nn.Parameter(w.detach().clone())
        parent, leaf = attr_owner(out, path)
        setattr(parent, leaf, new)
        done.add(path)
    return done, own_forward
