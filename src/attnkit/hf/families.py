"""The Transformers model families the bridge supports, and why the others are refused.

A family is supported when the bridge knows its self-attention module (the class whose
``forward`` calls ``ALL_ATTENTION_FUNCTIONS.get_interface(...)``), where that module keeps its
head width and attention dropout, and a test proves its logits equal Transformers' own
attention. Anything else is refused by name, never half-supported.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class Family:
    """One supported model family.

    Attributes:
        model_type: ``config.model_type``.
        module: the Python module that defines the attention class.
        attention_class: name of the self-attention module class.
        head_dim_attribute: the module attribute holding the per-head width.
        dropout_attribute: the module attribute holding its attention-probability dropout (a
            probability, or an ``nn.Dropout``).
        dropout_config_key: the config field that sets that dropout (named in error messages).
    """

    model_type: str
    module: str
    attention_class: str
    head_dim_attribute: str
    dropout_attribute: str
    dropout_config_key: str

    def attention_type(self) -> type[nn.Module]:
        """The self-attention class (imported on first use)."""
        cls: type[nn.Module] = getattr(importlib.import_module(self.module), self.attention_class)
        return cls

    def is_self_attention(self, module: nn.Module) -> bool:
        """Whether ``module`` is one of this family's self-attention layers (cross-attention is not)."""
        return isinstance(module, self.attention_type()) and not getattr(module, "is_cross_attention", False)

    def head_dim(self, module: nn.Module) -> int:
        """Per-head width of ``module``."""
        return int(getattr(module, self.head_dim_attribute))

    def dropout(self, module: nn.Module) -> float:
        """The attention-probability dropout ``p`` of ``module`` (applied in training only)."""
        value = getattr(module, self.dropout_attribute)
        return float(value.p if isinstance(value, nn.Dropout) else value)

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        """The self-attention layers of ``model`` in layer order (``module.layer_idx``)."""
        found = [m for m in model.modules() if self.is_self_attention(m)]
        return sorted(found, key=layer_index)


def layer_index(module: nn.Module) -> int:
    """The layer index Transformers gave an attention module (``layer_idx``).

    Raises:
        ValueError: the module has no integer ``layer_idx``.
    """
    index = getattr(module, "layer_idx", None)
    if isinstance(index, bool) or not isinstance(index, int):
        raise ValueError(
            f"{type(module).__name__} has no integer layer_idx (got {index!r}); "
            "attnkit.hf needs it to tell the layers apart"
        )
    return index


def _llama_style(model_type: str, prefix: str) -> Family:
    # Llama, Qwen2 and Mistral keep the head width in ``head_dim`` and the dropout as a float.
    return Family(
        model_type=model_type,
        module=f"transformers.models.{model_type}.modeling_{model_type}",
        attention_class=f"{prefix}Attention",
        head_dim_attribute="head_dim",
        dropout_attribute="attention_dropout",
        dropout_config_key="attention_dropout",
    )


FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in (
        _llama_style("llama", "Llama"),
        _llama_style("qwen2", "Qwen2"),
        _llama_style("mistral", "Mistral"),
        Family(
            model_type="gpt2",
            module="transformers.models.gpt2.modeling_gpt2",
            attention_class="GPT2Attention",
            head_dim_attribute="head_dim",
            dropout_attribute="attn_dropout",
            dropout_config_key="attn_pdrop",
        ),
        Family(
            model_type="bert",
            module="transformers.models.bert.modeling_bert",
            attention_class="BertSelfAttention",
            head_dim_attribute="attention_head_size",
            dropout_attribute="dropout",
            dropout_config_key="attention_probs_dropout_prob",
        ),
    )
}

#: Why some well-known families are refused: what their attention needs that the bridge does not pass on.
_REFUSAL_REASONS = {
    "t5": "its attention adds a learned relative position bias (position_bias) to the scores",
    "mt5": "its attention adds a learned relative position bias (position_bias) to the scores",
    "bloom": "its attention adds an ALiBi bias to the scores",
    "mpt": "its attention adds an ALiBi bias to the scores",
    "falcon": "its attention can add an ALiBi bias to the scores",
    "gemma2": "its attention soft-caps the scores (attn_logit_softcapping)",
    "gemma3": "its attention soft-caps the scores and mixes sliding and global layers with their own masks",
    "gpt_oss": "its attention adds learned attention sinks to the softmax",
    "llama4": "its attention uses chunked masks and temperature-tuned queries",
}


def family_of(config: Any) -> Family:
    """The supported family of a model config.

    Raises:
        ValueError: the family is not supported; the message names it and says why.
    """
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(str(model_type))
    if family is not None:
        return family
    architecture = ", ".join(getattr(config, "architectures", None) or []) or type(config).__name__
    reason = _REFUSAL_REASONS.get(
        str(model_type),
        "its attention module has not been checked against the bridge (masks, caches and the options it "
        "passes to its attention function), and a family is supported only once a test proves its logits "
        "equal Transformers' own attention",
    )
    raise ValueError(
        f"attnkit.hf does not support the {model_type!r} family ({architecture}): {reason}. "
        f"Supported families: {', '.join(sorted(FAMILIES))}"
    )
