"""The short training loop shared by distillation and the fine-tune after pruning.

:class:`attnkit.train.Trainer` builds its own model from a config and owns its loss, so a
given (pruned, or student) model is trained here, with the trainer's pieces: the batch-to-model
seam, its learning-rate schedule (linear warm-up, cosine decay), its decay/no-decay parameter
groups and the post-step hook for mechanism state (Routing's centroids).

:func:`finetune` keeps weights that magnitude pruning zeroed at zero (their gradient is
masked and they are re-zeroed after each step), so a fine-tune does not undo the sparsity.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from attnkit.compress.losses import label_loss
from attnkit.compress.records import DistillResult
from attnkit.core.errors import (
    check_non_negative_float,
    check_non_negative_int,
    check_positive_float,
    check_positive_int,
)
from attnkit.data.tasks import Batch

#: ``step_loss(batch) -> (loss to minimise, {component name: value})`` for one batch already on the device.
StepLoss = Callable[[Batch], tuple[Tensor, dict[str, Tensor]]]


def check_loop_settings(*, steps: int, lr: float, warmup_steps: int, weight_decay: float, grad_clip: float) -> None:
    """Refuse bad loop settings, naming the argument."""
    check_positive_int("steps", steps, example=1000)
    check_positive_float("lr", lr)
    check_non_negative_int("warmup_steps", warmup_steps)
    check_non_negative_float("weight_decay", weight_decay)
    check_non_negative_float("grad_clip", grad_clip)


def train_loop(
    model: nn.Module,
    data: Iterable[Batch],
    step_loss: StepLoss,
    *,
    steps: int,
    lr: float,
    warmup_steps: int = 0,
    weight_decay: float = 0.01,
    grad_clip: float = 1.0,
    log_every: int = 10,
    progress: bool = True,
    description: str = "train",
    after_step: Callable[[], None] | None = None,
) -> DistillResult:
    """Run ``steps`` AdamW steps of ``step_loss`` on ``model`` (in place), one batch of ``data`` each.

    Args:
        model: the model to train (its parameters' device is where batches go).
        data: an iterable of :class:`~attnkit.data.tasks.Batch`, at least ``steps`` long.
        step_loss: the loss of one batch and its named components (logged).
        steps: optimizer steps.
        lr: peak learning rate.
        warmup_steps: linear warm-up steps before the cosine decay.
        weight_decay: AdamW weight decay (matrices only).
        grad_clip: gradient-norm clipping (0: off).
        log_every: keep a history entry every this many steps (and the last).
        progress: show a progress bar.
        description: the progress bar's label.
        after_step: called after every optimizer step (e.g. to re-apply a pruning mask).

    Returns:
        The record (steps, history, last components, time, tokens); ``model`` is left in eval mode.

    Raises:
        ValueError: bad settings, or data that runs out or is not made of ``Batch`` objects.
    """
    from tqdm import tqdm

    from attnkit.train.loop_api import optimizer_update, param_groups
    from attnkit.train.schedule import learning_rate

    check_loop_settings(steps=steps, lr=lr, warmup_steps=warmup_steps, weight_decay=weight_decay, grad_clip=grad_clip)
    check_positive_int("log_every", log_every, example=10)
    if not isinstance(data, Iterable):
        raise ValueError(f"data must be an iterable of attnkit Batch objects, got {type(data).__name__}")
    device = next(model.parameters()).device
    model.train()
    optimizer = torch.optim.AdamW(param_groups(model, float(weight_decay)), lr=lr)
    batches = iter(data)
    history: list[dict[str, float]] = []
    tokens = 0
    start = time.perf_counter()
    bar = tqdm(total=steps, disable=not progress, desc=description, unit="step", dynamic_ncols=True)
    try:
        for step in range(1, steps + 1):
            try:
                batch = next(batches)
            except StopIteration:
                raise ValueError(
                    f"data ran out after {step - 1} batches but steps={steps}; pass an endless stream "
                    "(e.g. a BucketBatcher over data.stream('train'))"
                ) from None
            if not isinstance(batch, Batch):
                raise ValueError(f"data must yield attnkit Batch objects, got {type(batch).__name__}")
            batch = batch.to(device)
            loss, parts = step_loss(batch)
            loss.backward()
            rate = learning_rate(step, lr=lr, warmup_steps=warmup_steps, max_steps=steps)
            # the trainer's update: clip, step, the mechanisms' post-step hooks (Routing's centroids), zero grads
            optimizer_update(model, optimizer, lr=rate, grad_clip=grad_clip)
            if after_step is not None:
                after_step()
            tokens += batch.num_tokens
            values = {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in parts.items()}}
            if step % log_every == 0 or step == steps:
                history.append({"step": float(step), "lr": rate, **values})
            bar.set_postfix(loss=f"{values['loss']:.4f}")
            bar.update(1)
    finally:
        bar.close()
        model.eval()
    final = {k: v for k, v in history[-1].items() if k not in ("step", "lr")}
    return DistillResult(
        steps=steps, history=history, final=final, elapsed_s=time.perf_counter() - start, tokens=tokens
    )


def _zero_masks(model: nn.Module) -> dict[str, tuple[nn.Parameter, Tensor]]:
    """``{path: (weight, keep mask)}`` of the linear weights holding exact zeros (magnitude-pruned)."""
    masks: dict[str, tuple[nn.Parameter, Tensor]] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) and isinstance(weight, nn.Parameter) and bool((weight == 0).any()):
            masks[name] = (weight, weight.detach() != 0)
    return masks


def finetune(
    model: nn.Module,
    data: Iterable[Batch],
    *,
    steps: int,
    lr: float = 1e-4,
    warmup_steps: int = 0,
    weight_decay: float = 0.01,
    grad_clip: float = 1.0,
    keep_zeros: bool = True,
    log_every: int = 10,
    progress: bool = True,
) -> tuple[nn.Module, DistillResult]:
    """Train ``model`` on its task's labels (cross-entropy, the trainer's loss) for ``steps`` steps.

    Args:
        model: an attnkit model, e.g. after :func:`~attnkit.compress.prune_heads`; not quantized.
        data: an iterable of :class:`~attnkit.data.tasks.Batch`, one per step.
        steps: optimizer steps.
        lr: peak learning rate (warm-up, then cosine to 10%).
        warmup_steps: warm-up steps.
        weight_decay: AdamW weight decay (matrices only).
        grad_clip: gradient-norm clipping (0: off).
        keep_zeros: keep every linear weight that is exactly zero now at zero (magnitude pruning
            survives the fine-tune); False lets them grow back.
        log_every: keep a history entry every this many steps (and the last).
        progress: show a progress bar.

    Returns:
        ``(model, result)``, the model in eval mode; ``result.final["ce"]`` is the last batch's
        mean cross-entropy.

    Raises:
        ValueError: a quantized model (int8 weights cannot be trained), bad settings, data that runs out.
    """
    from attnkit.compress.quantize import Int8Linear
    from attnkit.train.modeling import forward

    int8 = [name for name, m in model.named_modules() if isinstance(m, Int8Linear)]
    if int8:
        raise ValueError(
            f"model holds int8 layers ({int8[0]}, ...), which cannot be trained: fine-tune before quantizing"
        )
    masks = _zero_masks(model) if keep_zeros else {}

    def step_loss(batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        ce = label_loss(forward(model, batch), batch.labels)
        return ce, {"ce": ce}

    def reapply_masks() -> None:
        with torch.no_grad():
            for weight, keep in masks.values():
                weight.mul_(keep)

    result = train_loop(
        model,
        data,
        step_loss,
        steps=steps,
        lr=lr,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        grad_clip=grad_clip,
        log_every=log_every,
        progress=progress,
        description="fine-tune",
        after_step=reapply_masks if masks else None,
    )
    return model, result
