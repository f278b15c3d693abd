"""Masked LM and span corruption, against brute-force reconstruction and counted statistics."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from pathlib import Path

import pytest

from attnkit.data.objectives import MaskedLM, SpanCorruption, random_segmentation
from attnkit.data.tasks.base import IGNORE_INDEX
from attnkit.data.tokenizers import BOS_ID, EOS_ID, SEP_ID

VOCAB = 50


def _sequence(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(4, VOCAB) for _ in range(n)]


def test_masked_lm_chooses_the_exact_count_and_reconstructs() -> None:
    mlm = MaskedLM(VOCAB)
    kinds: Counter[str] = Counter()
    for seed in range(400):
        rng = random.Random(seed)
        ids = [BOS_ID, *_sequence(rng, rng.randrange(1, 60)), SEP_ID, *_sequence(rng, 5), EOS_ID]
        example = mlm(ids, random.Random(seed))
        chosen = [i for i, label in enumerate(example.labels) if label != IGNORE_INDEX]
        maskable = [i for i, t in enumerate(ids) if t not in (BOS_ID, EOS_ID, SEP_ID)]
        assert len(chosen) == max(1, round(0.15 * len(maskable)))
        assert set(chosen) <= set(maskable)  # special tokens are never chosen
        for i, (original, corrupted, label) in enumerate(zip(ids, example.input_ids, example.labels)):
            if i in chosen:
                assert label == original
                kinds["mask" if corrupted == mlm.mask_id else "same" if corrupted == original else "random"] += 1
                assert corrupted == mlm.mask_id or 4 <= corrupted < VOCAB
            else:
                assert (corrupted, label) == (original, IGNORE_INDEX)
        # Brute-force reconstruction: the labels put back give the original sequence.
        restored = [lab if lab != IGNORE_INDEX else tok for tok, lab in zip(example.input_ids, example.labels)]
        assert restored == ids
    total = sum(kinds.values())
    # 80 / 10 / 10 (a random draw equal to the original counts as "same": 1/46 of the random tenth).
    for kind, share in (("mask", 0.8), ("random", 0.1 * 45 / 46), ("same", 0.1 + 0.1 / 46)):
        sigma = (share * (1 - share) / total) ** 0.5
        assert abs(kinds[kind] / total - share) < 5 * sigma, (kind, kinds, total)
    assert mlm.vocab_size == VOCAB + 1


def _reconstruct(span: SpanCorruption, inputs: tuple[int, ...], target: tuple[int, ...]) -> list[int]:
    assert target[-1] == EOS_ID
    pieces: dict[int, list[int]] = {}
    current = None
    for token in target[:-1]:
        if token >= span.base_vocab_size:
            current = token
            pieces[current] = []
        else:
            assert current is not None
            pieces[current].append(token)
    out: list[int] = []
    for token in inputs:
        out += pieces.pop(token) if token >= span.base_vocab_size else [token]
    assert not pieces  # every sentinel of the target appears in the input
    return out


def test_span_corruption_reconstructs_and_has_the_asked_statistics() -> None:
    span = SpanCorruption(VOCAB, noise_density=0.15, mean_span_length=3.0)
    noise_total = spans_total = 0
    for seed in range(500):
        rng = random.Random(seed)
        ids = _sequence(rng, rng.randrange(2, 200))
        example = span(ids, random.Random(seed))
        assert _reconstruct(span, example.input_ids, example.labels) == ids
        assert example.decoder_input_ids == (BOS_ID, *example.labels[:-1])
        spans = span.spans(len(ids), random.Random(seed))
        noise = sum(b - a for a, b in spans)
        assert noise == min(max(1, round(0.15 * len(ids))), len(ids) - 1)
        assert spans[0][0] >= 1 and all(a < b for a, b in spans)  # starts with kept tokens; no empty span
        assert all(b1 < a2 for (_, b1), (a2, _) in itertools.pairwise(spans))  # kept tokens between spans
        sentinels = [t for t in example.input_ids if t >= VOCAB]
        assert sentinels == [span.sentinel(i) for i in range(len(spans))]
        if len(ids) >= 100:
            noise_total += noise
            spans_total += len(spans)
    assert noise_total / spans_total == pytest.approx(3.0, rel=0.1)


def test_random_segmentation_is_uniform_over_compositions() -> None:
    # Compositions of 7 into 3 positive parts: C(6, 2) = 15, each with probability 1/15.
    rng = random.Random(0)
    counts = Counter(tuple(random_segmentation(7, 3, rng)) for _ in range(15_000))
    brute = {c for c in itertools.product(range(1, 8), repeat=3) if sum(c) == 7}
    assert set(counts) == brute
    assert all(abs(n - 1000) < 5 * (1000 * 14 / 15) ** 0.5 for n in counts.values()), counts
    with pytest.raises(ValueError, match="cannot split 2 items into 3"):
        random_segmentation(2, 3, rng)


def test_same_seed_same_example_and_bad_settings_are_named() -> None:
    ids = list(range(4, 40))
    assert SpanCorruption(VOCAB)(ids, random.Random(3)) == SpanCorruption(VOCAB)(ids, random.Random(3))
    assert MaskedLM(VOCAB)(ids, random.Random(3)) == MaskedLM(VOCAB)(ids, random.Random(3))
    with pytest.raises(ValueError, match="mask_prob must be a number strictly between 0 and 1"):
        MaskedLM(VOCAB, mask_prob=0)
    with pytest.raises(ValueError, match=r"mask_token_fraction \+ random_token_fraction must be at most 1"):
        MaskedLM(VOCAB, mask_token_fraction=0.9, random_token_fraction=0.2)
    with pytest.raises(ValueError, match="mean_span_length must be a number >= 1"):
        SpanCorruption(VOCAB, mean_span_length=0.5)
    with pytest.raises(ValueError, match="base_vocab_size must be an integer above"):
        SpanCorruption(3)
    assert SpanCorruption(VOCAB)([7], random.Random(0)).labels == (EOS_ID,)  # too short to corrupt


def test_objective_stream_resumes_at_the_exact_example(tmp_path: Path) -> None:
    from attnkit.data.objectives import ObjectiveStream
    from attnkit.data.sources import TextChunkStream
    from attnkit.data.tokenizers import ByteTokenizer

    text = tmp_path / "a.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)

    def stream() -> ObjectiveStream:
        inner = TextChunkStream([text], ByteTokenizer(), seq_len=32, seed=0, loop=True)
        return ObjectiveStream(inner, SpanCorruption(260), seed=1)

    first = stream()
    uninterrupted = [next(first) for _ in range(12)]
    resumed = stream()
    for _ in range(5):
        next(resumed)
    state = resumed.state_dict()
    again = stream()
    again.load_state_dict(state)
    assert [next(again) for _ in range(7)] == uninterrupted[5:]
    windows = TextChunkStream([text], ByteTokenizer(), seq_len=32, seed=0, loop=True)
    window = next(windows)
    restored = _reconstruct(SpanCorruption(260), uninterrupted[0].input_ids, uninterrupted[0].labels)
    assert restored == [*window.input_ids, window.labels[-1]]
