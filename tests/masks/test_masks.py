"""Mask functions against brute-force loops over every (b, h, i, j)."""

from __future__ import annotations

import itertools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit.masks import Mask, causal_mask, full_mask, materialize, real_keys_mask


def brute(pred, b: int, h: int, t: int, s: int) -> torch.Tensor:
    out = torch.zeros(b, h, t, s, dtype=torch.bool)
    for bi, hi, i, j in itertools.product(range(b), range(h), range(t), range(s)):
        out[bi, hi, i, j] = bool(pred(bi, hi, i, j))
    return out


@given(t=st.integers(1, 9), s=st.integers(1, 9))
@settings(max_examples=30, deadline=None)
def test_causal_is_end_aligned(t: int, s: int) -> None:
    got = materialize(causal_mask(t, s), 1, 1, t, s)
    # query i sits at absolute position i + s - t and sees keys at positions <= that
    assert torch.equal(got, brute(lambda b, h, i, j: j <= i + s - t, 1, 1, t, s))


def test_key_padding_and_algebra() -> None:
    pad = torch.tensor([[True, True, False, True, False], [False, True, True, True, True]])
    kp = real_keys_mask(pad)
    cm = causal_mask(4, 5)
    diag = Mask(lambda b, h, q, k: (q + 1) == k, "diag")
    both = materialize(kp & cm, 2, 3, 4, 5)
    either = materialize(kp | diag, 2, 3, 4, 5)
    neither = materialize(~(kp | diag), 2, 3, 4, 5)
    assert torch.equal(both, brute(lambda b, h, i, j: pad[b, j] and j <= i + 1, 2, 3, 4, 5))
    assert torch.equal(either, brute(lambda b, h, i, j: pad[b, j] or j == i + 1, 2, 3, 4, 5))
    assert torch.equal(neither, ~either)
    assert "real_keys" in repr(kp & cm)


def test_head_dependent_mask_and_full() -> None:
    per_head = Mask(lambda b, h, q, k: (k % 2) == (h % 2), "parity")
    assert torch.equal(per_head.materialize(2, 2, 3, 4), brute(lambda b, h, i, j: j % 2 == h % 2, 2, 2, 3, 4))
    assert bool(materialize(full_mask(), 2, 2, 3, 4).all())
