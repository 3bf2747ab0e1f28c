"""``fp.save`` / ``fp.load``: the smaller model of the user's own classes, safetensors + JSON, no pickle."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import fxprune as fp
from fxprune import zoo

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from planted import logits, planted  # noqa: E402


@pytest.fixture(scope="module")
def saved_gpt2(tmp_path_factory):
    """A planted GPT-2 (dead MLP units and stream channels), minimized as itself and saved."""
    model, (ids,), _ = planted("gpt2", "tiny")
    zoo.plant_dead_stream(model, "gpt2", [3, 7])
    small = fp.minimize_module(model, (ids,))
    d = fp.save(small, tmp_path_factory.mktemp("gpt2"))
    return model, small, d


BUILD = textwrap.dedent("""
    import torch, transformers as tf, fxprune as fp
    cfg = tf.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64, use_cache=False)
    model = fp.load({d!r}, lambda: tf.GPT2LMHeadModel(cfg).double().eval())
    ids = torch.arange(24).reshape(3, 8) % 100
    torch.set_num_threads(1)  # (as the test's own forward: the same kernels' sums, whatever the machine's load)
    with torch.no_grad():
        torch.save(model(ids).logits, {out!r})
    torch.save(model.state_dict(), {out!r} + ".state")
""")


@pytest.mark.slow
def test_round_trip_in_a_fresh_process(saved_gpt2, tmp_path):
    model, small, d = saved_gpt2
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["format"] == "fxprune-module/2" and list(manifest["shards"]) == ["model.safetensors"]
    assert any(e.get("replacement", {}).get("class") == "CompensatedLayerNorm" for e in manifest["modules"].values())
    out = tmp_path / "logits.pt"
    proc = subprocess.run([sys.executable, "-c", BUILD.format(d=str(d), out=str(out))], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ids = torch.arange(24).reshape(3, 8) % 100
    state, loaded = small.state_dict(), torch.load(f"{out}.state")
    assert state.keys() == loaded.keys() and all(torch.equal(state[k], loaded[k]) for k in state)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (a multithreaded float64 matmul's sums may split differently under load)
    try:
        with torch.no_grad():
            assert torch.equal(torch.load(out), logits(small(ids)))
            ref = logits(model(ids))
    finally:
        torch.set_num_threads(threads)
    assert float((torch.load(out) - ref).abs().max() / ref.abs().max()) <= 1e-9


def test_tied_weights_stay_tied(saved_gpt2):
    import transformers as tf

    _, small, d = saved_gpt2
    back = fp.load(d, lambda: tf.GPT2LMHeadModel(small.config).double().eval())
    assert back.lm_head.weight is back.transformer.wte.weight
    assert back.transformer.wte.weight.shape == small.transformer.wte.weight.shape


def test_a_tampered_weights_file_is_refused(saved_gpt2, tmp_path):
    import shutil

    import transformers as tf

    _, small, d = saved_gpt2
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(fp.LoadError, match="SHA-256"):
        fp.load(bad, lambda: tf.GPT2LMHeadModel(small.config))


def test_a_manifest_that_does_not_fit_the_built_model_is_refused(saved_gpt2):
    import transformers as tf

    _, small, d = saved_gpt2
    with pytest.raises(fp.LoadError, match="build\\(\\) made a"):
        fp.load(d, lambda: nn.Linear(2, 2))
    other = tf.GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=4, n_positions=64)
    with pytest.raises(fp.LoadError):
        fp.load(d, lambda: tf.GPT2LMHeadModel(other))


def test_not_an_fxprune_directory(tmp_path):
    (tmp_path / "manifest.json").write_text('{"format": "something else"}')
    with pytest.raises(fp.LoadError, match="not an fxprune manifest"):
        fp.load(tmp_path, lambda: nn.Linear(2, 2))
    with pytest.raises(fp.LoadError, match="missing or not JSON"):
        fp.load(tmp_path / "nowhere", lambda: nn.Linear(2, 2))


def test_created_bias_and_cnn_round_trip(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4)).double().eval()
    with torch.no_grad():
        model[0].weight[:3] = 0
        model[0].bias[:3] = 0.5
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    small = fp.minimize_module(model, (x,))
    back = fp.load(fp.save(small, tmp_path), lambda: nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1, bias=False),
                                                                    nn.BatchNorm2d(4)).double().eval())
    assert back[2].bias is not None and back[2].in_channels == 5
    with torch.no_grad():
        assert torch.equal(back(x), small(x))


def test_sizes_a_class_updater_set_are_saved_and_loaded(tmp_path):
    """Sizes fxprune's class updaters set outside the standard names (timm's CSPNet ``expand_chs``, MetaFormer's
    ``Scale.shape``) come back from the manifest. (Before, only a fixed list of names was saved: the loaded model
    split and viewed with its old sizes and raised.) A recorded size that is no integer is refused."""
    from test_minimize_module import CrossStage, TimmScale, _kill

    def build():
        return nn.Sequential(CrossStage(), TimmScale(4), nn.Conv2d(4, 2, 1)).double().eval()

    model = build()
    _kill(model[0].conv_exp.bn, [0, 2, 5, 9])
    _kill(model[0].block.bn, [1])
    _kill(model[0].conv_transition.bn, [3])
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    small = fp.minimize_module(model, (x,))
    assert small[0].expand_chs == 14 and small[1].shape == (3, 1, 1)
    d = fp.save(small, tmp_path / "m")
    back = fp.load(d, build).eval()
    assert back[0].expand_chs == 14 and back[1].shape == (3, 1, 1)
    with torch.no_grad():
        assert torch.equal(back(x), small(x))
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["modules"]["0"]["sizes"]["expand_chs"] = "14"
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(fp.LoadError, match="expand_chs='14' is no integer"):
        fp.load(d, build)


class ConvNormActProperty(nn.Module):
    """timm's ``ConvNormAct``: ``in_channels`` and ``out_channels`` are properties read off its convolution."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(cin, cout, 1), nn.BatchNorm2d(cout)

    @property
    def in_channels(self):
        return self.conv.in_channels

    @property
    def out_channels(self):
        return self.conv.out_channels

    def forward(self, x):
        return self.bn(self.conv(x)).relu()


