"""Recall and language-modelling task generators against brute-force checks: passkey, MQAR, char_lm."""

from __future__ import annotations

import functools
import re

import pytest

from attnkit.data import tasks
from attnkit.data.sources import stdlib_files
from attnkit.data.tasks import IGNORE_INDEX

QUESTION = b"\nWhat is the pass key? The pass key is "
NEEDLE = re.compile(rb"The pass key is (\d+)\. Remember it\. (\d+) is the pass key\.")


def as_bytes(ids: tuple[int, ...] | list[int]) -> bytes:
    """Byte ids back to bytes; ``<sep>`` (id 3) becomes ``\\x00`` so slots stay visible."""
    return bytes(0 if i == 3 else i - 4 for i in ids)


@functools.lru_cache(maxsize=3)
def split_text(split: str) -> bytes:
    """Brute force: the split's standard-library files laid end to end with a newline between them."""
    return b"\n".join(p.read_bytes() for p in stdlib_files(split))


# ----------------------------------------------------------------------------- passkey


@pytest.mark.parametrize("length", [1024, 4096, 8192])
@pytest.mark.parametrize("answer_slots", [False, True])
def test_passkey_needle_sits_where_the_record_says_and_the_answer_is_recoverable(
    length: int, answer_slots: bool
) -> None:
    task = tasks.PasskeyRetrieval(length=length, answer_slots=answer_slots)
    for index in range(3):
        record = task.record(index, seed=1, split="validation")
        ex = record.example
        assert ex == task.example(index, seed=1, split="validation")  # the record is the example
        assert len(ex.input_ids) == len(ex.labels) == length
        text = as_bytes(ex.input_ids)
        # Brute force: the needle occurs exactly once, where the record says, with one passkey.
        hits = list(NEEDLE.finditer(text))
        assert len(hits) == 1
        needle = hits[0]
        assert needle.start() - 1 == record.needle_start  # NEEDLE starts with a space
        assert needle.group(1) == needle.group(2) == record.passkey.encode()
        assert len(record.passkey) == 5
        # The scored positions, in order, are exactly the passkey's digits.
        scored = [t for t, y in enumerate(ex.labels) if y != IGNORE_INDEX]
        assert tuple(scored) == record.answer_positions
        assert as_bytes([ex.labels[t] for t in scored]) == record.passkey.encode()
        if answer_slots:
            # The answer is not in the input: slots (id 3) after the question, scored in place.
            assert text.endswith(QUESTION + b"\x00" * 5)
            assert record.passkey.encode() not in text[needle.end() :]
            assert scored == list(range(length - 5, length))
        else:
            # Next-token form: the input continues with the digits; position t predicts token t + 1.
            assert text.endswith(QUESTION + record.passkey.encode()[:-1])
            assert all(ex.labels[t] == ex.input_ids[t + 1] for t in scored[:-1])
            assert text[: scored[0] + 1].endswith(QUESTION)


def test_passkey_depth_places_the_needle_and_the_haystack_is_the_splits_text() -> None:
    length = 2048
    for depth in (0.0, 0.25, 0.5, 1.0):
        task = tasks.PasskeyRetrieval(length=length, depth=depth)
        record = task.record(0, seed=0, split="test")
        text = as_bytes(record.example.input_ids)
        needle = next(NEEDLE.finditer(text))
        before = text[: needle.start() - 1]
        after = text[needle.end() + 1 : text.rindex(b"\nWhat is the pass key?")]
        haystack = len(before) + len(after)
        assert record.depth == depth
        assert len(before) == int(depth * haystack)
        # The haystack is contiguous text of the test split's files (the needle cut into it).
        if len(before) >= 64 and len(after) >= 64:
            assert (before[-64:] + after[:64]) in split_text("test") + b"\n" + split_text("test")[:length]
    # Random depths are uniform-ish and recorded per example.
    depths = [tasks.PasskeyRetrieval(length=512).record(i, seed=3).depth for i in range(40)]
    assert min(depths) < 0.2 and max(depths) > 0.8


