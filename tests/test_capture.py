import copy
import os
import warnings

import pytest
import torch
from torch import nn

import fxprune as fp
from fxprune.graph.capture import LabelsLeftOutWarning, as_inputs, keyword_inputs
from fxprune.graph.shapes import TensorSpec, is_annotated, node_spec
from fxprune.verify import count_params
from fxprune.zoo import TRANSFORMERS, build


class ShapeBranch(nn.Module):
    """Control flow on a shape: symbolic tracing fails, export handles it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.shape[0] > 1:
            return self.fc(x).relu()
        return self.fc(x)


class DataBranch(nn.Module):
    """Control flow on a value: no tracer can capture it."""

    def forward(self, x):
        if x.sum().item() > 0:
            return x * 2
        return x


def _all_annotated(gm):
    tensors = [n for n in gm.graph.nodes if n.op in ("placeholder", "call_function", "call_method")]
    return is_annotated(gm) and sum(isinstance(node_spec(n), TensorSpec) for n in tensors) >= len(tensors) // 2


def test_symbolic_keeps_module_names_and_annotates():
    m, x = build("residual_mlp")
    gm = fp.capture(m, x)
    assert gm.meta["fxprune_capture_method"] == "symbolic"
    names = {n.name for n in gm.graph.nodes}
    assert {"inp", "blocks_0_0", "out"} <= names
    assert _all_annotated(gm)
    torch.testing.assert_close(gm(*x), m(*x))


def test_auto_falls_back_to_export():
    m, x = ShapeBranch().eval(), (torch.randn(3, 4),)
    with pytest.raises(fp.CaptureError, match="try method='export'"):
        fp.capture(m, x, method="symbolic")
    gm = fp.capture(m, x)
    assert gm.meta["fxprune_capture_method"] == "export"
    torch.testing.assert_close(gm(*x), m(*x))


def test_untraceable_model_reports_each_tracer():
    with pytest.raises(fp.CaptureError) as e:
        fp.capture(DataBranch(), (torch.randn(3),))
    msg = str(e.value)
    assert "symbolic:" in msg and "export:" in msg and "What to try" in msg


def test_inputs_that_do_not_fit_raise_input_error():
    m, _ = build("residual_mlp")
    with pytest.raises(fp.InputError, match="example inputs"):
        fp.capture(m, (torch.randn(4, 7),))
    with pytest.raises(fp.InputError):
        fp.capture(m, None)
    assert issubclass(fp.InputError, fp.FxPruneError)


class Optional(nn.Module):
    """A forward with optional inputs, as transformers models have (``attention_mask=None``, ``labels=None``)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x, mask=None, scale: float = 2.0, y=None, *, flag: bool = False):
        h = torch.relu(self.a(x)) * scale
        if mask is not None:
            h = h * mask
        out = self.b(h)
        return out if y is None else out + y


