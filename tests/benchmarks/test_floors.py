"""The floor table: it parses, every floor names something that exists, and bad entries are refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest
from benchmarks.floors import Floor, FloorFileError, judge_suite, load_floors
from benchmarks.suites import all_suites

from benchmarks import schema

FLOORS = load_floors()
SUITES = all_suites()


def test_the_floor_table_parses_and_covers_the_issues() -> None:
    assert len(FLOORS) > 50
    assert {f.issue for f in FLOORS} >= {3, 4, 5}
    assert {f.suite for f in FLOORS} >= {"sparse", "hashing", "kernel", "full_vs_sdpa", "decode_recurrent"}


@pytest.mark.parametrize("floor", FLOORS, ids=lambda f: f"{f.suite}:{f.case}:{f.length}:{f.causal}:{f.mode}:{f.metric}")
def test_every_floor_refers_to_an_existing_suite_case_and_cell(floor: Floor) -> None:
    assert floor.suite in SUITES, f"no suite {floor.suite!r}"
    suite = SUITES[floor.suite]
    parts = [p for p in suite.parts if floor.part in (None, p.name)]
    assert parts, f"suite {suite.name} has no part {floor.part!r}"
    homes = [p for p in parts if floor.case in {c.label for c in p.case_list()}]
    assert homes, f"no case {floor.case!r} in {suite.name}{f' part {floor.part}' if floor.part else ''}"
    cells = [
        p
        for p in homes
        if floor.length in p.lengths
        and floor.causal in p.causal
        and floor.mode in p.modes
        and next(c for c in p.case_list() if c.label == floor.case).runs_in(floor.causal)
    ]
    assert cells, f"{floor.case!r} is not measured at {floor.length}, causal={floor.causal}, {floor.mode}"
    part = cells[0]
    if floor.metric in ("speedup_vs_anchor", "memory_vs_anchor"):
        assert suite.anchors.get(floor.case), f"{floor.case!r} declares no anchors"
        assert suite.why_unmatched(floor.case, floor.causal) is None, f"{floor.case!r} is declared not matched"
    if floor.metric == "speedup_vs_sdpa":
        assert any(c.role == "sdpa" for c in part.case_list()), f"part {part.name} has no SDPA case"
    if floor.metric == "paired_ratio":
        assert part.interleaved and part.reference, f"part {part.name} is not interleaved with a reference"
    if floor.metric in ("time_growth", "peak_growth"):
        # the base row may live in another part (the sparse suite's 64K part grows from its 16K one)
        anywhere = [p for p in suite.parts if floor.case in {c.label for c in p.case_list()}]
        assert any(floor.base_length in p.lengths for p in anywhere), f"{floor.case!r} is never measured at the base"


@pytest.mark.parametrize("suite", sorted({f.suite for f in FLOORS}))
def test_every_floor_is_judged_on_the_committed_results(suite: str) -> None:
    rows = schema.load(schema.result_path(suite))["rows"]
    unjudged = [v for v in judge_suite(SUITES[suite], rows, FLOORS) if v.status == "not measured"]
    assert not unjudged, [(v.floor.case, v.floor.length, v.detail) for v in unjudged]


GOOD = """
[[floor]]
issue = 5
suite = "kernel"
case = ["attnkit linear", "attnkit performer"]
lengths = [4096, 16384]
causal = [false, true]
mode = "fwd+bwd"
metric = "speedup_vs_anchor"
comparison = ">="
threshold = 1.5
"""


def test_lists_stand_for_one_floor_per_combination(tmp_path: Path) -> None:
    path = tmp_path / "floors.toml"
    path.write_text(GOOD)
    floors = load_floors(path)
    assert len(floors) == 2 * 2 * 2
    assert {(f.case, f.length, f.causal) for f in floors} == {
        (case, length, causal)
        for case in ("attnkit linear", "attnkit performer")
        for length in (4096, 16384)
        for causal in (False, True)
    }
    assert all(f.threshold == 1.5 and f.issue == 5 for f in floors)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("threshold = 1.5", ""), "lacks threshold"),
        (('metric = "speedup_vs_anchor"', 'metric = "fast"'), "metric must be one of"),
        (('comparison = ">="', 'comparison = ">"'), "comparison must be"),
        (('mode = "fwd+bwd"', 'mode = "backward"'), "mode must be"),
        (("issue = 5", 'issue = "five"'), "issue must be"),
        (("threshold = 1.5", "threshold = 1.5\nwhy = 'x'"), "unknown keys why"),
        (('metric = "speedup_vs_anchor"', 'metric = "time_growth"'), "needs base_length"),
        (("lengths = [4096, 16384]", "lengths = [0]"), "lengths must be positive"),
    ],
)
def test_a_bad_entry_is_refused_by_name(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    path = tmp_path / "floors.toml"
    path.write_text(GOOD.replace(*change))
    with pytest.raises(FloorFileError, match=message) as err:
        load_floors(path)
    assert "entry 1 (kernel" in str(err.value)


def test_a_missing_or_broken_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FloorFileError, match="does not exist"):
        load_floors(tmp_path / "none.toml")
    (tmp_path / "bad.toml").write_text("[[floor]\n")
    with pytest.raises(FloorFileError, match="not valid TOML"):
        load_floors(tmp_path / "bad.toml")
