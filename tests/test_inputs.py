"""Model inputs whose channels no weight reads: ``minimize`` cuts them (the graph reads the kept ones through
``index_select``; the model still takes its whole input), ``minimize_module`` makes the layer that reads the input
read its kept channels (:class:`fxprune.nn.SelectedInputs`, the user's layer class still), and the group lasso and
the structured masks (when asked) reach those channels where the class can cut them."""
from __future__ import annotations

import copy
import json
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune as fp
from conftest import exact_at, minimized_purely, snapshot
from fxprune.analysis.groups import input_channels
from fxprune.errors import LoadError
from fxprune.nn import SelectedInputs, selected_subclass
from fxprune.passes.lower import lower_modules
from fxprune.passes.mask import group_masks
from fxprune.passes.minimize import INPUT_PREFIX


def mlp(d_in: int = 10) -> nn.Sequential:
    """A float64 MLP whose first layer reads no input feature 0-2 (zero columns), and feature 3 only through unit 5,
    which nothing reads."""
    net = nn.Sequential(nn.Linear(d_in, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        net[0].weight[:, :3] = 0
        net[0].weight[:, 3] = 0
        net[0].weight[5, 3] = 1.0
        net[2].weight[:, 5] = 0
    return net


def _cut(small: torch.fx.GraphModule) -> list[torch.Tensor]:
    return [t for k, t in small.named_buffers() if k.startswith(INPUT_PREFIX)]


@pytest.mark.parametrize("method", ["symbolic", "export"])
def test_the_graph_reads_the_kept_input_features_and_takes_the_whole_input(method):
    """Features 0-2 go in the first round; feature 3 only once unit 5 has gone (its column is then zero): the
    selection's positions follow (``index_select`` of a tensor of the graph is a rule of its own)."""
    net = mlp()
    x = torch.randn(4, 10, dtype=torch.float64)
    small = minimized_purely(net, (x,), method=method)
    assert small.get_parameter("0.weight").shape == (5, 6)
    assert [c.tolist() for c in _cut(small)] == [[4, 5, 6, 7, 8, 9]]
    def first(t: torch.Tensor) -> torch.Tensor:  # (an exported graph returns a tuple)
        out = small(t)
        return out[0] if isinstance(out, tuple) else out

    exact_at(net, first, [(1, 10), (4, 10), (9, 10)])


def test_convolution_input_channels_go_at_any_image_size():
    net = nn.Sequential(nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 2, 1)).double()
    with torch.no_grad():
        net[0].weight[:, 1] = 0
    small = minimized_purely(net, (torch.randn(2, 4, 6, 6, dtype=torch.float64),))
    assert small.get_parameter("0.weight").shape == (5, 3, 3, 3)
    exact_at(net, small, [(2, 4, 6, 6), (5, 4, 9, 7), (1, 4, 3, 3)])


class _ReadsSizes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 5, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).reshape(x.shape[0], -1) * x.shape[1]


@pytest.mark.parametrize("method", ["symbolic", "export"])
def test_a_forward_that_reads_the_inputs_sizes_reads_those_of_the_whole_input(method):
    """``x.shape[0]`` (``sym_size`` with a dynamic batch) and ``x.shape[1]``: the channels still go, and every size
    read is the input's as the model takes it (4 channels, not the 3 the layer reads), in the graph and the class."""
    net = _ReadsSizes().double()
    with torch.no_grad():
        net.conv.weight[:, 1] = 0
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    gm = fp.capture(net, (x,), method=method)
    assert input_channels(lower_modules(gm)) == {"x": 1}
    small = fp.minimize(gm)
    assert small.get_parameter("conv.weight").shape == (5, 3, 3, 3)

    def first(t: torch.Tensor) -> torch.Tensor:
        out = small(t)
        return out[0] if isinstance(out, tuple) else out

    exact_at(net, first, [(1, 4, 6, 6), (3, 4, 6, 6)])
    mine = fp.minimize_module(net, (x,))
    assert mine.conv.kept_inputs.tolist() == [0, 2, 3]
    exact_at(net, mine, [(1, 4, 6, 6), (3, 4, 5, 9)])


def test_an_exported_program_in_and_out_keeps_its_input_signature():
    """The program still takes 10 features; export's shape guards read the whole input, so other batch sizes run."""
    net = mlp()
    x = torch.randn(4, 10, dtype=torch.float64)
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(net, (x,), dynamic_shapes=({0: batch},))
    out = fp.minimize(ep)
    assert isinstance(out, torch.export.ExportedProgram)
    spec = [n.meta["val"].shape[1] for n in out.graph.nodes if n.op == "placeholder"
            if n.name in {s.arg.name for s in out.graph_signature.input_specs if s.kind.name == "USER_INPUT"}]
    assert spec == [10]
    exact_at(net, out.module(), [(1, 10), (4, 10), (11, 10)])


