"""A pytree type of "another package" for the CLI tests: a program whose output is a Box needs --import."""
from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree


@dataclass
class Box:
    value: torch.Tensor


pytree.register_dataclass(Box, serialized_type_name="pytree_box.Box")


class Boxed(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> Box:
        return Box(self.b(torch.relu(self.a(x))))
