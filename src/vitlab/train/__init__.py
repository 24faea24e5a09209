"""Training and fine-tuning (paper Sec. 4.1, Appendix B): typed configs and presets, the training loop,
evaluation and checkpoints.

``train(load_config("small-scratch", ["epochs=5"]), "DATA_DIR", "runs/x")`` is what ``vitlab train`` runs.
"""

from vitlab.train.config import TrainConfig, list_presets, load_config
from vitlab.train.engine import NonFiniteLossError, build_model, train
from vitlab.train.evaluate import evaluate, plot_confusion
from vitlab.train.schedule import lr_at

__all__ = ["NonFiniteLossError", "TrainConfig", "build_model", "evaluate", "list_presets", "load_config", "lr_at",
           "plot_confusion", "train"]