def test_a_size_that_is_a_read_only_property_is_not_set_on_load(tmp_path):
    """A module whose ``in_channels`` / ``out_channels`` are properties without a setter (timm's ``ConvNormAct``,
    in every ReXNet, RegNet... of timm's) loads: the property follows its convolution, which gets its recorded
    size. (Before, ``fp.load`` set the recorded size on the property and raised AttributeError.)"""
    def build():
        return nn.Sequential(ConvNormActProperty(3, 8), ConvNormActProperty(8, 4)).double().eval()

    model = build()
    with torch.no_grad():
        model[0].bn.weight[[1, 5]] = 0
        model[0].bn.bias[[1, 5]] = 0
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    small = fp.minimize_module(model, (x,))
    assert small[0].out_channels == small[1].in_channels == 6
    back = fp.load(fp.save(small, tmp_path / "m"), build).eval()
    assert back[0].out_channels == back[1].in_channels == 6
    with torch.no_grad():
        assert torch.equal(back(x), small(x))


def test_split_widths_a_class_updater_set_are_saved_and_loaded(tmp_path):
    """timm's ``MixedConv2d`` keeps its split widths as a list (``splits``): it comes back a list, with the widths
    the updater set. (Before, lists were not saved: the loaded model split with its old widths and raised.)"""
    from test_minimize_module import MixBlock

    def build():
        return MixBlock().double().eval()

    model = build()
    with torch.no_grad():
        model.pw["0"].weight[[0, 1, 2, 5]] = 0
        model.pw["0"].bias[[0, 1, 2, 5]] = 0
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    small = fp.minimize_module(model, (x,))
    assert small.dw.splits == [1, 3, 4]
    back = fp.load(fp.save(small, tmp_path / "m"), build).eval()
    assert back.dw.splits == [1, 3, 4] and type(back.dw.splits) is list
    with torch.no_grad():
        assert torch.equal(back(x), small(x))


