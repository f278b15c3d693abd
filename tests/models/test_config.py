"""TransformerConfig: validation that names the field, per-layer attention, JSON round trip."""

from __future__ import annotations

import json

import pytest

import attnkit
from attnkit import TransformerConfig


def no_bias_mechanisms() -> list[str]:
    return [n for n in attnkit.list_attention() if not attnkit.attention_capabilities(n).score_bias]


def test_json_and_dict_round_trip() -> None:
    cfg = TransformerConfig(
        vocab_size=100,
        dim=32,
        depth=3,
        heads=4,
        attention=["full", "full", "full"],
        attention_options=[{}, {"dropout": 0.1}, {}],
        position="alibi",
        num_classes=3,
        pad_token_id=0,
        activation="swiglu",
        norm="rmsnorm",
    )
    assert cfg.attention == ("full", "full", "full")  # lists are stored as tuples (frozen, hashable fields)
    again = TransformerConfig.from_json(cfg.to_json())
    assert again == cfg
    assert TransformerConfig.from_dict(cfg.to_dict()) == cfg
    assert json.loads(cfg.to_json())["attention_options"][1] == {"dropout": 0.1}


def test_layer_attention_forms() -> None:
    cfg = TransformerConfig(vocab_size=10, dim=16, depth=4, heads=2, attention_options={"dropout": 0.2})
    assert cfg.layer_attention() == [("full", {"dropout": 0.2})] * 4
    keyed = TransformerConfig(vocab_size=10, dim=16, depth=2, heads=2, attention_options={"full": {"dropout": 0.3}})
    assert keyed.layer_attention() == [("full", {"dropout": 0.3})] * 2
    per_layer = TransformerConfig(vocab_size=10, dim=16, depth=2, heads=2, attention_options=[{"dropout": 0.1}, {}])
    assert per_layer.layer_attention() == [("full", {"dropout": 0.1}), ("full", {})]
    assert per_layer.layer_attention(decoder=True) == per_layer.layer_attention()  # the decoder inherits
    # A per-layer list of the encoder's depth does not fit 3 decoder layers: caught at construction.
    with pytest.raises(ValueError, match="decoder_attention_options as a list needs 3 dicts"):
        per_layer.replace(decoder_depth=3)


def test_derived_widths() -> None:
    assert TransformerConfig(vocab_size=10, dim=48, heads=4).hidden_dim == 192
    swiglu = TransformerConfig(vocab_size=10, dim=48, heads=4, activation="swiglu")
    assert swiglu.hidden_dim == 128 and swiglu.hidden_dim % 8 == 0
    assert TransformerConfig(vocab_size=10, dim=48, heads=4, ff_dim=20).hidden_dim == 20


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"vocab_size": 0}, "vocab_size must be a positive integer, got 0"),
        ({"dim": 30, "heads": 4}, "dim must be divisible by heads"),
        ({"depth": -1}, "depth must be a positive integer"),
        ({"attention": "ful"}, "Did you mean 'full'"),
        ({"attention": ["full"]}, r"list of 2 names \(one per layer\)"),
        ({"attention_options": {"windw": 3}}, r"has no option\(s\) \['windw'\]"),
        ({"attention_options": [{}]}, "list needs 2 dicts"),
        ({"position": "relative"}, "position must be one of"),
        ({"norm": "batchnorm"}, "norm must be one of"),
        ({"activation": "relu"}, "activation must be one of"),
        ({"dropout": 1.0}, r"dropout must be a number in \[0, 1\)"),
        ({"reversible": True, "checkpointing": True}, "set checkpointing=False"),
        ({"pad_token_id": 10}, "pad_token_id must be below vocab_size=10"),
        ({"kv_heads": 3}, "kv_heads must divide heads"),
        ({"ff_chunks": 0}, "ff_chunks must be a positive integer"),
        ({"num_classes": 0}, "num_classes must be a positive integer"),
        ({"reversible": 1}, "reversible must be a bool"),
        ({"cross_attention": "nope"}, "cross_attention: unknown attention"),
        ({"dim": 12, "heads": 4, "position": "rotary"}, "even head dimension"),
    ],
)
def test_bad_values_name_the_field(changes: dict, message: str) -> None:
    base = {"vocab_size": 10, "dim": 16, "depth": 2, "heads": 2}
    with pytest.raises(ValueError, match=message):
        TransformerConfig(**{**base, **changes})


