"""Fine-tuning: start a run from saved weights (``init_from``) and freeze parameters by pattern.

:func:`init_from` copies every tensor of a saved model (``model.save_pretrained`` output, or a
training run's ``model``/``best`` folder) whose name and shape match the new model's, so a
classifier or an encoder-decoder can start from a pretrained encoder: the ``embed.*`` and
``encoder.*`` tensors load, the new head or decoder keeps its fresh initialisation. Token
embeddings may differ in rows only: a pretraining objective's extra tokens (``<mask>``, the
sentinels) come after the tokenizer's vocabulary, so the rows both models have are the same
tokens and are copied. Any other shape difference is an error that names the tensors (the
configs disagree on ``dim``, ``heads``, ...).

:func:`freeze` turns ``requires_grad`` off for the parameters whose names match any of the
glob patterns (``"embed.*"``, ``"encoder.layers.[0-3].*"``); a pattern that matches nothing
is an error, so a typo cannot silently train everything.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

__all__ = ["InitResult", "find_weights_dir", "freeze", "init_from"]

_WEIGHTS = "model.safetensors"
#: Tensors that may differ in their first dimension (rows of token ids).
_TOKEN_ROWS = ("embed.tokens.weight", "lm_head.proj.weight")


@dataclass
class InitResult:
    """What :func:`init_from` did.

    Attributes:
        source: the folder the weights came from.
        loaded: tensors copied whole.
        resized: token-row tensors of which the shared rows were copied.
        new: tensors of the new model that kept their fresh initialisation.
        unused: saved tensors the new model has no place for (a pretraining head, say).
    """

    source: Path
    loaded: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the training log."""
        parts = [f"{len(self.loaded)} tensors loaded from {self.source}"]
        if self.resized:
            parts.append(f"{len(self.resized)} with their shared token rows ({', '.join(self.resized)})")
        if self.new:
            parts.append(f"{len(self.new)} new ({_brief(self.new)})")
        if self.unused:
            parts.append(f"{len(self.unused)} saved tensors unused ({_brief(self.unused)})")
        return "; ".join(parts)


def _brief(names: Sequence[str], most: int = 4) -> str:
    shown = ", ".join(names[:most])
    return shown + (f", ... {len(names) - most} more" if len(names) > most else "")


def find_weights_dir(path: str | os.PathLike[str]) -> Path:
    """The folder holding ``model.safetensors``: ``path`` itself, or a run's ``best`` / ``model`` folder.

    Raises:
        FileNotFoundError: when none of them holds saved weights.
        ValueError: for a pruned or quantized model (its shapes no longer follow its config).
    """
    root = Path(path)
    for candidate in (root, root / "best", root / "model"):
        if (candidate / _WEIGHTS).is_file():
            if (candidate / "compression.json").is_file():
                raise ValueError(
                    f"init_from={str(path)!r} is a compressed (pruned or quantized) model; fine-tune it with "
                    "attnkit.compress.finetune, or start from the uncompressed weights"
                )
            return candidate
    raise FileNotFoundError(
        f"init_from={str(path)!r}: no {_WEIGHTS} in it or in its best/ or model/ folder "
        "(point it to a training run's out_dir or to a folder written by model.save_pretrained)"
    )


def init_from(model: nn.Module, path: str | os.PathLike[str]) -> InitResult:
    """Copy the matching tensors of the model saved at ``path`` into ``model`` (see the module docstring).

    Raises:
        FileNotFoundError: no saved weights at ``path``.
        ValueError: tensors of the same name with different shapes (beyond token rows), or no
            tensor in common at all.
    """
    from safetensors.torch import load_file

    source = find_weights_dir(path)
    saved = load_file(str(source / _WEIGHTS), device="cpu")
    result = InitResult(source=source)
    target = model.state_dict()
    mismatched = []
    with torch.no_grad():
        for name, tensor in target.items():
            if name not in saved:
                result.new.append(name)
                continue
            value = saved[name]
            if value.shape == tensor.shape:
                tensor.copy_(value.to(tensor.dtype))
                result.loaded.append(name)
            elif name in _TOKEN_ROWS and value.dim() == tensor.dim() and value.shape[1:] == tensor.shape[1:]:
                rows = min(value.shape[0], tensor.shape[0])
                tensor[:rows].copy_(value[:rows].to(tensor.dtype))
                result.resized.append(name)
            else:
                mismatched.append(f"{name}: saved {tuple(value.shape)}, model {tuple(tensor.shape)}")
    if mismatched:
        raise ValueError(
            f"init_from={str(path)!r}: {len(mismatched)} tensors have other shapes than the new model's "
            f"({'; '.join(mismatched[:6])}); the [model] settings (dim, heads, ffn size, ...) must match the saved "
            f"model's (its config.json in {source})"
        )
    if not result.loaded:
        raise ValueError(f"init_from={str(path)!r}: no tensor of {source} has a name of the new model")
    result.unused = sorted(set(saved) - set(target))
    return result


def freeze(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Stop training the parameters whose names match any glob pattern; returns their names.

    Raises:
        ValueError: for a pattern that matches no parameter (listing a few names to choose from).
    """
    names = [name for name, _ in model.named_parameters()]
    frozen: set[str] = set()
    for pattern in patterns:
        matched = fnmatch.filter(names, pattern)
        if not matched:
            raise ValueError(
                f"freeze pattern {pattern!r} matches no parameter; names look like {_brief(names, 6)} "
                "(glob syntax: 'embed.*', 'encoder.layers.[0-2].*')"
            )
        frozen.update(matched)
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    return sorted(frozen)
