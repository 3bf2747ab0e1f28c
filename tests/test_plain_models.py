"""Image-to-image networks written with torch.nn alone, as users write them: CycleGAN's ResNet generator (reflection
pads, instance norms without affine, residual blocks, a transposed conv up) and a U-Net (BatchNorm, max pooling, a
transposed conv up, a skip concatenation). Their padding modules, instance norms and transposed convs were opaque:
nothing around them was removed. Planted dead units go, in the graph and in their class, exactly at other batch
and image sizes."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxprune as fp
from conftest import exact_at as _exact, graph_state, snapshot
from fxprune.interop.module import KeptChannelsWarning
from fxprune.verify import count_params


class ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), nn.InstanceNorm2d(c), nn.ReLU(True),
                                   nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), nn.InstanceNorm2d(c))

    def forward(self, x):
        return x + self.block(x)


class Generator(nn.Module):
    """CycleGAN's ResnetGenerator, small: 7x7 reflection-padded stem, a strided conv down, residual blocks, a
    transposed conv up, a 7x7 conv to RGB."""

    def __init__(self, c: int = 8, blocks: int = 2) -> None:
        super().__init__()
        layers = [nn.ReflectionPad2d(3), nn.Conv2d(3, c, 7), nn.InstanceNorm2d(c), nn.ReLU(True),
                  nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.InstanceNorm2d(2 * c), nn.ReLU(True)]
        layers += [ResBlock(2 * c) for _ in range(blocks)]
        layers += [nn.ConvTranspose2d(2 * c, c, 3, stride=2, padding=1, output_padding=1), nn.InstanceNorm2d(c),
                   nn.ReLU(True), nn.ReflectionPad2d(3), nn.Conv2d(c, 3, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x)


class UNet(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.d1 = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.d2 = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU())
        self.up = nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.u1 = nn.Sequential(nn.Conv2d(2 * c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.out = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        a = self.d1(x)
        return self.out(self.u1(torch.cat([self.up(self.d2(a)), a], 1)))


def plant(model: nn.Module) -> nn.Module:
    """The first two output units of every conv and transposed conv but the last dead (weights and bias zero);
    BatchNorm statistics random."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))][:-1]
    with torch.no_grad():
        for m in layers:
            (m.weight[:2] if isinstance(m, nn.Conv2d) else m.weight[:, :2]).zero_()
            m.bias[:2] = 0
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1.0, 1.0)
                m.running_var.uniform_(0.5, 2.0)
    return model


# the class, its example input's shape, other shapes it is checked at
CASES = {"generator": (Generator, (2, 3, 32, 32), [(3, 3, 48, 40), (1, 3, 16, 16)]),
         "unet": (UNet, (2, 1, 16, 16), [(3, 1, 24, 32), (1, 1, 8, 8)])}


@pytest.mark.parametrize("name", list(CASES))
def test_image_to_image_networks_lose_dead_units_in_the_graph_and_in_their_class(name):
    cls, shape, others = CASES[name]
    model = plant(cls().double().eval())
    x = torch.randn(*shape, dtype=torch.float64)
    before = snapshot(model)
    gm = fp.capture(model, (x,), dynamic_shapes="every")
    assert not any("no channel rule" in r for g in fp.analyze(gm).groups for r in g.reasons)
    state = graph_state(gm)
    small = fp.minimize(gm)
    assert graph_state(gm) == state
    with warnings.catch_warnings():
        warnings.simplefilter("error", KeptChannelsWarning)
        warnings.filterwarnings("error", message=".*does not match num_features")  # instance norm's, at its width
        kept = fp.minimize_module(model, (x,))
    assert snapshot(model) == before
    assert type(kept) is cls
    dead = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))][:-1]
    # every dead unit's weight slice and bias entry, at least, in both
    floor = sum(2 * (m.weight[0].numel() if isinstance(m, nn.Conv2d) else m.weight[:, 0].numel()) + 2 for m in dead)
    assert count_params(model) - count_params(small) >= floor
    assert count_params(kept) == count_params(small)
    _exact(model, small, [shape, *others])
    _exact(model, kept, [shape, *others])
