"""`nsa` (Native Sparse Attention) against references written here, from the paper's definition.

The reference is brute force in float64: each compressed key/value summed by hand over its block's
real positions, the dense softmax over the compressed blocks a query may see, each selection block's
importance summed over the compressed blocks whose span overlaps it (interval by interval), the top
blocks by sorting each row's candidates, the selected-block and window masks element by element,
dense softmax attention over them and the gated mix, all with autograd for the gradients of the
inputs and of the gate and compression parameters. The module is only asked for its outputs, its
gradients and which blocks it chose.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor

import attnkit
import attnkit.kernels.nsa as nsa_kernels
from attnkit.attention.nsa import NativeSparseAttention
from attnkit.attention.reference import reference_attention
from tests.helpers import random_padding

B, H, D = 2, 2, 8
LENGTH = 29  # not a multiple of any block, stride or window below

#: (compress_block, compress_stride, select_block, select_blocks, window)
SIZES = [(4, 2, 4, 3, 5), (6, 3, 6, 4, 4), (4, 4, 8, 2, 3)]


def make_qkv(length: int = LENGTH, *, seed: int, requires_grad: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, length, D, generator=g).requires_grad_(requires_grad) for _ in range(3))  # type: ignore[return-value]


def build(
    sizes: tuple[int, ...], *, seed: int = 0, learned: bool = True, selection: str = "query"
) -> NativeSparseAttention:
    block, d, l_sel, n, w = sizes
    module = NativeSparseAttention(
        compress_block=block,
        compress_stride=d,
        select_block=l_sel,
        select_blocks=n,
        window=w,
        selection=selection,
        head_dim=D if learned else None,
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # away from the mean/zero start, so the test sees real learned parameters
        for p in module.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    return module


def params64(module: NativeSparseAttention) -> dict[str, Tensor]:
    """float64 leaf copies of the module's parameters, for the reference's autograd."""
    return {name: p.detach().double().requires_grad_() for name, p in module.named_parameters()}


# -- the reference ---------------------------------------------------------------------------


def dense(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor) -> tuple[Tensor, Tensor]:
    """float64 softmax attention over a bool ``allowed (B, H|1, T, S)``; rows with nothing give zeros.
    Returns the output and the probabilities."""
    scores = (q @ k.transpose(-1, -2)) / D**0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return probs @ v, probs


def brute_nsa(
    module: NativeSparseAttention,
    params: dict[str, Tensor],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    real: Tensor | None,
) -> dict[str, object]:
    """Every piece of NSA in float64, by loops over the definition."""
    block, d, l_sel, n, w = (
        module.compress_block,
        module.compress_stride,
        module.select_block,
        module.select_blocks,
        module.window,
    )
    q, k, v = q.double(), k.double(), v.double()
    length = q.shape[2]
    real = torch.ones(B, length, dtype=torch.bool) if real is None else real
    # 1. compressed blocks
    starts = [m * d for m in range(length)] if not causal else [m * d for m in range(length) if m * d + block <= length]
    starts = [s for s in starts if s < length]
    c_keys, c_values, c_real = [], [], []
    for s in starts:
        key_sum = torch.zeros(B, H, D, dtype=torch.float64)
        value_sum = torch.zeros(B, H, D, dtype=torch.float64)
        for u in range(block):
            if s + u >= length:
                continue
            keep = real[:, s + u].double()[:, None, None]
            position = params["key_position"][u] if "key_position" in params else 0.0
            key_sum = key_sum + keep * params["key_pool"][u] * (k[:, :, s + u] + position)
            value_sum = value_sum + keep * params["value_pool"][u] * v[:, :, s + u]
        c_keys.append(key_sum)
        c_values.append(value_sum)
        c_real.append(real[:, s : s + block].any(dim=1))
    m_count = len(starts)
    ck = torch.stack(c_keys, dim=2) if c_keys else torch.zeros(B, H, 0, D, dtype=torch.float64)
    cv = torch.stack(c_values, dim=2) if c_values else torch.zeros(B, H, 0, D, dtype=torch.float64)
    visible = torch.zeros(B, 1, length, m_count, dtype=torch.bool)
    for i in range(length):
        for m, s in enumerate(starts):
            visible[:, 0, i, m] = c_real[m] & (not causal or s + block - 1 <= i)
    out_c, probs = dense(q, ck, cv, visible)
    # 2. selection: importance by interval overlap, top by sorting (ties: the later block)
    blocks = -(-length // l_sel)
    importance = torch.zeros(B, H, length, blocks, dtype=torch.float64)
    for j in range(blocks):
        for m, s in enumerate(starts):
            if s < (j + 1) * l_sel and s + block > j * l_sel:
                importance[..., j] += probs[..., m].detach()
    chosen: dict[tuple[int, int, int], set[int]] = {}
    selected = torch.zeros(B, H, length, length, dtype=torch.bool)
    for b in range(B):
        has_real = [bool(real[b, j * l_sel : (j + 1) * l_sel].any()) for j in range(blocks)]
        for h in range(H):
            for i in range(length):
                own = i // l_sel
                others = [j for j in range(blocks) if j != own and has_real[j] and (not causal or j < own)]
                # block 0 first (always attended when it holds a real key), then by importance, ties: later
                ranked = sorted(others, key=lambda j: (j != 0, -float(importance[b, h, i, j]), -j))
                chosen[(b, h, i)] = {own} | set(ranked[: n - 1])
    if module.selection == "block":  # every query of a block attends what the block's first query chose
        chosen = {(b, h, g): chosen[(b, h, g * l_sel)] for b in range(B) for h in range(H) for g in range(blocks)}
    for b, h, i in itertools.product(range(B), range(H), range(length)):
        picked = chosen[(b, h, i // l_sel if module.selection == "block" else i)]
        for j in range(length):
            selected[b, h, i, j] = (j // l_sel in picked) and bool(real[b, j]) and (not causal or j <= i)
    out_s, _ = dense(q, k, v, selected)
    # 3. sliding window
    i_pos = torch.arange(length)[:, None]
    j_pos = torch.arange(length)[None, :]
    near = (j_pos <= i_pos) & (j_pos > i_pos - w) if causal else (i_pos - j_pos).abs() <= w // 2
    out_w, _ = dense(q, k, v, near[None, None] & real[:, None, None, :])
    # gates
    logits = params["gate_bias"] + (q @ params["gate_weight"] if "gate_weight" in params else 0.0)
    gates = torch.sigmoid(logits).expand(B, H, length, 3)
    out = gates[..., 0:1] * out_c + gates[..., 1:2] * out_s + gates[..., 2:3] * out_w
    return {"out": out, "branches": (out_c, out_s, out_w), "chosen": chosen}


def chosen_by_module(blocks: Tensor) -> dict[tuple[int, int, int], set[int]]:
    return {
        (b, h, i): {int(j) for j in blocks[b, h, i] if j >= 0}
        for b in range(blocks.shape[0])
        for h in range(blocks.shape[1])
        for i in range(blocks.shape[2])
    }


def run_branches(module: NativeSparseAttention, q: Tensor, k: Tensor, v: Tensor, causal: bool, real: Tensor | None):
    compressed = module.compress(k, v, real, causal=causal)
    return module.branches(q, k, v, compressed, causal=causal, attention_mask=real)


# -- the tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("selection", ["query", "block"])
def test_branches_selection_and_mix_equal_brute_force(
    sizes: tuple[int, ...], causal: bool, padded: bool, selection: str
) -> None:
    """Each branch, the chosen blocks and the gated output against the float64 brute force (module in float32)."""
    module = build(sizes, seed=1, selection=selection)
    q, k, v = make_qkv(seed=2)
    real = random_padding(B, LENGTH, seed=3, min_real=LENGTH // 2) if padded else None
    ref = brute_nsa(module, params64(module), q, k, v, causal=causal, real=real)
    with torch.no_grad():
        *branches, blocks = run_branches(module, q, k, v, causal, real)
        out = module(q, k, v, causal=causal, attention_mask=real)
    assert chosen_by_module(blocks) == ref["chosen"]
    for name, mine, theirs in zip(("compressed", "selected", "window"), branches, ref["branches"]):  # type: ignore[arg-type]
        err = (mine.double() - theirs).abs().max().item()
        assert err <= 1e-5, f"{name} branch: max abs error {err:.3g}"
    assert (out.double() - ref["out"]).abs().max().item() <= 1e-5  # type: ignore[operator]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sizes", [(4, 2, 4, 4, 3), (16, 4, 4, 3, 3)])
def test_selection_equals_brute_force_topk_in_float64(causal: bool, sizes: tuple[int, ...]) -> None:
    """At float64, on longer rows with many candidates, the chosen blocks equal a sorted top-k.

    With 16-key compressed blocks over 4-key selection blocks, several candidates are covered by the
    same visible compressed blocks (or by none) and tie exactly: the later block must win (the second
    sizes exist for that)."""
    module = build(sizes, seed=4).double()
    q, k, v = (x.double() for x in make_qkv(length=61, seed=5))
    with torch.no_grad():
        *_, blocks = run_branches(module, q, k, v, causal, None)
    ref = brute_nsa(module, params64(module), q, k, v, causal=causal, real=None)
    assert chosen_by_module(blocks) == ref["chosen"]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk_scores", [None, 40])
@pytest.mark.parametrize("selection", ["query", "block"])
def test_gradients_equal_dense_float64_autograd(
    causal: bool, chunk_scores: int | None, selection: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gradients of q, k, v, the gates and the compression; ``chunk_scores`` forces many compressed chunks."""
    if chunk_scores is not None:
        monkeypatch.setattr(nsa_kernels, "_CHUNK_SCORES", chunk_scores)
    module = build(SIZES[0], seed=6, selection=selection).double()
    real = random_padding(B, LENGTH, seed=7, min_real=LENGTH // 2)
    q, k, v = (x.double().requires_grad_() for x in make_qkv(seed=8))
    weights = torch.randn(B, H, LENGTH, D, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    (module(q, k, v, causal=causal, attention_mask=real) * weights).sum().backward()
    params = params64(module)
    q2, k2, v2 = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = brute_nsa(module, params, q2, k2, v2, causal=causal, real=real)["out"]
    (out * weights).sum().backward()  # type: ignore[operator]
    for label, mine, theirs in (("q", q, q2), ("k", k, k2), ("v", v, v2)):
        assert mine.grad is not None and theirs.grad is not None
        torch.testing.assert_close(mine.grad, theirs.grad, atol=1e-9, rtol=1e-7, msg=label)
    for name, p in module.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), f"no gradient reaches {name}"
        torch.testing.assert_close(p.grad, params[name].grad, atol=1e-9, rtol=1e-7, msg=name)


@pytest.mark.parametrize("cut", [0, 9, 20])
@pytest.mark.parametrize("selection", ["query", "block"])
def test_causality_by_perturbation_and_gradients(cut: int, selection: str) -> None:
    module = build(SIZES[1], seed=10, selection=selection)
    q, k, v = make_qkv(seed=11, requires_grad=True)
    out = module(q, k, v, causal=True)
    future = torch.arange(LENGTH) > cut
    with torch.no_grad():
        q2, k2, v2 = (torch.where(future[None, None, :, None], 9.0 * torch.randn_like(t), t) for t in (q, k, v))
        out2 = module(q2, k2, v2, causal=True)
    assert torch.equal(out[:, :, : cut + 1], out2[:, :, : cut + 1])
    out[:, :, : cut + 1].sum().backward()
    for label, t in (("q", q), ("k", k), ("v", v)):
        assert t.grad is not None and torch.all(t.grad[:, :, future] == 0), f"gradient leaks into future {label}"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("selection", ["query", "block"])
def test_padded_keys_change_nothing_with_learned_terms(causal: bool, selection: str) -> None:
    """Padded keys enter neither the compression (nor its position term), the ranking nor a branch."""
    module = build(SIZES[0], seed=12, selection=selection)
    q, k, v = make_qkv(seed=13)
    real = random_padding(B, LENGTH, seed=14, min_real=LENGTH // 2)
    pad = ~real[:, None, :, None]
    with torch.no_grad():
        base = module(q, k, v, causal=causal, attention_mask=real)
        out = module(
            q,
            torch.where(pad, 50.0 * torch.randn_like(k), k),
            torch.where(pad, 1e6 * torch.randn_like(v), v),
            causal=causal,
            attention_mask=real,
        )
    torch.testing.assert_close(out, base, atol=1e-6, rtol=0)


def one_branch(module: NativeSparseAttention, branch: int) -> NativeSparseAttention:
    """Gates fixed to ``branch``: sigmoid(±200) is 1 (exactly, in float64) and 1e-87."""
    with torch.no_grad():
        if module.gate_weight is not None:
            module.gate_weight.zero_()
        module.gate_bias.fill_(-200.0)
        module.gate_bias[branch] = 200.0
    return module


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("selection", ["query", "block"])
def test_exact_limits_equal_full_attention(causal: bool, padded: bool, selection: str) -> None:
    """Selection covering every block, or a window covering every key, gated alone, is full attention."""
    q, k, v = make_qkv(seed=15)
    real = random_padding(B, LENGTH, seed=16, min_real=LENGTH // 2) if padded else None
    full = reference_attention(q, k, v, causal=causal, attention_mask=real)
    every_block = build((4, 2, 4, -(-LENGTH // 4), 3), seed=17, selection=selection)
    whole_window = build((4, 2, 4, 2, 2 * LENGTH + 1), seed=18, selection=selection)
    for module, branch in ((every_block, 1), (whole_window, 2)):
        with torch.no_grad():
            out = one_branch(module, branch)(q, k, v, causal=causal, attention_mask=real)
        assert (out.double() - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("learned", [False, True])
@pytest.mark.parametrize("selection", ["query", "block"])
def test_cached_decoding_equals_recompute(padded: bool, learned: bool, selection: str) -> None:
    """Mixed chunk sizes then token by token; the cache's compressed blocks equal the recomputed ones."""
    module = build(SIZES[0], seed=19, learned=learned, selection=selection)
    length = 31
    q, k, v = make_qkv(length, seed=20)
    real = None
    if padded:
        real = torch.ones(B, length, dtype=torch.bool)
        real[1, :5] = False  # left padding, as in batched generation
    with torch.no_grad():
        full = module(q, k, v, causal=True, attention_mask=real)
        state = module.new_state()
        pieces, start = [], 0
        for step in [2, 1, 0, 4, 3] + [1] * length:
            stop = min(start + step, length)
            mask = None if real is None else real[:, start:stop]
            pieces.append(
                module.decode(q[:, :, start:stop], k[:, :, start:stop], v[:, :, start:stop], state, attention_mask=mask)
            )
            start = stop
            if start == length:
                break
        keys, values, flags = module.compress(k, v, real, causal=True)
    torch.testing.assert_close(torch.cat(pieces, dim=2), full, atol=1e-5, rtol=1e-5)
    assert state.num_compressed == (length - 4) // 2 + 1
    torch.testing.assert_close(state.compressed_keys, keys, atol=1e-6, rtol=0)
    torch.testing.assert_close(state.compressed_values, values, atol=1e-6, rtol=0)
    assert torch.equal(state.compressed_real, flags)


@pytest.mark.parametrize("selection", ["query", "block"])
def test_grouped_query_decoding_keeps_key_heads(selection: str) -> None:
    """With grouped keys the cache (raw and compressed) keeps H_kv heads and equals recompute."""
    module = build(SIZES[0], seed=21, selection=selection)
    q, k, v = make_qkv(seed=22)
    k1, v1 = k[:, :1], v[:, :1]
    with torch.no_grad():
        full = module(q, k1.expand(-1, H, -1, -1), v1.expand(-1, H, -1, -1), causal=True)
        state = module.new_state()
        out = torch.cat(
            [module.decode(q[:, :, i : i + 1], k1[:, :, i : i + 1], v1[:, :, i : i + 1], state) for i in range(LENGTH)],
            dim=2,
        )
    torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)
    assert state.keys is not None and state.keys.shape[1] == 1
    assert state.compressed_keys is not None and state.compressed_keys.shape[1] == 1


def test_bad_options_name_the_argument() -> None:
    with pytest.raises(ValueError, match="compress_stride must divide compress_block"):
        attnkit.build_attention("nsa", compress_block=6, compress_stride=4, select_block=8)
    with pytest.raises(ValueError, match="compress_stride must divide select_block"):
        attnkit.build_attention("nsa", compress_block=8, compress_stride=4, select_block=6)
    with pytest.raises(ValueError, match="select_blocks must be at least 2"):
        attnkit.build_attention("nsa", select_blocks=1)
    with pytest.raises(ValueError, match="selection must be one of 'query', 'block', got 'token'"):
        attnkit.build_attention("nsa", selection="token")
    with pytest.raises(ValueError, match="window must be a positive integer"):
        attnkit.build_attention("nsa", window=0)
    module = attnkit.build_attention("nsa", head_dim=8)
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="built with head_dim=8, got q and k with D=4"):
        module(q, q, q)


@pytest.mark.parametrize(("block", "stride", "count"), [(5, 2, 13), (4, 2, 15), (4, 4, 7), (6, 3, 8), (4, 2, 3)])
@pytest.mark.parametrize("padded", [False, True])
def test_compress_blocks_equals_a_loop_over_blocks(block: int, stride: int, count: int, padded: bool) -> None:
    """``c_m = Σ_u w_u (x_{m·d+u} + e_u)`` over real positions only, written as a loop in float64:
    overlapping and disjoint blocks, a stride that does not divide the block (the general path), blocks
    running past the end (padding) and keys no block reaches."""
    g = torch.Generator().manual_seed(20)
    x = torch.randn(B, H, LENGTH, D, generator=g, dtype=torch.float64)
    weights = torch.randn(block, generator=g, dtype=torch.float64)
    position = torch.randn(block, D, generator=g, dtype=torch.float64)
    real = random_padding(B, LENGTH, seed=21, min_real=LENGTH // 2) if padded else None
    pooled, any_real = nsa_kernels.compress_blocks(
        x, weights, block=block, stride=stride, count=count, attention_mask=real, position=position
    )
    want = torch.zeros(B, H, count, D, dtype=torch.float64)
    want_real = torch.zeros(B, count, dtype=torch.bool)
    for b, m, u in itertools.product(range(B), range(count), range(block)):
        p = m * stride + u
        if p < LENGTH and (real is None or bool(real[b, p])):
            want[b, :, m] += weights[u] * (x[b, :, p] + position[u])
            want_real[b, m] = True
    torch.testing.assert_close(pooled, want, atol=1e-12, rtol=1e-12)
    assert torch.equal(any_real, want_real)
