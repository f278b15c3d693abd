"""Generation over the models: greedy, sampling, beam search; what ``model.generate(...)`` runs.

Greedy by default; sampling when ``temperature`` (> 0), ``top_k`` or ``top_p`` is given;
beam search when ``num_beams > 1`` (``model.beam_search(...)`` also returns each
hypothesis' score). Batched prompts may be padded on either side (``attention_mask``):
prompts are left-aligned internally, and positions count real tokens only, so each row's
continuation equals the one it would get alone.

The models' ``generate``/``beam_search`` methods (:mod:`attnkit.models.generation`) hand
over to :func:`continue_prompts` (decoder-only) and :func:`transform_sources`
(encoder-decoder); both take the model as their first argument and the options typed in
:class:`~attnkit.models.generation.GenerateOptions`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Unpack

import torch
from torch import Tensor

from attnkit.core.errors import check_positive_int
from attnkit.core.validation import check_ids, check_mask
from attnkit.generate.controls import Controls, Decode, check_controls
from attnkit.generate.sampling import argument_name, check_sampling
from attnkit.generate.search import Streamer, beam_search, sample_loop
from attnkit.generate.sessions import LanguageModelSession, Seq2SeqSession, left_align, resolve_use_cache
from attnkit.models.generation import BeamOptions, GenerateOptions


def _check_token(name: str, value: Any, vocab_size: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
        raise ValueError(f"{name} must be a token id in [0, {vocab_size}), got {value!r}")
    return value


def check_search(
    max_new_tokens: Any,
    temperature: Any,
    top_k: Any,
    top_p: Any,
    num_beams: Any,
    length_penalty: Any,
    num_return_sequences: Any,
    streamer: Any = None,
    *,
    names: Mapping[str, str] | None = None,
) -> None:
    """Validate the search settings of ``generate`` together; each error names the argument.

    Args:
        max_new_tokens, temperature, top_k, top_p, num_beams, length_penalty,
        num_return_sequences, streamer: as in :meth:`LanguageModelGeneration.generate`.
        names: how to call each argument in the errors (``{"num_beams": "--num-beams"}``
            for a command line); default: the Python names.

    Raises:
        ValueError: a bad value, or settings that contradict each other (beam search with
            sampling or a streamer, ``temperature=0`` (greedy) with ``top_k``/``top_p``,
            more return sequences than beams).
    """

    def name(argument: str) -> str:
        return argument_name(names, argument)

    check_positive_int(name("max_new_tokens"), max_new_tokens, example=32)
    check_sampling(temperature, top_k, top_p, names=names)
    check_positive_int(name("num_beams"), num_beams, example=4)
    check_positive_int(name("num_return_sequences"), num_return_sequences)
    if num_return_sequences > num_beams:
        raise ValueError(
            f"{name('num_return_sequences')} must be at most {name('num_beams')}={num_beams}, "
            f"got {num_return_sequences} (raise {name('num_beams')})"
        )
    filters = f"{name('top_k')}/{name('top_p')}"
    if temperature == 0 and (top_k is not None or top_p is not None):
        raise ValueError(
            f"{name('temperature')}=0 means greedy decoding, which would ignore {filters}: "
            f"drop them, or set {name('temperature')} > 0 to sample"
        )
    sampling = (temperature is not None and temperature > 0) or top_k is not None or top_p is not None
    if num_beams > 1 and sampling:
        raise ValueError(
            f"beam search ({name('num_beams')} > 1) is deterministic: drop {name('temperature')}/{filters}, "
            f"or set {name('num_beams')}=1"
        )
    if num_beams > 1 and streamer is not None:
        raise ValueError(
            f"{name('streamer')} works with greedy or sampled decoding, not with beam search ({name('num_beams')} > 1)"
        )
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)):
        raise ValueError(f"{name('length_penalty')} must be a number, got {length_penalty!r}")


@dataclass(frozen=True)
class _Search:
    """Validated search settings of one call (see :class:`~attnkit.models.generation.GenerateOptions`)."""

    max_new_tokens: int
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    num_return_sequences: int = 1
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    use_cache: bool = True
    generator: torch.Generator | None = None
    streamer: Streamer | None = None
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    min_new_tokens: int = 0
    stop_strings: Sequence[str] = ()
    decode: Decode | None = None
    #: a ``beam_search`` call: scored even at width 1 (greedy decoding, scored)
    scored: bool = False

    @classmethod
    def checked(cls, max_new_tokens: Any, options: Mapping[str, Any], *, beam_only: bool) -> _Search:
        """Validate ``options`` (:class:`GenerateOptions`, or only :class:`BeamOptions` when ``beam_only``)."""
        accepted = BeamOptions.__annotations__ if beam_only else GenerateOptions.__annotations__
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            what = "beam_search" if beam_only else "generate"
            raise TypeError(
                f"{what}() got unknown option(s) {', '.join(unknown)}; accepted: {', '.join(sorted(accepted))}"
            )
        search = cls(max_new_tokens, **options, scored=beam_only)
        check_search(
            search.max_new_tokens,
            search.temperature,
            search.top_k,
            search.top_p,
            search.num_beams,
            search.length_penalty,
            search.num_return_sequences,
            search.streamer,
        )
        check_controls(
            search.repetition_penalty,
            search.no_repeat_ngram_size,
            search.min_new_tokens,
            search.stop_strings,
            search.decode,
            search.max_new_tokens,
        )
        return search

    def controls(self, eos: int | None) -> Controls:
        """The generation controls of this call.

        Raises:
            ValueError: ``min_new_tokens`` without an end-of-sequence token (it would change nothing).
        """
        if self.min_new_tokens and eos is None:
            raise ValueError(
                f"min_new_tokens={self.min_new_tokens} holds back the end-of-sequence token, and this model has none: "
                "pass eos_token_id=..., or drop min_new_tokens"
            )
        return Controls(
            repetition_penalty=float(self.repetition_penalty),
            no_repeat_ngram_size=self.no_repeat_ngram_size,
            min_new_tokens=self.min_new_tokens,
            stop_strings=tuple(self.stop_strings),
            decode=self.decode,
            eos_token_id=eos,
        )

    @property
    def beam(self) -> bool:
        """Whether this is a beam search (scored, one batch row per beam)."""
        return self.num_beams > 1 or self.scored

    def eos_and_pad(self, cfg: Any) -> tuple[int | None, int]:
        """The EOS id (the call's, else the config's) and the pad id (call, else config pad, else EOS, else 0)."""
        eos = self.eos_token_id if self.eos_token_id is not None else cfg.eos_token_id
        eos = _check_token("eos_token_id", eos, cfg.vocab_size)
        pad = _check_token("pad_token_id", self.pad_token_id, cfg.vocab_size)
        if pad is None:
            pad = cfg.pad_token_id if cfg.pad_token_id is not None else (eos or 0)
        return eos, pad

    def run(
        self,
        model: Any,
        make_session: Callable[[], Any],
        batch: int,
        cfg: Any,
        contexts: list[list[int]] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """``(new tokens, beam scores or None)``, with ``model`` in eval mode (its mode restored after).

        ``contexts`` are the ``batch`` rows' prompt tokens (for the repetition controls).
        """
        eos, pad = self.eos_and_pad(cfg)
        controls = self.controls(eos)
        was_training = getattr(model, "training", False)
        model.eval()
        try:
            session = make_session()
            if not self.beam:
                tokens = sample_loop(
                    session,
                    max_new_tokens=self.max_new_tokens,
                    eos_token_id=eos,
                    pad_token_id=pad,
                    temperature=self.temperature,
                    top_k=self.top_k,
                    top_p=self.top_p,
                    generator=self.generator,
                    streamer=self.streamer,
                    controls=controls,
                    contexts=contexts,
                )
                return tokens, None
            return beam_search(
                session,
                batch=batch,
                num_beams=self.num_beams,
                max_new_tokens=self.max_new_tokens,
                eos_token_id=eos,
                pad_token_id=pad,
                length_penalty=float(self.length_penalty),
                num_return_sequences=self.num_return_sequences,
                controls=controls,
                contexts=contexts,
            )
        finally:
            model.train(was_training)


def _widen(search: _Search, ids: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Repeat each row once per beam (a beam search decodes every beam as a batch row)."""
    if not search.beam:
        return ids, mask
    ids = ids.repeat_interleave(search.num_beams, dim=0)
    return ids, (mask.repeat_interleave(search.num_beams, dim=0) if mask is not None else None)


