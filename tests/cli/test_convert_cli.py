"""``attnkit convert``: a tiny end-to-end run with --json, and errors that name the argument (exit code 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from attnkit.cli.main import main

transformers = pytest.importorskip("transformers")

import attnkit.hf  # noqa: E402


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny Llama teacher folder (byte vocabulary) and a folder of three text files."""
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=260
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "teacher")
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        (data / f"f{i}.txt").write_text(f"line {i} of some text for the tiny teacher\n" * 40)
    return tmp_path / "teacher", data


def test_convert_json_run_writes_a_loadable_checkpoint(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    teacher, data = setup
    out = tmp_path / "out"
    args = [
        "convert",
        str(teacher),
        "--attention",
        "sliding_window",
        "--option",
        "window=8",
        "--data",
        str(data),
        "--out",
        str(out),
        "--layer-steps",
        "2",
        "--steps",
        "1",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--lengths",
        "64",
        "--rounds",
        "1",
        "--decode-tokens",
        "2",
        "--eval-windows",
        "2",
        "--json",
        "--no-progress",
    ]
    assert main(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["attention"] == "sliding_window" and doc["options"] == {"window": 8}
    assert [h["stage"] for h in doc["history"]] == [1.0, 2.0]
    assert set(doc["quality"]) == {"teacher", "swapped", "distilled"}
    assert set(doc["speed"]) == {"teacher", "converted"} and "64" in doc["speed"]["converted"]
    model = attnkit.hf.load(out)
    assert model.config.attnkit["mechanism"] == "sliding_window"
    # The same command again is refused: --out holds the result.
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--attention", "linearr"], "--attention 'linearr' is not a registered mechanism"),
        (["--attention", "sliding_window", "--option", "windw=8"], "--option windw: not an option of 'sliding_window'"),
        (["--attention", "linear", "--option", "oops"], "must look like KEY=VALUE"),
        (["--attention", "linear", "--lengths", "2k"], "--lengths must be comma-separated integers"),
        (["--attention", "linear", "--steps", "-1"], "--steps must be an integer >= 0"),
    ],
)
def test_bad_arguments_are_named(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    teacher, data = setup
    assert main(["convert", str(teacher), "--data", str(data), "--out", str(tmp_path / "o"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bad_paths_and_teachers_are_named(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    teacher, data = setup
    base = ["--attention", "linear", "--lengths", "none"]
    assert main(["convert", str(teacher), "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), *base]) == 2
    assert "--data" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    assert main(["convert", str(teacher), "--data", str(data), "--out", str(busy), *base]) == 2
    assert "--out" in (err := capsys.readouterr().err) and "already holds files" in err
    assert main(["convert", str(tmp_path / "none"), "--data", str(data), "--out", str(tmp_path / "o"), *base]) == 2
    assert "CHECKPOINT_DIR" in capsys.readouterr().err
    t5 = tmp_path / "t5"
    transformers.T5Config(d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32).save_pretrained(t5)
    assert main(["convert", str(t5), "--data", str(data), "--out", str(tmp_path / "o"), *base]) == 2
    assert "does not support the 't5' family" in capsys.readouterr().err
