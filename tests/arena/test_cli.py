"""``attnkit arena`` and ``attnkit advise`` from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from attnkit.cli.main import main


@pytest.mark.parametrize("command", ["arena", "advise"])
def test_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out
    assert ("--quick" in out and "--mechanisms" in out) if command == "arena" else "--max-error" in out


def test_top_level_help_lists_both(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "arena" in out and "advise" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["arena", "--mechanisms", "fulll"], "Did you mean 'full'"),
        (["arena", "--lengths", "1k"], "--lengths must be comma-separated integers"),
        (["arena", "--lengths", "2048,1024"], "strictly increasing"),
        (["arena", "--device", "cuda:7"], "CUDA is not available"),
        (["arena", "--threads", "0"], "threads must be a positive integer"),
        (["arena", "--repeats", "0"], "repeats must be a positive integer"),
        (["advise", "--length", "64", "--threads", "0"], "threads must be a positive integer"),
        (["advise", "--length", "0"], "length must be a positive integer"),
        (["advise", "--length", "64", "--max-error", "-1"], "max_error must be a positive number"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if argv[0] == "arena" and "--device" in argv:
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
    assert main([*argv, "--out" if argv[0] == "arena" else "--cache", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_arena_then_advise_reuses_its_cells(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path)
    argv = ["arena", "--mechanisms", "full", "--lengths", "128,256", "--skip-quality", "--no-plots", "--out", out]
    assert main([*argv, "--threads", "1", "--repeats", "2"]) == 0
    printed = capsys.readouterr().out
    assert "full" in printed and "report.md" in printed and "on 1 thread (" in printed
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored["meta"]["threads"] == 1 and stored["meta"]["config"]["repeats"] == 2
    assert (tmp_path / "report.md").exists() and (tmp_path / "results.json").exists()

    assert main(["advise", "--length", "256", "--mechanisms", "full", "--cache", out, "--json"]) == 0
    advice = json.loads(capsys.readouterr().out)
    assert advice["recommended"] == "full"
    (row,) = advice["candidates"]
    # reused: the arena run's thread count applies, so its cells match (", flagged: noisy" on a busy machine)
    assert row["source"].startswith("cached") and row["error"] < 1e-5
    assert row["speedup_vs_full"] == 1.0

    # an error limit nothing meets is unsatisfiable: exit 1 and a clear message
    assert main(["advise", "--length", "256", "--mechanisms", "full", "--cache", out, "--max-error", "1e-12"]) == 1
    text = capsys.readouterr().out
    assert "no mechanism satisfies every constraint" in text and "relax --max-error" in text
