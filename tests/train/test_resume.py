"""``kill -9`` a training process, ``--resume`` it, and get the uninterrupted loss curve bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

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
