"""Weight-standardized convolutions (BiT's ``StdConv2d``, transformers' ``WeightStandardizedConv2d``): their weight
is computed in the forward from each row's statistics. Output channels go as rows; input channels go with their
entries' sums kept (``fxprune.nn.stdconv``), in the graph and in the user's class, exactly."""
from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune as fp
from conftest import exact_at, minimized_purely, snapshot
from fxprune.nn.stdconv import (CompensatedStdConv2d, compensate_std_conv_, compensated_standardization, one_op,
                                std_conv_subclass)
from fxprune.verify import count_params


class StdConv2d(nn.Conv2d):
    """As timm and BiT write it."""

    def __init__(self, *args, eps: float = 1e-6, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.eps = eps

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                         eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.gn = StdConv2d(3, 8, 3, padding=1, bias=False), nn.GroupNorm(2, 8)
        self.b, self.gn2 = StdConv2d(8, 8, 1, bias=False), nn.GroupNorm(2, 8)
        self.c = StdConv2d(8, 4, 3, padding=1)

    def forward(self, x):
        h = F.relu(self.gn(self.a(x)))
        h = F.relu(self.gn2(self.b(h)))
        return self.c(h).mean((2, 3))


def _planted(net: Net) -> Net:
    """Channels 1 and 5 of ``a`` dead (zero rows: a standardized zero row is zero; the norm's affine zero), and
    channels 2 and 6 of ``b`` the same."""
    with torch.no_grad():
        for conv, norm, dead in ((net.a, net.gn, [1, 5]), (net.b, net.gn2, [2, 6])):
            conv.weight[dead] = 0
            norm.weight[dead] = 0
            norm.bias[dead] = 0
    return net


def test_compensated_standardization_is_the_batch_norm_of_the_whole_row():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1, 5, 12, dtype=torch.float64, generator=g)
    keep = torch.tensor([True, False, True, True, False, True, True, True, False, True, True, True])
    gone = w[..., ~keep]
    got = compensated_standardization(w[..., keep], gone.sum(-1)[0], (gone * gone).sum(-1)[0], 12, 1e-6)
    ref = F.batch_norm(w, None, None, training=True, momentum=0.0, eps=1e-6)[..., keep]
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["symbolic", "export"])
def test_a_standardized_convs_channels_go_in_the_graph_exactly(method):
    torch.manual_seed(0)
    net = _planted(Net()).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    small = minimized_purely(net, (x,), method=method, dynamic_shapes="every")  # (model and graph untouched)
    shapes = {k: tuple(v.shape) for k, v in small.state_dict().items()}
    assert shapes["a.weight"] == (6, 3, 3, 3) and shapes["b.weight"] == (6, 6, 1, 1) and shapes["c.weight"] == (4, 6, 3, 3)
    assert any(n.target is compensated_standardization for n in small.graph.nodes)  # b's and c's inputs went
    exact_at(net, small, [(2, 3, 8, 8), (3, 3, 11, 13), (1, 3, 5, 7)])


def test_an_unknown_op_on_a_standardized_weight_still_freezes():
    """A weight computed otherwise (here: standardized, then scaled by a computed factor) is no parameter the
    rewrite can slice: its channels stay."""
    class Scaled(StdConv2d):
        def forward(self, x):
            w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                             momentum=0.0, eps=self.eps).reshape_as(self.weight)
            return F.conv2d(x, w * self.weight.abs().mean(), self.bias, self.stride, self.padding)

    net = _planted(Net()).double().eval()
    net.b = Scaled(8, 8, 1, bias=False).double()
    with torch.no_grad():
        net.b.weight[[2, 6]] = 0
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    small = fp.minimize(fp.capture(net, (x,), method="export"))
    assert small.state_dict()["b.weight"].shape == (8, 8, 1, 1)
    exact_at(net, small, [(2, 3, 8, 8)])


def _bit(transformers):
    torch.manual_seed(0)
    cfg = transformers.BitConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_groups=4, num_labels=3,
                                 layer_type="preactivation")
    model = transformers.BitForImageClassification(cfg).double().eval()
    for layer in [layer for stage in model.bit.encoder.stages for layer in stage.layers]:
        with torch.no_grad():  # mid channels 0 and 3 of each bottleneck dead
            layer.conv1.weight[[0, 3]] = 0
            layer.norm2.weight[[0, 3]] = 0
            layer.norm2.bias[[0, 3]] = 0
    return model


def _logits_exact(model, small, shapes):
    for shape in shapes:
        x = torch.randn(*shape, dtype=torch.float64)
        with torch.no_grad():
            a, b = model(x).logits, small(x).logits
        assert float((a - b).abs().max() / a.abs().max()) <= 1e-9, shape


