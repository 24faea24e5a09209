"""Studies that reproduce the paper's findings on the user's data (Dosovitskiy et al. 2020, Sec. 4.2-4.4 and
Appendix D.4), and few-shot linear evaluation (Sec. 4.1, Appendix B.1.1).

- :func:`data_size`: ViT against a BiT ResNet on nested class-balanced subsets (Fig. 3/4).
- :func:`patch_size`: accuracy against sequence length and FLOPs at patch 8/4/2 (Sec. 4.1, 4.4).
- :func:`pos_embed`: none / learned 1D / learned 2D / sin-cos 2D, with the topology score (Appendix D.4, Fig. 7).
- :mod:`vitlab.study.resolution` (``resolution()``): pre-train low, fine-tune at the same and higher
  resolutions, interpolating the position embedding or not, against scratch at equal compute (Sec. 3.2, Table 2).
- :mod:`vitlab.study.transfer` (``transfer()``): pre-train on a source folder, fine-tune on a target folder with
  two recipes against scratch, through the official ``.npz``; few-shot accuracy of the features (Sec. 3.2, 4.1).
- :func:`fewshot_evaluate`: closed-form regularised least squares onto {-1, 1}^K from frozen features.

Submodules load on first use, so ``import vitlab.study`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "data_size": "vitlab.study.studies",
    "patch_size": "vitlab.study.studies",
    "pos_embed": "vitlab.study.studies",
    "fewshot_evaluate": "vitlab.study.fewshot",
    "fewshot_accuracy": "vitlab.study.fewshot",
    "nested_subsets": "vitlab.study.subsets",
    "materialise_subsets": "vitlab.study.subsets",
    "materialise_per_class": "vitlab.study.subsets",
    "class_split": "vitlab.study.subsets",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vitlab.study' has no attribute {name!r}")


__all__ = sorted(_LAZY)
