"""Tiny Transformers models built from configs (nothing downloaded) and the comparisons the bridge tests share."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor

import attnkit
from attnkit.masks import materialize

transformers = pytest.importorskip("transformers")

import attnkit.hf  # noqa: E402

VOCAB = 97
#: Relative tolerance of fp32 comparisons against Transformers' own attention.
RTOL = 1e-4

_COMMON_DECODER = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": VOCAB}

#: family -> (config class, Auto class, config kwargs); GQA (4 query heads, 2 key/value heads) where the family has it.
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": (
        "LlamaConfig",
        "AutoModelForCausalLM",
        {**_COMMON_DECODER, "num_attention_heads": 4, "num_key_value_heads": 2},
    ),
    "qwen2": (
        "Qwen2Config",
        "AutoModelForCausalLM",
        {**_COMMON_DECODER, "num_attention_heads": 4, "num_key_value_heads": 2},
    ),
    "mistral": (
        "MistralConfig",
        "AutoModelForCausalLM",
        {**_COMMON_DECODER, "num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": None},
    ),
    "gpt2": (
        "GPT2Config",
        "AutoModelForCausalLM",
        {
            "n_embd": 64,
            "n_layer": 2,
            "n_head": 4,
            "vocab_size": VOCAB,
            "n_positions": 64,
            "bos_token_id": 0,
            "eos_token_id": 0,
        },
    ),
    "bert": (
        "BertConfig",
        "AutoModelForSequenceClassification",
        {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "vocab_size": VOCAB,
            "num_labels": 3,
        },
    ),
}
CAUSAL_FAMILIES = ["llama", "qwen2", "mistral", "gpt2"]


def tiny(family: str, *, attn_implementation: str = "sdpa", seed: int = 0, **overrides: Any) -> Any:
    """A freshly initialised tiny ``family`` model in fp32 eval mode."""
    config_name, auto_name, kwargs = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**kwargs, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, auto_name).from_config(config, attn_implementation=attn_implementation)
    return model.eval()


def with_mechanism(model: Any, mechanism: str, **options: Any) -> Any:
    """A copy of ``model`` (same weights) with ``mechanism`` applied."""
    return attnkit.hf.apply(copy.deepcopy(model), mechanism, **options)


def padded_batch(lengths: list[int], *, side: str, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Token ids ``(B, max(lengths))`` padded on ``side`` and the 0/1 attention mask."""
    g = torch.Generator().manual_seed(seed)
    total = max(lengths)
    ids = torch.randint(1, VOCAB, (len(lengths), total), generator=g)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, n in enumerate(lengths):
        if side == "left":
            mask[row, total - n :] = 1
        else:
            mask[row, :n] = 1
    return ids, mask


def positions(mask: Tensor) -> Tensor:
    """Position ids counting real tokens only, so a padded row sits where it would alone."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def outputs(model: Any, ids: Tensor, mask: Tensor | None = None, **kwargs: Any) -> Tensor:
    """Per-token outputs to compare: LM logits ``(B, T, V)`` or, for encoders, the last hidden states."""
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_hidden_states=True, **kwargs)
    return out.logits if out.logits.dim() == 3 else out.hidden_states[-1]


def relative_error(out: Tensor, ref: Tensor) -> float:
    """``max |out - ref| / max |ref|`` in float64."""
    return float((out.double() - ref.double()).abs().max() / ref.double().abs().max())


def covering_options(name: str, length: int) -> dict[str, Any]:
    """Options under which exact sparse mechanism ``name`` sees every key of a ``length``-token sequence.

    The coverage is checked here, against the mechanism's own pattern, so a test using these
    options compares with full attention only when the pattern really is full.
    """
    options = {
        "full": {},
        "sliding_window": {"window": 2 * length},
        "longformer": {"window": 2 * length},
        "strided": {"stride": length},
        "fixed": {"block_size": length, "summary_size": 1},
        "bigbird": {"block_size": 4, "num_random_blocks": 0, "num_global_blocks": -(-length // 4)},
    }[name]
    mechanism = attnkit.build_attention(name, **options)
    for causal in (False, True):
        pattern = mechanism.pattern(length, length, causal=causal)
        if pattern is None:
            continue
        seen = materialize(pattern, 1, 1, length, length)[0, 0]
        full = torch.ones(length, length, dtype=torch.bool)
        assert torch.equal(seen, full.tril() if causal else full), f"{name} {options} does not cover {length} tokens"
    return options


EXACT_SPARSE = ["bigbird", "sliding_window", "fixed", "longformer", "strided"]
