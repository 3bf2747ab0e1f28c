"""Bad input: every case gets a typed error (a subclass of FxPruneError) whose message names the problem and what
to do, or works exactly. One test per row of docs/errors.md; determinism of the whole pipeline at the end."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune as fp
from conftest import snapshot
from fxprune.verify import count_params


def mlp(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).to(dtype)
    with torch.no_grad():
        net[0].weight[:6] = 0  # six dead hidden units
    return net


def test_every_error_is_an_fxprune_error():
    for cls in (fp.CaptureError, fp.InputError, fp.MaskError, fp.EquivalenceError, fp.UnsupportedError):
        assert issubclass(cls, fp.FxPruneError) and cls.__module__ == "fxprune.errors"


class DataDependent(nn.Module):
    def forward(self, x):
        return x * 2 if bool(x.sum() > 0) else x.item()


def test_untraceable_model():
    with pytest.raises(fp.CaptureError, match="could not capture DataDependent") as e:
        fp.capture(DataDependent(), (torch.ones(1),))
    assert "symbolic:" in str(e.value) and "export:" in str(e.value) and "What to try" in str(e.value)


@pytest.mark.parametrize("inputs, match", [
    ((torch.randn(2, 5),), r"failed on the example inputs \(\(2, 5\):torch.float32\)"),
    (None, "example_inputs is None"),
    ({"x": torch.randn(2, 8)}, r"Sequential.forward has no positional parameter 'x' \(it has input\)"),
    ({}, "example_inputs is an empty dict"),
    ("abc", "must be a tensor, a tuple of tensors or a dict of keyword inputs"),
])
def test_inputs_that_do_not_fit(inputs, match):
    with pytest.raises(fp.InputError, match=match):
        fp.capture(mlp(), inputs)


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5, float("nan"), "0.5", True])
def test_sparsity_outside_range(sparsity):
    gm = fp.capture(mlp(), (torch.randn(2, 8),))
    with pytest.raises(fp.MaskError, match=r"sparsity must be a number in \[0, 1\)"):
        fp.mask(gm, sparsity)


def test_mask_of_the_wrong_shape():
    gm = fp.capture(mlp(), (torch.randn(2, 8),))
    with pytest.raises(fp.MaskError, match=r"mask for '0.weight' has shape \(3, 3\), the parameter has \(16, 8\)"):
        fp.mask(gm, masks={"0.weight": torch.ones(3, 3, dtype=torch.bool)})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("pass_", ["mask", "minimize", "release"])
def test_nan_or_inf_weights(bad, pass_):
    net = mlp()
    with torch.no_grad():
        net[2].weight[0, 0] = bad
    gm = fp.capture(net, (torch.randn(2, 8),))
    run = {"mask": lambda: fp.mask(gm, 0.5), "minimize": lambda: fp.minimize(gm), "release": lambda: fp.release(gm)}
    with pytest.raises(fp.UnsupportedError, match=rf"'2.weight' holds NaN or Inf values: fix or re-initialize it before {pass_}"):
        run[pass_]()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_work(dtype):
    net = mlp(dtype)
    x = torch.randn(3, 8, dtype=dtype)
    small = fp.minimize(fp.capture(net, (x,)))
    assert small.get_parameter("0.weight").shape == (10, 8) and small.get_parameter("0.weight").dtype == dtype
    ref = fp.minimize(fp.capture(mlp(torch.float64), (x.double(),)))  # exact in float64
    assert torch.allclose(small(x).double(), ref(x.double()), rtol=2e-2, atol=2e-2)


class IntegerModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.randint(-3, 3, (4, 8)))

    def forward(self, x):
        return x @ self.w.T


def test_integer_models_pass_through_unchanged():
    m, x = IntegerModel(), torch.randint(0, 5, (2, 8))
    small = fp.minimize(fp.capture(m, (x,)))
    assert torch.equal(small(x), m(x))
    with pytest.raises(fp.MaskError, match="no parameter matches: mask selects floating parameters"):
        fp.mask(fp.capture(m, (x,)), 0.5)


class Shared(nn.Module):
    """One Linear called twice: its channels are coupled across both calls."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(torch.relu(self.a(x)))))


@pytest.mark.parametrize("method", ["symbolic", "export"])
def test_shared_submodule_called_twice_is_exact(method):
    m = Shared().double()
    with torch.no_grad():
        m.a.weight[2] = 0
        m.b.weight[:, 5] = 0
    x = torch.randn(3, 8, dtype=torch.float64)
    gm = fp.capture(m, (x,), method=method)
    small = fp.minimize(gm)
    assert fp.verify(gm, small, (x,)).ok
    assert torch.allclose(small(x), m(x), rtol=1e-12, atol=1e-12)


