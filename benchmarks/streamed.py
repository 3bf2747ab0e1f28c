"""Streamed minimize: a Llama-style checkpoint larger than the memory cap of the process that minimizes it.

    python benchmarks/streamed.py                         # 3B float32 (10.5 GiB of weights) under a 6 GiB cap
    python benchmarks/streamed.py --config 1B --cap-gb 3

1. The checkpoint is written tensor by tensor into ``--workdir`` (kept for the next run): the configs and weights
   of ``scale.py`` (uniform +-0.02, norms 1), a quarter of every MLP's hidden units dead (zero rows of
   ``gate_proj`` and ``up_proj``) and one key/value group per layer (zero columns of ``o_proj``).
2. ``fp.minimize_checkpoint`` runs in a subprocess whose address space (``RLIMIT_AS``) is capped at ``--cap-gb`` GiB,
   set after a tiny model went through the same path (imports done). glibc keeps freed blocks in its heap unless
   told otherwise, so the subprocess runs with ``MALLOC_MMAP_THRESHOLD_=65536 MALLOC_ARENA_MAX=1``. Its own check
   compares every block's output at the example (batch 1, 32 tokens) and at batch 2. Then it tries to allocate
   the checkpoint's bytes, and reports that it cannot.
3. This process (no cap) loads the result with ``fp.load`` and compares every block's output (hidden states) and
   the logits with the original model run with its weights streamed in (``forward_streamed``), at 2 sequences
   of 16 tokens (a shape the example did not have).

Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from scale import CONFIGS, config  # noqa: E402

SEQ = 32


def write_checkpoint(name: str, dtype_name: str, directory: Path) -> int:
    """The planted checkpoint, one tensor at a time; returns its parameter count."""
    import re

    import torch
    from transformers import LlamaForCausalLM

    from fxprune.interop.saving import write_module

    cfg = config(name)
    dtype = getattr(torch, dtype_name)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(dtype)
    hd = cfg.hidden_size // cfg.num_attention_heads
    per_group = cfg.num_attention_heads // cfg.num_key_value_heads

    def fetch(pname: str, t: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(zlib.crc32(pname.encode()))
        if t.dim() == 1:
            return torch.ones(t.shape, dtype=dtype)
        v = torch.empty(t.shape, dtype=dtype).uniform_(-0.02, 0.02, generator=g)
        m = re.match(r"model\.layers\.(\d+)\.", pname)
        if m:
            lg = torch.Generator().manual_seed(int(m.group(1)))
            dead = torch.randperm(cfg.intermediate_size, generator=lg)[: cfg.intermediate_size // 4]
            grp = int(torch.randint(cfg.num_key_value_heads, (1,), generator=lg))
            if pname.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight")):
                v[dead] = 0
            elif pname.endswith("self_attn.o_proj.weight"):
                v[:, grp * per_group * hd:(grp + 1) * per_group * hd] = 0
        return v

    write_module(model, directory, fetch)
    return sum(p.numel() for p in model.parameters())


def vm_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))


def warm_up(dtype: Any) -> None:
    """A tiny Llama through the whole streamed path, so that every import is done before a cap is set."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    import fxprune as fp

    tiny = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, use_cache=False)
    warm = tempfile.mkdtemp()
    m = LlamaForCausalLM(tiny).to(dtype)
    save_file({k: v.detach().clone() for k, v in m.state_dict().items()}, f"{warm}/t.safetensors")
    fp.minimize_checkpoint(lambda: LlamaForCausalLM(tiny).to(dtype), f"{warm}/t.safetensors",
                           (torch.zeros(1, 8, dtype=torch.long),), f"{warm}/out")


