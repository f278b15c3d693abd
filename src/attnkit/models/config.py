"""The one configuration of every attnkit Transformer: a frozen, validated dataclass.

``TransformerConfig`` describes the encoder, the decoder-only language model, the
encoder-decoder and the sequence classifier alike; each model class reads the fields it
needs. It round-trips through JSON (``to_json``/``from_json``) and plain dicts, and every
bad value raises a ``ValueError`` naming the field, what it got and what was expected.

Attention per layer: ``attention`` is one registered mechanism name for every layer or a
list with one name per layer; ``attention_options`` is one dict for every layer, a list
with one dict per layer, or a dict keyed by mechanism name (``{"sliding_window":
{"window": 128}}``) that gives each mechanism its own options.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from attnkit.core.errors import check_choice, check_non_negative_int, check_positive_int

POSITIONS: tuple[str, ...] = ("sinusoidal", "learned", "rotary", "alibi", "t5", "none")
NORMS: tuple[str, ...] = ("layernorm", "rmsnorm")
ACTIVATIONS: tuple[str, ...] = ("gelu", "swiglu")
POOLINGS: tuple[str, ...] = ("mean", "first", "last")
#: Keys written next to the config in ``config.json`` by ``save_pretrained``; ignored on load.
METADATA_KEYS: tuple[str, ...] = ("architecture", "attnkit_version")

AttentionSpec = str | tuple[str, ...]
OptionsSpec = dict[str, Any] | tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class TransformerConfig:
    """Hyper-parameters of an attnkit Transformer.

    Attributes:
        vocab_size: number of token ids.
        dim: model width.
        depth: number of layers (the encoder's, in an encoder-decoder).
        heads: attention heads per layer.
        attention: a registered mechanism name, or one per layer (length ``depth``).
        attention_options: options for the mechanisms (see the module docstring).
        max_len: longest sequence the model is meant for (the table size of learned positions).
        position: ``"sinusoidal"``, ``"learned"`` (added to the embeddings), ``"rotary"``
            (queries/keys), ``"alibi"``, ``"t5"`` (score biases) or ``"none"``.
        reversible: Reformer's reversible residual layers (activations recomputed in backward).
        ff_chunks: split the feed-forward over the sequence into this many chunks.
        dropout: dropout on embeddings and on every residual branch.
        num_classes: classes of :class:`SequenceClassifier` (None for other models).
        pad_token_id: id of the padding token (used to fill finished generations).
        kv_heads: key/value heads (grouped-query attention); default ``heads``.
        ff_dim: feed-forward hidden width; default ``4 * dim`` (GELU) or about
            ``8/3 * dim`` rounded up to a multiple of 8 (SwiGLU, same parameter count).
        activation: ``"gelu"`` or ``"swiglu"``.
        norm: ``"layernorm"`` or ``"rmsnorm"`` (pre-norm on every branch and at the end).
        norm_eps: epsilon of the norms.
        tie_embeddings: share the output projection with the token embedding.
        checkpointing: recompute each layer's activations in backward (not with ``reversible``).
        bias: biases in the attention projections.
        rotary_base: frequency base of rotary embeddings.
        pooling: classifier pooling over real tokens: ``"mean"``, ``"first"`` or ``"last"``.
        bos_token_id: start token of generation (the decoder's first input in seq2seq).
        eos_token_id: end token: generation of a row stops there.
        decoder_depth: decoder layers of :class:`EncoderDecoder`; default ``depth``.
        decoder_attention: the decoder's self-attention spec; default ``attention``.
        decoder_attention_options: the decoder's options; default ``attention_options``.
        cross_attention: mechanism of the decoder's cross-attention.
        cross_attention_options: its options.
    """

    vocab_size: int
    dim: int = 256
    depth: int = 4
    heads: int = 4
    attention: AttentionSpec = "full"
    attention_options: OptionsSpec = field(default_factory=dict)
    max_len: int = 1024
    position: str = "rotary"
    reversible: bool = False
    ff_chunks: int = 1
    dropout: float = 0.0
    num_classes: int | None = None
    pad_token_id: int | None = None
    kv_heads: int | None = None
    ff_dim: int | None = None
    activation: str = "gelu"
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    checkpointing: bool = False
    bias: bool = False
    rotary_base: float = 10000.0
    pooling: str = "mean"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    decoder_depth: int | None = None
    decoder_attention: AttentionSpec | None = None
    decoder_attention_options: OptionsSpec | None = None
    cross_attention: str = "full"
    cross_attention_options: dict[str, Any] = field(default_factory=dict)

    # -- validation -----------------------------------------------------------------
    def __post_init__(self) -> None:
        for name in ("attention", "decoder_attention"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        for name in ("attention_options", "decoder_attention_options"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(dict(v) if isinstance(v, dict) else v for v in value))
            elif isinstance(value, dict):
                object.__setattr__(self, name, dict(value))
        object.__setattr__(self, "cross_attention_options", dict(self.cross_attention_options))
        self._validate()

    def _validate(self) -> None:
        check_positive_int("vocab_size", self.vocab_size, example=32000)
        check_positive_int("dim", self.dim, example=256)
        check_positive_int("depth", self.depth, example=4)
        check_positive_int("heads", self.heads, example=4)
        check_positive_int("max_len", self.max_len, example=1024)
        check_positive_int("ff_chunks", self.ff_chunks, example=4)
        if self.kv_heads is not None:
            check_positive_int("kv_heads", self.kv_heads)
            if self.heads % self.kv_heads:
                raise ValueError(f"kv_heads must divide heads, got heads={self.heads}, kv_heads={self.kv_heads}")
        if self.dim % self.heads:
            raise ValueError(f"dim must be divisible by heads, got dim={self.dim}, heads={self.heads}")
        if self.ff_dim is not None:
            check_positive_int("ff_dim", self.ff_dim)
        check_choice("position", self.position, POSITIONS)
        check_choice("norm", self.norm, NORMS)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("pooling", self.pooling, POOLINGS)
        if self.position == "rotary" and self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head dimension, got dim/heads = {self.head_dim}")
        if self.position == "sinusoidal" and self.dim % 2:
            raise ValueError(f"sinusoidal positions need an even dim, got {self.dim}")
        for name in ("dropout",):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
        for name in ("norm_eps", "rotary_base"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        for name in ("reversible", "tie_embeddings", "checkpointing", "bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.reversible and self.checkpointing:
            raise ValueError(
                "reversible=True already recomputes activations in backward; set checkpointing=False with it"
            )
        if self.num_classes is not None:
            check_positive_int("num_classes", self.num_classes, example=2)
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None:
                check_non_negative_int(name, value)
                if value >= self.vocab_size:
                    raise ValueError(f"{name} must be below vocab_size={self.vocab_size}, got {value}")
        if self.decoder_depth is not None:
            check_positive_int("decoder_depth", self.decoder_depth)
        self.layer_attention(decoder=False)
        self.layer_attention(decoder=True)
        self._check_mechanism("cross_attention", self.cross_attention, self.cross_attention_options)

    def _check_mechanism(self, field_name: str, name: Any, options: dict[str, Any]) -> None:
        from attnkit.core.registry import accepted_options, attention_capabilities

        if not isinstance(name, str):
            raise ValueError(f"{field_name} must be a mechanism name (str), got {name!r}")
        try:
            caps = attention_capabilities(name)
        except ValueError as err:
            raise ValueError(f"{field_name}: {err}") from None
        if not isinstance(options, dict):
            raise ValueError(f"{field_name} options must be a dict, got {type(options).__name__}")
        accepted = accepted_options(name)
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            listing = ", ".join(accepted) or "none"
            raise ValueError(f"{field_name}: attention {name!r} has no option(s) {unknown}; accepted: {listing}")
        if self.position in ("alibi", "t5") and field_name != "cross_attention" and not caps.score_bias:
            raise ValueError(
                f"{field_name}: attention {name!r} does not accept additive score biases, so position="
                f"{self.position!r} cannot be used with it (use position='rotary')"
            )

    # -- derived values ---------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        """Per-head width ``dim // heads``."""
        return self.dim // self.heads

    @property
    def hidden_dim(self) -> int:
        """Feed-forward hidden width (``ff_dim`` or its default)."""
        if self.ff_dim is not None:
            return self.ff_dim
        if self.activation == "swiglu":
            return 8 * ((8 * self.dim // 3 + 7) // 8)
        return 4 * self.dim

    @property
    def num_decoder_layers(self) -> int:
        """Decoder depth of an encoder-decoder."""
        return self.decoder_depth if self.decoder_depth is not None else self.depth

    def layer_attention(self, *, decoder: bool = False) -> list[tuple[str, dict[str, Any]]]:
        """``(mechanism name, options)`` of every layer of the encoder (or the decoder).

        Raises:
            ValueError: a list of the wrong length, an unknown mechanism or option.
        """
        if decoder:
            depth = self.num_decoder_layers
            spec: Any = self.decoder_attention if self.decoder_attention is not None else self.attention
            options: Any = (
                self.decoder_attention_options if self.decoder_attention_options is not None else self.attention_options
            )
            prefix = "decoder_attention"
        else:
            depth, spec, options, prefix = self.depth, self.attention, self.attention_options, "attention"
        if isinstance(spec, str):
            names = [spec] * depth
        elif isinstance(spec, tuple) and len(spec) == depth:
            names = list(spec)
        else:
            raise ValueError(
                f"{prefix} must be a mechanism name or a list of {depth} names (one per layer), got {spec!r}"
            )
        per_layer = self._options_per_layer(prefix, options, names)
        for i, (name, opts) in enumerate(zip(names, per_layer)):
            self._check_mechanism(f"{prefix}[{i}]", name, opts)
        return list(zip(names, per_layer))

    @staticmethod
    def _options_per_layer(prefix: str, options: Any, names: list[str]) -> list[dict[str, Any]]:
        from attnkit.core.registry import list_attention

        if isinstance(options, tuple):
            if len(options) != len(names) or not all(isinstance(o, dict) for o in options):
                raise ValueError(
                    f"{prefix}_options as a list needs {len(names)} dicts (one per layer), got {list(options)!r}"
                )
            return [dict(o) for o in options]
        if not isinstance(options, dict):
            raise ValueError(f"{prefix}_options must be a dict or a list of dicts, got {type(options).__name__}")
        registered = set(list_attention())
        if options and all(k in registered and isinstance(v, dict) for k, v in options.items()):
            return [dict(options.get(name, {})) for name in names]  # keyed by mechanism name
        return [dict(options) for _ in names]

    # -- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = [dict(v) if isinstance(v, dict) else v for v in value]
            elif isinstance(value, dict):
                value = dict(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TransformerConfig:
        """Build a config from :meth:`to_dict`'s output (metadata keys of ``config.json`` are skipped).

        Raises:
            ValueError: unknown keys (listed, with the accepted ones) or invalid values.
        """
        if not isinstance(data, dict):
            raise ValueError(f"config data must be a dict, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names - set(METADATA_KEYS))
        if unknown:
            raise ValueError(f"unknown TransformerConfig field(s) {unknown}; accepted: {', '.join(sorted(names))}")
        if "vocab_size" not in data:
            raise ValueError("config data must contain 'vocab_size'")
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_json(self, *, indent: int | None = 2) -> str:
        """The config as a JSON string."""
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TransformerConfig:
        """Parse :meth:`to_json`'s output.

        Raises:
            ValueError: malformed JSON or invalid fields.
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"config is not valid JSON: {err}") from None
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> TransformerConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