class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 3), nn.Linear(6, 3), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x) + self.c(y) + y.sum(-1, keepdim=True)


def test_an_input_read_any_other_way_keeps_every_channel():
    """``x`` is read by two layers: a feature goes when both ignore it. ``y`` is summed too, so all of it stays."""
    net = _Mixed().double()
    with torch.no_grad():
        net.a.weight[:, :2] = 0
        net.b.weight[:, 1:3] = 0
        net.c.weight[:, :4] = 0
    inputs = (torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64))
    gm = fp.capture(net, inputs)
    assert input_channels(lower_modules(gm)) == {"x": 1}
    small = fp.minimize(gm)
    assert [c.tolist() for c in _cut(small)] == [[0, 2, 3, 4, 5]]
    assert small.get_parameter("c.weight").shape == (3, 6)
    with torch.no_grad():
        assert float((small(*inputs) - net(*inputs)).abs().max() / net(*inputs).abs().max()) <= 1e-12


def test_their_class_comes_back_reading_the_kept_inputs():
    """The first layer stays an ``nn.Linear`` (its repr says how many inputs it reads); a second call on the result
    cuts the feature its weight now ignores; the input model is left alone; pickle, deepcopy, save and load keep
    the selection."""
    net = mlp()
    x = torch.randn(4, 10, dtype=torch.float64)
    before = snapshot(net)
    small = fp.minimize_module(net, (x,))
    assert snapshot(net) == before and type(net[0]) is nn.Linear
    first = small[0]
    assert isinstance(first, nn.Linear) and isinstance(first, SelectedInputs) and type(first).__name__ == "Linear"
    assert first.in_features == 6 and first.kept_inputs.tolist() == [4, 5, 6, 7, 8, 9]
    assert "kept_inputs=6" in repr(first)
    exact_at(net, small, [(1, 10), (4, 10), (13, 10)])
    with torch.no_grad():
        small[0].weight[:, 0] = 0  # input feature 4
    again = fp.minimize_module(small, (x,))
    assert again[0].kept_inputs.tolist() == [5, 6, 7, 8, 9] and again[0].in_features == 5
    exact_at(small, again, [(1, 10), (7, 10)])
    for other in (pickle.loads(pickle.dumps(again)), copy.deepcopy(again)):
        assert isinstance(other[0], SelectedInputs) and torch.equal(other[0].kept_inputs, again[0].kept_inputs)
        exact_at(again, other, [(3, 10)], rtol=0.0)


def test_save_and_load_keep_the_selection_and_refuse_a_bad_one(tmp_path):
    net = mlp()
    small = fp.minimize_module(net, (torch.randn(4, 10, dtype=torch.float64),))
    back = fp.load(fp.save(small, tmp_path / "ok"), lambda: mlp())
    assert isinstance(back[0], SelectedInputs) and back[0].kept_inputs.tolist() == [4, 5, 6, 7, 8, 9]
    exact_at(net, back, [(2, 10)])
    # a manifest that asks a ReLU to read a selection
    d = fp.save(small, tmp_path / "bad")
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["modules"]["1"]["selected"] = True
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LoadError, match="input selection does not fit a ReLU"):
        fp.load(d, lambda: mlp())
    # positions that are not increasing
    wrong = copy.deepcopy(small)
    wrong[0].kept_inputs = wrong[0].kept_inputs.flip(0)
    with pytest.raises(LoadError, match="increasing input positions"):
        fp.load(fp.save(wrong, tmp_path / "flipped"), lambda: mlp())


class _Functional(nn.Module):
    """Reads its input through ``F.linear`` on its child's weight: the child's class cannot select."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(8, 5), nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(F.linear(x, self.fc.weight, self.fc.bias)))


def test_a_layer_its_parent_calls_functionally_keeps_its_inputs_in_the_class():
    net = _Functional().double()
    with torch.no_grad():
        net.fc.weight[:, :3] = 0
    x = torch.randn(3, 8, dtype=torch.float64)
    small = fp.minimize_module(net, (x,))
    assert not isinstance(small.fc, SelectedInputs) and small.fc.weight.shape == (5, 8)
    exact_at(net, small, [(2, 8)])
    assert fp.minimize(net, (x,)).get_parameter("fc.weight").shape == (5, 5)  # the graph cuts them
    # and neither the lasso nor the structured masks pull at channels the class keeps
    assert fp.GroupLasso(net, (x,)).channels == 5  # its hidden units only (an mlp(8): 8 inputs and 6 units)
    assert fp.GroupLasso(mlp(8), (x,)).channels == 8 + 6


class _Shared(nn.Module):
    """One layer applied to the input and to a hidden value: its class cannot select the input's features alone."""

    def __init__(self) -> None:
        super().__init__()
        self.pre, self.fc, self.out = nn.Linear(6, 6), nn.Linear(6, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.fc(x) + self.fc(torch.relu(self.pre(x))))


