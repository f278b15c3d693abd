"""Save/load (``config.json`` + ``model.safetensors``), parameter counts and the model summary.

Loading never unpickles: the config is JSON and the weights are safetensors. Tied
weights are stored once. A missing, truncated or mismatched file raises a ``ValueError``
(or ``FileNotFoundError``) that names the file and what is wrong with it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
from torch import Tensor, nn

from attnkit.attention.head_groups import MixedHeads
from attnkit.models.config import TransformerConfig
from attnkit.models.stack import TransformerStack

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
#: Written next to the weights by :func:`attnkit.compress.save_compressed` (pruned or quantized layers).
COMPRESSION_NAME = "compression.json"

#: Model classes by architecture name, filled in by :func:`register_architecture`.
ARCHITECTURES: dict[str, type[PreTrainedModel]] = {}

P = TypeVar("P", bound="PreTrainedModel")


def register_architecture(cls: type[P]) -> type[P]:
    """Class decorator: make ``cls`` loadable by :func:`load_pretrained` under its class name."""
    ARCHITECTURES[cls.__name__] = cls
    return cls


def read_config(directory: str | Path) -> tuple[str | None, TransformerConfig]:
    """``(architecture name, config)`` from ``directory/config.json``.

    Raises:
        FileNotFoundError: no such directory or config file.
        ValueError: the file is not valid JSON or not a valid config.
    """
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory!s} (save a model there with model.save_pretrained)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    try:
        config = TransformerConfig.from_dict(data)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path} is not a valid attnkit config: {err}") from None
    architecture = data.get("architecture")
    return (architecture if isinstance(architecture, str) else None), config


def _tied_names(module: nn.Module) -> dict[str, str]:
    """``{name: name it shares storage with}`` for every parameter/buffer stored twice."""
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    tied: dict[str, str] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            tied[name] = seen[key]
        else:
            seen[key] = name
    return tied


def load_pretrained(directory: str | Path, **kwargs: Any) -> PreTrainedModel:
    """Load whichever model class was saved in ``directory``."""
    architecture, _ = read_config(directory)
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"{Path(directory) / CONFIG_NAME} names architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}"
        )
    return ARCHITECTURES[architecture].from_pretrained(directory, **kwargs)


class PreTrainedModel(nn.Module):
    """Base of every attnkit model: holds the config; save/load, counts and summary."""

    config: TransformerConfig

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"config must be an attnkit.TransformerConfig, got {type(config).__name__}")
        self.config = config

    def init_weights(self) -> None:
        """Normal(0, ``config.init_std``) weights (GPT-2's 0.02 by default), zero biases; norms at identity."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=self.config.init_std)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)

    # -- counts and summary ------------------------------------------------------------
    def num_parameters(self, *, trainable_only: bool = False, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters (tied weights counted once)."""
        seen: set[int] = set()
        total = 0
        for name, p in self.named_parameters():
            if id(p) in seen or (trainable_only and not p.requires_grad):
                continue
            if exclude_embeddings and name.endswith("tokens.weight"):
                continue
            seen.add(id(p))
            total += p.numel()
        return total

    def summary(self) -> str:
        """A readable table: one row per layer (mechanism, options, parameters) and the totals."""
        cfg = self.config
        lines = [
            f"{type(self).__name__}: {self.num_parameters():,} parameters "
            f"({self.num_parameters(exclude_embeddings=True):,} without the token embedding)",
            f"  dim={cfg.dim} heads={cfg.heads} kv_heads={cfg.kv_heads or cfg.heads} ff={cfg.hidden_dim} "
            f"({cfg.activation}) norm={cfg.norm} position={cfg.position} vocab={cfg.vocab_size} "
            f"dropout={cfg.dropout:g}",
        ]
        tricks = [
            t
            for t, on in (
                ("reversible", cfg.reversible),
                (f"ff_chunks={cfg.ff_chunks}", cfg.ff_chunks > 1),
                ("checkpointing", cfg.checkpointing),
                ("tied embeddings", cfg.tie_embeddings),
            )
            if on
        ]
        if tricks:
            lines.append("  " + ", ".join(tricks))
        for stack_name, stack in self.named_stacks():
            lines.append(f"  {stack_name}:")
            for i, layer in enumerate(stack.layer_list()):
                attention = layer.self_attention.attention.attention
                # A per-head mix's label (layer.mechanism) already lists each group's options.
                options = "" if isinstance(attention, MixedHeads) else attention.extra_repr()
                cross = ""
                if layer.cross_attention is not None:
                    cross = f" + cross {layer.cross_attention.attention.attention.name}"
                count = sum(p.numel() for p in layer.parameters())
                mech = layer.mechanism + (f"({options})" if options else "")
                lines.append(f"    layer {i:>2}: {mech}{cross}  {count:,} params")
        return "\n".join(lines)

    def named_stacks(self) -> list[tuple[str, TransformerStack]]:
        """``(name, TransformerStack)`` of the model (encoder, decoder)."""
        return []

    def __repr__(self) -> str:
        return self.summary()

    # -- save / load ---------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created if needed).

        Returns:
            The directory.
        """
        from safetensors.torch import save_file

        from attnkit import __version__

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        data = {"architecture": type(self).__name__, "attnkit_version": __version__, **self.config.to_dict()}
        (path / CONFIG_NAME).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        tied = _tied_names(self)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items() if k not in tied}
        save_file(state, str(path / WEIGHTS_NAME), metadata={"format": "pt", "tied": json.dumps(tied)})
        return path

    @classmethod
    def from_pretrained(cls: type[P], directory: str | Path, *, map_location: str | torch.device = "cpu") -> P:
        """Load a model saved with :meth:`save_pretrained` (no unpickling).

        Args:
            directory: the folder holding ``config.json`` and ``model.safetensors``.
            map_location: device to load the weights onto.

        Raises:
            FileNotFoundError: missing directory or files.
            ValueError: a checkpoint of another model class, a truncated or corrupt weights file,
                or weights that do not match the config (names and shapes listed).
        """
        architecture, config = read_config(directory)
        if architecture is not None and architecture != cls.__name__:
            raise ValueError(
                f"{directory!s} holds a {architecture}, not a {cls.__name__}; "
                f"load it with attnkit.{architecture}.from_pretrained"
            )
        if (Path(directory) / COMPRESSION_NAME).is_file():
            # A pruned or quantized model: its layers no longer have the shapes its config describes.
            from attnkit.compress.saving import load_compressed  # lazy: attnkit.compress imports the models

            return cast(P, load_compressed(directory, map_location=str(map_location)))
        state = _read_weights(Path(directory) / WEIGHTS_NAME, map_location)
        model = cls(config)
        dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
        if len(dtypes) == 1:
            model = model.to(dtype=dtypes.pop())
        model.to(map_location)
        _load_state(model, state, Path(directory) / WEIGHTS_NAME)
        return model.eval()


def _read_weights(path: Path, device: str | torch.device) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {path.parent} (save a model there with model.save_pretrained)")
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise ValueError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): {err}. "
            "Save the model again with model.save_pretrained"
        ) from None
    # Moved after reading, so an unavailable device is reported as such, not as a corrupt file.
    return {name: tensor.to(device) for name, tensor in state.items()}


def _load_state(model: nn.Module, state: dict[str, Tensor], path: Path) -> None:
    expected = model.state_dict()
    tied = _tied_names(model)
    missing = sorted(set(expected) - set(state) - set(tied))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        # An empty tensor in the fresh model is a buffer set up lazily on first use (routing's
        # centroids); the mechanism's own _load_from_state_dict takes the stored shape.
        if state[k].shape != expected[k].shape and expected[k].numel() > 0
    )
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if wrong:
        problems.append(f"shape mismatches {wrong[:8]}")
    if problems:
        raise ValueError(f"{path} does not match the model its config describes: " + "; ".join(problems))
    model.load_state_dict(state, strict=False)
