"""Crash-safe checkpoints.

A checkpoint is a directory ``checkpoints/step_00000100/`` holding the model
(``config.json`` + ``model.safetensors`` from ``save_pretrained``), the tokenizer when there
is one, and ``state.pt``: the optimizer, the step, every RNG state and the data position,
loadable with ``torch.load(weights_only=True)`` (no unpickling of arbitrary objects).

Writing is atomic: everything goes into a hidden temporary directory, every file and the
directory are fsync'd, the directory is renamed into place (atomic on POSIX), and the parent
is fsync'd. Only then are old checkpoints deleted. A ``kill -9`` at any moment leaves the
previous complete checkpoints intact; leftovers of an interrupted write are hidden ``.tmp-*``
directories that :func:`latest_checkpoint` ignores and :func:`save_checkpoint` cleans up.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            _fsync_path(path)
    for path in sorted((p for p in directory.rglob("*") if p.is_dir()), reverse=True):
        _fsync_path(path)
    _fsync_path(directory)


def write_atomically(target: Path, write: Callable[[Path], None]) -> Path:
    """Create directory ``target`` atomically: ``write(tmp_dir)`` fills a temporary directory
    that is fsync'd and renamed to ``target``. An existing ``target`` is replaced (the old
    copy is moved aside first and removed only after the new one is in place).

    Returns:
        ``target``.
    """
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".tmp-{target.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write(tmp)
    _fsync_tree(tmp)
    old = parent / f".old-{target.name}-{os.getpid()}"
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    _fsync_path(parent)
    if old.exists():
        shutil.rmtree(old)
    return target


def checkpoint_dirs(directory: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints under ``directory``, oldest first."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint under ``directory``, or None."""
    found = checkpoint_dirs(directory)
    return found[-1] if found else None


def save_checkpoint(
    directory: str | os.PathLike[str],
    step: int,
    write_model: Callable[[Path], None],
    state: dict[str, Any],
    *,
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step`` atomically, then rotate old ones.

    Args:
        directory: the run's ``checkpoints`` directory.
        step: the optimizer step the state corresponds to.
        write_model: fills a directory with the model (and tokenizer) files.
        state: the training state (tensors, numbers, strings, lists, tuples, dicts only).
        keep: complete checkpoints to keep, newest first.

    Returns:
        The new checkpoint's directory.
    """
    root = Path(directory)

    def write(tmp: Path) -> None:
        write_model(tmp)
        torch.save(state, tmp / STATE_FILE)

    target = write_atomically(root / f"step_{step:08d}", write)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    complete = checkpoint_dirs(root)
    for old in complete[: max(len(complete) - keep, 0)]:
        shutil.rmtree(old)
    return target


def load_state(checkpoint: str | os.PathLike[str]) -> dict[str, Any]:
    """The training state of a checkpoint directory, loaded with ``weights_only=True``."""
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (not a complete attnkit checkpoint)")
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    return state
