"""The docstring examples of the public API run and print what they say."""
import doctest
import importlib

import pytest

MODULES = ["fxprune.interop.saving", "fxprune.graph.capture", "fxprune.passes.mask", "fxprune.passes.minimize", "fxprune.verify", "fxprune.nn.norm",
           "fxprune.passes.compensate_layernorm", "fxprune.passes.release", "fxprune.api", "fxprune.interop.module", "fxprune.interop.stream"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