@pytest.mark.parametrize("name", no_bias_mechanisms())
def test_score_bias_positions_need_a_capable_mechanism(name: str) -> None:
    with pytest.raises(ValueError, match="does not accept additive score biases"):
        TransformerConfig(vocab_size=10, dim=16, depth=1, heads=2, attention=name, position="alibi")


def test_from_dict_and_json_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown TransformerConfig field\(s\) \['widht'\]"):
        TransformerConfig.from_dict({"vocab_size": 10, "widht": 3})
    with pytest.raises(ValueError, match="must contain 'vocab_size'"):
        TransformerConfig.from_dict({"dim": 16})
    with pytest.raises(ValueError, match="not valid JSON"):
        TransformerConfig.from_json("{vocab_size: 10")
    # metadata written by save_pretrained is accepted
    cfg = TransformerConfig.from_dict({"vocab_size": 10, "architecture": "LanguageModel", "attnkit_version": "0"})
    assert cfg.vocab_size == 10


def test_frozen() -> None:
    cfg = TransformerConfig(vocab_size=10)
    with pytest.raises(AttributeError):
        cfg.dim = 3  # type: ignore[misc]
    assert cfg.replace(dim=64).dim == 64


@pytest.mark.parametrize(
    ("changes", "path"),
    [
        ({"dim": 30, "heads": 4}, ("dim",)),
        ({"reversible": True, "checkpointing": True}, ("checkpointing",)),
        ({"attention": ["full", "ful"]}, ("attention", 1)),
        ({"attention": "sliding_window", "attention_options": {"windw": 3}}, ("attention_options", "windw")),
        (
            {"attention": "sliding_window", "attention_options": {"sliding_window": {"windw": 3}}},
            ("attention_options", "sliding_window", "windw"),
        ),
        ({"attention_options": [{}, {"windw": 3}]}, ("attention_options", 1, "windw")),
        ({"decoder_attention": ["full", "nope"]}, ("decoder_attention", 1)),
        # The decoder inherits the encoder's options: the bad key is where it was written.
        ({"decoder_depth": 3, "attention_options": [{}, {}]}, ("attention_options",)),
        ({"cross_attention_options": {"windw": 1}}, ("cross_attention_options", "windw")),
    ],
)
def test_errors_carry_the_key_path_of_the_bad_value(changes: dict, path: tuple) -> None:
    from attnkit.models.config import ConfigFieldError

    with pytest.raises(ConfigFieldError) as err:
        TransformerConfig(**{"vocab_size": 10, "dim": 16, "depth": 2, "heads": 2, **changes})
    assert err.value.path == path


def test_unknown_options_get_a_did_you_mean() -> None:
    with pytest.raises(
        ValueError, match=r"has no option\(s\) \['windw'\] \(did you mean 'window'\?\); accepted: window"
    ):
        TransformerConfig(
            vocab_size=10, dim=16, depth=1, heads=2, attention="sliding_window", attention_options={"windw": 3}
        )


def test_options_for_a_mechanism_no_layer_uses_are_refused_not_dropped() -> None:
    with pytest.raises(
        ValueError, match=r"attention_options sets options for \['sliding_window'\], but no layer uses it"
    ):
        TransformerConfig(vocab_size=10, dim=16, depth=1, heads=2, attention_options={"sliding_window": {"window": 4}})
    # Used by the decoder only is used.
    cfg = TransformerConfig(
        vocab_size=10,
        dim=16,
        depth=1,
        heads=2,
        decoder_attention="sliding_window",
        attention_options={"sliding_window": {"window": 4}},
    )
    assert cfg.layer_attention(decoder=True) == [("sliding_window", {"window": 4})]
    assert cfg.layer_attention() == [("full", {})]
