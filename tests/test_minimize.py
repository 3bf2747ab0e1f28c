import pytest
import torch
from torch import nn

import fxprune as fp
from fxprune.analysis import rules as R
from conftest import minimized_purely, n_params, snapshot
from fxprune.graph.rebuild import get_attr
from fxprune.zoo import build

ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU, "sigmoid": nn.Sigmoid, "leaky": nn.LeakyReLU}
WIDTHS = [12, 24, 20, 5]


def mlp(act: str) -> nn.Sequential:
    layers = []
    for i in range(len(WIDTHS) - 1):
        layers.append(nn.Linear(WIDTHS[i], WIDTHS[i + 1]))
        if i < len(WIDTHS) - 2:
            layers.append(ACTS[act]())
    return nn.Sequential(*layers).eval()


def oracle_params(model: nn.Sequential) -> int:
    """Hand-computed parameter count of the minimal MLP: drop hidden units whose row (over live inputs) is zero
    (constant output, folded downstream) or whose column (over live outputs) is zero, to a fixed point; then the
    input features no live unit reads."""
    lins = [m for m in model if isinstance(m, nn.Linear)]
    alive = [torch.ones(lin.out_features, dtype=torch.bool) for lin in lins[:-1]]
    changed = True
    while changed:
        changed = False
        for i, a in enumerate(alive):
            live_in = torch.ones(lins[i].in_features, dtype=torch.bool) if i == 0 else alive[i - 1]
            live_out = torch.ones(lins[i + 1].out_features, dtype=torch.bool) if i + 1 == len(alive) else alive[i + 1]
            dead_row = (lins[i].weight[:, live_in] == 0).all(dim=1)
            unread = (lins[i + 1].weight[live_out][:, :] == 0).all(dim=0)
            new = a & ~dead_row & ~unread
            if not new.any():
                new = a.clone() if a.any() else new
                new[:] = False
                new[0] = True
            if not torch.equal(new, a):
                alive[i], changed = new, True
    read = (lins[0].weight[alive[0]] != 0).any(dim=0)  # input features no live unit reads go (the graph selects)
    sizes = [max(1, int(read.sum()))] + [int(a.sum()) for a in alive] + [WIDTHS[-1]]
    return sum(sizes[i] * sizes[i + 1] + sizes[i + 1] for i in range(len(sizes) - 1))


