"""Per-head mixing in MultiHeadAttention against a float64 reference written here.

The reference projects with the layer's weights in float64, runs each head group by its
definition (softmax over a brute-force mask for ``sliding_window`` and ``full``; the closed form
of linear attention with ``φ = elu + 1`` for ``linear``), concatenates the heads in order and
applies the output projection.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import attnkit
from attnkit.attention.head_groups import HeadGroup, HeadSplitError, MixedHeads, MixedState

B, T, DIM, HEADS = 2, 11, 24, 4
WINDOW = 3


# -- the reference ------------------------------------------------------------------------
def window_mask(t: int, causal: bool, window: int) -> Tensor:
    """Sliding window by its definition: causal ``i-w+1 <= j <= i``; else ``|i-j| <= w // 2``."""
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    if causal:
        return (j <= i) & (j >= i - window + 1)
    return (i - j).abs() <= window // 2


def softmax_heads(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, bias: Tensor | None = None) -> Tensor:
    """Dense float64 softmax attention over ``allowed (B or 1, 1, T, S)``; rows with no key are zeros."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return weights @ v


def linear_heads(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor) -> Tensor:
    """Katharopoulos et al.'s closed form: ``φ(q_t)·Σ_s φ(k_s) v_s / φ(q_t)·Σ_s φ(k_s)`` over ``allowed``."""
    fq, fk = F.elu(q) + 1, F.elu(k) + 1
    kernel = (fq @ fk.transpose(-1, -2)) * allowed  # (B, H, T, S): φ(q_t)·φ(k_s) where s is visible
    return (kernel @ v) / kernel.sum(-1, keepdim=True)


def project64(layer: attnkit.MultiHeadAttention, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q ``(B, H, T, D)`` and k, v expanded to ``H`` heads (key/value head ``j`` serves query heads
    ``j·r .. j·r + r - 1``), in float64 from the layer's weights."""
    b, t, _ = x.shape
    d = layer.head_dim
    q = (x.double() @ layer.to_q.weight.double().T).view(b, t, layer.heads, d).transpose(1, 2)
    k = (x.double() @ layer.to_k.weight.double().T).view(b, t, layer.kv_heads, d).transpose(1, 2)
    v = (x.double() @ layer.to_v.weight.double().T).view(b, t, layer.kv_heads, d).transpose(1, 2)
    r = layer.heads // layer.kv_heads
    return q, k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)


def group_reference(
    groups: list[tuple[str, int]], q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, bias: Tensor | None = None
) -> Tensor:
    """Each group's heads by their definition, concatenated in head order: ``(B, H, T, D)``."""
    outs, start = [], 0
    for name, size in groups:
        part = slice(start, start + size)
        group_bias = None if bias is None else bias[:, part]
        if name == "linear":
            outs.append(linear_heads(q[:, part], k[:, part], v[:, part], allowed["full"]))
        else:
            outs.append(softmax_heads(q[:, part], k[:, part], v[:, part], allowed[name], group_bias))
        start += size
    return torch.cat(outs, dim=1)


def masks(t: int, causal: bool, padding: Tensor | None = None) -> dict[str, Tensor]:
    """``allowed`` per mechanism, ``(B or 1, 1, T, S)``: the pattern and the padded keys."""
    full = torch.tril(torch.ones(t, t, dtype=torch.bool)) if causal else torch.ones(t, t, dtype=torch.bool)
    out = {"full": full, "sliding_window": window_mask(t, causal, WINDOW)}
    keys = padding[:, None, None, :] if padding is not None else torch.ones(1, 1, 1, t, dtype=torch.bool)
    return {name: m[None, None] & keys for name, m in out.items()}


def finish(layer: attnkit.MultiHeadAttention, heads: Tensor) -> Tensor:
    b, h, t, d = heads.shape
    return heads.transpose(1, 2).reshape(b, t, h * d) @ layer.to_out.weight.double().T


MIX = [("sliding_window", 2), ("linear", 2)]


def mixed_layer(
    *, kv_heads: int = 2, groups: list[tuple[str, int]] = MIX, **kwargs: object
) -> attnkit.MultiHeadAttention:
    torch.manual_seed(0)
    spec = [HeadGroup(name, size, {"window": WINDOW} if name == "sliding_window" else {}) for name, size in groups]
    return attnkit.MultiHeadAttention(DIM, HEADS, spec, kv_heads=kv_heads, **kwargs).double()  # type: ignore[arg-type]


# -- forward and backward -----------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_mixed_layer_equals_groups_computed_separately(causal: bool, kv_heads: int) -> None:
    layer = mixed_layer(kv_heads=kv_heads)
    x = torch.randn(B, T, DIM, dtype=torch.float64)
    out = layer(x, causal=causal)
    q, k, v = project64(layer, x)
    expected = finish(layer, group_reference(MIX, q, k, v, masks(T, causal)))
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)


