"""The channel-rule table: op target -> :class:`Rule`.

Keys are module types (looked up along the MRO, unless a subclass overrides ``forward``), torch functions,
tensor method names (``"view"``), ATen overloads (``aten.relu.default``) or whole ATen packets
(``aten.relu``: every overload), or :class:`ByName` keys: the qualified name of a function from a library
fxprune does not import (``ByName("torchvision.ops.stochastic_depth.stochastic_depth")``), which a symbolic trace
keeps as one call. A target with no rule is *opaque*: the analysis freezes every channel space it touches.
Registering the same key twice is an error.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.fx import GraphModule, Node

__all__ = ["ByName", "RuleTable", "RULES", "target_name"]


@dataclass(frozen=True)
class ByName:
    """A rule key: a function's qualified name (``module.function``), for functions of libraries fxprune does not
    import; a call_function node whose target has that :func:`target_name` takes the rule."""

    name: str


class RuleTable:
    def __init__(self) -> None:
        self._rules: dict[Any, Any] = {}

    def register(self, rule: Any, *keys: Any) -> None:
        for key in keys:
            if key in self._rules:
                raise ValueError(f"duplicate channel rule for {target_name(key)}")
            self._rules[key] = rule

    def __contains__(self, key: Any) -> bool:
        return key in self._rules

    def keys(self) -> Iterable[Any]:
        return self._rules.keys()

    def lookup(self, node: Node, gm: GraphModule) -> Any | None:
        """The rule for ``node``, or None (opaque)."""
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            for cls in type(mod).__mro__:
                if cls in self._rules:
                    if cls is not type(mod) and type(mod).forward is not cls.forward:
                        return None  # a subclass with its own forward: never guess
                    return self._rules[cls]
            return None
        if node.op == "call_method":
            return self._rules.get(node.target)
        if node.op == "call_function":
            t = node.target
            if t in self._rules:
                return self._rules[t]
            packet = getattr(t, "overloadpacket", None)
            if packet is not None and packet in self._rules:
                return self._rules[packet]
            if callable(t):  # (an OpOverload's name: a custom op of a library, ``lib.op.overload``)
                return self._rules.get(ByName(target_name(t)))
        return None


def target_name(t: Any) -> str:
    if isinstance(t, ByName):
        return t.name
    if isinstance(t, str):
        return f"Tensor.{t}"
    if isinstance(t, type):
        return t.__qualname__
    if isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(t)
    mod = getattr(t, "__module__", None) or ""
    return f"{mod}.{getattr(t, '__name__', repr(t))}".lstrip(".")


RULES = RuleTable()
