"""attnkit: efficient attention for PyTorch, one interface for every mechanism.

Quick use::

    import attnkit
    attnkit.list_attention()                      # registered mechanism names
    attn = attnkit.build_attention("full")        # q, k, v: (B, H, T, D)
    mha = attnkit.MultiHeadAttention(512, 8, attention="full", rotary=True)
"""

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
from attnkit.kernels.prefix import PrefixState, release_buffers
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

__version__ = "0.1.0"

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
