"""``attnkit compress`` and ``attnkit distill`` end to end on a tiny trained run.

The report's numbers are checked against direct computations made here: parameter counts in
closed form from the config and the pruned units, bytes on disk from the files, perplexity
recomputed from the saved model with a plain cross-entropy loop, sparsity by counting zeros.
Timings are only checked to be present.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from attnkit.cli.main import main
from attnkit.compress import load_compressed
from attnkit.data.batching import eval_batches
from attnkit.data.pipeline import build_data
from attnkit.models import LanguageModel

DIM, HEADS, DEPTH, FF_DIM = 16, 4, 2, 32
TASK_OPTIONS = {"min_length": 4, "max_length": 8, "num_symbols": 12}
#: Cheap measurement settings: one timing round, short generation, few evaluation examples.
FAST = ["--rounds", "1", "--generate-tokens", "2", "--eval-examples", "12", "--batch-size", "4"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A language model trained for a few steps on the copy task (a run folder, as 'attnkit train' writes)."""
    root = tmp_path_factory.mktemp("compress_cli")
    config = {
        "task": "copy",
        "task_options": TASK_OPTIONS,
        "attention": "full",
        "out_dir": str(root / "run"),
        "max_steps": 4,
        "batch_size": 8,
        "lr": 3e-3,
        "warmup_steps": 1,
        "eval_every": 4,
        "eval_examples": 12,
        "checkpoint_every": 4,
        "bucket_batches": 2,
        "threads": 1,
        "device": "cpu",
        "progress": False,
        "model": {
            "dim": DIM,
            "depth": DEPTH,
            "heads": HEADS,
            "ff_dim": FF_DIM,
            "activation": "gelu",
            "position": "rotary",
        },
    }
    (root / "config.json").write_text(json.dumps(config))
    assert main(["train", str(root / "config.json")]) == 0
    return root / "run"


