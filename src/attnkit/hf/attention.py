"""The attention function the bridge registers in Transformers' ``AttentionInterface``.

Transformers calls it from each attention layer as
``fn(module, query, key, value, attention_mask, dropout=..., scaling=..., **kwargs)`` with
``query (B, H, T, D)``, ``key``/``value`` ``(B, H_kv, S, D)`` after rotary embeddings and the KV
cache update, and expects ``(B, T, H, D)`` plus attention weights (always None here).

``attention_mask`` is the :class:`~attnkit.hf.masks.MaskLayout` built by
:func:`~attnkit.hf.masks.bridge_mask`, so causality, the sliding window and key padding reach
the mechanism as ``causal=``, ``mask=`` and ``attention_mask=``. Every other option the model
passes is either harmless bookkeeping (listed in ``_BOOKKEEPING``), checked to agree, or
refused: attention weights, dropout the mechanism cannot apply, a score scale it cannot use,
and anything unknown. A cache layer that keeps the mechanism's own decoding state
(:mod:`attnkit.hf.cache`) arrives under :data:`STATE_KEYWORD`: the keys are then only the new
tokens, and the mechanism continues from its state.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from collections.abc import Callable
from typing import Any, Protocol

from torch import Tensor, nn
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from attnkit.attention.pattern import window_extent
from attnkit.attention.sliding_window import SlidingWindowAttention
from attnkit.core.base import AttentionMechanism, KVState
from attnkit.core.registry import accepted_options, build_attention, get_spec
from attnkit.hf.families import Family, family_of, layer_index
from attnkit.hf.masks import MaskLayout, layout_from_dense
from attnkit.masks.functions import Mask, sliding_window_mask

_active_collector: Any
try:  # where Transformers records requested outputs (output_attentions=True) during a forward
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # pragma: no cover - another layout: fall back on the keyword argument
    _active_collector = None

#: The submodule name a mechanism gets on the attention layer (so ``...self_attn.attnkit.proj_k``).
MECHANISM_ATTRIBUTE = "attnkit"
#: Prefix of the implementation names registered with Transformers.
PREFIX = "attnkit_"
#: The keyword under which a cache layer holding attnkit decoding state (``attnkit.hf.cache``)
#: hands itself to the attention function, through the keyword dictionary the attention layer
#: passes to both ``cache.update(..., kwargs=...)`` and its attention function.
STATE_KEYWORD = "attnkit_decoding_state"
#: Keyword arguments the layers pass that do not change the attention's result.
_BOOKKEEPING = frozenset({"position_ids", "use_cache", "encoder_hidden_states", "output_hidden_states", "return_dict"})


@functools.cache
def _option_names(name: str) -> frozenset[str]:
    # Read once per mechanism: the checks run in every layer at every decoding step.
    return frozenset(accepted_options(name))


def mechanism_name(implementation: str | None) -> str | None:
    """``"linear"`` for ``"attnkit_linear"``; None for any other implementation name."""
    if isinstance(implementation, str) and implementation.startswith(PREFIX):
        return implementation[len(PREFIX) :]
    return None


def build_for_layer(name: str, options: dict[str, Any], module: nn.Module, family: Family) -> AttentionMechanism:
    """Build mechanism ``name`` for one attention layer, matching what the layer computes.

    The layer's score scale becomes the mechanism's ``scale`` when it is not ``1/sqrt(head_dim)``
    (GPT-2's ``scale_attn_by_inverse_layer_idx``) and its attention dropout becomes the
    mechanism's ``dropout``, for mechanisms that have those options and were not given them.

    Raises:
        ValueError: every reason the layer cannot use the mechanism (no causal form on a causal
            layer, a score scale it cannot apply), in one message.
        TypeError: an unknown option (from :func:`attnkit.build_attention`).
    """
    spec_options = dict(options)
    accepted = _option_names(name)
    reasons = []
    default_scale = family.head_dim(module) ** -0.5
    layer_scale = float(getattr(module, "scaling", default_scale))
    if not math.isclose(layer_scale, default_scale, rel_tol=1e-6):
        if "scale" not in accepted:
            reasons.append(
                f"the layer scales scores by {layer_scale:g}, not 1/sqrt(head_dim) = {default_scale:g}, "
                f"and {name!r} has no scale option"
            )
        elif spec_options.get("scale") is None:
            spec_options["scale"] = layer_scale
    given_scale = spec_options.get("scale")
    if given_scale is not None and not math.isclose(float(given_scale), layer_scale, rel_tol=1e-6):
        reasons.append(f"scale={given_scale!r} differs from the layer's own score scale {layer_scale:g}")
    dropout = family.dropout(module)
    if dropout > 0 and "dropout" in accepted and "dropout" not in spec_options:
        spec_options["dropout"] = dropout
    spec = get_spec(name)
    if layer_is_causal(module) and not spec.capabilities.causal:
        reasons.append(
            f"{spec.cls.no_causal_reason}, and {type(module).__name__} is a causal (decoder) layer; "
            "use it on a bidirectional encoder such as BERT"
        )
    if reasons:
        raise ValueError(
            f"attnkit.hf cannot put {name!r} into layer {layer_index(module)} ({type(module).__name__}): "
            + "; ".join(reasons)
        )
    mechanism = build_attention(name, **spec_options)
    parameter = next(module.parameters(), None)
    if parameter is not None:
        mechanism.to(parameter.device)  # own dtypes kept: mechanisms choose their state's precision
    mechanism.train(module.training)
    return mechanism


def layer_is_causal(module: nn.Module) -> bool:
    """Whether an attention layer is causal (a decoder layer, unless its config says otherwise)."""
    return bool(getattr(module, "is_causal", False)) and bool(getattr(module.config, "is_causal", True))


def attach(module: nn.Module, mechanism: AttentionMechanism | None) -> None:
    """Make ``mechanism`` a submodule of ``module`` (or remove the current one with None)."""
    if MECHANISM_ATTRIBUTE in module._modules:
        del module._modules[MECHANISM_ATTRIBUTE]
    if mechanism is not None:
        module.add_module(MECHANISM_ATTRIBUTE, mechanism)


def attached(module: nn.Module) -> AttentionMechanism | None:
    """The mechanism attached to an attention layer, if any."""
    found = module._modules.get(MECHANISM_ATTRIBUTE)
    return found if isinstance(found, AttentionMechanism) else None


def _mechanism_for(module: nn.Module) -> AttentionMechanism | None:
    """The layer's mechanism; built on first use for ``attn_implementation="attnkit_<name>"``.

    Returns None for layers that keep Transformers' attention (other layers of a hybrid,
    cross-attention).
    """
    mechanism = attached(module)
    if mechanism is not None:
        return mechanism
    config: Any = module.config
    family = family_of(config)
    if not family.is_self_attention(module):
        return None
    spec = getattr(config, "attnkit", None)
    spec = spec if isinstance(spec, dict) else {}
    layers = spec.get("layers")
    if layers is not None and layer_index(module) not in layers:
        return None
    name = mechanism_name(config._attn_implementation)
    if name is None:  # pragma: no cover - only reachable if called outside Transformers' dispatch
        raise ValueError(f"attnkit.hf attention called with attn_implementation={config._attn_implementation!r}")
    options = spec.get("options", {}) if spec.get("mechanism") == name else {}
    mechanism = build_for_layer(name, options, module, family)
    if mechanism.state_dict():
        raise ValueError(
            f"attn_implementation='attnkit_{name}' cannot build {name!r} inside a model Transformers has built: it "
            f"keeps parameters or buffers ({', '.join(mechanism.state_dict())}) that must be created before "
            f"weights are loaded and must train with the model; use attnkit.hf.apply(model, {name!r}, ...) on a "
            "built model, or attnkit.hf.load(directory) for a saved one"
        )
    attach(module, mechanism)
    return mechanism


class DecodingState(Protocol):
    """A cache layer that keeps a mechanism's decoding state (``attnkit.hf.cache.MechanismStateLayer``)."""

    def step(
        self, mechanism: AttentionMechanism, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None
    ) -> Tensor: ...