def test_float32_within_tolerance() -> None:
    layer = mixed_layer().float()
    x = torch.randn(B, T, DIM)
    q, k, v = project64(layer, x)
    expected = finish(layer, group_reference(MIX, q, k, v, masks(T, True)))
    torch.testing.assert_close(layer(x, causal=True).double(), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_gradients_match_float64_autograd_of_the_reference(causal: bool) -> None:
    layer = mixed_layer()
    x = torch.randn(B, T, DIM, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(B, T, DIM, dtype=torch.float64)
    (layer(x, causal=causal) * upstream).sum().backward()
    got = [x.grad] + [getattr(layer, n).weight.grad for n in ("to_q", "to_k", "to_v", "to_out")]

    x_ref = x.detach().clone().requires_grad_(True)
    weights = {
        n: getattr(layer, n).weight.detach().clone().requires_grad_(True) for n in ("to_q", "to_k", "to_v", "to_out")
    }
    b, t, d, r = B, T, layer.head_dim, layer.heads // layer.kv_heads
    q = (x_ref @ weights["to_q"].T).view(b, t, HEADS, d).transpose(1, 2)
    k = (x_ref @ weights["to_k"].T).view(b, t, layer.kv_heads, d).transpose(1, 2).repeat_interleave(r, dim=1)
    v = (x_ref @ weights["to_v"].T).view(b, t, layer.kv_heads, d).transpose(1, 2).repeat_interleave(r, dim=1)
    heads = group_reference(MIX, q, k, v, masks(T, causal))
    ref = heads.transpose(1, 2).reshape(b, t, HEADS * d) @ weights["to_out"].T
    (ref * upstream).sum().backward()
    expected = [x_ref.grad] + [weights[n].grad for n in ("to_q", "to_k", "to_v", "to_out")]
    for name, g, e in zip(("x", "to_q", "to_k", "to_v", "to_out"), got, expected):
        torch.testing.assert_close(g, e, atol=1e-9, rtol=1e-9, msg=f"gradient of {name}")


def test_causal_by_perturbation_outputs_and_gradients() -> None:
    layer = mixed_layer()
    x = torch.randn(B, T, DIM, dtype=torch.float64)
    cut = 6
    changed = x.clone()
    changed[:, cut:] = torch.randn(B, T - cut, DIM, dtype=torch.float64)
    assert torch.equal(layer(x, causal=True)[:, :cut], layer(changed, causal=True)[:, :cut])  # bitwise
    x_grad = x.clone().requires_grad_(True)
    layer(x_grad, causal=True)[:, :cut].sum().backward()
    assert x_grad.grad is not None
    assert torch.count_nonzero(x_grad.grad[:, cut:]) == 0
    assert torch.count_nonzero(x_grad.grad[:, :cut]) > 0


@pytest.mark.parametrize("causal", [False, True])
def test_padding_is_honoured_by_every_group(causal: bool) -> None:
    layer = mixed_layer()
    x = torch.randn(B, T, DIM, dtype=torch.float64)
    padding = torch.ones(B, T, dtype=torch.bool)
    padding[0, -3:] = False  # right padding on row 0
    padding[1, :2] = False  # left padding on row 1
    out = layer(x, causal=causal, attention_mask=padding)
    q, k, v = project64(layer, x)
    expected = finish(layer, group_reference(MIX, q, k, v, masks(T, causal, padding)))
    torch.testing.assert_close(out[padding], expected[padding], atol=1e-10, rtol=1e-10)


def alibi_slopes_closed_form(heads: int) -> Tensor:
    """Press et al.: for a power-of-two ``H``, head ``h`` (from 0) has slope ``2^(-8(h+1)/H)``."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)], dtype=torch.float64)


@pytest.mark.parametrize("causal", [False, True])
def test_alibi_slopes_stay_with_their_heads(causal: bool) -> None:
    groups = [("full", 1), ("sliding_window", 3)]
    layer = mixed_layer(kv_heads=4, groups=groups, position_bias="alibi")
    x = torch.randn(B, T, DIM, dtype=torch.float64)
    q, k, v = project64(layer, x)
    distance = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).abs().double()
    bias = -alibi_slopes_closed_form(HEADS)[:, None, None] * distance  # (H, T, S)
    expected = finish(layer, group_reference(groups, q, k, v, masks(T, causal), bias[None]))
    torch.testing.assert_close(layer(x, causal=causal), expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("position", [{"rotary": True}, {"position_bias": "alibi"}, {"position_bias": "t5"}])
def test_mix_of_full_groups_equals_the_unmixed_layer(position: dict[str, object]) -> None:
    """Rotary, ALiBi and T5 apply per head as in an unmixed layer: a mix of two ``full`` groups is
    the plain ``full`` layer (same weights), including the per-head bias tables."""
    torch.manual_seed(1)
    plain = attnkit.MultiHeadAttention(DIM, HEADS, "full", kv_heads=2, **position).double()  # type: ignore[arg-type]
    mixed = attnkit.MultiHeadAttention(
        DIM,
        HEADS,
        [HeadGroup("full", 2), HeadGroup("full", 2)],
        kv_heads=2,
        **position,  # type: ignore[arg-type]
    ).double()
    mixed.load_state_dict(plain.state_dict())
    if position.get("position_bias") == "t5":
        with torch.no_grad():  # distinct columns per head, so a head-index slip would show
            plain.position_bias.bias.weight.copy_(torch.randn_like(plain.position_bias.bias.weight))  # type: ignore[union-attr]
            mixed.position_bias.bias.weight.copy_(plain.position_bias.bias.weight)  # type: ignore[union-attr]
    x = torch.randn(B, T, DIM, dtype=torch.float64)
    torch.testing.assert_close(mixed(x, causal=True), plain(x, causal=True), atol=1e-12, rtol=1e-12)


# -- decoding -------------------------------------------------------------------------------
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("chunks", [[1] * T, [4, 1, 6]])
def test_cached_decoding_equals_the_causal_reference(kv_heads: int, chunks: list[int]) -> None:
    layer = mixed_layer(kv_heads=kv_heads, rotary=True)
    x = torch.randn(B, T, DIM, dtype=torch.float64)
    cache = layer.new_cache()
    steps, start = [], 0
    for size in chunks:
        steps.append(layer(x[:, start : start + size], cache=cache))
        start += size
    assert isinstance(cache.state, MixedState) and len(cache.state.states) == 2
    torch.testing.assert_close(torch.cat(steps, dim=1), layer(x, causal=True), atol=1e-12, rtol=1e-12)


def test_decoding_refuses_a_group_without_state() -> None:
    layer = attnkit.MultiHeadAttention(DIM, HEADS, [HeadGroup("full", 2), HeadGroup("linformer", 2)])
    with pytest.raises(ValueError, match=r"head group 1 \(linformer, heads 2-3\).*no incremental decoding state"):
        layer(torch.randn(1, 1, DIM), cache=layer.new_cache())


# -- refusals ---------------------------------------------------------------------------------
def test_capabilities_are_the_intersection() -> None:
    with pytest.raises(ValueError, match=r"linear.*does not support additive position biases"):
        attnkit.MultiHeadAttention(DIM, HEADS, [HeadGroup("full", 2), HeadGroup("linear", 2)], position_bias="alibi")
    mix = MixedHeads([HeadGroup("full", 2), HeadGroup("linformer", 2, {"max_len": 16})], heads=4, kv_heads=4)
    q = torch.randn(1, 4, 5, 6)
    with pytest.raises(ValueError, match=r"head group 1 \(linformer, heads 2-3\): causal"):
        mix(q, q, q, causal=True)


def test_split_errors_name_the_field() -> None:
    with pytest.raises(HeadSplitError, match=r"add up to 3, but the layer has heads=4"):
        attnkit.MultiHeadAttention(DIM, HEADS, [HeadGroup("full", 2), HeadGroup("linear", 1)])
    with pytest.raises(HeadSplitError, match=r"head group 0 has heads=1, but with kv_heads=2.*multiple of 2"):
        attnkit.MultiHeadAttention(DIM, HEADS, [HeadGroup("full", 1), HeadGroup("linear", 3)], kv_heads=2)
    with pytest.raises(ValueError, match=r"head group 1: unknown attention 'linar'"):
        attnkit.MultiHeadAttention(DIM, HEADS, [HeadGroup("full", 2), HeadGroup("linar", 2)])
    with pytest.raises(TypeError, match=r"head group 0: attention 'sliding_window' got unknown option"):
        attnkit.MultiHeadAttention(DIM, HEADS, [HeadGroup("sliding_window", 2, {"windw": 3}), HeadGroup("full", 2)])
    with pytest.raises(ValueError, match=r"options \['window'\] were given next to a per-head mix"):
        attnkit.MultiHeadAttention(DIM, HEADS, [HeadGroup("full", 2), HeadGroup("full", 2)], window=3)
    with pytest.raises(ValueError, match=r"head group 1 has unknown key\(s\) \['head'\]"):
        attnkit.MultiHeadAttention(DIM, HEADS, [{"mechanism": "full", "heads": 2}, {"mechanism": "full", "head": 2}])


def test_per_call_options_go_to_the_groups_that_accept_them() -> None:
    torch.manual_seed(0)
    mix = MixedHeads([HeadGroup("longformer", 2, {"window": 3}), HeadGroup("full", 2)], heads=4, kv_heads=4)
    q, k, v = (torch.randn(1, 4, 9, 6, dtype=torch.float64) for _ in range(3))
    out = mix(q, k, v, global_tokens=1)
    expected_full = softmax_heads(q[:, 2:], k[:, 2:], v[:, 2:], torch.ones(9, 9, dtype=torch.bool))
    torch.testing.assert_close(out[:, 2:], expected_full)
    i, j = torch.arange(9)[:, None], torch.arange(9)[None, :]
    allowed = ((i - j).abs() <= 1) | (i == 0) | (j == 0)  # window 3 plus global token 0, by definition
    torch.testing.assert_close(out[:, :2], softmax_heads(q[:, :2], k[:, :2], v[:, :2], allowed))
    with pytest.raises(TypeError, match=r"no head group .* accepts per-call argument\(s\) shape"):
        mix(q, k, v, shape=(3, 3))
