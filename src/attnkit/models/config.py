"""The one configuration of every attnkit Transformer: a frozen, validated dataclass.

``TransformerConfig`` describes the encoder, the decoder-only language model, the
encoder-decoder and the sequence classifier alike; each model class reads the fields it
needs. It round-trips through JSON (``to_json``/``from_json``) and plain dicts, and every
bad value raises a ``ValueError`` naming the field, what it got and what was expected.

Attention per layer: ``attention`` is one registered mechanism name for every layer or a
list with one name per layer; ``attention_options`` is one dict for every layer, a list
with one dict per layer, or a dict keyed by mechanism name (``{"sliding_window":
{"window": 128}}``) that gives each mechanism its own options.

Per-head mixing: where a name may stand, a list of head groups may stand instead, each
``{"mechanism": NAME, "heads": N, "options": {...}}``, splitting the layer's query heads
(:mod:`attnkit.attention.head_groups`). ``attention = [{...}, {...}]`` mixes every layer;
``attention = ["full", [{...}, {...}]]`` mixes layer 1 only. A group's options are its own
table plus the options keyed by its mechanism name; options for every layer (a flat dict) or
per layer (a list) cannot say which group they belong to, so they must be empty for a mixed
layer.

Errors are :class:`ConfigFieldError` (a ``ValueError``) carrying the key path of the bad
value, e.g. ``("attention_options", "sliding_window", "windw")``, so a config file reader
can point at the exact key the user wrote.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from attnkit.attention.head_groups import HeadGroup, HeadSplitError, as_head_group, check_head_split
from attnkit.core.errors import check_choice, check_non_negative_int, check_positive_int

POSITIONS: tuple[str, ...] = ("sinusoidal", "learned", "rotary", "alibi", "t5", "none")
NORMS: tuple[str, ...] = ("layernorm", "rmsnorm")
ACTIVATIONS: tuple[str, ...] = ("gelu", "swiglu")
POOLINGS: tuple[str, ...] = ("mean", "first", "last")
#: Keys written next to the config in ``config.json`` by ``save_pretrained``; ignored on load.
METADATA_KEYS: tuple[str, ...] = ("architecture", "attnkit_version")

#: A mechanism name for every layer, one per layer, or a per-head mix (head-group tables) for every
#: layer. A per-layer list may also hold a mix (a list of tables) in place of a name; the annotation
#: leaves that nesting out so the generated configuration reference can name the type.
AttentionSpec = str | tuple[str, ...] | tuple[dict[str, Any], ...]
OptionsSpec = dict[str, Any] | tuple[dict[str, Any], ...]
#: One layer's attention as a model builds it: a mechanism name, or a per-head mix's groups.
LayerSpec = str | tuple[HeadGroup, ...]
#: A key path into the config: field names, mechanism names and per-layer list indices.
KeyPath = tuple[str | int, ...]


class ConfigFieldError(ValueError):
    """An invalid :class:`TransformerConfig` value, with the key path where it was set.

    Attributes:
        path: the path of the bad value: ``("dim",)``, ``("attention", 2)`` (layer 2 of a
            per-layer list), ``("attention_options", "windw")`` (options for every layer),
            ``("attention_options", "sliding_window", "windw")`` (options keyed by mechanism)
            or ``("attention_options", 1, "windw")`` (per-layer options).
    """

    def __init__(self, message: str, path: KeyPath) -> None:
        super().__init__(message)
        self.path = path


@contextmanager
def _field(*path: str | int) -> Iterator[None]:
    """Re-raise a plain ``ValueError`` from a check as a :class:`ConfigFieldError` at ``path``."""
    try:
        yield
    except ConfigFieldError:
        raise
    except ValueError as err:
        raise ConfigFieldError(str(err), path) from None


def _is_keyed(options: Any) -> bool:
    """True for options keyed by mechanism name (``{"sliding_window": {"window": 128}}``)."""
    from attnkit.core.registry import list_attention

    if not isinstance(options, dict) or not options:
        return False
    registered = set(list_attention())
    return all(k in registered and isinstance(v, dict) for k, v in options.items())


def _is_mix(spec: Any) -> bool:
    """True for a per-head mix: a non-empty list of head-group tables."""
    return isinstance(spec, (tuple, list)) and bool(spec) and all(isinstance(g, (dict, HeadGroup)) for g in spec)


def _group_table(group: Any) -> Any:
    """A head group as a plain table (a copy); anything else unchanged, for validation to report."""
    if isinstance(group, HeadGroup):
        return group.to_dict()
    if isinstance(group, dict):
        table = dict(group)
        if isinstance(table.get("options"), dict):
            table["options"] = dict(table["options"])
        return table
    return group


def normalize_attention(spec: Any) -> Any:
    """``attention`` with lists as tuples and head groups as tables (frozen fields, JSON-ready)."""
    if _is_mix(spec):
        return tuple(_group_table(g) for g in spec)
    if isinstance(spec, list):
        spec = tuple(spec)
    if isinstance(spec, tuple):
        return tuple(normalize_attention(layer) if _is_mix(layer) else layer for layer in spec)
    return spec


def _plain(value: Any) -> Any:
    """Nested tuples as lists and dicts copied, for JSON and TOML writers."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def is_token_shift_width(value: Any) -> bool:
    """Whether ``value`` is a valid ``token_shift``: 0 (off) or an integer kernel width of at least 2.
    Width 1 is refused: it would see no earlier token, only rescale each embedding."""
    return isinstance(value, int) and not isinstance(value, bool) and (value == 0 or value >= 2)


