from pathlib import Path

import pytest
import torch
from torch import nn

from fxprune.analysis.table import RULES, RuleTable
from fxprune.analysis.rules import register

DATA = Path(__file__).parent / "data" / "aten_ops.txt"

# Ops of the reference transformers graphs that deliberately have no rule: they compute positions, masks and
# rotary tables from integer tensors, never channels. Being opaque, they freeze what they touch.
OPAQUE_BY_DESIGN = {"aten.cumsum.default", "aten.diff.default", "aten.gather.default", "aten.index.Tensor",
                    "wrap_with_set_grad_enabled"}


def _has_rule(name: str) -> bool:
    if name == "<built-in function getitem>":
        import operator

        return operator.getitem in RULES
    _, op, overload = name.rsplit(".", 2) if name.count(".") >= 2 else ("", name, "")
    if not name.startswith("aten."):
        return False
    ov = getattr(getattr(torch.ops.aten, op), overload)
    return ov in RULES or ov.overloadpacket in RULES


def test_every_listed_aten_op_has_a_rule_or_is_opaque_by_design():
    ops = DATA.read_text().splitlines()
    missing = [o for o in ops if o not in OPAQUE_BY_DESIGN and not _has_rule(o)]
    assert not missing, f"no channel rule for {missing}"


@pytest.mark.slow
def test_op_list_covers_every_emitted_op():
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
    from list_aten_ops import export_ops

    # an op the reference models emit that is not in the list has never been reviewed for a channel rule; an op in
    # the list that a newer transformers no longer emits is harmless (transformers 5.24 dropped
    # wrap_with_set_grad_enabled), so only the first fails
    current = {op for c in export_ops().values() for op in c}
    unseen = sorted(current - set(DATA.read_text().splitlines()))
    assert not unseen, (f"the reference models now emit {unseen}, which tests/data/aten_ops.txt does not list: run "
                        "`make ops`, and give each a channel rule or register it as opaque")


def test_duplicate_registration_rejected():
    with pytest.raises(ValueError, match="duplicate"):
        register(object(), torch.ops.aten.relu)
    t = RuleTable()
    t.register("r", "view")
    with pytest.raises(ValueError):
        t.register("s", "view")


def test_module_lookup_follows_mro_but_not_overridden_forward():
    class MyReLU(nn.ReLU):
        pass

    class Weird(nn.ReLU):
        def forward(self, x):
            return x * 3

    root = nn.Module()
    root.a, root.b = MyReLU(), Weird()
    g = torch.fx.Graph()
    x = g.placeholder("x")
    na, nb = g.call_module("a", (x,)), g.call_module("b", (x,))
    gm = torch.fx.GraphModule(root, g)
    assert RULES.lookup(na, gm) is not None
    assert RULES.lookup(nb, gm) is None
