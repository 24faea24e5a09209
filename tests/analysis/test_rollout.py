"""Attention rollout (Fig. 6): identity attentions, a hand-computed two-layer case, and models whose forward uses
the fast SDPA path, against a NumPy rollout of independently computed attention."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.analysis.reference import attention_probs, random_model
from vitlab.analysis import attention_rollout, query_attention, rollout_maps, rollout_matrix


def test_identity_attention_keeps_class_row_on_itself() -> None:
    T = 1 + 6
    eye = torch.eye(T).expand(2, 4, T, T)
    joint = rollout_matrix([eye, eye, eye])
    torch.testing.assert_close(joint, torch.eye(T, dtype=torch.float64).expand(2, T, T))
    # class-token row one-hot on the class token: no patch receives any mass, so the map is all zeros (documented)
    maps = rollout_maps([eye, eye], (2, 3), num_prefix_tokens=1)
    assert maps.shape == (2, 2, 3) and torch.equal(maps, torch.zeros_like(maps))


def test_identity_attention_gap_is_uniform() -> None:
    eye = torch.eye(6).expand(1, 2, 6, 6)
    maps = rollout_maps([eye], (2, 3), num_prefix_tokens=0)
    torch.testing.assert_close(maps, torch.full((1, 2, 3), 1 / 6))


def test_two_layer_hand_computation() -> None:
    # Tokens: [cls, p0, p1] on a 1x2 grid, two heads.
    # Layer 1: head a = I, head b sends cls to p0  -> mean M1 = [[.5,.5,0],[0,1,0],[0,0,1]]
    #          A1 = (M1 + I) / 2 = [[.75,.25,0],[0,1,0],[0,0,1]]
    # Layer 2: both heads send cls to p1            -> A2 = [[.5,0,.5],[0,1,0],[0,0,1]]
    # R = A2 @ A1, row 0 = .5*[.75,.25,0] + .5*[0,0,1] = [.375, .125, .5]; patches [.125, .5] / .625 = [.2, .8]
    # (the wrong order A1 @ A2 would give [.4, .6]).
    eye = torch.eye(3)
    head_b = torch.tensor([[0.0, 1, 0], [0, 1, 0], [0, 0, 1]])
    layer1 = torch.stack([eye, head_b])[None]  # 1, 2, 3, 3
    to_p1 = torch.tensor([[0.0, 0, 1], [0, 1, 0], [0, 0, 1]])
    layer2 = torch.stack([to_p1, to_p1])[None]
    joint = rollout_matrix([layer1, layer2])
    torch.testing.assert_close(joint[0, 0], torch.tensor([0.375, 0.125, 0.5], dtype=torch.float64))
    maps = rollout_maps([layer1, layer2], (1, 2), num_prefix_tokens=1)
    torch.testing.assert_close(maps, torch.tensor([[[0.2, 0.8]]]))


def _numpy_rollout(probs: list[np.ndarray], prefix: int) -> np.ndarray:
    T = probs[0].shape[-1]
    joint = np.eye(T)[None]
    for a in probs:
        a = a.mean(axis=1) + np.eye(T)
        a = a / a.sum(-1, keepdims=True)
        joint = a @ joint
    row = joint[:, 0] if prefix else joint.mean(axis=1)
    row = row[:, prefix:]
    return row / row.sum(-1, keepdims=True)


@pytest.mark.parametrize("classifier", ["token", "gap"])
def test_sdpa_model_matches_numpy_rollout(classifier: str) -> None:
    model = random_model(classifier=classifier, depth=3)
    images = torch.randn(3, 3, 16, 16)
    # the model's own forward uses SDPA and never materialises attention; the rollout gets it from attention_maps
    maps = attention_rollout(model, images, batch_size=2)
    assert maps.shape == (3, 4, 4)
    torch.testing.assert_close(maps.sum(dim=(1, 2)), torch.ones(3))
    prefix = 1 if classifier == "token" else 0
    expected = _numpy_rollout(attention_probs(model, images), prefix).reshape(3, 4, 4)
    np.testing.assert_allclose(maps.numpy(), expected, rtol=1e-4, atol=1e-6)
    # not uniform: the maps carry information about the inputs
    assert (maps.flatten(1).amax(1) - maps.flatten(1).amin(1)).min() > 1e-3


def test_query_attention_is_raw_row() -> None:
    model = random_model(depth=2)
    images = torch.randn(2, 3, 16, 16)
    probs = attention_probs(model, images)
    with torch.no_grad():
        q = query_attention(model.attention_maps(images), 1 + 5, (4, 4), 1)  # the patch at row 1, col 1
    assert q.shape == (2, 2, 2, 4, 4)
    expected = np.stack([p[:, :, 6, 1:] for p in probs], axis=1).reshape(2, 2, 2, 4, 4)
    np.testing.assert_allclose(q.numpy(), expected, rtol=1e-4, atol=1e-6)
