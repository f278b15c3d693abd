"""Beam search against exhaustive enumeration and an independent list-based beam search."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from attnkit import EncoderDecoder, LanguageModel, TransformerConfig
from attnkit.generate import beam_search
from attnkit.generate.sessions import LanguageModelSession

VOCAB, EOS = 4, 0
CFG = TransformerConfig(vocab_size=VOCAB, dim=16, depth=1, heads=2, eos_token_id=EOS, pad_token_id=EOS)


def sequence_logprobs(model: LanguageModel, prompt: list[int], continuations: list[list[int]]) -> list[float]:
    """log p(continuation | prompt) for each continuation, from one batched forward pass (float64 sums)."""
    width = max(len(c) for c in continuations)
    x = torch.tensor([prompt + c + [EOS] * (width - len(c)) for c in continuations])
    with torch.no_grad():
        logp = torch.log_softmax(model(x).double(), dim=-1)
    start = len(prompt) - 1
    return [sum(float(logp[row, start + i, tok]) for i, tok in enumerate(c)) for row, c in enumerate(continuations)]


def all_continuations(max_new: int) -> list[list[int]]:
    """Every continuation beam search can return: EOS only at the end, or none at full length."""
    out: list[list[int]] = []
    for length in range(1, max_new + 1):
        for body in itertools.product([t for t in range(VOCAB) if t != EOS], repeat=length - 1):
            out.append([*body, EOS])
            if length == max_new:
                for last in range(VOCAB):
                    if last != EOS:
                        out.append([*body, last])
    return out


def brute_force(model: LanguageModel, prompt: list[int], max_new: int, alpha: float) -> list[tuple[float, list[int]]]:
    seqs = all_continuations(max_new)
    scores = sequence_logprobs(model, prompt, seqs)
    return sorted(((total / len(seq) ** alpha, seq) for total, seq in zip(scores, seqs)), key=lambda s: -s[0])


@pytest.mark.parametrize("alpha", [0.0, 1.0, 2.0, -0.5])
def test_wide_beam_equals_exhaustive_search(alpha: float) -> None:
    torch.manual_seed(0)
    model = LanguageModel(CFG).eval()
    with torch.no_grad():  # make EOS likely enough that length matters
        model.lm_head.proj.weight[EOS] *= 3
    prompts = [[1, 2], [3, 3]]
    max_new = 3
    out = model.generate(torch.tensor(prompts), max_new, num_beams=16, num_return_sequences=4, length_penalty=alpha)
    for row, prompt in enumerate(prompts):
        expected = brute_force(model, prompt, max_new, alpha)[:4]
        got = out[4 * row : 4 * row + 4, len(prompt) :].tolist()
        for (_, seq), tokens in zip(expected, got):
            assert tokens[: len(seq)] == seq, f"alpha={alpha}: got {got}, expected {[s for _, s in expected]}"
            assert all(t == EOS for t in tokens[len(seq) :])  # padded with pad_token_id (= EOS here)
        # the scores beam search reports are the normalised log-probabilities
        session = LanguageModelSession(model, torch.tensor([prompt]).repeat(16, 1), None, use_cache=True)
        with torch.no_grad():
            _, scores = beam_search(
                session,
                batch=1,
                num_beams=16,
                max_new_tokens=max_new,
                eos_token_id=EOS,
                pad_token_id=EOS,
                length_penalty=alpha,
                num_return_sequences=4,
            )
        torch.testing.assert_close(
            scores, torch.tensor([s for s, _ in expected], dtype=torch.float64), atol=1e-5, rtol=0
        )


def reference_beam(model: LanguageModel, prompt: list[int], beams: int, max_new: int, alpha: float) -> list[int]:
    """Plain beam search written with lists, recomputing every hypothesis from scratch."""
    live: list[tuple[float, list[int]]] = [(0.0, [])]
    finished: list[tuple[float, list[int]]] = []
    for step in range(max_new):
        candidates = []
        for total, seq in live:
            x = torch.tensor([prompt + seq])
            with torch.no_grad():
                logp = torch.log_softmax(model(x).double()[0, -1], dim=-1)
            candidates += [(total + float(logp[t]), [*seq, t]) for t in range(VOCAB)]
        candidates.sort(key=lambda c: -c[0])
        live = []
        for total, seq in candidates[: 2 * beams]:
            if len(live) == beams:
                break
            if seq[-1] == EOS or step == max_new - 1:
                finished.append((total / len(seq) ** alpha, seq))
            else:
                live.append((total, seq))
    return max(finished, key=lambda f: f[0])[1]


@pytest.mark.parametrize("beams", [1, 2, 3])
def test_narrow_beam_equals_reference_beam_search(beams: int) -> None:
    torch.manual_seed(1)
    model = LanguageModel(CFG.replace(vocab_size=6)).eval()
    prompt = [1, 4, 2]
    out = model.generate(torch.tensor([prompt]), 5, num_beams=beams, length_penalty=1.0)[0, 3:].tolist()
    expected = reference_beam(model, prompt, beams, 5, 1.0)
    assert out[: len(expected)] == expected


def test_one_beam_is_greedy() -> None:
    torch.manual_seed(2)
    model = LanguageModel(CFG.replace(vocab_size=9, eos_token_id=None)).eval()
    prompt = torch.randint(0, 9, (3, 4))
    greedy = model.generate(prompt, 6)
    beam = model.generate(prompt, 6, num_beams=1)
    assert torch.equal(greedy, beam)


def test_encoder_decoder_beam_equals_exhaustive_search() -> None:
    torch.manual_seed(3)
    model = EncoderDecoder(CFG.replace(bos_token_id=1)).eval()
    src = torch.tensor([[2, 3, 1, 2]])
    out = model.generate(src, 3, num_beams=16, length_penalty=0.0)[0].tolist()
    assert model.generate(src, 3, num_beams=16, length_penalty=0.0, use_cache=False)[0].tolist() == out
    memory = model.encode(src)

    seqs = all_continuations(3)
    tgt = torch.tensor([[1, *seq] + [EOS] * (3 - len(seq)) for seq in seqs])
    with torch.no_grad():
        logp = torch.log_softmax(model.decode(tgt, memory.expand(len(seqs), -1, -1)).double(), dim=-1)
    scores = [sum(float(logp[row, i, t]) for i, t in enumerate(seq)) for row, seq in enumerate(seqs)]
    best = seqs[max(range(len(seqs)), key=lambda i: scores[i])]
    assert out[: len(best)] == best
    assert math.isfinite(max(scores))


def test_model_beam_search_returns_exhaustive_search_scores() -> None:
    torch.manual_seed(4)
    model = LanguageModel(CFG).eval()
    with torch.no_grad():
        model.lm_head.proj.weight[EOS] *= 3
    prompts = [[1, 2], [3, 1]]
    sequences, scores = model.beam_search(
        torch.tensor(prompts), 3, num_beams=16, num_return_sequences=3, length_penalty=0.5
    )
    assert sequences.shape[0] == scores.shape[0] == 6 and scores.dtype == torch.float64
    assert torch.equal(
        sequences,
        model.generate(torch.tensor(prompts), 3, num_beams=16, num_return_sequences=3, length_penalty=0.5),
    )
    expected = [score for prompt in prompts for score, _ in brute_force(model, prompt, 3, 0.5)[:3]]
    torch.testing.assert_close(scores, torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=0)


def test_encoder_decoder_beam_search_scores_are_decoder_log_probabilities() -> None:
    torch.manual_seed(5)
    model = EncoderDecoder(CFG.replace(bos_token_id=1)).eval()
    src = torch.tensor([[2, 3, 1, 2]])
    targets, scores = model.beam_search(src, 3, num_beams=16, num_return_sequences=2, length_penalty=1.0)
    memory = model.encode(src)
    for row, score in zip(targets.tolist(), scores.tolist()):
        seq = row[: row.index(EOS) + 1] if EOS in row else row
        tgt = torch.tensor([[1, *seq]])
        with torch.no_grad():
            logp = torch.log_softmax(model.decode(tgt, memory).double(), dim=-1)[0]
        expected = sum(float(logp[i, t]) for i, t in enumerate(seq)) / len(seq)
        assert score == pytest.approx(expected, abs=1e-5)
