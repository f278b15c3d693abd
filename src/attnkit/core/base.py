"""The base class every attention mechanism derives from.

The seam: a mechanism receives projected ``q (B, H, T, D)``, ``k (B, H, S, D)``,
``v (B, H, S, Dv)`` plus an explicit causal flag, padding mask (``attention_mask``, bool
``(B, S)``, True = real token), optional mask function and optional additive score bias,
and returns ``(B, H, T, Dv)`` in the input dtype. Projections, rotary embeddings and caches
live in :class:`MultiHeadAttention`.

Empty inputs (``T = 0`` or ``S = 0``) are answered here, before any mechanism runs, as
:func:`torch.nn.functional.scaled_dot_product_attention` answers them: an empty output, or
zeros for queries with no key at all.

Subclasses implement :meth:`_attend`, and declare ``capabilities`` at registration.
Exact sparse mechanisms also implement :meth:`pattern` (the dense oracle for tests
and the arena's pattern pictures). Mechanisms that decode incrementally either use
the default KV cache here or override :meth:`new_state` / :meth:`_decode`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from attnkit.core.capabilities import Capabilities
from attnkit.core.errors import check_bool
from attnkit.core.types import MaskFunction, ScoreBias
from attnkit.core.validation import check_no_key_padding_mask, check_qkv


@dataclass
class KVState:
    """A growing key/value cache (``decoding="kv_cache"``).

    Keys and values live in preallocated stores that grow geometrically (×1.5), so a
    decoding step writes only its new positions instead of copying the whole cache
    (``torch.cat`` per token costs ``O(context)``, the dominant cost at long contexts).
    ``keys``/``values`` are views of the filled part. When autograd would record the write
    (inputs that require grad, grad mode on) the cache concatenates instead, so saved
    tensors are never modified in place.

    Attributes:
        keys: ``(B, H, S, D)`` every key seen so far, or None before the first step.
        values: ``(B, H, S, Dv)``.
        key_padding: bool ``(B, S)`` (True = real token), or None while nothing is padded.
    """

    keys: Tensor | None = None
    values: Tensor | None = None
    key_padding: Tensor | None = None
    key_store: Tensor | None = field(default=None, repr=False)
    value_store: Tensor | None = field(default=None, repr=False)
    padding_store: Tensor | None = field(default=None, repr=False)
    #: Subclasses that trim the cache (rolling windows) keep it small and skip the stores.
    preallocate: ClassVar[bool] = True

    def trim(self) -> None:
        """Drop the positions no future query can see, after each step: none for a growing cache
        (a rolling window's cache overrides this)."""

    @property
    def length(self) -> int:
        """Number of cached positions."""
        return 0 if self.keys is None else self.keys.shape[2]

    def append(self, k: Tensor, v: Tensor, attention_mask: Tensor | None) -> None:
        """Append ``t`` new positions: ``k (B, H, t, D)``, ``v (B, H, t, Dv)``, mask ``(B, t)``."""
        old = self.length
        b, t = k.shape[0], k.shape[2]
        padding = None
        if attention_mask is not None or self.key_padding is not None:
            padding = attention_mask if attention_mask is not None else k.new_ones(b, t, dtype=torch.bool)
            if self.key_padding is None:
                self.key_padding = k.new_ones(b, old, dtype=torch.bool)
        recorded = torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)
        if self.keys is None or self.values is None:
            self.keys, self.values = k, v
            if padding is not None:
                self.key_padding = padding
            return
        if not self.preallocate or recorded:
            self.keys = torch.cat([self.keys, k], dim=2)
            self.values = torch.cat([self.values, v], dim=2)
            if padding is not None and self.key_padding is not None:
                self.key_padding = torch.cat([self.key_padding, padding], dim=1)
            return
        self.key_store = _grown(self.key_store, self.keys, old + t, dim=2)
        self.value_store = _grown(self.value_store, self.values, old + t, dim=2)
        self.key_store[:, :, old : old + t] = k
        self.value_store[:, :, old : old + t] = v
        self.keys, self.values = self.key_store[:, :, : old + t], self.value_store[:, :, : old + t]
        if padding is not None and self.key_padding is not None:
            self.padding_store = _grown(self.padding_store, self.key_padding, old + t, dim=1)
            self.padding_store[:, old : old + t] = padding
            self.key_padding = self.padding_store[:, : old + t]


