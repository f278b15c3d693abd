"""`full` beyond the contract: random shapes and masks (hypothesis), both backends, options."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnkit
from attnkit.attention.reference import reference_attention
from attnkit.masks import Mask
from attnkit.positions import ALiBi, T5RelativeBias


@st.composite
def problems(draw: st.DrawFn) -> dict:
    b, h = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    t, s, d = draw(st.integers(1, 12)), draw(st.integers(1, 12)), draw(st.sampled_from([1, 4, 8]))
    seed = draw(st.integers(0, 10_000))
    g = torch.Generator().manual_seed(seed)
    pad = torch.rand(b, s, generator=g) < draw(st.floats(0.0, 1.0))  # may pad everything
    dense = torch.rand(b, h, t, s, generator=g) < 0.7
    return {
        "qkv": [torch.randn(b, h, n, d, generator=g) for n in (t, s, s)],
        "causal": draw(st.booleans()),
        "pad": pad if draw(st.booleans()) else None,
        "mask": dense if draw(st.booleans()) else None,
        "bias": draw(st.sampled_from([None, "alibi", "t5"])),
        "backend": draw(st.sampled_from(["sdpa", "eager"])),
    }


@given(problems())
@settings(max_examples=60, deadline=None)
def test_full_matches_reference_on_random_problems(p: dict) -> None:
    q, k, v = p["qkv"]
    h = q.shape[1]
    mask = Mask(lambda b, hh, i, j, m=p["mask"]: m[b, hh, i, j], "random") if p["mask"] is not None else None
    bias = None
    if p["bias"] == "alibi":
        bias = ALiBi(h).score_bias()
    elif p["bias"] == "t5":
        bias = T5RelativeBias(h, num_buckets=8, max_distance=8).score_bias()
    module = attnkit.build_attention("full", backend=p["backend"])
    with torch.no_grad():
        out = module(q, k, v, causal=p["causal"], attention_mask=p["pad"], mask=mask, score_bias=bias)
        ref = reference_attention(q, k, v, causal=p["causal"], attention_mask=p["pad"], mask=p["mask"], score_bias=bias)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_queries_before_the_first_key_get_zeros() -> None:
    # causal with T > S: query i sits at position i - (T - S); the first T - S see nothing.
    q, k, v = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    out = attnkit.build_attention("full")(q, k, v, causal=True)
    assert torch.equal(out[:, :, :3], torch.zeros_like(out[:, :, :3]))
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, causal=True), atol=1e-6, rtol=0)


def test_dropout_only_in_training() -> None:
    q = torch.randn(1, 2, 16, 8)
    module = attnkit.build_attention("full", dropout=0.5)
    module.eval()
    torch.testing.assert_close(module(q, q, q).double(), reference_attention(q, q, q), atol=1e-5, rtol=0)
    module.train()
    torch.manual_seed(0)
    assert not torch.allclose(module(q, q, q), module.eval()(q, q, q))


def test_scale_option() -> None:
    q, k, v = torch.randn(3, 1, 2, 5, 4).unbind(0)
    out = attnkit.build_attention("full", scale=0.1)(q, k, v)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, scale=0.1), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="scale must be a positive number"):
        attnkit.build_attention("full", scale=-1.0)
