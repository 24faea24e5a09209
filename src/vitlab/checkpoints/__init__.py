"""Checkpoints: vitlab's own format and the official Google ``.npz``, timm and Hugging Face formats (one module
each), strict loading with a readable diff, and hub resolution. Position-embedding resampling is the model's
(``vitlab.model.posembed``).

``load`` / ``save`` are the entry points (also ``vitlab.load`` / ``vitlab.save``); see :mod:`vitlab.checkpoints.api`.
"""

from vitlab.checkpoints.api import FORMATS, adapt, convert, detect_format, load, save
from vitlab.checkpoints.strict import CheckpointError, load_state_dict_strict, state_dict_diff

__all__ = ["FORMATS", "CheckpointError", "adapt", "convert", "detect_format", "load", "load_state_dict_strict",
           "save", "state_dict_diff"]