def _grown(store: Tensor | None, filled: Tensor, needed: int, *, dim: int) -> Tensor:
    """``store`` if ``filled`` is its leading part along ``dim`` and it holds ``needed`` positions;
    else a new store (×1.5 head-room) that starts with a copy of ``filled``."""
    is_view = (
        store is not None
        and filled.data_ptr() == store.data_ptr()
        and filled.shape[:dim] == store.shape[:dim]
        and filled.shape[dim + 1 :] == store.shape[dim + 1 :]
        and filled.dtype == store.dtype
        and filled.stride() == store.stride()
    )
    if store is not None and is_view and store.shape[dim] >= needed:
        return store
    capacity = max(needed, int(filled.shape[dim] * 1.5), 64)
    shape = list(filled.shape)
    shape[dim] = capacity
    fresh = filled.new_empty(shape)
    fresh.narrow(dim, 0, filled.shape[dim]).copy_(filled)
    return fresh


class AttentionMechanism(nn.Module, ABC):
    """Base class: validates inputs and capabilities, then calls :meth:`_attend`.

    Class attributes set by :func:`attnkit.core.registry.register`:
        name: the registered name.
        capabilities: the declared :class:`Capabilities`.
        call_options: names of extra per-call keyword arguments the mechanism accepts
            (e.g. Longformer's ``global_tokens``).
    """

    name: ClassVar[str] = ""
    capabilities: ClassVar[Capabilities]
    call_options: ClassVar[tuple[str, ...]] = ()
    #: Why ``causal=True`` is refused (mechanisms without an exactly causal form say why here).
    no_causal_reason: ClassVar[str] = "causal=True is not supported (no exactly causal form)"
    #: What :meth:`new_state` returns; :meth:`decode` refuses any other state before calling
    #: :meth:`_decode`. A mechanism with another state type overrides both methods and sets this.
    state_type: ClassVar[type] = KVState
    _options_repr: str = ""

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        causal: bool = False,
        attention_mask: Tensor | None = None,
        mask: MaskFunction | None = None,
        score_bias: ScoreBias | None = None,
        **call_kwargs: Any,
    ) -> Tensor:
        """Attend ``q`` over ``k``/``v``.

        Args:
            q: ``(B, H, T, D)`` queries.
            k: ``(B, H, S, D)`` keys.
            v: ``(B, H, S, Dv)`` values.
            causal: query ``i`` sees key ``j`` only when ``j <= i + S - T`` (end-aligned).
            attention_mask: bool ``(B, S)``, True = real token (the opposite of the
                ``key_padding_mask`` of :class:`torch.nn.MultiheadAttention`, which is refused).
            mask: an extra boolean :class:`~attnkit.masks.Mask` (mechanisms with ``custom_mask``).
            score_bias: an additive positional bias (mechanisms with ``score_bias``).
            **call_kwargs: mechanism-specific per-call options listed in ``call_options``.

        Returns:
            ``(B, H, T, Dv)`` in ``q``'s dtype. Rows with no visible key are zeros, so ``T = 0``
            gives an empty output and ``S = 0`` all zeros.

        Raises:
            ValueError: bad shapes/dtypes, or a request the mechanism cannot honour exactly
                (every reason listed).
            TypeError: an unknown per-call keyword, or PyTorch's ``key_padding_mask``.
        """
        check_no_key_padding_mask(call_kwargs)
        check_qkv(q, k, v, attention_mask)
        self._check_call(q, k, causal=causal, attention_mask=attention_mask, mask=mask, score_bias=score_bias)
        self._check_call_kwargs(call_kwargs)
        if _nothing_to_attend(q, v):
            return _empty_attention(q, k, v)
        out = self._attend(
            q, k, v, causal=causal, attention_mask=attention_mask, mask=mask, score_bias=score_bias, **call_kwargs
        )
        return out.to(q.dtype)

    # -- to implement -------------------------------------------------------------
    @abstractmethod
    def _attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        causal: bool,
        attention_mask: Tensor | None,
        mask: MaskFunction | None,
        score_bias: ScoreBias | None,
        **call_kwargs: Any,
    ) -> Tensor:
        """The mechanism's maths on validated inputs; same arguments as :meth:`forward`."""

    def pattern(self, q_len: int, kv_len: int, *, causal: bool, **call_kwargs: Any) -> MaskFunction | None:
        """The boolean pattern an exact mechanism computes softmax attention over.

        Returns None for dense attention (all keys) and for approximate mechanisms,
        whose output is not softmax over a fixed set of keys. Causality is included.
        """
        return None

    # -- training -------------------------------------------------------------------
    def after_optimizer_step(self) -> None:
        """Hook a training loop calls after each optimizer step (see :func:`after_optimizer_step`).

        Mechanisms with online state that must not follow gradients (Routing's k-means
        centroids) apply their pending update here; stateless mechanisms have nothing to do.
        """
        return None

    # -- decoding -------------------------------------------------------------------
    def new_state(self) -> Any:
        """A fresh incremental-decoding state for :meth:`decode`.

        Raises:
            ValueError: when the mechanism declares no decoding support.
        """
        if self.capabilities.decoding is None:
            raise ValueError(
                f"attention {self.name!r} has no incremental decoding state; "
                "recompute over the whole prefix instead (use_cache=False)"
            )
        return KVState()

    def decode(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        state: Any,
        *,
        attention_mask: Tensor | None = None,
        score_bias: ScoreBias | None = None,
        **unexpected: Any,
    ) -> Tensor:
        """Append ``t`` new positions to ``state`` and attend their queries causally.

        Args:
            q: ``(B, H, t, D)`` queries of the new positions.
            k: ``(B, H_kv, t, D)`` keys of the new positions; ``H_kv`` is ``H`` or, for
                grouped-query attention, a divisor of ``H`` (each key/value head serves
                ``H // H_kv`` consecutive query heads). A key/value cache stores ``H_kv``
                heads, so grouping shrinks it by ``H / H_kv``.
            v: ``(B, H_kv, t, Dv)`` values of the new positions.
            state: from :meth:`new_state`; updated in place.
            attention_mask: bool ``(B, t)`` for the new positions, True = real token.
            score_bias: as in :meth:`forward`.
            **unexpected: refused with a ``TypeError`` (caught here to explain PyTorch's
                ``key_padding_mask``).

        Returns:
            ``(B, H, t, Dv)``, equal to the last ``t`` rows of a causal forward over the
            whole sequence. ``t = 0`` returns an empty output and leaves ``state`` unchanged.
        """
        check_no_key_padding_mask(unexpected)
        if unexpected:
            raise TypeError(
                f"decode() got unexpected keyword argument(s) {', '.join(sorted(unexpected))}; "
                "accepted: attention_mask, score_bias"
            )
        check_qkv(q, k, v, attention_mask, grouped=True)
        if q.shape[2] != k.shape[2]:
            raise ValueError(f"decode needs as many new keys as queries, got q {q.shape[2]} and k {k.shape[2]}")
        reasons = self._unsupported(causal=True, attention_mask=attention_mask, mask=None, score_bias=score_bias)
        if self.capabilities.decoding is None:
            reasons.append("it has no incremental decoding state")
        if reasons:
            raise ValueError(f"attention {self.name!r} cannot do this: " + "; ".join(reasons))
        heads = q.shape[1]
        if _nothing_to_attend(q, v):  # no new position: nothing to append either
            return _empty_attention(q, repeat_kv_heads(k, heads), repeat_kv_heads(v, heads))
        if not isinstance(state, self.state_type):
            raise ValueError(f"state must come from {type(self).__name__}.new_state(), got {type(state).__name__}")
        if not isinstance(state, KVState):
            # Only a key/value cache keeps grouped heads; other states (recurrent sums) are per query head.
            k, v = repeat_kv_heads(k, heads), repeat_kv_heads(v, heads)
        return self._decode(q, k, v, state, attention_mask=attention_mask, score_bias=score_bias).to(q.dtype)

    def _decode(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        state: Any,
        *,
        attention_mask: Tensor | None,
        score_bias: ScoreBias | None,
    ) -> Tensor:
        # Default: a growing KV cache (decode() checked its type) and a causal call with queries aligned to the end.
        state.append(k, v, attention_mask)
        assert state.keys is not None and state.values is not None
        heads = q.shape[1]  # the cache keeps the key/value heads it was given; the mechanism sees H
        out = self._attend(
            q,
            repeat_kv_heads(state.keys, heads),
            repeat_kv_heads(state.values, heads),
            causal=True,
            attention_mask=state.key_padding,
            mask=None,
            score_bias=score_bias,
        )
        state.trim()
        return out

    # -- checks ---------------------------------------------------------------------
    def _unsupported(
        self,
        *,
        causal: bool,
        attention_mask: Tensor | None,
        mask: MaskFunction | None,
        score_bias: ScoreBias | None,
    ) -> list[str]:
        caps = self.capabilities
        reasons = []
        if causal and not caps.causal:
            reasons.append(self.no_causal_reason)
        if attention_mask is not None and not caps.key_padding:
            reasons.append("a padding attention_mask is not supported (padded keys would change the output)")
        if mask is not None and not caps.custom_mask:
            reasons.append("a custom mask function is not supported")
        if score_bias is not None and not caps.score_bias:
            reasons.append("score_bias (ALiBi/T5 relative bias) is not supported")
        return reasons

    def _check_call(
        self,
        q: Tensor,
        k: Tensor,
        *,
        causal: bool,
        attention_mask: Tensor | None,
        mask: MaskFunction | None,
        score_bias: ScoreBias | None,
    ) -> None:
        check_bool("causal", causal)
        if mask is not None and not callable(mask):
            raise ValueError(f"mask must be an attnkit.masks.Mask (a callable), got {type(mask).__name__}")
        reasons = self._unsupported(causal=causal, attention_mask=attention_mask, mask=mask, score_bias=score_bias)
        if q.shape[2] != k.shape[2] and not self.capabilities.cross_attention:
            reasons.append(
                f"queries and keys must have the same length (no cross-attention), got T={q.shape[2]}, S={k.shape[2]}"
            )
        if reasons:
            raise ValueError(f"attention {self.name!r} cannot do this: " + "; ".join(reasons))

    def _check_call_kwargs(self, call_kwargs: dict[str, Any]) -> None:
        unknown = sorted(set(call_kwargs) - set(self.call_options))
        if unknown:
            accepted = ", ".join(self.call_options) or "none"
            raise TypeError(
                f"attention {self.name!r} got unknown per-call argument(s) {', '.join(unknown)}; "
                f"accepted: causal, attention_mask, mask, score_bias and mechanism-specific: {accepted}"
            )

    def extra_repr(self) -> str:
        return getattr(self, "_options_repr", "")