def test_bit_comes_back_as_itself_with_compensated_standardized_convs(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = _bit(transformers)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    before = snapshot(model)
    small = fp.minimize_module(model, (x,))
    assert snapshot(model) == before
    assert type(small) is type(model) and count_params(small) < count_params(model)
    conv2 = small.bit.encoder.stages[0].layers[0].conv2
    assert isinstance(conv2, type(model.bit.encoder.stages[0].layers[0].conv2)) and isinstance(conv2, CompensatedStdConv2d)
    assert conv2.weight.shape[1] == conv2.in_channels == 6 and conv2.full_size == 8 * 9
    _logits_exact(model, small, [(2, 3, 32, 32), (3, 3, 48, 40), (1, 3, 33, 31)])
    # it trains as its class does, and goes through fp.save / fp.load
    fp.save(small, tmp_path / "bit")
    loaded = fp.load(tmp_path / "bit", lambda: _bit(transformers))
    _logits_exact(small, loaded, [(2, 3, 32, 32)])
    assert isinstance(loaded.bit.encoder.stages[0].layers[0].conv2, CompensatedStdConv2d)
    manifest = tmp_path / "bit" / "manifest.json"  # a record that does not fit: refused, never loaded wrong
    record = json.loads(manifest.read_text())
    record["modules"]["bit.encoder.stages.0.layers.0.conv2"]["standardized"] = {"full_size": "72"}
    manifest.write_text(json.dumps(record))
    with pytest.raises(fp.LoadError, match="standardized convolution record"):
        fp.load(tmp_path / "bit", lambda: _bit(transformers))
    small.train()
    small(x).logits.sum().backward()
    assert conv2.weight.grad is not None and conv2.weight.grad.abs().sum() > 0


def test_a_compensated_conv_loses_more_channels_in_a_second_call():
    """The next cycle captures the kept model again: its compensated convolutions are read as standardizations
    (a custom op while fxprune captures), and more input channels go, their sums added."""
    transformers = pytest.importorskip("transformers")
    model = _bit(transformers)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    small = fp.minimize_module(model, (x,))
    layer = small.bit.encoder.stages[0].layers[0]
    with torch.no_grad():  # one more mid channel dead
        layer.conv1.weight[3] = 0  # (original channel 5: the fourth of the six kept)
        layer.norm2.weight[3] = 0
        layer.norm2.bias[3] = 0
    smaller = fp.minimize_module(small, (x,))
    assert smaller.bit.encoder.stages[0].layers[0].conv2.weight.shape[1] == 5
    _logits_exact(small, smaller, [(2, 3, 32, 32), (1, 3, 40, 36)])
    with one_op():  # (both forms compute the same)
        graph = fp.capture(smaller, (x,), method="export")
    assert any("compensated_standardization" in str(n.target) for n in graph.graph.nodes)


def test_a_std_conv_subclass_pickles_and_copies_as_the_users_class():
    conv = StdConv2d(4, 3, 1).double()
    with torch.no_grad():
        kept = conv.weight[:, :3].clone()
        gone = conv.weight[:, 3:].reshape(3, -1)
    small = copy.deepcopy(conv)
    small.weight = nn.Parameter(kept)
    compensate_std_conv_(small, 4, gone.sum(1), (gone * gone).sum(1))
    assert isinstance(small, StdConv2d) and type(small).__name__ == "StdConv2d"
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    x[:, 3] = 0  # (the input channel that went is zero)
    assert torch.allclose(small(x[:, :3]), conv(x), rtol=1e-12, atol=1e-12)
    for again in (copy.deepcopy(small), pickle.loads(pickle.dumps(small))):
        assert type(again) is std_conv_subclass(StdConv2d) and torch.equal(again(x[:, :3]), small(x[:, :3]))


class GroupNormAct(nn.GroupNorm):
    """As timm writes it: the norm, then ``drop`` and ``act`` children."""

    def __init__(self, groups: int, channels: int) -> None:
        super().__init__(groups, channels)
        self.drop, self.act = nn.Identity(), nn.ReLU()

    def forward(self, x):
        return self.act(self.drop(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)))


class ActNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.gn = StdConv2d(3, 8, 3, padding=1, bias=False), GroupNormAct(2, 8)
        self.b, self.gn2 = StdConv2d(8, 8, 1, bias=False), GroupNormAct(2, 8)
        self.c = StdConv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.c(self.gn2(self.b(self.gn(self.a(x))))).mean((2, 3))