class InplaceRead(nn.Module):
    """``relu_`` mutates ``y`` after a view of it was taken: the view sees the write, the symbolic graph cannot
    represent that."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        y = self.a(x)
        head = y[:, 4:]
        y.relu_()
        return self.b(y) + head


class InplaceThenRead(nn.Module):
    """In-place ops on a fresh value, which is read after them (``h.relu_(); h.mul_(2); return lin(h)``)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        y = self.a(x)
        y.relu_()
        y.mul_(2.0)
        y += 0.25
        out = self.b(y)
        out.relu_()
        return out


class InplaceChain(nn.Module):
    """``Linear -> ReLU(inplace=True)``: the mutated value has no other reader, so the symbolic graph is right."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(inplace=True), nn.Linear(8, 4))

    def forward(self, x):
        return self.net(x)


def _planted(m: nn.Module) -> nn.Module:
    m = m.double()
    lin = [c for c in m.modules() if isinstance(c, nn.Linear)][0]
    with torch.no_grad():
        lin.weight[2] = 0
        lin.bias[2] = -0.7  # relu of it is 0, not -0.7: reading the pre-relu value would be wrong
    return m


def test_inplace_op_on_a_value_read_again():
    m, x = _planted(InplaceRead()), torch.randn(3, 8, dtype=torch.float64)
    with pytest.raises(fp.CaptureError, match="in-place op 'relu_' .* writes into 'a', which is read elsewhere") as e:
        fp.capture(m, (x,), method="symbolic")
    assert "method='export'" in str(e.value)
    gm = fp.capture(m, (x,))  # auto: torch.export functionalizes the mutation
    assert gm.meta["fxprune_capture_method"] == "export"
    small = fp.minimize(gm)
    assert torch.allclose(small(x), m(x), rtol=1e-12, atol=1e-12) and count_params(small) < count_params(m)


def test_inplace_ops_read_after_them_are_captured_symbolically_as_the_value_they_leave():
    m, x = _planted(InplaceThenRead()), torch.randn(3, 8, dtype=torch.float64)
    with torch.no_grad():
        m.b.weight[:, 5] = 0  # and a unit nothing reads
    gm = fp.capture(m, (x,), method="symbolic")  # checked against the model by capture itself
    targets = [n.target for n in gm.graph.nodes if n.op == "call_method"]
    assert targets.count("relu_") == 2 and "mul_" in targets
    small = fp.minimize(gm)
    assert count_params(small) == count_params(m) - 2 * (8 + 1 + 4)
    for b in (3, 7):
        x = torch.randn(b, 8, dtype=torch.float64)
        assert torch.allclose(small(x), m(x), rtol=1e-12, atol=1e-12)


def test_inplace_op_nobody_else_reads_stays_symbolic():
    m, x = _planted(InplaceChain()), torch.randn(3, 8, dtype=torch.float64)
    gm = fp.capture(m, (x,))
    assert gm.meta["fxprune_capture_method"] == "symbolic"
    small = fp.minimize(gm)
    assert torch.allclose(small(x), m(x), rtol=1e-12, atol=1e-12) and count_params(small) < count_params(m)


def meta_mlp() -> nn.Module:
    with torch.device("meta"):
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def test_meta_device_models_are_analyzed_without_weights():
    gm = fp.capture(meta_mlp(), (torch.randn(2, 8, device="meta"),))
    groups = fp.analyze(gm)
    hidden = [g for g in groups.groups if g.size == 16]
    assert len(hidden) == 1 and not hidden[0].frozen  # the hidden units are a free group
    for run, what in ((lambda: fp.minimize(gm), "minimize"), (lambda: fp.mask(gm, 0.5), "mask"),
                      (lambda: fp.release(gm), "release")):
        with pytest.raises(fp.UnsupportedError, match=f"is on the meta device \\(no values\\): {what} needs real weights"):
            run()


def test_meta_device_transformer_is_analyzed():
    transformers = pytest.importorskip("transformers", reason="transformers is a dev dependency")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100, use_cache=False)
    with torch.device("meta"):
        model = transformers.LlamaModel(cfg)
    gm = fp.capture(model, (torch.randint(0, 100, (1, 8), device="meta"),))
    groups = fp.analyze(gm)
    assert any(g.size == 128 and not g.frozen for g in groups.groups)  # MLP hidden units: free


# ------------------------------------------------------------------------------------------- determinism


def _pipeline(seed: int) -> dict[str, bytes]:
    torch.manual_seed(123)  # the model; everything after depends on the seeds passed
    net = nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    x = torch.randn(5, 12)
    gm = fp.mask(fp.capture(net, (x,)), 0.9, criterion="random", seed=seed)
    small = fp.minimize(gm)
    freed = fp.release(small, 0.05, seed=seed, calibration=(x,), target=0.01)
    return snapshot(freed)


def test_same_inputs_and_seeds_give_byte_identical_state_dicts():
    torch.manual_seed(1)
    a = _pipeline(7)
    torch.manual_seed(2)  # the global RNG state must not matter
    b = _pipeline(7)
    assert a == b
    assert _pipeline(8) != a  # and the seed does matter


def test_squeeze_release_is_deterministic():
    def run() -> dict[str, bytes]:
        torch.manual_seed(0)
        x = torch.randn(64, 6)
        y = (x[:, 0] > 0).long()
        net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))

        def train(m):
            opt = torch.optim.SGD(m.parameters(), lr=0.1)
            for _ in range(5):
                opt.zero_grad()
                F.cross_entropy(m(x), y).backward()
                opt.step()

        res = fp.squeeze_release(net, (x[:2],), train=train, evaluate=lambda m: 1.0, cycles=2, sparsity=0.7,
                                 mask_steps=1, progress=False)
        return snapshot(res.module)

    assert run() == run()


def _net_and_graph():
    net = mlp()
    x = (torch.randn(3, 8),)
    return net, x, fp.capture(net, x)


@pytest.mark.parametrize("call, match", [
    (lambda net, x, gm: fp.capture("model", x), "capture takes an nn.Module, GraphModule or ExportedProgram, got str"),
    (lambda net, x, gm: fp.minimize("model"), "minimize takes a GraphModule .* got str"),
    (lambda net, x, gm: fp.mask(None, 0.5), "mask takes a GraphModule .* got NoneType"),
    (lambda net, x, gm: fp.mask(net, 0.5), "mask takes a GraphModule .* got the module Sequential: capture it first"),
    (lambda net, x, gm: fp.minimize(net), "minimize got the module Sequential and no example_inputs: pass them"),
    (lambda net, x, gm: fp.release([gm]), "release takes a GraphModule .* got list"),
    (lambda net, x, gm: fp.compensate_layernorm("m"), "compensate_layernorm takes a GraphModule"),
    (lambda net, x, gm: fp.minimize_module(gm, x), "minimize_module takes the user's nn.Module, got a GraphModule"),
    (lambda net, x, gm: fp.verify("m", gm, x), "verify compares two models: a is a str"),
    (lambda net, x, gm: fp.verify(gm, gm, x, n_random=-1), "n_random must be a non-negative integer, got -1"),
    (lambda net, x, gm: fp.GroupLasso({"w": 1}, x), "GroupLasso takes the model to be trained"),
    (lambda net, x, gm: fp.save("model", "/nonexistent"), "save writes an nn.Module, got str"),
    (lambda net, x, gm: fp.squeeze_release(net, x, train=lambda m: m, evaluate=lambda m: 1.0, sparsity=1.5),
     r"sparsity must be a number in \[0, 1\)"),
    (lambda net, x, gm: fp.squeeze_release(net, x, train=lambda m: m, evaluate=lambda m: 1.0, cycles=3,
                                           sparsity=[0.5, 0.5]), "sparsity gives 2 values for 3 cycles"),
    (lambda net, x, gm: fp.squeeze_release(net, x, train=lambda m: m, evaluate=lambda m: 1.0, lasso_every=0),
     "lasso_every must be a positive integer, got 0"),
    (lambda net, x, gm: fp.mask(gm, 1.0), r"sparsity must be a number in \[0, 1\)"),  # a MaskError is an InputError
])
def test_a_bad_argument_raises_input_error_everywhere(call, match):
    net, x, gm = _net_and_graph()
    with pytest.raises(fp.InputError, match=match):
        call(net, x, gm)


def test_mask_errors_are_input_errors():
    assert issubclass(fp.MaskError, fp.InputError)


@pytest.mark.parametrize("kind,good,bad", [
    ("positive integer", [1, 7], [0, -1, 1.0, True, "2"]),
    ("non-negative integer", [0, 3], [-1, 0.5, False]),
    ("non-negative number", [0, 0.5, 2], [-1e-9, True, None]),
    ("number in [0, 1)", [0, 0.99], [1, 1.0, -0.1, False]),
    ("number in [0, 1]", [0, 1], [1.01, -0.1, True]),
])
def test_every_numeric_option_is_checked_by_one_rule(kind, good, bad):
    from fxprune.errors import require

    for v in good:
        require("opt", v, kind)
    for v in bad:
        with pytest.raises(fp.InputError, match=rf"opt must be a {re.escape(kind)} \(note\), got {re.escape(repr(v))}"):
            require("opt", v, kind, note=" (note)")
    with pytest.raises(fp.MaskError):
        require("opt", bad[0], kind, error=fp.MaskError)
