"""Per-token decoding inside a Hugging Face Llama: the recurrent state of ``linear`` and ``performer`` at 1K vs 8K.

Issue 19: with :func:`attnkit.hf.apply`, a generated token of a recurrent mechanism costs O(1) in
the context, so the per-token time at 8K is within 1.3x of that at 1K. The model is the recipe's
Llama shape (:mod:`benchmarks.suites.hf_convert`, random weights, nothing downloaded). Each
measurement prefills the context through the model (in 1K-token chunks, not timed) into the
cache ``generate`` builds after ``apply`` (:func:`attnkit.hf.new_cache`), then times single-token
forward steps with the cache, as ``generate`` runs them. The ``transformers kv`` row keeps
Transformers' ``DynamicCache`` instead (every key and value, recomputed over at each step: the
bridge's behaviour without a state), for contrast. B=1, fp32, one thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from benchmarks.suite import Case, Column, Part, Suite
from benchmarks.suites.hf_convert import VOCAB, llama

#: Prompt tokens per prefill forward.
PREFILL_CHUNK = 1024


def decode_step(length: int, causal: bool, *, attention: str, cache: str, **options: Any) -> Callable[[], torch.Tensor]:
    """Prefill ``length`` tokens; the closure runs one single-token step through the model with the cache."""
    from transformers import DynamicCache

    import attnkit.hf

    model = llama(attention, length + 4096, **options)
    state = attnkit.hf.new_cache(model) if cache == "attnkit state" else DynamicCache(config=model.config)
    prompt = torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        for start in range(0, length, PREFILL_CHUNK):
            out = model(input_ids=prompt[:, start : start + PREFILL_CHUNK], cache=state, use_cache=True)
    token = {"next": out.logits[:, -1:].argmax(-1)}

    def run() -> torch.Tensor:
        step = model(input_ids=token["next"], cache=state, use_cache=True)
        token["next"] = step.logits[:, -1:].argmax(-1)
        return step.logits

    def info() -> dict[str, Any]:
        from attnkit.hf import MechanismStateLayer

        tensors = [
            t
            for layer in state.layers
            for t in (layer.state_tensors() if isinstance(layer, MechanismStateLayer) else [layer.keys, layer.values])
            if t is not None
        ]
        return {"cache_bytes": sum(t.numel() * t.element_size() for t in tensors)}

    run.info = info  # type: ignore[attr-defined]
    return run


TARGET = "benchmarks.suites.hf_decode:decode_step"

SUITE = Suite(
    name="hf_decode",
    title="per-token decoding of recurrent mechanisms inside a HF Llama, 1K vs 8K context (issue 19)",
    description=__doc__ or "",
    parts=(
        Part(
            "main",
            (
                Case("linear", TARGET, {"attention": "linear", "cache": "attnkit state"}),
                Case("performer", TARGET, {"attention": "performer", "cache": "attnkit state"}),
                Case("linear (transformers kv)", TARGET, {"attention": "linear", "cache": "transformers kv"}),
            ),
            lengths=(1024, 8192),
            causal=(True,),
            modes=("fwd",),
            repeats=32,
            warmup=4,
            threads=1,
            timeout=900.0,
            grad_scope="measurement",
            columns=(Column("cache MiB", lambda r: r["info"]["cache_bytes"] / 2**20, "{:.2f}"),),
        ),
    ),
    plot=False,
)
