"""The seam between data and models: which model a task needs, and how a batch is fed to it.

Task kinds map to models: ``classification`` -> :class:`~attnkit.models.SequenceClassifier`,
``lm`` -> :class:`~attnkit.models.LanguageModel` (causal), ``seq2seq`` ->
:class:`~attnkit.models.EncoderDecoder`. Losses live here, outside the model: cross-entropy
summed over the positions that count (``IGNORE_INDEX`` elsewhere).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.data.pipeline import TrainingData
from attnkit.data.tasks import IGNORE_INDEX, Batch


def model_config(data: TrainingData, attention: Any, attention_options: dict[str, Any], model: dict[str, Any]) -> Any:
    """The :class:`~attnkit.models.TransformerConfig` for ``data`` with the user's model settings."""
    from attnkit.models import TransformerConfig

    values: dict[str, Any] = {"max_len": data.max_length, **model}
    values.update(
        vocab_size=data.vocab_size,
        num_classes=data.num_classes,
        pad_token_id=data.pad_id,
        attention=list(attention) if isinstance(attention, tuple) else attention,
        attention_options=attention_options,
    )
    if data.bos_id is not None:
        values.setdefault("bos_token_id", data.bos_id)
        values.setdefault("eos_token_id", data.eos_id)
    if values["max_len"] < data.max_length:
        raise ValueError(
            f"model.max_len={values['max_len']} is shorter than the data's longest sequence {data.max_length}"
        )
    return TransformerConfig(**values)


def model_class(kind: str) -> type[nn.Module]:
    """The model class for a task kind."""
    from attnkit.models import EncoderDecoder, LanguageModel, MaskedLanguageModel, SequenceClassifier

    classes: dict[str, type[nn.Module]] = {
        "classification": SequenceClassifier,
        "lm": LanguageModel,
        "mlm": MaskedLanguageModel,
        "seq2seq": EncoderDecoder,
    }
    if kind not in classes:
        raise ValueError(f"task kind must be one of {', '.join(classes)}, got {kind!r}")
    return classes[kind]


def forward(model: nn.Module, batch: Batch) -> Tensor:
    """Logits for a batch: ``(B, C)`` for classification, ``(B, T, V)`` otherwise."""
    if batch.decoder_input_ids is not None:
        return model(
            batch.input_ids,
            batch.decoder_input_ids,
            src_mask=batch.attention_mask,
            tgt_mask=batch.decoder_attention_mask,
        )
    out: Tensor = model(batch.input_ids, attention_mask=batch.attention_mask)
    return out


def summed_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy summed over counted targets (float32 whatever the logits' dtype).

    Args:
        logits: ``(..., C)``.
        labels: ``(...)`` with ``IGNORE_INDEX`` where nothing counts.
    """
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