def _compress(run_dir: Path, out: Path, *extra: str, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main(["compress", str(run_dir), *extra, *FAST, "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads((out / "report.json").read_text())
    return printed


def _perplexity(model: torch.nn.Module, examples: int = 12) -> float:
    """exp(mean next-token cross-entropy) on the copy task's first validation examples, computed directly.

    Batches of 4 as the report's (``--batch-size 4``): int8 dynamic activations take one scale per
    call, so a quantized model's logits depend on which rows share a batch.
    """
    data = build_data("copy", task_options=TASK_OPTIONS)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in eval_batches(data.eval_examples("validation", examples), batch_size=4):
            logits = model(batch.input_ids, attention_mask=batch.attention_mask)
            total += F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), reduction="sum").item()
            count += int((batch.labels != -100).sum())
    return math.exp(total / count)


def _disk_bytes(folder: Path) -> int:
    return sum(
        (folder / name).stat().st_size
        for name in ("config.json", "model.safetensors", "compression.json")
        if (folder / name).exists()
    )


def test_compress_report_matches_direct_computations(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pruned"
    doc = _compress(
        run_dir, out, "--prune", "heads=0.25", "--prune", "ffn=0.25", "--finetune-steps", "2", capsys=capsys
    )
    before, after = doc["models"]["before"], doc["models"]["after"]
    head_dim = DIM // HEADS
    # Embeddings (tied output), per layer: q, k, v, out (no bias), w_in (+bias), w_out (+bias), two norms; final norm.
    vocab = build_data("copy", task_options=TASK_OPTIONS).vocab_size
    per_layer = 4 * DIM * DIM + (DIM * FF_DIM + FF_DIM) + (FF_DIM * DIM + DIM) + 2 * 2 * DIM
    assert before["parameters"] == vocab * DIM + DEPTH * per_layer + 2 * DIM
    # 2 of 8 heads (each: head_dim rows of q, k, v and head_dim columns of out) and 16 of 64 channels (a w_in row
    # with its bias, a w_out column) are gone.
    assert after["parameters"] == before["parameters"] - 2 * 4 * head_dim * DIM - 16 * (2 * DIM + 1)
    steps = [s["step"] for s in doc["steps"]]
    assert steps == ["prune heads=0.25", "prune ffn=0.25", "fine-tune 2 steps"]
    assert sum(len(h) for h in doc["steps"][0]["result"]["removed"].values()) == 2

    assert before["bytes_on_disk"] == _disk_bytes(run_dir / "best")
    assert after["bytes_on_disk"] == _disk_bytes(out) and after["bytes_on_disk"] < before["bytes_on_disk"]
    saved = load_compressed(out)
    assert sum(p.numel() for p in saved.parameters()) == after["parameters"]
    original = LanguageModel.from_pretrained(run_dir / "best")
    assert before["quality"]["perplexity"] == pytest.approx(_perplexity(original), rel=1e-5)
    assert after["quality"]["perplexity"] == pytest.approx(_perplexity(saved), rel=1e-5)
    assert after["quality"]["perplexity"] != pytest.approx(before["quality"]["perplexity"], rel=1e-6)
    for entry in (before, after):
        assert set(entry["speed"]) == {
            "forward_ms_batch1",
            "forward_ms_batch",
            "generate_ms_per_token_batch1",
            "generate_ms_per_token_batch",
            "peak_memory_mb",
        }
        assert all(v > 0 for k, v in entry["speed"].items() if k != "peak_memory_mb")
        assert set(entry["speed_spread"]) == set(entry["speed"])  # one timed round: slowest == fastest
        assert all(v == 1.0 for k, v in entry["speed_spread"].items() if k != "peak_memory_mb")
    assert doc["workload"]["batch_size"] == 4 and doc["settings"]["eval_examples"] == 12
    markdown = (out / "report.md").read_text()
    assert "| parameters | " in markdown and "perplexity (validation)" in markdown and "after / before" in markdown
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_magnitude_pruning_survives_the_fine_tune_and_int8_shrinks_the_file(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sparse"
    doc = _compress(
        run_dir / "best",
        out,
        "--data",
        "copy",
        *(f"--task-option={k}={v}" for k, v in TASK_OPTIONS.items()),
        "--prune",
        "magnitude=0.5",
        "--finetune-steps",
        "3",
        capsys=capsys,
    )
    saved = load_compressed(out)
    # Every untied linear layer: half its weights (rounded) are zero, exactly as pruned, after 3 training steps.
    weights = [m.weight for name, m in saved.named_modules() if isinstance(m, torch.nn.Linear) and "head" not in name]
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros == round(0.5 * sum(w.numel() for w in weights))
    assert doc["steps"][0]["result"]["zeros"] == zeros
    assert doc["settings"]["data"] == "--data copy"

    int8 = tmp_path / "int8"
    doc = _compress(run_dir, int8, "--quantize", "int8", capsys=capsys)
    after = doc["models"]["after"]
    assert after["bytes_on_disk"] == _disk_bytes(int8)
    quantized = doc["steps"][0]["result"]
    assert quantized["weight_bytes_after"] < quantized["weight_bytes_before"] / 3
    assert after["parameters"] == doc["models"]["before"]["parameters"]  # int8 weights still count as weights
    assert after["quality"]["perplexity"] == pytest.approx(_perplexity(load_compressed(int8)), rel=1e-5)


def test_nothing_is_overwritten_unless_asked(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["compress", str(run_dir), "--prune", "heads=0.25", "--score", "magnitude", *FAST, "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"--out {out} already holds files (notes.txt); pass --overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert main([*args, "--overwrite"]) == 0
    assert "| parameters |" in capsys.readouterr().out
    assert (out / "notes.txt").read_text() == "mine" and (out / "report.md").is_file()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--prune", "heads=0.9"], "--prune heads=0.9: amount=0.9 asks to remove 7 of 8 heads"),
        (["--prune", "channels=0.3"], "--prune channels=0.3: unknown kind 'channels'; use KIND=FRACTION"),
        (["--prune", "heads=1.5"], "--prune heads=1.5: the fraction must be a number in (0, 1)"),
        (["--prune", "heads"], "--prune heads: the fraction must be a number in (0, 1)"),
        ([], "nothing to do: add --prune KIND=FRACTION and/or --quantize int8"),
        (["--quantize", "int8", "--finetune-steps", "5"], "--finetune-steps fine-tunes after pruning"),
        (["--quantize", "int8", "--rounds", "0"], "--rounds must be a positive integer, got 0"),
        (["--quantize", "int8", "--task-option", "a=1"], "--task-option applies to --data"),
    ],
)
def test_compress_errors_name_the_flag(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    assert main(["compress", str(run_dir), *extra, "--out", str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_model_folder_needs_data(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compress", str(run_dir / "best"), "--quantize", "int8", "--out", str(tmp_path / "x")]) == 2
    assert "is a model folder, which carries no data: pass --data TASK" in capsys.readouterr().err
    args = ["compress", str(run_dir / "best"), "--quantize", "int8", "--data", "copy", "--out", str(tmp_path / "x")]
    assert main(args) == 2  # the copy task's default options give another vocabulary
    assert "but the model (MODEL) has" in capsys.readouterr().err


def test_distill_report_with_a_baseline(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    student = tmp_path / "student.json"
    student.write_text(json.dumps({"attention": "sliding_window", "attention_options": {"window": 4}, "depth": 1}))
    out = tmp_path / "distilled"
    args = ["distill", "--teacher", str(run_dir), "--student", str(student), "--steps", "3", "--lr", "3e-3"]
    assert main([*args, "--baseline", *FAST, "--out", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(doc["models"]) == ["teacher", "student", "baseline"] and doc["reference"] == "teacher"
    saved, scratch = load_compressed(out), load_compressed(out / "baseline")
    assert saved.config.attention == "sliding_window" and saved.config.depth == 1 and saved.config.dim == DIM
    per_layer = 4 * DIM * DIM + (DIM * FF_DIM + FF_DIM) + (FF_DIM * DIM + DIM) + 2 * 2 * DIM
    vocab = build_data("copy", task_options=TASK_OPTIONS).vocab_size
    assert doc["models"]["student"]["parameters"] == vocab * DIM + per_layer + 2 * DIM
    assert doc["models"]["teacher"]["parameters"] == vocab * DIM + DEPTH * per_layer + 2 * DIM
    for name, model, folder in (("student", saved, out), ("baseline", scratch, out / "baseline")):
        assert doc["models"][name]["quality"]["perplexity"] == pytest.approx(_perplexity(model), rel=1e-5)
        assert doc["models"][name]["bytes_on_disk"] == _disk_bytes(folder)
    assert not torch.equal(saved.embed.tokens.weight, scratch.embed.tokens.weight)  # trained differently
    assert [s["step"] for s in doc["steps"]] == ["distill", "baseline"]
    assert doc["steps"][0]["result"]["steps"] == 3 and "kd" in doc["steps"][0]["result"]["final"]


def test_distill_refuses_a_student_with_another_vocabulary(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    student = tmp_path / "student.json"
    student.write_text(json.dumps({"vocab_size": 99}))
    args = [
        "distill",
        "--teacher",
        str(run_dir),
        "--student",
        str(student),
        "--steps",
        "2",
        "--out",
        str(tmp_path / "d"),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--teacher/--student: teacher has a vocabulary of" in err and "but the student has 99" in err
    student.write_text(json.dumps({"wings": 2}))
    assert main(args) == 2
    assert f"--student {student}: unknown model settings ['wings']" in capsys.readouterr().err
    assert main([*args[:-2], "--alpha", "2", "--out", str(tmp_path / "d")]) == 2
    assert "--alpha must be in [0, 1]" in capsys.readouterr().err
