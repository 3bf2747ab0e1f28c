"""Faults a code read found: each test fails without its fix. Float64 models, both capture levels."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fxprune as fp
from conftest import snapshot
from fxprune.analysis.groups import Analysis
from fxprune.analysis.rule import nan_eval
from fxprune.analysis.rules import Elementwise
from fxprune.analysis.table import RULES
from fxprune.compare import compare, precision_of, rtol_for
from fxprune.passes.lower import lower_modules
from fxprune.verify import count_params

METHODS = ["symbolic", "export"]


def dead_rows(lin: nn.Linear, rows: list[int], value: float) -> None:
    """Rows of ``lin`` that write the constant ``value`` (zero weights, bias ``value``)."""
    with torch.no_grad():
        lin.weight[rows] = 0
        lin.bias[rows] = value


def minimized(model: nn.Module, x: torch.Tensor, method: str) -> tuple[nn.Module, nn.Module]:
    model = model.double().eval()
    x = x.double()
    before = snapshot(model)
    small = fp.minimize(fp.capture(model, (x,), method=method))
    assert snapshot(model) == before
    for xs in (x, torch.randn(5, *x.shape[1:], dtype=torch.float64)):
        with torch.no_grad():
            a, b = model(xs), small(xs)
        assert float((a - b).abs().max() / a.abs().max()) <= 1e-9
    return model, small


class SoftmaxModule(nn.Module):
    def __init__(self, dim: int | None, log: bool = False) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 6), nn.Linear(6, 2)
        self.sm = (nn.LogSoftmax if log else nn.Softmax)(dim=dim)
        dead_rows(self.a, [0, 1, 2], 0.0)  # dead hidden units before the softmax: removable

    def forward(self, x):
        return self.c(self.sm(self.b(torch.relu(self.a(x)))))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dim", [-1, 1, None])
@pytest.mark.parametrize("log", [False, True])
def test_softmax_module(method, dim, log):
    """nn.Softmax as a module crashed the analysis (``None % rank``); ``dim=None`` takes torch's legacy dim."""
    model, small = minimized(SoftmaxModule(dim, log), torch.randn(3, 4), method)
    assert count_params(small) == count_params(model) - 3 * 4 - 3 - 3 * 6  # a's rows, bias and b's columns


class StdConv(nn.Conv2d):
    """Weight standardization (NFNet, BiT): the conv's weight is computed in the forward."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / torch.sqrt(w.var(dim=(1, 2, 3), keepdim=True, unbiased=False) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class StdConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.c, self.d = nn.Conv2d(3, 8, 1), StdConv(8, 4, 3, padding=1), nn.Conv2d(4, 2, 1)
        with torch.no_grad():
            self.a.weight[:3] = 0
            self.a.bias[:3] = 0
            self.c.bias[1] = 0.0
            self.d.weight[:, 1] = 0  # c's output channel 1 is unread

    def forward(self, x):
        return self.d(self.c(torch.relu(self.a(x))))


@pytest.mark.parametrize("method", METHODS)
def test_computed_conv_weight_freezes_with_a_reason(method):
    """A conv whose weight is computed in the forward crashed minimize (``'NoneType' object has no attribute
    'shape'``). It cannot be sliced: its channels freeze, naming the layer."""
    model, small = minimized(StdConvNet(), torch.randn(2, 3, 6, 6), method)
    assert count_params(small) == count_params(model)
    gm = fp.capture(model, (torch.randn(2, 3, 6, 6, dtype=torch.float64),), method=method)
    reasons = [r for g in fp.analyze(gm).groups for r in g.reasons]
    assert any("computed in the forward" in r for r in reasons), reasons


class LiftedTable(nn.Module):
    """A tensor attribute that is neither a parameter nor a buffer (a cache built in eval mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)
        self.table = torch.randn(8, dtype=torch.float64)
        dead_rows(self.a, [0, 1, 2], 0.5)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)) + self.table)


