"""The command line: version, list, demo, errors."""

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


def test_demo_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--mechanisms", "full", "--length", "128", "--repeats", "1", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["name"] == "full" and row["error_vs_exact"] < 1e-5 and row["fwd_vs_sdpa"] > 0


def test_errors_are_reported_with_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--mechanisms", "fulll"]) == 2
    err = capsys.readouterr().err
    assert "unknown attention 'fulll'" in err and "Did you mean 'full'" in err
    assert main(["demo", "--length", "0"]) == 2
    assert "--length must be a positive integer" in capsys.readouterr().err


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out
