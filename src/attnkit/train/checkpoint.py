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

A checkpoint can still be damaged after it was written (a full disk, a copy cut short, a
bad sector). :func:`load_checkpoint` reads every file of one and raises
:class:`CorruptCheckpointError` naming the file when any of them does not load, and
:func:`load_intact_checkpoint` walks back from the newest to the first one that loads.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

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
    try:
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
    except BaseException:
        # A Ctrl-C (or an error) between the two renames: put the previous copy back.
        if not target.exists() and old.exists():
            os.replace(old, target)
        raise
    _fsync_path(parent)
    if old.exists():
        shutil.rmtree(old)
    return target


def checkpoint_step(checkpoint: str | os.PathLike[str]) -> int:
    """The step of a checkpoint directory named ``step_00000100``.

    Raises:
        ValueError: for a directory not named like a checkpoint.
    """
    found = _STEP_DIR.match(Path(checkpoint).name)
    if found is None:
        raise ValueError(f"{checkpoint} is not a checkpoint directory (expected a name like step_00000100)")
    return int(found.group(1))


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
    # Checkpoints of later steps belong to a future this run left behind (it resumed from an
    # older checkpoint because those did not load): they must not outlive intact older ones.
    for future in (p for p in complete if checkpoint_step(p) > step):
        shutil.rmtree(future)
    complete = [p for p in complete if checkpoint_step(p) <= step]
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


class CorruptCheckpointError(ValueError):
    """A checkpoint file that does not load (truncated, corrupt, or not written by attnkit).

    Attributes:
        checkpoint: the checkpoint directory.
        reason: which file failed and why.
    """

    def __init__(self, checkpoint: Path, reason: str) -> None:
        super().__init__(f"{checkpoint} does not load: {reason}")
        self.checkpoint, self.reason = checkpoint, reason


@dataclass
class Checkpoint:
    """A checkpoint whose every file loaded.

    Attributes:
        path: its directory.
        state: the training state (see :func:`load_state`).
        model: the model it holds, on the requested device.
    """

    path: Path
    state: dict[str, Any]
    model: nn.Module


#: What a damaged file raises from torch.load, safetensors, JSON and the tokenizer loaders (torch's
#: weights-only unpickler fails on garbage bytes with IndexError as well as UnpicklingError).
_LOAD_ERRORS = (
    OSError,
    RuntimeError,
    ValueError,
    EOFError,
    KeyError,
    IndexError,
    pickle.UnpicklingError,
    zipfile.BadZipFile,
)


def load_checkpoint(checkpoint: str | os.PathLike[str], *, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load every file of one checkpoint: ``state.pt``, the model and the tokenizer if there is one.

    Raises:
        CorruptCheckpointError: naming the file that does not load and the loader's reason.
    """
    from attnkit.data.tokenizers import load_tokenizer
    from attnkit.models import load_pretrained

    path = Path(checkpoint)
    try:
        state = load_state(path)
    except _LOAD_ERRORS as err:
        raise CorruptCheckpointError(path, f"{STATE_FILE} is truncated or corrupt ({_first_line(err)})") from err
    try:
        model = load_pretrained(path, map_location=map_location)
    except _LOAD_ERRORS as err:  # these loaders' messages name the file
        raise CorruptCheckpointError(path, _first_line(err, with_type=False)) from err
    if (path / "tokenizer.json").exists():
        try:
            load_tokenizer(path)
        except _LOAD_ERRORS as err:
            raise CorruptCheckpointError(path, _first_line(err, with_type=False)) from err
    return Checkpoint(path=path, state=state, model=model)


def load_intact_checkpoint(
    directory: str | os.PathLike[str],
    *,
    map_location: str | torch.device = "cpu",
    on_skip: Callable[[CorruptCheckpointError], None] | None = None,
) -> Checkpoint | None:
    """The newest checkpoint under ``directory`` whose every file loads.

    Args:
        directory: the run's ``checkpoints`` directory.
        map_location: device for the model's weights.
        on_skip: called with the error of each newer checkpoint that did not load.

    Returns:
        The checkpoint, or None when ``directory`` holds no complete checkpoint.

    Raises:
        ValueError: when there are checkpoints but none of them loads (the message lists
            each one and why).
    """
    found = checkpoint_dirs(directory)
    failures: list[CorruptCheckpointError] = []
    for candidate in reversed(found):
        try:
            return load_checkpoint(candidate, map_location=map_location)
        except CorruptCheckpointError as err:
            failures.append(err)
            if on_skip is not None:
                on_skip(err)
    if not failures:
        return None
    listing = "; ".join(f"{err.checkpoint.name}: {err.reason}" for err in failures)
    raise ValueError(
        f"none of the {len(failures)} checkpoint(s) in {directory} loads, so there is nothing to resume from "
        f"({listing}); start afresh with another out_dir, or move {directory} aside and run without --resume"
    )


def _first_line(err: BaseException, *, with_type: bool = True) -> str:
    """The first line of an error: torch's loader errors run to many lines of C++ context."""
    text = str(err).strip().splitlines()
    if not text:
        return type(err).__name__
    return f"{type(err).__name__}: {text[0]}" if with_type else text[0]