@pytest.mark.parametrize("method", METHODS)
def test_lifted_constants_stay_out_of_the_state(method):
    """torch.export lifts such tensors out as constants; they became buffers of the result: its state dict grew
    and its parameter count counted them."""
    model, small = minimized(LiftedTable(), torch.randn(3, 4), method)
    assert set(small.state_dict()) <= set(model.state_dict())
    assert count_params(small) == count_params(model) - 3 * 4 - 3 - 3 * 2


class Unflattened(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.u, self.b = nn.Linear(4, 12), nn.Unflatten(1, (3, 4)), nn.Linear(4, 2)
        dead_rows(self.a, [1, 5, 9], 0.0)  # the same position in each of the 3 rows

    def forward(self, x):
        return self.b(torch.relu(self.u(self.a(x))))


@pytest.mark.parametrize("method", METHODS)
def test_unflatten_module_is_resized(method):
    """An nn.Unflatten module kept its stale ``unflattened_size`` after channels were removed."""
    model, small = minimized(Unflattened(), torch.randn(3, 4), method)
    assert count_params(small) == count_params(model) - 3 * 5 - 2


class SignNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)
        dead_rows(self.a, [0, 1, 2], 0.5)

    def forward(self, x):
        return self.b(torch.sign(self.a(x)))


@pytest.mark.parametrize("method", METHODS)
def test_an_op_that_maps_nan_to_a_number_gives_no_fact(method):
    """``sign(NaN) == 0``: evaluating facts on NaN called every unknown channel a known 0, so minimize deleted
    them and its self-check refused its own result."""
    model, small = minimized(SignNet(), torch.randn(3, 4), method)
    assert count_params(small) == count_params(model) - 3 * 4 - 3 - 3 * 2  # the three dead rows are still removed


def _elementwise_callables() -> list:
    out = []
    for key in RULES.keys():
        rule = RULES._rules[key]
        if isinstance(rule, Elementwise) and callable(key) and not isinstance(key, type):
            out.append(key)
    return out


ELEMENTWISE = _elementwise_callables()


class Apply(nn.Module):
    def __init__(self, fn, arity: int) -> None:
        super().__init__()
        self.fn, self.arity = fn, arity
        self.a, self.b = nn.Linear(4, 6), nn.Linear(4, 6)

    def forward(self, x):
        h, g = self.a(x), self.b(x)
        return self.fn(h) if self.arity == 1 else self.fn(h, g)


def _arity(fn) -> int | None:
    """1 or 2 where ``fn`` deterministically maps float tensors to one of the same shape, else None (where,
    comparisons...)."""
    x = torch.randn(2, 6, dtype=torch.float64)
    for arity in (1, 2):
        try:
            with torch.no_grad():
                y = fn(x) if arity == 1 else fn(x, x)
        except Exception:
            continue
        again = fn(x) if arity == 1 else fn(x, x)
        if isinstance(y, torch.Tensor) and y.shape == x.shape and torch.equal(y.isnan(), again.isnan()) and torch.equal(
                y.nan_to_num(), again.nan_to_num()):
            return arity  # deterministic (dropout in training mode is not)
    return None


@pytest.mark.parametrize("fn", [f for f in ELEMENTWISE if _arity(f) is not None], ids=str)
@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_nan_evaluated_facts_hold_on_random_inputs(fn, data):
    """Property over every unary or binary float op with an elementwise rule (facts evaluated on NaN): a channel
    the analysis calls constant is that constant on random inputs, whatever the known channels are (an op that
    maps NaN to a number, like ``sign``, would otherwise turn unknown channels into constants)."""
    arity = _arity(fn)
    model = Apply(fn, arity).double().eval()
    for lin in (model.a, model.b):
        rows = data.draw(st.lists(st.integers(0, 5), min_size=1, max_size=4, unique=True), label="dead rows")
        values = data.draw(st.lists(st.sampled_from([0.0, 0.5, -2.0, 1.0]), min_size=len(rows), max_size=len(rows)))
        with torch.no_grad():
            lin.weight[rows] = 0
            lin.bias[rows] = torch.tensor(values, dtype=torch.float64)
    x = torch.randn(3, 4, dtype=torch.float64)
    gm = fp.capture(model, (x,), method="symbolic")
    an = Analysis(lower_modules(gm))
    out = next(n for n in an.gm.graph.nodes if n.op == "output").args[0]
    f = an.facts.dim(out, -1)
    for _ in range(4):
        with torch.no_grad():
            y = model(torch.randn(3, 4, dtype=torch.float64) * 3)
        for k in f.known.nonzero().flatten().tolist():
            assert torch.equal(y[:, k], torch.full_like(y[:, k], f.value[k].item())), (fn, k)


