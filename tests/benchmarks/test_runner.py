"""``python -m benchmarks run``: one tiny attnkit case end to end in a subprocess; merging, selection, listing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from benchmarks.suites import get_suite

from benchmarks import __main__ as cli
from benchmarks import harness, runner, schema

ROOT = Path(__file__).resolve().parents[2]


def git_head() -> str | None:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def test_run_measures_one_tiny_case_end_to_end(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "benchmarks", "run", "topk", "--cases", "sdpa", "--lengths", "32", "--modes", "fwd"]
    cmd += ["--causal", "no", "--repeats", "3", "--warmup", "1", "--out", str(tmp_path), "--no-plot"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "[topk 1/1] main fwd" in proc.stdout
    data = schema.load(tmp_path / "topk.json")
    (row,) = data["rows"]
    assert (row["label"], row["length"], row["causal"], row["mode"], row["status"]) == ("sdpa", 32, False, "fwd", "ok")
    assert len(row["times"]) == 3 and row["median_s"] > 0 and row["peak_mb"] >= 0
    (meta,) = data["meta"]["runs"]
    assert meta["commit"] == (git_head() or "unknown")
    assert meta["machine"]["threads"] == os.cpu_count()
    assert len(meta["load"]["start"]) == 3 and len(meta["load"]["end"]) == 3
    assert meta["protocol"]["main"]["repeats"] == 3 and meta["protocol"]["main"]["warmup"] == 1
    assert "| sdpa | no | fwd | 32 |" in (tmp_path / "topk.md").read_text()


def fake_worker(seconds: dict[str, float]) -> Any:
    """A stand-in for the measurement process: each target's closure 'takes' the given seconds."""

    def spawn(python: str, spec: dict[str, Any], part: Any) -> tuple[str, Any]:
        name = f"k={spec['kwargs']['topk']}" if "topk" in spec["kwargs"] else "sdpa"
        t = seconds[name]
        return "ok", {"times": [t] * spec["repeats"], "median_s": t, "peak_mb": 1.0}

    return spawn


def test_merge_replaces_the_rows_measured_and_keeps_the_others(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    suite = get_suite("topk")
    only = {"lengths": (32,), "modes": ("fwd",), "causal": (False,), "repeats": 2}
    monkeypatch.setattr(harness, "_spawn", fake_worker({"sdpa": 0.010, "k=64": 0.020, "k=256": 0.030}))
    runner.run(suite, runner.select(suite, overrides=only), out_dir=tmp_path, with_plot=False)
    first = schema.load(tmp_path / "topk.json")
    assert [(r["label"], r["median_s"], r["run"]) for r in first["rows"]] == [
        ("sdpa", 0.010, 0),
        ("attnkit topk k=64", 0.020, 0),
        ("attnkit topk k=256", 0.030, 0),
    ]
    monkeypatch.setattr(harness, "_spawn", fake_worker({"sdpa": 0.5, "k=64": 0.025, "k=256": 0.5}))
    runner.run(
        suite, runner.select(suite, cases=["k=64"], overrides=only), out_dir=tmp_path, merge=True, with_plot=False
    )
    merged = schema.load(tmp_path / "topk.json")
    assert [(r["label"], r["median_s"], r["run"]) for r in merged["rows"]] == [
        ("sdpa", 0.010, 0),
        ("attnkit topk k=64", 0.025, 1),
        ("attnkit topk k=256", 0.030, 0),
    ]
    assert len(merged["meta"]["runs"]) == 2
    assert merged["meta"]["runs"][1]["selection"]["cases"] == {"main": ["attnkit topk k=64"]}
    # the rendered ratio uses the kept SDPA row: 0.025 / 0.010
    assert "| attnkit topk k=64 | no | fwd | 32 | 25.0 | 2.50 | 1 | ok | 1 |" in (tmp_path / "topk.md").read_text()


def test_without_merge_a_run_replaces_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    suite = get_suite("topk")
    only = {"lengths": (32,), "modes": ("fwd",), "causal": (False,), "repeats": 1}
    monkeypatch.setattr(harness, "_spawn", fake_worker({"sdpa": 0.01, "k=64": 0.02, "k=256": 0.03}))
    runner.run(suite, runner.select(suite, overrides=only), out_dir=tmp_path, with_plot=False)
    runner.run(suite, runner.select(suite, cases=["sdpa"], overrides=only), out_dir=tmp_path, with_plot=False)
    data = schema.load(tmp_path / "topk.json")
    assert [r["label"] for r in data["rows"]] == ["sdpa"] and len(data["meta"]["runs"]) == 1


def test_a_selection_of_nothing_fails_with_the_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "topk", "--cases", "nothing-like-this", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "leaves nothing to measure" in err and "attnkit topk k=64" in err
    assert not (tmp_path / "topk.json").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "topk", "--repeats", "0"], "--repeats must be positive"),
        (["run", "topk", "--warmup", "-1"], "--warmup must be 0 or more"),
        (["run", "topk", "--lengths", "0"], "--lengths must be positive"),
    ],
)
def test_bad_settings_are_refused(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(argv)
    assert message in capsys.readouterr().err


def test_list_names_every_suite(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    names = [line.split(":")[0] for line in out.splitlines() if line and not line.startswith((" ", "("))]
    assert {"kernel", "hashing", "sparse", "topk", "full_vs_sdpa", "linear_bound", "hashing_error"} <= set(names)
