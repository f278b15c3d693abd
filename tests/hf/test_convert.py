"""``attnkit.hf.convert``: distillation losses, what trains, resume, the checkpoint, perplexity, refusals.

References are independent of the code under test: hand-written hooks and squared errors, a
float64 log-softmax loop, the teacher itself, and an uninterrupted run.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

import attnkit.hf
from attnkit.hf.convert import convert
from attnkit.hf.text import find_text_files, perplexity, resolve_tokenizer, split_by_file
from attnkit.hf.transfer import (
    RESUME_FILE,
    TransferSettings,
    distill,
    layer_transfer_loss,
    trainable_parameters,
)
from tests.hf.helpers import tiny, transformers

BYTE_VOCAB = 260
FAST = {"seq_len": 32, "batch_size": 2, "save_every": 2, "warmup_steps": 1}


def teacher_model(family: str = "llama", seed: int = 0) -> Any:
    return tiny(family, vocab_size=BYTE_VOCAB, seed=seed)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """Four small text files (deterministic pseudo-code) in a folder."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    words = ["def", "return", "self", "value", "if", "else", "for", "in", "range", "print", "(", ")", ":", "\n    "]
    for i in range(4):
        picks = torch.randint(0, len(words), (600,), generator=g)
        (folder / f"part{i}.py").write_text(" ".join(words[j] for j in picks))
    return folder


@pytest.fixture
def teacher_dir(tmp_path: Path) -> Path:
    path = tmp_path / "teacher"
    teacher_model().save_pretrained(path)
    return path


def run_convert(teacher: Any, attention: str, corpus: Path, out: Path, **kwargs: Any) -> dict[str, Any]:
    settings = kwargs.pop("settings", TransferSettings(layer_steps=2, steps=2, **FAST))
    return convert(
        teacher,
        attention,
        kwargs.pop("options", {}),
        [corpus],
        out,
        settings=settings,
        lengths=(),
        progress=False,
        eval_windows_count=4,
        **kwargs,
    )


