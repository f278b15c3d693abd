"""The compression report's summary: byte counts from closed forms, floors and ratios on hand-worked rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from attnkit.compress import prune_heads, quantize
from attnkit.compress.summary import (
    FLOORS,
    Floor,
    judge_floors,
    linear_weight_bytes,
    main,
    parse_rows,
    ratio,
    render_markdown,
    summary_table,
    write_summary,
)
from attnkit.models import LanguageModel, TransformerConfig

DIM, DEPTH, HEADS, FF, VOCAB = 16, 2, 4, 32, 11


def _lm() -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(TransformerConfig(vocab_size=VOCAB, dim=DIM, depth=DEPTH, heads=HEADS, ff_dim=FF))


def _per_layer_linear_weights(heads: int) -> int:
    head_dim = DIM // HEADS
    attention = 3 * heads * head_dim * DIM + DIM * heads * head_dim  # q, k, v in; output projection back
    return attention + 2 * DIM * FF


def test_linear_weight_bytes_closed_form() -> None:
    model = _lm()
    head = VOCAB * DIM  # the LM head's weight, tied to the embedding: one float tensor
    assert linear_weight_bytes(model) == 4 * (DEPTH * _per_layer_linear_weights(HEADS) + head)

    prune_heads(model, {0: [1]})  # one head fewer in layer 0
    pruned = _per_layer_linear_weights(HEADS - 1) + _per_layer_linear_weights(HEADS)
    assert linear_weight_bytes(model) == 4 * (pruned + head)

    quantize(model, "int8_dynamic")
    # int8 weights (1 byte each) plus one float32 scale per output row; the tied head stays float32.
    rows = sum(3 * h * (DIM // HEADS) + DIM + FF + DIM for h in (HEADS - 1, HEADS))
    assert linear_weight_bytes(model) == pruned + 4 * rows + 4 * head


def _row(forward: float, generate: float, perplexity: float, linear: int, label: str = "x") -> dict:
    return {
        "label": label,
        "directory": f"runs/{label}",
        "parameters": 100,
        "linear_weight_bytes": linear,
        "bytes_on_disk": 2_000_000,
        "quality": {"perplexity": perplexity, "bpc": 1.0},
        "speed": {"forward_ms_batch1": forward, "generate_ms_per_token_batch1": generate, "peak_memory_mb": 50.0},
        "speed_spread": {"forward_ms_batch1": 1.0, "generate_ms_per_token_batch1": 2.0},
        "steps": [],
    }


ROWS = {
    "baseline": _row(120.0, 30.0, 10.0, 4000, "baseline"),
    "heads": _row(96.0, 28.0, 10.4, 3000, "heads"),  # 1.25x faster, +4% perplexity: both met
    "int8_dynamic": _row(118.0, 21.0, 10.2, 1100, "int8"),  # 30/21 = 1.43x (not met), 3.64x smaller, +2%
    "sliding_window_distilled": _row(50.0, 20.0, 12.0, 2000, "swd"),
    "sliding_window_scratch": _row(50.0, 20.0, 12.0, 2000, "sws"),  # equal: "below" is not met
    "linear_distilled": _row(50.0, 20.0, 13.0, 2000, "ld"),
}


def test_floors_on_hand_worked_rows() -> None:
    judged = {f["floor"]: f for f in judge_floors(ROWS)}
    by_floor = {floor.description: judged[floor.description] for floor in FLOORS}
    values = [(j["value"], j["met"]) for j in by_floor.values()]
    assert values[0] == (pytest.approx(120 / 96), True)
    assert values[1] == (pytest.approx(1.04), True)
    assert values[2] == (pytest.approx(30 / 21), False)
    assert values[3] == (pytest.approx(4000 / 1100), True)
    assert values[4] == (pytest.approx(1.02), True)
    assert values[5] == (pytest.approx(1.0), False)
    assert values[6] == (None, None)  # no linear_scratch row: not measured, not assumed met


def test_speed_ratios_pair_the_rounds() -> None:
    """Per-round ratios (hand-worked): round 2 was loaded for both models alike."""
    base, heads = dict(ROWS["baseline"]), dict(ROWS["heads"])
    base["speed_rounds"] = [{"forward_ms_batch1": v} for v in (120.0, 240.0, 110.0)]
    heads["speed_rounds"] = [{"forward_ms_batch1": v} for v in (100.0, 180.0, 100.0)]
    # ratios 1.2, 1.333, 1.1 -> median 1.2; the medians' ratio would be 120 / 96 = 1.25
    assert ratio(heads, base, "speed.forward_ms_batch1", True) == pytest.approx(1.2)
    judged = judge_floors({**ROWS, "baseline": base, "heads": heads})
    assert judged[0]["value"] == pytest.approx(1.2)
    # quality and size ratios are plain ratios; timings without rounds fall back to the medians
    assert ratio(heads, base, "quality.perplexity", False) == pytest.approx(1.04)
    assert ratio(ROWS["heads"], base, "speed.forward_ms_batch1", True) == pytest.approx(1.25)


def test_floor_comparisons_at_the_bound() -> None:
    rows = {"a": {"m": 3.0}, "b": {"m": 2.0}}
    assert Floor("", ("a", "m"), ("b", "m"), ">=", 1.5).judge(rows)["met"] is True
    assert Floor("", ("a", "m"), ("b", "m"), "<=", 1.5).judge(rows)["met"] is True
    assert Floor("", ("a", "m"), ("b", "m"), "<", 1.5).judge(rows)["met"] is False
    assert Floor("", ("a", "m"), ("b", "zero"), "<", 1.5).judge(rows)["value"] is None


def _doc() -> dict:
    return {
        "script": "bash scripts/compress_report.sh",
        "argv": "python -m attnkit.compress.summary",
        "device": "cpu",
        "machine": {"threads": 1, "cpu_count": 2, "torch": "2"},
        "settings": {"data": "text", "split": "validation", "eval_examples": 8, "rounds": 3},
        "workload": {"context": 2048, "prompt_length": 64, "generate_tokens": 32, "batch_size": 8,
                     "sequence_length": 256},
        "rows": ROWS,
        "floors": judge_floors(ROWS),
    }  # fmt: skip


def test_table_rows_and_ratios() -> None:
    table = summary_table(_doc()).splitlines()
    assert len(table) == 2 + len(ROWS)
    heads = next(line for line in table if line.startswith("| heads |")).split(" | ")
    # parameters, linear MB, disk MB, forward, generation, memory, perplexity, bpc, then the 4 ratios
    assert heads[1:9] == ["100", "0.00", "2.00", "96", "28 ?", "50", "10.4", "1"]
    assert heads[9:] == ["1.250x", "1.071x", "1.333x", "1.040x |"]
    markdown = render_markdown(_doc())
    assert "**not met**" in markdown and "not measured" in markdown and "forward 2048, batch 1" in markdown


def test_files_and_no_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = write_summary(_doc(), tmp_path)
    assert [p.name for p in paths] == ["report.json", "report.md", "report.png"]
    assert json.loads(paths[0].read_text())["rows"]["heads"]["speed"]["forward_ms_batch1"] == 96.0
    before = paths[0].read_text()
    assert main(["--baseline", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert paths[0].read_text() == before


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["heads"], "NAME=DIR"),
        (["nope=x"], "unknown row name 'nope'"),
        (["baseline=x"], "unknown row name 'baseline'"),
        (["heads=a", "heads=b"], "given twice"),
    ],
)
def test_bad_rows_are_refused(items: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_rows(items)


def test_bad_numbers_name_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--baseline", "x", "--out", str(tmp_path), "--rounds", "0"]) == 2
    assert "--rounds must be a positive integer" in capsys.readouterr().err
    assert main(["--baseline", "x", "--out", str(tmp_path), "--context", "64", "--prompt-length", "64"]) == 2
    assert "--prompt-length + --generate-tokens must fit" in capsys.readouterr().err
