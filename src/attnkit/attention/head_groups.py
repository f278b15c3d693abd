"""Per-head mixing: one attention layer whose groups of query heads run different mechanisms.

A layer with ``H`` query heads is split into consecutive groups, each with its own registered
mechanism and options, e.g. heads 0-3 ``sliding_window`` (window 64) and heads 4-7 ``linear``.
:class:`~attnkit.attention.multi_head.MultiHeadAttention` still projects q/k/v once for all heads
and applies rotary embeddings to every head alike; :class:`MixedHeads` hands each group its slice
of heads ``(B, H_g, T, D)``, runs the group's mechanism on it and concatenates the outputs in head
order, so the output projection sees the heads exactly where an unmixed layer would put them.

Conventions:

- Grouped-query attention: key/value head ``j`` serves query heads ``j·r .. j·r + r - 1``
  (``r = heads // kv_heads``), so a group must own whole key/value heads: its size and its first
  head are multiples of ``r``. A split that breaks this is refused, naming the group.
- Score biases (ALiBi, T5) and custom masks are functions of the head index; a group sees its own
  heads' indices (group offset added), so ALiBi slope ``h`` stays with head ``h``.
- Capabilities are the intersection of the groups': a request one group cannot honour (causal,
  padding, score bias, a custom mask, decoding) is refused with every group's reasons, never
  dropped for that group alone. A per-call option goes to the groups whose mechanism accepts it;
  one that no group accepts is refused.
- Decoding: :class:`MixedState` holds one state per group (each mechanism's own: KV cache,
  rolling window, recurrent sums), so cached decoding equals recomputation exactly whenever each
  group's does. Batch reordering (beam search) walks into it like any dataclass state.

This is a support module, not a registered mechanism: the registry lists single mechanisms.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from attnkit.core.base import AttentionMechanism
from attnkit.core.errors import check_positive_int
from attnkit.core.registry import build_attention
from attnkit.core.types import MaskFunction, ScoreBias

#: The keys of one head group in a config (``{mechanism = "linear", heads = 4, options = {...}}``).
GROUP_KEYS: tuple[str, ...] = ("mechanism", "heads", "options")


@dataclass(frozen=True)
class HeadGroup:
    """One group of consecutive query heads and the mechanism they run.

    Attributes:
        mechanism: a registered mechanism name (``attnkit list``).
        heads: number of query heads in the group.
        options: the mechanism's options (e.g. ``{"window": 64}``).
    """

    mechanism: str
    heads: int
    options: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The group as a config table ``{"mechanism": ..., "heads": ..., "options": {...}}``."""
        return {"mechanism": self.mechanism, "heads": self.heads, "options": dict(self.options)}

    @property
    def label(self) -> str:
        """``name(options)×heads`` for summaries, e.g. ``sliding_window(window=64)×4``."""
        options = ", ".join(f"{k}={v!r}" for k, v in sorted(self.options.items()))
        return f"{self.mechanism}{f'({options})' if options else ''}×{self.heads}"


class HeadSplitError(ValueError):
    """A head split that does not fit the layer; ``group`` is the offending group's index, or None
    when the split as a whole is wrong (the sizes do not add up to the layer's heads)."""

    def __init__(self, message: str, group: int | None) -> None:
        super().__init__(message)
        self.group = group


def as_head_group(value: HeadGroup | Mapping[str, Any], index: int = 0) -> HeadGroup:
    """A :class:`HeadGroup` from itself or from a table with keys ``mechanism``, ``heads`` and
    optionally ``options``.

    Raises:
        ValueError: a table with missing or unknown keys, or values of the wrong type.
    """
    if isinstance(value, HeadGroup):
        group = value
    elif isinstance(value, Mapping):
        unknown = sorted(set(value) - set(GROUP_KEYS))
        missing = [k for k in ("mechanism", "heads") if k not in value]
        if unknown or missing:
            problem = f"unknown key(s) {unknown}" if unknown else f"missing key(s) {missing}"
            raise ValueError(
                f"head group {index} has {problem}; a group is {{mechanism = NAME, heads = N, options = {{...}}}}"
            )
        group = HeadGroup(value["mechanism"], value["heads"], value.get("options", {}))
    else:
        raise ValueError(
            f"head group {index} must be a table {{mechanism = NAME, heads = N, options = {{...}}}}, "
            f"got {type(value).__name__}"
        )
    if not isinstance(group.mechanism, str):
        raise ValueError(f"head group {index}: mechanism must be a registered name (str), got {group.mechanism!r}")
    check_positive_int(f"head group {index} heads", group.heads, example=4)
    if not isinstance(group.options, Mapping):
        raise ValueError(f"head group {index}: options must be a table, got {type(group.options).__name__}")
    return HeadGroup(group.mechanism, group.heads, dict(group.options))


