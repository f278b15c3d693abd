"""Search loops over a decoding session: token-by-token (greedy/sampling) and beam search.

Both loops are independent of the model: they call ``session.first()``,
``session.step(tokens)`` and (beam search) ``session.reorder(index)``.

Beam search keeps ``num_beams`` live hypotheses per row. A hypothesis ending in EOS is
finished with score ``sum(log p) / length ** length_penalty`` (``length`` counts the
generated tokens, EOS included); hypotheses still live after ``max_new_tokens`` are
finished at that length. A row stops early only when no live hypothesis can still beat
its ``num_return_sequences``-th best finished one (log-probabilities never increase,
so the bound is exact): the result equals running to ``max_new_tokens``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnkit.generate.controls import Controls
from attnkit.generate.sampling import next_tokens

Streamer = Callable[[Tensor], None]


def sample_loop(
    session: Any,
    *,
    max_new_tokens: int,
    eos_token_id: int | None,
    pad_token_id: int,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    streamer: Streamer | None = None,
    controls: Controls | None = None,
    contexts: list[list[int]] | None = None,
) -> Tensor:
    """Greedy or sampled decoding. Returns the new tokens, long ``(N, n)`` with ``n <= max_new_tokens``.

    Rows that emitted ``eos_token_id`` (or a stop string, or have no allowed token left:
    :mod:`attnkit.generate.controls`) continue with ``pad_token_id``; the loop stops when
    every row has finished. ``streamer`` receives each step's tokens ``(N,)``. ``contexts``
    are the rows' prompt tokens, for the controls.
    """
    logits = session.first()
    rows = logits.shape[0]
    finished = torch.zeros(rows, dtype=torch.bool, device=logits.device)
    history = [list(c) for c in contexts] if contexts is not None else [[] for _ in range(rows)]
    prompt_lengths = [len(h) for h in history]  # a row's generated tokens are history[row][prompt_length:]
    out: list[Tensor] = []
    for step in range(max_new_tokens):
        scores, dead = logits, None
        if controls is not None and controls.shapes_scores:
            scores = controls.adjust(torch.log_softmax(logits.float(), dim=-1), history, step)
            dead = torch.isinf(scores).all(dim=-1)
            scores = scores.masked_fill(dead[:, None], 0.0)  # a row with no allowed token: any draw, then ended
        tokens = next_tokens(scores, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        if dead is not None:
            ended = eos_token_id if eos_token_id is not None else pad_token_id
            tokens = torch.where(dead, torch.full_like(tokens, ended), tokens)
        tokens = torch.where(finished, torch.full_like(tokens, pad_token_id), tokens)
        out.append(tokens)
        if streamer is not None:
            streamer(tokens)
        live = ~finished
        if dead is not None:
            finished |= dead
        if eos_token_id is not None:
            finished |= tokens == eos_token_id
        if controls is not None:
            finished |= _record(tokens, live, history, prompt_lengths, controls)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        logits = session.step(tokens)
    return torch.stack(out, dim=1)


def _record(
    tokens: Tensor, live: Tensor, history: list[list[int]], prompt_lengths: list[int], controls: Controls
) -> Tensor:
    """Append the token of each row that was live this step to its context; True where a stop string ends a row."""
    stopped = torch.zeros_like(live)
    for row in live.nonzero().flatten().tolist():
        token = int(tokens[row])
        history[row].append(token)
        stopped[row] = controls.stops(history[row][prompt_lengths[row] :])
    return stopped


@dataclass(order=True)
class Hypothesis:
    """A finished beam: its normalised score and tokens."""

    score: float
    tokens: list[int]


def _normalised(total: float, length: int, length_penalty: float) -> float:
    return total / (length**length_penalty)


def beam_search(
    session: Any,
    *,
    batch: int,
    num_beams: int,
    max_new_tokens: int,
    eos_token_id: int | None,
    pad_token_id: int,
    length_penalty: float = 1.0,
    num_return_sequences: int = 1,
    controls: Controls | None = None,
    contexts: list[list[int]] | None = None,
) -> tuple[Tensor, Tensor]:
    """Beam search over a session holding ``batch * num_beams`` rows (each row repeated ``num_beams`` times).

    ``controls`` (:mod:`attnkit.generate.controls`) shape each beam's log-probabilities from its
    own context (``contexts[b]``, the row's prompt tokens, then the beam's tokens); a beam whose
    text reaches a stop string is finished like one that emitted EOS.

    Returns:
        ``(tokens, scores)``: long ``(batch * num_return_sequences, n)`` new tokens (best
        first within a row, padded with ``pad_token_id`` after EOS) and float64
        ``(batch * num_return_sequences,)`` normalised scores.
    """
    k = num_beams
    logits = session.first()
    device = logits.device
    vocab = logits.shape[-1]
    beam_scores = torch.full((batch, k), float("-inf"), dtype=torch.float64, device=device)
    beam_scores[:, 0] = 0.0  # all beams start equal: keep one so the first step has no duplicates
    history: list[list[list[int]]] = [[[] for _ in range(k)] for _ in range(batch)]
    finished: list[list[Hypothesis]] = [[] for _ in range(batch)]
    done = [False] * batch

    for step in range(max_new_tokens):
        length = step + 1
        logp = torch.log_softmax(logits.double(), dim=-1)
        if controls is not None and controls.shapes_scores:
            prompts = contexts if contexts is not None else [[] for _ in range(batch)]
            beams = [[*prompts[b], *history[b][j]] for b in range(batch) for j in range(k)]
            logp = controls.adjust(logp, beams, step)
        logp = logp.view(batch, k, vocab)
        candidates = (beam_scores[..., None] + logp).view(batch, k * vocab)
        top_scores, top_index = candidates.topk(min(2 * k, k * vocab), dim=-1)
        top_scores_list, top_index_list = top_scores.tolist(), top_index.tolist()
        new_scores = torch.full((batch, k), float("-inf"), dtype=torch.float64)
        new_beams = torch.zeros(batch, k, dtype=torch.long)
        new_tokens = torch.full((batch, k), pad_token_id, dtype=torch.long)
        new_history: list[list[list[int]]] = []
        last = step == max_new_tokens - 1
        for b in range(batch):
            rows: list[list[int]] = []
            if not done[b]:
                for score, flat in zip(top_scores_list[b], top_index_list[b]):
                    if score == float("-inf") or len(rows) == k:
                        break
                    beam, token = divmod(flat, vocab)
                    seq = [*history[b][beam], token]
                    if token == eos_token_id or last or (controls is not None and controls.stops(seq)):
                        finished[b].append(Hypothesis(_normalised(score, length, length_penalty), seq))
                        continue
                    new_scores[b, len(rows)] = score
                    new_beams[b, len(rows)] = beam
                    new_tokens[b, len(rows)] = token
                    rows.append(seq)
                finished[b].sort(reverse=True)
                del finished[b][k:]
                done[b] = (
                    last
                    or not rows
                    or _row_done(
                        finished[b], new_scores[b], length, max_new_tokens, length_penalty, num_return_sequences
                    )
                )
            new_history.append(rows + [[] for _ in range(k - len(rows))])
        if all(done):
            break
        history = new_history
        beam_scores = new_scores.to(device)
        for b in range(batch):
            if done[b]:
                beam_scores[b] = float("-inf")
        index = (torch.arange(batch)[:, None] * k + new_beams).view(-1).to(device)
        session.reorder(index)
        logits = session.step(new_tokens.view(-1).to(device))
    return _collect(finished, num_return_sequences, pad_token_id, device)


def _row_done(
    finished: list[Hypothesis],
    live_scores: Tensor,
    length: int,
    max_new_tokens: int,
    length_penalty: float,
    needed: int,
) -> bool:
    if len(finished) < needed:
        return False
    best_live = float(live_scores.max())
    if best_live == float("-inf"):
        return True
    # Scores only fall as hypotheses grow; the normaliser is best at the longest length
    # for a positive penalty and at the next length otherwise.
    bound_length = max_new_tokens if length_penalty > 0 else length + 1
    return _normalised(best_live, bound_length, length_penalty) <= finished[needed - 1].score


def _collect(finished: list[list[Hypothesis]], count: int, pad: int, device: torch.device) -> tuple[Tensor, Tensor]:
    # A row whose controls left fewer than ``count`` hypotheses is filled with empty ones scored -inf,
    # so the result keeps ``count`` rows per input.
    empty = Hypothesis(float("-inf"), [])
    chosen = [hyp for row in finished for hyp in (row[:count] + [empty] * max(count - len(row), 0))]
    width = max(1, max(len(h.tokens) for h in chosen))
    tokens = torch.full((len(chosen), width), pad, dtype=torch.long)
    for i, hyp in enumerate(chosen):
        if hyp.tokens:
            tokens[i, : len(hyp.tokens)] = torch.tensor(hyp.tokens, dtype=torch.long)
    scores = torch.tensor([h.score for h in chosen], dtype=torch.float64)
    return tokens.to(device), scores.to(device)
