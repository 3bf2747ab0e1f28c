"""Loops users write, through fp.squeeze_release on a small BERT classifier (2 cycles, tolerance 0.05): which
break, which silently do nothing. ``python benchmarks/results/user_models/loops_stop60.py CASE``, CASE one of
plain, global_opt (an optimizer built once over the original model), hf_groups (two parameter groups, warmup,
clipping, gradient accumulation), gc (gradient checkpointing), autocast (bfloat16), compile_return (``train``
returns ``torch.compile(model)``). Prints one line: the class kept, its compression, the cycles' accuracies, the
dense accuracy; then fxprune's warnings."""
import sys, time, warnings, traceback, torch, torch.nn.functional as F
from torch import nn
import fxprune as fp
torch.manual_seed(0)
case = sys.argv[1]
from transformers import BertConfig, BertForSequenceClassification
N = 256
g = torch.Generator().manual_seed(0)
step = torch.randint(1, 3, (N, 1), generator=g)
x = (torch.randint(0, 32, (N, 1), generator=g) + step * torch.arange(16)) % 32
y = step[:, 0] - 1
model = BertForSequenceClassification(BertConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                 num_attention_heads=4, max_position_embeddings=64, num_labels=2))
glob_opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

def train(m, epochs=3):
    if case == "global_opt":
        opt = glob_opt
    elif case == "hf_groups":
        nd = ["bias", "LayerNorm.weight"]
        opt = torch.optim.AdamW([{"params": [p for n, p in m.named_parameters() if not any(k in n for k in nd)], "weight_decay": 0.01},
                                 {"params": [p for n, p in m.named_parameters() if any(k in n for k in nd)], "weight_decay": 0.0}], lr=3e-3)
    else:
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10)) if case == "hf_groups" else None
    if case == "gc":
        m.gradient_checkpointing_enable()
    m.train()
    k = 0
    for _ in range(epochs):
        for idx in torch.randperm(N).split(32):
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if case == "autocast" else torch.enable_grad()
            with ctx:
                loss = m(input_ids=x[idx], labels=y[idx]).loss
            (loss / (2 if case == "hf_groups" else 1)).backward()
            k += 1
            if case == "hf_groups" and k % 2:
                continue
            if case == "hf_groups":
                torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step(); opt.zero_grad()
            if sched: sched.step()
    if case == "compile_return":
        return torch.compile(m)
    return m

@torch.no_grad()
def evaluate(m):
    m.eval()
    return float((m(input_ids=x[:128]).logits.argmax(-1) == y[:128]).float().mean())

train(model, 6)
t0 = time.time()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
        res = fp.squeeze_release(model, {"input_ids": x[:8]}, train=train, evaluate=evaluate, cycles=2, tolerance=0.05, progress=False)
        print(case, "OK", type(res.module).__name__, f"{res.compression:.2f}x", [round(h["accuracy"], 3) for h in res.history], res.dense["accuracy"], f"{time.time()-t0:.0f}s")
    except Exception as e:
        print(case, "RAISED", type(e).__name__, str(e)[:300]); traceback.print_exc(limit=3)
for w in caught:
    if "fxprune" in (w.category.__module__ or ""): print("  warn", w.category.__name__, str(w.message)[:200])
