"""Distillation losses against closed forms written out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from attnkit.compress import feature_loss, kd_loss, layer_map
from attnkit.data.tasks import IGNORE_INDEX


def _softmax(row: list[float], temperature: float) -> list[float]:
    exps = [math.exp(v / temperature) for v in row]
    return [e / sum(exps) for e in exps]


def _kl(teacher: list[float], student: list[float], temperature: float) -> float:
    p, q = _softmax(teacher, temperature), _softmax(student, temperature)
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


STUDENT = [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [2.0, -1.0, 0.5]]
TEACHER = [[3.0, 1.0, 0.0], [1.0, 0.0, -1.0], [0.0, 0.0, 4.0]]


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_kd_loss_is_t_squared_mean_kl(temperature: float) -> None:
    s = torch.tensor(STUDENT, dtype=torch.float64)
    t = torch.tensor(TEACHER, dtype=torch.float64)
    expected = temperature**2 * sum(_kl(ti, si, temperature) for si, ti in zip(STUDENT, TEACHER)) / 3
    assert kd_loss(s, t, temperature=temperature).item() == pytest.approx(expected, rel=1e-12)


def test_kd_loss_skips_ignored_positions() -> None:
    s = torch.tensor([STUDENT], dtype=torch.float64)  # (B=1, T=3, V=3)
    t = torch.tensor([TEACHER], dtype=torch.float64)
    labels = torch.tensor([[2, IGNORE_INDEX, 0]])
    expected = 4.0 * (_kl(TEACHER[0], STUDENT[0], 2.0) + _kl(TEACHER[2], STUDENT[2], 2.0)) / 2
    assert kd_loss(s, t, temperature=2.0, labels=labels).item() == pytest.approx(expected, rel=1e-12)
    nothing = torch.full((1, 3), IGNORE_INDEX)
    assert kd_loss(s, t, labels=nothing).item() == 0.0


def test_kd_loss_gradient_and_zero_at_the_teacher() -> None:
    t = torch.tensor(TEACHER, dtype=torch.float64)
    assert kd_loss(t.clone(), t, temperature=3.0).item() == pytest.approx(0.0, abs=1e-15)
    s = torch.tensor(STUDENT, dtype=torch.float64, requires_grad=True)
    kd_loss(s, t, temperature=2.0).backward()
    # d/ds of T² KL(p || softmax(s/T)) = T (q - p) per position, averaged over the 3 positions
    p = torch.softmax(t / 2.0, dim=-1)
    q = torch.softmax(s.detach() / 2.0, dim=-1)
    torch.testing.assert_close(s.grad, 2.0 * (q - p) / 3, rtol=1e-12, atol=1e-14)


def test_kd_loss_with_an_impossible_teacher_token() -> None:
    s = torch.tensor([[0.0, 1.0, 2.0]])
    t = torch.tensor([[0.0, float("-inf"), 1.0]])
    p = [1 / (1 + math.e), 0.0, math.e / (1 + math.e)]
    q = _softmax([0.0, 1.0, 2.0], 1.0)
    expected = p[0] * math.log(p[0] / q[0]) + p[2] * math.log(p[2] / q[2])
    assert kd_loss(s, t).item() == pytest.approx(expected, rel=1e-6)


def test_kd_loss_errors_name_the_argument() -> None:
    s = torch.zeros(2, 5)
    with pytest.raises(ValueError, match=r"teacher_logits have 7 vocabulary entries .* student_logits have 5"):
        kd_loss(s, torch.zeros(2, 7))
    with pytest.raises(ValueError, match="same shape"):
        kd_loss(s, torch.zeros(3, 5))
    with pytest.raises(ValueError, match="temperature must be a positive number"):
        kd_loss(s, s, temperature=0)
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        kd_loss(s, s, labels=torch.zeros(2, 1, dtype=torch.long))


def test_feature_loss_is_masked_mse() -> None:
    a = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]]])  # (B=1, T=3, D=2)
    b = torch.tensor([[[0.0, 2.0], [3.0, 2.0], [0.0, 0.0]]])
    mask = torch.tensor([[True, True, False]])
    # position 0: (1 + 0) / 2; position 1: (0 + 4) / 2; position 2 padded
    assert feature_loss([a], [b], mask=mask).item() == pytest.approx((0.5 + 2.0) / 2)
    assert feature_loss([a, a], [b, a], mask=mask).item() == pytest.approx((0.5 + 2.0) / 2 / 2)
    assert feature_loss([a], [b]).item() == pytest.approx((0.5 + 2.0 + 81.0) / 3)
    with pytest.raises(ValueError, match="differ in shape"):
        feature_loss([a], [b[..., :1]])
    with pytest.raises(ValueError, match="2 student features but 1 teacher"):
        feature_loss([a, a], [b])


def test_layer_map_spreads_evenly() -> None:
    assert layer_map(2, 4) == [1, 3]
    assert layer_map(4, 4) == [0, 1, 2, 3]
    assert layer_map(3, 4) == [1, 2, 3]
    assert layer_map(1, 6) == [5]
    with pytest.raises(ValueError, match="student_layers must be a positive integer"):
        layer_map(0, 4)