def test_a_layer_also_applied_to_another_tensor_keeps_its_inputs_in_the_class():
    net = _Shared().double()
    with torch.no_grad():  # features 0-1 of x, read by neither layer; units 0-1 of pre, which fc ignores
        net.fc.weight[:, :2] = 0  # (x's features and pre's units meet in fc's columns: one group)
        net.pre.weight[:, :2] = 0
    x = torch.randn(3, 6, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known before the rewrite: no failed check, no layer frozen after it
        small = fp.minimize_module(net, (x,))
    assert not isinstance(small.fc, SelectedInputs) and small.fc.weight.shape == (4, 6)
    assert small.pre.weight.shape == (6, 6)
    exact_at(net, small, [(2, 6), (5, 6)])
    graph = fp.minimize(net, (x,))  # the graph selects x's kept features for the first call only
    assert graph.get_parameter("fc.weight").shape == (4, 4) and graph.get_parameter("pre.weight").shape == (4, 4)
    exact_at(net, graph, [(2, 6), (5, 6)])


def test_the_group_lasso_and_group_masks_reach_input_columns():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(4, 6)
    reg = fp.GroupLasso(net, (x,))
    assert reg.channels == 8 + 6
    with torch.no_grad():
        net[0].weight[:, :2] *= 1e-5
    assert reg.step(net, lr=1e-3) >= 2 and bool((net[0].weight[:, :2] == 0).all())
    masks, _ = group_masks(fp.capture(net, (x,)), 0.2, inputs=True)
    assert bool((masks["0.weight"] == 0).all(0).any())  # whole input columns among what it masks
    masks, _ = group_masks(fp.capture(net, (x,)), 0.2)  # (by default: the data's features are the user's)
    assert not bool((masks.get("0.weight", torch.ones(1)) == 0).all(0).any())


def test_the_group_lasso_pulls_at_an_images_colors_only_when_asked():
    """Convolutions' input channels (an image's colors) form groups with ``inputs=True`` only; a bad value raises."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(2, 3, 6, 6)
    net(x)
    assert fp.GroupLasso(net, (x,)).channels == 8 == fp.GroupLasso(net, (x,), inputs=False).channels
    assert fp.GroupLasso(net, (x,), inputs=True).channels == 8 + 3
    with pytest.raises(fp.InputError, match="inputs must be"):
        fp.GroupLasso(net, (x,), inputs="conv")


class _Features(nn.Module):
    """A tabular classifier whose last four features are noise the labels never depend on."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _tabular_cycle(cycles: int, **kw):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()

    def train(m: nn.Module) -> None:
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        m.train()
        for _ in range(10):
            for idx in torch.arange(256).split(64):
                opt.zero_grad()
                F.cross_entropy(m(x[idx]), y[idx]).backward()
                opt.step()

    @torch.no_grad()
    def evaluate(m: nn.Module) -> float:
        m.eval()
        return float((m(x).argmax(-1) == y).float().mean())

    torch.manual_seed(0)
    model = _Features()
    train(model)
    res = fp.squeeze_release(model, (x[:4],), train=train, evaluate=evaluate, cycles=cycles, structure="groups",
                             sparsity=0.5, tolerance=0.05, lasso=1e-2, seed=0, progress=False, **kw)
    return model, res, evaluate


def test_the_cycle_cuts_features_the_labels_never_need(tmp_path):
    """An ordinary loop; the cycle's group lasso takes the noise features (the loss defends the two it needs), and
    the kept model is the user's class reading fewer inputs. A run stopped after a cycle resumes to the same model."""
    model, res, evaluate = _tabular_cycle(3)
    first = res.module.body[0]
    assert isinstance(res.module, _Features) and isinstance(first, SelectedInputs)
    assert first.kept_inputs.numel() < 8 and {0, 1} <= set(first.kept_inputs.tolist())
    assert evaluate(res.module) >= evaluate(model) - 0.05
    _tabular_cycle(2, checkpoint_dir=tmp_path / "ck")
    _, resumed, _ = _tabular_cycle(3, checkpoint_dir=tmp_path / "ck", resume=True)
    a, b = res.module.state_dict(), resumed.module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert isinstance(resumed.module.body[0], SelectedInputs)
