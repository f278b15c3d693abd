"""The registry's public behaviour: names, capabilities, option validation."""

from __future__ import annotations

import dataclasses

import pytest

import attnkit
from attnkit.core.capabilities import Capabilities


def test_full_is_registered_with_its_capabilities() -> None:
    assert "full" in attnkit.list_attention()
    caps = attnkit.attention_capabilities("full")
    assert caps.exact and caps.causal and caps.key_padding and caps.cross_attention
    assert caps.decoding == "kv_cache"
    with pytest.raises(dataclasses.FrozenInstanceError):
        caps.exact = False  # type: ignore[misc]


def test_unknown_name_lists_names_and_suggests() -> None:
    with pytest.raises(ValueError, match=r"Did you mean 'full'\?.*Registered: .*full"):
        attnkit.build_attention("fulll")


def test_unknown_and_invalid_options() -> None:
    with pytest.raises(TypeError, match=r"'dropuot' \(did you mean 'dropout'\?\).*accepted: .*dropout="):
        attnkit.build_attention("full", dropuot=0.1)
    with pytest.raises(ValueError, match="dropout must be a number in"):
        attnkit.build_attention("full", dropout=1.5)
    with pytest.raises(ValueError, match="backend must be one of"):
        attnkit.build_attention("full", backend="cuda")


def test_capabilities_validate_themselves() -> None:
    with pytest.raises(ValueError, match="error_budget"):
        Capabilities(
            exact=False, causal=False, key_padding=False, cross_attention=False, decoding=None, complexity="O(N)"
        )
    with pytest.raises(ValueError, match="decoding must be"):
        Capabilities(
            exact=True, causal=False, key_padding=False, cross_attention=False, decoding="cache", complexity="O(N)"
        )  # type: ignore[arg-type]


def test_a_name_cannot_be_taken_twice() -> None:
    caps = attnkit.attention_capabilities("full")
    with pytest.raises(ValueError, match="already registered"):

        @attnkit.register("full", caps)
        class Other(attnkit.AttentionMechanism):
            def _attend(self, q, k, v, **kwargs):  # type: ignore[no-untyped-def]
                return v