def test_nan_eval_confirms_constants_on_random_values():
    """The fix itself: ``nan_eval`` of ``sign`` over a half-known input keeps only the known channels."""
    model = SignNet().double().eval()
    gm = fp.capture(model, (torch.randn(3, 4, dtype=torch.float64),), method="symbolic")
    an = Analysis(lower_modules(gm))
    sign = next(n for n in an.gm.graph.nodes if n.target is torch.sign)
    assert an.facts.dim(sign, 1).known.tolist() == [True] * 3 + [False] * 5
    assert nan_eval is not None


class ComputedBias(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)
        dead_rows(self.a, [0, 1], 0.5)  # constant, would have to be folded into b's bias
        dead_rows(self.a, [2], 0.0)  # zero: removable without a fold

    def forward(self, x):
        return F.linear(torch.relu(self.a(x)), self.b.weight, self.b.bias * 2)


@pytest.mark.parametrize("method", METHODS)
def test_constant_for_a_computed_bias_is_kept_not_raised(method):
    """Folding into a computed bias raised EquivalenceError at rewrite time; the analysis now keeps those
    channels and still removes the zero one."""
    model, small = minimized(ComputedBias(), torch.randn(3, 4), method)
    assert count_params(small) == count_params(model) - 4 - 1 - 2


