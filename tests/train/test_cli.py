"""``attnkit train`` and ``attnkit eval`` through the command line entry point."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
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
    assert final["step"] == 3 and 0.0 <= final["accuracy"] <= 1.0 and final["split"] == "validation"

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


def test_every_evaluation_prints_a_line_and_the_summary_names_the_split(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(tiny_config(tmp_path / "run", max_steps=4, eval_every=2, eval_examples=16)))
    assert main(["train", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    evaluated = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evaluated] == [2, 4]
    for record in evaluated:
        line = f"step {record['step']}/4: validation loss {record['eval_loss']:.4g}, accuracy {record['eval_accuracy']:.4g}"
        assert any(printed.startswith(line) for printed in out), (line, out)
    summary = [line for line in out if "final validation metrics" in line]
    assert len(summary) == 1 and summary[0].startswith("attnkit train: finished step 4/4; final validation metrics (")
    assert f"loss {evaluated[-1]['eval_loss']:.4g}" in summary[0]


def test_the_cli_modules_do_not_import_torch_at_module_level() -> None:
    # `attnkit --help` imports every command module to build its parser: it must stay fast.
    code = "import sys, attnkit.cli.train, attnkit.cli.evaluate; print(sorted(m for m in sys.modules if m == 'torch'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert result.stdout.strip() == "[]"


def test_ctrl_c_saves_the_step_and_prints_the_command_that_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tiny_config(tmp_path / "run", max_steps=100_000, eval_every=4, checkpoint_every=100_000, progress=True)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    log = tmp_path / "run" / "log.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "attnkit.cli.main", "train", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        # A shell without job control starts children with SIGINT ignored; a terminal does not.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 5):
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    step = json.loads(log.read_text().splitlines()[-1])["step"]
    checkpoint = tmp_path / "run" / "checkpoints" / f"step_{step:08d}"
    assert (checkpoint / "state.pt").is_file()
    # The progress bar is closed first: the messages start on lines of their own.
    assert f"\nattnkit train: stopped by Ctrl-C after step {step}; checkpoint saved in {checkpoint}\n" in err
    command = [line for line in err.splitlines() if line.startswith("attnkit train: resume with: ")]
    assert len(command) == 1 and err.rstrip().endswith(command[0])
    words = shlex.split(command[0].removeprefix("attnkit train: resume with: "))
    assert words == ["attnkit", "train", str(path), "--resume"]

    # Run it, in this process (stopping a few steps later instead of at step 100000).
    assert main([*words[1:-1], f"max_steps={step + 2}", "progress=false", "--resume"]) == 0
    assert f"resuming from {checkpoint} (step {step})" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == list(range(1, step + 3))


def test_bad_override_is_named_on_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.toml"
    path.write_text('task = "copy"\nout_dir = "x"\nmax_steps = 5\n')
    assert main(["train", str(path), "max_steps=abc"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        "attnkit train: error: command-line override 'max_steps=abc': key 'max_steps' must be a positive integer, "
        "got 'abc'"
    )


def test_overrides_may_follow_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # argparse stopped collecting key=value words at --resume: `train c.json --resume max_steps=3` was refused.
    path = tmp_path / "c.json"
    path.write_text(json.dumps(tiny_config(tmp_path / "run", max_steps=2, eval_every=0)))
    assert main(["train", str(path)]) == 0
    capsys.readouterr()
    assert main(["train", str(path), "--resume", "max_steps=3"]) == 0
    assert "resuming from" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(path), "--resume", "--no-such-flag"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_eval_last_skips_a_damaged_newest_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # As --resume does: a truncated newest checkpoint used to stop `attnkit eval --model last` with an error.
    path = tmp_path / "c.json"
    path.write_text(json.dumps(tiny_config(tmp_path / "run", max_steps=6, checkpoint_every=3, eval_every=0)))
    assert main(["train", str(path)]) == 0
    newest, older = sorted((tmp_path / "run" / "checkpoints").iterdir(), reverse=True)[:2]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--model", "last", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["model"] == str(older)
    assert f"skipping checkpoint {newest}" in captured.err
    (older / "model.safetensors").write_bytes(b"")
    assert main(["eval", str(tmp_path / "run"), "--model", "last"]) == 2
    assert "none of the 2 checkpoint(s)" in capsys.readouterr().err