def _base_attention(module: nn.Module, base: str) -> Callable[..., Any]:
    if base == "eager":  # each model file defines its own eager function
        found = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if found is None:
            raise ValueError(f"{type(module).__module__} defines no eager_attention_forward for base 'eager'")
        return found
    return ALL_ATTENTION_FUNCTIONS[base]


def _attentions_requested(kwargs: dict[str, Any]) -> bool:
    if kwargs.get("output_attentions"):
        return True
    if _active_collector is None:
        return False
    collected = _active_collector.get()
    return isinstance(collected, dict) and "attentions" in collected


def bridge_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """The ``AttentionInterface`` function registered under every ``attnkit_<mechanism>`` name.

    Args:
        module: the Transformers attention layer (its mechanism is ``module.attnkit``).
        query: ``(B, H, T, D)``.
        key: ``(B, H_kv, S, D)``; ``H_kv`` divides ``H`` (grouped-query attention).
        value: ``(B, H_kv, S, Dv)``.
        attention_mask: a :class:`MaskLayout` from :func:`bridge_mask`, or a ready 4-D mask.
        dropout: attention-probability dropout the layer asks for (non-zero only in training).
        scaling: the layer's score scale.
        **kwargs: everything else the layer passes (checked; see the module docstring).

    Returns:
        ``(B, T, H, Dv)`` and None (no attention weights).

    Raises:
        ValueError: every reason the call cannot be honoured exactly, in one message.
    """
    state = kwargs.pop(STATE_KEYWORD, None)
    mechanism = _mechanism_for(module)
    if mechanism is None:
        if state is not None:
            raise ValueError(
                f"attnkit.hf: layer {layer_index(module)} ({type(module).__name__}) keeps Transformers' attention but "
                "the cache holds an attnkit decoding state for it (the cache was built for another choice of "
                "layers); start a new cache with attnkit.hf.new_cache(model)"
            )
        base = attention_mask.base if isinstance(attention_mask, MaskLayout) else _spec_base(module)
        mask = attention_mask.base_mask() if isinstance(attention_mask, MaskLayout) else attention_mask
        return _base_attention(module, base)(
            module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs
        )
    layout = _layout(attention_mask, kwargs)
    if state is not None:
        layout = _new_tokens(layout, query.shape[2])
    window_mask, reasons = _check(module, mechanism, query, key, layout, dropout, scaling, kwargs, state is not None)
    if reasons:
        raise ValueError(
            f"attnkit.hf: layer {layer_index(module)} ({type(module).__name__}) cannot run attention "
            f"{mechanism.name!r} here: " + "; ".join(reasons)
        )
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)  # (B, H, S, D): one key head per query head
    out = _attend(mechanism, query, key, value, layout, window_mask, state)
    return out.transpose(1, 2).contiguous(), None


