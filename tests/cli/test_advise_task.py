"""``attnkit advise --task`` and ``--data`` from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from attnkit.arena import task_facts
from attnkit.cli.main import main

SAMPLE = Path(__file__).parent.parent / "arena" / "data" / "quality_facts_sample.json"


def test_help_explains_tasks_data_and_categories(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["advise", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for text in ("--task", "--data FILE", "--facts FILE", "--quality-tolerance", "--min-speedup", "recall (= mqar)"):
        assert text in out
    assert "rejection categories:" in out and "quality:" in out
    # the help states the --data defaults without importing torch at parse time: keep them in step
    from attnkit.arena.user_data import DEFAULT_LENGTH, DEFAULT_STEPS

    assert f"(default {DEFAULT_STEPS})" in out and f"(default {DEFAULT_LENGTH})" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--task", "recal", "--length", "64"], "--task must be one of recall (= mqar)"),
        (["--length", "64", "--facts", "f.json"], "--facts is only read with --task"),
        (["--length", "64", "--data-steps", "5"], "--data-steps and --data-length only apply with --data FILE"),
        ([], "--length is required"),
        (
            ["--task", "recall", "--length", "64", "--facts", "missing.json"],
            "no such file; run 'attnkit arena --suite quality",
        ),
        (
            ["--task", "recall", "--length", "64", "--quality-tolerance", "0"],
            "quality_tolerance must be a positive number",
        ),
        (["--task", "passkey", "--length", "64", "--facts", str(SAMPLE)], "has no figures for task 'passkey'"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["advise", *argv, "--cache", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_task_without_shipped_facts_says_how_to_make_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(task_facts, "default_facts_path", lambda: tmp_path / "quality_facts.json")
    assert main(["advise", "--task", "recall", "--length", "64", "--cache", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "ships no quality facts yet" in err and "attnkit arena --suite quality --out DIR" in err


def test_task_and_data_are_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["advise", "--task", "recall", "--data", "x.jsonl"])
    assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_empty_data_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty.jsonl").write_text("")
    assert main(["advise", "--data", str(tmp_path / "empty.jsonl"), "--cache", str(tmp_path)]) == 2
    assert "is empty" in capsys.readouterr().err


def test_task_weighs_the_suites_quality(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["advise", "--task", "recall", "--length", "128", "--causal", "--facts", str(SAMPLE)]
    argv += ["--mechanisms", "linear,sliding_window", "--cache", str(tmp_path), "--threads", "1", "--json"]
    assert main(argv) == 0
    advice = json.loads(capsys.readouterr().out)
    # the sample: exact 99.5%, linear 8.8% (baseline 7.4%), sliding_window 41.2%: only exact attention qualifies
    assert advice["recommended"] == "full"
    assert advice["quality"] == {
        "task": "mqar",
        "metric": "accuracy",
        "higher_is_better": True,
        "exact": 0.995,
        "baseline": 0.074,
        "measured_at_length": 512,
        "extrapolated": True,
        "source": str(SAMPLE),
    }
    rows = {r["mechanism"]: r for r in advice["candidates"]}
    assert rows["linear"]["rejected_for"] == ["quality", "quality"]
    assert rows["sliding_window"]["rejected_for"] == ["quality"]
    assert rows["full"]["quality"]["mean"] == 0.995


def test_data_trains_on_the_users_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [
        {"text": ("abc " * (i % 7 + 3)) if i % 3 else ("XYZ " * (i % 5 + 3)), "label": i % 3 == 0} for i in range(30)
    ]
    path = tmp_path / "d.jsonl"
    path.write_text(
        "".join(json.dumps({"text": r["text"] + str(i), "label": str(r["label"])}) + "\n" for i, r in enumerate(rows))
    )
    argv = ["advise", "--data", str(path), "--data-steps", "20", "--data-length", "32", "--mechanisms", "linear"]
    assert main([*argv, "--cache", str(tmp_path), "--threads", "1"]) in (0, 1)
    out = capsys.readouterr().out
    assert "data: " in out and "30 examples" in out
    assert "quality: d.jsonl (accuracy, higher is better) from your data" in out and "measured at length 32" in out
    assert "extrapolation" not in out  # the question defaults to the data's own length
    assert "constraints: length 32" in out
    assert "--data: trained 2 mechanisms x 20 steps in" in out and "held-out rows" in out


def test_the_lm_task_asks_for_causal_attention(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["advise", "--task", "text", "--length", "64", "--facts", str(SAMPLE), "--mechanisms", "linformer"]
    main([*argv, "--cache", str(tmp_path), "--threads", "1", "--json"])
    advice = json.loads(capsys.readouterr().out)
    assert advice["constraints"]["causal"] is True and advice["quality"]["task"] == "char_lm"
    # the sample's char_lm: exact 2.41 bpc, baseline 4.62; linformer has no causal mode and no figure
    rows = {r["mechanism"]: r for r in advice["candidates"]}
    assert rows["linformer"]["rejected_for"] == ["causal", "quality"]
    assert advice["recommended"] == "full"


def test_plain_text_data_asks_for_causal_attention(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("the quick brown fox jumps over the lazy dog\n" * 40)
    argv = ["advise", "--data", str(path), "--data-steps", "2", "--data-length", "32", "--mechanisms", "linformer"]
    main([*argv, "--cache", str(tmp_path), "--threads", "1", "--json"])
    advice = json.loads(capsys.readouterr().out)
    assert advice["constraints"]["causal"] is True  # language modelling: only causal mechanisms can sit it
    rows = {r["mechanism"]: r for r in advice["candidates"]}
    assert rows["linformer"]["rejected_for"] == ["causal", "quality"]  # and it sat the data run out: no figure
    assert advice["quality"]["metric"] == "bpc" and advice["data"]["kind"] == "lm"
    assert advice["data"]["notes"] == {"linformer": "no causal mode, which language modelling needs"}
