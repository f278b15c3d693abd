"""FlexAttention backend == blocked core, for every sparse mechanism."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import attnkit
from attnkit.attention.reference import reference_attention
from attnkit.kernels.flex import flex_pattern_attention
from attnkit.positions import ALiBi
from tests.helpers import random_padding, structured_qkv

SPARSE = [
    ("sliding_window", {"window": 5}),
    ("sliding_window", {"window": 4, "dilation": 2}),
    ("strided", {"stride": 4}),
    ("fixed", {"block_size": 6, "summary_size": 2}),
    ("longformer", {"window": 5, "num_global_tokens": 2}),
    ("bigbird", {"block_size": 4, "num_random_blocks": 1, "num_global_blocks": 1}),
]


@pytest.mark.parametrize(("name", "opts"), SPARSE)
@pytest.mark.parametrize("causal", [False, True])
def test_flex_eager_equals_blocked(name: str, opts: dict[str, Any], causal: bool) -> None:
    """FlexAttention's eager path (no compile: fast enough for every CI run) on each pattern."""
    q, k, v = structured_qkv(2, 2, 27, 27, 8, seed=1)
    kpm = random_padding(2, 27, seed=2, min_real=12)
    kpm[0] = False  # a batch row with nothing visible: zeros on both backends
    bias = ALiBi(2).score_bias()
    module = attnkit.build_attention(name, backend="blocked", **opts)
    blocked = module(q, k, v, causal=causal, attention_mask=kpm, score_bias=bias)
    pattern = module.pattern(27, 27, causal=causal)
    flex = flex_pattern_attention(q, k, v, pattern, attention_mask=kpm, score_bias=bias, compiled=False)
    ref = reference_attention(q, k, v, causal=causal, attention_mask=kpm, mask=pattern, score_bias=bias)
    torch.testing.assert_close(flex.double(), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(flex, blocked, atol=1e-5, rtol=0)
    assert torch.equal(flex[0], torch.zeros_like(flex[0]))


def test_auto_backend_is_blocked_on_cpu_and_flex_refuses_cpu_training() -> None:
    module = attnkit.build_attention("sliding_window", window=5)
    q, k, v = structured_qkv(1, 2, 16, 16, 8, requires_grad=True)
    assert module.resolved_backend(q) == "blocked"
    flex = attnkit.build_attention("sliding_window", window=5, backend="flex")
    with pytest.raises(ValueError, match="no backward on CPU"):
        flex(q, k, v)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "opts"), SPARSE)
def test_flex_compiled_equals_blocked(name: str, opts: dict[str, Any]) -> None:
    """The real backend (torch.compile) through the module option, inference mode."""
    q, k, v = structured_qkv(2, 2, 150, 150, 16, seed=3)
    kpm = random_padding(2, 150, seed=4, min_real=100)
    kpm[1] = False  # nothing visible in batch row 1: zeros
    blocked = attnkit.build_attention(name, backend="blocked", **opts)
    flex = attnkit.build_attention(name, backend="flex", **opts)
    with torch.no_grad():
        for causal in (False, True):
            torch.testing.assert_close(
                flex(q, k, v, causal=causal, attention_mask=kpm),
                blocked(q, k, v, causal=causal, attention_mask=kpm),
                atol=1e-5,
                rtol=0,
            )
        assert torch.equal(flex(q, k, v, attention_mask=kpm)[1], torch.zeros(2, 150, 16))
