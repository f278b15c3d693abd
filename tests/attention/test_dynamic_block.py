"""`dynamic_block` (MoBA) against references written here, from the paper's definition.

The references are brute force in float64: block means and gate queries by explicit loops, the
top-k by sorting each row's candidates, the block mask element by element, and dense softmax
attention (with autograd) over that mask. The module's gate is only asked which blocks it chose.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

import attnkit
from attnkit.attention.dynamic_block import DynamicBlockAttention
from tests.helpers import random_padding

B, H, D = 2, 2, 8


def make_qkv(length: int, *, seed: int, requires_grad: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, length, D, generator=g).requires_grad_(requires_grad) for _ in range(3))  # type: ignore[return-value]


def build(block_size: int, topk_blocks: int, *, learned: bool = False, seed: int = 0) -> DynamicBlockAttention:
    if not learned:
        module = attnkit.build_attention("dynamic_block", block_size=block_size, topk_blocks=topk_blocks)
        assert isinstance(module, DynamicBlockAttention)
        return module
    module = DynamicBlockAttention(
        block_size=block_size, topk_blocks=topk_blocks, gate="learned", head_dim=D, scorer_dim=5
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # away from the identity start, so the test sees a real learned gate
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return module


# -- the references ------------------------------------------------------------------------


def brute_gate(
    q: Tensor, k: Tensor, size: int, causal: bool, real: Tensor | None, scorer: tuple[Tensor, Tensor] | None
) -> tuple[Tensor, Tensor]:
    """float64 gate scores ``(B, H, G, N)`` and candidate mask, by loops over the definition."""
    q, k = q.detach().double(), k.detach().double()
    length = q.shape[2]
    blocks = -(-length // size)
    gate_q = torch.zeros(B, H, blocks, D, dtype=torch.float64)
    key_mean = torch.zeros(B, H, blocks, D, dtype=torch.float64)
    has_real = torch.zeros(B, blocks, dtype=torch.bool)
    for j in range(blocks):
        span = range(j * size, min(length, (j + 1) * size))
        gate_q[:, :, j] = q[:, :, j * size] if causal else q[:, :, list(span)].mean(dim=2)
        for b in range(B):
            keys = [p for p in span if real is None or bool(real[b, p])]
            if keys:
                has_real[b, j] = True
                key_mean[b, :, j] = k[b, :, keys].mean(dim=1)
    if scorer is None:
        scores = gate_q @ key_mean.transpose(-1, -2)
    else:
        w_q, w_k = scorer
        scores = (gate_q @ w_q) @ (key_mean @ w_k).transpose(-1, -2) / math.sqrt(w_q.shape[1])
    candidate = torch.zeros(B, H, blocks, blocks, dtype=torch.bool)
    for g in range(blocks):
        for j in range(blocks):
            candidate[:, :, g, j] = (j < g if causal else j != g) & has_real[:, j, None]
    return scores, candidate


def brute_topk(scores: Tensor, candidate: Tensor, topk: int) -> list[list[list[set[int]]]]:
    """Per ``[b][h][g]`` the set of the ``topk`` highest-scoring candidate blocks (sorted, not torch.topk)."""
    chosen = []
    for b in range(B):
        per_head = []
        for h in range(H):
            rows = []
            for g in range(scores.shape[2]):
                cands = [j for j in range(scores.shape[3]) if candidate[b, h, g, j]]
                cands.sort(key=lambda j: -float(scores[b, h, g, j]))
                rows.append(set(cands[:topk]))
            per_head.append(rows)
        chosen.append(per_head)
    return chosen


def block_mask(chosen: list[list[list[set[int]]]], length: int, size: int, causal: bool, real: Tensor | None) -> Tensor:
    """bool ``(B, H, T, T)``: query ``i`` sees key ``j`` iff ``j``'s block is ``i``'s own (``j <= i`` when
    causal) or chosen for ``i``'s block, and ``j`` is a real token."""
    mask = torch.zeros(B, H, length, length, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for i in range(length):
                for j in range(length):
                    own = j // size == i // size and (j <= i or not causal)
                    mask[b, h, i, j] = own or j // size in chosen[b][h][i // size]
    if real is not None:
        mask &= real[:, None, None, :]
    return mask


def dense(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, bias: Tensor | None = None) -> Tensor:
    """float64 softmax attention over ``mask``; rows with nothing visible give zeros."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.nan_to_num(weights, nan=0.0) @ v


def chosen_by_module(
    module: DynamicBlockAttention, q: Tensor, k: Tensor, causal: bool, real: Tensor | None
) -> list[list[list[set[int]]]]:
    _, selected = module.select(q, k, causal=causal, attention_mask=real)
    return [[[{j for j in row if j >= 0} for row in head] for head in batch] for batch in selected.tolist()]


def scorer64(module: DynamicBlockAttention) -> tuple[Tensor, Tensor] | None:
    if module.query_scorer is None or module.key_scorer is None:
        return None
    return module.query_scorer.detach().double(), module.key_scorer.detach().double()


CASES = [  # (length, block_size, topk_blocks): partial last blocks, fewer candidates than k early on
    (45, 6, 3),
    (40, 8, 2),
    (23, 5, 1),
]


@pytest.mark.parametrize("learned", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_selection_equals_brute_force_topk(
    case: tuple[int, int, int], causal: bool, padded: bool, learned: bool
) -> None:
    length, size, topk = case
    q, k, _ = make_qkv(length, seed=length + size)
    real = random_padding(B, length, seed=size, min_real=length // 2) if padded else None
    module = build(size, topk, learned=learned)
    scores, candidate = brute_gate(q, k, size, causal, real, scorer64(module))
    expected = brute_topk(scores, candidate, topk)
    assert chosen_by_module(module, q, k, causal, real) == expected
    assert any(len(row) == topk for batch in expected for head in batch for row in head)  # the case selects


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_output_and_gradients_equal_dense_float64_over_the_block_mask(
    case: tuple[int, int, int], causal: bool, padded: bool
) -> None:
    length, size, topk = case
    q, k, v = make_qkv(length, seed=3 * length, requires_grad=True)
    real = random_padding(B, length, seed=length, min_real=length // 2) if padded else None
    module = build(size, topk)
    scores, candidate = brute_gate(q, k, size, causal, real, None)
    mask = block_mask(brute_topk(scores, candidate, topk), length, size, causal, real)
    assert not mask.all(), "the case must drop some keys"
    out = module(q, k, v, causal=causal, attention_mask=real)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = dense(q64, k64, v64, mask)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (out.double() * weights).sum().backward()
    (ref * weights).sum().backward()
    for label, t, t64 in (("q", q, q64), ("k", k, k64), ("v", v, v64)):
        assert t.grad is not None and t64.grad is not None
        torch.testing.assert_close(t.grad.double(), t64.grad, atol=1e-5, rtol=0, msg=f"d{label}")


@pytest.mark.parametrize("causal", [False, True])
def test_learned_scorer_gradients_equal_dense_float64_straight_through(causal: bool) -> None:
    """The scorer's gradient is that of the selected blocks' scores added to their keys' logits at value 0."""
    length, size, topk = 45, 6, 3
    q, k, v = make_qkv(length, seed=11, requires_grad=True)
    real = random_padding(B, length, seed=2, min_real=30)
    module = build(size, topk, learned=True, seed=5).train()
    w_q, w_k = (p.detach().double().requires_grad_() for p in (module.query_scorer, module.key_scorer))  # type: ignore[union-attr]
    scores, candidate = brute_gate(q, k, size, causal, real, (w_q, w_k))  # scores carry the scorer's graph
    chosen = brute_topk(scores.detach(), candidate, topk)
    mask = block_mask(chosen, length, size, causal, real)
    block_of = torch.arange(length) // size
    bias = torch.zeros(B, H, length, length, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for g, blocks in enumerate(chosen[b][h]):
                for j in blocks:
                    rows, cols = block_of == g, block_of == j
                    term = scores[b, h, g, j] - scores[b, h, g, j].detach()
                    bias[b, h] = bias[b, h] + term * (rows[:, None] & cols[None, :])
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = dense(q64, k64, v64, mask, bias)
    out = module(q, k, v, causal=causal, attention_mask=real)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (out.double() * weights).sum().backward()
    (ref * weights).sum().backward()
    pairs = [
        ("q", q, q64),
        ("k", k, k64),
        ("v", v, v64),
        ("query_scorer", module.query_scorer, w_q),
        ("key_scorer", module.key_scorer, w_k),
    ]
    for label, t, t64 in pairs:
        assert t is not None and t.grad is not None and t64.grad is not None
        torch.testing.assert_close(t.grad.double(), t64.grad, atol=1e-5, rtol=0, msg=f"d{label}")
    assert module.query_scorer is not None and module.query_scorer.grad is not None
    assert module.query_scorer.grad.abs().max() > 1e-3, "the scorer must receive a gradient"


@pytest.mark.parametrize("learned", [False, True])
@pytest.mark.parametrize("cut", [0, 9, 13, 26])
def test_causality_by_perturbation_and_gradients(cut: int, learned: bool) -> None:
    """Mid-block cuts too: later queries of the cut's own block must not steer its selection."""
    length, size = 33, 6
    q, k, v = make_qkv(length, seed=7, requires_grad=True)
    module = build(size, 2, learned=learned).train()
    out = module(q, k, v, causal=True)
    future = torch.arange(length) > cut
    with torch.no_grad():
        q2, k2, v2 = (torch.where(future[None, None, :, None], 9.0 * torch.randn_like(t), t) for t in (q, k, v))
    assert torch.equal(module(q2, k2, v2, causal=True)[:, :, : cut + 1], out[:, :, : cut + 1])
    out[:, :, : cut + 1].sum().backward()
    for label, t in (("q", q), ("k", k), ("v", v)):
        assert t.grad is not None and bool((t.grad[:, :, future] == 0).all()), f"gradient leaks into future {label}"


@pytest.mark.parametrize("learned", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_exact_limit_equals_full_attention(causal: bool, learned: bool) -> None:
    length, size = 29, 4  # 8 blocks
    q, k, v = make_qkv(length, seed=4, requires_grad=True)
    real = random_padding(B, length, seed=4, min_real=12)
    module = build(size, 8, learned=learned)
    out = module(q, k, v, causal=causal, attention_mask=real)
    visible = real[:, None, None, :].expand(B, H, length, length)
    if causal:
        visible = visible & torch.ones(length, length, dtype=torch.bool).tril()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = dense(q64, k64, v64, visible)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    out.double().square().sum().backward()
    ref.square().sum().backward()
    for t, t64 in ((q, q64), (k, k64), (v, v64)):
        assert t.grad is not None and t64.grad is not None
        torch.testing.assert_close(t.grad.double(), t64.grad, atol=1e-5, rtol=0)


def test_padded_keys_never_reach_the_gate() -> None:
    """Huge padded keys would dominate a block mean that counted them; they change nothing."""
    length, size = 40, 5
    q, k, v = make_qkv(length, seed=8)
    real = random_padding(B, length, seed=8, min_real=20)
    module = build(size, 2)
    base = module(q, k, v, causal=True, attention_mask=real)
    pad = ~real[:, None, :, None]
    k2 = torch.where(pad, 1e3 * torch.randn_like(k), k)
    v2 = torch.where(pad, 1e3 * torch.randn_like(v), v)
    assert torch.equal(
        module.select(q, k2, causal=True, attention_mask=real)[1],
        module.select(q, k, causal=True, attention_mask=real)[1],
    )
    torch.testing.assert_close(module(q, k2, v2, causal=True, attention_mask=real), base, atol=1e-6, rtol=0)


@pytest.mark.parametrize("learned", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_cached_decoding_equals_recompute(learned: bool, padded: bool) -> None:
    length, size = 31, 4
    q, k, v = make_qkv(length, seed=9)
    real = None
    if padded:
        real = torch.ones(B, length, dtype=torch.bool)
        real[1, :5] = False  # left padding, as in batched generation
    module = build(size, 2, learned=learned).eval()
    full = module(q, k, v, causal=True, attention_mask=real)
    state = module.new_state()
    pieces, start = [], 0
    for step in [3, 2, 6, 1, 5, 7] + [1] * length:  # chunks that start and end mid-block, then token by token
        stop = min(start + step, length)
        if start >= stop:
            break
        mask = real[:, start:stop] if real is not None else None
        pieces.append(
            module.decode(q[:, :, start:stop], k[:, :, start:stop], v[:, :, start:stop], state, attention_mask=mask)
        )
        start = stop
    torch.testing.assert_close(torch.cat(pieces, dim=2), full, atol=1e-5, rtol=1e-5)


def test_bad_options_name_the_argument() -> None:
    with pytest.raises(ValueError, match="block_size"):
        attnkit.build_attention("dynamic_block", block_size=0)
    with pytest.raises(ValueError, match="topk_blocks"):
        attnkit.build_attention("dynamic_block", topk_blocks=-1)
    with pytest.raises(ValueError, match="gate"):
        attnkit.build_attention("dynamic_block", gate="random")
    with pytest.raises(ValueError, match=r"head_dim.*gate='learned'"):
        attnkit.build_attention("dynamic_block", head_dim=8)
    with pytest.raises(ValueError, match="needs head_dim"):
        attnkit.build_attention("dynamic_block", gate="learned")
    module = attnkit.build_attention("dynamic_block", gate="learned", head_dim=16, block_size=4, topk_blocks=1)
    q, k, v = make_qkv(12, seed=0)
    with pytest.raises(ValueError, match=r"head_dim=16.*D=8"):
        module(q, k, v)
