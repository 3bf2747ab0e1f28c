"""Run ``fp.minimize_checkpoint`` under a cap on the address space below the checkpoint's size.

Usage: capped_stream.py CONFIG_JSON CHECKPOINT OUT_DIR HEADROOM. A tiny model goes through the whole path first
(so every import is done), then the cap is set to the process's address space plus HEADROOM times the
checkpoint's bytes; after the run, allocating the checkpoint's bytes is tried and must fail. Prints one JSON line.
"""
import json
import os
import resource
import sys
from pathlib import Path

import torch
import transformers as tf

import fxprune as fp

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
from streamed import vm_bytes, warm_up  # noqa: E402


def main() -> None:
    config, checkpoint, out, headroom = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
    cfg = tf.LlamaConfig(**config)
    warm_up(torch.float32)
    weights = os.path.getsize(checkpoint)
    cap = vm_bytes() + int(headroom * weights)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    r = fp.minimize_checkpoint(lambda: tf.LlamaForCausalLM(cfg), checkpoint, (ids,), out)
    try:
        torch.empty(weights, dtype=torch.uint8).fill_(1)
        whole_fits = True
    except (RuntimeError, MemoryError):
        whole_fits = False
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(dict(params=r.params, checks=[[c.shapes, max(c.blocks), c.outputs] for c in r.checks],
                          whole_fits=whole_fits, cap=cap, weights=weights, peak_rss=peak, bytes_read=r.bytes_read)))


if __name__ == "__main__":
    main()