def test_keyword_inputs_are_placed_as_forward_takes_them(capfd):
    torch.manual_seed(0)
    net, x, y = Optional(), torch.randn(5, 4), torch.randn(5, 3)
    with torch.no_grad():
        net.a.weight[:3], net.a.bias[:3] = 0.0, -1.0  # three dead units
    placed = keyword_inputs(net, dict(y=y, x=x))
    assert len(placed) == 4 and placed[0] is x and placed[1] is None and placed[2] == 2.0 and placed[3] is y
    gm = fp.capture(net, dict(x=x, y=y))
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"][:4] == ["x", "mask", "scale", "y"]
    assert torch.equal(gm(x, None, 2.0, y), net(x, y=y))
    assert "Traceback" not in capfd.readouterr().err  # the symbolic trace's failed propagation prints nothing
    from collections import UserDict  # a mapping that is no dict, as a tokenizer's BatchEncoding is

    assert torch.equal(fp.capture(net, UserDict(x=x, y=y))(x, None, 2.0, y), net(x, y=y))
    small = fp.minimize_module(net, dict(x=x, y=y))
    assert type(small) is Optional and small.a.out_features == 5
    x7, y7 = torch.randn(7, 4), torch.randn(7, 3)
    torch.testing.assert_close(small(x7, y=y7), net(x7, y=y7))
    assert fp.verify(net, small, dict(x=x, y=y)).ok
    graph = fp.minimize(net, dict(x=x, y=y))  # the compile-time form with keyword inputs
    assert graph.get_parameter("a.weight").shape == (5, 4)
    fast = fp.compile(net, dict(x=x, y=y), backend="eager")  # called as the model is, defaults left out
    for call in (lambda: fast(x=x7, y=y7), lambda: fast(x7, y=y7), lambda: fast(x7, None, 2.0, y7)):
        torch.testing.assert_close(call(), net(x7, y=y7))
    with pytest.raises(fp.InputError, match=r"mask=a tensor of shape \(7, 8\): the graph was captured with mask=None"):
        fast(x7, mask=torch.ones(7, 8), y=y7)  # a branch the capture did not take: refused, not run without it
    with pytest.raises(fp.InputError, match="y=None: the graph was captured with y=a tensor"):
        fast(x7)
    with pytest.raises(fp.InputError, match="has no positional parameter 'flag'"):
        fp.capture(net, dict(x=x, flag=True))  # keyword-only: a graph takes its inputs positionally
    with pytest.raises(fp.InputError, match="needs 'x' \\(it has no default\\) before 'y'"):
        fp.capture(net, dict(y=y))
    with pytest.raises(fp.InputError, match="there is no model here"):
        as_inputs(dict(x=x))


def test_a_causal_lm_with_its_cache_on_is_told_how_to_capture():
    """A transformers LM as loaded returns its KV cache, which torch.export cannot return: the error says what to
    do instead of blaming control flow, and the model's config is left as it was."""
    transformers = pytest.importorskip("transformers", reason="the model comes from transformers (dev dependency)")
    cfg = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    model, x = transformers.GPT2LMHeadModel(cfg).eval(), torch.randint(0, 50, (2, 7))
    assert model.config.use_cache
    with pytest.raises(fp.CaptureError, match=r"What to try: the model returns transformers' KV cache .* "
                                              r"model.config.use_cache = False .* fp.minimize_module"):
        fp.capture(model, (x,))
    assert model.config.use_cache
    model.config.use_cache = False  # what the error says: the capture then works
    assert torch.equal(fp.capture(model, (x,))(x).logits, model(x).logits)


def test_exported_program_and_graphmodule_inputs():
    m, x = build("cnn")
    ep = torch.export.export(m, x, strict=False)
    gm = fp.capture(ep, x)
    torch.testing.assert_close(gm(*x), m(*x))
    again = fp.capture(torch.fx.symbolic_trace(m), x)
    assert _all_annotated(again)


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_transformers_need_export_and_reproduce_outputs(name):
    m, x = build(name)
    with pytest.raises(fp.CaptureError):
        fp.capture(m, x, method="symbolic")
    gm = fp.capture(m, x)
    assert gm.meta["fxprune_capture_method"] == "export"
    assert _all_annotated(gm)
    ref, out = m(*x), gm(*x)
    ref_t = [t for t in torch.utils._pytree.tree_leaves(ref) if isinstance(t, torch.Tensor)]
    out_t = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    torch.testing.assert_close(out_t[0], ref_t[0])


@pytest.mark.parametrize("method", ["symbolic", "export"])
def test_the_models_outputs_are_reused_only_while_nothing_changed(method):
    """capture records the model's outputs on the example; minimize's end-to-end check reuses them instead of
    running the model again, but only while code, tensors (identity, storage, version), module modes and inputs
    are the same. A write the version counters miss (``.data``) is caught by running the model again when the
    check fails."""
    from fxprune.graph.origin import reference_outputs

    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3)).eval()
    x = torch.randn(5, 4)
    gm = fp.capture(net, (x,), method=method)
    first = reference_outputs(gm, (x,))
    assert reference_outputs(gm, (x,)) is first  # recorded
    assert reference_outputs(gm, (x.clone(),)) is first  # same values
    assert reference_outputs(gm, (x + 1,)) is not first  # other inputs: the model runs
    weight = next(p for n, p in gm.named_parameters() if n.endswith("weight"))
    weight.data[2:5] = 0  # no version bump: the record looks valid, and is stale
    assert reference_outputs(gm, (x,)) is first
    small = fp.minimize(gm)  # the check fails against the stale record, runs the model again, and passes
    assert count_params(small) < count_params(gm)
    torch.testing.assert_close(small(x), gm(x))
    with torch.no_grad():
        weight[:2] = 0  # bumps the version counter: the record no longer applies
    changed = reference_outputs(gm, (x,))
    assert changed is not first and not torch.equal(changed, first)
    torch.testing.assert_close(changed, gm(x))


