"""Few-shot linear evaluation: the closed-form solver against a direct numpy solution, the draws, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import vitlab
from tests.study.conftest import TINY_VIT
from vitlab.study.fewshot import (
    BIAS_CONSTANT,
    draw_shots,
    extract_features,
    fewshot_accuracy,
    fewshot_evaluate,
    precompute,
    predict,
    solve,
)


def numpy_least_squares(x: np.ndarray, y: np.ndarray, k: int, l2: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The textbook solution: whiten, append the bias feature, W = (X^T X + l2 I)^-1 X^T Y with Y in {-1, 1}^K."""
    mean, std = x.mean(0, keepdims=True), x.std(0, keepdims=True) + 1e-5
    xb = np.concatenate([(x - mean) / std, np.full((len(x), 1), BIAS_CONSTANT)], axis=1)
    targets = 2.0 * np.eye(k)[y] - 1.0
    w = np.linalg.solve(xb.T @ xb + l2 * np.eye(xb.shape[1]), xb.T @ targets)
    return w, mean, std


@pytest.mark.parametrize("n,d", [(60, 8), (12, 40)])  # primal (N >= D+1) and dual (N < D) branches
@pytest.mark.parametrize("l2", [1e-3, 1.0, 1024.0])
def test_solver_matches_numpy(n: int, d: int, l2: float) -> None:
    rng = np.random.default_rng(n + d)
    k = 4
    x = rng.normal(size=(n, d)) * rng.uniform(0.1, 10, size=d) + rng.normal(size=d)
    y = np.arange(n) % k
    cache = precompute(torch.from_numpy(x), torch.from_numpy(y), k)
    w_ref, mean, std = numpy_least_squares(x, y, k, l2)
    np.testing.assert_allclose(solve(cache, l2).numpy(), w_ref, rtol=1e-6, atol=1e-9)
    x_test = rng.normal(size=(50, d))
    xt = np.concatenate([(x_test - mean) / std, np.full((50, 1), BIAS_CONSTANT)], axis=1)
    np.testing.assert_array_equal(predict(cache, solve(cache, l2), torch.from_numpy(x_test)).numpy(),
                                  (xt @ w_ref).argmax(1))
    y_test = rng.integers(0, k, 50)
    acc = fewshot_accuracy(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(x_test),
                           torch.from_numpy(y_test), k, [l2])[l2]
    assert acc == pytest.approx(100.0 * np.mean((xt @ w_ref).argmax(1) == y_test))


def test_separable_features_are_classified_perfectly() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 5)) * 10
    y = np.repeat(np.arange(3), 5)
    x = centres[y] + rng.normal(size=(15, 5)) * 0.1
    yt = np.repeat(np.arange(3), 20)
    xt = centres[yt] + rng.normal(size=(60, 5)) * 0.1
    acc = fewshot_accuracy(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(xt), torch.from_numpy(yt), 3,
                           [1.0])
    assert acc[1.0] == 100.0


def test_draws_are_balanced_seeded_and_differ() -> None:
    labels = [i % 3 for i in range(30)]
    a = draw_shots(labels, 4, seed=1)
    assert sorted(labels[i] for i in a) == [0] * 4 + [1] * 4 + [2] * 4
    assert draw_shots(labels, 4, seed=1) == a and draw_shots(labels, 4, seed=2) != a
    assert len(draw_shots(labels, 50, seed=0)) == 30  # classes with fewer images give all of theirs


def test_fewshot_evaluate_equals_numpy_on_the_model_features(tiny_data) -> None:
    from vitlab.data.folder import scan

    torch.manual_seed(0)
    model = vitlab.create_model(TINY_VIT.split(":")[0], num_classes=3, image_size=16, patch_size=4, width=16,
                                depth=1, num_heads=2, mlp_dim=32)
    result = fewshot_evaluate(model, tiny_data, [1, 5], draws=3, l2s=[1.0, 16.0], seed=7)
    assert set(result["shots"]) == {"1", "5"} and result["num_test"] == 18 and result["feature_dim"] == 16
    five = result["shots"]["5"]
    assert len(five["draws"]) == 3 and five["mean"] == pytest.approx(np.mean(five["draws"]))
    assert five["std"] == pytest.approx(np.std(five["draws"], ddof=1))
    # Recompute draw 0 of the 5-shot case independently: same images, numpy solver.
    train, classes = scan(tiny_data / "train")
    test, _ = scan(tiny_data / "test", classes)
    labels = [label for _, label in train]
    idx = draw_shots(labels, 5, seed=7 * 1_000_003 + 5 * 1_009 + 0)
    fx = extract_features(model, [train[i][0] for i in idx], image_size=16).double().numpy()
    tx = extract_features(model, [p for p, _ in test], image_size=16).double().numpy()
    w, mean, std = numpy_least_squares(fx, np.array([labels[i] for i in idx]), 3, 1.0)
    tb = np.concatenate([(tx - mean) / std, np.full((len(tx), 1), BIAS_CONSTANT)], axis=1)
    expected = 100.0 * np.mean((tb @ w).argmax(1) == np.array([label for _, label in test]))
    assert five["draws"][0] == pytest.approx(expected)
    assert set(five["by_l2"]) == {"1.0", "16.0"}


def test_cli_on_a_saved_checkpoint(tiny_data, tmp_path, capsys) -> None:
    from vitlab.cli import main

    model = vitlab.create_model("ResNet-26", num_classes=3, image_size=16, width_factor=0.25, num_groups=8)
    vitlab.save(model, tmp_path / "m.safetensors")
    out = tmp_path / "fewshot.json"
    assert main(["fewshot", str(tmp_path / "m.safetensors"), "--data", str(tiny_data), "--shots", "1,2",
                 "--draws", "2", "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text()) and printed["feature_dim"] == 512
    assert main(["fewshot", str(tmp_path / "m.safetensors"), "--data", str(tiny_data), "--shots", "0"]) == 2
    assert "shots must be positive" in capsys.readouterr().err
