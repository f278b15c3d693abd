"""The quality-facts file: schema checks that name the key at fault, task names, the missing default."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from attnkit.arena import task_facts
from attnkit.arena.task_facts import SUITE_TASKS, TASK_ALIASES, load_task_facts, parse_task_facts, resolve_task

SAMPLE = Path(__file__).parent / "data" / "quality_facts_sample.json"


def doc() -> dict[str, Any]:
    figure = {"mean": 0.9, "spread": 0.01, "seeds": [0.89, 0.91], "state_bytes": 1024, "step_ms": 12.5}
    return {
        "suite": "quality",
        "meta": {},
        "tasks": {
            "mqar": {
                "metric": "accuracy",
                "higher_is_better": True,
                "baseline": 0.074,
                "length": 256,
                "mechanisms": {"full": figure, "linear": {**figure, "mean": 0.2, "state_bytes": None}},
            }
        },
    }


def test_the_sample_file_loads_with_every_field() -> None:
    facts = load_task_facts(SAMPLE, "mqar")
    assert (facts.task, facts.metric, facts.higher_is_better, facts.length) == ("mqar", "accuracy", True, 512)
    assert facts.baseline == 0.074 and facts.reference.mean == 0.995
    assert facts.figures["nsa"].seeds == (0.984, 0.996) and facts.figures["bigbird"].state_bytes is None
    lm = load_task_facts(SAMPLE, "char_lm")
    assert lm.metric == "bpc" and not lm.higher_is_better and lm.format(2.41) == "2.410 bpc"


@pytest.mark.parametrize(
    ("alias", "task"),
    [
        ("recall", "mqar"),
        ("MQAR", "mqar"),
        ("needle", "passkey"),
        ("char-lm", "char_lm"),
        ("text", "char_lm"),
        ("lm", "char_lm"),
        ("classification", "text_classification"),
        ("retrieval", "document_matching"),
        ("listops", "listops"),
        ("pathfinder", "pathfinder"),
    ],
)
def test_task_names_in_the_users_words(alias: str, task: str) -> None:
    assert resolve_task(alias) == task


def test_every_alias_names_a_suite_task_and_every_suite_task_is_reachable() -> None:
    assert set(TASK_ALIASES.values()) == set(SUITE_TASKS)


def test_an_unknown_task_lists_the_choices() -> None:
    with pytest.raises(
        ValueError,
        match=r"--task must be one of recall \(= mqar\), .*needle \(= passkey\).*; got 'recal' \(did you mean 'recall'\?\)",
    ):
        resolve_task("recal")


def mutate(path: str, value: Any) -> dict[str, Any]:
    """``doc()`` with the key at dotted ``path`` set to ``value`` (or deleted, for ``...``)."""
    out = copy.deepcopy(doc())
    *parents, last = path.split(".")
    node = out
    for key in parents:
        node = node[key]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return out


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("suite", "efficiency", 'expected an object with "suite": "quality"'),
        ("tasks", [], '"tasks" must be an object'),
        ("tasks.imdb", {}, "unknown task\\(s\\) imdb; tasks are mqar, listops"),
        ("tasks.mqar.metric", "f1", 'tasks.mqar.metric must be "accuracy" or "bpc", got \'f1\''),
        ("tasks.mqar.higher_is_better", False, "higher_is_better=False contradicts metric 'accuracy'"),
        ("tasks.mqar.higher_is_better", "yes", "higher_is_better must be true or false"),
        (
            "tasks.mqar.baseline",
            7.4,
            "tasks.mqar.baseline must be an accuracy fraction in \\[0, 1\\] \\(0.994, not 99.4\\)",
        ),
        ("tasks.mqar.length", 0, "tasks.mqar.length must be a positive integer"),
        (
            "tasks.mqar.mechanisms.full",
            ...,
            "tasks.mqar has no figure for 'full' \\(exact attention: the file has none\\).*rerun the suite",
        ),
        ("tasks.mqar.mechanisms.linear.mean", 99.0, "tasks.mqar.mechanisms.linear.mean must be an accuracy fraction"),
        ("tasks.mqar.mechanisms.linear.mean", None, "tasks.mqar.mechanisms.linear.mean must be a finite number"),
        ("tasks.mqar.mechanisms.linear.spread", -0.1, "linear.spread must be a number >= 0"),
        ("tasks.mqar.mechanisms.linear.seeds", [], "linear.seeds must be a non-empty list of numbers"),
        ("tasks.mqar.mechanisms.linear.state_bytes", 1.5, "linear.state_bytes must be a non-negative integer or null"),
        ("tasks.mqar.mechanisms.linear.step_ms", ..., "tasks.mqar.mechanisms.linear lacks step_ms"),
        ("tasks.mqar.mechanisms.linear.step_ms", 0, "linear.step_ms must be a positive number or null"),
    ],
)
def test_schema_errors_name_the_key(path: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_task_facts(mutate(path, value), "mqar", source="f.json")


def test_bits_per_char_must_be_positive() -> None:
    bad = mutate("tasks.mqar.metric", "bpc")
    bad["tasks"]["mqar"]["higher_is_better"] = False
    bad["tasks"]["mqar"]["baseline"] = -1.0
    with pytest.raises(ValueError, match="baseline must be a positive number of bits per character"):
        parse_task_facts(bad, "mqar", source="f.json")


def test_a_task_the_suite_did_not_measure_says_what_it_did() -> None:
    with pytest.raises(ValueError, match=r"has no figures for task 'passkey' \(it measured: mqar\).*--suite quality"):
        parse_task_facts(doc(), "passkey", source="f.json")


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=r"--facts .*nope\.json: no such file; run 'attnkit arena --suite quality"
    ):
        load_task_facts(tmp_path / "nope.json", "mqar")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="is not a JSON file"):
        load_task_facts(broken, "mqar")
    good = tmp_path / "good.json"
    good.write_text(json.dumps(doc()))
    assert load_task_facts(good, "mqar").figures["linear"].mean == 0.2


def test_without_shipped_facts_the_message_says_how_to_make_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(task_facts, "default_facts_path", lambda: tmp_path / "quality_facts.json")
    with pytest.raises(FileNotFoundError) as info:
        load_task_facts(None, "mqar")
    message = str(info.value)
    assert "attnkit ships no quality facts yet" in message
    assert "attnkit arena --suite quality --out DIR" in message and "--facts DIR/results.json" in message


def test_the_default_path_is_package_data() -> None:
    path = task_facts.default_facts_path()
    assert path.parts[-3:] == ("arena", "data", "quality_facts.json")
    assert path.parent.parent == Path(task_facts.__file__).parent


def with_variant(length: int, mean: float) -> dict[str, Any]:
    out = doc()
    variant = copy.deepcopy(out["tasks"]["mqar"])
    variant["length"] = length
    variant["mechanisms"]["linear"]["mean"] = mean
    out["tasks"][f"mqar@pairs=32,length={length}"] = variant
    return out


def test_the_variant_nearest_the_asked_length_answers() -> None:
    two = with_variant(1024, 0.05)  # the plain mqar entry is at length 256
    assert parse_task_facts(two, "mqar", source="f").task == "mqar"  # no length asked: the plain task
    near = parse_task_facts(two, "mqar", source="f", length=4096)  # |log(4096/1024)| < |log(4096/256)|
    assert near.task == "mqar@pairs=32,length=1024" and near.length == 1024
    assert near.figures["linear"].mean == 0.05
    assert parse_task_facts(two, "mqar", source="f", length=300).task == "mqar"
    assert parse_task_facts(two, "mqar", source="f", length=512).task == "mqar"  # equally far: the plain task


def test_a_null_baseline_and_the_suites_reasons_for_missing_figures() -> None:
    out = mutate("tasks.mqar.baseline", None)
    out["meta"] = {
        "failures": [{"task": "mqar", "mechanism": "lsh", "seed": 0, "error": "RuntimeError: out of memory"}],
        "not_applicable": [{"task": "mqar", "mechanism": "linformer", "status": "n/a", "reason": "no causal mode"}],
    }
    facts = parse_task_facts(out, "mqar", source="f")
    assert facts.baseline is None
    assert facts.notes == {"lsh": "failed in the suite: RuntimeError: out of memory", "linformer": "no causal mode"}


def test_only_the_asked_task_needs_exact_attention() -> None:
    out = with_variant(1024, 0.05)
    del out["tasks"]["mqar@pairs=32,length=1024"]["mechanisms"]["full"]
    assert parse_task_facts(out, "mqar", source="f").task == "mqar"
    with pytest.raises(ValueError, match=r"tasks\.mqar@pairs=32,length=1024 has no figure for 'full'"):
        parse_task_facts(out, "mqar", source="f", length=1024)


def test_variant_keys_must_name_a_suite_task() -> None:
    out = doc()
    out["tasks"]["imdb@length=4096"] = out["tasks"]["mqar"]
    with pytest.raises(ValueError, match=r"unknown task\(s\) imdb@length=4096"):
        parse_task_facts(out, "mqar", source="f")


def test_the_shipped_facts_load_for_every_task_and_name_every_mechanism() -> None:
    """The facts file in the package (the committed suite run) parses for each task, and the figures it
    gives exact attention are the calibration the issue asks for (MQAR >= 99%, ListOps >= 36%, needle >= 95%)."""
    import attnkit

    path = task_facts.default_facts_path()
    assert path.is_file(), "the package should ship the quality suite's results as quality_facts.json"
    for task in SUITE_TASKS:
        facts = load_task_facts(None, task)
        causal_only = task in ("passkey", "char_lm")
        expected = {n for n in attnkit.list_attention() if not causal_only or attnkit.attention_capabilities(n).causal}
        assert set(facts.figures) == expected, task
    assert load_task_facts(None, "mqar").figures["full"].mean >= 0.99
    assert load_task_facts(None, "listops").figures["full"].mean >= 0.36
    assert load_task_facts(None, "passkey").figures["full"].mean >= 0.95


def test_the_shipped_facts_are_the_committed_leaderboards_results() -> None:
    """The package's facts file is a copy of docs/quality-suite/results.json (the package cannot read
    docs/); the two must not drift apart when the suite is re-run."""
    docs = Path(__file__).resolve().parents[2] / "docs" / "quality-suite" / "results.json"
    assert docs.read_bytes() == task_facts.default_facts_path().read_bytes()
