"""``model.generate(...)`` and ``model.beam_search(...)``: thin entry points into :mod:`attnkit.generate`.

Generation is composed with the models, not mixed into them: the search (greedy, sampling,
beam search, cached or recomputed) lives in the generate layer, which builds on the models.
These methods only name the options and hand the call over, importing
:mod:`attnkit.generate.api` when first called, so importing a model never imports the
generate layer (``tests/test_layers.py`` lists this hand-over as the one allowed edge from
models to generate). The same calls exist as functions: :func:`attnkit.generate.api.continue_prompts`
and :func:`attnkit.generate.api.transform_sources`.

The options are typed once, as :class:`BeamOptions` and :class:`GenerateOptions`, and shared
by both model kinds; an option that is not one of them raises ``TypeError``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypedDict, Unpack

import torch
from torch import Tensor

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence


class BeamOptions(TypedDict, total=False):
    """Options of ``beam_search`` (and of ``generate``).

    Attributes:
        num_beams: beam width (``generate``: default 1, > 1 switches to beam search;
            ``beam_search``: default 4, 1 is greedy decoding, scored).
        length_penalty: beam scores are ``sum log p / length ** length_penalty`` (default 1.0).
        num_return_sequences: hypotheses returned per input, best first (default 1).
        eos_token_id: stop a row there; default ``config.eos_token_id``.
        pad_token_id: fills rows after EOS and the left padding; default
            ``config.pad_token_id``, else the EOS id, else 0.
        use_cache: decode incrementally through each mechanism's state (default True;
            mechanisms without one recompute, with a one-time warning).
        repetition_penalty: multiply the log-probability of tokens already in the context by
            this (> 1 discourages repeats; default 1 = off); see :mod:`attnkit.generate.controls`.
        no_repeat_ngram_size: forbid repeating any n-gram of this size (default 0 = off).
        min_new_tokens: forbid EOS before this many new tokens (default 0).
        stop_strings: finish a row once the text of its new tokens contains one of these
            (needs ``decode``).
        decode: token ids -> text, for ``stop_strings`` (e.g. a tokenizer's ``decode``).
    """

    num_beams: int
    length_penalty: float
    num_return_sequences: int
    eos_token_id: int | None
    pad_token_id: int | None
    use_cache: bool
    repetition_penalty: float
    no_repeat_ngram_size: int
    min_new_tokens: int
    stop_strings: Sequence[str]
    decode: Callable[[Sequence[int]], str] | None


class GenerateOptions(BeamOptions, total=False):
    """Options of ``generate``: :class:`BeamOptions` plus the sampling ones.

    Attributes:
        temperature: sampling temperature (> 0 samples; 0 or None with no top_k/top_p = greedy).
        top_k: sample among the ``top_k`` most likely tokens.
        top_p: nucleus sampling threshold.
        generator: random generator for reproducible sampling.
        streamer: called with each step's new tokens ``(B,)`` (greedy/sampling only).
    """

    temperature: float | None
    top_k: int | None
    top_p: float | None
    generator: torch.Generator | None
    streamer: Callable[[Tensor], None] | None


class LanguageModelGeneration:
    """``generate`` and ``beam_search`` for decoder-only models (:class:`~attnkit.models.LanguageModel`)."""

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int = 32,
        *,
        attention_mask: Tensor | None = None,
        **options: Unpack[GenerateOptions],
    ) -> Tensor:
        """Continue the prompts ``input_ids (B, T)``.

        Greedy by default; sampling when ``temperature`` (> 0), ``top_k`` or ``top_p`` is given;
        beam search when ``num_beams > 1``.

        Args:
            input_ids: long ``(B, T)`` prompts.
            max_new_tokens: most tokens to add.
            attention_mask: bool ``(B, T)``, True = real token; padding on either side.
            **options: :class:`GenerateOptions` (``temperature``, ``top_k``, ``top_p``,
                ``num_beams``, ``length_penalty``, ``num_return_sequences``, ``eos_token_id``,
                ``pad_token_id``, ``use_cache``, ``generator``, ``streamer``).

        Returns:
            long ``(B * num_return_sequences, T + n)``: the left-aligned prompts (right-padded
            prompts come back left-padded) followed by ``n <= max_new_tokens`` new tokens.
        """
        from attnkit.generate.api import continue_prompts  # the generate layer builds on the models

        sequences, _ = continue_prompts(self, input_ids, max_new_tokens, attention_mask=attention_mask, **options)
        return sequences

    @torch.no_grad()
    def beam_search(
        self,
        input_ids: Tensor,
        max_new_tokens: int = 32,
        *,
        attention_mask: Tensor | None = None,
        **options: Unpack[BeamOptions],
    ) -> tuple[Tensor, Tensor]:
        """Beam search (``num_beams`` default 4) that also returns each hypothesis' score.

        Args:
            input_ids, max_new_tokens, attention_mask: as in :meth:`generate`.
            **options: :class:`BeamOptions`.

        Returns:
            ``(sequences, scores)``: long ``(B * num_return_sequences, T + n)`` as in
            :meth:`generate` (each prompt's hypotheses best first) and float64
            ``(B * num_return_sequences,)`` scores ``sum(log p) / length ** length_penalty``
            over the generated tokens (EOS included).
        """
        from attnkit.generate.api import continue_prompts  # the generate layer builds on the models

        return _scored(continue_prompts, self, input_ids, max_new_tokens, attention_mask=attention_mask, **options)


class Seq2SeqGeneration:
    """``generate`` and ``beam_search`` for encoder-decoders (:class:`~attnkit.models.EncoderDecoder`)."""

    @torch.no_grad()
    def generate(
        self,
        src_ids: Tensor,
        max_new_tokens: int = 32,
        *,
        src_mask: Tensor | None = None,
        decoder_start_token_id: int | None = None,
        **options: Unpack[GenerateOptions],
    ) -> Tensor:
        """Generate targets for the sources ``src_ids (B, S)``.

        Args:
            src_ids: long ``(B, S)`` sources.
            max_new_tokens: most target tokens.
            src_mask: bool ``(B, S)``, True = real token.
            decoder_start_token_id: the decoder's first input; default ``config.bos_token_id``,
                else ``config.pad_token_id``.
            **options: :class:`GenerateOptions`, as in :meth:`LanguageModelGeneration.generate`.

        Returns:
            long ``(B * num_return_sequences, n)``: the generated targets without the start token.
        """
        from attnkit.generate.api import transform_sources  # the generate layer builds on the models

        targets, _ = transform_sources(
            self, src_ids, max_new_tokens, src_mask=src_mask, decoder_start_token_id=decoder_start_token_id, **options
        )
        return targets

    @torch.no_grad()
    def beam_search(
        self,
        src_ids: Tensor,
        max_new_tokens: int = 32,
        *,
        src_mask: Tensor | None = None,
        decoder_start_token_id: int | None = None,
        **options: Unpack[BeamOptions],
    ) -> tuple[Tensor, Tensor]:
        """Beam search (``num_beams`` default 4) that also returns each hypothesis' score.

        Args:
            src_ids, max_new_tokens, src_mask, decoder_start_token_id: as in :meth:`generate`.
            **options: :class:`BeamOptions`.

        Returns:
            ``(targets, scores)``: long ``(B * num_return_sequences, n)`` as in :meth:`generate`
            (each source's hypotheses best first) and float64 ``(B * num_return_sequences,)``
            scores ``sum(log p) / length ** length_penalty`` (EOS included).
        """
        from attnkit.generate.api import transform_sources  # the generate layer builds on the models

        return _scored(
            transform_sources,
            self,
            src_ids,
            max_new_tokens,
            src_mask=src_mask,
            decoder_start_token_id=decoder_start_token_id,
            **options,
        )


def _scored(search: Callable[..., tuple[Tensor, Tensor | None]], *args: Any, **options: Any) -> tuple[Tensor, Tensor]:
    """Run ``search`` as a beam search (width 4 unless given), which always returns scores."""
    sequences, scores = search(*args, **{"num_beams": 4, **options}, beam_only=True)
    assert scores is not None  # a beam search always scores
    return sequences, scores