def test_shards_round_trip_and_are_plain_safetensors(saved_gpt2, tmp_path):
    """Weights above max_shard_bytes go to several files, each one safetensors can read; load reads them all."""
    import transformers as tf
    from safetensors.torch import load_file

    _, small, _ = saved_gpt2
    d = fp.save(small, tmp_path / "sharded", max_shard_bytes=20_000)
    files = sorted(p.name for p in d.glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    stored = {k: v for f in files for k, v in load_file(str(d / f)).items()}
    state = small.state_dict()
    assert set(stored) == set(state) - {"lm_head.weight"}  # tied to wte: stored once
    assert all(torch.equal(stored[k], state[k]) for k in stored)
    back = fp.load(d, lambda: tf.GPT2LMHeadModel(small.config).double().eval())
    ids = torch.arange(24).reshape(3, 8) % 100
    with torch.no_grad():
        assert torch.equal(logits(back(ids)), logits(small(ids)))
    (d / files[1]).write_bytes((d / files[1]).read_bytes()[:-8])  # one shard truncated
    with pytest.raises(fp.LoadError, match="SHA-256"):
        fp.load(d, lambda: tf.GPT2LMHeadModel(small.config).double().eval())


def test_format_1_directories_still_load(tmp_path):
    """A directory written before shards (format 1: one file, its hash at the top of the manifest) loads."""
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    d = fp.save(net, tmp_path)
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["format"], manifest["sha256"] = "fxprune-module/1", manifest.pop("shards")["model.safetensors"]
    (d / "manifest.json").write_text(json.dumps(manifest))
    back = fp.load(d, lambda: nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), net.state_dict().values()))


LLAMA = textwrap.dedent("""
    import torch, transformers as tf, fxprune as fp
    cfg = tf.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, use_cache=False)
    model = fp.load({d!r}, lambda: tf.LlamaForCausalLM(cfg).double().eval())
    assert type(model.model.norm).__name__ == "CompensatedRMSNorm"
    with torch.no_grad():
        torch.save(model(torch.arange(24).reshape(3, 8) % 100).logits, {out!r})
""")


