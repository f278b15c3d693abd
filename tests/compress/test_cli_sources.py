"""``attnkit distill`` and ``attnkit compress`` load their starting model one way, and never write over it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from attnkit.cli.main import main
from attnkit.data.pipeline import build_data

from .helpers import tiny_lm

#: Cheap measurement settings, so that a run that is (wrongly) not refused ends quickly.
FAST = ["--rounds", "1", "--generate-tokens", "2", "--eval-examples", "4", "--batch-size", "2", "--seq-len", "16"]


@pytest.fixture
def model_folder(tmp_path: Path) -> Path:
    """A saved language model whose vocabulary is the copy task's (so ``--data copy`` fits it)."""
    folder = tmp_path / "model"
    tiny_lm(dtype=torch.float32, vocab_size=build_data("copy").vocab_size).save_pretrained(folder)
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_distill_refuses_to_write_over_its_teacher(
    model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _files(model_folder)
    student = tmp_path / "student.json"
    student.write_text(json.dumps({"depth": 1}))
    args = ["distill", "--teacher", str(model_folder), "--student", str(student), "--steps", "1", "--data", "copy"]
    assert main([*args, *FAST, "--out", str(model_folder), "--overwrite"]) == 2
    assert (
        f"--out {model_folder} is the folder the model is read from; choose another folder" in capsys.readouterr().err
    )
    assert _files(model_folder) == before  # the teacher is untouched


def test_compress_refuses_to_write_over_its_model(model_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = _files(model_folder)
    args = ["compress", str(model_folder), "--prune", "magnitude=0.5", "--data", "copy", *FAST]
    assert main([*args, "--out", str(model_folder), "--overwrite"]) == 2
    assert (
        f"--out {model_folder} is the folder the model is read from; choose another folder" in capsys.readouterr().err
    )
    assert _files(model_folder) == before
