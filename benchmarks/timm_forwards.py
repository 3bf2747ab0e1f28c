"""What ``capture`` + ``minimize`` cost on a large timm model in float64, counted in forwards of that model.

    pip install --no-deps timm              # not a dependency of fxprune; its models need only torch here
    python benchmarks/timm_forwards.py gemma4_vit_167m deepseek_vit_412m
    python benchmarks/timm_forwards.py gemma4_vit_167m deepseek_vit_412m --device cuda   # on a GPU

Each model is built with random weights at its default input size, in float64, batch 2, with a quarter of every
MLP's hidden units dead (zero rows and biases of the layer that makes them: ``mlp.fc1`` or the gated MLP's
``mlp.up_proj``). One plain no-grad forward is the unit; then fxprune's default path, ``fp.minimize(fp.capture(model,
(x,)))``, runs once with its phases timed (``planted.Phases``: each phase's own seconds). The check's forwards
(the result at each check shape, the model at each but the example) are what a checked rewrite cannot go below,
and the reference forward is ``capture``'s. Prints a table per model and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import fxprune as fp
from fxprune.verify import count_params
from planted import Phases
from torchvision_zoo import stub_meta_registrations

MLP_IN = ("mlp.fc1", "mlp.up_proj.linear", "mlp.up_proj", "mlp_channels.fc1", "mlp_tokens.fc1")


def plant_dead_units(model: torch.nn.Module, g: torch.Generator) -> int:
    """Zero a quarter of every MLP's hidden units (random rows of the layer that makes them, and its bias), drawn
    from ``g``; returns how many."""
    dead = 0
    with torch.no_grad():
        for path, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and path.endswith(MLP_IN):
                idx = torch.randperm(mod.out_features, generator=g)[: mod.out_features // 4]
                mod.weight[idx] = 0
                if mod.bias is not None:
                    mod.bias[idx] = 0
                dead += len(idx)
    return dead


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor, int]:
    """The model in float64, eval mode, a quarter of its MLP units dead; an input of its default size; the units."""
    stub_meta_registrations()  # timm imports torchvision
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name).double().eval()
    g = torch.Generator().manual_seed(0)
    dead = plant_dead_units(model, g)
    size = model.pretrained_cfg["input_size"]
    return model, torch.randn(2, *size, dtype=torch.float64, generator=g), dead


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(name: str, device: str = "cpu") -> dict:
    model, x, dead = build(name)
    model, x = model.to(device), x.to(device)
    with torch.no_grad():  # (a warm-up on a GPU: its first forward pays for kernel selection)
        if device != "cpu":
            model(x)
        sync(device)
        t0 = time.perf_counter()
        ref = model(x)
        sync(device)
    forward = time.perf_counter() - t0
    t0 = time.perf_counter()
    with Phases() as ph:
        small = fp.minimize(fp.capture(model, (x,)))
    sync(device)
    total = time.perf_counter() - t0
    with torch.no_grad():
        err = float(((small(x) - ref).abs().max() / ref.abs().max()))
    row = dict(model=name, device=device, input=list(x.shape), params=count_params(model), params_after=count_params(small),
               dead_units=dead, forward_s=round(forward, 2), total_s=round(total, 2),
               total_forwards=round(total / forward, 2), rel_err=err,
               phases={k: round(v / forward, 3) for k, v in sorted(ph.seconds.items(), key=lambda kv: -kv[1])})
    print(f"\n{name}: input {tuple(x.shape)}, {row['params']:,} -> {row['params_after']:,} parameters "
          f"({dead} dead units), relative error {err:.1e}")
    print(f"one forward {forward:.1f} s; capture + minimize {total:.1f} s = {total / forward:.2f} forwards")
    for k, v in row["phases"].items():
        print(f"  {k:<18} {v:6.2f} forwards")
    print(f"  {'(rest)':<18} {(total - sum(ph.seconds.values())) / forward:6.2f} forwards")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="timm model names")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", default="cpu", help="where the model and input live (cuda: on a GPU)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = [run(n, a.device) for n in a.models]
    print(json.dumps(dict(benchmark="timm_forwards", threads=torch.get_num_threads(), rows=rows)))


if __name__ == "__main__":
    main()