def test_the_record_is_not_used_after_a_mode_change():
    from fxprune.graph.origin import reference_outputs

    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8)).eval()
    with torch.no_grad():
        net[1].running_mean.fill_(3.0)
    x = torch.randn(5, 4)
    gm = fp.capture(net, (x,), method="symbolic")
    first = reference_outputs(gm, (x,))
    gm.train()
    assert not torch.allclose(reference_outputs(gm, (x,)), first)


def _real_calls(m: nn.Module) -> list[int]:
    """Batch sizes of ``m``'s forward calls on real tensors (torch.export's tracing calls it on fake ones)."""
    from torch._subclasses.fake_tensor import is_fake

    calls: list[int] = []
    m.register_forward_pre_hook(lambda _, args: None if is_fake(args[0]) else calls.append(args[0].shape[0]))
    return calls


def test_the_default_path_checks_once_end_to_end():
    """capture (export) + minimize run the user's model at the example (once) and at the other check point, the
    minimized graph at both, and the captured graph not at all."""
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        net[0].weight[:3] = 0
    x = torch.randn(2, 4)
    model_calls = _real_calls(net)
    gm = fp.capture(net, (x,), method="export")
    graph_calls = _real_calls(gm)
    small = fp.minimize(gm)
    assert count_params(small) == count_params(net) - 3 * 4 - 3 - 3 * 3
    checked = [c.shapes for c in small.meta["fxprune_checks"]]
    assert checked == ["2x4", "1x4", "3x4"]
    assert sorted(model_calls) == [1, 2, 3] and graph_calls == []
    gm = fp.capture(net, (x,), method="export", check=True)
    assert _real_calls(gm) == [] and sorted(model_calls) == [1, 2, 2, 3]


class ExportsDifferently(nn.Module):
    """A model whose exported graph computes something else than its eager forward."""

    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.fc(x).relu()
        if torch.compiler.is_exporting():
            h = h + 1
        return self.out(h)


def test_a_wrong_capture_is_blamed_on_the_capture():
    m = ExportsDifferently()
    with torch.no_grad():
        m.fc.weight[:3] = 0
    x = torch.randn(2, 4)
    gm = fp.capture(m, (x,), method="export")  # not run: the first check is end to end
    with pytest.raises(fp.CaptureError, match="captured graph does not reproduce ExportsDifferently"):
        fp.minimize(gm)
    with pytest.raises(fp.CaptureError, match="exported graph does not reproduce"):
        fp.capture(m, (x,), method="export", check=True)


@pytest.mark.parametrize("name", ["convnext", "gpt2", "llama"])
def test_meta_annotation_matches_fake_propagation(name):
    """annotate runs rewritten graphs on meta tensors (cheaper); the shapes and dtypes must be what fake
    propagation gives, node for node. Every node stays on the meta path (no fallback to fake tensors): Llama's
    rotary table is moved with ``aten.to.device(inv_freq, cpu, ...)``, a positional device kept on meta."""
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp
    from torch._subclasses.fake_tensor import FakeTensorMode
    from fxprune.graph.shapes import annotate

    model, inputs = build(name, "tiny")
    gm = fp.capture(model, inputs, method="export")
    annotate(gm, inputs)
    meta = {n.name: node_spec(n) for n in gm.graph.nodes}
    vals = [n.meta["val"] for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    assert vals and all(v.device.type == "meta" for v in vals)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    FakeTensorProp(gm, mode).propagate(*[mode.from_tensor(x) for x in inputs])
    fake = {n.name: node_spec(n) for n in gm.graph.nodes}
    assert meta == fake
    assert sum(isinstance(s, TensorSpec) for s in meta.values()) > 20


def test_annotation_runs_modules_with_weights_on_the_meta_device_and_leaves_their_weights():
    from fxprune.graph.shapes import annotate

    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU()).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    gm = torch.fx.symbolic_trace(net)
    annotate(gm, (torch.randn(2, 4),))
    assert node_spec(list(gm.graph.nodes)[1]) == TensorSpec((2, 3), torch.float32)
    assert all(n.meta["val"].device == torch.device("meta") for n in gm.graph.nodes if n.op != "output")
    after = net.state_dict()  # the module's own tensors: back in place, on the CPU, unchanged (BatchNorm's too)
    assert all(after[k].device.type == "cpu" and torch.equal(after[k], v) for k, v in before.items())


