"""Tiny training configs shared by the trainer tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TINY_MODEL = {"dim": 16, "depth": 1, "heads": 2, "position": "rotary"}


def tiny_config(out_dir: Path, **overrides: Any) -> dict[str, Any]:
    """A config dict that trains in about a second per few steps on one CPU thread."""
    config: dict[str, Any] = {
        "task": "copy",
        "task_options": {"min_length": 4, "max_length": 8, "num_symbols": 12},
        "attention": "full",
        "out_dir": str(out_dir),
        "max_steps": 6,
        "batch_size": 8,
        "lr": 3e-3,
        "warmup_steps": 2,
        "eval_every": 3,
        "eval_examples": 16,
        "checkpoint_every": 3,
        "bucket_batches": 2,
        "threads": 1,
        "device": "cpu",  # bit-identity and DDP parity are CPU guarantees
        "progress": False,
        "model": dict(TINY_MODEL),
    }
    config.update(overrides)
    return config
