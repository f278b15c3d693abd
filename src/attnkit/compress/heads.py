"""Structured removal of whole attention heads: smaller projections, fewer heads per layer.

Removing query head ``h`` of a :class:`~attnkit.attention.multi_head.MultiHeadAttention` drops its
``head_dim`` rows of ``to_q``, its ``head_dim`` columns of ``to_out`` and every piece of per-head
state (ALiBi slopes, T5 bias columns, a mechanism's own per-head buffers); the result equals the
unpruned layer with those ``to_out`` columns zeroed (tested in float64), and does less work.

Grouped-query attention: query heads ``g·r .. g·r + r - 1`` share key/value head ``g``
(``r = heads // kv_heads``), so heads go by whole groups: the group's ``r`` query heads and its
key/value rows together. A request that splits a group is refused.

Mechanism state: each registered mechanism is declared here as holding no per-head state or
with a function that slices it (Routing's per-head k-means centroids); a mechanism that is not
declared is refused rather than guessed at (:func:`register_head_state` declares a new one).

Importance: the gradient score of Michel et al. 2019 (:mod:`attnkit.compress.importance`) or a
magnitude score: a head's ``‖W_out[:, head]‖_F · ‖W_v[head]‖_F`` (its output scale for unit-norm
attention weights); a group's ``sqrt(Σ_h ‖W_out[:, h]‖²) · ‖W_v[group]‖``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from attnkit.attention.head_groups import MixedHeads
from attnkit.attention.multi_head import MultiHeadAttention
from attnkit.compress.importance import SCORES, gate_gradients, require_float_linears, slice_linear
from attnkit.compress.records import PruneResult
from attnkit.compress.structured import Units, paths_of, prune_units
from attnkit.core.base import AttentionMechanism
from attnkit.core.errors import check_choice, check_positive_int
from attnkit.positions.relative import ALiBi, T5RelativeBias

#: ``slicer(mechanism, keep, heads, head_dim)``: keep the per-head state of query heads ``keep``
#: (long ``(H',)``) of ``heads`` heads of width ``head_dim``, in place.
HeadStateSlicer = Callable[[AttentionMechanism, Tensor, int, int], None]


def _slice_routing(mechanism: AttentionMechanism, keep: Tensor, heads: int, head_dim: int) -> None:
    from attnkit.attention.routing import RoutingAttention

    assert isinstance(mechanism, RoutingAttention)
    # Centroids are created on first use; create the original heads' ones now, so the kept
    # heads keep exactly the centroids they would have had.
    centroids = mechanism._centroids_for(heads, head_dim, mechanism.centroids.device)
    mechanism.centroids = centroids[keep.to(centroids.device)].clone()
    if mechanism._pending is not None:  # a training forward's statistics, not yet applied
        sums, counts = mechanism._pending
        mechanism._pending = (sums[keep.to(sums.device)], counts[keep.to(counts.device)])


#: Registered mechanism name -> how its per-head state is sliced (None: it holds none; its
#: parameters and buffers, if any, are shared by all heads).
_HEAD_STATE: dict[str, HeadStateSlicer | None] = {
    "full": None,
    "bigbird": None,  # the random-block pattern depends on (seed, block, block), not on the head
    "sliding_window": None,
    "fixed": None,
    "longformer": None,
    "strided": None,
    "block_local": None,  # the block-diagonal, axial and log-sparse patterns hold no per-head state
    "axial": None,
    "fan_out": None,
    "topk": None,
    "dynamic_block": None,  # the learned gate's scorer is shared by all heads
    "nsa": None,  # the compression's pooling weights and the branch gates are shared by all heads
    "lsh": None,  # random rotations shared by all heads
    "routing": _slice_routing,  # centroids (heads, clusters, head_dim)
    "sinkhorn": None,
    "linear": None,
    "linformer": None,  # sequence projections (proj_len, max_len) shared by all heads
    "nystrom": None,
    "performer": None,  # random features (nb_features, head_dim) shared by all heads
}


def register_head_state(name: str, slicer: HeadStateSlicer | None) -> None:
    """Declare how mechanism ``name`` keeps a subset of its heads (None: no per-head state)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a registered mechanism name, got {name!r}")
    if slicer is not None and not callable(slicer):
        raise ValueError(f"slicer must be callable or None, got {type(slicer).__name__}")
    _HEAD_STATE[name] = slicer


def _single_mechanism(attention: MultiHeadAttention) -> AttentionMechanism:
    """The layer's mechanism; a layer that mixes mechanisms per head is refused (removing heads would
    re-split its head groups, which is not implemented)."""
    if isinstance(attention.attention, MixedHeads):
        raise ValueError(
            f"head pruning does not support a layer that mixes mechanisms per head ({attention.attention.name}); "
            "prune the other layers only: pass amount as {layer path: heads to remove} without this layer"
        )
    return attention.attention