def _new_tokens(layout: MaskLayout, t_len: int) -> MaskLayout:
    """The layout of a step that sees only its ``t`` new keys (its past lives in a decoding state).

    The mask may have been sized for another cache layer (a hybrid's full-attention layers see
    every key); a causal mask ends its keys at the last query, so the new tokens are its last
    ``t`` keys whatever the sizing.
    """
    if not layout.causal or layout.q_length != t_len or layout.kv_length < t_len:
        return layout  # _check refuses it with the shapes in the message
    padding = layout.padding
    if padding is not None:
        padding = padding[:, -t_len:]
        padding = None if bool(padding.all()) else padding
    return dataclasses.replace(layout, padding=padding, kv_length=t_len, kv_offset=layout.q_offset)


def _spec_base(module: nn.Module) -> str:
    spec = getattr(module.config, "attnkit", None)
    return str(spec.get("base_attn_implementation", "sdpa")) if isinstance(spec, dict) else "sdpa"


def _layout(attention_mask: Any, kwargs: dict[str, Any]) -> MaskLayout:
    if isinstance(attention_mask, MaskLayout):
        return attention_mask
    if isinstance(attention_mask, Tensor):
        return layout_from_dense(attention_mask, window=kwargs.get("sliding_window"))
    raise ValueError(
        f"attnkit.hf got attention_mask={type(attention_mask).__name__} instead of the mask layout its mask "
        "builder makes; the model did not build its mask through Transformers' masking_utils, so causality and "
        "padding are unknown"
    )


