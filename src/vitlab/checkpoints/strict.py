"""Strict loading of converted weights into a model, with a readable diff of what does not fit.

Every format module converts a foreign checkpoint into vitlab's own state-dict keys; this module is the one place
that puts those tensors into a model, so missing, unexpected and mis-shaped keys are reported the same way for all
formats. The intended exceptions (a new head, a resized position embedding) are handled by the caller before this.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file and the problem."""


def state_dict_diff(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> list[str]:
    """Lines describing missing, unexpected and mis-shaped keys of ``given`` against ``expected`` (empty if equal)."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in given and tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    lines = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            lines.append(f"{title} ({len(items)}):")
            lines += [f"  {item}" for item in items[:40]]
            if len(items) > 40:
                lines.append(f"  ... and {len(items) - 40} more")
    return lines


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                           source: str | os.PathLike = "<state dict>") -> nn.Module:
    """Load ``state_dict`` into ``model`` only if keys and shapes match exactly; otherwise raise one
    :class:`CheckpointError` listing every difference by name. Tensors are assigned, not copied, so loading holds
    no second copy of the weights; their dtype is kept as stored."""
    diff = state_dict_diff(model.state_dict(), state_dict)
    if diff:
        raise CheckpointError(f"{source}: checkpoint does not fit the model\n" + "\n".join(diff))
    model.load_state_dict(dict(state_dict), strict=True, assign=True)
    return model