def check_head_split(sizes: Sequence[int], heads: int, kv_heads: int) -> None:
    """Check that groups of ``sizes`` query heads split a layer of ``heads`` (``kv_heads``) exactly.

    Raises:
        HeadSplitError: the sizes do not add up to ``heads``, or a group would share a key/value
            head with its neighbour under grouped-query attention.
    """
    if not sizes:
        raise HeadSplitError("a per-head mix needs at least one head group", None)
    if sum(sizes) != heads:
        raise HeadSplitError(
            f"the head groups' heads {list(sizes)} add up to {sum(sizes)}, but the layer has heads={heads}; "
            "make them add up to heads",
            None,
        )
    per_kv = heads // kv_heads
    for i, size in enumerate(sizes):
        if size % per_kv:
            raise HeadSplitError(
                f"head group {i} has heads={size}, but with kv_heads={kv_heads} each key/value head serves "
                f"{per_kv} query heads and a group must own whole key/value heads; "
                f"use a multiple of {per_kv} for its heads",
                i,
            )


def _bias_from(score_bias: ScoreBias | None, offset: int) -> ScoreBias | None:
    """The layer's score bias ``(h, q_pos, kv_pos)`` seen from a group whose heads start at ``offset``."""
    if score_bias is None or offset == 0:
        return score_bias
    return lambda h, q_pos, kv_pos: score_bias(h + offset, q_pos, kv_pos)


def _mask_from(mask: MaskFunction | None, offset: int) -> MaskFunction | None:
    """The layer's mask ``(b, h, q_idx, kv_idx)`` seen from a group whose heads start at ``offset``."""
    if mask is None or offset == 0:
        return mask
    return lambda b, h, q_idx, kv_idx: mask(b, h + offset, q_idx, kv_idx)


@dataclass
class MixedState:
    """Decoding state of a :class:`MixedHeads` layer: each group's own state, in group order.

    Attributes:
        states: one state per head group, from that group's mechanism's ``new_state()``.
    """

    states: list[Any]