def test_a_class_of_std_convs_and_norms_with_activations_comes_back_as_itself(monkeypatch, tmp_path):
    """Norms whose forward applies children after the norm (timm's ``drop`` and ``act``) become compensated norms
    that apply them; weight-standardized convolutions of a class fxprune knows become compensated subclasses of it;
    both survive fp.save / fp.load. A class it does not know keeps those channels."""
    from fxprune.interop.module import KeptChannelsWarning
    from fxprune.nn import stdconv

    torch.manual_seed(0)
    net = _planted(ActNet()).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with pytest.warns(KeptChannelsWarning):
        kept = fp.minimize_module(net, (x,))
    assert kept.b.weight.shape[1] == 8  # (an unknown class of standardized convolution: its inputs stay)
    monkeypatch.setattr(stdconv, "KNOWN", stdconv.KNOWN | {(StdConv2d.__module__, "StdConv2d")})
    small = fp.minimize_module(net, (x,))
    assert type(small) is ActNet and small.b.weight.shape == (6, 6, 1, 1) and isinstance(small.b, CompensatedStdConv2d)
    assert isinstance(small.gn2.activation, nn.Sequential) and isinstance(small.gn2.activation[1], nn.ReLU)
    exact_at(net, small, [(2, 3, 8, 8), (3, 3, 11, 13)])
    fp.save(small, tmp_path / "net")
    loaded = fp.load(tmp_path / "net", lambda: _planted(ActNet()).double())
    exact_at(small, loaded, [(2, 3, 8, 8)])



class ScaledStdConv2d(nn.Conv2d):
    """As timm writes it for NF-ResNets and NFNets: each standardized row times ``gain * scale`` (``scale``: a
    number fixed from the full fan-in)."""

    def __init__(self, *args, eps: float = 1e-6, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.scale, self.eps = self.weight[0].numel() ** -0.5, eps
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5)

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0,
                         eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class NFNet(nn.Module):
    """Normalizer-free: scaled standardized convolutions and activations, no norm layer."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = ScaledStdConv2d(3, 8, 3, padding=1), ScaledStdConv2d(8, 8, 1)
        self.c = ScaledStdConv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.c(F.gelu(self.b(F.gelu(self.a(x))) * 1.7)).mean((2, 3))


def _nf_planted(net: NFNet) -> NFNet:
    """Output channels 1 and 5 of ``a`` and 2 and 6 of ``b`` dead: their gain and bias zero (a zero gain zeroes a
    row; the raw weights stay as they are)."""
    with torch.no_grad():
        for conv, dead in ((net.a, [1, 5]), (net.b, [2, 6])):
            conv.gain[dead] = 0
            conv.bias[dead] = 0
    return net


@pytest.mark.parametrize("method", ["symbolic", "export"])
def test_a_scaled_standardized_convs_channels_go_in_the_graph_exactly(method):
    """(Before: the batch norm's weight made the chain no standardization fxprune reads, and every channel of
    the network stayed: timm's NF-ResNet-26, 1.00x.)"""
    net = _nf_planted(NFNet()).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    small = minimized_purely(net, (x,), method=method, dynamic_shapes="every")
    shapes = {k: tuple(v.shape) for k, v in small.state_dict().items()}
    assert shapes["a.weight"] == (6, 3, 3, 3) and shapes["a.gain"] == (6, 1, 1, 1)
    assert shapes["b.weight"] == (6, 6, 1, 1) and shapes["c.weight"] == (4, 6, 3, 3)
    assert sum(n.target is compensated_standardization for n in small.graph.nodes) == 2  # b's and c's inputs
    exact_at(net, small, [(2, 3, 8, 8), (3, 3, 11, 13), (1, 3, 5, 7)])


def test_a_class_of_scaled_standardized_convs_comes_back_as_itself(monkeypatch, tmp_path):
    from fxprune.nn import stdconv

    monkeypatch.setattr(stdconv, "KNOWN", stdconv.KNOWN | {(ScaledStdConv2d.__module__, "ScaledStdConv2d")})
    net = _nf_planted(NFNet()).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    before = snapshot(net)
    small = fp.minimize_module(net, (x,))
    assert snapshot(net) == before
    assert type(small) is NFNet and isinstance(small.c, ScaledStdConv2d) and isinstance(small.c, CompensatedStdConv2d)
    assert small.b.weight.shape == (6, 6, 1, 1) and small.b.gain.shape == (6, 1, 1, 1) and small.c.full_size == 72
    assert small.c.scale == net.c.scale  # (the user's number, from the full fan-in)
    exact_at(net, small, [(2, 3, 8, 8), (3, 3, 11, 13)])
    with torch.no_grad():  # the next cycle: one more channel of b dead, read through the compensated module
        small.b.gain[0] = 0
        small.b.bias[0] = 0
    smaller = fp.minimize_module(small, (x,))
    assert smaller.c.weight.shape[1] == 5 and smaller.c.full_size == 72
    exact_at(small, smaller, [(2, 3, 8, 8), (1, 3, 9, 6)])
    fp.save(smaller, tmp_path / "nf")
    exact_at(smaller, fp.load(tmp_path / "nf", lambda: NFNet().double()), [(2, 3, 8, 8)])
