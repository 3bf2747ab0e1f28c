"""Differential tests: random models and masks, minimized, checked against themselves.

For every generated case, at both graph levels: ``minimize`` is exact in float64 (relative error <= 1e-9), removes
at least a planted tail's dead units (every case ends in ``Linear -> ReLU -> Linear`` with three hidden units that
write constants: zero, a positive one to fold, a negative one ReLU zeroes), is idempotent (a second run removes
nothing and changes nothing) and leaves its input byte-equal.
CI runs 300 symbolic cases and 50 torch.export cases; ``FXPRUNE_FUZZ_EXAMPLES=N`` runs N (and N // 6).
Cases are derandomized: the same N cases every run, so a failure reproduces. Every failure found is kept in
``REGRESSIONS`` below, as the printed case, and runs on every test run.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from torch import nn

import fxprune as fp
from conftest import snapshot
from fxprune.verify import count_params
from strategies import Case, build, cases

N = int(os.environ.get("FXPRUNE_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=N, deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


TAIL_OUT, TAIL_HIDDEN, TAIL_DEAD = 3, 6, {0: 0.0, 1: 0.5, 2: -1.0}


def with_planted_tail(model: nn.Module) -> tuple[nn.Module, int]:
    """``model`` followed by Linear -> ReLU -> Linear whose hidden units 0-2 write constants (zero weight rows,
    biases 0, 0.5 and -1): removing them is always exact. Returns the model and the parameters they hold."""
    d = model[-1].out_features
    first, second = nn.Linear(d, TAIL_HIDDEN).double(), nn.Linear(TAIL_HIDDEN, TAIL_OUT).double()
    with torch.no_grad():
        for k, b in TAIL_DEAD.items():
            first.weight[k] = 0
            first.bias[k] = b
    return nn.Sequential(model, first, nn.ReLU(), second).eval(), len(TAIL_DEAD) * (d + 1 + TAIL_OUT)


def check_case(case: Case, method: str = "symbolic") -> None:
    model, x = build(case)
    model, planted = with_planted_tail(model)
    gm = fp.capture(model, (x,), method=method)
    before = snapshot(gm)
    small = fp.minimize(gm)
    assert snapshot(gm) == before, "minimize changed its input"
    assert count_params(small) <= count_params(gm) - planted, "the planted dead units were not all removed"
    rep = fp.verify(gm, small, (x,))
    assert rep.max_rel["float64"] <= 1e-9, f"not exact:\n{rep}"
    with torch.no_grad():
        ref = model(x)
        assert (small(x) - ref).abs().max() <= 1e-9 * ref.abs().max().clamp_min(1.0)
    again = fp.minimize(small)
    assert count_params(again) == count_params(small), "a second minimize removed more: not a fixed point"
    assert snapshot(again) == snapshot(small), "a second minimize changed the weights"


# Failures found, as cases (name: what was wrong). Found outside the fuzzer and reduced to cases here too:
REGRESSIONS = {
    # Tensor.movedim had no channel rule: ConvNeXt's channels-last LayerNorm froze its whole stream (no error,
    # nothing removed); symbolic level only, export lowers it to aten.permute / aten.moveaxis.
    "movedim_channels_last_stream": Case(layers=[("conv", 4, 1, False), ("cnlast", 5), ("gap",)], seed=0,
                                         conv=(2, 4), masks=[("rows", 0.5), ("cols", 0.5), ("rows", 0.25)]),
    # BatchNorm with a zero scale after a depthwise conv, then pooling and flatten: a constant channel through
    # max pooling.
    "bn_zero_scale_then_maxpool": Case(layers=[("conv", 3, 3, True), ("bn2d",), ("pool", "max"), ("flatten",)],
                                       seed=11, conv=(3, 4), masks=[("none",), ("bnzero", 1.0), ("unstructured", 0.6)]),
}


@pytest.mark.parametrize("name", sorted(REGRESSIONS))
@pytest.mark.parametrize("method", ["symbolic", "export"])
def test_regressions(name: str, method: str) -> None:
    check_case(REGRESSIONS[name], method)


def test_movedim_regression_removes_channels() -> None:
    model, x = build(REGRESSIONS["movedim_channels_last_stream"])
    small = fp.minimize(fp.capture(model, (x,), method="symbolic"))
    assert small.get_parameter("0.weight").shape[0] < model[0].weight.shape[0]  # a stream channel went


@FUZZ
@given(case=cases())
def test_minimize_random_models_symbolic(case: Case) -> None:
    check_case(case, "symbolic")


@settings(FUZZ, max_examples=max(N // 6, 10))
@given(case=cases())
def test_minimize_random_models_export(case: Case) -> None:
    check_case(case, "export")


def test_strategies_cover_every_layer_and_mask_kind() -> None:
    """The generator reaches every layer kind and mask kind (so the 300 cases exercise all of them)."""
    seen_layers, seen_masks = set(), set()
    for case in _sample(400):
        seen_layers |= {spec[0] for spec in case.layers}
        seen_masks |= {m[0] for m in case.masks}
    assert seen_layers >= {"linear", "act", "bn", "res", "cat", "gate", "stream", "shared", "inplace", "conv", "bn2d",
                           "rescv", "catcv", "cnlast", "pool", "flatten", "gap", "gn"}
    norms = {spec[1] for case in _sample(400) for spec in case.layers if spec[0] == "stream"}
    assert norms == {"layernorm", "layernorm_noaffine", "layernorm_nobias", "rmsnorm"}
    assert {spec[1] for case in _sample(400) for spec in case.layers if spec[0] == "gn"} == {0, 1, 2}
    assert seen_masks >= {"none", "unstructured", "rows", "cols", "rows+cols", "bnzero"}


def _sample(n: int) -> list[Case]:
    out: list[Case] = []

    @settings(max_examples=n, derandomize=True, database=None, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(case=cases())
    def collect(case: Case) -> None:
        out.append(case)

    collect()
    return out


@pytest.mark.parametrize("seed", range(3))
def test_build_is_deterministic(seed: int) -> None:
    case = _sample(5)[seed]
    (a, xa), (b, xb) = build(case), build(case)
    assert snapshot(a) == snapshot(b) and torch.equal(xa, xb)
