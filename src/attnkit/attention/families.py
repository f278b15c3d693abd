"""Capabilities that mechanisms share because they compute attention the same way (a support module).

What a mechanism can do mostly follows from how it computes attention, so it is written once
here, and a mechanism's registration adds only what is its own (complexity, error budget,
summary):

- :func:`dense_capabilities`: mechanisms that score every key (``full``, ``topk``) take
  everything :func:`~attnkit.attention.dense.dense_attention` takes: causal, key padding,
  cross-attention, custom masks, score biases, and a growing KV cache for decoding.
- :func:`approximate_capabilities`: the approximate families, one row of :data:`FAMILIES` each.
  All honour key padding exactly. ``kernel`` (``linear``, ``performer``: ``φ(q)·φ(k)`` on
  :mod:`attnkit.kernels.prefix`) is exactly causal through the chunked prefix core, takes
  cross-attention and decodes with a recurrent state that does not grow with the context.
  ``low_rank`` (``linformer``, ``nystrom``) summarises keys and values along the whole
  sequence, so it cannot be causal (each mechanism's ``no_causal_reason`` says how) and has
  no incremental decoding. ``hashing`` (``lsh``, ``routing``, ``sinkhorn``) buckets or sorts the
  queries and keys of one sequence together: causal by original positions, no
  cross-attention. Its causal placement depends on earlier tokens only (a token's bucket and
  its rank among the earlier tokens of that bucket; Sinkhorn's fixed blocks and their sort from
  earlier blocks), so each member decodes exactly from a state of its own: the keys and values
  with their buckets (or blocks), plus counts of the queries placed, which a key/value cache
  cannot supply. That state is declared ``"bucket_cache"``: kept and updated by the mechanism
  itself (as :mod:`attnkit.hf.cache` does for it), growing ``O(T)`` like a key/value cache.

The exact sparse family's helper is :func:`attnkit.attention.pattern.pattern_capabilities`,
next to the base class that gives those capabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

from attnkit.core.capabilities import Capabilities, DecodingKind, Family


@dataclass(frozen=True)
class FamilyTraits:
    """What every member of an approximate family can do (see the module docstring for why).

    Attributes:
        causal: supports ``causal=True`` exactly.
        cross_attention: accepts keys/values of another length than the queries.
        decoding: the incremental decoding state, or None.
        complexity: the family's time complexity, or None when each member states its own.
    """

    causal: bool
    cross_attention: bool
    decoding: DecodingKind | None
    complexity: str | None = None


FAMILIES: dict[Family, FamilyTraits] = {
    "kernel": FamilyTraits(causal=True, cross_attention=True, decoding="recurrent", complexity="O(N)"),
    "low_rank": FamilyTraits(causal=False, cross_attention=True, decoding=None, complexity="O(N)"),
    "hashing": FamilyTraits(causal=True, cross_attention=False, decoding="bucket_cache"),
}


def approximate_capabilities(
    family: Family, *, error_budget: float, summary: str, complexity: str | None = None
) -> Capabilities:
    """The capabilities of an approximate mechanism of ``family`` (a key of :data:`FAMILIES`).

    Args:
        family: ``"kernel"``, ``"low_rank"`` or ``"hashing"``.
        error_budget: the documented relative error against softmax attention.
        summary: one line for listings.
        complexity: time complexity; required for a family without one of its own (``hashing``).

    Raises:
        ValueError: an unknown family, or no complexity for it.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(map(repr, FAMILIES))}, got {family!r}")
    traits = FAMILIES[family]
    chosen = complexity if complexity is not None else traits.complexity
    if chosen is None:
        raise ValueError(f"family {family!r} has no common complexity: pass complexity='O(...)'")
    return Capabilities(
        exact=False,
        causal=traits.causal,
        key_padding=True,
        cross_attention=traits.cross_attention,
        decoding=traits.decoding,
        complexity=chosen,
        family=family,
        error_budget=error_budget,
        summary=summary,
    )


def dense_capabilities(
    *, exact: bool, complexity: str, family: Family, summary: str, error_budget: float | None = None
) -> Capabilities:
    """The capabilities of a mechanism that scores every key (``full``, ``topk``).

    Args:
        exact: whether the output is softmax attention over every visible key.
        complexity: time complexity in the sequence length.
        family: the family listings put it in.
        summary: one line for listings.
        error_budget: required when not ``exact``.
    """
    return Capabilities(
        exact=exact,
        causal=True,
        key_padding=True,
        cross_attention=True,
        decoding="kv_cache",
        complexity=complexity,
        family=family,
        score_bias=True,
        custom_mask=True,
        error_budget=error_budget,
        summary=summary,
    )
