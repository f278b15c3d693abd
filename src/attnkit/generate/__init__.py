"""Text generation: greedy, sampling (temperature, top-k, top-p), beam search; cached or recomputed.

This layer builds on the models, never the reverse: ``model.generate(...)`` and
``model.beam_search(...)`` are thin hand-overs (:mod:`attnkit.models.generation`) to
:func:`attnkit.generate.api.continue_prompts` (decoder-only) and
:func:`attnkit.generate.api.transform_sources` (encoder-decoder), which take the model as their
first argument. The pieces are usable on their own: :func:`next_tokens`/:func:`filter_logits`
(token choice), :func:`sample_loop` and :func:`beam_search` (search over any decoding session).
"""

from attnkit.generate.sampling import filter_logits, next_tokens
from attnkit.generate.search import Hypothesis, beam_search, sample_loop

__all__ = ["Hypothesis", "beam_search", "filter_logits", "next_tokens", "sample_loop"]
