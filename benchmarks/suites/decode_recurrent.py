"""Per-token decoding cost vs context length: the recurrent state of `linear` and `performer`.

A recurrent state holds `Σ φ(k) [v, 1]ᵀ` (O(F·D) per head), so one decoding step costs the same
after 1K or 64K tokens; a KV cache (`full`) grows with the context, shown for contrast. B=1, H=8,
D=64, fp32, one thread (a one-token step is a handful of tiny operations: a second thread only adds
synchronisation, and on a shared machine makes the timings swing by orders of magnitude). Each
(mechanism, context) measurement prefills the context in a fresh process (chunked, not timed; the
KV cache is filled directly), then times single-token `decode` calls; `state floats` is the size
of the decoding state after the timed steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from benchmarks.suite import Case, Column, Part, Suite

#: decode steps whose inputs are drawn before timing (warm-up + timed; the closure cycles over them)
INPUTS = 205


def decode_step(length: int, causal: bool, *, name: str, **options: Any) -> Callable[[], torch.Tensor]:
    """Prefill a decoding state with ``length`` tokens; the closure runs one single-token ``decode``."""
    import attnkit
    from attnkit.core.base import KVState

    g = torch.Generator().manual_seed(0)
    b, h, d = 1, 8, 64
    module = attnkit.build_attention(name, **options).eval()
    state = module.new_state()
    with torch.no_grad():
        if isinstance(state, KVState):  # a KV cache needs no attention to be filled
            state.append(torch.randn(b, h, length, d, generator=g), torch.randn(b, h, length, d, generator=g), None)
        else:
            for lo in range(0, length, 8192):  # prefill in pieces through the chunked core
                n = min(8192, length - lo)
                q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
                module.decode(q, k, v, state)
    inputs = [tuple(torch.randn(b, h, 1, d, generator=g) for _ in range(3)) for _ in range(INPUTS)]
    step = {"i": 0}

    def run() -> torch.Tensor:
        q, k, v = inputs[step["i"] % INPUTS]
        step["i"] += 1
        return module.decode(q, k, v, state)

    def info() -> dict[str, Any]:
        floats = state.kv.numel() if hasattr(state, "kv") else 2 * state.keys.numel()
        return {"state_floats": floats}

    run.info = info  # type: ignore[attr-defined]
    return run


TARGET = "benchmarks.suites.decode_recurrent:decode_step"

SUITE = Suite(
    name="decode_recurrent",
    title="per-token decoding cost vs context: recurrent state vs KV cache (issue 5)",
    description=__doc__ or "",
    parts=(
        Part(
            "main",
            (
                Case("linear", TARGET, {"name": "linear"}),
                Case("performer", TARGET, {"name": "performer", "nb_features": 256}),
                Case("full", TARGET, {"name": "full"}),
            ),
            lengths=(1024, 4096, 16384, 65536),
            causal=(True,),
            modes=("fwd",),
            repeats=200,
            warmup=5,
            threads=1,
            timeout=900.0,
            # µs-scale steps: one no_grad around all of them, not entered inside each timing
            grad_scope="measurement",
            columns=(Column("state floats", lambda r: r["info"]["state_floats"], "{:d}"),),
        ),
    ),
    plot=False,
)
