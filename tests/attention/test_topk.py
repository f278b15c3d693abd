"""`topk` beyond the contract: exact softmax over a brute-force top-k selection, exact limits, gradients.

The oracle for the selected set is a plain Python loop over float64 scores (ties broken by
the lower key index); the oracle for the output is ``reference_attention`` with that
selection materialized as a mask.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

import attnkit
import attnkit.attention.topk as topk_module
from attnkit.attention.reference import dense_score_bias, reference_attention
from attnkit.attention.topk import select_topk
from attnkit.core.types import ScoreBias
from attnkit.masks import Mask, causal_mask, materialize, sliding_window_mask
from attnkit.positions import ALiBi, T5RelativeBias
from tests.helpers import random_padding, relative_error, structured_qkv


def brute_force_selection(
    q: Tensor,
    k: Tensor,
    topk: int,
    *,
    causal: bool = False,
    attention_mask: Tensor | None = None,
    mask: Mask | None = None,
    score_bias: ScoreBias | None = None,
) -> tuple[Tensor, float]:
    """Each query's ``topk`` best visible keys by float64 score, one row at a time.

    Returns the selection as a bool ``(B, H, T, S)`` mask and the smallest gap between the
    last kept and the first dropped score over all rows (how far the inputs are from a tie).
    """
    b, h, t_len, d = q.shape
    s_len = k.shape[2]
    scores = q.double() @ k.double().transpose(-1, -2) / math.sqrt(d)
    if score_bias is not None:
        scores = scores + dense_score_bias(score_bias, h, t_len, s_len).double()
    visible = torch.ones(b, h, t_len, s_len, dtype=torch.bool)
    if causal:
        visible &= materialize(causal_mask(t_len, s_len), 1, 1, t_len, s_len)
    if attention_mask is not None:
        visible &= attention_mask[:, None, None, :]
    if mask is not None:
        visible &= materialize(mask, b, h, t_len, s_len)
    selected = torch.zeros_like(visible)
    gap = math.inf
    for bi in range(b):
        for hi in range(h):
            for i in range(t_len):
                row = scores[bi, hi, i].tolist()
                ranked = sorted((j for j in range(s_len) if visible[bi, hi, i, j]), key=lambda j: (-row[j], j))
                for j in ranked[:topk]:
                    selected[bi, hi, i, j] = True
                if len(ranked) > topk:
                    gap = min(gap, row[ranked[topk - 1]] - row[ranked[topk]])
    return selected, gap


def selected_oracle(q: Tensor, k: Tensor, v: Tensor, topk: int, **kwargs: object) -> Tensor:
    """float64 softmax attention over the brute-force selection (asserting no near-ties)."""
    selected, gap = brute_force_selection(q, k, topk, **kwargs)  # type: ignore[arg-type]
    assert gap > 1e-4, f"inputs too close to a tie for a fair comparison (gap {gap:.2g})"
    return reference_attention(
        q,
        k,
        v,
        causal=bool(kwargs.get("causal", False)),
        attention_mask=kwargs.get("attention_mask"),  # type: ignore[arg-type]
        mask=selected,
        score_bias=kwargs.get("score_bias"),  # type: ignore[arg-type]
    )


@pytest.fixture(params=["dense", "gather"])
def products(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the per-chunk products as dense GEMMs, then as row gathers/scatters."""
    monkeypatch.setattr(topk_module, "_DENSE_RATIO", 10**9 if request.param == "dense" else 0)
    return str(request.param)


