"""Generation controls against brute-force references on tiny vocabularies."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
from torch import Tensor

from attnkit.generate.controls import Controls
from attnkit.generate.search import beam_search, sample_loop
from attnkit.models import LanguageModel, TransformerConfig

EOS = 0


def _logits(seq: tuple[int, ...], vocab: int) -> Tensor:
    """A fixed pseudo-model: logits as a deterministic function of the whole sequence."""
    g = torch.Generator().manual_seed(hash(seq) % (2**31))
    return torch.randn(vocab, generator=g, dtype=torch.float64) * 2


class FakeSession:
    def __init__(self, prompts: list[list[int]], vocab: int) -> None:
        self.rows = [list(p) for p in prompts]
        self.vocab = vocab

    def _now(self) -> Tensor:
        return torch.stack([_logits(tuple(r), self.vocab) for r in self.rows])

    def first(self) -> Tensor:
        return self._now()

    def step(self, tokens: Tensor) -> Tensor:
        for row, token in zip(self.rows, tokens.tolist()):
            row.append(token)
        return self._now()

    def reorder(self, index: Tensor) -> None:
        self.rows = [list(self.rows[i]) for i in index.tolist()]


def _decode(ids: list[int]) -> str:
    return "".join(chr(ord("a") + t) for t in ids)


def _controlled(context: list[int], generated: int, vocab: int, p: float, n: int, m: int) -> list[float]:
    """The controls written out directly from their definitions."""
    logp = torch.log_softmax(_logits(tuple(context), vocab), dim=-1).tolist()
    for t in set(context):
        logp[t] *= p
    if n > 0 and len(context) >= n:
        for i in range(len(context) - n + 1):
            if context[i : i + n - 1] == context[len(context) - n + 1 :]:
                logp[context[i + n - 1]] = -math.inf
    if generated < m:
        logp[EOS] = -math.inf
    return logp


def _brute_greedy(
    prompt: list[int], steps: int, vocab: int, p: float, n: int, m: int, stops: tuple[str, ...]
) -> list[int]:
    out: list[int] = []
    while len(out) < steps:
        logp = _controlled(prompt + out, len(out), vocab, p, n, m)
        if all(x == -math.inf for x in logp):
            out.append(EOS)
            break
        token = max(range(vocab), key=lambda t: (logp[t], -t))
        out.append(token)
        if token == EOS or any(s in _decode(out) for s in stops):
            break
    return out


SETTINGS = [
    (1.0, 0, 0, ()),
    (1.8, 0, 0, ()),
    (0.6, 0, 0, ()),
    (1.0, 2, 0, ()),
    (1.0, 1, 0, ()),
    (1.3, 3, 2, ()),
    (1.0, 0, 4, ("cb",)),
    (1.5, 2, 1, ("dd", "bc")),
]


@pytest.mark.parametrize(("penalty", "ngram", "min_new", "stops"), SETTINGS)
def test_greedy_with_controls_matches_brute_force(penalty: float, ngram: int, min_new: int, stops: tuple) -> None:
    vocab, steps = 5, 8
    rng = random.Random(0)
    prompts = [[rng.randrange(1, vocab) for _ in range(rng.randrange(1, 6))] for _ in range(6)]
    controls = Controls(penalty, ngram, min_new, stops, _decode, EOS)
    tokens = sample_loop(
        FakeSession(prompts, vocab),
        max_new_tokens=steps,
        eos_token_id=EOS,
        pad_token_id=EOS,
        controls=controls,
        contexts=prompts,
    )
    for prompt, row in zip(prompts, tokens.tolist()):
        expected = _brute_greedy(prompt, steps, vocab, penalty, ngram, min_new, stops)
        assert row[: len(expected)] == expected
        assert all(t == EOS for t in row[len(expected) :])  # padded after the end


def _exhaustive(prompt: list[int], steps: int, vocab: int, p: float, n: int, m: int, stops: tuple, lp: float):
    """Every finished sequence with its normalised score, by enumeration."""
    finished = []
    frontier = [([], 0.0)]
    for length in range(1, steps + 1):
        grown = []
        for seq, score in frontier:
            logp = _controlled(prompt + seq, len(seq), vocab, p, n, m)
            for token in range(vocab):
                if logp[token] == -math.inf:
                    continue
                new, total = [*seq, token], score + logp[token]
                if token == EOS or length == steps or any(s in _decode(new) for s in stops):
                    finished.append((total / length**lp, new))
                else:
                    grown.append((new, total))
        frontier = grown
    return sorted(finished, key=lambda f: -f[0])


@pytest.mark.parametrize(("penalty", "ngram", "min_new", "stops"), SETTINGS)
def test_exhaustive_beam_search_with_controls_matches_enumeration(
    penalty: float, ngram: int, min_new: int, stops: tuple
) -> None:
    vocab, steps = 3, 4
    beams = vocab**steps  # wide enough to keep every sequence: beam search becomes exhaustive
    prompts = [[1, 2, 1], [2]]
    controls = Controls(penalty, ngram, min(min_new, steps), stops, _decode, EOS)
    session = FakeSession([p for p in prompts for _ in range(beams)], vocab)
    tokens, scores = beam_search(
        session,
        batch=len(prompts),
        num_beams=beams,
        max_new_tokens=steps,
        eos_token_id=EOS,
        pad_token_id=EOS,
        length_penalty=0.7,
        num_return_sequences=2,
        controls=controls,
        contexts=prompts,
    )
    for b, prompt in enumerate(prompts):
        best = _exhaustive(prompt, steps, vocab, penalty, ngram, min(min_new, steps), stops, 0.7)[:2]
        best += [(-math.inf, [])] * (2 - len(best))  # fewer hypotheses than asked: empty, scored -inf
        for r, (score, seq) in enumerate(best):
            assert scores[2 * b + r].item() == pytest.approx(score, abs=1e-9)
            assert tokens[2 * b + r].tolist()[: len(seq)] == seq


def test_sampling_never_draws_a_forbidden_token() -> None:
    vocab = 4
    prompts = [[1, 2, 3, 1]] * 64  # no bigram repeated in the prompt itself
    controls = Controls(1.0, 2, 3, (), None, EOS)
    tokens = sample_loop(
        FakeSession(prompts, vocab),
        max_new_tokens=6,
        eos_token_id=EOS,
        pad_token_id=EOS,
        temperature=1.5,
        generator=torch.Generator().manual_seed(0),
        controls=controls,
        contexts=prompts,
    )
    for row in tokens.tolist():
        end = row.index(EOS) if EOS in row else len(row)
        assert end >= 3  # min_new_tokens
        seq = prompts[0] + row[: end + 1]
        bigrams = list(itertools.pairwise(seq[: len(prompts[0]) + end]))
        assert len(bigrams) == len(set(bigrams))  # no bigram twice


def test_model_generate_honours_the_controls_against_recomputation() -> None:
    torch.manual_seed(0)
    model = LanguageModel(TransformerConfig(vocab_size=7, dim=16, depth=1, heads=2, max_len=64, eos_token_id=0)).eval()
    prompt = torch.tensor([[3, 4, 3, 4, 5]])
    out = model.generate(prompt, 10, repetition_penalty=1.4, no_repeat_ngram_size=2, min_new_tokens=3)
    seq = prompt[0].tolist()
    for _ in range(10):  # brute force: the full forward at every step, rules applied by hand
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([seq]))[0, -1].double(), -1).tolist()
        for t in set(seq):
            logp[t] *= 1.4
        for i in range(len(seq) - 1):
            if seq[i] == seq[-1]:
                logp[seq[i + 1]] = -math.inf
        if len(seq) - 5 < 3:
            logp[0] = -math.inf
        token = max(range(7), key=lambda t: logp[t])
        seq.append(token)
        if token == 0:
            break
    assert out[0].tolist()[: len(seq)] == seq


def test_bad_controls_are_named() -> None:
    model = LanguageModel(TransformerConfig(vocab_size=7, dim=16, depth=1, heads=2, max_len=64, eos_token_id=0))
    prompt = torch.tensor([[3, 4]])
    with pytest.raises(ValueError, match="repetition_penalty must be a number > 0"):
        model.generate(prompt, 4, repetition_penalty=0)
    with pytest.raises(ValueError, match="no_repeat_ngram_size must be an integer >= 0"):
        model.generate(prompt, 4, no_repeat_ngram_size=-1)
    with pytest.raises(ValueError, match="min_new_tokens=5 exceeds max_new_tokens=4"):
        model.generate(prompt, 4, min_new_tokens=5)
    with pytest.raises(ValueError, match="stop_strings need decode"):
        model.generate(prompt, 4, stop_strings=["x"])
    no_eos = LanguageModel(TransformerConfig(vocab_size=7, dim=16, depth=1, heads=2, max_len=64))
    with pytest.raises(ValueError, match="min_new_tokens=2 holds back the end-of-sequence token"):
        no_eos.generate(prompt, 4, min_new_tokens=2)
    with pytest.raises(ValueError, match="stop_strings must be a list of non-empty strings"):
        model.generate(prompt, 4, stop_strings="x", decode=str)  # type: ignore[arg-type]
