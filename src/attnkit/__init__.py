"""attnkit: efficient attention for PyTorch, one interface for every mechanism.

Quick use::

    import attnkit
    attnkit.list_attention()                      # registered mechanism names
    attn = attnkit.build_attention("full")        # q, k, v: (B, H, T, D)
    mha = attnkit.MultiHeadAttention(512, 8, attention="full", rotary=True)

The names below are imported on first use (PEP 562), so ``import attnkit`` and
``attnkit --help`` do not pay for importing PyTorch; ``from attnkit import X`` and
``attnkit.X`` work for every name in ``__all__``, and type checkers see the real imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from attnkit.attention.linear import LinearAttention
    from attnkit.attention.linformer import LinformerAttention
    from attnkit.attention.lsh import LSHAttention
    from attnkit.attention.multi_head import AttentionCache, MultiHeadAttention
    from attnkit.attention.nystrom import NystromAttention
    from attnkit.attention.performer import PerformerAttention
    from attnkit.attention.reference import reference_attention
    from attnkit.attention.routing import RoutingAttention, update_routing_centroids
    from attnkit.attention.sinkhorn import SinkhornAttention
    from attnkit.attention.topk import TopKAttention, select_topk
    from attnkit.core.base import AttentionMechanism, KVState, after_optimizer_step
    from attnkit.core.capabilities import Capabilities
    from attnkit.core.registry import (
        MechanismSpec,
        accepted_options,
        attention_capabilities,
        build_attention,
        get_spec,
        list_attention,
        register,
    )
    from attnkit.kernels.buffers import release_buffers
    from attnkit.kernels.recurrent import PrefixState
    from attnkit.masks import Mask, causal_mask, full_mask, materialize, real_keys_mask
    from attnkit.models import (
        Encoder,
        EncoderDecoder,
        LanguageModel,
        SequenceClassifier,
        TransformerConfig,
        load_pretrained,
    )
    from attnkit.train import TrainConfig, Trainer

# Where each lazily exported name lives. tests/cli/test_lazy_imports.py checks that these,
# __all__ and the TYPE_CHECKING imports above name the same objects.
_EXPORTS: dict[str, str] = {
    "LinearAttention": "attnkit.attention.linear",
    "LinformerAttention": "attnkit.attention.linformer",
    "LSHAttention": "attnkit.attention.lsh",
    "AttentionCache": "attnkit.attention.multi_head",
    "MultiHeadAttention": "attnkit.attention.multi_head",
    "NystromAttention": "attnkit.attention.nystrom",
    "PerformerAttention": "attnkit.attention.performer",
    "reference_attention": "attnkit.attention.reference",
    "RoutingAttention": "attnkit.attention.routing",
    "update_routing_centroids": "attnkit.attention.routing",
    "SinkhornAttention": "attnkit.attention.sinkhorn",
    "TopKAttention": "attnkit.attention.topk",
    "select_topk": "attnkit.attention.topk",
    "AttentionMechanism": "attnkit.core.base",
    "KVState": "attnkit.core.base",
    "after_optimizer_step": "attnkit.core.base",
    "Capabilities": "attnkit.core.capabilities",
    "MechanismSpec": "attnkit.core.registry",
    "accepted_options": "attnkit.core.registry",
    "attention_capabilities": "attnkit.core.registry",
    "build_attention": "attnkit.core.registry",
    "get_spec": "attnkit.core.registry",
    "list_attention": "attnkit.core.registry",
    "register": "attnkit.core.registry",
    "PrefixState": "attnkit.kernels.recurrent",
    "release_buffers": "attnkit.kernels.buffers",
    "Mask": "attnkit.masks",
    "causal_mask": "attnkit.masks",
    "full_mask": "attnkit.masks",
    "materialize": "attnkit.masks",
    "real_keys_mask": "attnkit.masks",
    "Encoder": "attnkit.models",
    "EncoderDecoder": "attnkit.models",
    "LanguageModel": "attnkit.models",
    "SequenceClassifier": "attnkit.models",
    "TransformerConfig": "attnkit.models",
    "load_pretrained": "attnkit.models",
    "TrainConfig": "attnkit.train",
    "Trainer": "attnkit.train",
}

__all__ = [
    "AttentionCache",
    "AttentionMechanism",
    "Capabilities",
    "Encoder",
    "EncoderDecoder",
    "KVState",
    "LSHAttention",
    "LanguageModel",
    "LinearAttention",
    "LinformerAttention",
    "Mask",
    "MechanismSpec",
    "MultiHeadAttention",
    "NystromAttention",
    "PerformerAttention",
    "PrefixState",
    "RoutingAttention",
    "SequenceClassifier",
    "SinkhornAttention",
    "TopKAttention",
    "TrainConfig",
    "Trainer",
    "TransformerConfig",
    "__version__",
    "accepted_options",
    "after_optimizer_step",
    "attention_capabilities",
    "build_attention",
    "causal_mask",
    "full_mask",
    "get_spec",
    "list_attention",
    "load_pretrained",
    "materialize",
    "real_keys_mask",
    "reference_attention",
    "register",
    "release_buffers",
    "select_topk",
    "update_routing_centroids",
]


def __getattr__(name: str) -> object:
    """Import an exported name (or a subpackage, e.g. ``attnkit.masks``) on first access."""
    module_name = _EXPORTS.get(name)
    if module_name is None and name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if module_name is None:
        try:
            # ``import attnkit; attnkit.models.X`` worked when this module imported everything eagerly.
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise  # a real missing dependency inside an existing subpackage
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    # The eager package imported the built-in mechanisms before anything else, so they were
    # registered (and listed) before any user-defined one; keep that order.
    importlib.import_module("attnkit.attention")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