def random_qkv(
    t_len: int,
    s_len: int,
    *,
    seed: int,
    dtype: torch.dtype = torch.float32,
    batch: int = 2,
    heads: int = 3,
    dim: int = 8,
) -> tuple[Tensor, Tensor, Tensor]:
    """i.i.d. normal ``q (B, H, T, D)``, ``k, v (B, H, S, D)``: scores without ties (almost surely)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (
        torch.randn(batch, heads, n, dim, generator=g, dtype=torch.float64).to(dtype) for n in (t_len, s_len, s_len)
    )
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("lengths", [(23, 23), (9, 31), (31, 9)])
def test_exact_softmax_over_the_selected_keys(
    dtype: torch.dtype, causal: bool, padded: bool, lengths: tuple[int, int], products: str
) -> None:
    t_len, s_len = lengths
    q, k, v = random_qkv(t_len, s_len, seed=t_len * 100 + s_len)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    kpm = random_padding(2, s_len, seed=3, min_real=s_len // 2) if padded else None
    topk = 7
    module = attnkit.build_attention("topk", topk=topk, chunk_size=5)  # several chunks, a ragged last one
    out = module(q, k, v, causal=causal, attention_mask=kpm)
    ref = selected_oracle(q, k, v, topk, causal=causal, attention_mask=kpm)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=0)


def test_selected_indices_equal_the_brute_force_sets() -> None:
    q, k, _ = random_qkv(19, 26, seed=5, dtype=torch.float64)
    kpm = random_padding(2, 26, seed=5, min_real=10)
    logits, idx = select_topk(q, k, 6, scale=1 / math.sqrt(8), causal=True, attention_mask=kpm, chunk=4)
    selected, gap = brute_force_selection(q, k, 6, causal=True, attention_mask=kpm)
    assert gap > 1e-4
    kept = torch.zeros_like(selected)
    kept.scatter_(-1, idx, torch.isfinite(logits))  # slots past the visible keys carry -inf
    assert torch.equal(kept, selected)


def test_fewer_visible_keys_than_topk_gives_exact_attention() -> None:
    # topk < S but every query sees at most 6 keys: nothing is dropped
    q, k, v = structured_qkv(2, 2, 17, 17, 8, seed=2)
    kpm = torch.zeros(2, 17, dtype=torch.bool)
    kpm[:, [1, 4, 5, 9, 13, 16]] = True
    out = attnkit.build_attention("topk", topk=10)(q, k, v, attention_mask=kpm)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, attention_mask=kpm), atol=1e-5, rtol=0)


@pytest.mark.parametrize("extra", [0, 5])
@pytest.mark.parametrize("causal", [False, True])
def test_topk_at_least_the_key_length_is_full_attention(extra: int, causal: bool) -> None:
    q, k, v = structured_qkv(2, 3, 21, 21, 8, seed=4)
    kpm = random_padding(2, 21, seed=4, min_real=8)
    out = attnkit.build_attention("topk", topk=21 + extra)(q, k, v, causal=causal, attention_mask=kpm)
    full = attnkit.build_attention("full")(q, k, v, causal=causal, attention_mask=kpm)
    assert torch.equal(out, full)
    ref = reference_attention(q, k, v, causal=causal, attention_mask=kpm)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


def test_error_shrinks_as_topk_grows() -> None:
    q, k, v = structured_qkv(1, 4, 64, 64, 16, seed=6)
    ref = reference_attention(q, k, v)
    errors = [relative_error(attnkit.build_attention("topk", topk=n)(q, k, v), ref) for n in (2, 8, 32, 63)]
    assert all(a > b for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 1e-2 and errors[0] > 0.1


@pytest.mark.parametrize("causal", [False, True])
def test_score_bias_enters_the_selection(causal: bool) -> None:
    q, k, v = random_qkv(15, 15, seed=8)
    bias = ALiBi(3).score_bias()
    out = attnkit.build_attention("topk", topk=4)(q, k, v, causal=causal, score_bias=bias)
    ref = selected_oracle(q, k, v, 4, causal=causal, score_bias=bias)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


def test_custom_mask_and_rows_with_no_visible_key() -> None:
    q, k, v = random_qkv(20, 20, seed=9)
    window = sliding_window_mask(20, 20, 7, causal=False)
    blocked = Mask(lambda b, h, i, j: i != 3, "row 3 sees nothing")
    mask = window & blocked
    out = attnkit.build_attention("topk", topk=4, chunk_size=6)(q, k, v, mask=mask)
    ref = selected_oracle(q, k, v, 4, mask=mask)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3]))


def test_causal_queries_before_the_first_key_get_zeros() -> None:
    q, k, v = random_qkv(12, 8, seed=10)
    out = attnkit.build_attention("topk", topk=3, chunk_size=3)(q, k, v, causal=True)
    assert torch.equal(out[:, :, :4], torch.zeros_like(out[:, :, :4]))
    torch.testing.assert_close(out.double(), selected_oracle(q, k, v, 3, causal=True), atol=1e-5, rtol=0)


def test_ties_keep_an_exact_softmax() -> None:
    # keys 2 and 5 tie exactly (same key, same value): whichever is kept, the output is the same
    q, k, v = random_qkv(6, 9, seed=11, batch=1, heads=1)
    k[..., 5, :], v[..., 5, :] = k[..., 2, :], v[..., 2, :]
    scores = (q.double() @ k.double().transpose(-1, -2))[0, 0]
    # in query 0's row, keep every key scoring above the pair and exactly one of the two
    topk = int((scores[0] >= scores[0, 2]).sum()) - 1
    assert topk >= 1 and scores[0, 2] == scores[0, 5]
    out = attnkit.build_attention("topk", topk=topk)(q, k, v)
    selected, _ = brute_force_selection(q, k, topk)  # lower index wins: keeps 2, drops 5 where only one fits
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, mask=selected), atol=1e-5, rtol=0)


def test_chunk_size_does_not_change_the_result(products: str) -> None:
    q, k, v = structured_qkv(2, 2, 29, 29, 8, seed=12)
    outs = [attnkit.build_attention("topk", topk=5, chunk_size=c)(q, k, v, causal=True) for c in (1, 4, 29, 1000)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_gradients_equal_the_oracle_over_the_selection(causal: bool, products: str) -> None:
    q, k, v = (t.requires_grad_(True) for t in random_qkv(13, 13, seed=13, dtype=torch.float64))
    kpm = random_padding(2, 13, seed=13, min_real=7)
    out = attnkit.build_attention("topk", topk=4, chunk_size=5)(q, k, v, causal=causal, attention_mask=kpm)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    selected, gap = brute_force_selection(q, k, 4, causal=causal, attention_mask=kpm)
    assert gap > 1e-4
    ref = reference_attention(q, k, v, causal=causal, attention_mask=kpm, mask=selected)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_with_keys_dropped(causal: bool, products: str) -> None:
    q, k, v = (t.requires_grad_(True) for t in random_qkv(6, 9, seed=14, dtype=torch.float64, batch=1, heads=1, dim=4))
    kpm = torch.tensor([[True] * 7 + [False] * 2])
    module = attnkit.build_attention("topk", topk=3, chunk_size=3)
    assert torch.autograd.gradcheck(
        lambda a, b, c: module(a, b, c, causal=causal, attention_mask=kpm), (q, k, v), eps=1e-6, atol=1e-6
    )


def test_learned_bias_gets_the_oracle_gradient(products: str) -> None:
    q, k, v = random_qkv(11, 11, seed=15, dtype=torch.float64)
    t5 = T5RelativeBias(3, num_buckets=8, max_distance=8).double()
    with torch.no_grad():
        t5.bias.weight.normal_(std=1.0)  # large enough to change which keys are selected
    bias = t5.score_bias()
    out = attnkit.build_attention("topk", topk=4, chunk_size=4)(q, k, v, causal=True, score_bias=bias)
    (got,) = torch.autograd.grad(out.square().sum(), t5.bias.weight)
    selected, gap = brute_force_selection(q, k, 4, causal=True, score_bias=bias)
    assert gap > 1e-4
    ref = reference_attention(q, k, v, causal=True, mask=selected, score_bias=bias)
    (want,) = torch.autograd.grad(ref.square().sum(), t5.bias.weight)
    assert want.abs().sum() > 0
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


@pytest.mark.parametrize("cut", [3, 17])
def test_causality_is_exact_in_both_product_modes(cut: int, products: str) -> None:
    q, k, v = (t.requires_grad_(True) for t in structured_qkv(2, 2, 23, 23, 8, seed=17))
    module = attnkit.build_attention("topk", topk=5, chunk_size=7)
    out = module(q, k, v, causal=True)
    future = torch.arange(23) > cut
    with torch.no_grad():
        q2, k2, v2 = (torch.where(future[None, None, :, None], 7.0 * torch.randn_like(t), t) for t in (q, k, v))
    assert torch.equal(module(q2, k2, v2, causal=True)[:, :, : cut + 1], out[:, :, : cut + 1])
    out[:, :, : cut + 1].sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and torch.all(t.grad[:, :, future] == 0)


def largest_allocation(fn: Callable[[], None]) -> int:
    """The largest single CPU allocation, in bytes, made while ``fn`` runs."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(event.cpu_memory_usage for event in prof.events())


