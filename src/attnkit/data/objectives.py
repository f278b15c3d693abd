"""Pretraining objectives as example transforms: masked LM (BERT) and span corruption (T5).

Both take a token sequence from any stream (a window of the ``text`` corpus, say) and return
the :class:`~attnkit.data.tasks.Example` a model trains on. Their extra tokens come after the
tokenizer's vocabulary, so any tokenizer works unchanged: the model embeds
``objective.vocab_size`` ids.

- :class:`MaskedLM` (Devlin et al. 2019, "BERT", arXiv:1810.04805): ``round(mask_prob · n)``
  of the ``n`` maskable positions (at least one) are chosen; of those, 80% become ``<mask>``,
  10% a random ordinary token and 10% stay (the proportions are drawn per position). ``labels``
  hold the original token at the chosen positions and ``IGNORE_INDEX`` elsewhere: an encoder
  predicts every position at once.
- :class:`SpanCorruption` (Raffel et al. 2020, "T5", arXiv:1910.10683, §3.1.4):
  ``round(noise_density · n)`` tokens in ``round(noise / mean_span_length)`` spans are cut out;
  each span is replaced by one sentinel ``<extra_id_i>`` in the encoder input, and the target is
  ``<extra_id_0> span_0 <extra_id_1> span_1 … <eos>``: an encoder-decoder reconstructs them.
  Span lengths are a random composition (every span at least one token), as in T5's
  ``random_spans_noise_mask``, and the sequence starts with kept tokens.

Randomness comes from a ``random.Random`` the caller seeds per example, so an example is the
same whenever it is drawn again (a resumed run sees exactly the examples it would have seen).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from attnkit.core.errors import check_positive_int
from attnkit.data.batching import ExampleStream
from attnkit.data.tasks.base import IGNORE_INDEX, Example
from attnkit.data.tokenizers import BOS_ID, EOS_ID, PAD_ID, SEP_ID

__all__ = ["OBJECTIVES", "MaskedLM", "ObjectiveStream", "SpanCorruption", "make_objective", "random_segmentation"]

#: Token ids an objective never masks or corrupts (the tokenizers' special tokens).
SPECIAL_IDS = frozenset({PAD_ID, BOS_ID, EOS_ID, SEP_ID})
#: Values of the training config's ``objective``.
OBJECTIVES: tuple[str, ...] = ("causal", "mlm", "span")


def _check_fraction(name: str, value: float, *, upper_open: bool = False) -> None:
    ok = 0.0 < value < 1.0 if upper_open else 0.0 <= value <= 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok:
        bounds = "strictly between 0 and 1" if upper_open else "between 0 and 1"
        raise ValueError(f"{name} must be a number {bounds}, got {value!r}")


def _check_vocab(base_vocab_size: int) -> None:
    if isinstance(base_vocab_size, bool) or not isinstance(base_vocab_size, int) or base_vocab_size <= len(SPECIAL_IDS):
        raise ValueError(
            f"base_vocab_size must be an integer above the {len(SPECIAL_IDS)} special tokens, got {base_vocab_size!r}"
        )


@dataclass(frozen=True)
class MaskedLM:
    """BERT's masked-LM transform (see the module docstring).

    Attributes:
        base_vocab_size: the tokenizer's vocabulary; ``<mask>`` gets id ``base_vocab_size``.
        mask_prob: fraction of maskable positions chosen for prediction.
        mask_token_fraction: of the chosen positions, the share replaced by ``<mask>``.
        random_token_fraction: of the chosen positions, the share replaced by a random token
            (the rest keep their token).
    """

    base_vocab_size: int
    mask_prob: float = 0.15
    mask_token_fraction: float = 0.8
    random_token_fraction: float = 0.1

    def __post_init__(self) -> None:
        _check_vocab(self.base_vocab_size)
        _check_fraction("mask_prob", self.mask_prob, upper_open=True)
        _check_fraction("mask_token_fraction", self.mask_token_fraction)
        _check_fraction("random_token_fraction", self.random_token_fraction)
        if self.mask_token_fraction + self.random_token_fraction > 1.0:
            raise ValueError(
                "mask_token_fraction + random_token_fraction must be at most 1, got "
                f"{self.mask_token_fraction} + {self.random_token_fraction}"
            )

    @property
    def mask_id(self) -> int:
        """The id of ``<mask>``."""
        return self.base_vocab_size

    @property
    def vocab_size(self) -> int:
        """Ids the model must embed: the tokenizer's plus ``<mask>``."""
        return self.base_vocab_size + 1

    def __call__(self, ids: Sequence[int], rng: random.Random) -> Example:
        """The masked example of ``ids``: corrupted ``input_ids``, ``labels`` at the chosen positions."""
        inputs = list(ids)
        labels = [IGNORE_INDEX] * len(inputs)
        maskable = [i for i, token in enumerate(inputs) if token not in SPECIAL_IDS]
        if not maskable:
            return Example(input_ids=tuple(inputs), labels=tuple(labels))
        count = max(1, round(self.mask_prob * len(maskable)))
        for position in sorted(rng.sample(maskable, count)):
            labels[position] = inputs[position]
            draw = rng.random()
            if draw < self.mask_token_fraction:
                inputs[position] = self.mask_id
            elif draw < self.mask_token_fraction + self.random_token_fraction:
                inputs[position] = rng.randrange(len(SPECIAL_IDS), self.base_vocab_size)
        return Example(input_ids=tuple(inputs), labels=tuple(labels))


