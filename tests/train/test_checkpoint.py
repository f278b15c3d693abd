"""Atomic checkpoint writes, rotation, weights_only loading, and the learning-rate schedule."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from attnkit.train.checkpoint import checkpoint_dirs, latest_checkpoint, load_state, save_checkpoint
from attnkit.train.schedule import learning_rate


def _model_writer(value: float):
    def write(directory: Path) -> None:
        (directory / "weights.txt").write_text(str(value))

    return write


def test_checkpoints_rotate_after_the_new_one_is_complete(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, _model_writer(step), {"step": step}, keep=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_00000003", "step_00000004"]
    assert load_state(latest_checkpoint(tmp_path) or tmp_path)["step"] == 4


def test_a_failed_write_leaves_the_previous_checkpoints_intact(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 1, _model_writer(1), {"step": 1}, keep=1)

    def crash(directory: Path) -> None:
        (directory / "weights.txt").write_text("partial")
        raise OSError("disk full")  # stands in for a crash in the middle of writing

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, crash, {"step": 2}, keep=1)
    latest = latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == "step_00000001"
    assert (latest / "weights.txt").read_text() == "1"
    # The debris is a hidden temporary directory, ignored, and cleaned by the next save.
    assert any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
    save_checkpoint(tmp_path, 3, _model_writer(3), {"step": 3}, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003"]


def test_a_directory_without_state_is_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "step_00000009").mkdir()
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="not a complete attnkit checkpoint"):
        load_state(tmp_path / "step_00000009")


def test_state_with_rng_and_optimizer_loads_weights_only(tmp_path: Path) -> None:
    param = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([param], lr=0.1)
    param.grad = torch.ones(3)
    opt.step()
    state = {"optimizer": opt.state_dict(), "rng": {"python": random.getstate(), "torch": torch.get_rng_state()}}
    path = save_checkpoint(tmp_path, 5, _model_writer(0), state)
    loaded = load_state(path)  # torch.load(weights_only=True) inside
    assert loaded["rng"]["python"] == random.getstate()
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_learning_rate_closed_form() -> None:
    kw = {"lr": 1.0, "warmup_steps": 10, "max_steps": 110, "min_lr_ratio": 0.1}
    assert learning_rate(5, **kw) == pytest.approx(0.5)
    assert learning_rate(10, **kw) == pytest.approx(1.0)
    assert learning_rate(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert learning_rate(110, **kw) == pytest.approx(0.1)
    assert learning_rate(500, **kw) == pytest.approx(0.1)
