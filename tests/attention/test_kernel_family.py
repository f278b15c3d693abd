"""Kernel and low-rank family (issue 5): linear, performer, linformer, nystrom and the prefix core.

Every check compares against an independent reference written here: the naive quadratic
formula of linear attention in float64, a token-by-token recurrence, the float64 softmax
oracle, a closed-form variance, or a compacted input without the padded keys.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

import attnkit
from attnkit.attention import nystrom
from attnkit.attention.linformer import LinformerAttention
from attnkit.attention.nystrom import iterative_pinv, segment_means
from attnkit.attention.performer import PerformerAttention, random_projection, softmax_kernel_features
from attnkit.attention.reference import reference_attention
from attnkit.kernels.recurrent import PrefixState, causal_linear_attention, recurrent_step
from tests.helpers import build, oracle, random_padding, relative_error, structured_qkv

F64 = torch.float64


# -- independent references ---------------------------------------------------------------
def naive_linear(phi_q: Tensor, phi_k: Tensor, v: Tensor, *, causal: bool, normalize: bool = True) -> Tensor:
    """``Σ_s (φq_t·φk_s) v_s / Σ_s φq_t·φk_s`` over an explicit (T, S) matrix (end-aligned causal)."""
    scores = phi_q @ phi_k.transpose(-1, -2)
    if causal:
        t_len, s_len = scores.shape[-2:]
        visible = torch.ones(t_len, s_len, dtype=torch.bool).tril(diagonal=s_len - t_len)
        scores = scores * visible
    out = scores @ v
    return out / scores.sum(dim=-1, keepdim=True) if normalize else out


def elu1(x: Tensor) -> Tensor:
    return torch.where(x > 0, x + 1.0, x.exp())


def favor_features(x: Tensor, w: Tensor) -> Tensor:
    """The FAVOR+ map ``exp(w·x - ‖x‖²/2) / √m`` written directly, ``x`` already scaled."""
    return (x @ w.T - 0.5 * (x * x).sum(-1, keepdim=True)).exp() / math.sqrt(w.shape[0])


def grads(out: Tensor, inputs: tuple[Tensor, ...], seed: int = 0) -> tuple[Tensor, ...]:
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad((out * weight).sum(), inputs)


def leaves(*tensors: Tensor) -> tuple[Tensor, ...]:
    return tuple(t.detach().clone().requires_grad_(True) for t in tensors)


# -- the prefix core ------------------------------------------------------------------------
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("chunk", [1, 4, 7, 64])
def test_chunked_core_equals_naive_and_recurrent_with_gradients(scaled: bool, chunk: int) -> None:
    g = torch.Generator().manual_seed(0)
    b, h, t_len, f, e = 2, 2, 29, 5, 3
    q, k = (torch.rand(b, h, t_len, f, generator=g, dtype=F64) for _ in range(2))
    v = torch.randn(b, h, t_len, e, generator=g, dtype=F64)
    a = 4.0 * torch.randn(b, h, t_len, generator=g, dtype=F64) if scaled else None

    # naive: the explicit causal sum with the true features k_s·exp(a_s), then the exp(-M_t) convention
    qn, kn, vn = leaves(q, k, v)
    k_true = kn * a.exp()[..., None] if a is not None else kn
    naive = naive_linear(qn, k_true, vn, causal=True, normalize=False)
    if a is not None:
        naive = naive * (-a.cummax(dim=-1).values).exp()[..., None]

    qc, kc, vc = leaves(q, k, v)
    chunked, _ = causal_linear_attention(qc, kc, vc, key_log_scale=a, chunk_size=chunk)

    qr, kr, vr = leaves(q, k, v)
    state = PrefixState()
    steps = [
        recurrent_step(
            qr[:, :, i : i + 1],
            kr[:, :, i : i + 1],
            vr[:, :, i : i + 1],
            state,
            key_log_scale=a[:, :, i : i + 1] if a is not None else None,
        )
        for i in range(t_len)
    ]
    recurrent = torch.cat(steps, dim=2)

    torch.testing.assert_close(chunked, naive, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(recurrent, naive, atol=1e-12, rtol=1e-10)
    for got_c, got_r, want in zip(
        grads(chunked, (qc, kc, vc)), grads(recurrent, (qr, kr, vr)), grads(naive, (qn, kn, vn))
    ):
        torch.testing.assert_close(got_c, want, atol=1e-11, rtol=1e-9)
        torch.testing.assert_close(got_r, want, atol=1e-11, rtol=1e-9)


def test_core_state_carries_over_chunks_of_a_sequence() -> None:
    g = torch.Generator().manual_seed(1)
    q, k = (torch.rand(1, 2, 40, 4, generator=g, dtype=F64) for _ in range(2))
    v = torch.randn(1, 2, 40, 3, generator=g, dtype=F64)
    a = torch.randn(1, 2, 40, generator=g, dtype=F64)
    whole, _ = causal_linear_attention(q, k, v, key_log_scale=a, chunk_size=8)
    state: PrefixState | None = None
    parts = []
    for lo, hi in [(0, 13), (13, 14), (14, 40)]:
        part, state = causal_linear_attention(
            q[:, :, lo:hi],
            k[:, :, lo:hi],
            v[:, :, lo:hi],
            key_log_scale=a[:, :, lo:hi],
            state=state,
            chunk_size=8,
            need_state=True,
        )
        parts.append(part)
    # each piece is scaled by its own running maximum, which is the whole sequence's at those positions
    torch.testing.assert_close(torch.cat(parts, dim=2), whole, atol=1e-12, rtol=1e-10)
    assert state is not None and state.kv is not None and state.kv.shape == (1, 2, 4, 3) and state.length == 40


# -- linear ---------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths", [(23, 23), (9, 23), (23, 9)])
def test_linear_equals_naive_formula_with_gradients(causal: bool, lengths: tuple[int, int]) -> None:
    t_len, s_len = lengths
    q, k, v = structured_qkv(2, 2, t_len, s_len, 8, seed=3, dtype=F64)
    module = attnkit.build_attention("linear", chunk_size=4)
    ours = leaves(q, k, v)
    ref = leaves(q, k, v)
    out = module(*ours, causal=causal)
    if causal and t_len > s_len:  # queries before the first key see nothing: zeros by convention
        tail = naive_linear(elu1(ref[0][:, :, t_len - s_len :]), elu1(ref[1]), ref[2], causal=True)
        want = torch.cat([torch.zeros_like(ref[0][:, :, : t_len - s_len]), tail], dim=2)
    else:
        want = naive_linear(elu1(ref[0]), elu1(ref[1]), ref[2], causal=causal)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-10)
    for got, exp in zip(grads(out, ours), grads(want, ref)):
        torch.testing.assert_close(got, exp, atol=1e-11, rtol=1e-9)


@pytest.mark.parametrize("upstream", ["expanded", "transposed"])
@pytest.mark.parametrize("name", ["linear", "performer"])
def test_causal_gradients_for_a_non_contiguous_upstream_gradient(name: str, upstream: str) -> None:
    """The causal backward reads the incoming gradient as it comes, without a contiguous copy first:
    a stride-0 one (as ``out.sum().backward()`` gives) and a transposed one. Whole chunks (no padding copy)."""
    q, k, v = structured_qkv(2, 3, 16, 16, 8, seed=41, dtype=F64)
    ours, ref = leaves(0.5 * q, 0.5 * k, v), leaves(0.5 * q, 0.5 * k, v)
    if name == "linear":
        out = attnkit.build_attention("linear", chunk_size=4)(*ours, causal=True)
        want = naive_linear(elu1(ref[0]), elu1(ref[1]), ref[2], causal=True)
    else:  # key log-scales: the stabilised core
        module = attnkit.build_attention("performer", nb_features=12, chunk_size=4, seed=3)
        assert isinstance(module, PerformerAttention)
        w = module.projection(8, device=q.device, dtype=F64)
        out = module(*ours, causal=True)
        want = naive_linear(
            favor_features(ref[0] * 8**-0.25, w), favor_features(ref[1] * 8**-0.25, w), ref[2], causal=True
        )
    if upstream == "expanded":
        weight = torch.ones((), dtype=F64).expand(out.shape)
    else:
        gen = torch.Generator().manual_seed(42)
        weight = torch.randn(2, 3, 8, 16, generator=gen, dtype=F64).transpose(-1, -2)
    assert not weight.is_contiguous()
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-8)
    for got, exp in zip(torch.autograd.grad(out, ours, weight), torch.autograd.grad(want, ref, weight)):
        torch.testing.assert_close(got, exp, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("feature_map", ["elu+1", "relu", "identity"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths", [(37, 37), (9, 23), (23, 9)])
def test_linear_in_small_blocks_equals_naive_with_gradients(
    monkeypatch: pytest.MonkeyPatch, padded: bool, feature_map: str, causal: bool, lengths: tuple[int, int]
) -> None:
    # tiny blocks: the bidirectional kernel takes one (batch, head) slice at a time, the causal one
    # applies the feature map in blocks of rows (without padding; with it, features come first)
    monkeypatch.setattr("attnkit.kernels.linear_features.BLOCK_BYTES", 4 * 2 * 2 * 8 * 5)
    t_len, s_len = lengths
    q, k, v = structured_qkv(2, 2, t_len, s_len, 8, seed=6, dtype=F64)
    real = random_padding(2, s_len, seed=6, min_real=3) if padded else torch.ones(2, s_len, dtype=torch.bool)
    phi = {"elu+1": elu1, "relu": torch.relu, "identity": lambda x: x}[feature_map]
    normalize = feature_map != "identity"
    module = attnkit.build_attention("linear", feature_map=feature_map, normalize=normalize, chunk_size=4)
    ours, ref = leaves(q, k, v), leaves(q, k, v)
    out = module(*ours, causal=causal, attention_mask=real if padded else None)
    phi_q, phi_k = phi(ref[0]), phi(ref[1]) * real[:, None, :, None]
    if causal and t_len > s_len:  # queries before the first key see nothing: zero weights
        phi_q = torch.cat([torch.zeros_like(phi_q[:, :, : t_len - s_len]), phi_q[:, :, t_len - s_len :]], dim=2)
        phi_k = torch.cat([torch.zeros_like(phi_k[:, :, : t_len - s_len]), phi_k], dim=2)
        values = torch.cat([torch.zeros_like(ref[2][:, :, : t_len - s_len]), ref[2]], dim=2)
    else:
        values = ref[2]
    want = naive_linear(phi_q, phi_k, values, causal=causal, normalize=False)
    if normalize:  # a relu query that meets no key's features has a zero normaliser: zeros by convention
        den = naive_linear(phi_q, phi_k, torch.ones_like(values[..., :1]), causal=causal, normalize=False)
        want = want / torch.where(den > 0, den, torch.ones_like(den))
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-10)
    for got, exp in zip(grads(out, ours), grads(want, ref)):
        torch.testing.assert_close(got, exp, atol=1e-11, rtol=1e-9)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_linear_gradcheck_in_small_blocks(monkeypatch: pytest.MonkeyPatch, padded: bool, causal: bool) -> None:
    monkeypatch.setattr("attnkit.kernels.linear_features.BLOCK_BYTES", 4 * 1 * 2 * 4 * 3)
    q, k, v = leaves(*structured_qkv(1, 2, 11, 11, 4, seed=7, dtype=F64))
    real = torch.ones(1, 11, dtype=torch.bool)
    real[0, 4] = False
    module = attnkit.build_attention("linear", chunk_size=4)
    kpm = real if padded else None
    assert torch.autograd.gradcheck(lambda *x: module(*x, causal=causal, attention_mask=kpm), (q, k, v))


@pytest.mark.parametrize("feature_map", ["elu+1", "relu"])
def test_linear_bidirectional_retained_graph_gives_the_same_gradients_twice(
    monkeypatch: pytest.MonkeyPatch, feature_map: str
) -> None:
    # the backward reads the saved features and writes derivatives into buffers of its own: a second
    # backward over the same graph must see them unchanged (two groups of heads, padded keys)
    monkeypatch.setattr("attnkit.kernels.linear_features.BLOCK_BYTES", 4 * 2 * 19 * 8)
    q, k, v = leaves(*structured_qkv(2, 2, 19, 19, 8, seed=8, dtype=F64))
    real = random_padding(2, 19, seed=8, min_real=3)
    out = attnkit.build_attention("linear", feature_map=feature_map)(q, k, v, causal=False, attention_mask=real)
    loss = (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(8), dtype=F64)).sum()
    first = torch.autograd.grad(loss, (q, k, v), retain_graph=True)
    second = torch.autograd.grad(loss, (q, k, v))
    for x, y in zip(first, second):
        torch.testing.assert_close(x, y, atol=0.0, rtol=0.0)


def test_linear_feature_maps() -> None:
    q, k, v = structured_qkv(1, 2, 15, 15, 8, seed=4, dtype=F64)
    relu = attnkit.build_attention("linear", feature_map="relu")
    torch.testing.assert_close(
        relu(q, k, v, causal=True), naive_linear(q.relu(), k.relu(), v, causal=True).nan_to_num(0.0)
    )
    ident = attnkit.build_attention("linear", feature_map="identity", normalize=False)
    torch.testing.assert_close(ident(q, k, v, causal=True), naive_linear(q, k, v, causal=True, normalize=False))
    with pytest.raises(ValueError, match="normalize=False"):
        attnkit.build_attention("linear", feature_map="identity")
    with pytest.raises(ValueError, match="feature_map"):
        attnkit.build_attention("linear", feature_map="softmax")
    with pytest.raises(ValueError, match="chunk_size"):
        attnkit.build_attention("linear", chunk_size=0)


def test_relu_query_without_overlap_gives_zeros() -> None:
    q = -torch.ones(1, 1, 3, 4)  # relu(q) = 0: the normaliser is 0 and the row must be zeros, not NaN
    k, v = torch.ones(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    out = attnkit.build_attention("linear", feature_map="relu")(q, k, v, causal=True)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("name", ["linear", "performer"])
def test_recurrent_state_is_constant_size_and_decoding_matches_recompute(name: str) -> None:
    q, k, v = structured_qkv(2, 2, 50, 50, 8, seed=5)
    kpm = torch.ones(2, 50, dtype=torch.bool)
    kpm[0, :7] = False
    module = build(name)
    full = module(q, k, v, causal=True, attention_mask=kpm)
    state = module.new_state()
    outs, sizes = [], []
    for lo, hi in [(0, 20)] + [(i, i + 1) for i in range(20, 50)]:
        outs.append(module.decode(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], state, attention_mask=kpm[:, lo:hi]))
        sizes.append(state.kv.numel())
    torch.testing.assert_close(torch.cat(outs, dim=2), full, atol=1e-5, rtol=1e-5)
    assert len(set(sizes)) == 1  # O(F·D) per head, whatever the context length
    assert state.length == 50


# -- performer ------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_performer_equals_naive_favor_formula(causal: bool, kernel: str) -> None:
    q, k, v = structured_qkv(2, 2, 21, 21, 8, seed=6, dtype=F64)
    q, k = 0.5 * q, 0.5 * k
    kpm = random_padding(2, 21, seed=6, min_real=8)
    module = attnkit.build_attention("performer", nb_features=32, kernel=kernel, chunk_size=4, seed=3)
    assert isinstance(module, PerformerAttention)
    w = module.projection(8, device=q.device, dtype=F64)
    ours, ref = leaves(q, k, v), leaves(q, k, v)
    out = module(*ours, causal=causal, attention_mask=kpm)
    scale = 8**-0.25
    if kernel == "softmax":
        phi_q, phi_k = favor_features(ref[0] * scale, w), favor_features(ref[1] * scale, w)
    else:
        phi_q, phi_k = (torch.relu(x * scale @ w.T) + 1e-3 for x in ref[:2])
    phi_k = phi_k * kpm[:, None, :, None]
    want = naive_linear(phi_q, phi_k, ref[2], causal=causal)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-8)
    for got, exp in zip(grads(out, ours), grads(want, ref)):
        torch.testing.assert_close(got, exp, atol=1e-9, rtol=1e-7)


def test_performer_error_falls_as_features_grow() -> None:
    # cool inputs (scores within about ±1): where FAVOR+ is meant to work
    errors = {}
    for m in (8, 64, 512, 4096):
        errs = []
        for seed in range(3):
            q, k, v = structured_qkv(2, 2, 33, 33, 16, seed=seed)
            module = attnkit.build_attention("performer", nb_features=m, seed=seed)
            errs.append(relative_error(module(0.3 * q, 0.3 * k, v), reference_attention(0.3 * q, 0.3 * k, v)))
        errors[m] = sum(errs) / len(errs)
    assert errors[8] > errors[64] > errors[512] > errors[4096], errors
    assert errors[4096] < 0.06, errors


def test_positive_estimator_variance_matches_lemma_2() -> None:
    """Var[φ(x)ᵀφ(y)] = exp(2xᵀy) (exp(‖x + y‖²) − 1) / m for i.i.d. w (Choromanski et al. 2021, Lemma 2)."""
    g = torch.Generator().manual_seed(0)
    d, m, reps = 4, 8, 20000
    x = 0.35 * torch.randn(d, generator=g, dtype=F64)
    y = 0.35 * torch.randn(d, generator=g, dtype=F64)
    w = random_projection(m * reps, d, orthogonal=False, generator=g)
    fx, lx = softmax_kernel_features(x[None], w)
    fy, ly = softmax_kernel_features(y[None], w)
    products = (fx * fy)[0] * (lx + ly).exp()  # exp(w·x − ‖x‖²/2) exp(w·y − ‖y‖²/2), one per w
    estimates = products.reshape(reps, m).mean(dim=1)
    exact = math.exp(float(x @ y))
    variance = math.exp(2 * float(x @ y)) * (math.exp(float((x + y).square().sum())) - 1.0) / m
    centred = estimates - estimates.mean()
    empirical = float(centred.square().mean())
    # standard errors of the sample mean and of the sample variance
    se_mean = math.sqrt(variance / reps)
    se_var = math.sqrt(float((centred**4).mean() - empirical**2) / reps)
    assert abs(float(estimates.mean()) - exact) < 4 * se_mean
    assert abs(empirical - variance) < 4 * se_var, (empirical, variance, se_var)


def test_orthogonal_features_have_lower_error_than_iid() -> None:
    g = torch.Generator().manual_seed(1)
    d = 16
    x, y = 0.3 * torch.randn(d, generator=g, dtype=F64), 0.3 * torch.randn(d, generator=g, dtype=F64)
    exact = math.exp(float(x @ y))

    def mse(orthogonal: bool) -> float:
        errs = []
        for _ in range(400):
            w = random_projection(d, d, orthogonal=orthogonal, generator=g)
            est = (favor_features(x[None], w) * favor_features(y[None], w)).sum()
            errs.append((float(est) - exact) ** 2)
        return sum(errs) / len(errs)

    assert mse(True) < mse(False)


def test_orthogonal_rows_are_orthogonal() -> None:
    w = random_projection(40, 16, orthogonal=True, generator=torch.Generator().manual_seed(0))
    block = w[:16] / w[:16].norm(dim=1, keepdim=True)
    torch.testing.assert_close(block @ block.T, torch.eye(16, dtype=F64), atol=1e-12, rtol=0)
    assert w.shape == (40, 16)


def test_performer_randomness_is_seeded_and_redraws_only_when_asked() -> None:
    q, k, v = structured_qkv(1, 2, 12, 12, 8, seed=7)
    rng_before = torch.get_rng_state()
    a = attnkit.build_attention("performer", nb_features=16, seed=5, redraw_interval=2).eval()
    b = attnkit.build_attention("performer", nb_features=16, seed=5)
    assert isinstance(a, PerformerAttention) and isinstance(b, PerformerAttention)
    c = attnkit.build_attention("performer", nb_features=16, seed=6)
    first = a(q, k, v)
    assert torch.equal(torch.get_rng_state(), rng_before), "the global RNG must not be used"
    assert torch.equal(first, b(q, k, v)) and not torch.equal(first, c(q, k, v))
    for _ in range(5):  # eval never redraws, whatever the interval
        assert torch.equal(a(q, k, v), first)
    a.train()
    outs = [a(q, k, v) for _ in range(3)]
    assert torch.equal(outs[0], first) and torch.equal(outs[1], first)  # calls 1 and 2 use draw 0
    assert not torch.equal(outs[2], first) and int(a.draws) == 1  # the third call redrew
    b.redraw_features()
    assert torch.equal(b(q, k, v), outs[2])  # draw 1 of seed 5, however it was reached
    state = a.new_state()
    a.redraw_features()
    with pytest.raises(ValueError, match="redrawn"):
        a.decode(q[:, :, :1], k[:, :, :1], v[:, :, :1], state)


@pytest.mark.parametrize("causal", [False, True])
def test_performer_padded_keys_are_removed_exactly(causal: bool) -> None:
    """With padding at the end, the result equals running on the real keys alone."""
    q, k, v = structured_qkv(1, 2, 20, 20, 8, seed=8, dtype=F64)
    kpm = torch.ones(1, 20, dtype=torch.bool)
    kpm[0, 13:] = False
    module = attnkit.build_attention("performer", nb_features=64, chunk_size=4)
    k_pad = torch.where(kpm[:, None, :, None], k, 50.0)  # huge padded keys would dominate any leaky max
    padded = module(q, k_pad, v, causal=causal, attention_mask=kpm)
    if causal:
        trimmed = module(q[:, :, :13], k[:, :, :13], v[:, :, :13], causal=True)
        torch.testing.assert_close(padded[:, :, :13], trimmed, atol=1e-12, rtol=1e-10)
    else:
        trimmed = module(q, k[:, :, :13], v[:, :, :13])
        torch.testing.assert_close(padded, trimmed, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["linear", "performer"])
def test_half_inputs_accumulate_in_float32(name: str, dtype: torch.dtype) -> None:
    q, k, v = (t.to(dtype) for t in structured_qkv(1, 2, 300, 300, 16, seed=9))
    module = build(name)
    out = module(q, k, v, causal=True)
    want = module(q.float(), k.float(), v.float(), causal=True)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), want, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("name", "options", "causal"),
    [
        ("linear", {}, True),
        ("linear", {}, False),
        ("performer", {"nb_features": 64}, True),
        ("performer", {"nb_features": 64}, False),
        ("linformer", {"proj_len": 64, "max_len": 16384}, False),
        ("nystrom", {"num_landmarks": 32}, False),
    ],
)
def test_long_large_norm_half_inputs_stay_finite(name: str, options: dict, causal: bool, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(10)
    length = 16384
    q, k, v = (40.0 * torch.randn(1, 1, length, 16, generator=g) for _ in range(3))
    q, k, v = (t.to(dtype) for t in (q, k, v))
    out = attnkit.build_attention(name, **options)(q, k, v, causal=causal)
    assert out.dtype == dtype and torch.isfinite(out).all()
    if name in ("linear", "performer"):
        # kernel attention outputs convex combinations of the values (or zeros): within their range
        assert out.float().abs().max() <= v.float().abs().max() * 1.01


# -- linformer ------------------------------------------------------------------------------
@pytest.mark.parametrize("padded", [False, True])
def test_linformer_identity_projection_is_full_attention(padded: bool) -> None:
    q, k, v = structured_qkv(2, 2, 19, 19, 8, seed=11, dtype=F64)
    kpm = random_padding(2, 19, seed=11, min_real=5) if padded else None
    module = attnkit.build_attention("linformer", proj_len=19, max_len=19).double()
    assert isinstance(module, LinformerAttention)
    with torch.no_grad():
        module.proj_k.copy_(torch.eye(19))
        assert module.proj_v is not None
        module.proj_v.copy_(torch.eye(19))
    out = module(q, k, v, attention_mask=kpm)
    torch.testing.assert_close(out, reference_attention(q, k, v, attention_mask=kpm), atol=1e-12, rtol=1e-10)


def test_linformer_lengths_sharing_and_gradients() -> None:
    module = attnkit.build_attention("linformer", proj_len=8, max_len=32, share_kv=True)
    assert module.proj_v is None and len(list(module.parameters())) == 1
    for length in (1, 17, 32):
        q, k, v = structured_qkv(1, 2, length, length, 8, seed=length)
        out = module(q, k, v)
        assert out.shape == (1, 2, length, 8) and torch.isfinite(out).all()
    out.sum().backward()
    assert module.proj_k.grad is not None and module.proj_k.grad[:, :32].abs().sum() > 0
    q, k, v = structured_qkv(1, 2, 33, 33, 8)
    with pytest.raises(ValueError, match="max_len=32"):
        module(q, k, v)
    q, k, v = structured_qkv(1, 2, 8, 8, 8)
    with pytest.raises(ValueError, match="whole sequence"):
        module(q, k, v, causal=True)


def test_linformer_slicing_equals_explicit_projection() -> None:
    """A sequence shorter than max_len uses the first S columns: check against the formula."""
    module = attnkit.build_attention("linformer", proj_len=6, max_len=40).double()
    assert isinstance(module, LinformerAttention) and module.proj_v is not None
    q, k, v = structured_qkv(1, 2, 25, 25, 8, seed=12, dtype=F64)
    e, f = module.proj_k[:, :25].detach(), module.proj_v[:, :25].detach()
    want = reference_attention(q, e @ k, f @ v)
    torch.testing.assert_close(module(q, k, v), want, atol=1e-12, rtol=1e-10)


# -- nystrom --------------------------------------------------------------------------------
def test_nystrom_with_one_landmark_per_token_is_full_attention() -> None:
    q, k, v = structured_qkv(2, 2, 24, 24, 8, seed=13, dtype=F64)
    module = attnkit.build_attention("nystrom", num_landmarks=24, pinv_iterations=40)
    torch.testing.assert_close(module(q, k, v), reference_attention(q, k, v), atol=1e-8, rtol=1e-6)
    kpm = random_padding(2, 24, seed=13, min_real=6)
    torch.testing.assert_close(
        module(q, k, v, attention_mask=kpm), reference_attention(q, k, v, attention_mask=kpm), atol=1e-8, rtol=1e-6
    )


def test_nystrom_error_falls_towards_one_landmark_per_token() -> None:
    q, k, v = structured_qkv(2, 2, 32, 32, 16, seed=14, dtype=F64)
    ref = reference_attention(q, k, v)
    errors = [relative_error(attnkit.build_attention("nystrom", num_landmarks=m)(q, k, v), ref) for m in (4, 16, 32)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.05, errors  # 6 pinv steps: not yet converged


@pytest.mark.parametrize("length", [24, 26])
def test_segment_means_and_gradients_equal_an_explicit_loop(length: int) -> None:
    x = torch.randn(2, 3, length, 5, generator=torch.Generator().manual_seed(12), dtype=F64)
    ours, ref = leaves(x), leaves(x)
    got, _ = segment_means(ours[0], None, 4)
    run = math.ceil(length / 4)
    want = torch.stack([ref[0][:, :, i * run : (i + 1) * run].mean(dim=2) for i in range(4)], dim=2)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(grads(got, ours)[0], grads(want, ref)[0], atol=1e-12, rtol=1e-10)
    assert torch.autograd.gradcheck(lambda t: segment_means(t, None, 4)[0], leaves(x[:1, :1]))


@pytest.mark.parametrize("lengths", [(32, 32), (16, 48)])
def test_nystrom_whole_runs_path_equals_the_general_path(lengths: tuple[int, int]) -> None:
    # without padding and with whole runs the three score matrices come from one fused function
    # (landmark gradients added in place); an all-real padding mask takes the general path
    t_len, s_len = lengths
    q, k, v = structured_qkv(2, 3, t_len, s_len, 8, seed=11, dtype=F64)
    module = attnkit.build_attention("nystrom", num_landmarks=8)
    fast, general = leaves(q, k, v), leaves(q, k, v)
    out = module(*fast)
    want = module(*general, attention_mask=torch.ones(2, s_len, dtype=torch.bool))
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-10)
    for got, exp in zip(grads(out, fast), grads(want, general)):
        torch.testing.assert_close(got, exp, atol=1e-11, rtol=1e-9)
    assert torch.autograd.gradcheck(lambda *x: module(*x), leaves(q[:1, :1], k[:1, :1], v[:1, :1]))


@pytest.mark.parametrize(
    ("t_len", "s_len", "dim", "dim_v", "group_elements"),
    [
        (32, 32, 8, 8, 1),  # m = D: the query and key gradients take over the kept softmaxes; one head per group
        (16, 48, 8, 5, 800),  # two heads per group (48 · 8 elements each), Dv ≠ D
        (48, 16, 4, 12, 1 << 19),  # m ≠ D: fresh gradient buffers; all heads in one group
    ],
)
def test_nystrom_whole_runs_groups_and_second_backward(
    monkeypatch: pytest.MonkeyPatch, t_len: int, s_len: int, dim: int, dim_v: int, group_elements: int
) -> None:
    """Grouped heads, gradient buffers over the kept softmaxes and ``retain_graph``: the general path's values."""
    monkeypatch.setattr(nystrom, "GROUP_ELEMENTS", group_elements)
    g = torch.Generator().manual_seed(17)
    q, k, v = (torch.randn(2, 3, n, e, generator=g, dtype=F64) for n, e in ((t_len, dim), (s_len, dim), (s_len, dim_v)))
    module = attnkit.build_attention("nystrom", num_landmarks=8)
    fast, general = leaves(q, k, v), leaves(q, k, v)
    out = module(*fast)
    want = module(*general, attention_mask=torch.ones(2, s_len, dtype=torch.bool))
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-10)
    weight = torch.randn(out.shape, generator=g, dtype=F64)
    first = torch.autograd.grad((out * weight).sum(), fast, retain_graph=True)
    second = torch.autograd.grad((out * weight).sum(), fast)  # the kept softmaxes are spent: recomputed
    for got, again, exp in zip(first, second, torch.autograd.grad((want * weight).sum(), general)):
        torch.testing.assert_close(got, exp, atol=1e-11, rtol=1e-9)
        torch.testing.assert_close(again, got, atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(module(q, k, v), out.detach(), atol=0, rtol=0)


def _autograd_pinv(a: Tensor, iterations: int) -> Tensor:
    """The pseudo-inverse iteration written with plain autograd ops (the reference for the hand-written backward)."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype).expand_as(a)
    norm_1, norm_inf = a.abs().sum(dim=-2).amax(dim=-1), a.abs().sum(dim=-1).amax(dim=-1)
    z = a.transpose(-1, -2) / (norm_1 * norm_inf).clamp(min=torch.finfo(a.dtype).tiny)[..., None, None]
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


@pytest.mark.parametrize("kind", ["softmax", "uniform", "signed"])
@pytest.mark.parametrize("iterations", [0, 1, 6])
def test_iterative_pinv_backward_equals_autograd(kind: str, iterations: int) -> None:
    """The hand-written backward, the norms' maxima included (uniform rows and columns: every one ties)."""
    g = torch.Generator().manual_seed(18)
    a = {
        "softmax": torch.softmax(torch.randn(2, 3, 6, 6, generator=g, dtype=F64), dim=-1),
        "uniform": torch.full((2, 3, 6, 6), 1 / 6, dtype=F64),
        "signed": 0.3 * torch.randn(2, 3, 6, 6, generator=g, dtype=F64),
    }[kind]
    ours, ref = leaves(a), leaves(a)
    got, want = iterative_pinv(ours[0], iterations), _autograd_pinv(ref[0], iterations)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(grads(got, ours)[0], grads(want, ref)[0], atol=1e-10, rtol=1e-9)
    if kind == "signed":  # no ties: the finite differences agree too
        assert torch.autograd.gradcheck(lambda t: iterative_pinv(t, iterations), leaves(a[0, :1]))


def test_iterative_pinv_converges_to_the_pseudo_inverse() -> None:
    g = torch.Generator().manual_seed(15)
    a = torch.softmax(torch.randn(3, 6, 6, generator=g, dtype=F64), dim=-1)
    torch.testing.assert_close(iterative_pinv(a, 30), torch.linalg.pinv(a), atol=1e-8, rtol=1e-6)


def test_nystrom_landmarks_exceeding_length_and_errors() -> None:
    module = attnkit.build_attention("nystrom", num_landmarks=16, pinv_iterations=40)
    q, k, v = structured_qkv(1, 2, 5, 9, 8, seed=16, dtype=F64)
    out = module(q, k, v)
    # more landmarks than tokens: each token is its own landmark, so attention is exact
    torch.testing.assert_close(out, reference_attention(q, k, v), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="segments of the sequence"):
        module(q, q, q, causal=True)
    with pytest.raises(ValueError, match="num_landmarks"):
        attnkit.build_attention("nystrom", num_landmarks=0)


# -- documented error budgets are honest ----------------------------------------------------
@pytest.mark.parametrize("name", ["linear", "performer", "linformer", "nystrom"])
def test_error_budget_is_measured_not_padded(name: str) -> None:
    """The declared budget covers the contract's structured inputs and is within 0.1 of the worst case."""
    module = build(name)
    caps = attnkit.attention_capabilities(name)
    assert caps.error_budget is not None and not caps.exact
    worst = 0.0
    for seed in range(12):
        for causal in [False, True] if caps.causal else [False]:
            for padded in (False, True):
                q, k, v = structured_qkv(2, 3, 37, 37, 16, seed=seed)
                kpm = random_padding(2, 37, seed=seed, min_real=18) if padded else None
                out = module(q, k, v, causal=causal, attention_mask=kpm)
                worst = max(worst, relative_error(out, oracle(module, q, k, v, causal=causal, attention_mask=kpm)))
    assert worst <= caps.error_budget <= worst + 0.1, (worst, caps.error_budget)
