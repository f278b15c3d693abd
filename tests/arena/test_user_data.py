"""``--data FILE``: reading and validating the file, the splits and baselines, and one short run.

The baselines are recomputed here by brute force from the raw file, independently of the module.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

import pytest

from attnkit.arena.user_data import make_splits, read_user_data, run_data_arena


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def labelled(n_a: int, n_b: int) -> list[dict[str, object]]:
    """Distinct texts: label ``a`` for lower-case words, ``b`` for upper-case ones."""
    rng = random.Random(1)
    rows: list[dict[str, object]] = []
    for i in range(n_a + n_b):
        word = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(12, 30))) + f"{i:03d}"
        rows.append({"text": word if i < n_a else word.upper(), "label": "a" if i < n_a else "b", "id": i})
    return rows


def test_jsonl_is_classification_with_labels_mapped_and_extra_keys_reported(tmp_path: Path) -> None:
    data = read_user_data(write_jsonl(tmp_path / "d.jsonl", labelled(12, 8)))
    assert data.kind == "classification" and data.label_names == ("a", "b")
    assert data.labels == (0,) * 12 + (1,) * 8
    assert data.texts[12] == json.loads((tmp_path / "d.jsonl").read_text().splitlines()[12])["text"].encode()
    assert data.ignored_keys == ("id",)
    assert (
        "20 examples" in data.describe()
        and "a (12), b (8)" in data.describe()
        and "ignored keys: id" in data.describe()
    )


def test_integer_labels_sort_numerically(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}", "label": [10, 2, 1][i % 3]} for i in range(12)]
    assert read_user_data(write_jsonl(tmp_path / "d.jsonl", rows)).label_names == ("1", "2", "10")


def test_boolean_labels(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}", "label": i % 2 == 0} for i in range(12)]
    data = read_user_data(write_jsonl(tmp_path / "d.jsonl", rows))
    assert data.label_names == ("false", "true") and data.labels[:2] == (1, 0)


def test_other_files_are_plain_text_for_language_modelling(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("héllo wörld\n" * 3, encoding="utf-8")
    data = read_user_data(path)
    assert data.kind == "lm" and data.texts == (("héllo wörld\n" * 3).encode("utf-8"),)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("e.jsonl", b"", "is empty"),
        ("e.txt", b"  \n\n", "is empty"),
        ("l.jsonl", b'{"text": "x", "label": 1}\n\xff\xfe\n', r"is not UTF-8 text: byte 0xff at offset 26 \(line 2\)"),
        ("m.jsonl", b'{"text": "x", "label": 1}\n\n{"text": "y"}\n', r"line 3: missing key\(s\) 'label'"),
        ("m.jsonl", b'{"label": 1}\n', r"line 1: missing key\(s\) 'text'"),
        ("j.jsonl", b'{"text": "x", "label": 1}\n{"text": \n', "line 2 is not JSON"),
        ("o.jsonl", b'["x", 1]\n', "line 1 is a list, not an object"),
        ("t.jsonl", b'{"text": "", "label": 1}\n', 'line 1: "text" must be a non-empty string'),
        (
            "b.jsonl",
            b'{"text": "x", "label": null}\n',
            'line 1: "label" must be a string, an integer or a boolean, got None',
        ),
        (
            "one.jsonl",
            b'{"text": "x", "label": "spam"}\n' * 20,
            "every example has label 'spam'; classification needs at least two",
        ),
        ("few.jsonl", b'{"text": "x", "label": "a"}\n{"text": "y", "label": "b"}\n', "has 2 examples; .* at least 10"),
    ],
)
def test_bad_files_get_clear_errors(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_user_data(path)


def test_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"--data .*nope\.jsonl: no such file"):
        read_user_data(tmp_path / "nope.jsonl")


def test_classification_splits_are_stratified_disjoint_and_the_baseline_is_the_majority(tmp_path: Path) -> None:
    rows = labelled(30, 10)
    data = read_user_data(write_jsonl(tmp_path / "d.jsonl", rows))
    splits = make_splits(data, steps=5, length=16, seed=0)
    held = [
        (bytes(i - 4 for i in r[m].tolist()), int(y))
        for b in splits.held_out
        for r, m, y in zip(b.input_ids, b.attention_mask, b.labels)
    ]
    # 20% of each label held out: round(0.2 * 30) = 6 of a, round(0.2 * 10) = 2 of b
    assert Counter(y for _, y in held) == {0: 6, 1: 2}
    trained = {bytes(i - 4 for i in r[m].tolist()) for b in splits.train for r, m in zip(b.input_ids, b.attention_mask)}
    assert trained.isdisjoint(t for t, _ in held)  # texts are distinct, so no example is in both
    assert all(len(t) <= 16 for t in trained)  # cut to the training length
    assert len(splits.train) == 5
    # the majority of the training split is "a" (24 vs 8): it is right on 6 of the 8 held-out examples
    assert splits.baseline == pytest.approx(6 / 8)


def test_lm_splits_hold_out_the_end_and_the_baseline_is_a_unigram(tmp_path: Path) -> None:
    rng = random.Random(0)
    text = "".join(rng.choice("aab c\n") for _ in range(2000)).encode()
    path = tmp_path / "t.txt"
    path.write_bytes(text)
    splits = make_splits(read_user_data(path), steps=3, length=31, seed=0)
    train, held = text[:1800], text[1800:]
    windows = [held[s : s + 32] for s in range(0, len(held) - 32 + 1, 32)]  # 6 disjoint windows of 32 bytes
    assert sum(b.size for b in splits.held_out) == len(windows) == 6
    first = splits.held_out[0]
    assert bytes(i - 4 for i in first.input_ids[0].tolist()) == windows[0][:-1]
    assert bytes(i - 4 for i in first.labels[0].tolist()) == windows[0][1:]
    freq = Counter(train)
    bits = [-math.log2((freq[c] + 1) / (len(train) + 256)) for w in windows for c in w[1:]]
    assert splits.baseline == pytest.approx(sum(bits) / len(bits))


def test_text_too_short_for_the_length(tmp_path: Path) -> None:
    path = tmp_path / "short.txt"
    path.write_text("x" * 500)
    with pytest.raises(ValueError, match=r"has 500 bytes; .*--data-length 128 needs at least 1,290"):
        make_splits(read_user_data(path), steps=3, length=128)
    with pytest.raises(ValueError, match="data_steps must be a positive integer"):
        make_splits(read_user_data(path), steps=0, length=8)


def test_a_mechanism_without_a_causal_mode_sits_out_language_modelling(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("abcdefgh" * 100)
    run = run_data_arena(read_user_data(path), ["full", "linformer"], steps=2, length=16, progress=False)
    assert set(run.facts.figures) == {"full"}
    assert run.facts.notes == {"linformer": "no causal mode, which language modelling needs"}
    assert run.facts.metric == "bpc" and not run.facts.higher_is_better


def test_a_short_run_learns_a_trivial_label(tmp_path: Path) -> None:
    # the label is the case of the text: any mechanism that reads the bytes can learn it; 60/40 classes
    data = read_user_data(write_jsonl(tmp_path / "case.jsonl", labelled(36, 24)))
    run = run_data_arena(data, ["full", "linear"], steps=40, length=32, progress=False)
    facts = run.facts
    assert facts.baseline == pytest.approx(7 / 12)  # majority "a": 7 of the 12 held-out (7 a + 5 b)
    assert facts.figures["full"].mean > facts.baseline + 0.2
    assert set(facts.figures) == {"full", "linear"} and facts.length == 32
    # the spread is the standard error of 12 right/wrong scores: sqrt(p (1 - p) / (n - 1)) in closed form
    p = facts.figures["full"].mean
    assert facts.figures["full"].spread == pytest.approx(math.sqrt(p * (1 - p) / 11))
