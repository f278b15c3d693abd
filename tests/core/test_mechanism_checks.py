"""The base class's checks, on a minimal mechanism that declares almost nothing."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from attnkit.attention.reference import reference_attention
from attnkit.core.base import AttentionMechanism
from attnkit.core.capabilities import Capabilities


class Plain(AttentionMechanism):
    """Dense softmax attention without padding, causal or cross-attention support (not registered)."""

    name = "plain"
    capabilities = Capabilities(
        exact=True, causal=False, key_padding=False, cross_attention=False, decoding=None, complexity="O(N^2)"
    )

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, **kwargs: Any) -> Tensor:
        return reference_attention(q, k, v)


def test_a_padding_mask_is_refused_in_words() -> None:
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match=r"'plain' cannot do this: .*a padding attention_mask is not supported"):
        Plain()(q, q, q, attention_mask=torch.ones(1, 5, dtype=torch.bool))


def test_empty_inputs_still_go_through_the_capability_checks() -> None:
    """An empty call is answered without the mechanism, but only after the same checks as any call."""
    empty = torch.randn(1, 2, 0, 4)
    assert Plain()(empty, empty, empty).shape == (1, 2, 0, 4)
    with pytest.raises(ValueError, match="causal=True is not supported"):
        Plain()(empty, empty, empty, causal=True)
    with pytest.raises(ValueError, match="padding attention_mask is not supported"):
        Plain()(empty, empty, empty, attention_mask=torch.ones(1, 0, dtype=torch.bool))
    with pytest.raises(ValueError, match="same length"):
        Plain()(empty, torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    with pytest.raises(TypeError, match="unknown per-call argument"):
        Plain()(empty, empty, empty, window=3)
