"""Per-head mixing in the model config and in models: validation with key paths, TOML/JSON round
trips, cached decoding equal to recomputation (greedy and with beam reordering), save/load."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from attnkit.attention.head_groups import HeadGroup
from attnkit.models import LanguageModel, TransformerConfig
from attnkit.models.config import ConfigFieldError
from attnkit.models.pretrained import load_pretrained

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SLIDING = {"mechanism": "sliding_window", "heads": 2, "options": {"window": 3}}
LINEAR = {"mechanism": "linear", "heads": 2}
SMALL = {"vocab_size": 23, "dim": 16, "depth": 2, "heads": 4}


def lm(**changes: object) -> LanguageModel:
    torch.manual_seed(0)
    config = TransformerConfig(**{**SMALL, "attention": [SLIDING, LINEAR], "kv_heads": 2, **changes})  # type: ignore[arg-type]
    return LanguageModel(config).double().eval()


# -- config forms ----------------------------------------------------------------------------
def test_mix_for_every_layer_and_per_layer() -> None:
    every = TransformerConfig(**SMALL, attention=[SLIDING, LINEAR])  # type: ignore[arg-type]
    groups = (HeadGroup("sliding_window", 2, {"window": 3}), HeadGroup("linear", 2, {}))
    assert every.layer_attention() == [(groups, {}), (groups, {})]
    per_layer = TransformerConfig(
        **SMALL, attention=["full", [SLIDING, LINEAR]], attention_options=[{"dropout": 0.1}, {}]
    )  # type: ignore[arg-type]
    assert per_layer.layer_attention() == [("full", {"dropout": 0.1}), (groups, {})]
    layers = per_layer.attention_layers()
    assert [p.name for p in layers[1].parts()] == ["sliding_window", "linear"]
    assert layers[1].parts()[0].options_path == ("attention", 1, 0, "options")


def test_keyed_options_reach_the_groups_of_their_mechanism() -> None:
    cfg = TransformerConfig(
        **SMALL,  # type: ignore[arg-type]
        attention=["sliding_window", [{"mechanism": "sliding_window", "heads": 2}, LINEAR]],
        attention_options={"sliding_window": {"window": 5}, "linear": {"feature_map": "relu"}},
    )
    _, (mixed, _) = cfg.layer_attention()
    assert mixed == (HeadGroup("sliding_window", 2, {"window": 5}), HeadGroup("linear", 2, {"feature_map": "relu"}))
    model = LanguageModel(cfg)
    mechanisms = model.decoder.layer_list()[1].self_attention.attention.attention.group_mechanisms()  # type: ignore[union-attr]
    assert mechanisms[0].window == 5 and mechanisms[1].feature_map == "relu"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("changes", "path", "message"),
    [
        (
            {"attention": [{**SLIDING, "mechanism": "slidng_window"}, LINEAR]},
            ("attention", 0, "mechanism"),
            "Did you mean 'sliding_window'",
        ),
        ({"attention": [SLIDING, {**LINEAR, "heads": 1}]}, ("attention",), r"add up to 3, but the layer has heads=4"),
        (
            {"attention": [{**SLIDING, "options": {"windw": 3}}, LINEAR]},
            ("attention", 0, "options", "windw"),
            "did you mean 'window'",
        ),
        (
            {"attention": ["full", [SLIDING, {"mechanism": "linear"}]]},
            ("attention", 1, 1),
            r"missing key\(s\) \['heads'\]",
        ),
        ({"attention": [SLIDING, {**LINEAR, "head": 2}]}, ("attention", 1), r"unknown key\(s\) \['head'\]"),
        ({"attention": [SLIDING, {**LINEAR, "heads": 0}]}, ("attention", 1), "heads must be a positive integer"),
        (
            {"attention": [{**SLIDING, "heads": 1}, {**LINEAR, "heads": 3}], "kv_heads": 2},
            ("attention", 0, "heads"),
            r"head group 0 has heads=1, but with kv_heads=2",
        ),
        (
            {"attention": [SLIDING, LINEAR], "attention_options": {"dropout": 0.1}},
            ("attention_options",),
            "cannot say which head group",
        ),
        (
            {"attention": ["full", [SLIDING, LINEAR]], "attention_options": [{}, {"window": 3}]},
            ("attention_options", 1),
            "which head group",
        ),
        (
            {"attention": [SLIDING, LINEAR], "attention_options": {"sliding_window": {"window": 5}}},
            ("attention", 0, "options", "window"),
            "set both in the group's options and in attention_options.sliding_window",
        ),
        (
            {"attention": [SLIDING, LINEAR], "attention_options": {"full": {}}},
            ("attention_options", "full"),
            "no layer uses it",
        ),
        (
            {"attention": [SLIDING, LINEAR], "position": "alibi"},
            ("position",),
            r"group 1: attention 'linear' does not accept",
        ),
        ({"attention": ["full", SLIDING]}, ("attention", 1), "must be a mechanism name"),
    ],
)
def test_config_errors_name_the_key(changes: dict[str, object], path: tuple[object, ...], message: str) -> None:
    with pytest.raises(ConfigFieldError, match=message) as err:
        TransformerConfig(**{**SMALL, **changes})  # type: ignore[arg-type]
    assert err.value.path == path


def test_decoder_must_be_causal_in_every_group() -> None:
    config = TransformerConfig(**SMALL, attention=[SLIDING, {"mechanism": "linformer", "heads": 2}])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"layer 0 uses attention 'linformer' in a per-head mix, which has no causal"):
        LanguageModel(config)


TOML = """
vocab_size = 23
dim = 16
depth = 2
heads = 4
kv_heads = 2
attention = [
  {mechanism = "sliding_window", heads = 2, options = {window = 3}},
  {mechanism = "linear", heads = 2},
]
decoder_attention = ["full", [{mechanism = "full", heads = 2}, {mechanism = "linear", heads = 2}]]
"""


def test_toml_and_json_round_trip() -> None:
    data = tomllib.loads(TOML)
    cfg = TransformerConfig.from_dict(data)
    assert cfg.attention == (SLIDING, LINEAR)
    assert cfg.decoder_attention == ("full", ({"mechanism": "full", "heads": 2}, LINEAR))
    again = TransformerConfig.from_json(cfg.to_json())
    assert again == cfg
    as_json = json.loads(cfg.to_json())
    assert as_json["attention"] == data["attention"] and as_json["decoder_attention"] == data["decoder_attention"]
    # Python spellings land on the same stored form
    assert TransformerConfig(
        **{**SMALL, "kv_heads": 2, "attention": [HeadGroup("sliding_window", 2, {"window": 3}), HeadGroup("linear", 2)]}
    ).to_dict()["attention"] == [  # type: ignore[arg-type]
        SLIDING,
        {**LINEAR, "options": {}},
    ]


# -- decoding ---------------------------------------------------------------------------------
def greedy(
    model: LanguageModel, prompt: torch.Tensor, steps: int, *, cached: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy continuation, feeding one token at a time through the cache or recomputing the prefix."""
    ids, logits = prompt, []
    cache = model.new_cache() if cached else None
    feed = prompt
    for _ in range(steps):
        out = model(feed, cache=cache) if cached else model(ids)
        logits.append(out[:, -1])
        token = out[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, token], dim=1)
        feed = token
    return ids, torch.stack(logits, dim=1)


