"""Shape-general results: dynamic capture, passes that keep symbolic sizes, checks at several shapes, the input
program left untouched, and ExportedProgram in -> out with the same dynamic dims."""
from __future__ import annotations

import pytest
import torch
from torch.export import Dim

import fxprune as fp
from fxprune import zoo
from fxprune.graph.dynamic import DYNAMIC_KEY, InputDims, free_shapes, resize, shaped_inputs
from fxprune.passes.minimize import CHECKS_KEY
from fxprune.verify import count_params

pytestmark = pytest.mark.filterwarnings("ignore")

MLP = {"convnext": ("pwconv1", 0), "vit": ("mlp.fc1", 0), "gpt2": ("mlp.c_fc", 1), "bert": ("intermediate.dense", 0),
       "llama": ("mlp.up_proj", 0)}
TEXT = ("bert", "gpt2", "llama")


def planted(name: str) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...], int]:
    """A tiny float64 transformers model with a quarter of every MLP's hidden units dead (zero input rows, a random
    bias where the layer has one), its example inputs (batch 2; 16 tokens for text) and the parameters planted dead."""
    model, (x,) = zoo.build(name)
    model = model.double().eval()
    layer, dim = MLP[name]
    g = torch.Generator().manual_seed(0)
    dead = 0
    with torch.no_grad():
        for path, mod in model.named_modules():
            if path.endswith(layer):
                n = mod.weight.shape[dim]
                idx = torch.randperm(n, generator=g)[: n // 4]
                mod.weight.index_fill_(dim, idx, 0.0)
                dead += len(idx) * mod.weight.shape[1 - dim]
                if mod.bias is not None:
                    mod.bias.normal_(0.0, 0.1, generator=g)
    x = torch.randint(0, 100, (2, 16)) if name in TEXT else torch.randn(2, *x.shape[1:], dtype=torch.float64)
    return model, (x,), dead


def at(x: torch.Tensor, batch: int, seq: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(batch * 100 + (seq or 0))
    if x.dtype == torch.long:
        return torch.randint(0, 100, (batch, seq or x.shape[1]), generator=g)
    return torch.randn(batch, *x.shape[1:], generator=g, dtype=x.dtype)


def logits(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else (out.logits if hasattr(out, "logits") else out[0])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def shapes_of(name: str) -> list[tuple[int, int | None]]:
    return [(1, 5), (5, 24), (5, 5), (1, 24)] if name in TEXT else [(1, None), (5, None)]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["convnext", "vit", "bert", "gpt2", "llama"])
def test_minimized_program_is_exact_at_other_batch_sizes_and_sequence_lengths(name):
    model, (x,), dead = planted(name)
    ds = ({0: Dim("batch", min=1, max=16), 1: Dim("seq", min=2, max=32)},) if name in TEXT else ({0: Dim("batch", min=1, max=16)},)
    ep = torch.export.export(model, (x,), dynamic_shapes=ds, strict=False)
    small = fp.minimize(ep)
    assert small.range_constraints.keys() and {str(k): (int(v.lower), int(v.upper)) for k, v in small.range_constraints.items()} \
        == {str(k): (int(v.lower), int(v.upper)) for k, v in ep.range_constraints.items()}
    assert count_params(ep.module()) - count_params(small.module()) >= dead
    run = small.module()
    for b, t in shapes_of(name):
        xi = at(x, b, t)
        with torch.no_grad():
            assert rel(logits(model(xi)), logits(run(xi))) <= 1e-9, (b, t)


@pytest.mark.parametrize("name", ["vit", "gpt2"])
def test_default_capture_keeps_the_batch_dynamic_from_a_batch_of_one(name):
    model, (x,), _ = planted(name)
    x1 = x[:1]
    gm = fp.capture(model, (x1,))  # no dynamic_shapes: the batch is dynamic where the model allows it
    dims = gm.meta[DYNAMIC_KEY]
    assert dims.dynamic and isinstance(dims.dims[0][0], str)
    small = fp.minimize(gm)
    checked = [c.shapes for c in small.meta[CHECKS_KEY]]
    assert len(checked) >= 2 and checked[0].startswith("1x")
    for b in (1, 3):
        xi = at(x, b)
        with torch.no_grad():
            assert rel(logits(model(xi)), logits(small(xi))) <= 1e-9


def test_static_shapes_on_request():
    model, (x,), _ = planted("gpt2")
    gm = fp.capture(model, (x,), dynamic_shapes=None)
    assert not gm.meta[DYNAMIC_KEY].dynamic
    with pytest.raises(Exception):
        gm(at(x, 3))


def test_explicit_torch_export_spec_is_passed_through():
    model, (x,), _ = planted("gpt2")
    gm = fp.capture(model, (x,), dynamic_shapes=({1: Dim("seq", min=2, max=40)},))
    dims = gm.meta[DYNAMIC_KEY]
    assert dims.dims[0][0] == 2 and isinstance(dims.dims[0][1], str)
    assert list(dims.ranges.values()) == [(2, 40)]
    small = fp.minimize(gm)
    with torch.no_grad():
        assert rel(logits(model(at(x, 2, 33))), logits(small(at(x, 2, 33)))) <= 1e-9


def test_symbolic_graphs_check_other_batch_sizes():
    model, (x,) = zoo.build("residual_mlp")
    with torch.no_grad():
        model.blocks[0][0].weight[::2] = 0
    gm = fp.capture(model, (x,))
    assert gm.meta.get("fxprune_capture_method") == "symbolic" and gm.meta[DYNAMIC_KEY].dynamic
    small = fp.minimize(gm)
    assert [c.shapes for c in small.meta[CHECKS_KEY]] == ["4x12", "1x12", "5x12"]
    y = torch.randn(7, 12)
    assert torch.allclose(model(y), small(y), atol=1e-6)


def test_passes_never_touch_the_input_program_and_it_still_runs_at_other_shapes():
    model, (x,), _ = planted("gpt2")
    ds = ({0: Dim("batch", min=1, max=16), 1: Dim("seq", min=2, max=32)},)
    ep = torch.export.export(model, (x,), dynamic_shapes=ds, strict=False)
    before = {n.name: (str(n.meta.get("val").shape) if hasattr(n.meta.get("val"), "shape") else repr(n.meta.get("val")),
                       str(getattr(n.meta.get("tensor_meta"), "shape", None))) for n in ep.graph.nodes}
    ranges = dict(ep.range_constraints)
    masked = fp.mask(ep, 0.5)
    small = fp.minimize(masked)
    fp.compensate_layernorm(ep)
    fp.release(small)
    after = {n.name: (str(n.meta.get("val").shape) if hasattr(n.meta.get("val"), "shape") else repr(n.meta.get("val")),
                      str(getattr(n.meta.get("tensor_meta"), "shape", None))) for n in ep.graph.nodes}
    assert after == before and dict(ep.range_constraints) == ranges
    assert any("s" in v[0] for v in before.values())  # symbolic sizes were there to lose
    with torch.no_grad():  # the original program still serves other shapes
        assert rel(logits(model(at(x, 3, 7))), logits(ep.module()(at(x, 3, 7)))) <= 1e-12
    for prog in (masked, small):
        assert {str(k) for k in prog.range_constraints} == {str(k) for k in ranges}


def test_state_dict_names_and_call_signature_survive():
    model, (x,), _ = planted("vit")
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: Dim("batch", min=1, max=16)},), strict=False)
    small = fp.minimize(ep)
    assert set(small.state_dict) == set(ep.state_dict)
    assert type(small.module()(x)) is type(model(x))
    assert small.call_spec.in_spec == ep.call_spec.in_spec