def repeat_kv_heads(x: Tensor, heads: int) -> Tensor:
    """Grouped-query keys or values ``(B, H_kv, L, E)`` as ``(B, heads, L, E)``.

    Key/value head ``j`` serves query heads ``j·g, ..., j·g + g - 1`` with ``g = heads // H_kv``
    (consecutive, as in the grouped projections). Returns ``x`` itself when ``H_kv == heads``.
    """
    if x.shape[1] == heads:
        return x
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def _nothing_to_attend(q: Tensor, v: Tensor) -> bool:
    # No query (T = 0 or an empty batch), no key (S = 0) or no value channel (Dv = 0).
    return q.numel() == 0 or v.numel() == 0


def _empty_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The output when :func:`_nothing_to_attend`: ``(B, H, T, Dv)``, empty or all zeros.

    A query with no key outputs zeros, so the answer needs no mechanism. It is written as
    ``(q kᵀ) v`` without the softmax: over an empty T or S axis that product is exactly the
    answer, and it keeps ``q``, ``k`` and ``v`` in the autograd graph, so backward runs and
    gives zero gradients, as SDPA does.
    """
    keys = k.shape[2] if v.shape[3] > 0 else 0  # with Dv = 0, skip (T, S) scores that nobody reads
    return (q @ k[:, :, :keys].transpose(-1, -2)) @ v[:, :, :keys]


def after_optimizer_step(model: nn.Module) -> int:
    """Run the post-step hook of every attention mechanism inside ``model``.

    Call it after each ``optimizer.step()`` of a custom training loop (attnkit's trainer
    does). Returns the number of mechanisms visited.
    """
    mechanisms = [m for m in model.modules() if isinstance(m, AttentionMechanism)]
    for m in mechanisms:
        m.after_optimizer_step()
    return len(mechanisms)
