"""Decoding speed vs context length: full KV cache, rolling window cache, recurrent state.

A language model (dim 256, 4 heads, depth 2, rotary, batch 1) is prefilled with a context of `L`
tokens through its cache (setup, not timed); a timed step then decodes 32 tokens one at a time,
reported as tokens per second. A full KV cache attends over all `L` keys at every step, so its
speed falls as `L` grows; a window cache (sliding window) and a recurrent state (linear attention,
Performer) do a fixed amount of work per token, so their rows should stay flat. Mechanisms come
from the registry: `full` plus every causal mechanism whose declared decoding is `window_cache` or
`recurrent`, each with its `benchmark_options`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from benchmarks.suite import Case, Column, Part, Suite

STEPS = 32


def decoding_mechanisms() -> list[str]:
    """``full`` plus every registered causal mechanism with a window cache or a recurrent state."""
    import attnkit

    names = ["full"]
    for name in attnkit.list_attention():
        caps = attnkit.attention_capabilities(name)
        if caps.decoding in ("window_cache", "recurrent") and caps.causal:
            names.append(name)
    return names


def decode_steps(
    length: int, causal: bool, *, name: str, steps: int, dim: int, depth: int, prefill_chunk: int
) -> Callable[[], torch.Tensor]:
    """Prefill ``length`` tokens, return a closure decoding ``steps`` tokens one at a time."""
    import attnkit

    spec = attnkit.get_spec(name)
    cfg = attnkit.TransformerConfig(
        vocab_size=256,
        dim=dim,
        depth=depth,
        heads=dim // 64,
        attention=name,
        attention_options=spec.benchmark_options,
        position="rotary",
        max_len=length + 4096,
    )
    model = attnkit.LanguageModel(cfg).eval()
    cache = model.new_cache()
    context = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for start in range(0, length, prefill_chunk):
            logits = model(context[:, start : start + prefill_chunk], cache=cache)
    state = {"token": logits[:, -1:].argmax(-1)}

    def run() -> torch.Tensor:
        token = state["token"]
        for _ in range(steps):
            logits = model(token, cache=cache)
            token = logits[:, -1:].argmax(-1)
        state["token"] = token
        return logits

    return run


def cases() -> list[Case]:
    """One case per decoding mechanism, labelled with its decoding state."""
    import attnkit

    return [
        Case(
            f"{name} ({attnkit.attention_capabilities(name).decoding})",
            "benchmarks.suites.decode_speed:decode_steps",
            {"name": name, "steps": STEPS, "dim": 256, "depth": 2, "prefill_chunk": 1024},
        )
        for name in decoding_mechanisms()
    ]


TOKENS_PER_S = Column("tokens/s", lambda r: r["params"]["steps"] / r["median_s"], "{:.0f}")

SUITE = Suite(
    name="decode_speed",
    title="decoding speed vs context length (KV cache, window cache, recurrent state)",
    description=__doc__ or "",
    parts=(
        Part(
            "main",
            cases,
            lengths=(1024, 2048, 4096, 8192, 16384, 32768),
            causal=(True,),
            modes=("fwd",),
            repeats=3,
            warmup=1,
            timeout=900.0,
            columns=(TOKENS_PER_S,),
        ),
    ),
    plot_value=TOKENS_PER_S,
)
