"""What ran: the aten/mkldnn ops a computation dispatched, and the autograd nodes behind a result. The speed-path
tests use them to show that a path was really taken (its fused op or C++ kernel in place of the plain op), not
only that its numbers agree with the plain path's."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class OpNames(TorchDispatchMode):
    """Records the name of every aten/mkldnn op that runs (e.g. ``"aten.gelu"``, ``"mkldnn._linear_pointwise"``)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def autograd_nodes(t: torch.Tensor) -> set[str]:
    """The class names of every node in ``t``'s autograd graph (e.g. ``"Fp32AttentionBackward"`` for vitlab's
    ``fast.Fp32Attention``, ``"GeluBackward0"`` for PyTorch's GELU)."""
    seen: set = set()
    names: set[str] = set()
    stack = [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(child for child, _ in node.next_functions)
    return names
