"""A user's flows on a GPU, each through ``fp.squeeze_release``; one JSON line per flow (``ok`` false with the
error and traceback where one fails):

    python benchmarks/gpu_flows.py cuda                      # every flow
    python benchmarks/gpu_flows.py cuda resnet vit           # some
    python benchmarks/gpu_flows.py cpu                       # a short dry run on the CPU

- ``trainer_cpu_first``: a BERT classifier on the CPU, a transformers ``Trainer`` (no ``use_cpu``) that puts each
  module it trains on the GPU, a collated batch (on the CPU) as the example inputs;
- ``trainer_gpu_first``: the same, the model trained once (on the GPU) before the cycle;
- ``resnet``, ``vit``: the benchmark's untuned ResNet-style CNN (BatchNorm) and transformers ViT on the GPU, on
  digits, an ordinary AdamW loop calling ``.train()``/``.eval()``, 3 cycles with the defaults; eager latency of
  the dense and the kept module at batch 256 (median-free: the mean of 50 forwards after 5 warm-up ones).
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import tempfile
import time
import traceback
import warnings

import torch
import torch.nn.functional as F
import transformers

import fxprune as fp
from fxprune.verify import count_params

dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
small = dev == "cpu"  # a dry run: fewer samples, epochs and cycles
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import squeeze_release as sr  # noqa: E402


def devices(m):
    return sorted({t.device.type for t in [*m.parameters(), *m.buffers()]})


def report(name, f):
    t0 = time.perf_counter()
    try:
        out = f()
        out.update(flow=name, ok=True)
    except Exception as e:
        out = dict(flow=name, ok=False, error=f"{type(e).__name__}: {e}"[:2000], tb=traceback.format_exc()[-4000:])
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out), flush=True)


def trainer_flow(model_on_device_first):
    torch.manual_seed(0)
    ex = importlib.import_module("trainer_squeeze_release")
    cfg = transformers.BertConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=2)
    model = transformers.BertForSequenceClassification(cfg)
    tr, va = ex.Tokens(512 if small else 1024, 0), ex.Tokens(256, 1)
    seen = []
    def train(m):
        args = transformers.TrainingArguments(output_dir=tempfile.mkdtemp(), num_train_epochs=1 if small else 4,
                                              per_device_train_batch_size=64, learning_rate=2e-3, report_to=[],
                                              save_strategy="no", logging_strategy="no", disable_tqdm=True,
                                              use_cpu=(dev == "cpu"))
        transformers.Trainer(model=m, args=args, train_dataset=tr).train()
        seen.append(devices(m))
    @torch.no_grad()
    def evaluate(m):
        m.eval()
        d = next(m.parameters()).device
        b = {k: v.to(d) for k, v in va[:].items()}
        return float((m(**b).logits.argmax(-1) == b["labels"]).float().mean())
    if model_on_device_first:
        train(model)  # the Trainer puts it on the GPU
    batch = next(iter(torch.utils.data.DataLoader(tr, batch_size=8)))  # on the CPU, as the collator gives it
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = fp.squeeze_release(model, batch, train=train, evaluate=evaluate, cycles=2, progress=False)
    m = res.module
    return dict(cls=type(m).__name__, devices=devices(m), train_devices=seen, params_dense=count_params(model),
                params=count_params(m), acc_dense=res.dense["accuracy"], acc=evaluate(m),
                warnings=sorted({f"{x.category.__name__}: {str(x.message)[:150]}" for x in w})[:6])


def plain_flow(name):
    torch.manual_seed(0)
    data = sr.load("digits", 0)
    model, sample = sr.build(name, "digits")
    model = model.to(dev)
    x = {k: data[f"x_{k}"].reshape(-1, *sample).to(dev) for k in ("train", "val")}
    y = {k: data[f"y_{k}"].to(dev) for k in ("train", "val")}
    bn_moved, calls = [], [0]
    def train(m, epochs=3 if small else 15):
        calls[0] += 1
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-3)
        bns = [b for b in m.modules() if isinstance(b, torch.nn.modules.batchnorm._BatchNorm)]
        before = [b.running_mean.clone() for b in bns]
        m.train()
        g = torch.Generator(device=dev).manual_seed(calls[0])
        for _ in range(epochs):
            for idx in torch.randperm(len(x["train"]), generator=g, device=dev).split(64):
                opt.zero_grad()
                F.cross_entropy(sr.logits(m(x["train"][idx])), y["train"][idx]).backward()
                opt.step()
        if bns:
            bn_moved.append(all(not torch.equal(a, b.running_mean) for a, b in zip(before, bns)))
    @torch.no_grad()
    def evaluate(m):
        m.eval()
        return float((sr.logits(m(x["val"])).argmax(-1) == y["val"]).float().mean())
    train(model, 5 if small else 40)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = fp.squeeze_release(model, (x["train"][:8],), train=train, evaluate=evaluate, cycles=2 if small else 3,
                                 progress=False)
    cyc = time.perf_counter() - t0
    m = res.module.eval()
    xb = x["val"][:5]
    with torch.no_grad():
        out = sr.logits(m(xb))
    # latency of the dense and the kept module on the device, batch 256, eager, no grad
    def lat(mm):
        mm = mm.eval()
        xx = x["val"][:256]
        with torch.no_grad():
            for _ in range(5):
                mm(xx)
            if dev == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(50):
                mm(xx)
            if dev == "cuda":
                torch.cuda.synchronize()
        return (time.perf_counter() - t) / 50
    return dict(cls=type(m).__name__, devices=devices(m), params_dense=count_params(model), params=count_params(m),
                acc_dense=res.dense["accuracy"], acc=evaluate(m), out_shape=list(out.shape), bn_moved=bn_moved,
                cycle_seconds=round(cyc, 1), fxprune_share=[round(h["fxprune_seconds"] / h["seconds"], 3) for h in res.history],
                compression=[round(h["compression"], 2) for h in res.history],
                latency_dense_ms=1e3 * lat(model), latency_kept_ms=1e3 * lat(m),
                warnings=sorted({f"{x.category.__name__}: {str(x.message)[:150]}" for x in w})[:6])


def main() -> None:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
    flows = {"trainer_cpu_first": lambda: trainer_flow(False), "trainer_gpu_first": lambda: trainer_flow(True),
             "resnet": lambda: plain_flow("resnet"), "vit": lambda: plain_flow("vit")}
    for name in sys.argv[2:] or list(flows):
        report(name, flows[name])


if __name__ == "__main__":
    main()
