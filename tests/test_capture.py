import pytest
import torch
from torch import nn

import fxprune as fp
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
def test_the_checking_run_is_reused_only_while_nothing_changed(method):
    """capture keeps the output of the run that checked the graph; minimize's self-check reuses it instead of
    running the captured graph again, but only while code, tensor bytes, module modes and inputs are the same."""
    from fxprune.graph.capture import graph_outputs

    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3)).eval()
    x = torch.randn(5, 4)
    gm = fp.capture(net, (x,), method=method)
    first = graph_outputs(gm, (x,))
    assert graph_outputs(gm, (x,)) is first  # cached
    assert graph_outputs(gm, (x.clone(),)) is first  # same bytes
    assert graph_outputs(gm, (x + 1,)) is not first  # other inputs
    weight = next(p for n, p in gm.named_parameters() if n.endswith("weight"))
    weight.data[:5] = 0  # no version bump through .data: the bytes tell
    changed = graph_outputs(gm, (x,))
    assert changed is not first and not torch.equal(changed, first)
    torch.testing.assert_close(changed, gm(x))
    # a stale reference would make this minimize fail its self-check (or pass a wrong model)
    small = fp.minimize(gm)
    assert count_params(small) < count_params(gm)
    torch.testing.assert_close(small(x), gm(x))


def test_the_checking_run_is_not_reused_after_a_mode_change():
    from fxprune.graph.capture import graph_outputs

    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8)).eval()
    with torch.no_grad():
        net[1].running_mean.fill_(3.0)
    x = torch.randn(5, 4)
    gm = fp.capture(net, (x,), method="symbolic")
    first = graph_outputs(gm, (x,))
    gm.train()
    assert not torch.allclose(graph_outputs(gm, (x,)), first)


@pytest.mark.parametrize("name", ["convnext", "gpt2"])
def test_meta_annotation_matches_fake_propagation(name):
    """annotate runs rewritten graphs on meta tensors (cheaper); the shapes and dtypes must be what fake
    propagation gives, node for node."""
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp
    from torch._subclasses.fake_tensor import FakeTensorMode
    from fxprune.graph.shapes import annotate

    model, inputs = build(name, "tiny")
    gm = fp.capture(model, inputs, method="export")
    annotate(gm, inputs)
    meta = {n.name: node_spec(n) for n in gm.graph.nodes}
    assert any(isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].device.type == "meta" for n in gm.graph.nodes)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    FakeTensorProp(gm, mode).propagate(*[mode.from_tensor(x) for x in inputs])
    fake = {n.name: node_spec(n) for n in gm.graph.nodes}
    assert meta == fake
    assert sum(isinstance(s, TensorSpec) for s in meta.values()) > 20


def test_annotation_falls_back_to_fake_tensors_for_modules_with_weights():
    from fxprune.graph.shapes import annotate

    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 3), nn.ReLU()))
    annotate(gm, (torch.randn(2, 4),))
    assert node_spec(list(gm.graph.nodes)[1]) == TensorSpec((2, 3), torch.float32)
    assert not any(getattr(n.meta.get("val"), "device", None) == torch.device("meta") for n in gm.graph.nodes)