def plant_mlp(model: nn.Sequential, units=((0, [1, 4, 7]), (2, [0, 3]))) -> int:
    """Zero rows and biases of hidden units; return how many parameters an exact minimizer removes."""
    sizes = list(WIDTHS)
    with torch.no_grad():
        for idx, units_ in units:
            model[idx].weight[units_] = 0
            model[idx].bias[units_] = 0.0
            sizes[idx // 2 + 1] -= len(units_)
    kept = sum(sizes[i] * sizes[i + 1] + sizes[i + 1] for i in range(len(sizes) - 1))
    return sum(p.numel() for p in model.parameters()) - kept


def exact(a, b, inputs) -> bool:
    rep = fp.verify(a, b, inputs)
    return rep.ok and rep.max_rel["float64"] <= 1e-9


def f64(model, inputs):
    """The float64 version of a model and its inputs: exactness (<= 1e-9) is a float64 statement."""
    return model.double(), tuple(x.double() if x.is_floating_point() else x for x in inputs)


@pytest.mark.parametrize("act", list(ACTS))
def test_planted_dead_neurons_are_removed_exactly(act):
    model, x = f64(mlp(act), (torch.randn(6, 12),))
    removed = plant_mlp(model)
    gm = fp.capture(model, x)
    small = fp.minimize(gm)
    assert n_params(small) == n_params(model) - removed
    assert exact(gm, small, x)


@pytest.mark.parametrize("sparsity", [0.5, 0.9])
@pytest.mark.parametrize("act", ["relu", "sigmoid", "gelu"])
def test_random_masks_match_the_oracle(act, sparsity):
    model, x = f64(mlp(act), (torch.randn(6, 12),))
    plant_mlp(model)
    masked = fp.mask(fp.capture(model, x), sparsity, criterion="random", seed=3)
    ref = mlp(act).double()
    ref.load_state_dict({k: v for k, v in masked.state_dict().items()})
    small = fp.minimize(masked)
    assert n_params(small) == oracle_params(ref)
    assert exact(masked, small, x)


def _plant_cnn(m) -> int:
    with torch.no_grad():
        m.c1.weight[:3] = 0
        m.c1.bias[:3] = 0  # dead, but BN makes them constant != 0 before a zero-padded 3x3 conv: NOT removable
        m.b2.weight[:2] = 0
        m.b2.bias[:2] = -1.0  # relu(-1) = 0
        m.fc.weight[:, :16] = 0  # cat channel 0 (from b1) unread
    return (16 + 1 + 16 * 10) + 2 * (16 * 9 + 1 + 16 * 10)


def _plant_gated(m) -> int:
    with torch.no_grad():
        m.up.weight[32 + 1] = 0
        m.up.bias[32 + 1] = 0  # value unit 1 = 0 -> product 0
        m.up.weight[32 + 5] = 0
        m.up.bias[32 + 5] = 0
        m.up.weight[7] = 0
        m.up.bias[7] = 0  # gate unit 7: silu(0) = 0
    return 3 * (2 * 17 + 16)


def _plant_residual(m) -> int:
    with torch.no_grad():
        for b in m.blocks:
            b[0].weight[[2, 9]] = 0
            b[0].bias[[2, 9]] = -0.5
    return len(m.blocks) * 2 * (24 + 1 + 24)


def check_planted(gm, x, removed, sparsity, **mask_kwargs):
    """Minimize (after a random mask when ``sparsity``): planted units are all gone, and the result is exact.
    Without a mask the count is exact; with one, further units may go too."""
    src = gm if sparsity is None else fp.mask(gm, sparsity, criterion="random", **mask_kwargs)
    small = fp.minimize(src)
    if sparsity is None:
        assert n_params(small) == n_params(gm) - removed
    else:
        assert n_params(small) <= n_params(gm) - removed
    assert exact(src, small, x)


PLANTERS = {"cnn": _plant_cnn, "gated_mlp": _plant_gated, "residual_mlp": _plant_residual}


@pytest.mark.parametrize("sparsity", [None, 0.5, 0.9])
@pytest.mark.parametrize("name", list(PLANTERS))
def test_planted_structure_in_model_kinds(name, sparsity):
    model, x = f64(*build(name))
    removed = PLANTERS[name](model)
    check_planted(fp.capture(model, x), x, removed, sparsity, seed=1)


def _hf_ffn(model, name):
    """(list of (up weights, out dim), down weight, in dim) per block for planting dead FFN units."""
    if name == "gpt2":
        return [([(b.mlp.c_fc.weight, 1), (b.mlp.c_fc.bias, 0)], (b.mlp.c_proj.weight, 0)) for b in model.transformer.h]
    if name == "vit":
        return [([(l.mlp.fc1.weight, 0), (l.mlp.fc1.bias, 0)], (l.mlp.fc2.weight, 1)) for l in model.layers]
    if name == "bert":
        enc = model.encoder.layer
        return [([(l.intermediate.dense.weight, 0), (l.intermediate.dense.bias, 0)], (l.output.dense.weight, 1)) for l in enc]
    if name == "llama":
        return [([(l.mlp.gate_proj.weight, 0)], (l.mlp.down_proj.weight, 1)) for l in model.model.layers]
    if name == "convnext":
        return [([(l.pwconv1.weight, 0), (l.pwconv1.bias, 0)], (l.pwconv2.weight, 1)) for s in model.encoder.stages for l in s.layers]
    raise KeyError(name)


def _removed_per_unit(model, name, ups, down):
    (w, d), (dw, dd) = ups[0], down
    per = w.shape[1 - d] + dw.shape[1 - dd] + (1 if len(ups) > 1 else 0)
    if name == "llama":
        layer = next(l for l in model.model.layers if l.mlp.gate_proj.weight is w)
        per += layer.mlp.up_proj.weight.shape[1]
    return per


@pytest.mark.parametrize("sparsity", [None, 0.9])
@pytest.mark.parametrize("name", ["gpt2", "bert", "vit", "llama", "convnext"])
def test_transformers_ffn_hidden_units(name, sparsity):
    model, x = f64(*build(name))
    removed = 0
    with torch.no_grad():
        for ups, down in _hf_ffn(model, name):
            units = [0, 5, 6]
            for t, d in ups:
                t.index_fill_(d, torch.tensor(units), 0.0)
            removed += len(units) * _removed_per_unit(model, name, ups, down)
    check_planted(fp.capture(model, x), x, removed, sparsity, seed=2,
                  include=["*mlp*", "*intermediate*", "*output.dense*", "*pwconv*", "*fc*"])


def test_idempotent_and_pure():
    model, x = build("cnn")
    _plant_cnn(model)
    before_model = snapshot(model)
    gm = fp.capture(model, x)
    before_gm = snapshot(gm)
    assert before_gm == before_model
    fp.analyze(gm)
    assert snapshot(gm) == before_gm
    masked = fp.mask(gm, 0.7)
    assert snapshot(gm) == before_gm
    before_masked = snapshot(masked)
    once = fp.minimize(masked)
    assert snapshot(masked) == before_masked and snapshot(model) == before_model
    twice = fp.minimize(once)
    assert {k: v.shape for k, v in once.state_dict().items()} == {k: v.shape for k, v in twice.state_dict().items()}
    assert snapshot(once) == snapshot(twice)
    with torch.no_grad():  # the result shares no storage with its input
        next(iter(once.parameters())).add_(1.0)
    assert snapshot(masked) == before_masked


def test_minimize_takes_the_users_module_with_its_inputs_as_the_compile_time_transform():
    """``fp.minimize(model, example_inputs)`` on the user's nn.Module captures it first (it raised AttributeError):
    the same graph as through fp.capture, the model untouched."""
    model, x = build("cnn")
    _plant_cnn(model)
    before = snapshot(model)
    small = fp.minimize(model, x)
    assert snapshot(model) == before
    assert snapshot(small) == snapshot(fp.minimize(fp.capture(model, x)))
    assert n_params(small) < n_params(model)
    x3 = torch.randn(3, *x[0].shape[1:])
    with torch.no_grad():
        assert torch.allclose(model(x3), small(x3), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["symbolic", "export"])
@pytest.mark.parametrize("dead", [True, False])
def test_the_result_shares_no_storage_with_the_input(method, dead):
    """Rewrite iterations share the tensors they do not change; every one of them is copied before minimize
    returns, so training the result never writes into the user's model (nothing removed: all are copied)."""
    model = mlp("relu")
    if dead:
        plant_mlp(model)
    before = snapshot(model)
    gm = fp.capture(model, (torch.randn(6, 12),), method=method)
    small = fp.minimize(gm)
    assert (n_params(small) < n_params(model)) == dead

    def storages(m):
        ts = list(m.parameters()) + list(m.buffers())
        ts += [get_attr(m, n.target) for n in m.graph.nodes if n.op == "get_attr"] if isinstance(m, torch.fx.GraphModule) else []
        return {t.untyped_storage().data_ptr() for t in ts if isinstance(t, torch.Tensor) and t.numel()}

    assert not storages(small) & (storages(model) | storages(gm))
    with torch.no_grad():
        for p in small.parameters():
            p.add_(1.0)
    assert snapshot(model) == before


def test_sabotaged_rule_cannot_escape(monkeypatch):
    model = mlp("sigmoid")  # dead units are the constant sigmoid(0) = 0.5: removal needs folding
    plant_mlp(model)
    gm = fp.capture(model, (torch.randn(6, 12),))
    monkeypatch.setattr(R.Linear, "rewrite", lambda self, op, rw: None)
    with pytest.raises(fp.EquivalenceError, match="nothing was returned"):
        fp.minimize(gm)


def test_nan_weights_are_refused():
    model = mlp("relu")
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    gm = fp.capture(model, (torch.randn(2, 12),))
    with pytest.raises(fp.UnsupportedError, match="NaN"):
        fp.minimize(gm)


class SharedLayer(nn.Module):
    """One Linear read at two call sites whose dead channel carries a different constant at each (relu(1), tanh(2))."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.shared = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.shared(torch.relu(self.a(x))) + self.shared(torch.tanh(self.b(x)))


def _shared_layer():
    torch.manual_seed(0)
    m = SharedLayer().double()
    with torch.no_grad():
        m.a.weight[2], m.a.bias[2] = 0.0, 1.0
        m.b.weight[2], m.b.bias[2] = 0.0, 2.0
    return m


@pytest.mark.parametrize("verify", [True, False])
def test_a_layer_read_at_two_sites_folds_each_sites_constants_into_its_own_bias(verify):
    m = _shared_layer()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(5, 4, dtype=torch.float64)
    out = fp.minimize(torch.fx.symbolic_trace(m), (x,), verify=verify)
    for xs in (x, torch.randn(9, 4, dtype=torch.float64)):
        torch.testing.assert_close(out(xs), m(xs), rtol=1e-12, atol=1e-12)
    # channel 2 goes from a, b and the shared columns (5 + 5 + 3); the shared bias (3) becomes one per site (2 x 3)
    assert n_params(out) == n_params(m) - 13 - 3 + 6
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_the_shared_layer_in_its_own_class_keeps_the_channels_with_a_reason():
    m = _shared_layer()
    x = torch.randn(5, 4, dtype=torch.float64)
    with pytest.warns(fp.interop.module.KeptChannelsWarning, match="several call sites"):
        out = fp.minimize_module(m, (x,))
    assert type(out) is SharedLayer
    torch.testing.assert_close(out(x), m(x), rtol=1e-12, atol=1e-12)


def test_subnormal_floats_are_counted_and_flushed_on_request():
    """A dead unit whose constant is subnormal (relu of a tiny positive bias) folds a subnormal into the next bias:
    minimize reports it; MinimizeOptions(flush_subnormals=True) zeroes it, and its check says how far that moved."""
    from fxprune.passes.minimize import SUBNORMALS_KEY, MinimizeOptions

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with torch.no_grad():
        net[0].weight[0] = 0
        net[0].bias[0] = 1e-39  # float32 subnormal: relu keeps it, the next layer folds w * 1e-39 into its bias
        net[2].weight[:, 0] = 1.0
        net[2].bias.zero_()
    x = torch.randn(3, 4)
    gm = fp.capture(net, (x,))
    before = {n: p.clone() for n, p in gm.named_parameters()}
    small = fp.minimize(gm)
    report = small.meta[SUBNORMALS_KEY]
    assert report["2.bias"]["count"] == 2 and not report["2.bias"]["flushed"]
    assert 0 < report["2.bias"]["max_abs"] < torch.finfo(torch.float32).tiny
    flushed = fp.minimize(gm, options=MinimizeOptions(flush_subnormals=True))
    assert flushed.meta[SUBNORMALS_KEY]["2.bias"]["flushed"] and bool((flushed.get_parameter("2.bias") == 0).all())
    assert all(torch.equal(p, before[n]) for n, p in gm.named_parameters())  # the input keeps its values
    assert torch.allclose(flushed(x), net(x), rtol=0, atol=1e-30)
    assert fp.minimize(fp.capture(net.double(), (x.double(),))).meta[SUBNORMALS_KEY] == {}  # normal in float64


def test_subnormals_are_read_only_in_the_tensors_minimize_writes():
    """A subnormal the user's model already holds in a tensor minimize leaves unchanged is not minimize's: neither
    reported nor flushed (the scan reads only the tensors the rewrite wrote)."""
    from fxprune.passes.minimize import SUBNORMALS_KEY, MinimizeOptions

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2), nn.ReLU(), nn.Linear(2, 3))
    with torch.no_grad():
        net[0].weight[0] = 0
        net[0].bias[0] = -1.0  # a dead unit: layers 0 and 2 are rewritten
        net[4].weight[0, 0] = 1e-39  # the last layer is not touched
    x = torch.randn(3, 4)
    small = fp.minimize(fp.capture(net, (x,)), options=MinimizeOptions(flush_subnormals=True))
    assert small.get_parameter("0.weight").shape == (5, 4) and small.meta[SUBNORMALS_KEY] == {}
    assert small.get_parameter("4.weight")[0, 0] == net[4].weight[0, 0] != 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_the_one_pass_subnormal_test_agrees_with_the_definition(dtype):
    """``_any_subnormal`` (one pass over the bits, before ``subnormals`` counts) says True exactly when a nonzero
    entry is smaller in magnitude than the smallest normal number: zeros, signs, the smallest normal itself, NaN
    and infinities around it, and non-contiguous tensors."""
    from fxprune.passes.minimize import _any_subnormal

    tiny = torch.finfo(dtype).tiny
    g = torch.Generator().manual_seed(0)
    for case in range(40):
        t = torch.randn(7, 9, generator=g, dtype=torch.float64).to(dtype)
        if case % 2:
            t[:, ::3] = 0
        if case % 5 == 1:
            t[2, 4] = -tiny  # normal: the boundary
        if case % 5 == 2:
            t[1, 1] = float("nan")
            t[3, 3] = float("-inf")
        if case % 4 == 3:
            t[int(case % 7), 5] = torch.tensor(tiny, dtype=torch.float64).div(2 ** (case % 6 + 1)).to(dtype) * (-1) ** case
        t = t.t() if case % 3 == 0 else t
        want = bool(((t != 0) & (t.abs() < tiny)).any())
        assert _any_subnormal(t) == want, case
    assert not _any_subnormal(torch.zeros(0, dtype=dtype))
    from fxprune.graph.scan import BLOCK_BYTES

    big = torch.ones(3 * BLOCK_BYTES * 8 // torch.finfo(dtype).bits + 5, dtype=dtype)  # in blocks, the last short
    assert not _any_subnormal(big)
    big[-1] = torch.tensor(tiny, dtype=torch.float64).div(4).to(dtype)
    assert _any_subnormal(big)


class _Heads(nn.Module):
    """Attention with 3 heads of 4, q/k/v apart, reshaped by sizes read off the input."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = nn.Linear(6, 12), nn.Linear(6, 12), nn.Linear(6, 12), nn.Linear(12, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, 3, 4).transpose(1, 2) for f in (self.q, self.k, self.v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(b, t, 12))


def test_equal_heads_keeps_one_head_width_for_q_k_and_v():
    """MinimizeOptions(equal_heads=...): q/k lose head_dim channel 1 of every head, v channels 2 and 3; with the
    option all three keep 3 per head (the widest), without it q/k keep 3 and v 2. Exact either way; the layout of
    each named dim is recorded; a key that is not 'name:dim' is refused."""
    from fxprune.passes.minimize import HEADS_KEY, MinimizeOptions
    torch.manual_seed(0)
    net = _Heads().double()
    with torch.no_grad():
        for h in range(3):
            net.q.weight[4 * h + 1] = 0
            net.q.bias[4 * h + 1] = 0
            net.v.weight[[4 * h + 2, 4 * h + 3]] = 0
            net.v.bias[[4 * h + 2, 4 * h + 3]] = 0
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    gm = fp.capture(net, (x,), method="export", dynamic_shapes="every")
    plain = fp.minimize(gm)
    assert plain.get_parameter("q.weight").shape[0] == 9 and plain.get_parameter("v.weight").shape[0] == 6
    opts = MinimizeOptions(equal_heads=((4, ("q.weight:0", "k.weight:0", "v.weight:0", "o.weight:0")),))
    before, meta = snapshot(gm), [(n.name, dict(n.meta)) for n in gm.graph.nodes]
    even = fp.minimize(gm, options=opts)
    assert snapshot(gm) == before and [(n.name, dict(n.meta)) for n in gm.graph.nodes] == meta  # the input is untouched
    assert [even.get_parameter(f"{n}.weight").shape[0] for n in "qkv"] == [9, 9, 9]
    assert even.meta[HEADS_KEY] == {"q.weight:0": [(3, 4)], "k.weight:0": [(3, 4)], "v.weight:0": [(3, 4)]}
    for xi in (x, torch.randn(4, 7, 6, dtype=torch.float64)):
        assert float((even(xi) - net(xi)).abs().max()) <= 1e-12
    with pytest.raises(fp.InputError, match="name:dim"):
        fp.minimize(gm, options=MinimizeOptions(equal_heads=((4, ("q.weight",)),)))


def test_equal_heads_holds_when_one_head_is_left():
    """Two of three heads dead whole: the round after they go reshapes into one head, which no product shows (its
    size-1 dim is skipped); the head-dim groups still keep one width (q/k lose channel 1, v channels 2-3: all keep
    3), where the later round used to narrow v alone."""
    from fxprune.passes.minimize import MinimizeOptions
    torch.manual_seed(0)
    net = _Heads().double()
    with torch.no_grad():
        for lin in (net.q, net.k, net.v):
            lin.weight[4:12] = 0
            lin.bias[4:12] = 0
        net.q.weight[1] = 0
        net.q.bias[1] = 0
        net.v.weight[[2, 3]] = 0
        net.v.bias[[2, 3]] = 0
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    gm = fp.capture(net, (x,), method="export", dynamic_shapes="every")
    even = fp.minimize(gm, options=MinimizeOptions(equal_heads=((4, ("q.weight:0", "k.weight:0", "v.weight:0")),)))
    assert [even.get_parameter(f"{n}.weight").shape[0] for n in "qkv"] == [3, 3, 3]
    for xi in (x, torch.randn(4, 7, 6, dtype=torch.float64)):
        assert float((even(xi) - net(xi)).abs().max()) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_slicing_a_large_weights_columns_takes_the_same_values_as_index_select(dtype):
    """The rewrite slices a large tensor's last dim with a broadcast ``gather`` (faster there): the same values,
    bit for bit, as ``index_select``, on contiguous and transposed tensors, and on small ones (index_select)."""
    from fxprune.graph.lazy import _take

    g = torch.Generator().manual_seed(0)
    for shape in [(1024, 1100), (3, 1 << 20), (7, 5), (4, 6, 3)]:
        x = torch.randn(shape, generator=g).to(dtype)
        for y in (x, x.transpose(0, -1)):
            for d in range(y.dim()):
                idx = torch.randperm(y.shape[d], generator=g)[: max(1, y.shape[d] * 2 // 3)].sort().values
                got, want = _take(y, d, idx), y.index_select(d, idx)
                assert got.shape == want.shape and torch.equal(got, want)


class _MaskedByTypeAs(nn.Module):
    """Hidden units weighted by a token mask cast with ``mask.type_as(h)`` (Funnel's encoder): the cast reads ``h``
    for its dtype only, and ``h`` has a dim more than the mask."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.b(h * mask.type_as(h)[..., None])


@pytest.mark.parametrize("method", ["symbolic", "export"])
def test_type_as_reads_its_other_operand_for_the_dtype_only(method):
    """The analysis aligned ``type_as``'s second operand with its output as if it broadcast, and raised a size
    mismatch (every transformers Funnel model)."""
    torch.manual_seed(0)
    net = _MaskedByTypeAs().double().eval()
    with torch.no_grad():
        net.a.weight[[1, 6]] = 0
        net.a.bias[[1, 6]] = -1.0
    x, mask = torch.randn(2, 5, 4, dtype=torch.float64), torch.ones(2, 5, dtype=torch.long)
    small = minimized_purely(net, (x, mask), method=method, dynamic_shapes="every")  # (its input left alone)
    assert n_params(small) == n_params(net) - 2 * (4 + 1 + 3)
    for xi, mi in ((x, mask), (torch.randn(3, 7, 4, dtype=torch.float64), torch.randint(0, 2, (3, 7)))):
        with torch.no_grad():
            assert float((small(xi, mi) - net(xi, mi)).abs().max()) <= 1e-12


class _SeparateProjections(nn.Module):
    """``F.multi_head_attention_forward`` with separate q/k/v weights and ``torch.empty([0])`` as the packed one
    (WavLM's attention): the exported graph holds an empty tensor that nothing reads."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.transpose(0, 1)
        out, _ = torch.nn.functional.multi_head_attention_forward(
            h, h, h, 8, 2, torch.empty([0]), torch.cat((self.q.bias, self.k.bias, self.v.bias)), None, None, False, 0.0,
            self.o.weight, self.o.bias, training=False, need_weights=False, use_separate_proj_weight=True,
            q_proj_weight=self.q.weight, k_proj_weight=self.k.weight, v_proj_weight=self.v.weight)
        return self.head(out.transpose(0, 1))


def test_an_empty_tensor_in_the_graph_is_no_group_to_remove_from():
    """A dim of size 0 was a free group of no channels, and the plan to keep one of its channels raised IndexError
    (every transformers WavLM)."""
    torch.manual_seed(0)
    net = _SeparateProjections().double().eval()
    with torch.no_grad():
        net.head.weight[:, :3] = 0  # the attention's output channels 0-2 are unread
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    small = minimized_purely(net, (x,), method="export", dynamic_shapes="every")  # (its input left alone)
    assert n_params(small) == n_params(net) - 3 * (8 + 1 + 2)
    for xi in (x, torch.randn(2, 7, 8, dtype=torch.float64)):
        with torch.no_grad():
            assert float((small(xi) - net(xi)).abs().max()) <= 1e-12


class _ShapedLikeHidden(nn.Module):
    """A tensor made in the shape of a hidden layer (``torch.zeros_like(h)``: MRA's attention without its CUDA
    kernel returns ``zeros_like(query)``), reshaped with sizes the code fixes (``use="reshape"``) or added to the
    layer (``"add"``)."""

    def __init__(self, like: str, use: str) -> None:
        super().__init__()
        self.fc1, self.fc2, self.like, self.use = nn.Linear(6, 16), nn.Linear(16, 3), like, use

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        made = {"zeros": torch.zeros_like, "ones": torch.ones_like, "full": lambda t: torch.full_like(t, 0.5)}[self.like](h)
        if self.use == "add":
            return self.fc2(torch.relu(h + made))
        return self.fc2(torch.relu(h)) + made.reshape(x.shape[0], 4, 4).sum(-1)[:, :3]


@pytest.mark.parametrize("like", ["zeros", "ones", "full"])
@pytest.mark.parametrize("method", ["symbolic", "export"])
@pytest.mark.parametrize("use", ["reshape", "add"])
def test_a_tensor_made_like_a_hidden_layer_keeps_the_layers_shape(like, method, use):
    """``zeros_like(h)`` (``ones_like``, ``full_like``) was read as taking only h's dtype: h lost its dead units, the
    new tensor shrank with it, and a reshape to the sizes the code fixes raised RuntimeError inside minimize
    (transformers' MRA). Its channels are now h's own: a unit goes from both (added to h), or from neither (the
    reshape keeps them)."""
    torch.manual_seed(0)
    net = _ShapedLikeHidden(like, use).double().eval()
    with torch.no_grad():
        net.fc1.weight[:4], net.fc1.bias[:4] = 0.0, -2.0  # 4 dead units (-2 + 1 is still under ReLU's 0)
    x = torch.randn(5, 6, dtype=torch.float64)
    small = minimized_purely(net, (x,), method=method)  # (its input left alone)
    assert n_params(small) == n_params(net) - (4 * (6 + 1 + 3) if use == "add" else 0)
    for xi in (x, torch.randn(2, 6, dtype=torch.float64)):
        with torch.no_grad():
            assert float((small(xi) - net(xi)).abs().max()) <= 1e-12


class _XIELU(nn.Module):
    """Apertus' xIELU activation as transformers writes it without its CUDA kernel: ``torch.min(x, eps)`` (the
    binary overload) and ``torch.expm1``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 3)
        self.register_buffer("eps", torch.tensor(-1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        act = torch.where(h > 0, 0.8 * h * h + 0.5 * h, (torch.expm1(torch.min(h, self.eps)) - h) * 0.8 + 0.5 * h)
        return self.fc2(act + torch.log1p(h * h))


@pytest.mark.parametrize("method", ["symbolic", "export"])
def test_expm1_log1p_and_the_elementwise_min_have_rules(method):
    """Without rules for ``expm1``, ``log1p`` and ``min.other``/``max.other`` (and, in a symbolic trace, the
    comparison operators) every channel they touch froze: Apertus' MLP lost nothing. They are elementwise; the
    reductions ``min.dim``/``max.dim`` are not among them."""
    torch.manual_seed(0)
    net = _XIELU().double().eval()
    with torch.no_grad():
        net.fc2.weight[:, :4] = 0.0  # 4 units nothing reads
    x = torch.randn(5, 6, dtype=torch.float64)
    small = minimized_purely(net, (x,), method=method)
    assert n_params(small) == n_params(net) - 4 * (6 + 1 + 3)
    for xi in (x, torch.randn(2, 6, dtype=torch.float64)):
        with torch.no_grad():
            assert float((small(xi) - net(xi)).abs().max()) <= 1e-12


class _CastsLikeItsHidden(nn.Module):
    """Reads ``h.dtype`` and ``h.device`` in a symbolic trace (``getattr`` nodes), as models that make a constant
    or cast a mask to their activations' dtype do."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        return self.fc2(h.to(dtype=h.dtype, device=h.device) * (h.ndim - 1))


def test_a_tensors_dtype_device_and_rank_read_in_a_symbolic_trace_leave_its_channels_free():
    """``h.dtype`` (a ``getattr`` node of a symbolic trace) related nothing, so every channel of ``h`` froze."""
    torch.manual_seed(0)
    net = _CastsLikeItsHidden().double().eval()
    with torch.no_grad():
        net.fc2.weight[:, :4] = 0.0  # 4 units nothing reads
    x = torch.randn(5, 6, dtype=torch.float64)
    small = minimized_purely(net, (x,), method="symbolic")
    assert n_params(small) == n_params(net) - 4 * (6 + 1 + 3)
    for xi in (x, torch.randn(2, 6, dtype=torch.float64)):
        with torch.no_grad():
            assert float((small(xi) - net(xi)).abs().max()) <= 1e-12


class _MaxOverItsLastDim(nn.Module):
    """``torch.max(h, h.ndim - 1)`` in a symbolic trace: a reduction whose dim is a node (an int), not a tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        return self.fc2(h) + torch.max(h, h.ndim - 1)[0][:, None]


def test_a_reduction_max_over_a_computed_dim_is_no_elementwise_max():
    """``torch.max`` is elementwise only where its second operand is a tensor: a reduction over every unit keeps
    them all, exactly."""
    torch.manual_seed(0)
    net = _MaxOverItsLastDim().double().eval()
    with torch.no_grad():
        net.fc2.weight[:, :4] = 0.0  # 4 units fc2 does not read (the max over every unit does)
    x = torch.randn(5, 6, dtype=torch.float64)
    small = minimized_purely(net, (x,), method="symbolic")
    assert n_params(small) == n_params(net)  # the max reads every unit
    for xi in (x, torch.randn(2, 6, dtype=torch.float64)):
        with torch.no_grad():
            assert float((small(xi) - net(xi)).abs().max()) <= 1e-12


class _InterleavedGLU(nn.Module):
    """GPT-OSS's MLP: one projection whose even outputs are the gates and odd ones the values (``h[..., ::2]``,
    ``h[..., 1::2]``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 32), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(torch.sigmoid(h[..., ::2]) * h[..., 1::2])


def test_an_interleaved_gate_and_value_lose_a_unit_together():
    """A slice with a step froze its dim: GPT-OSS's experts kept every unit. Unit j is rows 2j and 2j + 1 of the
    projection: both go, or neither. (Exported: a symbolic trace's tensor indexing, ``operator.getitem``, has no
    rule; it freezes.)"""
    method = "export"
    torch.manual_seed(0)
    net = _InterleavedGLU().double().eval()
    with torch.no_grad():
        net.fc2.weight[:, [1, 5, 6]] = 0.0  # 3 units nothing reads
        net.fc1.weight[8], net.fc1.bias[8] = 0.0, -50.0  # unit 4's gate closed (sigmoid(-50) is no 0: it stays)
    x = torch.randn(5, 6, dtype=torch.float64)
    small = minimized_purely(net, (x,), method=method)
    assert n_params(small) == n_params(net) - 3 * (2 * (6 + 1) + 3)
    for xi in (x, torch.randn(2, 6, dtype=torch.float64)):
        with torch.no_grad():
            assert float((small(xi) - net(xi)).abs().max()) <= 1e-12


class _WritesIntoAZerosLike(nn.Module):
    """A buffer made by ``zeros_like`` (or ``new_zeros`` with sizes) and written through a slice (RWKV's
    ``output[:, t] = ...``): an exported graph keeps the write (``copy_`` into a view) and later nodes read the
    buffer itself."""

    def __init__(self, made: str = "zeros_like") -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(8, 3), nn.Linear(6, 8)
        self.made = made

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        out = torch.zeros_like(h) if self.made == "zeros_like" else h.new_zeros(h.shape)
        out[:, :4] = 2 * h[:, :4]
        return self.fc2(self.fc3(x) * out.sum(1, keepdim=True).expand(-1, 8))


@pytest.mark.parametrize("made", ["zeros_like", "new_zeros"])
def test_a_tensor_made_like_another_and_then_written_is_no_constant(made):
    """``zeros_like``'s zeros are facts only while nothing writes into the tensor: after the write (``copy_`` into a
    slice of it), the sum over it was called a known 0, and so was the model's every output. Every fact the
    analysis states holds on random inputs, and minimize's result is exact."""
    from fxprune.analysis.groups import Analysis
    from fxprune.passes.lower import lower_modules

    torch.manual_seed(0)
    net = _WritesIntoAZerosLike(made).double().eval()
    with torch.no_grad():
        net.fc1.weight[7], net.fc1.bias[7] = 0.0, 1.0  # a known channel of h: zeros_like's facts are evaluated
    x = torch.randn(5, 6, dtype=torch.float64)
    an = Analysis(lower_modules(fp.capture(net, (x,), method="export")))
    values = {}

    class Record(torch.fx.Interpreter):
        def run_node(self, n):
            values[n.name] = out = super().run_node(n)
            return out

    Record(an.gm).run(torch.randn(5, 6, dtype=torch.float64))
    claimed = 0
    for n in an.gm.graph.nodes:
        v = values.get(n.name)
        if n.op != "call_function" or not isinstance(v, torch.Tensor) or not v.is_floating_point() or not v.dim():
            continue
        for d in range(v.dim()):
            f = an.facts.dim(n, d)
            for k in f.known.nonzero().flatten().tolist():
                claimed += 1
                assert torch.equal(v.select(d, k), torch.full_like(v.select(d, k), f.value[k].item())), (n.name, d, k)
    assert claimed > 0  # (fc1's constant channel, at least)
    small = minimized_purely(net, (x,), method="export")
    for xi in (x, torch.randn(2, 6, dtype=torch.float64)):
        with torch.no_grad():
            assert float((small(xi) - net(xi)).abs().max()) <= 1e-12


def _facts_hold_at_every_read(an, *inputs):
    """Run the analysed graph on ``inputs``, checking before each node runs that every fact the analysis states of
    each of its operands holds on the value the node reads (a value written into in place changes between its
    reads). Returns how many facts were checked."""
    checked = 0

    class Check(torch.fx.Interpreter):
        def run_node(self, n):
            nonlocal checked
            for a in n.all_input_nodes:
                v = self.env.get(a)
                if not isinstance(v, torch.Tensor) or not v.is_floating_point() or not v.dim():
                    continue
                for d in range(v.dim()):
                    f = an.facts.dim(a, d)
                    for k in f.known.nonzero().flatten().tolist():
                        checked += 1
                        s = v.select(d, k)
                        assert torch.equal(s, torch.full_like(s, f.value[k].item())), (n.name, a.name, d, k)
            return super().run_node(n)

    Check(an.gm).run(*inputs)
    return checked


_WRITES = {  # an op writing into a view of ``h`` (dead units 0 and 4-5 of fc1), ``h`` read after it
    "slice add_": lambda h: h[:, :2].add_(1.0),
    "narrow add_": lambda h: h.narrow(1, 0, 2).add_(1.0),
    "transposed slice add_": lambda h: h.t()[:2].add_(1.0),
    "unsqueezed slice add_": lambda h: h.unsqueeze(0)[:, :, :2].add_(1.0),
    "select add_": lambda h: h.select(1, 0).add_(1.0),
    "slice sub_ relu_": lambda h: h[:, :2].sub_(1.0).relu_(),
    "slice fill_": lambda h: h[:, :2].fill_(1.0),
    "view mul_": lambda h: h.view(-1).mul_(2.0),
    "setitem": lambda h: h.__setitem__((slice(None), slice(0, 2)), 3.0),
}


class _WritesIntoAView(nn.Module):
    def __init__(self, write: str) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)
        self.write = _WRITES[write]
        with torch.no_grad():
            for u in (0, 4, 5):
                self.fc1.weight[u], self.fc1.bias[u] = 0.0, 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        self.write(h)
        return self.fc2(h)


@pytest.mark.parametrize("write", list(_WRITES))
def test_a_value_written_through_a_view_has_no_stale_facts(write):
    """An exported graph keeps ``h[:, :2].add_(1)`` as ``add_`` into a slice of ``h`` and then reads ``h``: the
    facts of ``fc1``'s dead unit 0 (a known zero) no longer hold there, and removing it as dead made minimize's
    self-check fail (EquivalenceError). Every fact the analysis states holds at every read, and the result is exact
    at the example and another batch size."""
    from fxprune.analysis.groups import Analysis
    from fxprune.passes.lower import lower_modules

    net = _WritesIntoAView(write).double().eval()
    x = torch.randn(5, 4, dtype=torch.float64)
    gm = fp.capture(net, (x,), method="export")
    assert any(str(getattr(n.target, "overloadpacket", "")).endswith("_") for n in gm.graph.nodes)  # (the write)
    an = Analysis(lower_modules(gm))
    assert _facts_hold_at_every_read(an, torch.randn(5, 4, dtype=torch.float64)) > 0  # (new values, the example's shape)
    small = minimized_purely(net, (x,), method="export")
    for xi in (x, torch.randn(2, 4, dtype=torch.float64)):
        with torch.no_grad():
            assert float((small(xi) - net(xi)).abs().max()) <= 1e-12


def test_an_in_place_activation_keeps_the_facts_it_reads():
    """A write whose own result is the only later reader (``relu_``, which torch.export re-points readers at) leaves
    the written value's facts standing: fc1's dead units still go."""
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)).double().eval()
    with torch.no_grad():
        for u in (0, 4, 5):
            net[0].weight[u], net[0].bias[u] = 0.0, 0.0
    x = torch.randn(5, 4, dtype=torch.float64)
    for method in ("export", "symbolic"):
        small = minimized_purely(net, (x,), method=method)
        assert n_params(small) == n_params(net) - 3 * 4 - 3 - 3 * 3, method
        with torch.no_grad():
            assert float((small(x) - net(x)).abs().max()) <= 1e-12


class _WritesIntoItsBuffer(nn.Module):
    """A forward that adds into a slice of its own buffer before reading it: each call reads other values than the
    buffer held when the model was captured."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)
        self.register_buffer("shift", torch.zeros(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shift[:2].add_(1.0)
        return self.fc2(self.fc1(x) + self.shift)


def test_a_buffer_the_graph_writes_into_is_frozen_and_unknown():
    """The scan of ``shift`` (as capture left it) is no fact of the values read after the ``add_``: no fact of it is
    stated, and its channels (with fc1's units and fc2's inputs) are frozen, with the reason."""
    import copy

    from fxprune.analysis.groups import Analysis
    from fxprune.passes.lower import lower_modules

    net = _WritesIntoItsBuffer().double().eval()
    gm = fp.capture(net, (torch.randn(5, 4, dtype=torch.float64),), method="export")
    an = Analysis(lower_modules(copy.deepcopy(gm)))
    assert _facts_hold_at_every_read(an, torch.randn(5, 4, dtype=torch.float64)) > 0  # (the biases' entries, at least)
    g = fp.analyze(gm).group_of("fc1_weight", 0)
    assert g.frozen and any("'shift' is written into by the graph" in r for r in g.reasons), g.reasons