@dataclass(frozen=True)
class LayerAttention:
    """One layer's attention and where the config sets it.

    Attributes:
        name: the registered mechanism name; for a per-head mix, a readable label such as
            ``sliding_window(window=64)×4 + linear×4`` (not a registry name: see ``groups``).
        options: its options (empty for a mix: each group has its own).
        name_path: key path of the name (``("attention",)`` or ``("attention", i)``).
        options_path: key path of the options table (see :class:`ConfigFieldError`).
        groups: a per-head mix's groups in head order, each a :class:`LayerAttention` of one
            mechanism with its ``heads``; empty for a single mechanism.
        heads: query heads of a group (None for a whole layer).
        options_key: the config field whose options apply (``"attention_options"`` or
            ``"decoder_attention_options"``).
    """

    name: str
    options: dict[str, Any]
    name_path: KeyPath
    options_path: KeyPath
    groups: tuple[LayerAttention, ...] = ()
    heads: int | None = None
    options_key: str = "attention_options"

    def parts(self) -> tuple[LayerAttention, ...]:
        """The single mechanisms this layer runs: its groups, or itself."""
        return self.groups or (self,)

    @property
    def spec(self) -> LayerSpec:
        """What :class:`~attnkit.attention.multi_head.MultiHeadAttention` takes as ``attention``."""
        if not self.groups:
            return self.name
        return tuple(HeadGroup(g.name, g.heads or 0, g.options) for g in self.groups)


