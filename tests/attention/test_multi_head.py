"""MultiHeadAttention against a hand-written float64 computation from the layer's own weights."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

import attnkit
from attnkit.attention.reference import reference_attention
from attnkit.positions import t5_bucket

B, T, DIM, HEADS = 2, 11, 24, 4


def linear64(x: Tensor, layer: torch.nn.Linear) -> Tensor:
    out = x.double() @ layer.weight.double().T
    return out + layer.bias.double() if layer.bias is not None else out


def heads64(x: Tensor, heads: int) -> Tensor:
    b, t, width = x.shape
    return x.view(b, t, heads, width // heads).transpose(1, 2)  # (B, H, T, D)


def rotate64(x: Tensor, positions: Tensor, base: float = 10000.0) -> Tensor:
    """Rotary by hand: channel i pairs with i + D/2, angle = pos * base^(-2i/D)."""
    d = x.shape[-1]
    freqs = base ** (-torch.arange(0, d // 2, dtype=torch.float64) * 2 / d)
    pos = positions.double()
    angles = pos[..., None] * freqs  # (T, D/2) or (B, T, D/2)
    if angles.dim() == 3:
        angles = angles[:, None]  # (B, 1, T, D/2)
    out = x.double().clone()
    half = d // 2
    for i in range(half):
        c, s = torch.cos(angles[..., i]), torch.sin(angles[..., i])
        a, b = x[..., i].double(), x[..., i + half].double()
        out[..., i] = a * c - b * s
        out[..., i + half] = a * s + b * c
    return out


def mha_reference(
    layer: attnkit.MultiHeadAttention,
    x: Tensor,
    context: Tensor | None = None,
    *,
    causal: bool = False,
    attention_mask: Tensor | None = None,
    positions: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    source = x if context is None else context
    q = heads64(linear64(x, layer.to_q), layer.heads)
    k = heads64(linear64(source, layer.to_k), layer.kv_heads)
    v = heads64(linear64(source, layer.to_v), layer.kv_heads)
    group = layer.heads // layer.kv_heads
    k = torch.cat([k[:, j : j + 1].expand(-1, group, -1, -1) for j in range(layer.kv_heads)], dim=1)
    v = torch.cat([v[:, j : j + 1].expand(-1, group, -1, -1) for j in range(layer.kv_heads)], dim=1)
    if layer.rotary is not None:
        pos = positions if positions is not None else torch.arange(x.shape[1])
        q, k = rotate64(q, pos), rotate64(k, pos)
    if context is None and attention_mask is not None:
        q = q.masked_fill(~attention_mask[:, None, :, None], 0)  # padded tokens' queries are zeroed
    out = reference_attention(q, k, v, causal=causal, attention_mask=attention_mask, score_bias=bias)
    out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
    return linear64(out, layer.to_out)


def close(out: Tensor, ref: Tensor, atol: float = 2e-5) -> None:
    err = (out.double() - ref).abs().max().item()
    assert err <= atol, f"max abs error {err:.3g}"


def inputs(seed: int = 0, length: int = T) -> Tensor:
    return torch.randn(B, length, DIM, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_matches_float64_reference(causal: bool, padded: bool) -> None:
    torch.manual_seed(0)
    layer = attnkit.MultiHeadAttention(DIM, HEADS, bias=True)
    x = inputs()
    kpm = None
    if padded:
        kpm = torch.ones(B, T, dtype=torch.bool)
        kpm[1, 7:] = False
    close(layer(x, causal=causal, attention_mask=kpm), mha_reference(layer, x, causal=causal, attention_mask=kpm))


def test_cross_attention_matches_reference() -> None:
    torch.manual_seed(1)
    layer = attnkit.MultiHeadAttention(DIM, HEADS, context_dim=10)
    x = inputs()
    context = torch.randn(B, 17, 10)
    kpm = torch.ones(B, 17, dtype=torch.bool)
    kpm[0, 12:] = False
    out = layer(x, context, attention_mask=kpm)
    close(out, mha_reference(layer, x, context, attention_mask=kpm))


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_grouped_kv_heads_equal_expanded_weights(kv_heads: int) -> None:
    torch.manual_seed(2)
    grouped = attnkit.MultiHeadAttention(DIM, HEADS, kv_heads=kv_heads)
    full = attnkit.MultiHeadAttention(DIM, HEADS)
    head_dim, group = DIM // HEADS, HEADS // kv_heads
    with torch.no_grad():
        full.to_q.weight.copy_(grouped.to_q.weight)
        full.to_out.weight.copy_(grouped.to_out.weight)
        for name in ("to_k", "to_v"):
            w = getattr(grouped, name).weight.view(kv_heads, head_dim, DIM)
            getattr(full, name).weight.copy_(w.repeat_interleave(group, dim=0).reshape(HEADS * head_dim, DIM))
    x = inputs(3)
    torch.testing.assert_close(grouped(x, causal=True), full(x, causal=True), atol=1e-6, rtol=0)
    close(grouped(x, causal=True), mha_reference(grouped, x, causal=True))


def test_rotary_matches_reference_and_is_relative() -> None:
    torch.manual_seed(3)
    layer = attnkit.MultiHeadAttention(DIM, HEADS, rotary=True)
    x = inputs(4)
    close(layer(x, causal=True), mha_reference(layer, x, causal=True))
    # Shifting every position by the same amount changes nothing (rotary is relative).
    shifted = layer(x, causal=True, positions=torch.arange(T) + 13)
    torch.testing.assert_close(shifted, layer(x, causal=True), atol=2e-5, rtol=0)


def test_rotary_per_row_positions_match_reference() -> None:
    torch.manual_seed(4)
    layer = attnkit.MultiHeadAttention(DIM, HEADS, rotary=True)
    x = inputs(5)
    positions = torch.stack([torch.arange(T), (torch.arange(T) - 3).clamp(min=0)])  # row 1 left-padded by 3
    out = layer(x, causal=True, positions=positions)
    close(out, mha_reference(layer, x, causal=True, positions=positions))


def test_alibi_matches_closed_form() -> None:
    torch.manual_seed(5)
    layer = attnkit.MultiHeadAttention(DIM, HEADS, position_bias="alibi")
    x = inputs(6)
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / HEADS) for h in range(HEADS)], dtype=torch.float64)
    dist = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).abs().double()
    bias = -slopes[None, :, None, None] * dist  # (1, H, T, T)
    close(layer(x, causal=True), mha_reference(layer, x, causal=True, bias=bias))


def test_t5_bias_matches_table_lookup() -> None:
    torch.manual_seed(6)
    layer = attnkit.MultiHeadAttention(DIM, HEADS, position_bias="t5", t5_num_buckets=8, t5_max_distance=16)
    x = inputs(7)
    assert isinstance(layer.position_bias, attnkit.positions.T5RelativeBias)
    relative = torch.arange(T)[None, :] - torch.arange(T)[:, None]  # kv - q
    buckets = t5_bucket(relative, bidirectional=True, num_buckets=8, max_distance=16)
    bias = layer.position_bias.bias.weight.double()[buckets].permute(2, 0, 1)[None]  # (1, H, T, T)
    close(layer(x), mha_reference(layer, x, bias=bias))


@pytest.mark.parametrize("setting", ["plain", "rotary", "alibi", "t5", "grouped"])
@pytest.mark.parametrize("padded", [False, True])
def test_self_attention_cache_equals_recompute(setting: str, padded: bool) -> None:
    torch.manual_seed(7)
    kwargs = {
        "plain": {},
        "rotary": {"rotary": True},
        "alibi": {"position_bias": "alibi"},
        "t5": {"position_bias": "t5"},
        "grouped": {"kv_heads": 2, "rotary": True},
    }[setting]
    layer = attnkit.MultiHeadAttention(DIM, HEADS, **kwargs)
    x = inputs(8, length=13)
    kpm = None
    if padded:
        kpm = torch.ones(B, 13, dtype=torch.bool)
        kpm[1, :4] = False  # left padding
    full = layer(x, causal=True, attention_mask=kpm)
    cache = layer.new_cache()
    pieces = []
    # empty steps (no new token) change nothing, first or in the middle
    for start, stop in [(0, 0), (0, 5), (5, 6), (6, 6), (6, 9), *((i, i + 1) for i in range(9, 13))]:
        step_mask = kpm[:, start:stop] if kpm is not None else None
        pieces.append(layer(x[:, start:stop], attention_mask=step_mask, cache=cache))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.position == 13


def cached_tensors(state: object) -> list[Tensor]:
    """Every tensor a decoding state holds (the cache's memory), found through its attributes."""
    return [t for t in vars(state).values() if isinstance(t, Tensor)]


def decode_in_steps(layer: attnkit.MultiHeadAttention, x: Tensor, kpm: Tensor | None) -> tuple[Tensor, object]:
    """``layer``'s output over ``x`` fed a few tokens at a time through one cache, and the cache's state."""
    cache = layer.new_cache()
    pieces = []
    for start, stop in [(0, 4), (4, 5), *((i, i + 1) for i in range(5, x.shape[1]))]:
        pieces.append(layer(x[:, start:stop], attention_mask=None if kpm is None else kpm[:, start:stop], cache=cache))
    return torch.cat(pieces, dim=1), cache.state


@pytest.mark.parametrize("name", ["full", "sliding_window", "topk", "bigbird"])
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_grouped_cache_keeps_kv_heads_and_equals_recompute(name: str, kv_heads: int) -> None:
    """Grouped-query attention stores kv_heads heads in the cache: heads / kv_heads times fewer bytes."""
    torch.manual_seed(12)
    options = attnkit.get_spec(name).small_options
    length, head_dim = 13, DIM // HEADS
    grouped = attnkit.MultiHeadAttention(DIM, HEADS, name, kv_heads=kv_heads, rotary=True, **options)
    x = inputs(13, length=length)
    kpm = torch.ones(B, length, dtype=torch.bool)
    kpm[1, :3] = False  # left padding, as in batched generation
    out, state = decode_in_steps(grouped, x, kpm)
    torch.testing.assert_close(out, grouped(x, causal=True, attention_mask=kpm), atol=1e-5, rtol=1e-5)
    if name == "full":  # and against the float64 computation from the layer's weights
        close(out, mha_reference(grouped, x, causal=True, attention_mask=kpm))

    kept = state.keys.shape[2]  # every position, or the rolling window's last ones
    assert state.keys.shape == state.values.shape == (B, kv_heads, kept, head_dim)
    assert all(t.shape[1] == kv_heads for t in cached_tensors(state) if t.dim() == 4)  # preallocated stores too
    cached_bytes = state.keys.nbytes + state.values.nbytes
    assert cached_bytes == 2 * B * kv_heads * kept * head_dim * x.element_size()

    ungrouped = attnkit.MultiHeadAttention(DIM, HEADS, name, rotary=True, **options)
    _, full_state = decode_in_steps(ungrouped, x, kpm)
    assert full_state.keys.nbytes + full_state.values.nbytes == cached_bytes * (HEADS // kv_heads)


def test_grouped_cross_attention_cache_keeps_kv_heads() -> None:
    torch.manual_seed(13)
    layer = attnkit.MultiHeadAttention(DIM, HEADS, kv_heads=2)
    x, context = inputs(14), torch.randn(B, 6, DIM)
    cache = layer.new_cache()
    pieces = [layer(x[:, i : i + 1], context, cache=cache) for i in range(T)]
    close(torch.cat(pieces, dim=1), mha_reference(layer, x, context))
    assert cache.context is not None and cache.context[0].shape == (B, 2, 6, DIM // HEADS)


@pytest.mark.parametrize("name", ["linear", "performer"])
def test_grouped_recurrent_state_decodes_as_recompute(name: str) -> None:
    """Mechanisms whose state is not a key/value cache get the keys/values expanded to every head."""
    torch.manual_seed(14)
    layer = attnkit.MultiHeadAttention(DIM, HEADS, name, kv_heads=2, **attnkit.get_spec(name).small_options)
    x = inputs(15, length=9)
    out, _ = decode_in_steps(layer, x, None)
    torch.testing.assert_close(out, layer(x, causal=True), atol=1e-5, rtol=1e-5)


def test_cross_attention_cache_projects_context_once() -> None:
    torch.manual_seed(8)
    layer = attnkit.MultiHeadAttention(DIM, HEADS)
    x = inputs(9)
    context = torch.randn(B, 6, DIM)
    kpm = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    full = layer(x, context, attention_mask=kpm)
    cache = layer.new_cache()
    pieces = [layer(x[:, i : i + 1], context, attention_mask=kpm, cache=cache) for i in range(T)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-6, rtol=0)
    assert cache.context is not None and cache.context[0].shape == (B, HEADS, 6, DIM // HEADS)


def test_gradients_match_float64_reference() -> None:
    torch.manual_seed(9)
    layer = attnkit.MultiHeadAttention(DIM, HEADS, rotary=True).double()
    x = inputs(10).double().requires_grad_(True)
    (layer(x, causal=True) ** 2).sum().backward()
    grad = x.grad.clone()
    x.grad = None
    (mha_reference(layer, x, causal=True) ** 2).sum().backward()
    torch.testing.assert_close(grad, x.grad, atol=1e-9, rtol=1e-9)


def test_bad_inputs_name_the_argument() -> None:
    layer = attnkit.MultiHeadAttention(DIM, HEADS, rotary=True)
    x = inputs()
    with pytest.raises(ValueError, match=r"x must have shape \(B, T, 24\)"):
        layer(x[..., :5])
    with pytest.raises(ValueError, match="context must have shape"):
        attnkit.MultiHeadAttention(DIM, HEADS)(x, torch.randn(B, 3, 7))
    with pytest.raises(ValueError, match="rotary embeddings are for self-attention"):
        layer(x, x)
    with pytest.raises(ValueError, match=r"positions must have shape \(11,\) or \(2, 11\)"):
        layer(x, positions=torch.arange(5))
    with pytest.raises(ValueError, match="positions must be an integer tensor"):
        layer(x, positions=torch.arange(T).float())
    with pytest.raises(ValueError, match="cache must come from"):
        layer(x, cache={})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kv_heads must divide heads"):
        attnkit.MultiHeadAttention(DIM, HEADS, kv_heads=3)
    with pytest.raises(ValueError, match="dim must be divisible by heads"):
        attnkit.MultiHeadAttention(25, HEADS)
    with pytest.raises(ValueError, match="position_bias must be"):
        attnkit.MultiHeadAttention(DIM, HEADS, position_bias="relative")
    with pytest.raises(ValueError, match="heads must be a positive integer"):
        attnkit.MultiHeadAttention(DIM, 0)
    with pytest.raises(TypeError, match="window"):
        attnkit.MultiHeadAttention(DIM, HEADS, "full", window=3)


def test_scale_is_one_over_sqrt_head_dim() -> None:
    # A single key: output is exactly that key's value projected, whatever the scale;
    # two identical keys with different values: the mean. Checks the plumbing end to end.
    layer = attnkit.MultiHeadAttention(4, 1, bias=False)
    with torch.no_grad():
        for lin in (layer.to_q, layer.to_k, layer.to_v, layer.to_out):
            lin.weight.copy_(torch.eye(4))
    x = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]]])
    out = layer(x)
    scores = torch.tensor([[1.0, 0.0], [0.0, 4.0]]) / math.sqrt(4)
    expected = scores.softmax(-1) @ x[0]
    torch.testing.assert_close(out[0], expected, atol=1e-6, rtol=0)