def test_passkey_options_are_checked() -> None:
    # The shortest input holds the needle, the question and the digits (all but the last in the
    # next-token form), with an empty haystack.
    fixed = len(b" The pass key is 12345. Remember it. 12345 is the pass key. ") + len(QUESTION) + 5
    for slots, shortest in ((False, fixed - 1), (True, fixed)):
        record = tasks.PasskeyRetrieval(length=shortest, answer_slots=slots).record(0)
        assert record.needle_start == 0 and len(record.example.input_ids) == shortest
        with pytest.raises(ValueError, match=rf"length={shortest - 1} cannot hold .* use length >= {shortest}"):
            tasks.PasskeyRetrieval(length=shortest - 1, answer_slots=slots)
    with pytest.raises(ValueError, match=r"depth must be a number in \[0, 1\]"):
        tasks.PasskeyRetrieval(depth=1.5)
    with pytest.raises(ValueError, match="num_digits must be an integer >= 1"):
        tasks.PasskeyRetrieval(num_digits=0)
    task = tasks.make_task("passkey", length=300, num_digits=3, depth=0.5, answer_slots=True)
    assert tasks.make_task("passkey", **task.options()).examples(2, seed=0) == task.examples(2, seed=0)


# ----------------------------------------------------------------------------- MQAR sweeps


@pytest.mark.parametrize(("pairs", "vocab", "length"), [(4, 64, 64), (8, 128, 128), (16, 256, 256), (32, 8192, 512)])
def test_mqar_sweep_options_pairs_vocabulary_and_length(pairs: int, vocab: int, length: int) -> None:
    # Zoology's (num_kv_pairs, vocab_size, input_seq_len): keys and values split the vocabulary.
    task = tasks.MQAR(num_pairs=pairs, num_keys=vocab // 2, num_values=vocab // 2, length=length)
    assert task.max_length == length and task.gap == length - 4 * pairs
    for ex in task.examples(10, seed=0):
        ids = list(ex.input_ids)
        assert len(ids) == length
        context = ids[: 2 * pairs]
        keys, values = context[0::2], context[1::2]
        assert len(set(keys)) == pairs and len(set(values)) == pairs
        assert all(2 <= k < 2 + vocab // 2 <= v < 2 + vocab for k, v in zip(keys, values))
        assert ids[2 * pairs : length - 2 * pairs] == [1] * (length - 4 * pairs)  # the filler
        scored = [t for t, y in enumerate(ex.labels) if y != IGNORE_INDEX]
        assert len(scored) == pairs
        for t in scored:
            # Brute force: scan the context for the queried key and read the value after it.
            hit = next(i for i in range(0, len(context), 2) if context[i] == ids[t])
            assert ex.labels[t] == context[hit + 1]


def test_mqar_length_conflicts_are_refused() -> None:
    with pytest.raises(ValueError, match=r"length=30 is shorter than the 32 tokens of 8 pairs and 8 queries"):
        tasks.MQAR(num_pairs=8, length=30)
    with pytest.raises(ValueError, match=r"gap=5 and length=64 disagree \(length sets gap = 32\)"):
        tasks.MQAR(num_pairs=8, gap=5, length=64)
    task = tasks.MQAR(num_pairs=8, length=64)
    assert tasks.MQAR(**task.options()).examples(3, seed=2) == task.examples(3, seed=2)
    assert tasks.MQAR(num_pairs=8, gap=4).max_length == 36  # unset length: as before


# ----------------------------------------------------------------------------- char_lm


def test_char_lm_windows_are_the_splits_text_shifted_by_one() -> None:
    length = 1024
    task = tasks.CharLM(length=length)
    validation, train = split_text("validation"), split_text("train")
    for ex in task.examples(6, seed=0, split="validation"):
        assert len(ex.input_ids) == len(ex.labels) == length
        assert ex.input_ids[1:] == ex.labels[:-1]
        window = as_bytes([*ex.input_ids, ex.labels[-1]])
        assert window in validation + b"\n" + validation[:length]  # contiguous text, wrapping at the end
        assert window not in train  # split by file: the training files do not hold it