def test_stage1_loss_is_the_mean_squared_error_of_captured_attention_outputs() -> None:
    teacher = teacher_model()
    student = attnkit.hf.apply(copy.deepcopy(teacher), "linear")
    ids = torch.randint(0, BYTE_VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    # Reference: the teacher's attention inputs/outputs and the student's call arguments, by hand.
    t_in: dict[int, torch.Tensor] = {}
    t_out: dict[int, torch.Tensor] = {}
    s_kwargs: dict[int, dict[str, Any]] = {}
    handles = []
    for i, (t_layer, s_layer) in enumerate(zip(teacher.model.layers, student.model.layers)):
        handles.append(
            t_layer.self_attn.register_forward_pre_hook(
                lambda m, a, k, i=i: t_in.__setitem__(i, k["hidden_states"]), with_kwargs=True
            )
        )
        handles.append(t_layer.self_attn.register_forward_hook(lambda m, a, o, i=i: t_out.__setitem__(i, o[0])))
        handles.append(
            s_layer.self_attn.register_forward_pre_hook(
                lambda m, a, k, i=i: s_kwargs.__setitem__(i, dict(k)), with_kwargs=True
            )
        )
    with torch.no_grad():
        teacher(input_ids=ids, use_cache=False)
        student(input_ids=ids, use_cache=False)
        for h in handles:
            h.remove()
        errors = []
        for i, layer in enumerate(student.model.layers):
            out = layer.self_attn(**{**s_kwargs[i], "hidden_states": t_in[i]})[0]
            errors.append(((out.double() - t_out[i].double()) ** 2).mean())
        expected = torch.stack(errors).mean()
    loss, parts = layer_transfer_loss(teacher, student, ids)
    assert loss.requires_grad
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(
        torch.stack([parts["layer0"], parts["layer1"]]).double(), torch.stack(errors), rtol=1e-5, atol=0
    )


@pytest.mark.parametrize(
    ("family", "train", "layers", "changed"),
    [
        (
            "llama",
            "qk",
            None,
            {
                "model.layers.0.self_attn.q_proj.weight",
                "model.layers.0.self_attn.k_proj.weight",
                "model.layers.1.self_attn.q_proj.weight",
                "model.layers.1.self_attn.k_proj.weight",
            },
        ),
        ("llama", "qkvo", [1], {f"model.layers.1.self_attn.{p}_proj.weight" for p in "qkvo"}),
        ("gpt2", "qk", [0], {"transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias"}),
    ],
)
def test_training_changes_only_the_documented_parameters(
    family: str, train: str, layers: list[int] | None, changed: set[str], corpus: Path
) -> None:
    teacher = teacher_model(family)
    student = attnkit.hf.apply(copy.deepcopy(teacher), "linear", layers=layers)
    assert set(trainable_parameters(student, train)) == changed
    tokens = torch.randint(0, BYTE_VOCAB, (2000,), generator=torch.Generator().manual_seed(0))
    distill(teacher, student, tokens, TransferSettings(layer_steps=3, steps=2, train=train, **FAST), progress=False)
    before, after = teacher.state_dict(), student.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == changed
    # The teacher's gradient flags are as they were (nothing of it trains).
    assert all(p.requires_grad for p in teacher.parameters())


def test_a_model_without_converted_layers_has_nothing_to_train() -> None:
    with pytest.raises(ValueError, match="no converted attention layer"):
        trainable_parameters(teacher_model(), "qk")


def test_full_attention_at_zero_steps_reproduces_the_teacher(teacher_dir: Path, corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    doc = run_convert(teacher_dir, "full", corpus, out, settings=TransferSettings(layer_steps=0, steps=0, **FAST))
    teacher = transformers.AutoModelForCausalLM.from_pretrained(teacher_dir, attn_implementation="sdpa").eval()
    converted = attnkit.hf.load(out)
    ids = torch.randint(0, BYTE_VOCAB, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(converted(input_ids=ids).logits, teacher(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
    quality = doc["quality"]
    assert quality["distilled"]["perplexity"] == pytest.approx(quality["teacher"]["perplexity"], rel=1e-5)
    assert json.loads((out / "report.json").read_text())["attention"] == "full"
    assert (out / "report.md").is_file() and not (out / RESUME_FILE).exists()


def test_trained_checkpoint_round_trips_bit_exactly(tmp_path: Path) -> None:
    teacher = teacher_model()
    student = attnkit.hf.apply(copy.deepcopy(teacher), "performer", nb_features=16)
    tokens = torch.randint(0, BYTE_VOCAB, (2000,), generator=torch.Generator().manual_seed(0))
    distill(teacher, student, tokens, TransferSettings(layer_steps=2, steps=2, train="qkvo", **FAST), progress=False)
    student.save_pretrained(tmp_path / "ckpt")
    loaded = attnkit.hf.load(tmp_path / "ckpt")
    trained, back = student.state_dict(), loaded.state_dict()
    assert set(trained) == set(back)
    assert all(torch.equal(trained[k], back[k]) for k in trained)
    assert any(".attnkit." in k for k in trained)  # Performer's buffers travel too
    ids = torch.randint(0, BYTE_VOCAB, (1, 30))
    with torch.no_grad():
        assert torch.equal(student(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_interrupted_run_resumes_to_the_weights_of_an_uninterrupted_one(
    teacher_dir: Path, corpus: Path, tmp_path: Path
) -> None:
    settings = TransferSettings(layer_steps=4, steps=4, train="qkvo", **FAST)
    run_convert(teacher_dir, "performer", corpus, tmp_path / "straight", settings=settings, options={"nb_features": 16})

    def interrupt(stage: int, step: int, values: dict[str, float]) -> None:
        if (stage, step) == (2, 3):
            raise KeyboardInterrupt

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run_convert(
            teacher_dir, "performer", corpus, out, settings=settings, on_step=interrupt, options={"nb_features": 16}
        )
    assert not out.exists() and (tmp_path / "resumed.partial" / RESUME_FILE).is_file()
    seen: list[tuple[int, int]] = []
    run_convert(
        teacher_dir,
        "performer",
        corpus,
        out,
        settings=settings,
        on_step=lambda s, t, v: seen.append((s, t)),
        options={"nb_features": 16},
    )
    assert seen == [(2, 3), (2, 4)]  # resumed after the last saved step (2 of stage 2)
    a, b = attnkit.hf.load(tmp_path / "straight").state_dict(), attnkit.hf.load(out).state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "resumed.partial").exists()


def test_resume_with_other_settings_is_refused(teacher_dir: Path, corpus: Path, tmp_path: Path) -> None:
    def stop(stage: int, step: int, values: dict[str, float]) -> None:
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_convert(teacher_dir, "linear", corpus, tmp_path / "out", on_step=stop)
    with pytest.raises(ValueError, match="different settings"):
        run_convert(teacher_dir, "performer", corpus, tmp_path / "out")


def test_perplexity_is_exp_of_the_mean_negative_log_likelihood() -> None:
    model = teacher_model()
    windows = torch.randint(0, BYTE_VOCAB, (3, 17), generator=torch.Generator().manual_seed(3))
    total, count = 0.0, 0
    with torch.no_grad():
        for row in windows:
            logits = model(input_ids=row[None, :-1]).logits[0].double()
            for t in range(16):
                log_z = math.log(sum(math.exp(x) for x in logits[t].tolist()))
                total += log_z - float(logits[t, row[t + 1]])
                count += 1
    result = perplexity(model, windows, batch_size=2)
    assert result["tokens"] == count
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-9)


def test_held_out_files_are_disjoint_and_stable(corpus: Path) -> None:
    files = find_text_files([corpus])
    train, heldout = split_by_file(files, 0.25)
    assert len(heldout) == 1 and len(train) == 3 and not set(train) & set(heldout)
    assert split_by_file(list(reversed(files)), 0.25) == (train, heldout)
    with pytest.raises(ValueError, match="at least two"):
        split_by_file(files[:1], 0.25)


def test_byte_tokenizer_is_attnkits_and_needs_its_vocabulary(tmp_path: Path) -> None:
    tokenizer = resolve_tokenizer(tmp_path, BYTE_VOCAB)
    assert tokenizer.encode("Aé") == [ord("A") + 4, 0xC3 + 4, 0xA9 + 4]
    with pytest.raises(ValueError, match=r"no tokenizer files.*259"):
        resolve_tokenizer(tmp_path, 259)


def test_refusals_name_the_problem(teacher_dir: Path, corpus: Path, tmp_path: Path) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x.txt").write_text("x")
    with pytest.raises(ValueError, match=r"already holds files.*--overwrite"):
        run_convert(teacher_dir, "linear", corpus, busy)
    with pytest.raises(FileNotFoundError, match=r"--data .*missing"):
        convert(teacher_dir, "linear", {}, [tmp_path / "missing"], tmp_path / "o1", lengths=(), progress=False)
    bert = tmp_path / "bert"
    tiny("bert").save_pretrained(bert)
    with pytest.raises(ValueError, match="bidirectional encoder"):
        run_convert(bert, "linear", corpus, tmp_path / "o2")
    t5 = tmp_path / "t5"
    transformers.T5Config(d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32).save_pretrained(t5)
    with pytest.raises(ValueError, match="'t5' family"):
        run_convert(t5, "linear", corpus, tmp_path / "o3")
    with pytest.raises(ValueError, match=r"no config\.json"):
        run_convert(corpus, "linear", corpus, tmp_path / "o4")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_gap_closed_is_the_share_of_the_swapped_models_gap() -> None:
    from attnkit.hf.convert import gap_closed

    def ppl(teacher: float, swapped: float, distilled: float) -> dict[str, dict[str, float]]:
        return {k: {"perplexity": v} for k, v in (("teacher", teacher), ("swapped", swapped), ("distilled", distilled))}

    assert gap_closed(ppl(10.0, 20.0, 12.0)) == pytest.approx(0.8)
    assert gap_closed(ppl(10.0, 20.0, 25.0)) == pytest.approx(-0.5)  # distillation made it worse
    assert gap_closed(ppl(10.0, 9.5, 9.9)) is None  # no gap: the swap did not hurt
