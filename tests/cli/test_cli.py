"""The command line: version, list, demo (speed-ups: SDPA time / mechanism time, > 1 = faster), errors."""

from __future__ import annotations

import json

import pytest

import attnkit
from attnkit.cli.main import main


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert attnkit.__version__ in capsys.readouterr().out


def test_list_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    table = capsys.readouterr().out
    assert "full" in table and "kv_cache" in table
    assert main(["list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = [r["name"] for r in rows]
    assert names == attnkit.list_attention()
    full = rows[names.index("full")]
    assert full["exact"] is True and full["causal"] is True and "dropout" in full["options"]


def test_demo_json_speedups_are_sdpa_time_over_mechanism_time(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["demo", "--mechanisms", "full,linear", "--length", "64", "--repeats", "1", "--backward", "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert "SDPA" in result["speedup_vs_sdpa"] and ">1 = the mechanism is faster" in result["speedup_vs_sdpa"]
    assert result["settings"]["length"] == 64 and result["settings"]["error_length"] == 256
    full, linear = result["rows"]
    assert full["name"] == "full" and full["error_vs_exact"] < 1e-5 and full["error_against"] == "full softmax"
    assert linear["name"] == "linear" and linear["exact"] is False
    for row in (full, linear):
        for case in ("fwd", "fwd_bwd"):  # one meaning: > 1 = faster than SDPA
            assert row[f"{case}_speedup_vs_sdpa"] == pytest.approx(row[f"sdpa_{case}_ms"] / row[f"{case}_ms"])


def test_demo_table_labels_the_speedup(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--mechanisms", "full", "--length", "256", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    (header,) = [line for line in lines if line.startswith("mechanism")]
    assert "fwd ms" in header and "SDPA ms" in header and "speed-up vs SDPA (>1 = faster)" in header
    assert "fwd+bwd" not in header  # forward only unless --backward
    (row,) = [line for line in lines if line.startswith("full ")]
    ms, sdpa_ms, speedup = (float(x.removesuffix("x")) for x in row.split()[2:])
    # The printed times carry +-0.05 ms of rounding, the speed-up +-0.005.
    ratio = sdpa_ms / ms
    assert speedup == pytest.approx(ratio, abs=ratio * (0.05 / ms + 0.05 / sdpa_ms) * 1.1 + 0.005)
    assert any(
        "speed-up vs SDPA: time of PyTorch's scaled_dot_product_attention / time of the mechanism" in line
        for line in lines
    )


def test_errors_are_reported_with_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--mechanisms", "fulll"]) == 2
    err = capsys.readouterr().err
    assert "unknown attention 'fulll'" in err and "Did you mean 'full'" in err
    assert main(["demo", "--length", "0"]) == 2
    assert "--length must be a positive integer" in capsys.readouterr().err
    assert main(["demo", "--heads", "0"]) == 2
    assert "--heads must be a positive integer, got 0 (set --heads=8, say)" in capsys.readouterr().err


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out
