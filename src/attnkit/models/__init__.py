"""One Transformer family on any registered attention mechanism.

``TransformerConfig`` describes it; ``Encoder``, ``LanguageModel``, ``EncoderDecoder`` and
``SequenceClassifier`` build it. Every model saves to ``config.json`` + ``model.safetensors``
(``save_pretrained``) and loads back with ``from_pretrained``.

Example::

    import attnkit
    cfg = attnkit.TransformerConfig(
        vocab_size=260, dim=256, depth=8, heads=4,
        attention=["sliding_window"] * 3 + ["full"] + ["sliding_window"] * 3 + ["full"],
        attention_options={"sliding_window": {"window": 128}},
        position="rotary", reversible=True, ff_chunks=4,
    )
    model = attnkit.LanguageModel(cfg)
    logits = model(input_ids, attention_mask=mask)          # (B, T, V)
    out = model.generate(prompt_ids, 64, top_p=0.9, temperature=0.8)
    model.save_pretrained("runs/lm")
"""

from attnkit.models.cache import ModelCache, reorder_batch
from attnkit.models.config import TransformerConfig
from attnkit.models.pretrained import PreTrainedModel, load_pretrained
from attnkit.models.transformer import Encoder, EncoderDecoder, LanguageModel, MaskedLanguageModel, SequenceClassifier

__all__ = [
    "Encoder",
    "EncoderDecoder",
    "LanguageModel",
    "MaskedLanguageModel",
    "ModelCache",
    "PreTrainedModel",
    "SequenceClassifier",
    "TransformerConfig",
    "load_pretrained",
    "reorder_batch",
]
