"""Training: configuration, the crash-safe trainer, checkpoints, evaluation, torchrun support.

Quick use::

    from attnkit.train import Trainer, load_config
    trainer = Trainer(load_config("configs/listops_short.toml", ["max_steps=100"]))
    metrics = trainer.fit()
"""

from attnkit.train.checkpoint import (
    CorruptCheckpointError,
    latest_checkpoint,
    load_checkpoint,
    load_intact_checkpoint,
    load_state,
    save_checkpoint,
)
from attnkit.train.config import TrainConfig, apply_overrides, load_config, read_config_file
from attnkit.train.evaluate import evaluate, greedy_decode
from attnkit.train.interrupt import TrainingInterrupted
from attnkit.train.schedule import learning_rate
from attnkit.train.trainer import Trainer, format_metrics

__all__ = [
    "CorruptCheckpointError",
    "TrainConfig",
    "Trainer",
    "TrainingInterrupted",
    "apply_overrides",
    "evaluate",
    "format_metrics",
    "greedy_decode",
    "latest_checkpoint",
    "learning_rate",
    "load_checkpoint",
    "load_config",
    "load_intact_checkpoint",
    "load_state",
    "read_config_file",
    "save_checkpoint",
]