def child(name: str, dtype_name: str, checkpoint: str, out: str, cap_gb: float) -> dict[str, Any]:
    """Runs in the capped subprocess."""
    import torch
    from transformers import LlamaForCausalLM

    import fxprune as fp

    dtype = getattr(torch, dtype_name)
    warm_up(dtype)
    base = vm_bytes()
    cap = int(cap_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    cfg = config(name)
    ids = torch.randint(0, cfg.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    r = fp.minimize_checkpoint(lambda: LlamaForCausalLM(cfg).to(dtype), checkpoint, (ids,), out)
    seconds = time.perf_counter() - t0
    weights = sum(p.stat().st_size for p in Path(checkpoint).glob("*.safetensors"))
    try:
        torch.empty(weights, dtype=torch.uint8).fill_(1)
        whole = True
    except (RuntimeError, MemoryError):
        whole = False
    return dict(seconds=seconds, params=r.params, bytes_read=r.bytes_read, weights_bytes=weights, cap_bytes=cap,
                address_space_at_start=base, peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                whole_weights_allocatable=whole,
                checks=[dict(shapes=c.shapes, worst_block=max(c.blocks), outputs=c.outputs) for c in r.checks])


def compare_loaded(name: str, dtype_name: str, checkpoint: Path, out: Path) -> dict[str, Any]:
    """fp.load's result against the original run streamed, block by block, at 2 x 16 tokens."""
    import torch
    from transformers import LlamaForCausalLM

    import fxprune as fp
    from fxprune.interop.stream import forward_streamed

    cfg = config(name)
    dtype = getattr(torch, dtype_name)
    build = lambda: LlamaForCausalLM(cfg).to(dtype)  # noqa: E731
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    ref = forward_streamed(build, checkpoint, (ids,), output_hidden_states=True)
    streamed_s = time.perf_counter() - t0
    small = fp.load(out, build).eval()
    with torch.no_grad():
        got = small(ids, output_hidden_states=True)
    rel = [float((a.double() - b.double()).abs().max() / a.double().abs().max())
           for a, b in zip(ref.hidden_states + (ref.logits,), got.hidden_states + (got.logits,))]
    return dict(loaded_params=sum(p.numel() for p in small.parameters()), block_rel=rel[:-1], logits_rel=rel[-1],
                streamed_forward_s=streamed_s)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="3B", choices=list(CONFIGS))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--cap-gb", type=float, default=6.0)
    ap.add_argument("--workdir", default=None, help="where the checkpoint and the result go (default: a folder in /tmp)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # internal: checkpoint, out
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.config, a.dtype, a.child[0], a.child[1], a.cap_gb)))
        return {}
    work = Path(a.workdir or f"/tmp/fxprune-streamed-{a.config}-{a.dtype}")
    ckpt, out = work / "checkpoint", work / "minimized"
    t0 = time.perf_counter()
    if not (ckpt / "manifest.json").exists():
        write_checkpoint(a.config, a.dtype, ckpt)
    written_s = time.perf_counter() - t0
    if out.exists():
        import shutil
        shutil.rmtree(out)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_ARENA_MAX="1")
    p = subprocess.run([sys.executable, __file__, "--config", a.config, "--dtype", a.dtype, "--cap-gb", str(a.cap_gb),
                        "--child", str(ckpt), str(out)], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        print(p.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"the capped run failed (exit {p.returncode})")
    row = json.loads(p.stdout.strip().splitlines()[-1])
    row.update(compare_loaded(a.config, a.dtype, ckpt, out))
    gb = 2**30
    w = row["weights_bytes"]
    print(f"{a.config} {a.dtype}: {row['params'][0]:,} -> {row['params'][1]:,} parameters; weights {w / gb:.2f} GiB; "
          f"cap {row['cap_bytes'] / gb:.1f} GiB ({row['cap_bytes'] / w:.2f}x the weights; allocating the weights' "
          f"bytes under it {'worked' if row['whole_weights_allocatable'] else 'failed'})")
    print(f"minimize_checkpoint {row['seconds']:.0f} s, read {row['bytes_read'] / w:.1f}x the weights, peak RSS "
          f"{row['peak_rss_bytes'] / gb:.2f} GiB ({row['peak_rss_bytes'] / w:.2f}x the weights)")
    for c in row["checks"]:
        print(f"  its check at {c['shapes']}: worst block rel {c['worst_block']:.2e}, outputs rel {c['outputs']:.2e}")
    print(f"fp.load: {row['loaded_params']:,} parameters; vs the original streamed at 2x16 tokens: worst block rel "
          f"{max(row['block_rel']):.2e}, logits rel {row['logits_rel']:.2e} (checkpoint written in {written_s:.0f} s)")
    res = dict(benchmark="streamed", config=a.config, dtype=a.dtype, checkpoint_write_s=written_s, **row)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