def test_annotation_follows_a_layers_changed_attributes():
    """The meta copy of a layer annotation runs is kept per layer; a changed stride (or groups, or a new weight
    shape) is a new copy, so the shapes follow."""
    from fxprune.graph.shapes import annotate

    net = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1))
    gm = torch.fx.symbolic_trace(net)
    x = torch.randn(1, 4, 5, 5)
    annotate(gm, (x,))
    assert node_spec(list(gm.graph.nodes)[1]).shape == (1, 4, 5, 5)
    net[0].stride = (2, 2)
    annotate(gm, (x,))
    assert node_spec(list(gm.graph.nodes)[1]).shape == (1, 4, 3, 3)


class _ShapeReadingMLP(nn.Module):
    """PVTv2's MLP as timm writes it: fc1, then ``B, N, C = x.shape`` to reshape the tokens into an image for a
    depthwise conv, then fc2. A symbolic trace reads C off the tensor (the analysis freezes that dim)."""

    def __init__(self, d: int = 8, h: int = 16, side: int = 4) -> None:
        super().__init__()
        self.fc1, self.dw, self.fc2, self.side = nn.Linear(d, h), nn.Conv2d(h, h, 3, padding=1, groups=h), nn.Linear(h, d), side

    def forward(self, x):
        x = self.fc1(x)
        B, N, C = x.shape
        x = self.dw(x.transpose(1, 2).reshape(B, C, self.side, self.side)).flatten(2).transpose(1, 2)
        return self.fc2(torch.relu(x))


class _BatchSizeRead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4 * 6 * 6, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).view(x.size(0), -1))


def test_a_symbolic_trace_that_reads_static_sizes_gives_way_to_export():
    """``B, N, C = x.shape`` read C (a channel dim) off a tensor: capture takes torch.export's graph instead, in
    which C is a number the rewrite resizes, so the MLP's dead units go (none did). Reading only the batch size
    (``x.view(x.size(0), -1)``) keeps the symbolic trace and its module names."""
    torch.manual_seed(0)
    m = _ShapeReadingMLP().double().eval()
    with torch.no_grad():
        m.fc2.weight[:, :5] = 0  # 5 hidden units fc2 never reads
    x = torch.randn(2, 16, 8, dtype=torch.float64)
    gm = fp.capture(m, (x,))
    assert gm.meta["fxprune_capture_method"] == "export"
    small = fp.minimize(gm)
    assert count_params(m) - count_params(small) == 5 * (8 + 1 + 9 + 1 + 8)
    xb = torch.randn(3, 16, 8, dtype=torch.float64)
    assert torch.allclose(small(xb), m(xb), rtol=1e-12, atol=1e-12)
    assert fp.capture(m, (x,), method="symbolic").meta["fxprune_capture_method"] == "symbolic"
    assert fp.capture(_BatchSizeRead(), (torch.randn(2, 3, 8, 8),)).meta["fxprune_capture_method"] == "symbolic"


