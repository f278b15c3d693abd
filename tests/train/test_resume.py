"""``kill -9`` a training process, damage its newest checkpoint, or stop it with Ctrl-C/SIGTERM;
``--resume`` it, and get the uninterrupted loss curve bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from attnkit.train import TrainConfig, Trainer, TrainingInterrupted, load_state
from attnkit.train.checkpoint import checkpoint_dirs

from .conftest import TINY_MODEL, tiny_config

MAX_STEPS = 36
KILL_AFTER_STEP = 13


def _command(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "attnkit.cli.main", "train", str(config), *extra]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _write_config(path: Path, out: Path) -> Path:
    # Dropout makes the curve depend on the torch RNG; small pools put checkpoints mid-pool;
    # checkpoint_every=4 with eval_every=6 interleaves evaluations, checkpoints and the kill.
    config = tiny_config(
        out,
        max_steps=MAX_STEPS,
        checkpoint_every=4,
        eval_every=6,
        bucket_batches=3,
        model={**TINY_MODEL, "dropout": 0.1},
    )
    path.write_text(json.dumps(config))
    return path


def test_kill_9_then_resume_continues_bit_identically(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = _write_config(tmp_path / "reference.json", tmp_path / "reference")
    subprocess.run(_command(reference), check=True, env=env, capture_output=True, timeout=300)

    interrupted = _write_config(tmp_path / "interrupted.json", tmp_path / "interrupted")
    log = tmp_path / "interrupted" / "log.jsonl"
    proc = subprocess.Popen(_command(interrupted), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if log.exists() and any(
                json.loads(x)["step"] >= KILL_AFTER_STEP for x in log.read_text().splitlines()[-1:]
            ):
                break
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    steps_before = [r["step"] for r in _records(tmp_path / "interrupted")]
    assert KILL_AFTER_STEP <= steps_before[-1] < MAX_STEPS

    resumed = subprocess.run(_command(interrupted, "--resume"), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout

    want, got = _records(tmp_path / "reference"), _records(tmp_path / "interrupted")
    assert [r["step"] for r in got] == list(range(1, MAX_STEPS + 1))
    assert [r["loss"] for r in got] == [r["loss"] for r in want]  # exact float equality
    assert [r.get("eval_loss") for r in got] == [r.get("eval_loss") for r in want]
    # Compare tensors, not file bytes: safetensors does not fix the order of its metadata keys.
    a = load_file(tmp_path / "reference" / "model" / "model.safetensors")
    b = load_file(tmp_path / "interrupted" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a)


# ----------------------------------------------------------------------------- in-process: damage and signals

STEPS = 9  # checkpoints every 3 steps, evaluations every 3


def _trainer(out: Path, *, resume: bool = False) -> Trainer:
    config = tiny_config(out, max_steps=STEPS, model={**TINY_MODEL, "dropout": 0.1}, keep_checkpoints=3)
    return Trainer(TrainConfig.from_dict(config), resume=resume)


def _curve(out: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r.get("eval_loss")) for r in _records(out)]


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.fixture(autouse=True)
def default_signal_handlers() -> Any:
    """Ctrl-C and SIGTERM at Python's defaults, whatever the test process inherited: a job started in the
    background (``cmd &``, nohup) ignores SIGINT, and the trainer rightly leaves an ignored signal ignored."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[tuple], dict[str, torch.Tensor]]:
    """The loss curve and final weights of an uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    trainer = _trainer(out)
    trainer.fit()
    return _curve(out), _weights(trainer)


def _assert_matches(out: Path, trainer: Trainer, reference: tuple[list[tuple], dict[str, torch.Tensor]]) -> None:
    curve, weights = reference
    assert _curve(out) == curve  # exact float equality, step by step
    got = _weights(trainer)
    assert all(torch.equal(got[name], weights[name]) for name in weights)


class _Crash(Exception):
    """Stands in for a crash (power loss, OOM kill) right after a step."""


def _after_step(monkeypatch: pytest.MonkeyPatch, step: int, action: Any) -> None:
    """Run ``action()`` right after optimizer step ``step``, inside the training loop."""
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    original = Trainer.train_step

    def train_step(self: Trainer, batch: Any) -> dict[str, float]:
        out = original(self, batch)
        if self.step == step:
            action()
        return out

    monkeypatch.setattr(Trainer, "train_step", train_step)


def _crash_after_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Crash in the middle of the step after ``step`` (whose checkpoint and log record are written)."""

    def crash() -> None:
        raise _Crash

    _after_step(monkeypatch, step + 1, crash)


