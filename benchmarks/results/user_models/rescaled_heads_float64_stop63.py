"""Stop 63: the query rescale on trained weights, in float64. Each model of ``benchmarks/user_models.py`` is built,
trained by the flow's loop (6 epochs), cast to float64, and in every attention module with a head width one channel
per head of k and v is zeroed (as a mask would); then ``fp.minimize_module`` at the flow's example, and the copy
against the model at the example and at two other batch sizes and lengths (image models: batch sizes). Prints the
head widths before and after, whether the queries were rescaled, and the largest relative error per shape.

    OMP_NUM_THREADS=1 python benchmarks/results/user_models/rescaled_heads_float64_stop63.py mpnet esm gpt2
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parents[2]))
import user_models as um  # noqa: E402

import fxprune as fp  # noqa: E402
from fxprune.compare import compare, worst  # noqa: E402
from fxprune.interop.module import HEAD_WIDTH  # noqa: E402
from fxprune.verify import count_params  # noqa: E402


def width(m):
    return next((getattr(m, a) for a in HEAD_WIDTH if type(getattr(m, a, None)) is int), None)


for name in sys.argv[1:]:
    kind, model = um.build(name)
    x, y = um.data(kind)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(6):
        for idx in torch.randperm(um.N).split(32):
            opt.zero_grad()
            out = model(x[idx]) if kind == "img" else model(input_ids=x[idx], labels=x[idx] if kind == "lm" else y[idx])
            loss = F.cross_entropy(out.logits, y[idx]) if kind == "img" else out.loss
            loss.backward()
            opt.step()
    model = model.double().eval()
    if kind == "img":
        x = x.double()
    heads = {p: m for p, m in model.named_modules() if width(m)}
    with torch.no_grad():
        for p, m in heads.items():
            w = width(m)
            for cname, c in m.named_children():
                if cname in ("k", "key", "k_proj", "v", "value", "v_proj") and getattr(c, "weight", None) is not None:
                    rows = torch.arange(1, c.weight.shape[0], w)
                    c.weight[rows] = 0
                    if c.bias is not None:
                        c.bias[rows] = 0
    example = (x[:8],)
    small = fp.minimize_module(model, example)
    widths = sorted({(width(m), width(small.get_submodule(p))) for p, m in heads.items()})
    errs = []
    shapes = [x[:8], x[:3], x[:17]] if kind == "img" else [x[:8], x[:3, :9], x[:5, :13]]
    for xi in shapes:
        with torch.no_grad():
            errs.append(f"{tuple(xi.shape)}: {worst(compare(model(xi).logits, small(xi).logits)):.1e}")
    print(f"{name:12s} head widths {widths}  params {count_params(model):,} -> {count_params(small):,}  "
          f"max rel error {', '.join(errs)}", flush=True)
