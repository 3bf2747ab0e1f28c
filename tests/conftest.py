import warnings

import pytest
import torch

warnings.filterwarnings("ignore")


def snapshot(m: torch.nn.Module) -> dict[str, bytes]:
    """Bytes of every parameter and buffer (to prove a pass left its input alone)."""
    return {k: v.detach().cpu().contiguous().numpy().tobytes() for k, v in m.state_dict().items()}


def n_params(m: torch.nn.Module) -> int:
    from fxprune.verify import count_params

    return count_params(m)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
