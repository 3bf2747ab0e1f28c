"""Stop 64: the classes its fixes reached, on trained weights, in float64. Each model of
``benchmarks/user_models.py`` is built, cast to float64, trained by the flow's loop (6 epochs), and every
``nn.Linear`` that narrows its input (an MLP's down projection), and every stacked experts' ``down_proj``
(GPT-OSS's), reads nothing of the first quarter of its input units (zeroed, as a mask would); then ``fp.minimize_module`` at the flow's example (its labels
included), and the copy's logits against the model's at the example and at two other batch sizes and lengths.
Prints the class that came back, parameters before and after, fxprune's warnings, and the largest relative error
per shape; ``--float32`` first: in float32. (MRA is not here: its attention computes in float32 whatever the model's dtype.)

    OMP_NUM_THREADS=1 python benchmarks/results/user_models/new_classes_float64_stop64.py deberta_v1 apertus recurrent_gemma
    OMP_NUM_THREADS=1 python benchmarks/results/user_models/new_classes_float64_stop64.py --float32 gpt_oss
"""
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[2]))
import user_models as um  # noqa: E402

import fxprune as fp  # noqa: E402
from fxprune.compare import compare, worst  # noqa: E402
from fxprune.verify import count_params  # noqa: E402

names = sys.argv[1:]
dtype = torch.float64
if names[:1] == ["--float32"]:  # (models whose kernels take no float64: GPT-OSS's grouped_mm)
    names, dtype = names[1:], torch.float32
for name in names:
    kind, model = um.build(name)
    x, y = um.data(kind)

    def batch(ids, labelled=True):
        out = dict(input_ids=ids)
        if labelled or kind == "s2s":  # (an encoder-decoder's decoder reads its labels)
            out["labels"] = ids if kind in ("lm", "s2s") else y[:len(ids)]
        return out

    torch.set_default_dtype(dtype)  # (DeBERTa makes tensors of the default dtype in its forward)
    model = model.to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(6):
        for idx in torch.randperm(um.N).split(32):
            opt.zero_grad()
            model(**batch(x[idx])).loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.in_features > m.out_features:
                m.weight[:, :m.in_features // 4] = 0
            down = getattr(m, "down_proj", None)  # stacked experts (E, units, hidden): GPT-OSS's
            if isinstance(down, torch.nn.Parameter) and down.dim() == 3:
                down[:, :down.shape[1] // 4] = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small = fp.minimize_module(model, batch(x[:8]))
    said = sorted({f"{w.category.__name__}" for w in caught if w.category.__module__.startswith("fxprune")})
    errs = []
    for ids in (x[:8], x[:3, :9], x[:5, :13]):
        with torch.no_grad():
            errs.append(f"{tuple(ids.shape)}: "
                        f"{worst(compare(model(**batch(ids, False)).logits, small(**batch(ids, False)).logits)):.1e}")
    print(f"{name:16s} {type(small).__name__} (own class: {type(small) is type(model)})  params "
          f"{count_params(model):,} -> {count_params(small):,}  warnings {said}  max rel error {', '.join(errs)}",
          flush=True)
    torch.set_default_dtype(torch.float32)