def head_state_slicer(mechanism: AttentionMechanism) -> HeadStateSlicer | None:
    """The declared slicer of ``mechanism``'s per-head state.

    Raises:
        ValueError: the mechanism has not been declared (see :func:`register_head_state`).
    """
    name = mechanism.name
    if name not in _HEAD_STATE:
        raise ValueError(
            f"attention {name!r} is not known to head pruning: it may keep per-head state that would have to be "
            "sliced. Declare it with attnkit.compress.register_head_state(name, slicer) "
            "(slicer=None if it keeps none)"
        )
    return _HEAD_STATE[name]


def attention_layers(model: nn.Module) -> list[str]:
    """Paths of the model's :class:`MultiHeadAttention` modules, in module order (the layer indices)."""
    return paths_of(model, MultiHeadAttention)


def _group_size(attention: MultiHeadAttention) -> int:
    return attention.heads // attention.kv_heads


def _kept_groups(attention: MultiHeadAttention, kept: list[int]) -> list[int]:
    """The key/value groups that query heads ``kept`` (sorted, unique) make up; refuses a split group."""
    heads, r = attention.heads, _group_size(attention)
    if not kept or kept[0] < 0 or kept[-1] >= heads:
        raise ValueError(f"keep must list some of the {heads} heads (0..{heads - 1}), got {kept}")
    groups = sorted({h // r for h in kept})
    if [h for g in groups for h in range(g * r, (g + 1) * r)] != kept:
        raise ValueError(
            f"with grouped-query attention ({heads} query heads, kv_heads={attention.kv_heads}: "
            f"{r} query heads per key/value head) heads go by whole groups "
            f"{[list(range(g * r, (g + 1) * r)) for g in range(attention.kv_heads)]}; "
            f"keeping {kept} would split one (remove whole groups)"
        )
    return groups


def remove_heads(attention: MultiHeadAttention, keep: Sequence[int]) -> None:
    """Keep only query heads ``keep`` of ``attention`` (in place; whole key/value groups).

    Args:
        attention: the layer.
        keep: query-head indices to keep (current numbering).

    Raises:
        ValueError: an empty or out-of-range ``keep``, a ``keep`` that splits a key/value group,
            an undeclared mechanism, or projections that are no longer ``nn.Linear``.
    """
    heads, width = attention.heads, attention.head_dim
    kept = sorted(set(keep))
    groups = _kept_groups(attention, kept)
    mechanism = _single_mechanism(attention)
    slicer = head_state_slicer(mechanism)
    device = attention.to_q.weight.device
    q_rows = torch.tensor([h * width + d for h in kept for d in range(width)], device=device)
    kv_rows = torch.tensor([g * width + d for g in groups for d in range(width)], device=device)
    index = torch.tensor(kept, device=device)
    attention.to_q = slice_linear(attention.to_q, rows=q_rows)
    attention.to_k = slice_linear(attention.to_k, rows=kv_rows)
    attention.to_v = slice_linear(attention.to_v, rows=kv_rows)
    attention.to_out = slice_linear(attention.to_out, columns=q_rows)
    bias = attention.position_bias
    if isinstance(bias, ALiBi):
        bias.slopes = bias.slopes[index.to(bias.slopes.device)]
    elif isinstance(bias, T5RelativeBias):
        table = bias.bias.weight.detach()
        new = nn.Embedding(table.shape[0], len(kept), device=table.device, dtype=table.dtype)
        with torch.no_grad():
            new.weight.copy_(table[:, index.to(table.device)])
        bias.bias = new
    if slicer is not None:
        slicer(mechanism, index, heads, width)
    attention.heads, attention.kv_heads = len(kept), len(groups)


def _magnitude(attention: MultiHeadAttention) -> Tensor:
    """Per key/value group: ``sqrt(Σ_h ‖W_out[:, h]‖²) · ‖W_v[group]‖`` (float64)."""
    width, r = attention.head_dim, _group_size(attention)
    out = attention.to_out.weight.detach().double()  # (dim, heads * width)
    value = attention.to_v.weight.detach().double()  # (kv_heads * width, dim)
    out_sq = out.pow(2).sum(dim=0).view(attention.kv_heads, r * width).sum(dim=1)
    value_norm = value.pow(2).sum(dim=1).view(attention.kv_heads, width).sum(dim=1).sqrt()
    return (out_sq.sqrt() * value_norm).cpu()


def _group_scores(
    model: nn.Module, layers: Mapping[str, MultiHeadAttention], score: str, data: Any, max_batches: int
) -> dict[str, Tensor]:
    if score == "magnitude":
        return {name: _magnitude(a) for name, a in layers.items()}
    per_head = gate_gradients(
        model, data, {name: (a.to_out, a.heads) for name, a in layers.items()}, max_batches=max_batches
    )
    # A group goes as one: its score is the sum of its heads' (first-order effect of gating all of them).
    return {name: per_head[name].view(a.kv_heads, _group_size(a)).sum(dim=1) for name, a in layers.items()}


def head_importance(
    model: nn.Module, *, score: str = "gradient", data: Any = None, max_batches: int = 8
) -> dict[str, Tensor]:
    """Importance of every key/value group (= head without grouped-query attention), per layer.

    Args:
        model: a model holding :class:`MultiHeadAttention` layers.
        score: ``"gradient"`` (Michel et al. 2019, needs ``data``) or ``"magnitude"``.
        data: an iterable of :class:`~attnkit.data.tasks.Batch` (gradient score).
        max_batches: batches of ``data`` to use.

    Returns:
        layer path -> ``(kv_heads,)`` float64 scores, not normalised.
    """
    check_choice("score", score, SCORES)
    check_positive_int("max_batches", max_batches, example=8)
    layers = {name: model.get_submodule(name) for name in attention_layers(model)}
    if not layers:
        raise ValueError("model has no MultiHeadAttention layers to score")
    return _group_scores(model, layers, score, data, max_batches)  # type: ignore[arg-type]


def prune_heads(
    model: nn.Module,
    amount: float | Mapping[Any, Sequence[int]] = 0.3,
    *,
    score: str | None = None,
    data: Any = None,
    max_batches: int = 8,
) -> tuple[nn.Module, PruneResult]:
    """Remove attention heads for real (smaller projections), in place.

    Args:
        model: an attnkit model (or any module holding :class:`MultiHeadAttention` layers).
        amount: a fraction in ``[0, 1)`` of all heads (key/value groups with grouped-query
            attention), chosen globally by importance, ``round(amount · total)`` of them, never
            a layer's last; or ``{layer: [query heads]}`` with ``layer`` an index into
            :func:`attention_layers` or a module path.
        score: ``"gradient"`` (the default; needs ``data``) or ``"magnitude"`` (see the module
            docstring); refused with a dict ``amount``, which names the heads itself (so is ``data``).
            Ignored when ``amount`` is a dict (the heads are given).
        data: an iterable of :class:`~attnkit.data.tasks.Batch` to score on.
        max_batches: batches of ``data`` to use.

    Returns:
        ``(model, result)``; ``model.compression_record`` now holds the kept original heads, so
        :func:`attnkit.compress.save_compressed` / :func:`~attnkit.compress.load_compressed`
        round-trip the pruned shapes.

    Raises:
        ValueError: a bad ``amount`` (too many heads, all heads of a layer, a split key/value
            group, unknown layers), a bad ``score``, missing ``data``, an undeclared mechanism.
    """
    return model, prune_units(model, amount, _HEADS, score=score, data=data, max_batches=max_batches)


class _Heads(Units[MultiHeadAttention]):
    """Query heads, ranked and removed by whole key/value groups."""

    kind = "heads"
    unit = "heads"
    layer_class = MultiHeadAttention

    def check(self, path: str, layer: MultiHeadAttention) -> None:
        if not isinstance(layer.attention, MixedHeads):  # a mix is refused only if asked to lose heads (check_keep)
            head_state_slicer(layer.attention)
        require_float_linears({f"{path}.{p}": getattr(layer, p) for p in ("to_q", "to_k", "to_v", "to_out")})

    def size(self, layer: MultiHeadAttention) -> int:
        return layer.heads

    def group_scores(
        self, model: nn.Module, layers: Mapping[str, MultiHeadAttention], score: str, data: Any, max_batches: int
    ) -> dict[str, Tensor]:
        return _group_scores(model, layers, score, data, max_batches)

    def ranked(self, layers: Mapping[str, MultiHeadAttention]) -> str:
        return "heads (key/value groups)" if _any_grouped(layers) else "heads"

    def members(self, layer: MultiHeadAttention, groups: Sequence[int]) -> list[int]:
        r = _group_size(layer)
        return [h for g in groups for h in range(g * r, (g + 1) * r)]

    def check_keep(self, layer: MultiHeadAttention, keep: list[int]) -> None:
        _single_mechanism(layer)
        _kept_groups(layer, keep)

    def remove(self, layer: MultiHeadAttention, keep: list[int]) -> None:
        remove_heads(layer, keep)


_HEADS = _Heads()


def _any_grouped(layers: Mapping[str, MultiHeadAttention]) -> bool:
    return any(_group_size(a) > 1 for a in layers.values())