class InfBuffers(nn.Module):
    """Clamp bounds initialised to -inf/+inf and a mask fill value: legitimate infinities."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)
        self.register_buffer("lo", torch.tensor(-float("inf")))
        self.register_buffer("hi", torch.full((8,), float("inf")))
        self.register_buffer("fill", torch.tensor([0.0, 0, 0, -float("inf"), 0, 0, 0, 0]))
        dead_rows(self.a, [0, 1, 2], 0.5)

    def forward(self, x):
        h = torch.clamp(torch.relu(self.a(x)), self.lo, self.hi)
        return self.b(h) + torch.softmax(h + self.fill, dim=-1).sum(-1, keepdim=True)


@pytest.mark.parametrize("method", METHODS)
def test_infinite_buffers_are_constants_not_refused(method):
    model, small = minimized(InfBuffers(), torch.randn(3, 4), method)
    assert count_params(small) <= count_params(model)


def test_infinite_buffer_feeding_a_fold_is_not_folded():
    """An infinite constant channel is never folded into a bias (inf * 0 would be NaN): it stays."""

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(3, 2)
            self.register_buffer("c", torch.tensor([0.0, -float("inf"), 0.0]))

        def forward(self, x):
            return torch.exp(self.b(torch.exp(self.a(x) + self.c)))

    model, small = minimized(M(), torch.randn(3, 4), "symbolic")
    assert count_params(small) == count_params(model)  # exp(-inf) = 0 is not known: nothing claimed


def test_nan_parameters_and_buffers_are_refused():
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)).eval()
    with torch.no_grad():
        net[1].running_mean[0] = float("nan")
    gm = fp.capture(net, (torch.randn(3, 4),))
    with pytest.raises(fp.UnsupportedError, match="buffer '1.running_mean' holds NaN"):
        fp.minimize(gm)


def test_self_check_tolerance_follows_the_graphs_precision(monkeypatch):
    """The self-check allowed 1e-4 relative error on float64 models: an error of 1e-7 now fails it."""
    import fxprune.passes.minimize as mz

    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).double().eval()
    dead_rows(net[0], [0, 1], -1.0)
    x = torch.randn(3, 4, dtype=torch.float64)
    gm = fp.capture(net, (x,))
    run = mz.Rewriter.run

    def slightly_off(self):  # a new tensor: unchanged ones are shared with the input until minimize returns
        out = run(self)
        b = out.get_parameter("2.bias")
        out.get_submodule("2").bias = nn.Parameter(b.detach() + 1e-7 * float(net(x).abs().max()))
        return out

    monkeypatch.setattr(mz.Rewriter, "run", slightly_off)
    with pytest.raises(fp.EquivalenceError, match=r"allowed 1e-09, the tolerance of torch.float64"):
        fp.minimize(gm)
    # the same error in float32 is within float32's tolerance
    net32 = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    dead_rows(net32[0], [0, 1], -1.0)
    fp.minimize(fp.capture(net32, (x.float(),)))


def test_precision_of_a_graph_that_casts_inside():
    """transformers' RMSNorm computes in float32 inside a float64 model: float32's tolerance applies."""

    class Casts(nn.Module):
        def forward(self, x):
            return (x.to(torch.float32) * 2).to(x.dtype)

    gm = fp.capture(Casts(), (torch.randn(2, 3, dtype=torch.float64),))
    assert precision_of(gm) == torch.float32
    assert precision_of(fp.capture(nn.Linear(3, 2).double(), (torch.randn(2, 3, dtype=torch.float64),))) == torch.float64
    assert rtol_for(torch.float64) == 1e-9 and rtol_for(torch.float32) == 1e-4


def test_precision_of_a_graph_that_computes_indices_in_float32():
    """A float32 computation whose result reaches the outputs only as integers (T5's and MPNet's relative position
    buckets: a float32 log turned into indices of a float64 table) leaves float64's tolerance: before, the graph
    counted as float32 and a float64 MPNet copy 1.6e-5 off passed the self-check."""

    class Buckets(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Embedding(8, 3).double()

        def forward(self, x):
            pos = torch.arange(x.shape[1])
            bucket = (torch.log(pos.float() + 1) * 2).to(torch.long).clamp(max=7)  # float32, then indices
            return x + self.table(bucket)

    x = torch.randn(2, 5, 3, dtype=torch.float64)
    gm = fp.capture(Buckets(), (x,))
    assert any(v.dtype == torch.float32 for n in gm.graph.nodes for v in [n.meta.get("val")]
               if isinstance(v, torch.Tensor))  # (the graph does compute in float32)
    assert precision_of(gm) == torch.float64


def test_one_comparator():
    a = torch.tensor([1.0, float("inf"), -float("inf"), 2.0], dtype=torch.float64)
    assert compare(a, a.clone())[0].max_rel == 0.0  # equal infinities are equal
    b = a.clone()
    b[3] = 2.0 + 2e-9
    assert compare(a, b)[0].max_rel == pytest.approx(1e-9, rel=1e-3)
    nan = a.clone()
    nan[0] = float("nan")
    assert not compare(a, nan)[0].ok(1e-9)  # NaN where the reference has a number: never equal
    assert compare((a,), (a, a))[0].problem is not None
    assert compare(torch.ones(2, 3), torch.ones(3, 2))[0].problem.startswith("shape")
    assert not compare(torch.tensor([1, 2]), torch.tensor([1, 3]))[0].ok(1.0)


class SoftmaxWithDtype(nn.Module):
    """A softmax computing in float64 inside a float32 model (``dtype=``), read by a float64 layer."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form, self.a, self.b = form, nn.Linear(4, 6), nn.Linear(6, 3).double()
        dead_rows(self.a, [2, 3], 0.5)  # constant logits
        with torch.no_grad():
            self.b.weight[:, [2, 3]] = 0  # their probabilities unread

    def forward(self, x):
        h = self.a(x)
        h = F.softmax(h, -1, dtype=torch.float64) if self.form == "F" else torch.softmax(h, -1, dtype=torch.float64)
        return self.b(h)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("form", ["F", "torch"])
def test_the_compensated_softmax_keeps_the_dtype_it_computes_in(method, form):
    """The rewrite to compensated_softmax dropped ``dtype=``: the float64 layer after it then read float32."""
    torch.manual_seed(0)
    model, x = SoftmaxWithDtype(form), torch.randn(5, 4)
    small = fp.minimize(fp.capture(model, (x,), method=method), (x,))
    assert count_params(small) == count_params(model) - 2 * 4 - 2 - 2 * 3
    with torch.no_grad():
        got, want = small(x), model(x)
    got = got[0] if isinstance(got, (tuple, list)) else got
    assert got.dtype == torch.float64 and torch.allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", METHODS)
