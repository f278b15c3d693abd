"""What a training run folder holds, and which weights a path names.

A *model folder* holds ``config.json`` + ``model.safetensors`` (``save_pretrained``); a *run
folder* is the ``out_dir`` of ``attnkit train``: ``best/`` and ``model/`` (model folders),
``checkpoints/step_*`` and ``train_config.json``. The commands that load a model
(``attnkit generate``, ``attnkit compress``, ``attnkit distill``) and the compression summary
accept either, through :func:`resolve_weights`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The weights of a run folder, in the order a bare run folder picks them.
RUN_WEIGHTS = ("best", "final", "last")


@dataclass(frozen=True)
class Weights:
    """The folder to load (``config.json`` + ``model.safetensors``) and what it is, in words."""

    directory: Path
    description: str


def _best_description(directory: Path) -> str:
    try:
        metrics = json.loads((directory / "metrics.json").read_text())
    except (OSError, ValueError):
        return "the best validation score"
    shown = ", ".join(
        f"{key} {metrics[key]:.4g}" for key in ("loss", "accuracy") if isinstance(metrics.get(key), (int, float))
    )
    return f"the best validation score: step {metrics.get('step', '?')}" + (f", {shown}" if shown else "")


def _run_weights(run: Path) -> dict[str, Weights]:
    """The weights a training run folder holds, by ``RUN_WEIGHTS`` name."""
    from attnkit.train.checkpoint import latest_checkpoint

    found: dict[str, Weights] = {}
    if (run / "best" / "config.json").is_file():
        found["best"] = Weights(run / "best", _best_description(run / "best"))
    if (run / "model" / "config.json").is_file():
        found["final"] = Weights(run / "model", "the final weights, written when training finished")
    newest = latest_checkpoint(run / "checkpoints")
    if newest is not None:
        step = int(newest.name.removeprefix("step_"))
        found["last"] = Weights(newest, f"the newest checkpoint, step {step}")
    return found


def resolve_weights(path: Path, which: str | None) -> Weights:
    """The weights MODEL names: a model folder itself, or the ``which`` weights of a training run folder.

    Args:
        path: a model folder (holds ``config.json``) or a run folder (the ``out_dir`` of ``attnkit train``).
        which: ``"best"``, ``"final"``, ``"last"``, or None for the first of these the run holds.

    Raises:
        FileNotFoundError: ``path`` is neither, or the run holds no (such) weights.
        ValueError: ``which`` given with a model folder.
    """
    hint = (
        "pass a training run folder (the out_dir of 'attnkit train', e.g. runs/text_stdlib) or a model folder "
        "(config.json + model.safetensors, written by save_pretrained)"
    )
    if not path.exists():
        raise FileNotFoundError(f"MODEL {path} does not exist; {hint}")
    if not path.is_dir():
        raise FileNotFoundError(f"MODEL {path} is not a folder; {hint}")
    if (path / "config.json").is_file():
        if which is not None:
            raise ValueError(
                f"--weights {which} picks weights inside a training run folder, but {path} is a model folder "
                "(it holds config.json): drop --weights, or pass the run folder"
            )
        return Weights(path, "a model folder")
    is_run = (path / "train_config.json").is_file() or any(
        (path / d).is_dir() for d in ("best", "model", "checkpoints")
    )
    if not is_run:
        raise FileNotFoundError(f"MODEL {path} holds neither config.json nor a training run; {hint}")
    found = _run_weights(path)
    if which is not None:
        if which not in found:
            have = ", ".join(found) or "none yet"
            raise FileNotFoundError(f"--weights {which}: the run {path} has no such weights (it has: {have})")
        return found[which]
    for name in RUN_WEIGHTS:
        if name in found:
            return found[name]
    raise FileNotFoundError(
        f"the training run {path} holds no weights yet (no best/, model/ or complete checkpoint): "
        "train it longer, or pass another run"
    )


def run_config(path: Path) -> Any:
    """The :class:`~attnkit.train.TrainConfig` of a training run folder, or None for a model folder."""
    config_path = path / "train_config.json"
    if (path / "config.json").is_file() or not config_path.is_file():
        return None
    from attnkit.train import TrainConfig

    return TrainConfig.from_dict(json.loads(config_path.read_text()), source=str(config_path))
