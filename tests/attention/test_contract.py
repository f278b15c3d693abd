"""The contract every registered mechanism must honour.

Parametrized over ``attnkit.list_attention()``: a newly registered mechanism runs all of
it without extra code. Exact mechanisms are compared with the float64 oracle over their
declared pattern; approximate ones against dense softmax attention within their declared
error budget on locally correlated inputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnkit
from attnkit.attention.reference import reference_attention
from attnkit.positions import ALiBi
from tests.helpers import TOL, build, oracle, random_padding, relative_error, structured_qkv

NAMES = attnkit.list_attention()
B, H, D = 2, 3, 16
ODD = 37  # a length that is not a multiple of any block, bucket or window size


def caps(name: str) -> attnkit.Capabilities:
    return attnkit.attention_capabilities(name)


def causal_modes(name: str) -> list[bool]:
    return [False, True] if caps(name).causal else [False]


def check_close(name: str, out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
    c = caps(name)
    assert torch.isfinite(out).all(), f"{name}: non-finite output"
    if c.exact:
        err = (out.double() - ref).abs().max().item()
        assert err <= TOL[dtype] * max(1.0, ref.abs().max().item()), f"{name}: max abs error {err:.3g}"
    else:
        assert c.error_budget is not None
        err = relative_error(out, ref)
        assert err <= c.error_budget, f"{name}: relative error {err:.3g} > budget {c.error_budget}"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_and_dtype(name: str, dtype: torch.dtype) -> None:
    q, k, v = structured_qkv(B, H, ODD, ODD, D, dtype=dtype)
    out = build(name)(q, k, v)
    assert out.shape == (B, H, ODD, D)
    assert out.dtype == dtype


@pytest.mark.parametrize("name", NAMES)
def test_low_precision_output_is_finite_and_close(name: str) -> None:
    q, k, v = structured_qkv(B, H, ODD, ODD, D, seed=3)
    module = build(name)
    ref = oracle(module, q, k, v)
    out = module(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    if caps(name).exact:
        assert (out.double() - ref).abs().max().item() < 5e-2
    else:
        assert relative_error(out, ref) <= caps(name).error_budget + 5e-2


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_matches_reference(name: str, causal: bool, padded: bool) -> None:
    if causal and not caps(name).causal:
        pytest.skip("no causal mode (checked to raise in test_unsupported_requests_raise)")
    if padded and not caps(name).key_padding:
        pytest.skip("no key padding (checked to raise in test_unsupported_requests_raise)")
    q, k, v = structured_qkv(B, H, ODD, ODD, D, seed=1)
    kpm = random_padding(B, ODD, seed=1, min_real=ODD // 2) if padded else None
    module = build(name)
    out = module(q, k, v, causal=causal, attention_mask=kpm)
    check_close(name, out, oracle(module, q, k, v, causal=causal, attention_mask=kpm))


@pytest.mark.parametrize("name", [n for n in NAMES if caps(n).cross_attention])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths", [(11, 29), (29, 11)])
def test_cross_attention_lengths(name: str, causal: bool, lengths: tuple[int, int]) -> None:
    if causal and not caps(name).causal:
        pytest.skip("no causal mode")
    t_len, s_len = lengths
    q, k, v = structured_qkv(B, H, t_len, s_len, D, seed=2)
    module = build(name)
    out = module(q, k, v, causal=causal)
    assert out.shape == (B, H, t_len, D)
    check_close(name, out, oracle(module, q, k, v, causal=causal))


@pytest.mark.parametrize("name", NAMES)
def test_batch_and_head_independence(name: str) -> None:
    q, k, v = structured_qkv(2, 2, ODD, ODD, D, seed=4)
    module = build(name)
    base = module(q, k, v)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[1] += 5.0 * torch.randn_like(t[1])  # another batch element
        t[0, 1] *= -3.0  # another head of batch element 0
    out = module(q2, k2, v2)
    torch.testing.assert_close(out[0, 0], base[0, 0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", [n for n in NAMES if caps(n).key_padding])
@pytest.mark.parametrize("causal", [False, True])
def test_padded_keys_change_nothing(name: str, causal: bool) -> None:
    if causal and not caps(name).causal:
        pytest.skip("no causal mode")
    q, k, v = structured_qkv(B, H, ODD, ODD, D, seed=5)
    kpm = random_padding(B, ODD, seed=5, min_real=ODD // 2)
    module = build(name)
    base = module(q, k, v, causal=causal, attention_mask=kpm)
    pad = ~kpm[:, None, :, None]
    k2 = torch.where(pad, 10.0 * torch.randn_like(k), k)
    v2 = torch.where(pad, 100.0 * torch.randn_like(v), v)
    out = module(q, k2, v2, causal=causal, attention_mask=kpm)
    torch.testing.assert_close(out, base, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", [n for n in NAMES if caps(n).key_padding])
def test_fully_padded_rows_give_zeros_and_finite_gradients(name: str) -> None:
    q, k, v = structured_qkv(B, H, ODD, ODD, D, seed=6, requires_grad=True)
    kpm = torch.ones(B, ODD, dtype=torch.bool)
    kpm[0] = False  # batch element 0 has no real key at all
    module = build(name)
    out = module(q, k, v, attention_mask=kpm)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and torch.isfinite(t.grad).all()


@pytest.mark.parametrize("name", [n for n in NAMES if caps(n).causal])
@pytest.mark.parametrize("cut", [0, 12, 30])
def test_causality_is_exact(name: str, cut: int) -> None:
    """Outputs up to ``cut`` are bit-identical when later tokens change, and get no gradient from them."""
    q, k, v = structured_qkv(B, H, ODD, ODD, D, seed=7, requires_grad=True)
    module = build(name)
    out = module(q, k, v, causal=True)
    future = torch.arange(ODD) > cut
    with torch.no_grad():
        q2, k2, v2 = (torch.where(future[None, None, :, None], 7.0 * torch.randn_like(t), t) for t in (q, k, v))
    out2 = module(q2, k2, v2, causal=True)
    assert torch.equal(out[:, :, : cut + 1], out2[:, :, : cut + 1]), "output changed when only the future changed"
    out[:, :, : cut + 1].sum().backward()
    for label, t in (("q", q), ("k", k), ("v", v)):
        assert t.grad is not None
        assert torch.all(t.grad[:, :, future] == 0), f"gradient leaks into future {label}"


@pytest.mark.parametrize("name", NAMES)
def test_gradients_are_finite(name: str) -> None:
    q, k, v = structured_qkv(B, H, ODD, ODD, D, seed=8, requires_grad=True)
    module = build(name)
    c = caps(name)
    kpm = random_padding(B, ODD, seed=8, min_real=3) if c.key_padding else None
    out = module(q, k, v, causal=c.causal, attention_mask=kpm)
    (out * torch.randn_like(out)).sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and torch.isfinite(t.grad).all()
    for p in module.parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_float64(name: str, causal: bool) -> None:
    if causal and not caps(name).causal:
        pytest.skip("no causal mode")
    module = build(name).double()
    q, k, v = structured_qkv(1, 2, 9, 9, 4, seed=9, dtype=torch.float64, requires_grad=True)
    kpm = torch.tensor([[True] * 7 + [False] * 2]) if caps(name).key_padding else None
    # fast_mode checks random projections u^T J v of the Jacobian against finite differences:
    # the same float64 check at a fraction of the cost of the full Jacobian.
    assert torch.autograd.gradcheck(
        lambda a, b, c: module(a, b, c, causal=causal, attention_mask=kpm),
        (q, k, v),
        eps=1e-6,
        atol=1e-5,
        fast_mode=True,
    )


@pytest.mark.parametrize("name", [n for n in NAMES if caps(n).decoding is not None])
@pytest.mark.parametrize("padded", [False, True])
def test_decoding_equals_recompute(name: str, padded: bool) -> None:
    if padded and not caps(name).key_padding:
        pytest.skip("no key padding")
    length = 3 * 11 + 2
    q, k, v = structured_qkv(B, H, length, length, D, seed=10)
    kpm = None
    if padded:
        kpm = torch.ones(B, length, dtype=torch.bool)
        kpm[1, :4] = False  # left padding, as in batched generation
    module = build(name)
    full = module(q, k, v, causal=True, attention_mask=kpm)
    state = module.new_state()
    pieces, start = [], 0
    for step in [0, 1, 1, 3, 0, 1, 5] + [1] * length:  # mixed chunk sizes (empty ones too), then token by token
        if start >= length:
            break
        stop = min(start + step, length)
        step_mask = kpm[:, start:stop] if kpm is not None else None
        pieces.append(
            module.decode(
                q[:, :, start:stop], k[:, :, start:stop], v[:, :, start:stop], state, attention_mask=step_mask
            )
        )
        start = stop
    assert [p.shape[2] for p in pieces[:7]] == [0, 1, 1, 3, 0, 1, 5]
    torch.testing.assert_close(torch.cat(pieces, dim=2), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name: str) -> None:
    torch.manual_seed(0)
    a = build(name)
    torch.manual_seed(1)
    b = build(name)
    b.load_state_dict(a.state_dict())
    q, k, v = structured_qkv(B, H, ODD, ODD, D, seed=11)
    assert torch.equal(a(q, k, v), b(q, k, v))


@pytest.mark.parametrize("name", NAMES)
def test_unsupported_requests_raise(name: str) -> None:
    c = caps(name)
    module = build(name)
    q, k, v = structured_qkv(1, 2, 12, 12, 8)
    if not c.causal:
        with pytest.raises(ValueError, match="causal"):
            module(q, k, v, causal=True)
    if not c.key_padding:
        with pytest.raises(ValueError, match="attention_mask"):
            module(q, k, v, attention_mask=torch.ones(1, 12, dtype=torch.bool))
    if not c.cross_attention:
        with pytest.raises(ValueError, match="same length"):
            module(q, k[:, :, :6], v[:, :, :6])
    if not c.score_bias:
        with pytest.raises(ValueError, match="score_bias"):
            module(q, k, v, score_bias=ALiBi(2).score_bias())
    if not c.custom_mask:
        with pytest.raises(ValueError, match="mask"):
            module(q, k, v, mask=attnkit.full_mask())
    if c.decoding is None:
        with pytest.raises(ValueError, match="decoding"):
            module.new_state()
    with pytest.raises(TypeError, match="not_an_option"):
        module(q, k, v, not_an_option=1)
    with pytest.raises(TypeError, match="not_an_option"):
        attnkit.build_attention(name, not_an_option=1)


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_names_the_argument(name: str) -> None:
    module = build(name)
    q, k, v = structured_qkv(2, 2, 12, 12, 8)
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        module(q[0], k, v)
    with pytest.raises(ValueError, match="k must have shape"):
        module(q, k[:, :1], v)
    with pytest.raises(ValueError, match="v must have shape"):
        module(q, k, v[:, :, :5])
    with pytest.raises(ValueError, match="one dtype"):
        module(q, k.double(), v)
    with pytest.raises(ValueError, match="head dim D of q and k must be > 0"):
        module(q[..., :0], k[..., :0], v)
    if caps(name).key_padding:
        real = torch.ones(2, 12, dtype=torch.bool)
        real[1, 9:] = False
        # PyTorch's other mask forms are refused, never reinterpreted, and the error says how to convert
        for other in (real.float(), torch.zeros(2, 12).masked_fill(~real, float("-inf")), real.long()):
            with pytest.raises(ValueError, match=r"attention_mask must have dtype torch\.bool.*mask == 0.*~key_pad"):
                module(q, k, v, attention_mask=other)
        with pytest.raises(ValueError, match=r"attention_mask must have shape \(B, S\) = \(2, 12\)"):
            module(q, k, v, attention_mask=torch.ones(2, 11, dtype=torch.bool))


@pytest.mark.parametrize("name", [n for n in NAMES if caps(n).score_bias])
@pytest.mark.parametrize("causal", [False, True])
def test_score_bias_matches_reference(name: str, causal: bool) -> None:
    if causal and not caps(name).causal:
        pytest.skip("no causal mode")
    q, k, v = structured_qkv(B, H, ODD, ODD, D, seed=12)
    bias = ALiBi(H).score_bias()
    module = build(name)
    out = module(q, k, v, causal=causal, score_bias=bias)
    pattern = module.pattern(ODD, ODD, causal=causal)
    ref = reference_attention(q, k, v, causal=causal, mask=pattern, score_bias=bias)
    check_close(name, out, ref)


@pytest.mark.parametrize("name", NAMES)
def test_pytorch_key_padding_mask_is_refused(name: str) -> None:
    """PyTorch's ``key_padding_mask`` means True = padding, attnkit's ``attention_mask`` True = real
    token: the PyTorch name must raise and say what to pass, never be accepted or routed on."""
    module = build(name)
    q, k, v = structured_qkv(2, 2, 12, 12, 8)
    padding = torch.zeros(2, 12, dtype=torch.bool)
    padding[1, 9:] = True
    explained = r"True = padding.*attention_mask.*True = a real token.*attention_mask=~key_padding_mask"
    with pytest.raises(TypeError, match=explained):
        module(q, k, v, key_padding_mask=padding)
    if caps(name).decoding is not None:
        with pytest.raises(TypeError, match=explained):
            module.decode(q, k, v, module.new_state(), key_padding_mask=padding)
        with pytest.raises(TypeError, match=r"unexpected keyword argument.*not_an_option"):
            module.decode(q, k, v, module.new_state(), not_an_option=1)


def empty_cases(name: str) -> list[tuple[int, int, int]]:
    """``(B, T, S)`` with nothing to attend: every mechanism takes T = S = 0 and an empty batch;
    cross-attention ones also a query block with no key (S = 0) and keys with no query (T = 0)."""
    cases = [(2, 0, 0), (0, 7, 7)]
    if caps(name).cross_attention:
        cases += [(2, 0, 7), (2, 7, 0)]
    return cases


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty_inputs_match_sdpa(name: str, dtype: torch.dtype) -> None:
    """Like SDPA: an empty output for T = 0 (or B = 0), zeros for queries with no key (S = 0),
    in the input dtype, and a backward pass with all-zero gradients."""
    module = build(name)
    for b, t_len, s_len in empty_cases(name):
        for causal in causal_modes(name):
            g = torch.Generator().manual_seed(t_len + s_len)
            q, k = (torch.randn(b, H, n, D, generator=g) for n in (t_len, s_len))
            v = torch.randn(b, H, s_len, D + 3, generator=g)  # Dv != D
            q, k, v = (x.to(dtype).requires_grad_() for x in (q, k, v))
            real = torch.ones(b, s_len, dtype=torch.bool) if caps(name).key_padding else None
            out = module(q, k, v, causal=causal, attention_mask=real)
            q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
            ref = F.scaled_dot_product_attention(q64, k64, v64)
            assert out.shape == ref.shape == (b, H, t_len, D + 3), (b, t_len, s_len)
            assert out.dtype == dtype
            assert torch.equal(out.double(), ref)  # empty, or exactly zero
            weights = torch.randn(out.shape, generator=g, dtype=torch.float64)
            (out.double() * weights).sum().backward()
            (ref * weights).sum().backward()
            for x, x64 in ((q, q64), (k, k64), (v, v64)):
                assert x.grad is not None and x.grad.dtype == dtype
                assert torch.equal(x.grad.double(), x64.grad)
