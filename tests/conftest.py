"""Shared test fixtures: paths to the shared data and deterministic torch settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

def _find_shared() -> Path:
    """CI clones main next to a copy of shared/; a developer checkout has it at ../shared as well."""
    if "VITLAB_SHARED" in os.environ:
        return Path(os.environ["VITLAB_SHARED"])
    for candidate in (REPO.parent / "shared", Path("/work/shared")):
        if candidate.exists():
            return candidate
    return REPO.parent / "shared"


SHARED = _find_shared()
FIXTURES = SHARED / "fixtures" / "official"
CIFAR = SHARED / "datasets" / "cifar10"


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


def require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"test data missing: {path} (set VITLAB_SHARED to the shared/ folder)")
    return path