def test_export_of_every_dim_does_not_warn_about_the_dims_it_fixes():
    """fxprune exports with every dim dynamic where the model allows it; an image's one channel is specialized, as
    meant, and torch.export's "0/1 specialized" warning for it is not shown (the user asked for nothing)."""
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("torch._export.non_strict_utils")
    logger.addHandler(handler)
    level = logger.level
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    try:
        gm = fp.capture(model, (torch.randn(2, 1, 8, 8),), method="export", dynamic_shapes="every")
    finally:
        logger.removeHandler(handler)
    assert not [r for r in records if "specialized" in r.getMessage()]
    assert logger.level == level  # (the level comes back)
    with torch.no_grad():
        x = torch.randn(5, 1, 9, 7)  # (batch and spatial dims stay dynamic)
        assert torch.allclose(gm(x), model(x))


def test_minimize_of_an_exported_graph_shows_no_deprecation_warning_of_its_own():
    """torch >= 2.10 deprecates ``ShapeEnv.var_to_val`` (fxprune read it for each dynamic dim's example value) and
    its own ``LeafSpec``, which every deep copy of an exported graph rebuilds: neither is the user's concern, and a
    cycle printed both. Run as a user runs it: a fresh interpreter with Python's default warning filters."""
    import subprocess
    import sys

    code = (
        "import torch, fxprune as fp\n"
        "from torch import nn\n"
        "torch.manual_seed(0)\n"
        "m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))\n"
        "with torch.no_grad(): m[0].weight[:2] = 0.0; m[0].bias[:2] = -1.0\n"
        "gm = fp.capture(m, (torch.randn(2, 1, 8, 8),), method='export', dynamic_shapes='every')\n"
        "small = fp.minimize(gm)\n"
        "print(sum(p.numel() for p in small.parameters()))\n")
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    env.pop("PYTHONWARNINGS", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.split()[-1]) < sum(p.numel() for p in nn.Conv2d(1, 4, 3).parameters()) + 4 * 3 + 3
    assert "FutureWarning" not in r.stderr and "DeprecationWarning" not in r.stderr, r.stderr[-2000:]


class _LossWithDataDependentCode(nn.Module):
    """A classifier whose loss, like DeBERTa's, keeps only the labelled rows through a data-dependent branch:
    neither a symbolic trace nor torch.export takes it with labels, both take it without."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x, labels=None):
        logits = self.body(x)
        if labels is None:
            return {"logits": logits}
        keep = (labels >= 0).nonzero()[:, 0]
        loss = nn.functional.cross_entropy(logits[keep], labels[keep]) if keep.size(0) > 0 else logits.sum() * 0
        return {"loss": loss, "logits": logits}


def test_a_model_whose_loss_cannot_be_captured_is_captured_without_its_labels(capfd):
    torch.manual_seed(0)
    model = _LossWithDataDependentCode()
    with torch.no_grad():
        model.body[0].weight[:4], model.body[0].bias[:4] = 0.0, -1.0  # 4 dead hidden units
    batch = {"x": torch.randn(8, 6), "labels": torch.randint(0, 3, (8,))}
    with pytest.warns(LabelsLeftOutWarning, match="captured without them"):
        gm = fp.capture(model, batch)
    assert len([n for n in gm.graph.nodes if n.op == "placeholder"]) == 1  # x only
    err = capfd.readouterr().err
    assert "def forward(self" not in err  # torch.export's partial graph of the failed attempt is not printed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LabelsLeftOutWarning)
        small = fp.minimize_module(model, batch)  # the user's class, which computes the loss itself
    assert type(small) is _LossWithDataDependentCode and small.body[0].out_features == 12
    with torch.no_grad():
        out, ref = small(**batch), model(**batch)
        assert torch.allclose(out["loss"], ref["loss"]) and torch.allclose(out["logits"], ref["logits"], atol=1e-6)


class _NeedsItsLabels(_LossWithDataDependentCode):
    """An encoder-decoder's shape: the labels are its decoder's inputs, so it does not run without them."""

    def forward(self, x, labels=None):
        if labels is None:
            raise ValueError("You have to specify either decoder_input_ids or decoder_inputs_embeds")
        return super().forward(x, labels)


def test_a_model_that_needs_the_labels_it_cannot_be_captured_with_says_why_it_was_not_captured():
    """Captured again without its labels, a model that needs them (LongT5, SwitchTransformers: T5's decoder reads
    them) raised InputError: "the model failed on the example inputs", the inputs fxprune had made, not the user's.
    The capture's own failures are what it reports."""
    batch = {"x": torch.randn(8, 6), "labels": torch.randint(0, 3, (8,))}
    with pytest.raises(fp.CaptureError, match="could not capture _NeedsItsLabels") as e:
        fp.capture(_NeedsItsLabels(), batch)
    assert "export:" in str(e.value) and "decoder_input_ids" not in str(e.value)