@pytest.mark.parametrize("causal", [False, True])
def test_never_allocates_the_score_matrix(causal: bool, products: str) -> None:
    """The largest buffer is one chunk's scores (chunk x S), never the T x S matrix, forward or backward."""
    length, chunk = 1024, 128
    q, k, v = (torch.randn(1, 1, length, 8).requires_grad_(True) for _ in range(3))
    score_matrix = length * length * 4  # float32 bytes

    def step(module: attnkit.AttentionMechanism) -> Callable[[], None]:
        return lambda: module(q, k, v, causal=causal).sum().backward()

    # the probe sees a T x S allocation when there is one
    assert largest_allocation(step(attnkit.build_attention("full", backend="eager"))) >= score_matrix
    topk = attnkit.build_attention("topk", topk=16, chunk_size=chunk)
    assert largest_allocation(step(topk)) <= 2 * chunk * length * 4 <= score_matrix // 4


def test_decoding_with_a_bias_equals_recompute() -> None:
    q, k, v = structured_qkv(2, 3, 20, 20, 8, seed=16)
    bias = ALiBi(3).score_bias()
    module = attnkit.build_attention("topk", topk=5)
    full = module(q, k, v, causal=True, score_bias=bias)
    state = module.new_state()
    steps = [
        module.decode(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], state, score_bias=bias)
        for i in range(20)
    ]
    torch.testing.assert_close(torch.cat(steps, dim=2), full, atol=1e-5, rtol=1e-5)


def test_multi_head_module_with_topk() -> None:
    torch.manual_seed(0)
    mha = attnkit.MultiHeadAttention(32, 4, attention="topk", topk=6)
    x = torch.randn(2, 25, 32, requires_grad=True)
    y = mha(x, causal=True)
    assert y.shape == (2, 25, 32)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"topk": 0}, "topk must be a positive integer, got 0"),
        ({"topk": 2.5}, "topk must be a positive integer, got 2.5"),
        ({"topk": True}, "topk must be a positive integer, got True"),
        ({"chunk_size": -4}, "chunk_size must be a positive integer, got -4"),
        ({"scale": 0.0}, "scale must be a positive number"),
    ],
)
def test_bad_options_name_the_argument(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        attnkit.build_attention("topk", **options)


def test_capabilities_are_declared_honestly() -> None:
    caps = attnkit.attention_capabilities("topk")
    assert not caps.exact and caps.family == "sparse" and caps.error_budget is not None
    assert caps.causal and caps.key_padding and caps.cross_attention and caps.score_bias and caps.custom_mask
    assert caps.decoding == "kv_cache"