class MixedHeads(nn.Module):
    """Run each group of query heads through its own mechanism; same call contract as a mechanism.

    Args:
        groups: the head groups in head order (:class:`HeadGroup` or tables); their ``heads``
            add up to ``heads``.
        heads: query heads of the layer.
        kv_heads: key/value heads of the layer (a divisor of ``heads``).

    Raises:
        ValueError: a malformed group, an unknown mechanism or option, or a split that does not fit
            (:class:`HeadSplitError`).
    """

    def __init__(self, groups: Sequence[HeadGroup | Mapping[str, Any]], *, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.groups = tuple(as_head_group(g, i) for i, g in enumerate(groups))
        check_head_split([g.heads for g in self.groups], heads, kv_heads)
        self.heads, self.kv_heads = heads, kv_heads
        built = []
        for i, group in enumerate(self.groups):
            try:
                built.append(build_attention(group.mechanism, **group.options))
            except (ValueError, TypeError) as err:
                raise type(err)(f"head group {i}: {err}") from None
        self.mechanisms = nn.ModuleList(built)
        #: A readable name for summaries and error messages (not a registry name).
        self.name = " + ".join(g.label for g in self.groups)
        starts = [sum(g.heads for g in self.groups[:i]) for i in range(len(self.groups))]
        self.head_ranges: tuple[tuple[int, int], ...] = tuple((s, s + g.heads) for s, g in zip(starts, self.groups))

    # -- what the mix can do ---------------------------------------------------------
    def group_mechanisms(self) -> list[AttentionMechanism]:
        """The groups' mechanisms, in head order."""
        return [m for m in self.mechanisms if isinstance(m, AttentionMechanism)]

    def _where(self, i: int) -> str:
        start, end = self.head_ranges[i]
        return f"head group {i} ({self.groups[i].mechanism}, heads {start}-{end - 1})"

    def unsupported(
        self,
        *,
        causal: bool = False,
        attention_mask: Tensor | None = None,
        mask: MaskFunction | None = None,
        score_bias: ScoreBias | None = None,
        decoding: bool = False,
    ) -> list[str]:
        """Every reason, per group, why the mix cannot honour a request (empty: it can)."""
        reasons = []
        for i, mechanism in enumerate(self.group_mechanisms()):
            own = mechanism._unsupported(causal=causal, attention_mask=attention_mask, mask=mask, score_bias=score_bias)
            if decoding and mechanism.capabilities.decoding is None:
                own.append("it has no incremental decoding state (generate with use_cache=False)")
            reasons += [f"{self._where(i)}: {reason}" for reason in own]
        return reasons

    def _refuse(self, reasons: list[str]) -> None:
        if reasons:
            raise ValueError(f"the per-head mix {self.name!r} cannot do this: " + "; ".join(reasons))

    @property
    def supports_score_bias(self) -> bool:
        """True when every group accepts an additive score bias (ALiBi, T5)."""
        return all(m.capabilities.score_bias for m in self.group_mechanisms())

    # -- forward ----------------------------------------------------------------------
    def _call_kwargs(self, call_kwargs: dict[str, Any]) -> list[dict[str, Any]]:
        """Each group's share of the per-call options: those its mechanism accepts."""
        mechanisms = self.group_mechanisms()
        taken = {name for m in mechanisms for name in m.call_options}
        unknown = sorted(set(call_kwargs) - taken)
        if unknown:
            raise TypeError(
                f"no head group of the per-head mix {self.name!r} accepts per-call argument(s) "
                f"{', '.join(unknown)}; accepted: {', '.join(sorted(taken)) or 'none'}"
            )
        return [{k: v for k, v in call_kwargs.items() if k in m.call_options} for m in mechanisms]

    def _check_heads(self, q: Tensor) -> None:
        if q.dim() != 4 or q.shape[1] != self.heads:
            raise ValueError(
                f"the per-head mix {self.name!r} needs queries with {self.heads} heads (B, H, T, D), "
                f"got shape {tuple(q.shape)}"
            )

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
        """Attend each group's heads with its mechanism.

        Args:
            q: ``(B, H, T, D)`` queries of all heads.
            k: ``(B, H, S, D)`` keys, already expanded to ``H`` heads (as a mechanism receives them).
            v: ``(B, H, S, Dv)`` values.
            causal, attention_mask, mask, score_bias: as for a mechanism; the mask and bias see the
                layer's head indices.
            **call_kwargs: per-call options, each passed to the groups that accept it.

        Returns:
            ``(B, H, T, Dv)``: the groups' outputs concatenated in head order.
        """
        self._check_heads(q)
        self._refuse(self.unsupported(causal=causal, attention_mask=attention_mask, mask=mask, score_bias=score_bias))
        shares = self._call_kwargs(call_kwargs)
        outputs = []
        for mechanism, (start, end), share in zip(self.group_mechanisms(), self.head_ranges, shares):
            outputs.append(
                mechanism(
                    q[:, start:end],
                    k[:, start:end],
                    v[:, start:end],
                    causal=causal,
                    attention_mask=attention_mask,
                    mask=_mask_from(mask, start),
                    score_bias=_bias_from(score_bias, start),
                    **share,
                )
            )
        return torch.cat(outputs, dim=1)  # (B, H, T, Dv), heads back in order

    # -- decoding -----------------------------------------------------------------------
    def new_state(self) -> MixedState:
        """One fresh decoding state per group.

        Raises:
            ValueError: some group's mechanism has no decoding state (every such group listed).
        """
        self._refuse(self.unsupported(decoding=True))
        return MixedState([m.new_state() for m in self.group_mechanisms()])

    def decode(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        state: MixedState,
        *,
        attention_mask: Tensor | None = None,
        score_bias: ScoreBias | None = None,
    ) -> Tensor:
        """Append ``t`` new positions to every group's state and attend causally.

        Args:
            q: ``(B, H, t, D)`` queries of the new positions.
            k: ``(B, H_kv, t, D)`` keys, with the layer's ``kv_heads`` heads (each group takes the
                key/value heads it owns).
            v: ``(B, H_kv, t, Dv)`` values.
            state: from :meth:`new_state`; updated in place.
            attention_mask: bool ``(B, t)`` for the new positions, True = real token.
            score_bias: as in :meth:`forward`.

        Returns:
            ``(B, H, t, Dv)``, equal to the last ``t`` rows of a causal :meth:`forward` over the
            whole sequence.
        """
        self._check_heads(q)
        if not isinstance(state, MixedState) or len(state.states) != len(self.groups):
            raise ValueError(f"state must come from this layer's new_state(), got {type(state).__name__}")
        if k.shape[1] != self.kv_heads:
            raise ValueError(f"decode needs keys with kv_heads={self.kv_heads} heads, got {tuple(k.shape)}")
        self._refuse(self.unsupported(causal=True, attention_mask=attention_mask, score_bias=score_bias))
        per_kv = self.heads // self.kv_heads
        outputs = []
        for mechanism, (start, end), group_state in zip(self.group_mechanisms(), self.head_ranges, state.states):
            kv = slice(start // per_kv, end // per_kv)  # the key/value heads this group owns
            outputs.append(
                mechanism.decode(
                    q[:, start:end],
                    k[:, kv],
                    v[:, kv],
                    group_state,
                    attention_mask=attention_mask,
                    score_bias=_bias_from(score_bias, start),
                )
            )
        return torch.cat(outputs, dim=1)

    def after_optimizer_step(self) -> None:
        """Nothing of its own: the groups' mechanisms are visited by ``after_optimizer_step(model)``."""

    def extra_repr(self) -> str:
        return f"heads={self.heads}, kv_heads={self.kv_heads}"