@dataclass(frozen=True)
class TransformerConfig:
    """Hyper-parameters of an attnkit Transformer.

    Attributes:
        vocab_size: number of token ids.
        dim: model width.
        depth: number of layers (the encoder's, in an encoder-decoder).
        heads: attention heads per layer.
        attention: a registered mechanism name, or one per layer (length ``depth``). Per-head
            mixing: a list of head groups ``{mechanism, heads, options}`` (their ``heads`` add up
            to ``heads``) for every layer, or such a list in place of a name in the per-layer list.
        attention_options: options for the mechanisms: one dict for every layer, a dict keyed
            by mechanism name (``{"sliding_window": {"window": 128}}``) or a list with one dict
            per layer.
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
        decoder_attention: the decoder's self-attention spec, in any form ``attention`` takes (per-head
            mixes included); default ``attention``.
        decoder_attention_options: the decoder's options; default ``attention_options``.
        cross_attention: mechanism of the decoder's cross-attention.
        cross_attention_options: its options.
        init_std: standard deviation of the normal initialisation of every linear and embedding
            weight (biases start at zero, norms at identity). GPT-2's 0.02 by default; narrow models
            learn far faster from a wider start, e.g. ``dim ** -0.5`` (the arena's width-64 quality
            models use 0.125: exact attention learns their MQAR within 120 steps, 99.4% accuracy,
            where 0.02 leaves it at 11%, measured).
        token_shift: kernel width ``k`` of a depthwise causal convolution over the token embeddings
            (0 = off; otherwise at least 2). Each embedding becomes ``sum_{j<k} w_j * e_{t-j}`` with one
            learned weight per channel and offset, where ``e_{t-j}`` is zero before the first token and
            at padded positions (so a left-padded row equals the unpadded sequence). This is the short
            convolution H3 and Based put before attention, which Zoology pairs with attention for
            recall: with ``token_shift = 2`` one attention layer can match a query to the key just
            before a value, and a 2-layer width-64 model learns 8-pair MQAR at length 128 in 400 steps
            (99.8% accuracy with ``init_std = 0.125``; 14% without the shift, measured). Applies to
            every model's token embedding (the encoder and decoder of an encoder-decoder share it);
            decoding caches keep the last ``k - 1`` embeddings, so cached generation equals
            recomputation.
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
    init_std: float = 0.02
    token_shift: int = 0

    # -- validation -----------------------------------------------------------------
    def __post_init__(self) -> None:
        for name in ("attention", "decoder_attention"):
            object.__setattr__(self, name, normalize_attention(getattr(self, name)))
        for name in ("attention_options", "decoder_attention_options"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(dict(v) if isinstance(v, dict) else v for v in value))
            elif isinstance(value, dict):
                object.__setattr__(self, name, dict(value))
        object.__setattr__(self, "cross_attention_options", dict(self.cross_attention_options))
        self._validate()

    def _validate(self) -> None:
        for name, example in (("vocab_size", 32000), ("dim", 256), ("depth", 4), ("heads", 4), ("max_len", 1024)):
            with _field(name):
                check_positive_int(name, getattr(self, name), example=example)
        with _field("ff_chunks"):
            check_positive_int("ff_chunks", self.ff_chunks, example=4)
        for name in ("kv_heads", "ff_dim", "num_classes", "decoder_depth"):
            if getattr(self, name) is not None:
                with _field(name):
                    check_positive_int(name, getattr(self, name), example=2 if name == "num_classes" else None)
        if self.kv_heads is not None and self.heads % self.kv_heads:
            raise ConfigFieldError(
                f"kv_heads must divide heads, got heads={self.heads}, kv_heads={self.kv_heads}", ("kv_heads",)
            )
        if self.dim % self.heads:
            raise ConfigFieldError(f"dim must be divisible by heads, got dim={self.dim}, heads={self.heads}", ("dim",))
        for name, choices in (("position", POSITIONS), ("norm", NORMS), ("activation", ACTIVATIONS)):
            with _field(name):
                check_choice(name, getattr(self, name), choices)
        with _field("pooling"):
            check_choice("pooling", self.pooling, POOLINGS)
        if self.position == "rotary" and self.head_dim % 2:
            raise ConfigFieldError(
                f"rotary positions need an even head dimension, got dim/heads = {self.head_dim}", ("dim",)
            )
        if self.position == "sinusoidal" and self.dim % 2:
            raise ConfigFieldError(f"sinusoidal positions need an even dim, got {self.dim}", ("dim",))
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1:
            raise ConfigFieldError(f"dropout must be a number in [0, 1), got {self.dropout!r}", ("dropout",))
        for name in ("norm_eps", "rotary_base", "init_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigFieldError(f"{name} must be a positive number, got {value!r}", (name,))
        for name in ("reversible", "tie_embeddings", "checkpointing", "bias"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigFieldError(f"{name} must be a bool, got {getattr(self, name)!r}", (name,))
        self._check_token_shift()
        if self.reversible and self.checkpointing:
            raise ConfigFieldError(
                "reversible=True already recomputes activations in backward; set checkpointing=False with it",
                ("checkpointing",),
            )
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None:
                with _field(name):
                    check_non_negative_int(name, value)
                if value >= self.vocab_size:
                    raise ConfigFieldError(f"{name} must be below vocab_size={self.vocab_size}, got {value}", (name,))
        layers = self.attention_layers(decoder=False) + self.attention_layers(decoder=True)
        self._check_keyed_options_are_used(layers)
        self._check_mechanism(
            "cross_attention",
            self.cross_attention,
            self.cross_attention_options,
            name_path=("cross_attention",),
            options_path=("cross_attention_options",),
        )

    def _check_token_shift(self) -> None:
        value = self.token_shift
        if isinstance(value, bool):
            # The field was a bool (True meant a width-2 shift) before it became the kernel width.
            raise ConfigFieldError(
                f"token_shift is the convolution's kernel width (an integer), got {value!r}; "
                f"use token_shift={2 if value else 0} ({'a width-2 shift' if value else 'off'})",
                ("token_shift",),
            )
        if not is_token_shift_width(value):
            raise ConfigFieldError(
                f"token_shift must be 0 (off) or a kernel width of at least 2, got {value!r} "
                "(token_shift=2 lets each token see the one before it)",
                ("token_shift",),
            )

    def _check_keyed_options_are_used(self, layers: list[LayerAttention]) -> None:
        """Options keyed by a mechanism no layer uses would be dropped silently: refuse them."""
        for key in ("attention_options", "decoder_attention_options"):
            options = getattr(self, key)
            if not _is_keyed(options):
                continue
            used = {part.name for layer in layers if layer.options_key == key for part in layer.parts()}
            unused = sorted(set(options) - used)
            if unused:
                names = sorted({part.name for layer in layers for part in layer.parts()})
                raise ConfigFieldError(
                    f"{key} sets options for {unused}, but no layer uses {'it' if len(unused) == 1 else 'them'} "
                    f"(the layers use {names}); remove those options or choose that attention",
                    (key, unused[0]),
                )

    def _check_mechanism(
        self, field_name: str, name: Any, options: dict[str, Any], *, name_path: KeyPath, options_path: KeyPath
    ) -> None:
        from attnkit.core.registry import accepted_options, attention_capabilities

        if not isinstance(name, str):
            raise ConfigFieldError(f"{field_name} must be a mechanism name (str), got {name!r}", name_path)
        try:
            caps = attention_capabilities(name)
        except ValueError as err:
            raise ConfigFieldError(f"{field_name}: {err}", name_path) from None
        if not isinstance(options, dict):
            raise ConfigFieldError(f"{field_name} options must be a dict, got {type(options).__name__}", options_path)
        accepted = accepted_options(name)
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            listing = ", ".join(accepted) or "none"
            close = difflib.get_close_matches(unknown[0], list(accepted), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigFieldError(
                f"{field_name}: attention {name!r} has no option(s) {unknown}{hint}; accepted: {listing}",
                (*options_path, unknown[0]),
            )
        if self.position in ("alibi", "t5") and field_name != "cross_attention" and not caps.score_bias:
            raise ConfigFieldError(
                f"{field_name}: attention {name!r} does not accept additive score biases, so position="
                f"{self.position!r} cannot be used with it (use position='rotary')",
                ("position",),
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

    def layer_attention(self, *, decoder: bool = False) -> list[tuple[LayerSpec, dict[str, Any]]]:
        """``(mechanism name, options)`` of every layer of the encoder (or the decoder); for a
        per-head mix, ``(its HeadGroup tuple, {})`` (each group carries its options).

        Raises:
            ConfigFieldError: a list of the wrong length, an unknown mechanism or option.
        """
        return [(layer.spec, layer.options) for layer in self.attention_layers(decoder=decoder)]

    def attention_layers(self, *, decoder: bool = False) -> list[LayerAttention]:
        """Every layer's mechanism and options, with the key paths that set them.

        A decoder without its own ``decoder_attention`` (``_options``) inherits the encoder's,
        and its paths say so (``("attention",)``, ``("attention_options", ...)``).

        Raises:
            ConfigFieldError: a list of the wrong length, an unknown mechanism or option.
        """
        depth = self.num_decoder_layers if decoder else self.depth
        own_spec = decoder and self.decoder_attention is not None
        own_options = decoder and self.decoder_attention_options is not None
        spec: Any = self.decoder_attention if own_spec else self.attention
        options: Any = self.decoder_attention_options if own_options else self.attention_options
        spec_key = "decoder_attention" if own_spec else "attention"
        options_key = "decoder_attention_options" if own_options else "attention_options"
        prefix = "decoder_attention" if decoder else "attention"
        name_paths: list[KeyPath]
        if isinstance(spec, str) or _is_mix(spec):
            specs, name_paths = [spec] * depth, [(spec_key,)] * depth
        elif isinstance(spec, tuple) and len(spec) == depth:
            specs, name_paths = list(spec), [(spec_key, i) for i in range(depth)]
        else:
            raise ConfigFieldError(
                f"{prefix} must be a mechanism name or a list of {depth} names (one per layer); a list of head "
                f"groups (a per-head mix) may stand for any name; got {spec!r}",
                (spec_key,),
            )
        per_layer = self._options_per_layer(f"{prefix}_options", options, specs, options_key)
        layers = []
        for i, (layer_spec, (opts, opts_path), name_path) in enumerate(zip(specs, per_layer, name_paths)):
            label = f"{prefix}[{i}]"
            if _is_mix(layer_spec):
                layers.append(self._mixed_layer(label, layer_spec, opts, opts_path, name_path, options, options_key))
                continue
            layer = LayerAttention(layer_spec, opts, name_path, opts_path, options_key=options_key)
            self._check_mechanism(label, layer.name, layer.options, name_path=name_path, options_path=opts_path)
            layers.append(layer)
        return layers

    def _mixed_layer(
        self,
        label: str,
        groups: tuple[Any, ...],
        layer_options: dict[str, Any],
        layer_options_path: KeyPath,
        name_path: KeyPath,
        options: Any,
        options_key: str,
    ) -> LayerAttention:
        """A per-head mix's layer: each group checked (mechanism, options, heads) and the split checked."""
        if layer_options:
            # A flat or per-layer options table cannot say which group it is for: refuse, never guess or drop.
            raise ConfigFieldError(
                f"{label} is a per-head mix, so {options_key} for the whole layer cannot say which head group "
                f"they are for (got {sorted(layer_options)}); put them in each group's options table, "
                "or key them by mechanism name",
                layer_options_path,
            )
        keyed = options if _is_keyed(options) else {}
        parts = []
        for g, table in enumerate(groups):
            group_path = (*name_path, g)
            with _field(*group_path):
                group = as_head_group(table, g)
            own_path = (*group_path, "options")
            where = f"{label} head group {g}"
            self._check_mechanism(
                where, group.mechanism, dict(group.options), name_path=(*group_path, "mechanism"), options_path=own_path
            )
            shared = dict(keyed.get(group.mechanism, {}))
            if shared:
                shared_path: KeyPath = (options_key, group.mechanism)
                self._check_mechanism(
                    where, group.mechanism, shared, name_path=(*group_path, "mechanism"), options_path=shared_path
                )
            clash = sorted(set(shared) & set(group.options))
            if clash:
                raise ConfigFieldError(
                    f"{where}: option(s) {clash} are set both in the group's options and in "
                    f"{options_key}.{group.mechanism}; set each in one place",
                    (*own_path, clash[0]),
                )
            parts.append(
                LayerAttention(
                    group.mechanism,
                    {**shared, **group.options},
                    (*group_path, "mechanism"),
                    own_path,
                    heads=group.heads,
                    options_key=options_key,
                )
            )
        try:
            check_head_split([p.heads or 0 for p in parts], self.heads, self.kv_heads or self.heads)
        except HeadSplitError as err:
            path = name_path if err.group is None else (*name_path, err.group, "heads")
            raise ConfigFieldError(f"{label}: {err}", path) from None
        name = " + ".join(HeadGroup(p.name, p.heads or 0, p.options).label for p in parts)
        return LayerAttention(name, {}, name_path, layer_options_path, groups=tuple(parts), options_key=options_key)

    @staticmethod
    def _options_per_layer(
        label: str, options: Any, specs: list[Any], key: str
    ) -> list[tuple[dict[str, Any], KeyPath]]:
        if isinstance(options, tuple):
            if len(options) != len(specs) or not all(isinstance(o, dict) for o in options):
                raise ConfigFieldError(
                    f"{label} as a list needs {len(specs)} dicts (one per layer), got {list(options)!r}", (key,)
                )
            return [(dict(o), (key, i)) for i, o in enumerate(options)]
        if not isinstance(options, dict):
            raise ConfigFieldError(f"{label} must be a dict or a list of dicts, got {type(options).__name__}", (key,))
        if _is_keyed(options):
            # A mix's groups read the keyed options themselves (see _mixed_layer).
            return [
                (dict(options.get(spec, {})), (key, spec)) if isinstance(spec, str) else ({}, (key,)) for spec in specs
            ]
        return [(dict(options), (key,)) for _ in specs]

    # -- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = _plain(value)
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
        fields = {k: v for k, v in data.items() if k in names}
        if fields.get("token_shift") is False:
            # Saved while the field was a bool: False (off) is unambiguous and loads as 0. A saved True is
            # still refused (it had another layer's weights), with the message saying what to use.
            fields["token_shift"] = 0
        return cls(**fields)

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
