import os
import sys
import types
import warnings

import pytest
import torch

warnings.filterwarnings("ignore")

# torchvision's PyPI wheel is a CUDA build whose C++ ops cannot load with the local CPU torch: its import fails while
# registering meta kernels for them. Models work with that module replaced by an empty one, which must happen before
# anything (transformers included) imports torchvision. `make install` puts torchvision in .venv/torchvision, outside
# site-packages; tests that need it call `torchvision()`.
sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
TORCHVISION_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, ".venv", "torchvision")


def torchvision():
    """The torchvision module (skips the test when it is not installed)."""
    if os.path.isdir(TORCHVISION_DIR) and os.path.abspath(TORCHVISION_DIR) not in sys.path:
        sys.path.append(os.path.abspath(TORCHVISION_DIR))
    return pytest.importorskip("torchvision", reason="torchvision is not installed (make install puts it in .venv/torchvision)")


def snapshot(m: torch.nn.Module) -> dict[str, bytes]:
    """Bytes of every parameter and buffer (to prove a pass left its input alone), of any dtype (bfloat16 too)."""
    return {k: v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            for k, v in m.state_dict().items()}


def graph_state(gm) -> tuple[str, dict[str, str]]:
    """The graph's code and every node's meta (values as their shapes and dtypes): what a pure pass leaves alone."""
    def show(v):
        return f"{tuple(v.shape)}:{v.dtype}" if isinstance(v, torch.Tensor) else repr(v)
    return gm.code, {n.name: repr({k: show(v) for k, v in sorted(n.meta.items())}) for n in gm.graph.nodes}


def exact_at(model, small, shapes, rtol: float = 1e-9) -> None:
    """``small`` computes ``model``'s function in float64 on a random input of each shape: relative error at most
    ``rtol`` (exact)."""
    for shape in shapes:
        x = torch.randn(*shape, dtype=torch.float64)
        with torch.no_grad():
            a, b = model(x), small(x)
        assert float((a - b).abs().max() / a.abs().max()) <= rtol, shape


def minimized_purely(model, inputs, **capture):
    """``fp.minimize`` of ``model`` captured at ``inputs`` (``capture``: ``fp.capture``'s options), asserting that
    neither the model (its tensors) nor the captured graph (its code and node meta) changed; returns the result."""
    import fxprune as fp

    before = snapshot(model)
    gm = fp.capture(model, inputs, **capture)
    state = graph_state(gm)
    small = fp.minimize(gm)
    assert snapshot(model) == before and graph_state(gm) == state
    return small


def n_params(m: torch.nn.Module) -> int:
    from fxprune.verify import count_params

    return count_params(m)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