def test_pytorch_key_padding_mask_is_refused() -> None:
    """torch.nn.MultiheadAttention's key_padding_mask means True = padding: refused, with what to pass."""
    layer = attnkit.MultiHeadAttention(DIM, HEADS)
    x = inputs()
    padding = torch.zeros(B, T, dtype=torch.bool)
    padding[1, 7:] = True
    explained = r"True = padding.*attention_mask.*True = a real token.*attention_mask=~key_padding_mask"
    with pytest.raises(TypeError, match=explained):
        layer(x, key_padding_mask=padding)
    with pytest.raises(TypeError, match=explained):
        layer(x, key_padding_mask=padding, cache=layer.new_cache())
    with pytest.raises(TypeError, match=explained):
        layer(x, torch.randn(B, T, DIM), key_padding_mask=padding, cache=layer.new_cache())


@pytest.mark.parametrize("setting", ["plain", "rotary", "t5"])
def test_empty_inputs(setting: str) -> None:
    """T = 0 gives an empty output with a working backward; a query with an empty context (S = 0)
    sees no key, so the attention is zero and the layer outputs the output projection's bias."""
    torch.manual_seed(11)
    kwargs = {"plain": {}, "rotary": {"rotary": True}, "t5": {"position_bias": "t5"}}[setting]
    layer = attnkit.MultiHeadAttention(DIM, HEADS, bias=True, **kwargs)
    x = inputs(12, length=0).requires_grad_(True)
    out = layer(x, causal=True)
    assert out.shape == (B, 0, DIM) and out.dtype == x.dtype
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == (B, 0, DIM)
    assert torch.equal(layer.to_q.weight.grad, torch.zeros_like(layer.to_q.weight))
    assert layer(x, cache=layer.new_cache()).shape == (B, 0, DIM)
    if setting == "rotary":
        return  # no cross-attention with rotary embeddings
    queries, empty = inputs(13), torch.randn(B, 0, DIM)
    for cache in (None, layer.new_cache()):
        out = layer(queries, empty, cache=cache)
        close(out, mha_reference(layer, queries, empty), atol=1e-6)
        assert torch.equal(out, layer.to_out.bias.expand(B, T, DIM))


PADDED_MECHANISMS = [name for name in attnkit.list_attention() if attnkit.attention_capabilities(name).key_padding]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", PADDED_MECHANISMS)
def test_padded_tokens_content_never_reaches_real_tokens(name: str, causal: bool) -> None:
    # Query-dependent structure (Nystrom landmarks, LSH buckets, routing clusters, Sinkhorn's block sort) used
    # to be built from padded tokens' queries too: changing only padded tokens moved real rows by up to 2.5.
    if causal and not attnkit.attention_capabilities(name).causal:
        pytest.skip("no causal mode")
    torch.manual_seed(0)
    length = 37
    layer = attnkit.MultiHeadAttention(DIM, HEADS, name, **attnkit.get_spec(name).small_options).eval()
    x = torch.randn(B, length, DIM, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(B, length, dtype=torch.bool)
    mask[0, 29:] = False  # right padding
    mask[1, :6] = False  # left padding
    changed = torch.where(mask[..., None], x, 10 * torch.randn_like(x))
    with torch.no_grad():
        out, out_changed = (layer(inp, causal=causal, attention_mask=mask) for inp in (x, changed))
    torch.testing.assert_close(out[mask], out_changed[mask], atol=1e-6, rtol=0)