def test_verify_reports_every_shape_and_fails_where_a_shape_differs():
    model, (x,), _ = planted("gpt2")
    ds = ({0: Dim("batch", min=1, max=16), 1: Dim("seq", min=2, max=32)},)
    ep = torch.export.export(model, (x,), dynamic_shapes=ds, strict=False)
    small = fp.minimize(ep)
    rep = fp.verify(ep, small)
    assert rep.ok and {s.shapes for s in rep.shapes} >= {"2x16", "1x1", "16x32"}
    assert "shapes (16x32)" in str(rep)
    static = torch.export.export(model, (x,), strict=False)  # right at the example, wrong shape elsewhere
    bad = fp.verify(ep, static)
    assert not bad.ok and any(s.max_rel == float("inf") for s in bad.shapes)


def test_self_check_fails_closed_at_a_shape_other_than_the_example(monkeypatch):
    """A rewrite that is exact at the example but not at another batch size must not come back."""
    from fxprune.passes import minimize as mz

    model, (x,) = zoo.build("residual_mlp")
    with torch.no_grad():
        model.blocks[0][0].weight[::2] = 0
    gm = fp.capture(model, (x,))
    real = mz.Rewriter.run

    def batch_specific(self):
        out = real(self)
        out.register_buffer("skew", torch.zeros(x.shape[0], 1))  # broadcasts at the example batch only
        node = [n for n in out.graph.nodes if n.op == "output"][0]
        with out.graph.inserting_before(node):
            skew = out.graph.get_attr("skew")
            new = out.graph.call_function(torch.add, (node.args[0], skew))
        node.args = (new,)
        out.recompile()
        return out

    monkeypatch.setattr(mz.Rewriter, "run", batch_specific)
    with pytest.raises(fp.EquivalenceError, match="input shapes"):
        fp.minimize(gm)


