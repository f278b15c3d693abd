"""Structured removal of feed-forward hidden channels: narrower ``w_in`` and ``w_out``.

Channel ``c`` of a :class:`~attnkit.models.layers.FeedForward` is row ``c`` of ``w_in`` (GELU;
with SwiGLU, gate row ``c`` and value row ``hidden + c``, since the module splits ``w_in``'s
output in halves) and column ``c`` of ``w_out``. Removing it equals the unpruned layer with that
``w_out`` column zeroed, and saves ``(2 or 3) · dim`` multiply-adds per token.

Importance: the gradient score of Michel et al. 2019 with a gate per channel
(:mod:`attnkit.compress.importance`), or a magnitude score: the product of the norms of the rows
feeding the channel and of its output column (``‖w_in[c]‖ · ‖w_out[:, c]‖``; SwiGLU:
``‖gate_c‖ · ‖value_c‖ · ‖w_out[:, c]‖``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from attnkit.compress.importance import gate_gradients, require_float_linears, slice_linear
from attnkit.compress.records import PruneResult
from attnkit.compress.structured import Units, paths_of, prune_units
from attnkit.models.layers import FeedForward


def feed_forward_layers(model: nn.Module) -> list[str]:
    """Paths of the model's :class:`FeedForward` modules, in module order (the layer indices)."""
    return paths_of(model, FeedForward)


def _width(ff: FeedForward) -> int:
    return ff.w_out.in_features


def remove_channels(ff: FeedForward, keep: Sequence[int]) -> None:
    """Keep only hidden channels ``keep`` of ``ff`` (in place).

    Raises:
        ValueError: an empty or out-of-range ``keep``, or weights that are no longer ``nn.Linear``.
    """
    hidden = _width(ff)
    kept = sorted(set(keep))
    if not kept or kept[0] < 0 or kept[-1] >= hidden:
        raise ValueError(f"keep must list some of the {hidden} channels (0..{hidden - 1}), got {list(keep)}")
    index = torch.tensor(kept, device=ff.w_out.weight.device)
    rows = torch.cat([index, index + hidden]) if ff.activation == "swiglu" else index
    ff.w_in = slice_linear(ff.w_in, rows=rows)
    ff.w_out = slice_linear(ff.w_out, columns=index)


def _magnitude(ff: FeedForward) -> Tensor:
    hidden = _width(ff)
    feeding = ff.w_in.weight.detach().double().norm(dim=1)  # (hidden or 2 * hidden,)
    if ff.activation == "swiglu":
        feeding = feeding[:hidden] * feeding[hidden:]
    return (feeding * ff.w_out.weight.detach().double().norm(dim=0)).cpu()


def prune_ffn(
    model: nn.Module,
    amount: float | Mapping[Any, Sequence[int]] = 0.3,
    *,
    score: str | None = None,
    data: Any = None,
    max_batches: int = 8,
) -> tuple[nn.Module, PruneResult]:
    """Remove feed-forward hidden channels for real (narrower weights), in place.

    Args:
        model: an attnkit model (or any module holding :class:`FeedForward` layers).
        amount: a fraction in ``[0, 1)`` of all channels, chosen globally by importance
            (``round(amount · total)``, never a layer's last); or ``{layer: [channels]}`` with
            ``layer`` an index into :func:`feed_forward_layers` or a module path.
        score: ``"gradient"`` (the default; needs ``data``) or ``"magnitude"``; refused with a dict
            ``amount``, which names the channels itself (so is ``data``).
        data: an iterable of :class:`~attnkit.data.tasks.Batch` to score on.
        max_batches: batches of ``data`` to use.

    Returns:
        ``(model, result)``; ``model.compression_record`` holds the kept original channels.

    Raises:
        ValueError: a bad ``amount`` (too many channels, all of a layer, unknown layers), a bad
            ``score``, missing ``data``, or a model already quantized.
    """
    return model, prune_units(model, amount, _CHANNELS, score=score, data=data, max_batches=max_batches)


class _Channels(Units[FeedForward]):
    """Feed-forward hidden channels, ranked one by one."""

    kind = "ffn"
    unit = "channels"
    layer_class = FeedForward

    def check(self, path: str, layer: FeedForward) -> None:
        require_float_linears({f"{path}.w_in": layer.w_in, f"{path}.w_out": layer.w_out})

    def size(self, layer: FeedForward) -> int:
        return _width(layer)

    def group_scores(
        self, model: nn.Module, layers: Mapping[str, FeedForward], score: str, data: Any, max_batches: int
    ) -> dict[str, Tensor]:
        if score == "magnitude":
            return {name: _magnitude(ff) for name, ff in layers.items()}
        targets = {name: (ff.w_out, _width(ff)) for name, ff in layers.items()}
        return gate_gradients(model, data, targets, max_batches=max_batches)

    def ranked(self, layers: Mapping[str, FeedForward]) -> str:
        return "feed-forward channels"

    def remove(self, layer: FeedForward, keep: list[int]) -> None:
        remove_channels(layer, keep)


_CHANNELS = _Channels()
