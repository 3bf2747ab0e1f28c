"""Stop 58: run one model of benchmarks/user_models.py through the cycle with every copy minimize_module returns
compared against the model it was made from at twice the example's sizes (images: twice the height and width;
token ids: twice the length, the example repeated), in float32. Prints "AT2X shape relative-error" per cycle.

    PYTHONPATH=CHECKOUT python benchmarks/results/user_models/past_range.py CHECKOUT MODEL [SAVE.pt] [--plus1]

SAVE.pt keeps the last model handed to minimize_module (and its inputs), to minimize it again on another code.
--plus1 (stop 59): images one pixel higher and wider instead of twice (a size a window must pad to); prints "AT+1".
The random image drawn here changes the run's random stream: its trajectory is not the table's."""
import sys, torch, copy, time
plus1 = "--plus1" in sys.argv
sys.argv = [a for a in sys.argv if a != "--plus1"]
wt = sys.argv[1]
sys.path.insert(0, wt + '/benchmarks'); sys.path.insert(0, wt)
import fxprune.cycle as cyc
orig = cyc.minimize_module
def wrapped(pre, inputs, **kw):
    out = orig(pre, inputs, **kw)
    x = inputs[0]
    if x.dim() == 4:
        grow = (lambda n: n + 1) if plus1 else (lambda n: 2 * n)
        bigs = (torch.randn(x.shape[0], x.shape[1], grow(x.shape[2]), grow(x.shape[3])),)
    else:
        bigs = tuple(t.index_select(1, torch.arange(2 * t.shape[1]) % t.shape[1]) if isinstance(t, torch.Tensor) and t.dim() >= 2 else t for t in inputs)
    big = bigs[0]
    if big is not None:
        with torch.no_grad():
            a, b = pre(*bigs), out(*bigs)
            a = getattr(a, "logits", a); b = getattr(b, "logits", b)
        print("AT+1" if plus1 else "AT2X", tuple(big.shape), float((a - b).abs().max() / a.abs().max()), flush=True)
        if len(sys.argv) > 3:
            torch.save(dict(model=copy.deepcopy(pre), inputs=inputs), sys.argv[3])
    return out
cyc.minimize_module = wrapped
import user_models
t = time.time()
out = user_models.run(sys.argv[2])
print({k: out[k] for k in ("params", "kept_cls", "own_class")}, time.time() - t)