def test_sums_over_a_dynamic_dim_are_not_folded_as_constants():
    """sum over the sequence of a constant channel grows with the length: never a fact to fold."""

    class SeqSum(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 6), torch.nn.Linear(6, 3)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)).sum(1))

    m = SeqSum().double()
    with torch.no_grad():
        m.a.weight[:3] = 0
        m.a.bias[:3] = 0.5  # three constant channels: relu(0.5) = 0.5 at every position
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    small = fp.minimize(fp.capture(m, (x,), dynamic_shapes=({0: Dim.AUTO, 1: Dim.AUTO},)))
    for t in (1, 9):
        xi = torch.randn(3, t, 4, dtype=torch.float64)
        assert rel(m(xi), small(xi)) <= 1e-12
    assert count_params(small) == count_params(m)  # nothing folded: the sum's constant depends on the length


def test_input_dims_check_points_and_resize():
    dims = InputDims((("b", "t"), ("b",)), {"b": (1, 16), "t": (2, None)}, {"b": 2, "t": 8})
    assert dims.check_points() == [{"b": 2, "t": 8}, {"b": 1, "t": 1}, {"b": 16, "t": 9}]
    assert dims.sizes({"b": 3, "t": 4}) == [(3, 4), (3,)]
    xs = resize((torch.arange(6).reshape(2, 3), torch.arange(2)), [(3, 5), (3,)])
    assert xs[0].tolist() == [[0, 1, 2, 0, 1], [3, 4, 5, 3, 4], [0, 1, 2, 0, 1]] and xs[1].tolist() == [0, 1, 0]
    spec = dims.export_spec()
    assert spec[0][0] is spec[1][0] and spec[0][0].min == 1 and spec[0][0].max == 16