@pytest.mark.slow
def test_llama_round_trip_in_a_fresh_process_keeps_its_compensated_rms_norms(tmp_path):
    model, (ids,), _ = planted("llama", "tiny")
    zoo.plant_dead_stream(model, "llama", [3, 7])
    small = fp.minimize_module(model, (ids,))
    d, out = fp.save(small, tmp_path / "llama"), tmp_path / "logits.pt"
    proc = subprocess.run([sys.executable, "-c", LLAMA.format(d=str(d), out=str(out))], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with torch.no_grad():
        assert torch.equal(torch.load(out), logits(small(torch.arange(24).reshape(3, 8) % 100)))


class _Normed(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.lin, self.norm = nn.Linear(4, 6), norm

    def forward(self, x):
        return self.norm(self.lin(x))


def test_a_compensated_rms_norm_keeps_its_offset_and_older_manifests_without_it_load(tmp_path):
    torch.manual_seed(0)
    net = _Normed(fp.nn.CompensatedRMSNorm(6, 8, 1e-6, 0.5, offset=1.0))
    with torch.no_grad():
        net.norm.weight.normal_()
    x = torch.randn(3, 4)
    d = fp.save(net, tmp_path / "m")
    back = fp.load(d, lambda: _Normed(nn.RMSNorm(6)))
    assert back.norm.offset == 1.0 and torch.equal(back(x), net(x))
    manifest = json.loads((d / "manifest.json").read_text())  # as written before the offset existed
    del manifest["modules"]["norm"]["replacement"]["args"]["offset"]
    (d / "manifest.json").write_text(json.dumps(manifest))
    assert fp.load(d, lambda: _Normed(nn.RMSNorm(6))).norm.offset == 0.0


class _OwnForwardNorm(nn.LayerNorm):
    """A LayerNorm subclass with a forward of its own that reaches ``super().forward``."""

    def forward(self, x):
        return super().forward(x) * 2.0


class _ChannelsFirstNorm(nn.LayerNorm):
    """A channels-first norm that calls ``F.layer_norm`` itself (torchvision's ``LayerNorm2d``)."""

    def forward(self, x):
        return nn.functional.layer_norm(x.movedim(1, -1), self.normalized_shape, self.weight, self.bias,
                                        self.eps).movedim(-1, 1)


class _Streams(nn.Module):
    """Two norms of the user's classes over streams with dead channels: minimize_module keeps their classes and
    makes them compensated."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.norm, self.mid = nn.Linear(4, 8), _OwnForwardNorm(8), nn.Conv1d(8, 6, 1)
        self.cf, self.out = _ChannelsFirstNorm(6), nn.Conv1d(6, 3, 1)

    def forward(self, x):  # x: (N, L, 4)
        h = self.norm(self.inp(x)).transpose(1, 2)
        return self.out(self.cf(self.mid(h)))


def _dead_streams() -> nn.Module:
    torch.manual_seed(0)
    net = _Streams().double().eval()
    with torch.no_grad():
        for m in (net.norm, net.cf):
            m.weight.normal_(), m.bias.normal_()
        net.inp.weight[:3] = 0.0  # the first norm's channels 0-2 hold the constants inp.bias[:3]
        net.mid.weight[:2] = 0.0  # the second's channels 0-1 hold mid.bias[:2]
        net.norm.weight[:3] = net.cf.weight[:2] = 0.0  # ...and nothing downstream reads them
    return net


@pytest.fixture(scope="module")
def compensated_own_classes():
    net = _dead_streams()
    small = fp.minimize_module(net, (torch.randn(2, 5, 4, dtype=torch.float64),))
    assert small.norm.weight.shape == (5,) and small.cf.weight.shape == (4,)  # both norms lost channels
    assert type(small.norm).__name__ == "_OwnForwardNorm" and isinstance(small.cf, _ChannelsFirstNorm)
    return net, small


def _same_function(a: nn.Module, b: nn.Module) -> None:
    for shape in ((2, 5, 4), (3, 9, 4)):  # the example's shape and another batch and length
        x = torch.randn(*shape, dtype=torch.float64)
        with torch.no_grad():
            ref = a(x)
            assert float((b(x) - ref).abs().max() / ref.abs().max()) <= 1e-9


def test_norms_of_the_users_classes_made_compensated_save_and_load_exactly(compensated_own_classes, tmp_path):
    net, small = compensated_own_classes
    d = fp.save(small, tmp_path / "m")
    back = fp.load(d, lambda: _Streams().double())
    assert isinstance(back.norm, _OwnForwardNorm) and isinstance(back.cf, _ChannelsFirstNorm)
    assert (back.norm.full_size, back.cf.full_size) == (8, 6)
    _same_function(net, back.eval())


def test_norms_of_the_users_classes_made_compensated_pickle_and_deepcopy(compensated_own_classes, tmp_path):
    import copy

    net, small = compensated_own_classes
    torch.save(small, tmp_path / "m.pt")  # (their class is made at run time: pickle finds the user's by name)
    for back in (torch.load(tmp_path / "m.pt", weights_only=False), copy.deepcopy(small)):
        assert type(back.norm) is type(small.norm) and back.cf.removed_sq_sum == small.cf.removed_sq_sum
        _same_function(net, back)


def test_a_manifest_without_a_shrunk_norms_statistics_is_refused(compensated_own_classes, tmp_path):
    _, small = compensated_own_classes
    d = fp.save(small, tmp_path / "m")
    manifest = json.loads((d / "manifest.json").read_text())
    good = manifest["modules"]["cf"]["compensated"]
    del manifest["modules"]["cf"]["compensated"]  # as an older fxprune wrote it: loading would change the function
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(fp.LoadError, match="'cf'.*lacks the statistics"):
        fp.load(d, lambda: _Streams().double())
    manifest["modules"]["cf"]["compensated"] = good | {"full_size": "6"}
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(fp.LoadError, match="'cf'.*compensated norm record"):
        fp.load(d, lambda: _Streams().double())


@pytest.mark.parametrize("groups", [1, 4])
def test_compensated_group_norms_save_and_load_exactly(tmp_path, groups):
    from test_norms import GroupNormStream, _groups

    model = GroupNormStream(norm=_groups(groups)).double().eval()
    small = fp.minimize_module(model, (torch.randn(2, 3, 6, 6, dtype=torch.float64),))
    back = fp.load(fp.save(small, tmp_path / "m"), lambda: GroupNormStream(norm=_groups(groups)).double())
    norm = back.blocks[1].norm2
    assert isinstance(norm, fp.nn.CompensatedGroupNorm) and back.stem.weight.shape[0] == 5
    assert (norm.kept_per_group, norm.removed_sum) == (small.blocks[1].norm2.kept_per_group, small.blocks[1].norm2.removed_sum)
    x = torch.randn(3, 3, 9, 5, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(back.eval()(x), small(x))


class _PlainNormStream(nn.Module):
    """A stream through ``nn.LayerNorm(elementwise_affine=False)`` and a norm of SqueezeBERT's kind (it calls
    ``nn.LayerNorm.forward`` by name on its permuted (N, C, L) input)."""

    def __init__(self) -> None:
        from test_minimize_module import PermutingNorm

        super().__init__()
        self.inp, self.norm = nn.Linear(4, 8), nn.LayerNorm(8, elementwise_affine=False)
        self.mid, self.cf, self.out = nn.Conv1d(8, 6, 1), PermutingNorm(6), nn.Conv1d(6, 3, 1)

    def forward(self, x):  # x: (N, L, 4)
        return self.out(self.cf(self.mid(self.norm(self.inp(x)).transpose(1, 2))))


def planted_norm_stream() -> nn.Module:
    """A :class:`_PlainNormStream` (float64, eval mode) whose norms' streams both hold removable constants."""
    torch.manual_seed(0)
    net = _PlainNormStream().double().eval()
    with torch.no_grad():
        net.inp.weight[:2] = 0.0  # the first norm's channels 0-1 hold the constants inp.bias[:2]...
        net.mid.weight[:, :2] = 0.0  # ...which nothing reads after it
        net.mid.weight[:3] = 0.0  # the second's channels 0-2 hold mid.bias[:3]...
        net.cf.weight[:3] = 0.0  # ...and it writes its bias there, which out reads
    return net


def test_a_norm_without_weights_and_a_permuting_norm_save_and_load_exactly(tmp_path):
    """A compensated norm without weights was rebuilt with them (``CompensatedLayerNorm``'s defaults), and load
    refused the files: "the weights do not fit build()'s model (missing ['norm.bias', 'norm.weight'])"."""
    net = planted_norm_stream()
    small = fp.minimize_module(net, (torch.randn(2, 5, 4, dtype=torch.float64),))
    assert type(small.norm).__name__ == "CompensatedLayerNorm" and small.norm.weight is None
    from test_minimize_module import PermutingNorm

    assert isinstance(small.cf, PermutingNorm) and small.cf.weight.shape == (3,)
    back = fp.load(fp.save(small, tmp_path / "m"), lambda: _PlainNormStream().double())
    assert back.norm.weight is None and back.norm.bias is None and back.norm.kept == 6
    _same_function(net, back.eval())
