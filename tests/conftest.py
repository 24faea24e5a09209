"""Shared test fixtures: the official-model reference files and deterministic torch settings.

Everything a test reads ships with the repository (``tests/fixtures/``, and the CIFAR-10 sample inside the
package), so a plain clone tests itself; see ``tests/fixtures/README.md`` for where the files come from.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "official"


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


def require(path: Path) -> Path:
    """The fixtures are part of the checkout: a missing one means a broken checkout, so the test fails."""
    if not path.exists():
        pytest.fail(f"test fixture missing: {path} (it ships with the repository under tests/fixtures/)")
    return path