def test_free_shapes_vary_the_dims_held_static_that_the_model_takes_other_sizes_of():
    # ids and their mask share their length, so they vary together; the features' width (24) is no size the model
    # takes at 48; the batch is already dynamic, so it is not tried; with nothing held static, nothing is tried.
    ids, mask, feats = torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5), torch.zeros(2, 24)
    dims = InputDims((("b", 5), ("b", 5), ("b", 24)), {"b": (1, None)}, {"b": 2})
    tried = []

    def takes(xs):
        tried.append(tuple(tuple(x.shape) for x in xs))
        return xs[0].shape == xs[1].shape and xs[2].shape[1] == 24

    shapes = free_shapes(dims, (ids, mask, feats), takes)
    assert shapes == (((2, 10), (2, 10), (2, 24)), ((2, 6), (2, 6), (2, 24)))
    assert sorted(tried) == [((2, 5), (2, 5), (2, 48)), ((2, 10), (2, 10), (2, 24))]
    held = InputDims(((2, 5), (2, 5), (2, 24)), {}, {}, free=shapes)
    assert [tuple(x.shape) for x in shaped_inputs(held, (ids, mask, feats))[2]] == [(2, 6), (2, 6), (2, 24)]
    tried.clear()
    free = InputDims((("b", "s"), ("b", "s"), ("b", "f")), {"b": (1, None), "s": (1, None), "f": (1, None)},
                     {"b": 2, "s": 5, "f": 24})
    assert free_shapes(free, (ids, mask, feats), takes) == () and tried == []
    assert free_shapes(None, (feats,), lambda xs: True) == (((4, 48),), ((3, 25),))  # None: every dim held


def test_squeeze_release_trains_a_transformer_with_other_batch_sizes():
    model, (x,), _ = planted("gpt2")
    model = model.float()
    seen = []

    def train(m):
        for b in (3, 1):
            xi = at(x, b)  # the example has 2 sequences of 16 tokens
            seen.append(tuple(logits(m(xi)).shape))

    res = fp.squeeze_release(model, (x,), train=train, evaluate=lambda m: 1.0, cycles=1, sparsity=0.3, mask_steps=1,
                             progress=False)
    assert (3, 16, 100) in seen and (1, 16, 100) in seen
    assert logits(res.module(at(x, 4))).shape == (4, 16, 100)


@pytest.mark.parametrize("name", ["vit", "convnext"])
def test_layer_norm_shape_rule_annotates_as_its_meta_kernel_does(name, monkeypatch):
    """Annotation skips LayerNorm's slow Python meta kernel (``graph/shapes.py:_SHAPE_RULES``): every node's shape,
    dtype and dynamic dims are the same as with the kernel, at a dynamic batch and sequence/image size."""
    from fxprune.graph import shapes
    from fxprune.graph.shapes import DYNAMIC_DIMS, annotate, node_spec
    from fxprune.passes.lower import lower_modules

    model, inputs = zoo.build(name)
    gm = lower_modules(fp.capture(model, inputs, dynamic_shapes="every" if name == "vit" else "batch"))
    assert any(n.target is torch.ops.aten.layer_norm.default for n in gm.graph.nodes)

    def specs() -> dict[str, tuple]:
        annotate(gm, inputs, gm.meta[DYNAMIC_KEY])
        return {n.name: (node_spec(n), n.meta.get(DYNAMIC_DIMS)) for n in gm.graph.nodes}

    fast = specs()
    monkeypatch.setattr(shapes, "_SHAPE_RULES", {})
    slow = specs()
    assert fast == slow
    assert any(d for _, d in fast.values())  # the dynamic dims were compared too


