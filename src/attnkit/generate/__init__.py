"""Text generation: greedy, sampling (temperature, top-k, top-p), beam search; cached or recomputed.

Models expose it as ``model.generate(...)``; the pieces are usable on their own:
:func:`next_tokens`/:func:`filter_logits` (token choice), :func:`sample_loop` and
:func:`beam_search` (search over any decoding session).
"""

from attnkit.generate.sampling import filter_logits, next_tokens
from attnkit.generate.search import Hypothesis, beam_search, sample_loop

__all__ = ["Hypothesis", "beam_search", "filter_logits", "next_tokens", "sample_loop"]
