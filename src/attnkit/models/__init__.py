"""One Transformer family on any registered attention mechanism.

``TransformerConfig`` describes it; ``Encoder``, ``LanguageModel``, ``EncoderDecoder`` and
``SequenceClassifier`` build it. Every model saves to ``config.json`` + ``model.safetensors``
(``save_pretrained``) and loads back with ``from_pretrained``.
"""

from attnkit.models.cache import ModelCache, reorder_batch
from attnkit.models.config import TransformerConfig
from attnkit.models.pretrained import PreTrainedModel, load_pretrained
from attnkit.models.transformer import Encoder, EncoderDecoder, LanguageModel, SequenceClassifier

__all__ = [
    "Encoder",
    "EncoderDecoder",
    "LanguageModel",
    "ModelCache",
    "PreTrainedModel",
    "SequenceClassifier",
    "TransformerConfig",
    "load_pretrained",
    "reorder_batch",
]
