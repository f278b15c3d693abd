"""Decoding state Transformers' stateless attention interface does not keep: recurrent and rolling-window caches.

Transformers' ``DynamicCache`` stores every key and value, and its attention functions see the
whole cache at each step. That is right for softmax attention, but wasteful for mechanisms
that decode from a small state: linear attention and Performer need only their running sums
``Σ φ(k) [v, 1]ᵀ`` (O(1) in the context length per generated token), and sliding-window
attention only its last ``dilation·(window-1)`` keys (O(window) memory).

:class:`AttnkitCache` is a ``DynamicCache`` whose layers that use such a mechanism are a
:class:`MechanismStateLayer` holding the mechanism's own decoding state (from
``mechanism.new_state()``); the other layers stay Transformers' own (KV-cache mechanisms and the
layers of a hybrid that keep Transformers' attention). It travels with ``past_key_values`` /
``cache`` like any Transformers cache.

How the state reaches the attention: the attention layer hands its keyword arguments to
``cache.update(key, value, layer_idx, kwargs=kwargs)`` and then passes the same dictionary to
its attention function. A :class:`MechanismStateLayer` returns the new keys and values unchanged
and adds itself to that dictionary under :data:`STATE_KEYWORD`; the bridge's attention function
takes it out and calls ``mechanism.decode`` with the layer's state, so the mechanism sees only
the new tokens and its state. A state layer whose attention never took its state (a layer
switched to another implementation) is refused at the next step, never silently skipped.

``generate`` builds one for you after :func:`attnkit.hf.apply` (the model's
``_prepare_cache_for_generation`` is wrapped: a plain ``DynamicCache`` Transformers has just
created is replaced). For a manual decoding loop, pass :func:`new_cache` as the first step's
``cache=`` (``past_key_values=``, Transformers' older name); a model called with
``use_cache=True`` and no cache builds a plain ``DynamicCache``, which stays exact but makes
every step cost O(context).

Beam search works (``reorder_cache`` selects rows of every state tensor); rolling a state back
(assisted or speculative decoding, ``crop`` with tokens to remove) is refused: a recurrent sum
cannot forget tokens.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import CacheLayerMixin

from attnkit.core.base import AttentionMechanism, KVState
from attnkit.hf.attention import STATE_KEYWORD, attached, layer_is_causal
from attnkit.hf.families import family_of, layer_index
from attnkit.models.cache import reorder_batch

#: Decoding kinds whose state the cache keeps instead of Transformers' key/value tensors.
STATE_DECODING = frozenset({"recurrent", "window_cache", "bucket_cache"})


class MechanismStateLayer(CacheLayerMixin):
    """One layer's attnkit decoding state inside a Transformers cache.

    Attributes:
        mechanism: name of the mechanism the state belongs to.
        state: the mechanism's decoding state (``PrefixState``, ``WindowCache``...), None before
            the first step.
        length: positions consumed so far (padding included), Transformers' sequence length.
        batch: rows of the state.
    """

    is_sliding = False
    is_croppable = False

    def __init__(self, mechanism: str) -> None:
        super().__init__()
        self.mechanism = mechanism
        self.state: Any = None
        self.length = 0
        self.batch = 0
        self._pending = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.mechanism!r}, length={self.length})"

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Hand this layer to the attention function through the layer's keyword arguments.

        Returns:
            ``key_states`` and ``value_states`` unchanged: the attention sees only the new tokens.

        Raises:
            ValueError: the attention layer passes no keyword dictionary to the cache, or the
                previous step's attention never used the state.
        """
        if self._pending:
            raise ValueError(
                f"the attnkit decoding state of {self.mechanism!r} was not used by the previous step's attention "
                "(the layer's attention implementation changed after the cache was built); start a new cache "
                "with attnkit.hf.new_cache(model)"
            )
        layer_kwargs = kwargs.get("kwargs")
        if not isinstance(layer_kwargs, dict):
            raise ValueError(
                "this attention layer does not pass its keyword arguments to cache.update(..., kwargs=...), so the "
                f"attnkit decoding state of {self.mechanism!r} cannot reach its attention; generate with "
                "Transformers' DynamicCache instead (past_key_values=DynamicCache(config=model.config))"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        layer_kwargs[STATE_KEYWORD] = self
        self._pending = True
        return key_states, value_states

    def step(
        self, mechanism: AttentionMechanism, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None
    ) -> Tensor:
        """Attend ``t`` new positions causally after everything the state holds, and advance it.

        Args:
            mechanism: the layer's mechanism (its name must be :attr:`mechanism`).
            query: ``(B, H, t, D)``.
            key: ``(B, H, t, D)``, one key head per query head.
            value: ``(B, H, t, Dv)``.
            attention_mask: bool ``(B, t)``, True = real token, or None.

        Returns:
            ``(B, H, t, Dv)``.
        """
        if mechanism.name != self.mechanism:
            raise ValueError(
                f"this cache layer holds a {self.mechanism!r} state but the layer now runs {mechanism.name!r}; "
                "start a new cache with attnkit.hf.new_cache(model)"
            )
        if self.state is None:
            self.state = mechanism.new_state()
            self.batch = query.shape[0]
        elif query.shape[0] != self.batch:
            raise ValueError(f"the cache holds {self.batch} rows but the step has {query.shape[0]}")
        out = mechanism.decode(query, key, value, self.state, attention_mask=attention_mask)
        self.length += query.shape[2]
        self._pending = False
        return out

    def state_tensors(self) -> list[Tensor]:
        """Every tensor the state holds (for memory accounting)."""
        found: list[Tensor] = []
        _collect(self.state, found)
        return found

    # -- Transformers' cache protocol ------------------------------------------------
    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The attention sees only the new tokens: keys at length..length+t-1.
        return query_length, self.length

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def offload(self) -> None:
        return None  # the state is small: it stays where it is

    def prefetch(self) -> None:
        return None

    def reset(self) -> None:
        self.state, self.length, self.batch, self._pending = None, 0, 0, False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep rows ``beam_idx`` of the state, in order (beam search)."""
        self._select(beam_idx)

    def batch_select_indices(self, indices: Tensor) -> None:
        """Keep only rows ``indices`` (long indices or a bool row mask)."""
        self._select(indices.nonzero().flatten() if indices.dtype == torch.bool else indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every row ``repeats`` times, each copy next to its original."""
        self._select(torch.arange(self.batch).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        """Only ``crop(0)`` (nothing to remove) is possible: a recurrent state cannot forget tokens.

        Raises:
            ValueError: for any other value (assisted or speculative decoding).
        """
        if tokens_to_remove != 0:
            raise ValueError(
                f"the attnkit decoding state of {self.mechanism!r} cannot be rolled back (crop({tokens_to_remove})): "
                "assisted and speculative decoding are not supported with it; generate without an assistant model"
            )

    def _select(self, index: Tensor) -> None:
        if self.state is None:
            return
        index = index.to(device=self.device, dtype=torch.long)
        self.state = reorder_batch(self.state, index, self.batch)
        self.batch = int(index.shape[0])


def _collect(obj: Any, found: list[Tensor]) -> None:
    if isinstance(obj, Tensor):
        found.append(obj)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _collect(item, found)
    elif isinstance(obj, dict):
        for item in obj.values():
            _collect(item, found)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (nn.Module, type)):
        for item in vars(obj).values():
            _collect(item, found)


class AttnkitCache(DynamicCache):
    """A ``DynamicCache`` whose recurrent and rolling-window layers keep attnkit decoding state.

    Args:
        model: a model after :func:`attnkit.hf.apply`.
        offloading: as in ``DynamicCache`` (only Transformers' own layers are offloaded).
        offload_only_non_sliding: as in ``DynamicCache``.
    """

    def __init__(
        self, model: PreTrainedModel, *, offloading: bool = False, offload_only_non_sliding: bool = False
    ) -> None:
        config = model.config.get_text_config(decoder=True)
        super().__init__(config=config, offloading=offloading, offload_only_non_sliding=offload_only_non_sliding)
        for index, name in state_layers(model).items():
            if index >= len(self.layers):
                raise ValueError(f"the model's config declares {len(self.layers)} layers but layer {index} exists")
            self.layers[index] = MechanismStateLayer(name)

    @property
    def is_linear(self) -> list[bool]:
        # A state layer holds no keys: Transformers must not size full-attention masks from it
        # (find_first_full_attention_index skips "linear" layers).
        return [
            isinstance(layer, MechanismStateLayer) or linear for layer, linear in zip(self.layers, super().is_linear)
        ]


def keeps_own_state(mechanism: AttentionMechanism) -> bool:
    """Whether ``mechanism`` decodes from a state of its own rather than from Transformers' key/value cache:
    a recurrent, rolling-window or bucket state, or a key/value cache that carries more than keys and values
    (``dynamic_block`` also keeps its current block's gate query), which Transformers cannot fill."""
    return mechanism.capabilities.decoding in STATE_DECODING or mechanism.state_type is not KVState


def state_layers(model: nn.Module) -> dict[int, str]:
    """``{layer index: mechanism}`` for the causal layers whose mechanism decodes from its own state."""
    found = {}
    for module in family_of(model.config).attention_modules(model):
        mechanism = attached(module)
        if mechanism is not None and layer_is_causal(module) and keeps_own_state(mechanism):
            found[layer_index(module)] = mechanism.name
    return found


def new_cache(model: PreTrainedModel) -> DynamicCache:
    """A cache for a manual decoding loop: pass it as the first step's ``cache=`` (``past_key_values=``).

    Args:
        model: a model after :func:`attnkit.hf.apply` (or :func:`attnkit.hf.load`).

    Returns:
        An :class:`AttnkitCache` when some layer decodes from its own state (linear, performer,
        sliding_window), else Transformers' ``DynamicCache``.
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if state_layers(model):
        return AttnkitCache(model)
    return DynamicCache(config=model.config.get_text_config(decoder=True))


def _prepare_cache_for_generation(
    self: PreTrainedModel, generation_config: Any, model_kwargs: dict[str, Any], *args: Any, **kwargs: Any
) -> Any:
    """Transformers' own preparation, then its fresh ``DynamicCache`` becomes an :class:`AttnkitCache`."""
    # The class's method (GenerationMixin's), not this instance attribute.
    prepare: Any = type(self)._prepare_cache_for_generation  # type: ignore[attr-defined]
    result = prepare(self, generation_config, model_kwargs, *args, **kwargs)
    cache = model_kwargs.get("cache")
    # Exactly the class Transformers builds by default: a cache the user passed is marked
    # _is_user_defined and kept; static, quantized and encoder-decoder caches are other classes.
    if type(cache) is DynamicCache and not getattr(cache, "_is_user_defined", False) and state_layers(self):
        model_kwargs["cache"] = AttnkitCache(
            self, offloading=cache.offloading, offload_only_non_sliding=getattr(cache, "only_non_sliding", False)
        )
    return result


def install(model: PreTrainedModel) -> None:
    """Make ``model.generate`` build an :class:`AttnkitCache` (an instance attribute; the class is untouched)."""
    model.__dict__["_prepare_cache_for_generation"] = types.MethodType(_prepare_cache_for_generation, model)
