"""Generation controls: repetition penalty, no-repeat n-grams, a minimum length and stop strings.

They act the same way in greedy, sampled and beam-search decoding, on each row's (or beam's)
*log-probabilities* before a token is chosen, so greedy decoding stays beam search of width 1:

- ``repetition_penalty`` ``p`` (CTRL, Keskar et al. 2019, arXiv:1909.05858): the
  log-probability of every token already in the row's context (the real prompt tokens and the
  tokens generated so far; for an encoder-decoder, the generated target) is multiplied by ``p``.
  Log-probabilities are ≤ 0, so ``p > 1`` makes repeats less likely and ``p = 1`` changes nothing.
- ``no_repeat_ngram_size`` ``n``: a token that would complete an ``n``-gram already present in the
  context is forbidden.
- ``min_new_tokens`` ``m``: the end-of-sequence token is forbidden before ``m`` new tokens.
- ``stop_strings``: a row (a beam) is finished as soon as the text of its generated tokens
  (``decode(tokens)``) contains one of them; the token that completed it is kept.

A row with no allowed token left (every token forbidden) is finished, as if it had emitted EOS.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from attnkit.generate.sampling import argument_name

Decode = Callable[[Sequence[int]], str]


@dataclass(frozen=True)
class Controls:
    """The controls of one generation call (see the module docstring)."""

    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    min_new_tokens: int = 0
    stop_strings: tuple[str, ...] = ()
    decode: Decode | None = None
    eos_token_id: int | None = None

    @property
    def shapes_scores(self) -> bool:
        """Whether any control changes the log-probabilities."""
        return (
            self.repetition_penalty != 1.0
            or self.no_repeat_ngram_size > 0
            or (self.min_new_tokens > 0 and self.eos_token_id is not None)
        )

    def adjust(self, logp: Tensor, contexts: Sequence[Sequence[int]], generated: int) -> Tensor:
        """Controlled log-probabilities ``(N, V)`` for rows whose contexts are ``contexts``.

        Args:
            logp: ``(N, V)`` log-probabilities.
            contexts: each row's context (prompt tokens and generated tokens, oldest first).
            generated: how many tokens each row has generated so far.
        """
        if not self.shapes_scores:
            return logp
        out = logp.clone()
        vocab = out.shape[-1]
        for row, context in enumerate(contexts):
            if self.repetition_penalty != 1.0 and context:
                seen = torch.tensor(sorted(set(context)), dtype=torch.long, device=out.device)
                out[row, seen] = out[row, seen] * self.repetition_penalty
            banned = self.banned_tokens(context)
            if banned:
                out[row, [t for t in banned if t < vocab]] = float("-inf")
        if self.eos_token_id is not None and generated < self.min_new_tokens:
            out[:, self.eos_token_id] = float("-inf")
        return out

    def banned_tokens(self, context: Sequence[int]) -> set[int]:
        """Tokens that would complete an ``n``-gram already in ``context``."""
        n = self.no_repeat_ngram_size
        if n <= 0 or len(context) < n:
            return set()
        prefix = tuple(context[len(context) - n + 1 :]) if n > 1 else ()
        return {context[i + n - 1] for i in range(len(context) - n + 1) if tuple(context[i : i + n - 1]) == prefix}

    def stops(self, generated: Sequence[int]) -> bool:
        """Whether the text of ``generated`` contains a stop string."""
        if not self.stop_strings or self.decode is None:
            return False
        text = self.decode(list(generated))
        return any(stop in text for stop in self.stop_strings)


def check_controls(
    repetition_penalty: object,
    no_repeat_ngram_size: object,
    min_new_tokens: object,
    stop_strings: object,
    decode: object,
    max_new_tokens: int,
    *,
    names: dict[str, str] | None = None,
) -> None:
    """Validate the controls; each error names the argument.

    Raises:
        ValueError: a bad value, ``min_new_tokens > max_new_tokens``, or ``stop_strings``
            without ``decode``.
    """

    def name(argument: str) -> str:
        return argument_name(names, argument)

    if (
        isinstance(repetition_penalty, bool)
        or not isinstance(repetition_penalty, (int, float))
        or not repetition_penalty > 0
    ):
        raise ValueError(f"{name('repetition_penalty')} must be a number > 0 (1 = off), got {repetition_penalty!r}")
    for argument, value in (("no_repeat_ngram_size", no_repeat_ngram_size), ("min_new_tokens", min_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name(argument)} must be an integer >= 0 (0 = off), got {value!r}")
    assert isinstance(min_new_tokens, int)
    if min_new_tokens > max_new_tokens:
        raise ValueError(f"{name('min_new_tokens')}={min_new_tokens} exceeds {name('max_new_tokens')}={max_new_tokens}")
    if not isinstance(stop_strings, (list, tuple)) or not all(isinstance(s, str) and s for s in stop_strings):
        raise ValueError(f"{name('stop_strings')} must be a list of non-empty strings, got {stop_strings!r}")
    if stop_strings and not callable(decode):
        raise ValueError(
            f"{name('stop_strings')} need {name('decode')}: a function from token ids to text "
            "(for example tokenizer.decode)"
        )
