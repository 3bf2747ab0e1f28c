"""Stop 59: run one model of benchmarks/user_models.py through the cycle with every copy minimize_module returns
compared against the model it was made from at one pixel more than the example's height and width (an image
size a window must pad to), in float32. Prints "AT+1 shape relative-error" per cycle (images only).

    PYTHONPATH=CHECKOUT python benchmarks/results/user_models/held_static.py CHECKOUT MODEL

The random image drawn here changes the run's random stream: its trajectory is not the table's."""
import sys, time
import torch
wt = sys.argv[1]
sys.path.insert(0, wt + '/benchmarks'); sys.path.insert(0, wt)
import fxprune.cycle as cyc
orig = cyc.minimize_module


def wrapped(pre, inputs, **kw):
    out = orig(pre, inputs, **kw)
    x = inputs[0]
    if x.dim() == 4:
        big = torch.randn(x.shape[0], x.shape[1], x.shape[2] + 1, x.shape[3] + 1)
        with torch.no_grad():
            a, b = pre(big), out(big)
            a, b = getattr(a, "logits", a), getattr(b, "logits", b)
        print("AT+1", tuple(big.shape), float((a - b).abs().max() / a.abs().max()), flush=True)
    return out


cyc.minimize_module = wrapped
import user_models  # noqa: E402
t = time.time()
out = user_models.run(sys.argv[2])
print({k: out[k] for k in ("params", "kept_cls", "own_class", "warnings")}, time.time() - t)
