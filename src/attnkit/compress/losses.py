"""Knowledge-distillation losses, as plain functions of tensors (shared with ``attnkit convert``).

- :func:`kd_loss`: logit distillation (Hinton, Vinyals & Dean, "Distilling the Knowledge in a
  Neural Network", 2015, arXiv:1503.02531): ``T² · KL(softmax(t / T) ‖ softmax(s / T))`` per
  position, averaged over the positions that count. The ``T²`` factor keeps the gradient scale
  independent of the temperature (the soft targets' gradients shrink as ``1/T²``).
- :func:`feature_loss`: mean squared error between matched student and teacher features over
  real positions: hidden states (TinyBERT-style, Jiao et al. 2020, arXiv:1909.10351) or
  attention-branch outputs.
- :func:`label_loss`: cross-entropy on the labels (the hard-label part of distillation, and the
  fine-tune's loss).
- :func:`layer_map`: which teacher layer each student layer is matched with.

Nothing here knows about attnkit models; any logits and features of the stated shapes work.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit.core.errors import check_positive_float, check_positive_int
from attnkit.data.tasks import IGNORE_INDEX


def _counted(shape: torch.Size, labels: Tensor | None, ignore_index: int, device: torch.device) -> Tensor | None:
    if labels is None:
        return None
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(
            f"labels must have shape {tuple(shape)} (the logits' without the last), got {tuple(labels.shape)}"
        )
    return (labels != ignore_index).to(device)


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    labels: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """``T² · mean over counted positions of KL(p_teacher ‖ p_student)`` at temperature ``T``.

    Args:
        student_logits: ``(..., V)``.
        teacher_logits: ``(..., V)``, same shape (typically computed without gradient).
        temperature: ``T > 0``; both distributions are ``softmax(logits / T)``.
        labels: ``(...)``: positions whose label is ``ignore_index`` do not count (padding,
            prompts); None: every position counts.
        ignore_index: the label of positions that do not count.

    Returns:
        A scalar (float32 or wider); 0 when no position counts.

    Raises:
        ValueError: different vocabularies or shapes, a bad temperature or labels shape.
    """
    temperature = check_positive_float("temperature", temperature)
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"teacher_logits have {teacher_logits.shape[-1]} vocabulary entries (classes) but student_logits have "
            f"{student_logits.shape[-1]}: distillation compares the two distributions entry by entry, so the teacher "
            "and the student must share one vocabulary (tokenizer)"
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} "
            "must have the same shape (same batch and positions)"
        )
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_s = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_t = torch.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    p_t = log_t.exp()
    # p log(p/q) with 0 log 0 = 0: a teacher entry of probability 0 (a -inf logit) contributes nothing.
    per_position = torch.where(p_t > 0, p_t * (log_t - log_s), torch.zeros_like(p_t)).sum(dim=-1)
    counted = _counted(student_logits.shape[:-1], labels, ignore_index, per_position.device)
    if counted is not None:
        per_position = per_position * counted
        count = counted.sum().clamp(min=1)
    else:
        count = torch.tensor(max(per_position.numel(), 1), device=per_position.device)
    return temperature**2 * per_position.sum() / count


def label_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of ``logits (..., V)`` against ``labels (...)`` over the counted positions.

    Positions labelled ``IGNORE_INDEX`` (padding, prompts) do not count; the logits are scored
    in float32 (mixed-precision models included), as the trainer scores them.
    """
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX)


def feature_loss(student: Sequence[Tensor], teacher: Sequence[Tensor], *, mask: Tensor | None = None) -> Tensor:
    """Mean over matched pairs of the mean squared error over real positions and features.

    Args:
        student: features ``(B, T, D)`` per matched layer.
        teacher: the teacher's features for the same layers, same shapes.
        mask: bool ``(B, T)``, True = a real position; None: all positions count.

    Returns:
        A scalar; 0 for no pairs.

    Raises:
        ValueError: different numbers of layers or shapes (widths differ: the student needs a
            projection, which these plain losses do not learn).
    """
    if len(student) != len(teacher):
        raise ValueError(f"got {len(student)} student features but {len(teacher)} teacher features to match")
    if not student:
        return torch.zeros(())
    total = torch.zeros((), device=student[0].device, dtype=torch.promote_types(student[0].dtype, torch.float32))
    for i, (s, t) in enumerate(zip(student, teacher)):
        if s.shape != t.shape:
            raise ValueError(
                f"matched features {i} differ in shape: student {tuple(s.shape)}, teacher {tuple(t.shape)} "
                "(feature matching needs the same width and positions)"
            )
        squared = (s.to(total.dtype) - t.to(total.dtype)).pow(2).mean(dim=-1)  # (B, T)
        if mask is not None:
            if tuple(mask.shape) != tuple(squared.shape):
                raise ValueError(f"mask must have shape {tuple(squared.shape)}, got {tuple(mask.shape)}")
            weights = mask.to(squared.dtype)
            total = total + (squared * weights).sum() / weights.sum().clamp(min=1)
        else:
            total = total + squared.mean()
    return total / len(student)


def layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """The teacher layer matched with each student layer: evenly spread, last to last.

    Student layer ``i`` (0-based) gets teacher layer ``ceil((i + 1) · L_t / L_s) - 1``: a
    2-layer student of a 4-layer teacher gets ``[1, 3]``; equal depths map one to one.
    """
    check_positive_int("student_layers", student_layers)
    check_positive_int("teacher_layers", teacher_layers)
    return [-(-(i + 1) * teacher_layers // student_layers) - 1 for i in range(student_layers)]