def _prepare(max_new_tokens: Any, options: Mapping[str, Any], beam_only: bool, model: Any) -> tuple[_Search, bool]:
    """Validated settings and whether to decode through the mechanisms' states."""
    search = _Search.checked(max_new_tokens, options, beam_only=beam_only)
    return search, resolve_use_cache(model, search.use_cache)


@torch.no_grad()
def continue_prompts(
    model: Any,
    input_ids: Tensor,
    max_new_tokens: int = 32,
    *,
    attention_mask: Tensor | None = None,
    beam_only: bool = False,
    **options: Unpack[GenerateOptions],
) -> tuple[Tensor, Tensor | None]:
    """Continue the prompts ``input_ids (B, T)`` of a decoder-only model (``model.generate``'s work).

    Args:
        model: a :class:`~attnkit.models.LanguageModel` (or a model with its ``config``, ``forward``
            with ``cache=`` and ``new_cache``).
        input_ids: long ``(B, T)`` prompts.
        max_new_tokens: most tokens to add.
        attention_mask: bool ``(B, T)``, True = real token; padding on either side.
        beam_only: a ``beam_search`` call: only :class:`BeamOptions` are accepted and the
            result is always scored.
        **options: :class:`GenerateOptions`.

    Returns:
        ``(sequences, scores)``: long ``(B * num_return_sequences, T + n)``, the left-aligned
        prompts followed by ``n <= max_new_tokens`` new tokens, and the float64 beam scores
        ``(B * num_return_sequences,)`` (None for greedy or sampled decoding).
    """
    search, cached = _prepare(max_new_tokens, options, beam_only, model)
    cfg = model.config
    ids = check_ids("input_ids", input_ids, cfg.vocab_size)
    mask = check_mask("attention_mask", attention_mask, ids)
    _, pad = search.eos_and_pad(cfg)
    ids, mask = left_align(ids, mask)
    if mask is not None:
        ids = ids.masked_fill(~mask, pad)
    prompt = ids
    contexts = [row[keep].tolist() for row, keep in zip(ids, mask)] if mask is not None else ids.tolist()
    ids, mask = _widen(search, ids, mask)
    new, scores = search.run(
        model, lambda: LanguageModelSession(model, ids, mask, use_cache=cached), len(prompt), cfg, contexts
    )
    prompt = prompt.repeat_interleave(new.shape[0] // prompt.shape[0], dim=0)
    return torch.cat([prompt, new], dim=1), scores


@torch.no_grad()
def transform_sources(
    model: Any,
    src_ids: Tensor,
    max_new_tokens: int = 32,
    *,
    src_mask: Tensor | None = None,
    decoder_start_token_id: int | None = None,
    beam_only: bool = False,
    **options: Unpack[GenerateOptions],
) -> tuple[Tensor, Tensor | None]:
    """Generate targets for the sources ``src_ids (B, S)`` of an encoder-decoder (``model.generate``'s work).

    Args:
        model: an :class:`~attnkit.models.EncoderDecoder`.
        src_ids: long ``(B, S)`` sources.
        max_new_tokens: most target tokens.
        src_mask: bool ``(B, S)``, True = real token.
        decoder_start_token_id: the decoder's first input; default ``config.bos_token_id``,
            else ``config.pad_token_id``.
        beam_only: as in :func:`continue_prompts`.
        **options: :class:`GenerateOptions`.

    Returns:
        ``(targets, scores)``: long ``(B * num_return_sequences, n)`` without the start token,
        and the beam scores as in :func:`continue_prompts`.
    """
    search, cached = _prepare(max_new_tokens, options, beam_only, model)
    cfg = model.config
    src = check_ids("src_ids", src_ids, cfg.vocab_size)
    mask = check_mask("src_mask", src_mask, src)
    start = decoder_start_token_id
    if start is None:
        start = cfg.bos_token_id if cfg.bos_token_id is not None else cfg.pad_token_id
    if start is None:
        raise ValueError("decoder_start_token_id is needed (or set bos_token_id or pad_token_id in the config)")
    first = _check_token("decoder_start_token_id", start, cfg.vocab_size)
    assert first is not None
    batch = src.shape[0]
    src, mask = _widen(search, src, mask)
    return search.run(model, lambda: Seq2SeqSession(model, src, mask, first, use_cache=cached), batch, cfg)
