"""Training and fine-tuning (paper Sec. 4.1, Appendix B): typed configs and presets, the training loop,
evaluation and checkpoints.

``train(load_config("small-scratch", ["epochs=5"]), "DATA_DIR", "runs/x")`` is what ``vitlab train`` runs.
"""

from vitlab.train.config import RESUMABLE_CHANGES, TrainConfig, list_presets, load_config
from vitlab.train.data import batch_augment, build_data, image_transform
from vitlab.train.engine import NonFiniteLossError, train, train_step
from vitlab.train.evaluate import evaluate, plot_confusion
from vitlab.train.model import build_model
from vitlab.train.optim import EMA, build_optimizer, param_groups
from vitlab.train.rundir import RunFolderBusy
from vitlab.train.schedule import lr_at

__all__ = ["EMA", "NonFiniteLossError", "RESUMABLE_CHANGES", "RunFolderBusy", "TrainConfig", "batch_augment",
           "build_data", "build_model", "build_optimizer", "evaluate", "image_transform", "list_presets",
           "load_config", "lr_at", "param_groups", "plot_confusion", "train", "train_step"]
