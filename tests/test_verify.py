import torch

import fxprune as fp
from fxprune.zoo import build


def test_identical_models_are_exact_and_report_prints():
    m, x = build("cnn")
    m = m.double()
    x = (x[0].double(),)
    rep = fp.verify(m, m, x)
    assert rep.ok and rep.max_rel["float64"] == 0.0
    assert rep.params[0] == rep.params[1] > 0 and rep.flops[0] > 0
    text = str(rep)
    assert "EXACT" in text and "params" in text and "FLOPs" in text


def test_a_real_difference_is_caught():
    m, x = build("residual_mlp")
    gm = fp.capture(m, x)
    other = fp.capture(build("residual_mlp")[0], x)
    with torch.no_grad():
        other.get_parameter("out.bias").add_(1e-5)
    rep = fp.verify(gm, other, x)
    assert not rep.ok and rep.max_rel["float64"] > 1e-7
    assert "NOT EQUIVALENT" in str(rep)


def test_minimized_model_report_counts_smaller():
    m, x = build("residual_mlp")
    gm = fp.capture(m, x)
    masked = fp.mask(gm, 0.95)
    small = fp.minimize(masked)
    rep = fp.verify(masked, small)
    assert rep.ok and rep.params[1] < rep.params[0] and rep.flops[1] <= rep.flops[0]
