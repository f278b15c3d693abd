"""The report table: ratios to the reference model, rows only where some model has a value, busy timings flagged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from attnkit.compress.report import REPORT_JSON, REPORT_MD, REPORT_PLOT, bytes_on_disk, report_table, write_report


def _model(label: str, parameters: int, forward: float, spread: float, perplexity: float) -> dict[str, Any]:
    return {
        "label": label,
        "directory": "x",
        "parameters": parameters,
        "bytes_on_disk": 4 * parameters,
        "quality": {"loss": 1.0, "perplexity": perplexity},
        "speed": {"forward_ms_batch1": forward, "peak_memory_mb": None},
        "speed_spread": {"forward_ms_batch1": spread, "peak_memory_mb": None},
    }


def _doc() -> dict[str, Any]:
    return {
        "command": "compress",
        "argv": "attnkit compress run --quantize int8 --out o",
        "device": "cpu",
        "machine": {"threads": 1, "torch": "2"},
        "reference": "before",
        "settings": {"split": "validation", "rounds": 3, "eval_examples": 8, "data": "copy"},
        "workload": {"batch_size": 4, "sequence_length": 9, "generate_tokens": 0, "prompt_length": 9},
        "steps": [{"summary": "did something"}],
        "models": {"before": _model("before", 1000, 8.0, 1.1, 10.0), "after": _model("after", 250, 2.0, 1.6, 11.0)},
    }


def test_table_rows_ratios_and_flags() -> None:
    lines = report_table(_doc()).splitlines()
    assert lines[0] == "|  | before | after | after / before |"
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines[2:]}
    assert list(rows) == [
        "parameters",
        "bytes on disk",
        "forward, batch 1 (ms)",
        "loss (validation)",
        "perplexity (validation)",
    ]
    assert rows["parameters"] == "| parameters | 1,000 | 250 | 0.250x |"
    assert (
        rows["forward, batch 1 (ms)"] == "| forward, batch 1 (ms) | 8 | 2 ? | 0.250x |"
    )  # after's rounds disagree 1.6x
    assert rows["perplexity (validation)"] == "| perplexity (validation) | 10 | 11 | 1.100x |"


def test_report_files(tmp_path: Path) -> None:
    paths = write_report(_doc(), tmp_path / "r")
    assert [p.name for p in paths] == [REPORT_JSON, REPORT_MD, REPORT_PLOT]
    markdown = (tmp_path / "r" / REPORT_MD).read_text()
    assert "- did something" in markdown and "`attnkit compress run --quantize int8 --out o`" in markdown
    assert (tmp_path / "r" / REPORT_PLOT).read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"0" * 100)
    (tmp_path / "m" / "notes.txt").write_text("not a model file")
    assert bytes_on_disk(tmp_path / "m") == 102
