"""Train a model you built on batches you supply, with the trainer's optimisation and hooks.

:class:`~attnkit.train.trainer.Trainer` owns a whole run described by a ``TrainConfig``: the
data, checkpoints, logs, evaluation. Code that builds its own model and batches (the arena's
quality cells) calls :func:`train_on_batches` instead: the same AdamW parameter groups (weight
decay on matrices only), the same warm-up + cosine schedule
(:func:`~attnkit.train.schedule.learning_rate`), the same loss, gradient clipping and, after
every optimizer step, the mechanisms' post-step hooks
(:func:`~attnkit.core.base.after_optimizer_step`: Routing's k-means centroids move there).
:func:`optimizer_update` is that update after the backward pass, for any loop.

Example::

    from attnkit.train.loop_api import train_on_batches
    losses = train_on_batches(model, batches, lr=1e-2, warmup_steps=12)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from attnkit.core.base import after_optimizer_step
from attnkit.data.tasks import Batch
from attnkit.train.modeling import forward, summed_loss
from attnkit.train.schedule import learning_rate


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: decay on matrices only (biases, norms and other vectors are not decayed)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def optimizer_update(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    lr: float,
    grad_clip: float,
    scaler: torch.amp.GradScaler | None = None,
) -> float:
    """Apply the accumulated gradients: set the rate, clip, step, run the post-step hooks, zero the grads.

    Args:
        model: the model whose parameters ``optimizer`` updates (its mechanisms' hooks run).
        optimizer: the optimizer, gradients already accumulated by ``backward``.
        lr: the learning rate of this step (set on every parameter group).
        grad_clip: clip the global gradient norm to this (0 disables).
        scaler: the fp16 loss scaler, if any (the gradients are unscaled before clipping).

    Returns:
        The global gradient norm before clipping.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    if scaler is not None:
        scaler.unscale_(optimizer)
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    after_optimizer_step(model)  # online mechanism state, e.g. Routing's k-means centroids
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)


def train_on_batches(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    lr: float,
    warmup_steps: int = 0,
    max_steps: int | None = None,
    min_lr_ratio: float = 0.1,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.98),
    grad_clip: float = 1.0,
    device: torch.device | str | None = None,
) -> list[float]:
    """One AdamW step per batch, as :class:`~attnkit.train.trainer.Trainer` takes them (one process, fp32).

    The defaults are ``TrainConfig``'s. Each batch's loss is the mean cross-entropy over its
    counted targets (``IGNORE_INDEX`` elsewhere).

    Args:
        model: an attnkit model (``model(input_ids, attention_mask=...)``, or an encoder-decoder).
        batches: the training batches, in order; the schedule's length is their number unless
            ``max_steps`` says otherwise.
        lr: peak learning rate.
        warmup_steps: linear warm-up steps.
        max_steps: where the cosine decay ends (default: the number of batches).
        min_lr_ratio: the final rate as a fraction of ``lr`` (1.0 keeps it constant after warm-up).
        weight_decay: decoupled weight decay, on matrices only.
        betas: AdamW betas.
        grad_clip: clip the global gradient norm to this (0 disables).
        device: where batches are moved (default: the model's parameters' device).

    Returns:
        The loss of every step.

    Raises:
        ValueError: a bad setting (the argument is named).
    """
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be a positive number, got {lr!r} (set lr=1e-3, say)")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be a non-negative integer, got {warmup_steps!r}")
    if max_steps is None:
        batches = list(batches)
        max_steps = len(batches)
    if device is None:
        device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas)
    losses = []
    model.train()
    for step, batch in enumerate(batches, start=1):
        batch = batch.to(device)
        loss = summed_loss(forward(model, batch), batch.labels) / max(batch.num_targets, 1)
        loss.backward()
        rate = learning_rate(step, lr=lr, warmup_steps=warmup_steps, max_steps=max_steps, min_lr_ratio=min_lr_ratio)
        optimizer_update(model, optimizer, lr=rate, grad_clip=grad_clip)
        losses.append(float(loss.detach()))
    return losses
