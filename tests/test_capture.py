import pytest
import torch
from torch import nn

import fxprune as fp
from fxprune.graph.shapes import TensorSpec, is_annotated, node_spec
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