class _BranchesOnValues(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 3)

    def forward(self, x):
        h = self.lin(x)
        return h[h[:, 0] > 0].sum(0) if h[:, 0].max() > 0 else h.sum(0)


def test_a_failed_export_does_not_print_its_partial_graph(capfd):
    with pytest.raises(fp.CaptureError, match="data-dependent"):
        fp.capture(_BranchesOnValues(), (torch.randn(4, 6),), method="export")
    assert "def forward(self" not in capfd.readouterr().err


class _TokenMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc1, self.fc2 = nn.Embedding(20, 8), nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, ids):
        return self.fc2(torch.relu(self.fc1(self.emb(ids))))


@pytest.mark.parametrize("dynamic_shapes", ["batch", "every"])
def test_a_sliced_example_input_is_exported_for_other_sizes(dynamic_shapes):
    """``ids[:, :-1]`` (the inputs of a next-token loss) is not contiguous: torch.export guarded on its strides and
    the program refused every other size, so capture failed (and a model that needs export could not be
    captured at all). Capture exports contiguous copies: the model's function does not depend on strides."""
    model = _TokenMLP().double().eval()
    with torch.no_grad():
        model.fc1.weight[:5] = 0
        model.fc1.bias[:5] = 0  # 5 dead hidden units
    ids = torch.randint(0, 20, (4, 11))[:, :-1]
    assert not ids.is_contiguous()
    gm = fp.capture(model, (ids,), method="export", dynamic_shapes=dynamic_shapes)
    small = fp.minimize(gm)
    assert count_params(model) - count_params(small) == 5 * (8 + 1 + 3)
    other = torch.randint(0, 20, (3, 10))
    assert torch.allclose(small(other), model(other), rtol=1e-12, atol=1e-12)


class _CachingAttention(nn.Module):
    """Keeps a value computed from its parameters in a dict per device in eval mode, as timm's LeViT does with its
    attention biases, and records the last input's width."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(6, 8), nn.Linear(8, 3)
        self.bias = nn.Parameter(torch.randn(8))
        self.cache: dict[str, torch.Tensor] = {}

    def biases(self, x):
        if self.training:
            return self.bias * 2
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = self.bias * 2
        return self.cache[key]

    def forward(self, x):
        self.width = x.shape[-1]
        return self.out(torch.relu(self.fc(x) + self.biases(x)))


@pytest.mark.parametrize("method", ["symbolic", "export"])
def test_capture_leaves_the_models_attributes_as_they_were(method):
    """A forward that caches values in its module's attributes leaves nothing of the capture there: no Proxy of a
    symbolic trace, no fake tensor of torch.export. The model then deep-copies, and minimize_module's copy of it
    computes the model's function (before: a Proxy in the cache; a copy of the model broke)."""
    m = nn.Sequential(_CachingAttention()).eval()
    x = torch.randn(4, 6)
    with torch.no_grad():
        m[0].fc.weight[:3] = 0
        m[0].bias[:3] = 0
    before = (dict(m[0].__dict__), dict(m[0].cache))
    fp.capture(m, (x,), method=method)
    assert dict(m[0].__dict__) == before[0] and m[0].cache == before[1] == {}
    small = fp.minimize_module(copy.deepcopy(m), (x,))
    assert count_params(small) < count_params(m) and m[0].cache == {}
    with torch.no_grad():
        torch.testing.assert_close(small(x), m(x))
    m(x)  # a cache the user's own run filled is theirs: kept through a capture
    cached = m[0].cache["cpu"]
    fp.capture(m, (x,), method=method)
    assert set(m[0].cache) == {"cpu"} and m[0].cache["cpu"] is cached
