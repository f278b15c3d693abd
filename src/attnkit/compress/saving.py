"""Save and load compressed models: ``config.json`` + ``model.safetensors`` + ``compression.json``.

The config still describes the uncompressed model (it has one ``heads`` and one ``ff_dim`` for
all layers); ``compression.json`` holds the :class:`~attnkit.compress.records.CompressionRecord`.
Loading builds the model from the config, replays the record (removes the same original heads
and channels, puts :class:`~attnkit.compress.quantize.Int8Linear` where int8 layers were; the
weights these steps leave are placeholders), then loads every tensor from the safetensors file:
the loaded model equals the saved one exactly. Nothing is unpickled.

``PreTrainedModel.from_pretrained`` on such a folder fails with the shape mismatches listed
(it does not read ``compression.json``); a model without structural changes (e.g. only
magnitude-pruned) loads either way.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from attnkit.compress.ffn import remove_channels
from attnkit.compress.heads import remove_heads
from attnkit.compress.quantize import Int8Linear
from attnkit.compress.records import RECORD_ATTRIBUTE, CompressionRecord, record_of, replace_submodule, submodule
from attnkit.models.pretrained import (
    ARCHITECTURES,
    COMPRESSION_NAME,
    CONFIG_NAME,
    WEIGHTS_NAME,
    PreTrainedModel,
    read_config,
)


def apply_record(model: nn.Module, record: CompressionRecord) -> None:
    """Give a freshly built ``model`` the shapes ``record`` describes (weights are placeholders).

    Raises:
        ValueError: a record that does not fit the model (unknown modules, indices out of range).
    """
    from attnkit.attention.multi_head import MultiHeadAttention
    from attnkit.models.layers import FeedForward

    for path, kept in record.heads.items():
        attention = submodule(model, path, argument="compression record")
        if not isinstance(attention, MultiHeadAttention):
            raise ValueError(f"compression record: {path} is a {type(attention).__name__}, not a MultiHeadAttention")
        remove_heads(attention, kept)
    for path, kept in record.ffn.items():
        ff = submodule(model, path, argument="compression record")
        if not isinstance(ff, FeedForward):
            raise ValueError(f"compression record: {path} is a {type(ff).__name__}, not a FeedForward")
        remove_channels(ff, kept)
    for path, spec in record.quantized.items():
        linear = submodule(model, path, argument="compression record")
        if type(linear) is not nn.Linear:
            raise ValueError(f"compression record: {path} is a {type(linear).__name__}, not an nn.Linear")
        layer = Int8Linear(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            mode=spec["mode"],
            route=spec["route"],
            dtype=linear.weight.dtype,
            device=linear.weight.device,
        )
        replace_submodule(model, path, layer)
    object.__setattr__(model, RECORD_ATTRIBUTE, record)


def save_compressed(model: nn.Module, directory: str | Path, *, overwrite: bool = False) -> Path:
    """Write a (compressed) attnkit model to ``directory``.

    Args:
        model: an attnkit model, pruned and/or quantized (or not).
        directory: created if needed.
        overwrite: replace a model already saved there (default: refuse).

    Returns:
        The directory.

    Raises:
        ValueError: ``model`` is not an attnkit model, or ``directory`` already holds a model
            and ``overwrite`` is False.
    """
    if not isinstance(model, PreTrainedModel):
        raise ValueError(f"model must be an attnkit model (PreTrainedModel), got {type(model).__name__}")
    path = Path(directory)
    existing = [name for name in (CONFIG_NAME, WEIGHTS_NAME, COMPRESSION_NAME) if (path / name).exists()]
    if existing and not overwrite:
        raise ValueError(
            f"{path} already holds {', '.join(existing)}; pass overwrite=True to replace it, or choose another directory"
        )
    model.save_pretrained(path)
    record = record_of(model)
    (path / COMPRESSION_NAME).write_text(json.dumps(record.to_dict(), indent=2, sort_keys=True) + "\n")
    return path


def load_compressed(directory: str | Path, *, map_location: str = "cpu") -> PreTrainedModel:
    """Load a model written by :func:`save_compressed` (or by ``save_pretrained``), in eval mode.

    Raises:
        FileNotFoundError: missing directory or files.
        ValueError: an unknown architecture, a malformed ``compression.json``, or weights that do
            not match the model the config and the record describe (names and shapes listed).
    """
    from attnkit.models.pretrained import _load_state, _read_weights

    path = Path(directory)
    architecture, config = read_config(path)
    if architecture not in ARCHITECTURES:
        raise ValueError(f"{path / CONFIG_NAME} names architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}")
    record_path = path / COMPRESSION_NAME
    record = CompressionRecord()
    if record_path.is_file():
        try:
            data = json.loads(record_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{record_path} is not valid JSON: {err}") from None
        record = CompressionRecord.from_dict(data, source=str(record_path))
    state = _read_weights(path / WEIGHTS_NAME, map_location)
    model = ARCHITECTURES[architecture](config)
    # The parameters' dtype is the model's (buffers such as int8 scales or routing centroids keep their own).
    dtypes = {state[k].dtype for k, _ in model.named_parameters() if k in state and state[k].is_floating_point()}
    if len(dtypes) == 1:
        model = model.to(dtype=dtypes.pop())
    model.to(map_location)
    apply_record(model, record)
    _load_state(model, state, path / WEIGHTS_NAME)
    return model.eval()
