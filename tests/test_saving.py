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
    with torch.no_grad():
        torch.save(model(ids).logits, {out!r})
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
    with torch.no_grad():
        assert torch.equal(torch.load(out), logits(small(ids)))
        ref = logits(model(ids))
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
