"""``model.generate(...)`` and ``model.beam_search(...)`` for the language model and the encoder-decoder.

Greedy by default; sampling when ``temperature`` (> 0), ``top_k`` or ``top_p`` is given;
beam search when ``num_beams > 1`` (``model.beam_search(...)`` also returns each
hypothesis' score). Batched prompts may be padded on either side (``attention_mask``):
prompts are left-aligned internally, and positions count real tokens only, so each row's
continuation equals the one it would get alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from attnkit.core.errors import check_positive_int
from attnkit.generate.sampling import argument_name, check_sampling
from attnkit.generate.search import Streamer, beam_search, sample_loop
from attnkit.generate.sessions import LanguageModelSession, Seq2SeqSession, left_align, resolve_use_cache


def _check_token(name: str, value: Any, vocab_size: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
        raise ValueError(f"{name} must be a token id in [0, {vocab_size}), got {value!r}")
    return value


def _search(
    session: Any,
    batch: int,
    *,
    beam: bool,
    max_new_tokens: int,
    eos: int | None,
    pad: int,
    temperature: float | None,
    top_k: int | None,
    top_p: float | None,
    num_beams: int,
    length_penalty: float,
    num_return_sequences: int,
    generator: torch.Generator | None,
    streamer: Streamer | None,
) -> tuple[Tensor, Tensor | None]:
    """``(new tokens, beam scores)``; the scores are None unless ``beam``."""
    if not beam:
        tokens = sample_loop(
            session,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=pad,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=generator,
            streamer=streamer,
        )
        return tokens, None
    return beam_search(
        session,
        batch=batch,
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=pad,
        length_penalty=length_penalty,
        num_return_sequences=num_return_sequences,
    )


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


def _eos_and_pad(cfg: Any, eos_token_id: int | None, pad_token_id: int | None) -> tuple[int | None, int]:
    """The EOS id (argument, else the config's) and the pad id (argument, else config pad, else EOS, else 0)."""
    eos = _check_token("eos_token_id", eos_token_id if eos_token_id is not None else cfg.eos_token_id, cfg.vocab_size)
    pad = _check_token("pad_token_id", pad_token_id, cfg.vocab_size)
    if pad is None:
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else (eos or 0)
    return eos, pad


def _search_in_eval_mode(model: Any, make_session: Any, batch: int, **search: Any) -> tuple[Tensor, Tensor | None]:
    """Build the decoding session and run the search with ``model`` in eval mode, restoring its mode after."""
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        return _search(make_session(), batch, **search)
    finally:
        model.train(was_training)


class LanguageModelGeneration:
    """``generate`` and ``beam_search`` for decoder-only models (mixed into :class:`~attnkit.models.LanguageModel`)."""

    config: Any

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int = 32,
        *,
        attention_mask: Tensor | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        num_return_sequences: int = 1,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        streamer: Streamer | None = None,
    ) -> Tensor:
        """Continue the prompts ``input_ids (B, T)``.

        Args:
            input_ids: long ``(B, T)`` prompts.
            max_new_tokens: most tokens to add.
            attention_mask: bool ``(B, T)``, True = real token; padding on either side.
            temperature: sampling temperature (> 0 samples; 0 or None with no top_k/top_p = greedy).
            top_k: sample among the ``top_k`` most likely tokens.
            top_p: nucleus sampling threshold.
            num_beams: beam search width (> 1 switches to beam search; :meth:`beam_search`
                also returns the scores).
            length_penalty: beam scores are ``sum log p / length ** length_penalty``.
            num_return_sequences: beams returned per prompt (best first).
            eos_token_id: stop a row there; default ``config.eos_token_id``.
            pad_token_id: fills rows after EOS and the left padding; default
                ``config.pad_token_id``, else the EOS id, else 0.
            use_cache: decode incrementally through each mechanism's state (mechanisms
                without one recompute, with a one-time warning).
            generator: random generator for reproducible sampling.
            streamer: called with each step's new tokens ``(B,)`` (greedy/sampling only).

        Returns:
            long ``(B * num_return_sequences, T + n)``: the left-aligned prompts (right-padded
            prompts come back left-padded) followed by ``n <= max_new_tokens`` new tokens.
        """
        check_search(
            max_new_tokens, temperature, top_k, top_p, num_beams, length_penalty, num_return_sequences, streamer
        )
        sequences, _ = self._continue(
            input_ids,
            attention_mask,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            use_cache=use_cache,
            beam=num_beams > 1,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            num_beams=num_beams,
            length_penalty=float(length_penalty),
            num_return_sequences=num_return_sequences,
            generator=generator,
            streamer=streamer,
        )
        return sequences

    @torch.no_grad()
    def beam_search(
        self,
        input_ids: Tensor,
        max_new_tokens: int = 32,
        *,
        num_beams: int = 4,
        attention_mask: Tensor | None = None,
        length_penalty: float = 1.0,
        num_return_sequences: int = 1,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        use_cache: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """Beam search that also returns each hypothesis' score.

        Args:
            input_ids, max_new_tokens, attention_mask, length_penalty, num_return_sequences,
            eos_token_id, pad_token_id, use_cache: as in :meth:`generate`.
            num_beams: beam width (1 is greedy decoding, scored).

        Returns:
            ``(sequences, scores)``: long ``(B * num_return_sequences, T + n)`` as in
            :meth:`generate` (each prompt's hypotheses best first) and float64
            ``(B * num_return_sequences,)`` scores ``sum(log p) / length ** length_penalty``
            over the generated tokens (EOS included).
        """
        check_search(max_new_tokens, None, None, None, num_beams, length_penalty, num_return_sequences, None)
        sequences, scores = self._continue(
            input_ids,
            attention_mask,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            use_cache=use_cache,
            beam=True,
            max_new_tokens=max_new_tokens,
            temperature=None,
            top_k=None,
            top_p=None,
            num_beams=num_beams,
            length_penalty=float(length_penalty),
            num_return_sequences=num_return_sequences,
            generator=None,
            streamer=None,
        )
        assert scores is not None  # beam=True always scores
        return sequences, scores

    def _continue(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        *,
        eos_token_id: int | None,
        pad_token_id: int | None,
        use_cache: bool,
        **search: Any,
    ) -> tuple[Tensor, Tensor | None]:
        """Validated prompts -> ``(prompts followed by the new tokens, beam scores or None)``."""
        from attnkit.models.transformer import check_ids, check_mask

        cfg = self.config
        ids = check_ids("input_ids", input_ids, cfg.vocab_size)
        mask = check_mask("attention_mask", attention_mask, ids)
        eos, pad = _eos_and_pad(cfg, eos_token_id, pad_token_id)
        ids, mask = left_align(ids, mask)
        if mask is not None:
            ids = ids.masked_fill(~mask, pad)
        prompt = ids
        cached = resolve_use_cache(self, use_cache)
        if search["beam"]:
            ids = ids.repeat_interleave(search["num_beams"], dim=0)
            mask = mask.repeat_interleave(search["num_beams"], dim=0) if mask is not None else None
        new, scores = _search_in_eval_mode(
            self,
            lambda: LanguageModelSession(self, ids, mask, use_cache=cached),
            prompt.shape[0],
            eos=eos,
            pad=pad,
            **search,
        )
        prompt = prompt.repeat_interleave(new.shape[0] // prompt.shape[0], dim=0)
        return torch.cat([prompt, new], dim=1), scores


class Seq2SeqGeneration:
    """``generate`` and ``beam_search`` for encoder-decoders (mixed into :class:`~attnkit.models.EncoderDecoder`)."""

    config: Any

    @torch.no_grad()
    def generate(
        self,
        src_ids: Tensor,
        max_new_tokens: int = 32,
        *,
        src_mask: Tensor | None = None,
        decoder_start_token_id: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        num_return_sequences: int = 1,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        streamer: Streamer | None = None,
    ) -> Tensor:
        """Generate targets for the sources ``src_ids (B, S)``.

        Args:
            src_ids: long ``(B, S)`` sources.
            max_new_tokens: most target tokens.
            src_mask: bool ``(B, S)``, True = real token.
            decoder_start_token_id: the decoder's first input; default ``config.bos_token_id``,
                else ``config.pad_token_id``.
            temperature, top_k, top_p, num_beams, length_penalty, num_return_sequences,
            eos_token_id, pad_token_id, use_cache, generator, streamer: as in
                :meth:`LanguageModelGeneration.generate`.

        Returns:
            long ``(B * num_return_sequences, n)``: the generated targets without the start token.
        """
        check_search(
            max_new_tokens, temperature, top_k, top_p, num_beams, length_penalty, num_return_sequences, streamer
        )
        targets, _ = self._transform(
            src_ids,
            src_mask,
            decoder_start_token_id=decoder_start_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            use_cache=use_cache,
            beam=num_beams > 1,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            num_beams=num_beams,
            length_penalty=float(length_penalty),
            num_return_sequences=num_return_sequences,
            generator=generator,
            streamer=streamer,
        )
        return targets

    @torch.no_grad()
    def beam_search(
        self,
        src_ids: Tensor,
        max_new_tokens: int = 32,
        *,
        num_beams: int = 4,
        src_mask: Tensor | None = None,
        decoder_start_token_id: int | None = None,
        length_penalty: float = 1.0,
        num_return_sequences: int = 1,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        use_cache: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """Beam search that also returns each hypothesis' score.

        Args:
            src_ids, max_new_tokens, src_mask, decoder_start_token_id, length_penalty,
            num_return_sequences, eos_token_id, pad_token_id, use_cache: as in :meth:`generate`.
            num_beams: beam width (1 is greedy decoding, scored).

        Returns:
            ``(targets, scores)``: long ``(B * num_return_sequences, n)`` as in :meth:`generate`
            (each source's hypotheses best first) and float64 ``(B * num_return_sequences,)``
            scores ``sum(log p) / length ** length_penalty`` (EOS included).
        """
        check_search(max_new_tokens, None, None, None, num_beams, length_penalty, num_return_sequences, None)
        targets, scores = self._transform(
            src_ids,
            src_mask,
            decoder_start_token_id=decoder_start_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            use_cache=use_cache,
            beam=True,
            max_new_tokens=max_new_tokens,
            temperature=None,
            top_k=None,
            top_p=None,
            num_beams=num_beams,
            length_penalty=float(length_penalty),
            num_return_sequences=num_return_sequences,
            generator=None,
            streamer=None,
        )
        assert scores is not None  # beam=True always scores
        return targets, scores

    def _transform(
        self,
        src_ids: Tensor,
        src_mask: Tensor | None,
        *,
        decoder_start_token_id: int | None,
        eos_token_id: int | None,
        pad_token_id: int | None,
        use_cache: bool,
        **search: Any,
    ) -> tuple[Tensor, Tensor | None]:
        """Validated sources -> ``(generated targets, beam scores or None)``."""
        from attnkit.models.transformer import check_ids, check_mask

        cfg = self.config
        src = check_ids("src_ids", src_ids, cfg.vocab_size)
        mask = check_mask("src_mask", src_mask, src)
        start = decoder_start_token_id
        if start is None:
            start = cfg.bos_token_id if cfg.bos_token_id is not None else cfg.pad_token_id
        if start is None:
            raise ValueError("decoder_start_token_id is needed (or set bos_token_id or pad_token_id in the config)")
        start = _check_token("decoder_start_token_id", start, cfg.vocab_size)
        assert start is not None
        eos, pad = _eos_and_pad(cfg, eos_token_id, pad_token_id)
        cached = resolve_use_cache(self, use_cache)
        batch = src.shape[0]
        if search["beam"]:
            src = src.repeat_interleave(search["num_beams"], dim=0)
            mask = mask.repeat_interleave(search["num_beams"], dim=0) if mask is not None else None
        return _search_in_eval_mode(
            self, lambda: Seq2SeqSession(self, src, mask, start, use_cache=cached), batch, eos=eos, pad=pad, **search
        )