def _signal_after_step(monkeypatch: pytest.MonkeyPatch, step: int, *signals: signal.Signals) -> None:
    """Deliver ``signals`` to this process right after optimizer step ``step`` (as a user or scheduler would)."""

    def deliver() -> None:
        for sig in signals:
            signal.raise_signal(sig)

    _after_step(monkeypatch, step, deliver)


@pytest.mark.parametrize("damaged", ["state.pt", "model.safetensors"])
def test_resume_skips_a_truncated_newest_checkpoint_and_ends_bit_identical(
    tmp_path: Path, damaged: str, reference: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    _crash_after_step(monkeypatch, 6)
    with pytest.raises(_Crash):
        _trainer(out).fit()
    monkeypatch.undo()
    newest = out / "checkpoints" / "step_00000006" / damaged
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    capsys.readouterr()

    resumed = _trainer(out, resume=True)
    warning = capsys.readouterr().err
    assert resumed.resume_from == out / "checkpoints" / "step_00000003" and resumed.step == 3
    assert len(warning.strip().splitlines()) == 1
    assert "skipping checkpoint" in warning and "step_00000006" in warning and damaged in warning
    assert "resuming from" in warning and "step_00000003 instead" in warning
    resumed.fit()
    _assert_matches(out, resumed, reference)


def test_resume_with_every_checkpoint_damaged_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    _crash_after_step(monkeypatch, 6)
    with pytest.raises(_Crash):
        _trainer(out).fit()
    for state in (out / "checkpoints").glob("step_*/state.pt"):
        state.write_bytes(b"")
    with pytest.raises(ValueError, match=r"none of the 2 checkpoint.* nothing to resume from"):
        _trainer(out, resume=True)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_finishes_the_step_saves_it_and_resume_is_bit_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sig: signal.Signals, reference: Any
) -> None:
    out = tmp_path / "run"
    _signal_after_step(monkeypatch, 5, sig)  # between the checkpoints of steps 3 and 6
    trainer = _trainer(out)
    with pytest.raises(TrainingInterrupted) as stopped:
        trainer.fit()
    assert stopped.value.signal_name == sig.name and stopped.value.step == 5
    assert stopped.value.exit_code == 128 + sig
    assert stopped.value.checkpoint == out / "checkpoints" / "step_00000005"
    assert load_state(out / "checkpoints" / "step_00000005")["step"] == 5
    assert [r["step"] for r in _records(out)] == [1, 2, 3, 4, 5]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored

    monkeypatch.undo()
    resumed = _trainer(out, resume=True)
    assert resumed.step == 5
    resumed.fit()
    _assert_matches(out, resumed, reference)


def test_a_second_ctrl_c_stops_at_once_without_saving(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    _signal_after_step(monkeypatch, 5, signal.SIGINT, signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as stopped:
        _trainer(out).fit()
    assert stopped.value.checkpoint is None
    assert stopped.value.resume_from == out / "checkpoints" / "step_00000003"
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000003"]


def test_a_second_ctrl_c_during_the_save_corrupts_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference: Any
) -> None:
    out = tmp_path / "run"
    _signal_after_step(monkeypatch, 5, signal.SIGINT)
    write_model = Trainer._write_model

    def interrupted_write(self: Trainer, directory: Path) -> None:
        write_model(self, directory)
        if "step_00000005" in directory.name:  # half-way through the interrupt's checkpoint
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(Trainer, "_write_model", interrupted_write)
    with pytest.raises(TrainingInterrupted) as stopped:
        _trainer(out).fit()
    assert stopped.value.checkpoint is None
    assert [p.name for p in checkpoint_dirs(out / "checkpoints")] == ["step_00000003"]

    monkeypatch.undo()
    resumed = _trainer(out, resume=True)  # the debris is ignored; the intact checkpoint is used
    assert resumed.step == 3 and not resumed.skipped_checkpoints
    resumed.fit()
    _assert_matches(out, resumed, reference)
    assert not any(p.name.startswith(".") for p in (out / "checkpoints").iterdir())
