"""The one result schema: every committed result file validates, and malformed files are refused by name."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from benchmarks.floors import judge_suite
from benchmarks.suites import all_suites

from benchmarks import render, schema

FILES = sorted(schema.RESULTS.glob("*.json"))


def test_every_suite_has_committed_results() -> None:
    assert {p.stem for p in FILES} == set(all_suites())


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_committed_result_file_is_valid(path: Path) -> None:
    data = schema.load(path)  # raises, listing every problem, when the file departs from the schema
    suite = all_suites()[data["meta"]["suite"]]
    assert path.stem == suite.name
    for row in data["rows"]:
        part = suite.part(row["part"])
        if part.compute is None and row["role"] not in ("bound", "derived"):
            assert row["label"] in {c.label for c in part.case_list()}, f"{row['label']!r} is not a case of {part.name}"
        if row["role"] in ("bound", "derived"):
            assert row.get("derived_from"), f"computed row {row['label']!r} does not say how"


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_committed_markdown_is_rendered_from_the_json(path: Path) -> None:
    data = schema.load(path)
    suite = all_suites()[data["meta"]["suite"]]
    expected = render.markdown(data, suite, judge_suite(suite, data["rows"]))
    assert path.with_suffix(".md").read_text() == expected, (
        f"{path.with_suffix('.md').name} differs from what its JSON renders to: python -m benchmarks render {suite.name}"
    )


def _valid() -> dict[str, Any]:
    run = {
        "commit": "0123abcd",
        "dirty": False,
        "torch": "2.13.0",
        "date": "2026-12-01T10:00:00Z",
        "machine": {"cpu": "test CPU", "cores": 2, "threads": 2, "platform": "Linux"},
        "load": {"start": [0.5, 0.4, 0.3], "end": "unknown"},
        "protocol": {"main": {"repeats": 3}},
    }
    row = {
        "label": "sdpa",
        "role": "sdpa",
        "part": "main",
        "length": 64,
        "causal": False,
        "mode": "fwd",
        "status": "ok",
        "run": 0,
        "median_s": 0.01,
        "times": [0.01, 0.02],
        "peak_mb": 3.0,
    }
    return schema.result("topk", [run], [row])


def test_a_minimal_result_is_valid() -> None:
    assert schema.validate(_valid()) == []


def _set(path: tuple[Any, ...], value: Any) -> Any:
    def mutate(data: dict[str, Any]) -> None:
        target = data
        for key in path[:-1]:
            target = target[key]
        if value is KeyError:
            del target[path[-1]]
        else:
            target[path[-1]] = value

    return mutate


MUTATIONS = {
    "no schema id": (_set(("schema",), "v0"), "'schema'"),
    "run without commit": (_set(("meta", "runs", 0, "commit"), KeyError), "lacks 'commit'"),
    "commit not hex": (_set(("meta", "runs", 0, "commit"), "HEAD~1"), "commit"),
    "dirty not a flag": (_set(("meta", "runs", 0, "dirty"), "maybe"), "dirty"),
    "load of two numbers": (_set(("meta", "runs", 0, "load", "start"), [1.0, 2.0]), "load.start"),
    "machine without cpu": (_set(("meta", "runs", 0, "machine", "cpu"), KeyError), "machine lacks 'cpu'"),
    "date not ISO": (_set(("meta", "runs", 0, "date"), "yesterday"), "date"),
    "row without label": (_set(("rows", 0, "label"), KeyError), "lacks 'label'"),
    "unknown status": (_set(("rows", 0, "status"), "fine"), "status"),
    "unknown role": (_set(("rows", 0, "role"), "baseline"), "role"),
    "unknown mode": (_set(("rows", 0, "mode"), "bwd"), "mode"),
    "causal as text": (_set(("rows", 0, "causal"), "yes"), "causal"),
    "length as bool": (_set(("rows", 0, "length"), True), "length"),
    "ok without a time": (_set(("rows", 0, "median_s"), KeyError), "neither median_s nor info"),
    "negative time": (_set(("rows", 0, "median_s"), -1.0), "median_s"),
    "run out of range": (_set(("rows", 0, "run"), 1), "meta.runs"),
    "a stored ratio": (_set(("rows", 0, "vs_sdpa"), 1.0), "unknown field 'vs_sdpa'"),
    "error without message": (_set(("rows", 0, "status"), "error"), "no 'error' message"),
    "no runs": (_set(("meta", "runs"), []), "non-empty"),
}


@pytest.mark.parametrize("mutation", MUTATIONS, ids=list(MUTATIONS))
def test_a_malformed_result_is_refused_by_name(mutation: str) -> None:
    data = copy.deepcopy(_valid())
    mutate, expected = MUTATIONS[mutation]
    mutate(data)
    problems = schema.validate(data)
    assert any(expected in p for p in problems), problems


def test_a_repeated_row_is_refused() -> None:
    data = _valid()
    data["rows"].append(dict(data["rows"][0]))
    assert any("repeats" in p for p in schema.validate(data))


def test_save_refuses_an_invalid_file(tmp_path: Path) -> None:
    data = _valid()
    data["rows"][0]["status"] = "fine"
    with pytest.raises(schema.ResultFileError, match="status"):
        schema.save(data, tmp_path / "topk.json")
    assert not (tmp_path / "topk.json").exists()


def test_load_says_what_is_wrong(tmp_path: Path) -> None:
    path = tmp_path / "topk.json"
    with pytest.raises(schema.ResultFileError, match="does not exist"):
        schema.load(path)
    path.write_text("{not json")
    with pytest.raises(schema.ResultFileError, match="not JSON"):
        schema.load(path)