class _PooledCNN(torch.nn.Module):
    """A conv net whose head pools over the image: any image size, fixed channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_every_dim_of_a_symbolic_trace_that_the_model_lets_vary_is_dynamic():
    """dynamic_shapes='every' on a symbolically traceable model: batch, height and width vary (the graph runs at
    other sizes), the channels and a Linear's input width stay static; minimize_module takes that path (no
    torch.export) and its result is equal at an image size and a batch the example did not have."""
    torch.manual_seed(0)
    cnn = _PooledCNN().double().eval()
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    gm = fp.capture(cnn, (x,), dynamic_shapes="every")
    assert gm.meta["fxprune_capture_method"] == "symbolic"
    dims = gm.meta[DYNAMIC_KEY]
    assert [isinstance(d, str) for d in dims.dims[0]] == [True, False, True, True]
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).double()
    assert [isinstance(d, str) for d in fp.capture(mlp, (torch.randn(3, 4, dtype=torch.float64),),
                                                    dynamic_shapes="every").meta[DYNAMIC_KEY].dims[0]] == [True, False]
    with torch.no_grad():
        cnn.conv.weight[:3] = 0
        cnn.conv.bias[:3] = -1.0  # three dead channels
    small = fp.minimize_module(cnn, (x,))
    assert type(small) is _PooledCNN and small.conv.out_channels == 5 and small.fc.in_features == 5
    for xi in (x, torch.randn(1, 3, 9, 4, dtype=torch.float64)):
        torch.testing.assert_close(small(xi), cnn(xi), rtol=1e-12, atol=1e-12)


def test_sizes_that_vary_only_at_the_low_end_of_the_range_are_dynamic():
    # An export whose range ends at the example (images of 2 to 8 pixels: three stride-2 convolutions end in a
    # 1x1 map, which export pins): the high check point changes only the batch. The image sizes vary at the low
    # end, which the analysis now reads too (before: every spatial size was the example's, a static size).
    import math
    from fxprune.graph.capture import capture
    from fxprune.graph.shapes import DYNAMIC_DIMS

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2, self.c3 = (torch.nn.Conv2d(c, 8, 3, 2, 1) for c in (3, 8, 8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.c3(self.c2(self.c1(x)))
            return y.sum((2, 3)) / math.prod(x.shape[2:])  # (math.prod: no symbolic trace, torch.export's capture)

    gm = capture(Net(), (torch.randn(2, 3, 8, 8),), dynamic_shapes="every")
    dims = gm.meta[DYNAMIC_KEY]
    high = dims.check_points()[-1]
    assert {s for s in high if high[s] != dims.hints[s]} == {dims.dims[0][0]}  # only the batch
    convs = [n for n in gm.graph.nodes if n.target is torch.ops.aten.conv2d.default]
    assert [n.meta.get(DYNAMIC_DIMS) for n in convs[:2]] == [frozenset({0, 2, 3})] * 2
    assert convs[2].meta.get(DYNAMIC_DIMS) == frozenset({0})  # (1x1 at every size of the range)

    # The same program captured at 16 pixels (annotate's ``like``): the third map's size differs there, so it varies
    # past the range; a later annotate of the graph (minimize's next round) still reads it. Nodes match in order by
    # op, so a capture with an op more (a size-specific one, as MobileViT-v2's at 32 pixels) still marks the rest.
    from fxprune.graph.shapes import annotate

    like = capture(Net(), (torch.randn(4, 3, 16, 16),), dynamic_shapes="every")
    annotate(gm, (torch.randn(2, 3, 8, 8),), dims, like)
    assert convs[2].meta.get(DYNAMIC_DIMS) == frozenset({0, 2, 3})
    annotate(gm, (torch.randn(2, 3, 8, 8),), dims)
    assert convs[2].meta.get(DYNAMIC_DIMS) == frozenset({0, 2, 3})

    class Doubled(Net):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.c3(self.c2(self.c1(x) * 2))
            return y.sum((2, 3)) / math.prod(x.shape[2:])

    fresh = capture(Net(), (torch.randn(2, 3, 8, 8),), dynamic_shapes="every")
    annotate(fresh, (torch.randn(2, 3, 8, 8),), dims, capture(Doubled(), (torch.randn(4, 3, 16, 16),),
                                                             dynamic_shapes="every"))
    convs = [n for n in fresh.graph.nodes if n.target is torch.ops.aten.conv2d.default]
    assert [n.meta.get(DYNAMIC_DIMS) for n in convs] == [frozenset({0, 2, 3})] * 3