def test_greedy_generation_with_and_without_cache_agree() -> None:
    model = lm()
    prompt = torch.randint(0, 23, (2, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ids_cached, logits_cached = greedy(model, prompt, 9, cached=True)
        ids_full, logits_full = greedy(model, prompt, 9, cached=False)
    assert torch.equal(ids_cached, ids_full)
    torch.testing.assert_close(logits_cached, logits_full, atol=1e-12, rtol=1e-12)


def test_beam_reordering_of_a_mixed_cache() -> None:
    model = lm(attention=["full", [SLIDING, LINEAR]])
    ids = torch.randint(0, 23, (3, 8), generator=torch.Generator().manual_seed(4))
    order = torch.tensor([2, 0, 0])  # beams swap and one is duplicated
    with torch.no_grad():
        cache = model.new_cache()
        model(ids[:, :5], cache=cache)
        cache.reorder_batch(order)
        steps = [model(ids[order, i : i + 1], cache=cache) for i in range(5, 8)]
        expected = model(ids[order])[:, 5:]
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, atol=1e-12, rtol=1e-12)


def test_left_padded_prompts_decode_like_unpadded() -> None:
    model = lm()
    ids = torch.randint(1, 23, (2, 7), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, :3] = False
    with torch.no_grad():
        padded = model(ids, attention_mask=mask)
        alone = model(ids[1:, 3:])
    torch.testing.assert_close(padded[1, 3:], alone[0], atol=1e-12, rtol=1e-12)


def test_cached_decoding_of_a_left_padded_batch_equals_recompute() -> None:
    model = lm()
    ids = torch.randint(1, 23, (2, 9), generator=torch.Generator().manual_seed(7))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :4] = False  # row 0's prompt is left-padded
    with torch.no_grad():
        cache = model.new_cache()
        steps = [model(ids[:, :6], attention_mask=mask[:, :6], cache=cache)[:, -1:]]
        steps += [model(ids[:, i : i + 1], attention_mask=mask[:, i : i + 1], cache=cache) for i in range(6, 9)]
        expected = model(ids, attention_mask=mask)[:, 5:]
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, atol=1e-12, rtol=1e-12)


# -- save / load --------------------------------------------------------------------------------
def test_save_and_load_are_exact(tmp_path: Path) -> None:
    model = lm(attention=["full", [SLIDING, LINEAR]])
    model.save_pretrained(tmp_path)
    loaded = load_pretrained(tmp_path)
    assert isinstance(loaded, LanguageModel) and loaded.config == model.config
    loaded = loaded.double().eval()
    ids = torch.randint(0, 23, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    assert "sliding_window(window=3)×2 + linear×2" in loaded.summary()


def test_head_pruning_refuses_a_mixed_layer_and_changes_nothing() -> None:
    from attnkit.compress import prune_heads

    model = lm(attention=["full", [SLIDING, LINEAR]])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"sliding_window\(window=3\)×2 \+ linear×2"):
        prune_heads(model, {"decoder.layers.1.self_attention.attention": [0, 1]})
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