def _check(
    module: nn.Module,
    mechanism: AttentionMechanism,
    query: Tensor,
    key: Tensor,
    layout: MaskLayout,
    dropout: float,
    scaling: float | None,
    kwargs: dict[str, Any],
    stateful: bool = False,
) -> tuple[Mask | None, list[str]]:
    """The causal-window mask to pass (or None) and every reason the call cannot be honoured.

    ``stateful``: the keys are only the new tokens and the mechanism's decoding state holds
    every earlier position (from position 0), which the model's window must also account for.
    """
    reasons = _check_options(module, mechanism, query, layout, dropout, scaling, kwargs)
    if stateful and not layout.causal:
        reasons.append(f"a decoding state needs a causal mask, got {layout.describe()}")
    b, heads, t_len, _ = query.shape
    s_len = key.shape[2]
    if (t_len, s_len) != (layout.q_length, layout.kv_length) or (
        layout.padding is not None and layout.padding.shape[0] != b
    ):
        reasons.append(f"the mask was built for another shape ({layout.describe()}), got T={t_len}, S={s_len}")
    if heads % key.shape[1]:
        reasons.append(f"{key.shape[1]} key/value heads do not divide {heads} query heads")
    window_mask = None
    if layout.window is not None:
        # A decoding state remembers every position from the first, whatever the mask's offset.
        seen = dataclasses.replace(layout, kv_offset=0) if stateful else layout
        window_mask, reason = _window(mechanism, seen, t_len, s_len)
        if reason:
            reasons.append(reason)
        elif stateful and window_mask is not None:  # pragma: no cover - state mechanisms take no custom mask
            reasons.append("a windowed mask cannot be passed to a decoding state")
    if t_len < s_len:
        reasons += _decode_reasons(mechanism, layout, window_mask)
    return window_mask, reasons


def _check_options(
    module: nn.Module,
    mechanism: AttentionMechanism,
    query: Tensor,
    layout: MaskLayout,
    dropout: float,
    scaling: float | None,
    kwargs: dict[str, Any],
) -> list[str]:
    reasons = []
    if _attentions_requested(kwargs):
        reasons.append("attention weights were requested (output_attentions=True) and attnkit mechanisms return none")
    for key, val in sorted(kwargs.items()):
        if key in _BOOKKEEPING or key == "output_attentions" or val is None or val is False:
            continue
        if key == "is_causal":
            if bool(val) != layout.causal:
                reasons.append(f"the layer asks for is_causal={val} but its mask is {layout.describe()}")
        elif key == "sliding_window":
            if layout.window != val:
                reasons.append(f"the layer declares sliding_window={val} but its mask is {layout.describe()}")
        else:
            reasons.append(f"the layer passes {key}= to its attention, which attnkit mechanisms do not take")
    if dropout:
        own = getattr(mechanism, "dropout", None) if "dropout" in _option_names(mechanism.name) else None
        if own is None or not math.isclose(float(own), float(dropout)):
            reasons.append(
                f"the layer applies attention dropout p={dropout:g} in training and {mechanism.name!r} "
                + ("applies none" if own is None else f"was built with dropout={own!r}")
                + f"; build the model with {family_of(module.config).dropout_config_key}=0.0"
            )
    if scaling is not None:
        own_scale = getattr(mechanism, "scale", None) if "scale" in _option_names(mechanism.name) else None
        effective = float(own_scale) if own_scale is not None else query.shape[-1] ** -0.5
        if not math.isclose(float(scaling), effective, rel_tol=1e-6):
            reasons.append(f"the layer scales scores by {scaling:g} and {mechanism.name!r} by {effective:g}")
    return reasons


