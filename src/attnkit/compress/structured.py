"""The structured-pruning procedure that attention heads and feed-forward channels share.

:func:`prune_units` is the whole of :func:`~attnkit.compress.prune_heads` and
:func:`~attnkit.compress.prune_ffn` but for what a unit is: it checks the request, finds the
layers, ranks the units by importance (or takes the ones ``amount`` names), checks every layer
before changing any, removes the units, records what each layer keeps and returns the
:class:`~attnkit.compress.records.PruneResult`. A :class:`Units` says what a unit is for one
kind: which layers hold them, how many each has, how they are scored and how they are removed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Generic, TypeVar, cast

from torch import Tensor, nn

from attnkit.compress.importance import (
    check_amount_fraction,
    choose_global,
    normalise_per_layer,
    parse_explicit,
    ranking_score,
)
from attnkit.compress.records import PruneResult, count_parameters, record_of
from attnkit.core.errors import check_positive_int

Layer = TypeVar("Layer", bound=nn.Module)


class Units(ABC, Generic[Layer]):
    """One kind of prunable unit, as :func:`prune_units` needs it (subclasses are stateless).

    Units may be ranked in groups that go together (grouped-query attention: a key/value head
    and the query heads it serves); without groups, a group is one unit.
    """

    #: ``CompressionRecord`` table and ``PruneResult.kind``: ``"heads"`` or ``"ffn"``.
    kind: ClassVar[str]
    #: What the units are called in messages, plural (``"heads"``, ``"channels"``).
    unit: ClassVar[str]
    #: The layers that hold them.
    layer_class: ClassVar[type[nn.Module]]

    def paths(self, model: nn.Module) -> list[str]:
        """Module paths of the layers that hold units, in module order (the layer indices)."""
        return paths_of(model, self.layer_class)

    @abstractmethod
    def check(self, path: str, layer: Layer) -> None:
        """Refuse a layer that cannot be pruned (checked for every layer before any changes)."""

    @abstractmethod
    def size(self, layer: Layer) -> int:
        """The layer's current number of units."""

    @abstractmethod
    def group_scores(
        self, model: nn.Module, layers: Mapping[str, Layer], score: str, data: Any, max_batches: int
    ) -> dict[str, Tensor]:
        """Raw importance of every group, per layer path: ``(groups,)`` float64, not normalised."""

    def ranked(self, layers: Mapping[str, Layer]) -> str:
        """What the ranked groups are called in a refusal of ``amount``."""
        return self.unit

    def members(self, layer: Layer, groups: Sequence[int]) -> list[int]:
        """The units of ``groups`` (a group is one unit unless a subclass says otherwise)."""
        return list(groups)

    def check_keep(self, layer: Layer, keep: list[int]) -> None:
        """Refuse keeping units ``keep`` of ``layer`` (all refusals come before any change)."""

    @abstractmethod
    def remove(self, layer: Layer, keep: list[int]) -> None:
        """Keep only units ``keep`` (sorted, current numbering) of ``layer``, in place."""


def prune_units(
    model: nn.Module,
    amount: float | Mapping[Any, Sequence[int]],
    units: Units[Layer],
    *,
    score: str | None,
    data: Any,
    max_batches: int,
) -> PruneResult:
    """Remove ``units`` from ``model`` for real, in place (see :func:`~attnkit.compress.prune_heads`).

    Args:
        model: the model holding the layers.
        amount: a fraction in ``[0, 1)`` of all units, the globally least important groups
            (``round(amount · total)``, never a layer's last); or ``{layer: [units]}`` with
            ``layer`` an index into ``units.paths(model)`` or a module path.
        units: what a unit is.
        score: ``"gradient"`` (the default; needs ``data``) or ``"magnitude"``; refused with a
            dict ``amount`` (so is ``data``).
        data: an iterable of :class:`~attnkit.data.tasks.Batch` to score on.
        max_batches: batches of ``data`` to use.

    Returns:
        What was done; ``model.compression_record`` holds the original units each layer keeps.

    Raises:
        ValueError: a bad ``amount`` or ``score``, missing ``data``, a layer that cannot be
            pruned; nothing is changed then.
    """
    used_score = ranking_score(amount, score, data, unit=units.unit)
    check_positive_int("max_batches", max_batches, example=8)
    names = units.paths(model)
    if not names:
        raise ValueError(f"model has no {units.layer_class.__name__} layers: there are no {units.unit} to prune")
    layers = {name: cast(Layer, model.get_submodule(name)) for name in names}
    for name, layer in layers.items():  # refuse what cannot be done before changing anything
        units.check(name, layer)
    before = count_parameters(model)
    sizes = {name: units.size(layer) for name, layer in layers.items()}
    importance: dict[str, list[float]] = {}
    if isinstance(amount, Mapping):
        removed = parse_explicit(amount, sizes, unit=units.unit, layers_hint=f"layers: {names}")
    else:
        fraction = check_amount_fraction(amount)
        scores = normalise_per_layer(units.group_scores(model, layers, used_score, data, max_batches))
        groups = choose_global(scores, fraction, unit=units.ranked(layers))
        removed = {name: units.members(layers[name], chosen) for name, chosen in groups.items()}
        importance = {name: s.tolist() for name, s in scores.items()}
    keeps = {name: _complement(sizes[name], gone) for name, gone in removed.items() if gone}
    for name, keep in keeps.items():  # check every layer before changing any
        try:
            units.check_keep(layers[name], keep)
        except ValueError as err:
            raise ValueError(f"amount: {name}: {err}") from None
    record = record_of(model)
    for name, keep in keeps.items():
        units.remove(layers[name], keep)
        record.keep(units.kind, name, keep, sizes[name])
    return PruneResult(
        kind=units.kind,
        score=used_score,
        units_before=sizes,
        units_after={name: units.size(layer) for name, layer in layers.items()},
        removed={name: gone for name, gone in removed.items() if gone},
        importance=importance,
        parameters_before=before,
        parameters_after=count_parameters(model),
    )


def _complement(size: int, gone: Sequence[int]) -> list[int]:
    removed = set(gone)
    return [u for u in range(size) if u not in removed]


def paths_of(model: nn.Module, layer_class: type[nn.Module]) -> list[str]:
    """Module paths of ``model``'s ``layer_class`` modules, in module order."""
    return [name for name, m in model.named_modules() if isinstance(m, layer_class)]
