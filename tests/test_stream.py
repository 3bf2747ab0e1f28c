"""``fp.minimize_checkpoint``: the streamed path, checkpoint in, smaller checkpoint out, never all weights held."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fxprune as fp
from fxprune import zoo
from fxprune.interop import shards
from fxprune.interop.saving import file_sha256

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from planted import logits, planted  # noqa: E402

HELPER = Path(__file__).parent / "helpers" / "capped_stream.py"


def write_checkpoint(model: nn.Module, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.detach().clone() for k, v in model.state_dict().items()}, str(path))
    return path


def builder(model: nn.Module):
    cls, cfg, dtype = type(model), model.config, next(model.parameters()).dtype
    return lambda: cls(cfg).to(dtype)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_streamed_result_equals_minimize_module(name, tmp_path):
    """Tensor for tensor, the directory written from the checkpoint holds what minimize_module makes of the model
    in memory (GPT-2 with dead stream channels too: its LayerNorms become CompensatedLayerNorms), and it is exact
    in float64 at other batch sizes and sequence lengths. The checkpoint is not changed."""
    model, (ids,), _ = planted(name, "tiny")
    if name == "gpt2":
        zoo.plant_dead_stream(model, name, [3, 7])
    ckpt = write_checkpoint(model, tmp_path / "model.safetensors")
    digest = file_sha256(ckpt)
    result = fp.minimize_checkpoint(builder(model), ckpt, (ids,), tmp_path / "small")
    small = fp.minimize_module(model, (ids,))
    back = fp.load(result.directory, builder(model)).eval()
    assert result.params == (sum(p.numel() for p in model.parameters()), sum(p.numel() for p in small.parameters()))
    assert result.params[1] < result.params[0]
    want, got = small.state_dict(), back.state_dict()
    assert list(want) == list(got) and all(torch.equal(want[k], got[k]) for k in want)
    assert [type(m).__name__ for m in back.modules()] == [type(m).__name__ for m in small.modules()]
    assert len(result.checks) >= 2 and all(len(c.blocks) == model.config.num_hidden_layers for c in result.checks)
    x = torch.randint(0, model.config.vocab_size, (3, 11))
    with torch.no_grad():
        a, b = logits(model(x)), logits(back(x))
    assert float((a - b).abs().max() / a.abs().max()) <= 1e-9
    assert file_sha256(ckpt) == digest


def test_rms_norms_keep_their_streams(tmp_path):
    """A Llama whose stream also has dead channels: the streamed path keeps the stream whole (its RMSNorm
    compensation needs activations), still removes the dead MLP units, and the result is exact."""
    model, (ids,), _ = planted("llama", "tiny")
    zoo.plant_dead_stream(model, "llama", [3, 7])
    ckpt = write_checkpoint(model, tmp_path / "model.safetensors")
    result = fp.minimize_checkpoint(builder(model), ckpt, (ids,), tmp_path / "small")
    back = fp.load(result.directory, builder(model)).eval()
    assert back.model.norm.weight.shape == model.model.norm.weight.shape
    assert back.model.layers[0].mlp.up_proj.weight.shape[0] < model.model.layers[0].mlp.up_proj.weight.shape[0]
    with torch.no_grad():
        a, b = logits(model(ids)), logits(back(ids))
    assert float((a - b).abs().max() / a.abs().max()) <= 1e-9


def test_a_wrong_result_is_caught_and_removed(tmp_path, monkeypatch):
    """The block-by-block check has teeth: a result written with one value off raises, and leaves nothing."""
    import fxprune.interop.stream as stream

    model, (ids,), _ = planted("llama", "tiny")
    ckpt = write_checkpoint(model, tmp_path / "model.safetensors")
    real = stream.write_module

    def off_by_a_little(module, directory, fetch, max_shard_bytes):
        def bad(name, t):
            v = fetch(name, t)
            return v + 1e-6 if name == "model.layers.1.mlp.down_proj.weight" else v
        return real(module, directory, bad, max_shard_bytes)

    monkeypatch.setattr(stream, "write_module", off_by_a_little)
    with pytest.raises(fp.EquivalenceError, match="block 1"):
        fp.minimize_checkpoint(builder(model), ckpt, (ids,), tmp_path / "small")
    assert not (tmp_path / "small").exists()


def test_bad_checkpoints_are_typed_errors(tmp_path):
    model, (ids,), _ = planted("llama", "tiny")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    from safetensors.torch import save_file

    save_file({k: v for k, v in state.items() if k != "lm_head.weight"}, str(tmp_path / "missing.safetensors"))
    with pytest.raises(fp.LoadError, match="missing \\['lm_head.weight'\\]"):
        fp.minimize_checkpoint(builder(model), tmp_path / "missing.safetensors", (ids,), tmp_path / "a")
    save_file(state | {"lm_head.weight": state["lm_head.weight"][:, :5].clone()}, str(tmp_path / "shape.safetensors"))
    with pytest.raises(fp.LoadError, match="shaped differently"):
        fp.minimize_checkpoint(builder(model), tmp_path / "shape.safetensors", (ids,), tmp_path / "b")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(fp.LoadError, match="not a safetensors file"):
        fp.minimize_checkpoint(builder(model), tmp_path / "junk.safetensors", (ids,), tmp_path / "c")
    good = write_checkpoint(model, tmp_path / "good.safetensors")
    good.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(fp.LoadError, match="truncated or damaged"):
        fp.minimize_checkpoint(builder(model), good, (ids,), tmp_path / "d")
    with pytest.raises(fp.LoadError, match="no safetensors file"):
        fp.minimize_checkpoint(builder(model), tmp_path / "nowhere", (ids,), tmp_path / "e")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("mine")
    write_checkpoint(model, tmp_path / "ok.safetensors")
    with pytest.raises(fp.UnsupportedError, match="not empty"):
        fp.minimize_checkpoint(builder(model), tmp_path / "ok.safetensors", (ids,), tmp_path / "full")
    assert (tmp_path / "full" / "x").read_text() == "mine"


def test_shard_files_round_trip_with_the_safetensors_library(tmp_path):
    """Files shards.write makes are read by safetensors, and shards.Reader reads what safetensors writes."""
    from safetensors.torch import load_file, save_file

    ts = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.tensor([True, False, True]), "c": torch.arange(7),
          "d": torch.tensor(2.5, dtype=torch.float64), "e": torch.empty(0, 4)}
    shards.write(tmp_path / "mine.safetensors", [(k, v.dtype, tuple(v.shape)) for k, v in ts.items()], ts.__getitem__)
    back = load_file(str(tmp_path / "mine.safetensors"))
    assert set(back) == set(ts) and all(torch.equal(back[k], ts[k]) for k in ts)
    save_file(ts, str(tmp_path / "theirs.safetensors"))
    r = shards.Reader(tmp_path / "theirs.safetensors")
    assert all(torch.equal(r.read(k), ts[k]) and r.spec(k) == (ts[k].dtype, tuple(ts[k].shape)) for k in ts)
    with pytest.raises(ValueError, match="header says"):
        shards.write(tmp_path / "x.safetensors", [("a", torch.float32, (2,))], lambda k: torch.zeros(3))


@pytest.mark.slow
def test_minimizes_a_checkpoint_larger_than_its_memory_cap(tmp_path):
    """In a process whose address space is capped at its size after the imports plus 3/4 of the checkpoint (so
    allocating the checkpoint's bytes fails there), the streamed path minimizes the checkpoint; the result,
    loaded with fp.load in this process, equals the original model."""
    import transformers as tf

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from scale import plant

    config = dict(vocab_size=8000, hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
                  num_key_value_heads=4, max_position_embeddings=256, use_cache=False)
    cfg = tf.LlamaConfig(**config)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        plant(model, torch.Generator().manual_seed(0))
    ckpt = write_checkpoint(model, tmp_path / "model.safetensors")
    # freed weight buffers go back to the system at once, and no thread reserves an arena of its own
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_ARENA_MAX="1")
    proc = subprocess.run([sys.executable, str(HELPER), json.dumps(config), str(ckpt), str(tmp_path / "small"), "0.75"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not report["whole_fits"] and report["params"][1] < report["params"][0]
    back = fp.load(tmp_path / "small", lambda: tf.LlamaForCausalLM(cfg)).eval()
    assert sum(p.numel() for p in back.parameters()) == report["params"][1]
    ids = torch.randint(0, cfg.vocab_size, (3, 9))
    with torch.no_grad():
        out_a = model(ids, output_hidden_states=True)
        out_b = back(ids, output_hidden_states=True)
    for a, b in zip(out_a.hidden_states + (out_a.logits,), out_b.hidden_states + (out_b.logits,)):
        assert float((a - b).abs().max() / a.abs().max()) <= 1e-4
