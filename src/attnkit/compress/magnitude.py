"""Unstructured magnitude pruning of the linear layers, through ``torch.nn.utils.prune``, made permanent.

The smallest-magnitude weights are set to zero: ``round(amount · n)`` of the ``n`` weights of
all target layers together (``scope="global"``: one threshold for the whole model, so layers with
many small weights lose more) or of each layer (``scope="layer"``). ``prune.remove`` then folds
the mask into the weight, so the model has plain parameters again (no ``weight_orig``/mask, no
hook) and saves and loads as any model. Biases are not pruned.

The zeros are stored densely: the gain is in how well the weights compress (and in what a sparse
kernel could skip), not in speed or in the size of ``model.safetensors``. Fine-tuning afterwards
lets zeroed weights grow back unless they are masked again.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils import prune

from attnkit.compress.records import MagnitudeResult, linear_targets
from attnkit.core.errors import check_choice

MAGNITUDE_SCOPES: tuple[str, ...] = ("global", "layer")


def prune_magnitude(
    model: nn.Module, amount: float, *, scope: str = "global", modules: Sequence[str] | None = None
) -> tuple[nn.Module, MagnitudeResult]:
    """Zero the smallest-magnitude linear weights, in place and permanently.

    Args:
        model: any module.
        amount: fraction of weights to zero, in ``[0, 1)``: ``round(amount · n)`` of them.
        scope: ``"global"`` (one ranking over all target weights) or ``"layer"`` (each layer alone).
        modules: paths of the ``nn.Linear`` layers to prune; default every ``nn.Linear`` whose
            weight is not tied to another module (a tied output projection is skipped, and said so).

    Returns:
        ``(model, result)`` with the sparsity of every pruned layer.

    Raises:
        ValueError: a bad ``amount`` or ``scope``, a module that is not an untied ``nn.Linear``.
    """
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0.0 <= amount < 1.0:
        raise ValueError(f"amount must be a fraction of weights in [0, 1) (0.5 zeros half), got {amount!r}")
    check_choice("scope", scope, MAGNITUDE_SCOPES)
    chosen, skipped = linear_targets(model, modules, action="pruned")
    with torch.no_grad():
        if scope == "global":
            prune.global_unstructured(
                [(m, "weight") for m in chosen.values()], pruning_method=prune.L1Unstructured, amount=float(amount)
            )
        else:
            for module in chosen.values():
                prune.l1_unstructured(module, "weight", amount=float(amount))
        for module in chosen.values():
            prune.remove(module, "weight")
    sparsity = {name: float((m.weight == 0).sum()) / m.weight.numel() for name, m in chosen.items()}
    zeros = sum(int((m.weight == 0).sum()) for m in chosen.values())
    total = sum(m.weight.numel() for m in chosen.values())
    return model, MagnitudeResult(
        scope=scope, amount=float(amount), sparsity=sparsity, zeros=zeros, total=total, skipped=skipped
    )
