"""The sparse family beyond the contract: patterns by brute force, oracle comparisons, exact limits,
rolling-cache decoding, BigBird's seeded pattern, option errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import attnkit
from attnkit.attention.reference import reference_attention
from attnkit.positions import ALiBi
from tests.helpers import random_padding, structured_qkv

B, H, D = 2, 3, 8


def dense(name: str, module: attnkit.AttentionMechanism, q_len: int, causal: bool, **kw: Any) -> torch.Tensor:
    pattern = module.pattern(q_len, q_len, causal=causal, **kw)
    assert pattern is not None, name
    return pattern.materialize(B, H, q_len, q_len)


def brute_force(name: str, opts: dict[str, Any], length: int, causal: bool) -> torch.Tensor:
    """Each pattern's definition from its paper, written as plain loops over positions."""
    allowed = torch.zeros(length, length, dtype=torch.bool)
    for p in range(length):
        for j in range(length):
            dist = p - j
            if name == "sliding_window":
                w, d = opts["window"], opts.get("dilation", 1)
                steps = range(w) if causal else range(-(w // 2), w // 2 + 1)
                seen = any(dist == d * m for m in steps)
            elif name == "strided":
                seen = abs(dist) < opts["stride"] or dist % opts["stride"] == 0
            elif name == "fixed":
                n, c = opts["block_size"], opts["summary_size"]
                seen = p // n == j // n or j % n >= n - c
            else:
                raise AssertionError(name)
            allowed[p, j] = seen and (j <= p or not causal)
    return allowed


def assert_output_and_gradients_equal(out: torch.Tensor, ref: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> None:
    """``out`` equals the float64 reference ``ref``, and so does the gradient of each input."""
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad((out * grad).sum(), inputs)
    theirs = torch.autograd.grad((ref * grad).sum(), inputs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


PATTERNS = [
    ("sliding_window", {"window": 5}),
    ("sliding_window", {"window": 4, "dilation": 3}),
    ("strided", {"stride": 4}),
    ("strided", {"stride": 7}),
    ("fixed", {"block_size": 6, "summary_size": 2}),
    ("fixed", {"block_size": 5, "summary_size": 5}),
]


@pytest.mark.parametrize(("name", "opts"), PATTERNS)
@pytest.mark.parametrize("causal", [False, True])
def test_pattern_is_the_papers_definition(name: str, opts: dict[str, Any], causal: bool) -> None:
    module = attnkit.build_attention(name, **opts)
    got = dense(name, module, 23, causal)[0, 0]
    assert torch.equal(got, brute_force(name, opts, 23, causal))


CASES = [
    *PATTERNS,
    ("longformer", {"window": 5}),
    ("longformer", {"window": 4, "dilation": 2, "num_global_tokens": 3}),
    ("bigbird", {"block_size": 4, "num_random_blocks": 2, "num_global_blocks": 1}),
    ("bigbird", {"block_size": 5, "num_random_blocks": 1, "num_global_blocks": 2, "seed": 3}),
]


@pytest.mark.parametrize(("name", "opts"), CASES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [41, 48])
def test_matches_reference_with_padding_bias_and_gradients(
    name: str, opts: dict[str, Any], causal: bool, length: int
) -> None:
    q, k, v = structured_qkv(B, H, length, length, D, seed=length, dtype=torch.float64, requires_grad=True)
    kpm = random_padding(B, length, seed=length, min_real=length // 3)
    bias = ALiBi(H).score_bias()
    module = attnkit.build_attention(name, **opts)
    out = module(q, k, v, causal=causal, attention_mask=kpm, score_bias=bias)
    mask = module.pattern(length, length, causal=causal)
    ref = reference_attention(q, k, v, causal=causal, attention_mask=kpm, mask=mask, score_bias=bias)
    assert_output_and_gradients_equal(out, ref, (q, k, v))


@pytest.mark.parametrize("where", ["start", "middle", "end", "mixed"])
@pytest.mark.parametrize("causal", [False, True])
def test_longformer_global_tokens_anywhere(where: str, causal: bool) -> None:
    length = 37
    flags = torch.zeros(B, length, dtype=torch.bool)
    spots = {"start": [0, 1], "middle": [18], "end": [36], "mixed": [2, 20, 35]}[where]
    flags[0, spots] = True
    flags[1, [s // 2 for s in spots]] = True  # the other batch row has other global tokens
    q, k, v = structured_qkv(B, H, length, length, D, seed=3, dtype=torch.float64, requires_grad=True)
    kpm = random_padding(B, length, seed=4, min_real=20)
    module = attnkit.build_attention("longformer", window=5)
    out = module(q, k, v, causal=causal, attention_mask=kpm, global_tokens=flags)
    mask = module.pattern(length, length, causal=causal, global_tokens=flags)
    dense_mask = mask.materialize(B, H, length, length)
    for b in range(B):  # the pattern: global rows and columns are full (up to causality)
        for s in flags[b].nonzero().flatten().tolist():
            assert dense_mask[b, 0, s, : (s + 1 if causal else length)].all()
            assert dense_mask[b, 0, s:, s].all()
    ref = reference_attention(q, k, v, causal=causal, attention_mask=kpm, mask=dense_mask)
    assert_output_and_gradients_equal(out, ref, (q, k, v))


def test_longformer_global_count_equals_leading_mask() -> None:
    q, k, v = structured_qkv(B, H, 30, 30, D, seed=5, dtype=torch.float64)
    module = attnkit.build_attention("longformer", window=3)
    flags = torch.zeros(B, 30, dtype=torch.bool)
    flags[:, :4] = True
    torch.testing.assert_close(module(q, k, v, global_tokens=4), module(q, k, v, global_tokens=flags), atol=0, rtol=0)


@pytest.mark.parametrize(
    ("name", "opts"),
    [
        ("sliding_window", {"window": 2 * 29 + 1}),
        ("longformer", {"window": 2 * 29 + 1}),
        ("strided", {"stride": 29}),
        ("fixed", {"block_size": 29, "summary_size": 1}),
        ("bigbird", {"block_size": 4, "num_global_blocks": 8, "num_random_blocks": 0}),
    ],
)
@pytest.mark.parametrize("causal", [False, True])
def test_exact_limit_equals_full_attention(name: str, opts: dict[str, Any], causal: bool) -> None:
    q, k, v = structured_qkv(B, H, 29, 29, D, seed=6, dtype=torch.float64)
    kpm = random_padding(B, 29, seed=6, min_real=10)
    out = attnkit.build_attention(name, **opts)(q, k, v, causal=causal, attention_mask=kpm)
    full = attnkit.build_attention("full")(q, k, v, causal=causal, attention_mask=kpm)
    torch.testing.assert_close(out, reference_attention(q, k, v, causal=causal, attention_mask=kpm), atol=1e-10, rtol=0)
    torch.testing.assert_close(out, full, atol=1e-10, rtol=0)


def test_causal_window_at_least_length_equals_full() -> None:
    q, k, v = structured_qkv(1, 2, 17, 17, D, seed=7, dtype=torch.float64)
    out = attnkit.build_attention("sliding_window", window=17)(q, k, v, causal=True)
    torch.testing.assert_close(out, reference_attention(q, k, v, causal=True), atol=1e-10, rtol=0)


@pytest.mark.parametrize(("window", "dilation"), [(4, 1), (3, 2)])
@pytest.mark.parametrize("padded", [False, True])
def test_rolling_cache_decoding_equals_recompute(window: int, dilation: int, padded: bool) -> None:
    length = 3 * window * dilation + 2  # 3 × window steps, and some
    q, k, v = structured_qkv(B, H, length, length, D, seed=8, dtype=torch.float64)
    kpm = None
    if padded:
        kpm = torch.ones(B, length, dtype=torch.bool)
        kpm[1, :3] = False
    bias = ALiBi(H).score_bias()
    module = attnkit.build_attention("sliding_window", window=window, dilation=dilation)
    full = module(q, k, v, causal=True, attention_mask=kpm, score_bias=bias)
    state = module.new_state()
    for t in range(length):
        step = slice(t, t + 1)
        out = module.decode(
            q[:, :, step],
            k[:, :, step],
            v[:, :, step],
            state,
            attention_mask=None if kpm is None else kpm[:, step],
            score_bias=bias,
        )
        torch.testing.assert_close(out, full[:, :, step], atol=1e-10, rtol=0)
        assert state.length <= dilation * (window - 1) <= dilation * window  # O(window) memory, never the prefix
        assert state.keys is not None and state.keys.shape[2] == state.length


def test_bigbird_same_seed_same_pattern_in_train_and_eval() -> None:
    q, k, v = structured_qkv(B, H, 64, 64, D, seed=9, dtype=torch.float64)
    module = attnkit.build_attention("bigbird", block_size=4, num_random_blocks=2, num_global_blocks=1, seed=7)
    train_table = module.train().block_table(64, causal=False)
    train_out = module(q, k, v)
    eval_table = module.eval().block_table(64, causal=False)
    assert torch.equal(train_table, eval_table)
    assert torch.equal(module(q, k, v), train_out)
    again = attnkit.build_attention("bigbird", block_size=4, num_random_blocks=2, num_global_blocks=1, seed=7)
    assert torch.equal(again.block_table(64, causal=False), train_table)
    other = attnkit.build_attention("bigbird", block_size=4, num_random_blocks=2, num_global_blocks=1, seed=8)
    assert not torch.equal(other.block_table(64, causal=False), train_table)
    module.reseed(8)
    assert torch.equal(module.block_table(64, causal=False), other.block_table(64, causal=False))
    fresh = attnkit.build_attention("bigbird", block_size=4, num_random_blocks=2, num_global_blocks=1)
    fresh.load_state_dict(module.state_dict())  # the seed travels with the weights
    assert torch.equal(fresh.block_table(64, causal=False), other.block_table(64, causal=False))


@pytest.mark.parametrize("causal", [False, True])
def test_bigbird_block_table_structure(causal: bool) -> None:
    module = attnkit.build_attention("bigbird", block_size=4, num_random_blocks=2, num_global_blocks=2, seed=1)
    table = module.block_table(4 * 20, causal=causal)
    n = table.shape[0]
    for i in range(n):
        for j in range(n):
            must = abs(i - j) <= 1 or i < 2 or j < 2
            if causal:
                must = must and j <= i
            if must:
                assert table[i, j]
            if causal and j > i:
                assert not table[i, j]
        if i >= 2:  # exactly r random blocks where there is room for them
            window = {i - 1, i} if causal else {i - 1, i, i + 1}
            room = [j for j in range(2, n) if j not in window and (j < i or not causal)]
            extra = int(table[i].sum()) - len({j for j in window if 0 <= j < n} | {0, 1})
            assert extra == min(2, len(room))
    if causal:  # random blocks never depend on the total length: decoding can grow the cache
        longer = module.block_table(4 * 30, causal=True)
        assert torch.equal(longer[:n, :n], table)


@pytest.mark.parametrize(
    ("name", "opts", "match"),
    [
        ("sliding_window", {"window": 0}, "window must be a positive integer, got 0"),
        ("sliding_window", {"dilation": -1}, "dilation must be a positive integer"),
        ("sliding_window", {"backend": "cuda"}, "backend must be one of"),
        ("strided", {"stride": 0}, "stride must be a positive integer"),
        ("fixed", {"block_size": 4, "summary_size": 5}, "summary_size must be at most block_size"),
        ("longformer", {"num_global_tokens": -2}, "num_global_tokens must be a non-negative integer"),
        ("bigbird", {"block_size": 0}, "block_size must be a positive integer"),
        ("bigbird", {"num_random_blocks": 1.5}, "num_random_blocks must be a non-negative integer"),
    ],
)
def test_bad_options_name_the_argument(name: str, opts: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        attnkit.build_attention(name, **opts)


def test_bad_global_tokens_name_the_argument() -> None:
    q, k, v = structured_qkv(2, 2, 10, 10, 4)
    module = attnkit.build_attention("longformer", window=3)
    with pytest.raises(ValueError, match=r"global_tokens must be a bool tensor of shape \(B, S\) = \(2, 10\)"):
        module(q, k, v, global_tokens=torch.ones(2, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="global_tokens must be a non-negative integer"):
        module(q, k, v, global_tokens=-1)


BIGBIRD = {"block_size": 4, "num_random_blocks": 2, "num_global_blocks": 2, "seed": 1}


def _check_against_reference(
    module: attnkit.AttentionMechanism, q_len: int, kv_len: int, causal: bool, **kw: Any
) -> None:
    """Output and every gradient against the float64 reference over the materialised pattern."""
    q, k, v = structured_qkv(B, H, q_len, kv_len, D, seed=q_len + kv_len, dtype=torch.float64, requires_grad=True)
    out = module(q, k, v, causal=causal, **kw)
    mask = module.pattern(q_len, kv_len, causal=causal)
    ref = reference_attention(q, k, v, causal=causal, mask=mask, **kw)
    assert_output_and_gradients_equal(out, ref, (q, k, v))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [8, 9, 37, 40])
@pytest.mark.parametrize("padded", [False, True])
def test_bigbird_without_bias_matches_reference(causal: bool, length: int, padded: bool) -> None:
    # no score bias: the global query blocks take the fused SDPA path
    kpm = random_padding(B, length, seed=length, min_real=length // 2) if padded else None
    if kpm is not None:
        kpm[:, 0] = True  # every global row keeps a key: no fallback
    _check_against_reference(attnkit.build_attention("bigbird", **BIGBIRD), length, length, causal, attention_mask=kpm)


@pytest.mark.parametrize("steps", [[1] * 29, [3, 1, 4, 6, 9, 6], [8, 8, 13], [5, 24]])
def test_bigbird_decoding_in_steps_matches_reference(steps: list[int]) -> None:
    # each step's queries start on a block boundary or mid-block, before, inside or after the
    # global blocks; the reference is the float64 causal pattern over the whole sequence
    length = sum(steps)
    q, k, v = structured_qkv(B, H, length, length, D, seed=10, dtype=torch.float64)
    module = attnkit.build_attention("bigbird", **BIGBIRD)
    ref = reference_attention(q, k, v, causal=True, mask=module.pattern(length, length, causal=True))
    state, start = module.new_state(), 0
    for step in steps:
        part = slice(start, start + step)
        out = module.decode(q[:, :, part], k[:, :, part], v[:, :, part], state)
        torch.testing.assert_close(out, ref[:, :, part], atol=1e-10, rtol=0)
        start += step


@pytest.mark.parametrize("causal", [False, True])
def test_bigbird_global_row_with_no_visible_key_is_zero(causal: bool) -> None:
    # the first keys are padding: causal global rows see nothing (the SDPA path steps aside)
    kpm = torch.ones(B, 23, dtype=torch.bool)
    kpm[0, :3] = False
    kpm[1] = False
    module = attnkit.build_attention("bigbird", **BIGBIRD)
    _check_against_reference(module, 23, 23, causal, attention_mask=kpm)
    q, k, v = structured_qkv(B, H, 23, 23, D, seed=2, dtype=torch.float64)
    out = module(q, k, v, causal=causal, attention_mask=kpm)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    if causal:
        assert torch.equal(out[0, :, :3], torch.zeros_like(out[0, :, :3]))
