"""Distillation: the loop moves a student towards a frozen teacher; features are captured where documented."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

from attnkit.compress import capture_features, distill, kd_loss
from attnkit.models.layers import LayerInputs
from tests.compress.helpers import lm_batch, tiny_lm


def _kd(student, teacher, batch) -> float:
    with torch.no_grad():
        return kd_loss(student(batch.input_ids), teacher(batch.input_ids), labels=batch.labels).item()


def test_distillation_moves_an_efficient_student_towards_the_teacher() -> None:
    teacher = tiny_lm(seed=0, dtype=torch.float32)
    student = tiny_lm(seed=1, dtype=torch.float32, attention="sliding_window", attention_options={"window": 4})
    batches = [lm_batch(rows=4, seed=s) for s in range(3)]
    held = lm_batch(rows=4, seed=0)
    before = _kd(student, teacher, held)
    teacher_state = copy.deepcopy(teacher.state_dict())
    student, result = distill(
        student, teacher, itertools.cycle(batches), steps=40, lr=3e-3, alpha=1.0, log_every=10, progress=False
    )
    after = _kd(student, teacher, held)
    assert after < 0.5 * before
    assert [h["step"] for h in result.history] == [10.0, 20.0, 30.0, 40.0]
    assert result.history[-1]["kd"] < result.history[0]["kd"]
    assert result.tokens == sum(b.num_tokens for b in itertools.islice(itertools.cycle(batches), 40))
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items())  # teacher frozen
    assert not student.training


def test_a_copy_of_the_teacher_has_nothing_to_learn() -> None:
    teacher = tiny_lm(dtype=torch.float32)
    _, result = distill(
        copy.deepcopy(teacher),
        teacher,
        [lm_batch()],
        steps=1,
        alpha=0.5,
        hidden_weight=1.0,
        attention_weight=1.0,
        log_every=1,
        progress=False,
    )
    first = result.history[0]
    assert first["kd"] == pytest.approx(0.0, abs=1e-6)
    assert first["hidden"] == pytest.approx(0.0, abs=1e-10) and first["attention"] == pytest.approx(0.0, abs=1e-10)
    assert first["ce"] > 1.0 and first["loss"] == pytest.approx(0.5 * first["ce"], rel=1e-5)


def test_a_shallower_student_matches_features_through_the_layer_map() -> None:
    teacher = tiny_lm(dtype=torch.float32, depth=4)
    student = tiny_lm(seed=3, dtype=torch.float32, depth=2, attention="linear")
    _, result = distill(
        student, teacher, [lm_batch()] * 2, steps=2, hidden_weight=0.5, attention_weight=0.5, progress=False
    )
    assert result.final["hidden"] > 0 and result.final["attention"] > 0
    with pytest.raises(ValueError, match="layer_map must give each of the student's 2 decoder layers"):
        distill(student, teacher, [lm_batch()], steps=1, hidden_weight=1.0, layer_map=[0, 4], progress=False)


def test_captured_features_are_the_residual_stream_and_the_attention_output() -> None:
    model = tiny_lm()
    batch = lm_batch()
    with torch.no_grad(), capture_features(model, ["hidden", "attention"]) as features:
        logits = model(batch.input_ids)
    hidden, attention = features["hidden"]["decoder"], features["attention"]["decoder"]
    assert sorted(hidden) == sorted(attention) == [0, 1]
    with torch.no_grad():
        # the last hidden state is what the final norm and the tied output projection turn into logits
        torch.testing.assert_close(F.linear(model.decoder.norm(hidden[1]), model.embed.tokens.weight), logits)
        # layer 0's attention output is its attention branch applied to the embeddings
        layer = model.decoder.layer_list()[0]
        positions = torch.arange(batch.input_ids.shape[1]).expand_as(batch.input_ids)
        x = model.embed(batch.input_ids, positions)
        torch.testing.assert_close(attention[0], layer.self_attention(x, LayerInputs(positions=positions), None))
        # and layer 0's hidden state is the stream after its two branches
        h = x + attention[0]
        torch.testing.assert_close(hidden[0], h + layer.feed_forward(h, LayerInputs(), None))


def test_errors_name_the_argument() -> None:
    teacher = tiny_lm(dtype=torch.float32)
    with pytest.raises(ValueError, match="teacher has a vocabulary of 40 ids but the student has 50"):
        distill(tiny_lm(dtype=torch.float32, vocab_size=50), teacher, [lm_batch()], steps=1, progress=False)
    with pytest.raises(ValueError, match="student dim=16, teacher dim=32"):
        distill(tiny_lm(dtype=torch.float32, dim=16), teacher, [lm_batch()], steps=1, hidden_weight=1.0)
    reversible = tiny_lm(dtype=torch.float32, reversible=True)
    with pytest.raises(ValueError, match="reversible student"):
        distill(reversible, teacher, [lm_batch()], steps=1, attention_weight=1.0)
    with pytest.raises(ValueError, match="data ran out after 1 batches but steps=2"):
        distill(copy.deepcopy(teacher), teacher, [lm_batch()], steps=2, progress=False)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        distill(copy.deepcopy(teacher), teacher, [lm_batch()], steps=1, alpha=1.5)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        distill(copy.deepcopy(teacher), teacher, [lm_batch()], steps=0)
