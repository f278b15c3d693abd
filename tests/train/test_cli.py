"""``attnkit train`` and ``attnkit eval`` through the command line entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from attnkit.cli.main import main

from .conftest import tiny_config


def test_train_then_eval_on_a_jsonl_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A learnable file task: the label is whether the text contains an "x".
    data = tmp_path / "data.jsonl"
    rows = [{"text": ("x" if i % 2 else "y") + f"ab{i}", "label": i % 2} for i in range(120)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tiny_config(tmp_path / "run", task="data.jsonl", task_options={}, seq_len=16, max_steps=4, eval_every=2)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    assert main(["train", str(path), "max_steps=3", "--json"]) == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert final["step"] == 3 and 0.0 <= final["accuracy"] <= 1.0

    assert main(["eval", str(tmp_path / "run"), "--split", "validation", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "validation" and {"loss", "accuracy"} <= set(result)
    assert 0 < result["examples"] < 120


def test_resume_flag_without_checkpoints_starts_fresh(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(tiny_config(tmp_path / "run", max_steps=2, eval_every=0)))
    assert main(["train", str(path), "--resume"]) == 0
    assert "starting from step 0" in capsys.readouterr().out
    assert main(["train", str(path), "max_steps=3", "--resume"]) == 0  # extends the finished run
    assert "resuming from" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_bad_config_exits_2_naming_file_and_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.toml"
    path.write_text('task = "copy"\nout_dir = "x"\nmax_steps = -5\n')
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}, line 3: key 'max_steps' must be a positive integer, got -5" in err
    assert main(["train", str(path), "max_steps=2", "eval_every=oops"]) == 2
    assert "key 'eval_every' must be a non-negative integer, got 'oops'" in capsys.readouterr().err
    assert main(["eval", str(tmp_path)]) == 2
    assert "is not a training run" in capsys.readouterr().err


def test_resume_refuses_a_changed_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(tiny_config(tmp_path / "run", max_steps=2, eval_every=0)))
    assert main(["train", str(path)]) == 0
    capsys.readouterr()
    assert main(["train", str(path), "max_steps=4", "model.dim=32", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "model: " in err and "'dim': 16" in err
