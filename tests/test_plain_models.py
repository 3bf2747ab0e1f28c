"""Image-to-image networks written with torch.nn alone, as users write them: CycleGAN's ResNet generator (reflection
pads, instance norms without affine, residual blocks, a transposed conv up), a U-Net (BatchNorm, max pooling, a
transposed conv up, a skip concatenation) and an autoencoder built as Stable Diffusion's VAE is (residual blocks of
GroupNorm with several groups, SiLU and convs; a strided conv down, nearest upsampling). Their padding modules,
instance norms and transposed convs were opaque, and a GroupNorm with several groups lost whole groups only:
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


class GNBlock(nn.Module):
    """Stable Diffusion's ResnetBlock: GroupNorm, SiLU, conv, twice, and a 1x1 conv on the skip where widths differ."""

    def __init__(self, cin: int, cout: int, groups: int = 2) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(groups, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(nn.functional.silu(self.norm2(h)))


class Autoencoder(nn.Module):
    """An encoder (conv, block, strided conv down, block widening, norm, SiLU, conv to 4 latent channels) and a
    decoder (conv, block, nearest upsampling and a conv, block narrowing, norm, SiLU, conv to RGB), as Stable
    Diffusion's VAE is built; every GroupNorm has two groups."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), GNBlock(c, c), nn.Conv2d(c, c, 3, stride=2, padding=1),
                                     GNBlock(c, 2 * c), nn.GroupNorm(2, 2 * c), nn.SiLU(), nn.Conv2d(2 * c, 4, 3, padding=1))
        self.decoder = nn.Sequential(nn.Conv2d(4, 2 * c, 3, padding=1), GNBlock(2 * c, 2 * c),
                                     nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(2 * c, 2 * c, 3, padding=1),
                                     GNBlock(2 * c, c), nn.GroupNorm(2, c), nn.SiLU(), nn.Conv2d(c, 3, 3, padding=1))

    def forward(self, x):
        return self.decoder(self.encoder(x))


DEAD_IN_GROUPS = [1, 4]  # of each block's hidden units: one in each of the first two groups of 4 (or 8)


def plant_in_groups(model: nn.Module) -> nn.Module:
    """In every GNBlock, hidden units 1 and 4 dead: their conv1 rows and biases zero, their norm2 weights and biases
    zero (so the normalized channel is zero, which conv2's zero padding reads as it reads the rest). Neither group
    holds only dead units: the group norms must compensate, since the units' zeros enter their groups' statistics."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, GNBlock):
                m.conv1.weight[DEAD_IN_GROUPS] = 0
                m.conv1.bias[DEAD_IN_GROUPS] = 0
            if isinstance(m, nn.GroupNorm):
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-1.0, 1.0)
        for m in model.modules():
            if isinstance(m, GNBlock):
                m.norm2.weight[DEAD_IN_GROUPS] = 0
                m.norm2.bias[DEAD_IN_GROUPS] = 0
    return model


def test_group_norms_with_several_groups_lose_dead_units_inside_their_groups():
    model = plant_in_groups(Autoencoder().double().eval())
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    before = snapshot(model)
    gm = fp.capture(model, (x,), dynamic_shapes="every")
    state = graph_state(gm)
    small = fp.minimize(gm)
    assert graph_state(gm) == state
    with warnings.catch_warnings():
        warnings.simplefilter("error", KeptChannelsWarning)
        kept = fp.minimize_module(model, (x,))
    assert snapshot(model) == before and type(kept) is Autoencoder
    blocks = [m for m in model.modules() if isinstance(m, GNBlock)]
    # per dead unit: its conv1 row and bias, its norm2 weight and bias, its conv2 column
    gone = sum(len(DEAD_IN_GROUPS) * (b.conv1.in_channels * 9 + 1 + 2 + b.conv2.out_channels * 9) for b in blocks)
    assert count_params(model) - count_params(small) == gone == count_params(model) - count_params(kept)
    norm = kept.decoder[4].norm2
    assert isinstance(norm, fp.nn.CompensatedGroupNorm) and norm.kept_per_group == (3, 3)
    _exact(model, small, [(2, 3, 16, 16), (3, 3, 24, 32), (1, 3, 8, 8)])
    _exact(model, kept, [(2, 3, 16, 16), (3, 3, 24, 32), (1, 3, 8, 8)])


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
