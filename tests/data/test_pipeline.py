"""Batching, tokenizers and text/JSONL sources."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from attnkit.data import tasks
from attnkit.data.batching import BucketBatcher, ShuffledStream, TaskStream, eval_batches
from attnkit.data.sources import JsonlDataset, TextChunkStream, hash_split, stdlib_files, stdlib_root
from attnkit.data.tokenizers import BPETokenizer, ByteTokenizer, load_tokenizer, make_tokenizer


def _batcher(seed: int = 0) -> BucketBatcher:
    task = tasks.ListOps(min_length=5, max_length=80)
    return BucketBatcher(TaskStream(task, seed=seed), batch_size=4, bucket_batches=3, seed=seed)


def test_bucketing_groups_similar_lengths() -> None:
    batcher = _batcher()
    batches = [next(batcher) for _ in range(3)]  # one pool
    pool = tasks.ListOps(min_length=5, max_length=80).examples(12, seed=0)
    lengths = sorted(len(e.input_ids) for e in pool)
    got = sorted(sorted(b.attention_mask.sum(1).tolist()) for b in batches)
    expected = sorted(lengths[i : i + 4] for i in range(0, 12, 4))
    assert got == expected  # each batch is a run of 4 consecutive lengths in sorted order


def test_batcher_resumes_mid_pool_exactly() -> None:
    reference = _batcher()
    expected = [next(reference) for _ in range(8)]
    first = _batcher()
    for _ in range(4):  # stop inside the second pool
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # must survive JSON
    resumed = _batcher()
    resumed.load_state_dict(state)
    for want in expected[4:]:
        got = next(resumed)
        assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.labels, want.labels)
    other = next(_batcher(seed=1))
    assert not torch.equal(other.input_ids, expected[0].input_ids) or not torch.equal(other.labels, expected[0].labels)


def test_eval_batches_cover_every_example_once() -> None:
    examples = tasks.CopyTask(min_length=1, max_length=9).examples(10, seed=0)
    batches = eval_batches(examples, batch_size=3)
    assert [b.size for b in batches] == [3, 3, 3, 1]
    assert sum(b.num_targets for b in batches) == sum(e.num_targets for e in examples)


def test_byte_tokenizer_round_trip(tmp_path: Path) -> None:
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'é'"
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("é")) == 2 and min(tok.encode(text)) >= 4
    tok.save(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)


def test_bpe_tokenizer_trains_saves_and_loads(tmp_path: Path) -> None:
    texts = ["the quick brown fox jumps over the lazy dog " * 20, "import os\nimport sys\n" * 30]
    tok = BPETokenizer.train(texts, vocab_size=300)
    text = "the lazy fox imports os"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode())  # merges shorten the sequence
    tok.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.encode(text) == ids and loaded.vocab_size == tok.vocab_size
    with pytest.raises(ValueError, match="vocab_size must be an integer >= 260"):
        BPETokenizer.train(texts, vocab_size=100)
    with pytest.raises(ValueError, match="tokenizer must be 'byte' or 'bpe'"):
        make_tokenizer("wordpiece")


def test_stdlib_corpus_split_is_deterministic_and_disjoint() -> None:
    train = stdlib_files("train")
    valid = stdlib_files("validation")
    assert len(train) > 5 * len(valid) > 0
    assert not set(train) & set(valid)
    rel = valid[0].relative_to(stdlib_root()).as_posix()
    assert hash_split(rel) == "validation"


def test_text_stream_windows_and_resume(tmp_path: Path) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("abcdefghij")
    b.write_text("0123")
    tok = ByteTokenizer()
    stream = TextChunkStream([a, b], tok, seq_len=4, seed=0, loop=False)
    chunks = list(stream)
    # Brute force: every window's targets are its inputs shifted by one, within one file.
    texts = sorted(tok.decode(c.input_ids) + tok.decode(c.labels[-1:]) for c in chunks)
    assert texts == sorted(["abcde", "efghi", "ij", "0123"])
    loop = TextChunkStream([a, b], tok, seq_len=4, seed=0)
    expected = [next(loop) for _ in range(9)]
    resumed = TextChunkStream([a, b], tok, seq_len=4, seed=0)
    first = TextChunkStream([a, b], tok, seq_len=4, seed=0)
    for _ in range(5):
        next(first)
    resumed.load_state_dict(first.state_dict())
    assert [next(resumed) for _ in range(4)] == expected[5:]


def _write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_jsonl_classification_and_shuffled_stream(tmp_path: Path) -> None:
    records = [{"text": f"sample {i}", "label": i % 3, "split": "train"} for i in range(7)]
    records.append({"text": "held out", "label": 5, "split": "test"})
    path = _write_jsonl(tmp_path / "d.jsonl", records)
    train = JsonlDataset(path, ByteTokenizer(), split="train", max_length=64)
    assert train.kind == "classification" and train.num_classes == 6 and len(train) == 7
    assert ByteTokenizer().decode(train[3].input_ids) == "sample 3" and train[3].label == 0
    stream = ShuffledStream(train, seed=0)
    epoch = [next(stream).label for _ in range(7)]
    assert sorted(epoch) == sorted(r["label"] for r in records[:7])  # a permutation of the split


def test_jsonl_seq2seq_and_lm(tmp_path: Path) -> None:
    pairs = _write_jsonl(tmp_path / "p.jsonl", [{"source": "ab", "target": "ba", "split": "train"}])
    ex = JsonlDataset(pairs, ByteTokenizer(), split="train", max_length=8)[0]
    assert ex.decoder_input_ids is not None and ex.decoder_input_ids[0] == 1 and ex.labels[-1] == 2
    lm = _write_jsonl(tmp_path / "t.jsonl", [{"text": "hello", "split": "train"}])
    ex = JsonlDataset(lm, ByteTokenizer(), split="train", max_length=8)[0]
    assert list(ex.labels[:-1]) == list(ex.input_ids[1:])


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"text": "a", "label": 1}', "{not json"], "line 2: invalid JSON"),
        (['{"text": "a", "label": 1}', '{"text": "b"}'], "line 2: a lm record in a classification file"),
        (['{"text": "a", "label": -1}'], "line 1: field 'label' must be an integer >= 0"),
        (['{"source": "a"}'], "line 1: missing field 'target'"),
        (["[1, 2]"], "line 1: expected a JSON object"),
        (['{"text": 3}'], "line 1: field 'text' must be a string"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path: Path, lines: list[str], message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message) as info:
        JsonlDataset(path, ByteTokenizer(), split="train", max_length=8)
    assert str(path) in str(info.value)


def test_build_data_for_a_small_text_folder_splits_by_window(tmp_path: Path) -> None:
    from attnkit.data.pipeline import build_data

    (tmp_path / "a.txt").write_text("".join(f"line {i}\n" for i in range(400)))
    data = build_data(str(tmp_path), seq_len=16)
    assert data.kind == "lm" and data.vocab_size == 260 and data.max_length == 16
    train = {e.input_ids for e in data.eval_examples("train", 1000)}
    valid = {e.input_ids for e in data.eval_examples("validation", 1000)}
    assert train and valid and not train & valid
    assert len(train) + len(valid) < 4000 / 16 + 2  # windows of one file, no overlap between splits
    with pytest.raises(ValueError, match="task_options only apply to synthetic tasks"):
        build_data(str(tmp_path), task_options={"min_length": 3})