def _window(mechanism: AttentionMechanism, layout: MaskLayout, t_len: int, s_len: int) -> tuple[Mask | None, str]:
    """How a layer's causal sliding window reaches the mechanism: its own pattern, a mask, or a refusal."""
    window = layout.window
    assert window is not None
    if layout.q_offset + layout.q_length - 1 - layout.kv_offset < window:
        # The farthest key any query of this call can see is inside its window (a short sequence, or a
        # sliding cache that kept only the window): the window excludes nothing, any mechanism honours it.
        return None, ""
    if isinstance(mechanism, SlidingWindowAttention):
        before, _ = window_extent(mechanism.window, mechanism.dilation, causal=True)
        if before < window:  # every key the mechanism sees is inside the model's window
            return None, ""
        return None, (
            f"the model's sliding_window={window} lets a query see its {window} most recent positions, and "
            f"sliding_window attention with window={mechanism.window}, dilation={mechanism.dilation} reaches "
            f"{before + 1}; apply it with window <= {window}"
        )
    if mechanism.capabilities.custom_mask:
        return sliding_window_mask(t_len, s_len, window, causal=True), ""
    return None, (
        f"the model limits each query to a sliding window of {window} positions (config.sliding_window), which "
        f"{mechanism.name!r} cannot honour; use 'sliding_window' with window <= {window} or 'full', "
        "or build the model with sliding_window=None"
    )


def _decode_reasons(mechanism: AttentionMechanism, layout: MaskLayout, window_mask: Mask | None) -> list[str]:
    caps = mechanism.capabilities
    if not layout.causal:
        return ["queries shorter than keys need causal attention (a decoder with a cache)"]
    if caps.cross_attention:
        return []
    if caps.decoding is None:
        return [
            f"{mechanism.name!r} cannot continue from Transformers' key/value cache (it has no incremental "
            "decoding); generate with use_cache=False to recompute the whole prefix at each step"
        ]
    if window_mask is not None:  # pragma: no cover - custom-mask mechanisms all take cross-attention
        return ["a windowed mask cannot be passed while decoding"]
    return []


def _attend(
    mechanism: AttentionMechanism,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    layout: MaskLayout,
    window_mask: Mask | None,
    state: DecodingState | None = None,
) -> Tensor:
    t_len, s_len = query.shape[2], key.shape[2]
    padding = layout.padding
    if padding is not None:
        # In self-attention a padded key is a padded token whose query is in the batch too; mechanisms
        # that mix queries (Nyström's query landmarks) would let its content reach real tokens. Its own
        # output is never used, so its query is zeroed (queries are end-aligned with the keys).
        query = query.masked_fill(~padding[:, None, s_len - t_len :, None], 0.0)
    if state is not None:  # only the new tokens: the mechanism continues from its own state
        return state.step(mechanism, query, key, value, padding)
    if t_len == s_len or mechanism.capabilities.cross_attention:
        return mechanism(query, key, value, causal=layout.causal, attention_mask=padding, mask=window_mask)
    # Queries end-aligned after a cached prefix: the mechanism's own decoding path, its state
    # filled with the prefix Transformers' cache holds.
    past = s_len - t_len
    state = mechanism.new_state()
    if not isinstance(state, KVState):  # pragma: no cover - recurrent mechanisms take cross-attention
        raise ValueError(f"{mechanism.name!r} keeps a recurrent state that Transformers' cache cannot fill")
    state.append(key[:, :, :past], value[:, :, :past], None if padding is None else padding[:, :past])
    return mechanism.decode(
        query,
        key[:, :, past:],
        value[:, :, past:],
        state,
        attention_mask=None if padding is None else padding[:, past:],
    )