def test_a_lowered_embedding_keeps_its_padding_row_out_of_training(method):
    """Lowering dropped Embedding's padding_idx: the forward was the same, but training moved the padding row."""

    class Emb(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.head = nn.Embedding(10, 6, padding_idx=0), nn.Linear(6, 2)

        def forward(self, ids):
            return self.head(self.emb(ids))

    torch.manual_seed(0)
    model, ids = Emb(), torch.tensor([[0, 3, 4], [5, 0, 1]])
    low = lower_modules(fp.capture(model, (ids,), method=method))
    low(ids).sum().backward()
    grads = {n: p.grad for n, p in low.named_parameters() if p.grad is not None and p.dim() == 2 and p.shape[0] == 10}
    assert len(grads) == 1
    grad = next(iter(grads.values()))
    assert torch.equal(grad[0], torch.zeros(6)) and bool(grad[3].abs().sum() > 0)


def test_a_write_through_data_is_seen_by_the_next_pass():
    """Kept weight scans were keyed on the version counter, which ``weight.data[...] = ...`` does not move: the
    next analysis saw the old zeros and planned to remove units that now live (minimize refused its result)."""
    torch.manual_seed(0)
    net, x = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)), torch.randn(3, 4)
    dead_rows(net[0], [0, 1], -1.0)
    gm = fp.capture(net, (x,))
    assert count_params(fp.minimize(gm, (x,))) == count_params(net) - 2 * (4 + 1 + 2)
    net[0].weight.data[:2] = 1.0  # the units live again, through .data
    net[0].bias.data[:2] = 0.5
    gm = fp.capture(net, (x,))
    assert count_params(fp.minimize(gm, (x,))) == count_params(net)


def test_the_float64_copy_of_a_module_follows_writes_to_its_tensors():
    """The float64 copy an op's facts are evaluated with (``rule._callable``) is kept per module: a write through
    ``.data`` (no version counter moves) is seen once a new pass starts (``scan.fresh``), an in-place write at once."""
    from fxprune.analysis import rule
    from fxprune.graph import scan

    net = nn.Sequential(nn.PReLU(init=0.25))
    gm = torch.fx.symbolic_trace(net)
    op = rule.Op(next(n for n in gm.graph.nodes if n.op == "call_module"), gm)
    x = -torch.ones(2, dtype=torch.float64)
    assert torch.equal(rule._callable(op)(x), x * 0.25)
    net[0].weight.data.fill_(0.5)  # no version counter moves
    scan.fresh()
    assert torch.equal(rule._callable(op)(x), x * 0.5)
    with torch.no_grad():
        net[0].weight.fill_(0.75)  # moves the version counter: seen within the generation
    assert torch.equal(rule._callable(op)(x), x * 0.75)


@pytest.mark.parametrize("conv", ["conv", "conv_transpose"])
def test_a_conv_weight_buffer_with_an_infinity_keeps_its_input_channels(conv):
    """A conv whose weight is a buffer holding an infinity (fxprune reads no finite value from it): its input
    channels stay, even zero ones (0 * inf is NaN), where the rule used to fail with AttributeError."""

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            w = torch.randn(2, 4, 1, 1) if conv == "conv" else torch.randn(4, 2, 1, 1)  # (out, in) / (in, out)
            w[0, 0] = float("inf")
            self.register_buffer("w", w)
            with torch.no_grad():
                self.a.weight[1:3] = 0
                self.a.bias[1:3] = 0

        def forward(self, x):
            h = torch.relu(self.a(x))
            return F.conv2d(h, self.w) if conv == "conv" else F.conv_transpose2d(h, self.w)

    model = M().double().eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    small = fp.minimize(fp.capture(model, (x,), method="symbolic"))
    assert count_params(small) == count_params(model)
    xb = torch.randn(3, 3, 5, 5, dtype=torch.float64)
    assert torch.allclose(small(xb), model(xb), equal_nan=True)
