"""Dialogue records (context turns -> response) and history truncation by tokens."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from attnkit.data.sources import JsonlDataset, truncate_history
from attnkit.data.tokenizers import BOS_ID, EOS_ID, SEP_ID, ByteTokenizer


def _brute_force(turns: list[list[int]], limit: int) -> list[int]:
    """The longest suffix of whole turns whose joined length fits; else the last turn's tail."""
    for start in range(len(turns)):
        joined = list(itertools.chain.from_iterable([*t, SEP_ID] for t in turns[start:]))[:-1]
        if len(joined) <= limit:
            return joined
    return turns[-1][-limit:] if turns else []


@pytest.mark.parametrize("limit", [1, 2, 3, 5, 8, 13])
def test_truncate_history_matches_brute_force(limit: int) -> None:
    for lengths in itertools.product([0, 1, 3, 6], repeat=3):
        turns = [[10 * (i + 1) + j for j in range(n)] for i, n in enumerate(lengths)]
        assert truncate_history(turns, limit) == _brute_force(turns, limit), (lengths, limit)
    with pytest.raises(ValueError, match="limit must be >= 1"):
        truncate_history([[1]], 0)


def test_dialogue_records_become_seq2seq_examples(tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    records = [
        {"context": ["hi", "hello, how can I help?", "my run stopped"], "response": "resume it", "split": "train"},
        {"context": ["one"], "response": "two", "split": "test"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    tok = ByteTokenizer()
    data = JsonlDataset(path, tok, split="train", max_length=20)
    assert data.kind == "seq2seq" and len(data) == 1
    example = data[0]
    # 20 tokens hold "my run stopped" (14) but not also the 22-token second turn: only the last turn is kept.
    assert list(example.input_ids) == tok.encode("my run stopped")
    assert list(example.labels) == [*tok.encode("resume it"), EOS_ID]
    assert list(example.decoder_input_ids or ()) == [BOS_ID, *tok.encode("resume it")]
    wide = JsonlDataset(path, tok, split="train", max_length=64)[0]
    assert list(wide.input_ids) == [
        *tok.encode("hi"),
        SEP_ID,
        *tok.encode("hello, how can I help?"),
        SEP_ID,
        *tok.encode("my run stopped"),
    ]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"context": "hi", "response": "x"}, "field 'context' must be a non-empty list of strings"),
        ({"context": [], "response": "x"}, "field 'context' must be a non-empty list of strings"),
        ({"context": ["hi", 3], "response": "x"}, "field 'context' must be a non-empty list of strings"),
        ({"context": ["hi"]}, "missing field 'response'"),
        ({"context": ["hi"], "response": 5}, "field 'response' must be a string"),
    ],
)
def test_bad_dialogue_records_name_file_and_line(tmp_path: Path, record: dict[str, object], message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"context": ["ok"], "response": "fine"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=rf"bad\.jsonl, line 2: {message}"):
        JsonlDataset(path, ByteTokenizer(), split="train", max_length=16)


def test_dialogue_and_seq2seq_records_do_not_mix(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps({"context": ["a"], "response": "b"}) + "\n" + json.dumps({"source": "a", "target": "b"}))
    with pytest.raises(ValueError, match="line 2: a seq2seq record in a dialogue file"):
        JsonlDataset(path, ByteTokenizer(), split="train", max_length=16)
