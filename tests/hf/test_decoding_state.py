"""Decoding state inside Transformers: recurrent (linear, performer) and rolling-window (sliding_window) caches.

References are independent of the cache: generation without a cache (the whole prefix
recomputed by the mechanism's forward at every step), full forwards over the grown sequence,
and closed forms for the state's size.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

import attnkit
import attnkit.hf
from attnkit.hf import AttnkitCache, MechanismStateLayer
from tests.hf.helpers import RTOL, outputs, padded_batch, positions, relative_error, tiny, with_mechanism
from tests.hf.test_generate import NEW_TOKENS, WINDOW, assert_same_generation, generated, options

STATEFUL = ["linear", "performer", "sliding_window"]
RECURRENT = ["linear", "performer"]


def _generate(model, ids, mask, **kwargs):
    return model.generate(
        ids,
        attention_mask=mask,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
        **kwargs,
    )


@pytest.mark.parametrize("name", STATEFUL)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_keeps_the_mechanism_state_and_equals_recomputation(name: str, family: str) -> None:
    model = with_mechanism(tiny(family), name, **options(name))
    ids, mask = padded_batch([8, 5], side="left", seed=21)
    out = _generate(model, ids, mask, max_new_tokens=NEW_TOKENS, use_cache=True)
    cache = out.cache
    assert isinstance(cache, AttnkitCache)
    assert [type(layer) for layer in cache.layers] == [MechanismStateLayer] * 2
    # Every token went through the state (prompt + generated, the last token is never fed back).
    assert all(layer.length == 8 + NEW_TOKENS - 1 for layer in cache.layers)
    assert_same_generation(
        (out.sequences, torch.stack(out.logits)), generated(model, ids, mask, use_cache=False, new=NEW_TOKENS)
    )


def _state_bytes(cache: AttnkitCache) -> int:
    total = 0
    for layer in cache.layers:
        assert isinstance(layer, MechanismStateLayer)
        total += sum(t.numel() * t.element_size() for t in layer.state_tensors())
    return total


def _bytes_after(model, context: int) -> int:
    g = torch.Generator().manual_seed(context)
    ids = torch.randint(1, 97, (2, context), generator=g)
    mask = torch.ones_like(ids)
    mask[1, : context // 2] = 0  # a left-padded row keeps a padding record where the mechanism needs one
    out = _generate(model, ids, mask, max_new_tokens=3, use_cache=True)
    return _state_bytes(out.cache)


@pytest.mark.parametrize("name", STATEFUL)
def test_the_state_does_not_grow_with_the_context(name: str) -> None:
    model = with_mechanism(tiny("llama"), name, **options(name))
    batch, heads, head_dim, layers = 2, 4, 16, 2
    # Closed forms of what each mechanism must keep, float32 (4 bytes):
    expected = {
        # Σ φ(k) [v, 1]ᵀ: (B, H, D, D + 1)
        "linear": batch * heads * head_dim * (head_dim + 1) * 4,
        # Σ φ(k) [v, 1]ᵀ over m features, plus the running log-scale reference (B, H)
        "performer": batch * heads * (256 * (head_dim + 1) + 1) * 4,
        # the last window-1 keys and values, and their padding flags (1 byte each)
        "sliding_window": 2 * batch * heads * (WINDOW - 1) * head_dim * 4 + batch * (WINDOW - 1),
    }[name] * layers
    assert _bytes_after(model, 16) == expected
    assert _bytes_after(model, 64) == expected


def test_transformers_own_cache_grows_where_the_state_does_not() -> None:
    # The comparison above means something: the same generation with Transformers' cache grows.
    model = with_mechanism(tiny("llama"), "linear", **options("linear"))

    def kv_bytes(context: int) -> int:
        ids = torch.randint(1, 97, (2, context))
        out = _generate(model, ids, torch.ones_like(ids), max_new_tokens=3, cache=DynamicCache(config=model.config))
        return sum((layer.keys.numel() + layer.values.numel()) * 4 for layer in out.cache.layers)

    # (B = 2, H_kv = 2, S = context + 2, D = 16) keys and values in 2 layers
    assert kv_bytes(16) == 2 * 2 * 2 * 2 * 18 * 16 * 4
    assert kv_bytes(64) == 2 * 2 * 2 * 2 * 66 * 16 * 4


@pytest.mark.parametrize("name", RECURRENT)
def test_beam_search_reorders_the_state(name: str) -> None:
    model = with_mechanism(tiny("llama"), name, **options(name))
    ids, mask = padded_batch([7, 4], side="left", seed=22)
    kwargs = {"max_new_tokens": 6, "num_beams": 3, "num_return_sequences": 2, "output_scores": True}
    cached = _generate(model, ids, mask, use_cache=True, **kwargs)
    assert isinstance(cached.cache, AttnkitCache)
    uncached = _generate(model, ids, mask, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert relative_error(cached.sequences_scores, uncached.sequences_scores) <= RTOL


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", STATEFUL)
def test_a_manual_loop_with_new_cache_equals_full_forwards(name: str, side: str) -> None:
    model = with_mechanism(tiny("llama"), name, **options(name))
    ids, mask = padded_batch([9, 6], side=side, seed=23)
    cache = attnkit.hf.new_cache(model)
    assert isinstance(cache, AttnkitCache)
    g = torch.Generator().manual_seed(24)
    extra = torch.randint(1, 97, (2, 3 * WINDOW), generator=g)
    every = torch.cat([ids, extra], dim=1)
    every_mask = torch.cat([mask, torch.ones_like(extra)], dim=1)
    full = outputs(model, every, every_mask, position_ids=positions(every_mask), use_cache=False)
    # The prompt in two chunks (a chunk after a state), then one token at a time.
    steps = [(0, 5), (5, 9)] + [(i, i + 1) for i in range(9, every.shape[1])]
    real = every_mask.bool()
    for start, stop in steps:
        with torch.no_grad():
            out = model(
                every[:, start:stop],
                attention_mask=every_mask[:, :stop],
                position_ids=positions(every_mask)[:, start:stop],
                cache=cache,
                use_cache=True,
            )
        assert out.cache is cache
        rows = real[:, start:stop]
        assert relative_error(out.logits[rows], full[:, start:stop][rows]) <= RTOL, (start, stop)


@pytest.mark.parametrize("stateful_layer", [0, 1])
def test_a_hybrid_keeps_transformers_cache_for_the_other_layers(stateful_layer: int) -> None:
    # With the state layer first, Transformers must still size the other layer's mask from its own cache.
    model = with_mechanism(tiny("llama"), "linear", layers=[stateful_layer], **options("linear"))
    ids, mask = padded_batch([8, 5], side="left", seed=25)
    out = _generate(model, ids, mask, max_new_tokens=NEW_TOKENS, use_cache=True)
    state, other = out.cache.layers[stateful_layer], out.cache.layers[1 - stateful_layer]
    assert type(other) is DynamicLayer and other.keys.shape[2] == 8 + NEW_TOKENS - 1
    assert isinstance(state, MechanismStateLayer)
    assert_same_generation((out.sequences, torch.stack(out.logits)), generated(model, ids, mask, use_cache=False))


def test_kv_cache_mechanisms_keep_transformers_cache() -> None:
    model = with_mechanism(tiny("llama"), "full")
    ids, mask = padded_batch([8, 5], side="left", seed=26)
    out = _generate(model, ids, mask, max_new_tokens=2, use_cache=True)
    assert type(out.cache) is DynamicCache
    assert type(attnkit.hf.new_cache(model)) is DynamicCache


def test_a_model_window_binding_a_recurrent_state_is_refused() -> None:
    # Mistral's window of 12: linear attention cannot forget, so decoding past the window is refused
    # even though each step's mask sees only the new token. Within the window it is exact.
    model = with_mechanism(tiny("mistral", sliding_window=12), "linear", **options("linear"))
    ids, mask = padded_batch([8, 5], side="left", seed=27)
    inside = _generate(model, ids, mask, max_new_tokens=4, use_cache=True)
    assert isinstance(inside.cache, AttnkitCache)
    assert_same_generation(
        (inside.sequences, torch.stack(inside.logits)), generated(model, ids, mask, use_cache=False, new=4)
    )
    with pytest.raises(ValueError, match=r"sliding window of 12 positions.*cannot honour"):
        _generate(model, ids, mask, max_new_tokens=6, use_cache=True)


def test_the_state_cannot_be_rolled_back() -> None:
    model = with_mechanism(tiny("llama"), "linear", **options("linear"))
    ids, mask = padded_batch([6, 6], side="left", seed=28)
    cache = _generate(model, ids, mask, max_new_tokens=2, use_cache=True).cache
    cache.crop(0)  # nothing to remove: allowed (generate calls it)
    with pytest.raises(ValueError, match="cannot be rolled back"):
        cache.crop(-1)


def test_a_state_left_unused_is_refused() -> None:
    # The layer switched back to Transformers' attention after the cache was built: the state
    # would silently miss tokens, so the next step refuses.
    model = with_mechanism(tiny("llama"), "linear", **options("linear"))
    cache = attnkit.hf.new_cache(model)
    model.set_attn_implementation("sdpa")
    ids = torch.randint(1, 97, (1, 4))
    with torch.no_grad(), pytest.raises(ValueError, match="was not used by the previous step"):
        model(ids, cache=cache, use_cache=True)
        model(ids[:, :1], cache=cache, use_cache=True)


def test_new_cache_needs_a_transformers_model() -> None:
    with pytest.raises(TypeError, match="PreTrainedModel"):
        attnkit.hf.new_cache(attnkit.build_attention("linear"))


def test_a_loaded_or_copied_model_generates_with_its_state(tmp_path) -> None:
    model = with_mechanism(tiny("llama"), "performer", **options("performer"))
    ids, mask = padded_batch([8, 5], side="left", seed=29)
    reference = generated(model, ids, mask, use_cache=False)
    model.save_pretrained(tmp_path)
    copied = copy.deepcopy(model)
    # the generate hook is bound to the copy, not to the model it was copied from
    assert copied._prepare_cache_for_generation.__self__ is copied
    for other in (attnkit.hf.load(tmp_path), copied):
        out = _generate(other, ids, mask, max_new_tokens=NEW_TOKENS, use_cache=True)
        assert isinstance(out.cache, AttnkitCache)
        assert_same_generation((out.sequences, torch.stack(out.logits)), reference)


def test_qwen2_sliding_layer_state_equals_transformers_sliding_window() -> None:
    # Layer 0 full attention (Transformers' cache), layer 1 Qwen2's own window of 4: the rolling
    # state of sliding_window there must equal Transformers' sliding attention, over 3x the window.
    reference = tiny("qwen2", use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    model = with_mechanism(reference, "sliding_window", window=WINDOW, layers=[1])
    ids, mask = padded_batch([8, 5], side="left", seed=30)
    out = _generate(model, ids, mask, max_new_tokens=NEW_TOKENS, use_cache=True)
    assert [type(layer) for layer in out.cache.layers] == [DynamicLayer, MechanismStateLayer]
    assert_same_generation(
        (out.sequences, torch.stack(out.logits)), generated(reference, ids, mask, use_cache=True, new=NEW_TOKENS)
    )