def random_segmentation(total: int, parts: int, rng: random.Random) -> list[int]:
    """``parts`` positive integers summing to ``total``, uniform over all such compositions."""
    if not 1 <= parts <= total:
        raise ValueError(f"cannot split {total} items into {parts} non-empty parts")
    cuts = sorted(rng.sample(range(1, total), parts - 1))
    edges = [0, *cuts, total]
    return [b - a for a, b in itertools.pairwise(edges)]


@dataclass(frozen=True)
class SpanCorruption:
    """T5's span-corruption transform (see the module docstring).

    Attributes:
        base_vocab_size: the tokenizer's vocabulary; sentinel ``i`` gets id ``base_vocab_size + i``.
        noise_density: fraction of tokens removed.
        mean_span_length: average length of a removed span.
        num_sentinels: sentinel ids reserved (the most spans one example may have).
    """

    base_vocab_size: int
    noise_density: float = 0.15
    mean_span_length: float = 3.0
    num_sentinels: int = 100

    def __post_init__(self) -> None:
        _check_vocab(self.base_vocab_size)
        _check_fraction("noise_density", self.noise_density, upper_open=True)
        if isinstance(self.mean_span_length, bool) or not (
            isinstance(self.mean_span_length, (int, float)) and self.mean_span_length >= 1
        ):
            raise ValueError(f"mean_span_length must be a number >= 1, got {self.mean_span_length!r}")
        check_positive_int("num_sentinels", self.num_sentinels)

    def sentinel(self, index: int) -> int:
        """The id of ``<extra_id_{index}>``."""
        return self.base_vocab_size + index

    @property
    def vocab_size(self) -> int:
        """Ids the model must embed: the tokenizer's plus the sentinels."""
        return self.base_vocab_size + self.num_sentinels

    def spans(self, length: int, rng: random.Random) -> list[tuple[int, int]]:
        """The ``(start, stop)`` noise spans for a sequence of ``length`` tokens, in order."""
        if length < 2:
            return []
        noise = min(max(1, round(self.noise_density * length)), length - 1)
        count = min(max(1, round(noise / self.mean_span_length)), noise, length - noise, self.num_sentinels)
        noise_lengths = random_segmentation(noise, count, rng)
        kept_lengths = random_segmentation(length - noise, count, rng)
        spans, start = [], 0
        for kept, noisy in zip(kept_lengths, noise_lengths):
            start += kept
            spans.append((start, start + noisy))
            start += noisy
        return spans

    def __call__(self, ids: Sequence[int], rng: random.Random) -> Example:
        """The corrupted encoder input and the decoder's sentinel-delimited target of ``ids``."""
        tokens = list(ids)
        inputs: list[int] = []
        target: list[int] = []
        cursor = 0
        for index, (start, stop) in enumerate(self.spans(len(tokens), rng)):
            inputs += [*tokens[cursor:start], self.sentinel(index)]
            target += [self.sentinel(index), *tokens[start:stop]]
            cursor = stop
        inputs += tokens[cursor:]
        target.append(EOS_ID)
        return Example(
            input_ids=tuple(inputs),
            decoder_input_ids=(BOS_ID, *target[:-1]),
            labels=tuple(target),
        )


class ObjectiveStream:
    """A language-modelling stream turned into an objective's examples, resumable.

    Each window of the inner stream (``input_ids`` and its shifted ``labels``: ``T + 1``
    tokens) becomes one example of ``objective``, drawn with a generator seeded by
    ``(seed, split, index)``, so the ``index``-th example is the same in every run.
    """

    def __init__(
        self, inner: ExampleStream, objective: MaskedLM | SpanCorruption, *, seed: int = 0, split: str = "train"
    ) -> None:
        self.inner, self.objective, self.seed, self.split = inner, objective, seed, split
        self.index = 0

    def __iter__(self) -> Iterator[Example]:
        return self

    def __next__(self) -> Example:
        window = next(self.inner)
        tokens = [*window.input_ids, *window.labels[-1:]]
        rng = random.Random(f"attnkit:{type(self.objective).__name__}:{self.seed}:{self.split}:{self.index}")
        self.index += 1
        return self.objective(tokens, rng)

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])
        self.index = int(state["index"])


_OPTION_NAMES = {
    "mlm": "mask_prob, mask_token_fraction, random_token_fraction",
    "span": "noise_density, mean_span_length, num_sentinels",
}


def make_objective(name: str, base_vocab_size: int, options: dict[str, Any]) -> MaskedLM | SpanCorruption:
    """The transform of objective ``name`` (``"mlm"`` or ``"span"``) for a tokenizer of ``base_vocab_size``.

    Raises:
        ValueError: for another name, or options the objective does not take or accept.
    """
    classes: dict[str, type[MaskedLM] | type[SpanCorruption]] = {"mlm": MaskedLM, "span": SpanCorruption}
    if name not in classes:
        raise ValueError(f"objective must be 'mlm' or 'span' to build a transform, got {name!r}")
    try:
        return classes[name](base_vocab_size, **options)
    except TypeError as error:
        raise ValueError(f"objective_options: {error} ({name} takes {_OPTION_NAMES[name]})") from None
