"""Nyströmformer: softmax attention through landmarks and an iterative pseudo-inverse (Xiong et al. 2021).

Paper: Y. Xiong, Z. Zeng, R. Chakraborty, M. Tan, G. Fung, Y. Li, V. Singh, "Nyströmformer: A
Nyström-Based Algorithm for Approximating Self-Attention", AAAI 2021, arXiv:2102.03902.

With ``m`` landmarks ``Q̃, K̃`` (means of ``m`` consecutive segments of the queries and keys),
softmax attention is approximated by the Nyström form::

    softmax(Q K̃ᵀ) · pinv(softmax(Q̃ K̃ᵀ)) · softmax(Q̃ Kᵀ) · V

where ``pinv`` is the paper's Newton–Schulz-type iteration (``pinv_iterations`` steps, started
from ``Aᵀ / (‖A‖₁ ‖A‖∞)`` per batch element and head, so batch elements never interact).
Evaluated right to left: O(N·m + m³) time, O(N·m) memory.

Any length works: sequences are split into ``m`` segments of ``ceil(L / m)`` positions, the
tail padded and left out of the segment means; padded keys are left out of the key landmark
means and masked out of the last factor, and a landmark with no real token is dropped. There
is no causal form (landmarks average over the whole sequence). Supports key padding and
cross-attention. With ``m`` equal to the length (one token per landmark) and enough
iterations the result tends to exact softmax attention.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from attnkit.attention.families import approximate_capabilities
from attnkit.core.base import AttentionMechanism
from attnkit.core.errors import check_positive_int
from attnkit.core.registry import register
from attnkit.core.types import MaskFunction, ScoreBias

NO_CAUSAL_REASON = (
    "causal=True is not supported: Nyström landmarks are means over whole segments of the sequence, "
    "so every query would see future tokens through them (use 'linear' or 'performer' for causal models)"
)


class _EqualSegmentMeans(torch.autograd.Function):
    """Means of ``m`` equal runs of ``x (B, H, L, D)``, with a backward that writes the spread-out
    gradient once (autograd's ``mean`` backward divides, expands and copies: full passes each)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, segments: int) -> Tensor:
        b, h, length, d = x.shape
        ctx.shape = (b, h, segments, length // segments, d)
        return x.reshape(ctx.shape).mean(dim=3)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> tuple[Tensor | None, ...]:
        b, h, segments, run, d = ctx.shape
        # one pass over the output, which is no view: autograd can then add the queries' (keys')
        # other gradient into it in place instead of allocating a sum
        out = grads[0].new_empty(b, h, segments * run, d)
        torch.div(grads[0][:, :, :, None, :].expand(ctx.shape), run, out=out.view(ctx.shape))
        return out, None


#: elements of one ``(L, ·)`` tensor's slice that a group of heads may span: the products and
#: softmaxes of one group then run over slices still in cache from the previous step
GROUP_ELEMENTS = 1 << 19


def _groups(n: int, length: int, width: int) -> list[slice]:
    """Slices of the ``n`` batch·head rows, each ``GROUP_ELEMENTS // (length · width)`` (at least one) wide."""
    size = max(1, min(n, GROUP_ELEMENTS // max(1, length * width)))
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _kernels_(q3: Tensor, k3: Tensor, q_land: Tensor, k_land: Tensor, kernel_1: Tensor, kernel_3: Tensor) -> None:
    """Fill ``kernel_1 = softmax(Q K̃ᵀ)`` and ``kernel_3 = softmax(Q̃ Kᵀ)`` (scaled landmarks), group by group."""
    n, length = q3.shape[0], max(q3.shape[1], k3.shape[1])
    for g in _groups(n, length, max(q_land.shape[1], q3.shape[2])):
        torch.softmax(torch.bmm(q3[g], k_land[g].transpose(-1, -2), out=kernel_1[g]), dim=-1, out=kernel_1[g])
        torch.softmax(torch.bmm(q_land[g], k3[g].transpose(-1, -2), out=kernel_3[g]), dim=-1, out=kernel_3[g])


def _whole_runs_forward(
    q: Tensor, k: Tensor, v: Tensor, segments: int, scale: float, iterations: int, *, keep: bool
) -> tuple[Tensor, dict[str, Any]]:
    """The Nyström form for sequences of whole runs and no padding, on ``(B·H, L, D)`` views.

    The landmarks and the ``(m, m)`` part are computed for all heads at once, then the
    ``(L, ·)`` products group of heads by group of heads (see :data:`GROUP_ELEMENTS`), each
    written into its slice of a buffer and softmaxed there in place. With ``keep``, what the
    backward needs is returned in the dict.
    """
    b, h, t_len, d = q.shape
    n, s_len, dv = b * h, k.shape[2], v.shape[-1]
    q3, k3, v3 = q.reshape(n, t_len, d), k.reshape(n, s_len, d), v.reshape(n, s_len, dv)
    q_mean = q3.reshape(n, segments, t_len // segments, d).mean(dim=2)  # (N, m, D)
    k_mean = k3.reshape(n, segments, s_len // segments, d).mean(dim=2)
    q_land, k_land = q_mean.mul_(scale), k_mean * scale  # 1/√D on the (m, D) landmarks
    kernel_2 = torch.softmax(torch.bmm(q_land, k_mean.transpose(-1, -2)), dim=-1)  # (N, m, m)
    z, tape = _pinv_forward(kernel_2, iterations)
    kernel_1 = q3.new_empty(n, t_len, segments)  # softmax(Q K̃ᵀ)
    kernel_3 = q3.new_empty(n, segments, s_len)  # softmax(Q̃ Kᵀ)
    out = q3.new_empty(n, t_len, dv)
    x, y = q3.new_empty(n, segments, dv), q3.new_empty(n, segments, dv)
    for g in _groups(n, max(t_len, s_len), max(segments, d, dv)):
        torch.bmm(q_land[g], k3[g].transpose(-1, -2), out=kernel_3[g])
        torch.softmax(kernel_3[g], dim=-1, out=kernel_3[g])
        torch.bmm(z[g], torch.bmm(kernel_3[g], v3[g], out=x[g]), out=y[g])  # X = A₃ V, Y = Z X
        torch.bmm(q3[g], k_land[g].transpose(-1, -2), out=kernel_1[g])
        torch.softmax(kernel_1[g], dim=-1, out=kernel_1[g])
        torch.bmm(kernel_1[g], y[g], out=out[g])
    saved: dict[str, Any] = {}
    if keep:
        saved = dict(kernel_1=kernel_1, kernel_3=kernel_3, kernel_2=kernel_2, tape=tape, x=x, y=y, z=z)
        saved.update(q_land=q_land, k_land=k_land, k_mean=k_mean)
    return out.view(b, h, t_len, dv), saved


def _spread_add_(dx: Tensor, d_land: Tensor) -> None:
    """``dx (N, L, D) += d_land (N, m, D) / run`` on each run of ``L / m`` positions (a mean's backward)."""
    n, length, d = dx.shape
    segments = d_land.shape[1]
    dx.view(n, segments, length // segments, d).add_(d_land.div_(length // segments)[:, :, None, :])


class _WholeRunsNystrom(torch.autograd.Function):
    """The Nyström form for sequences of whole runs and no padding, with a hand-written backward.

    On CPU a fresh ``(L, ·)`` tensor costs page faults on top of its pass whenever the
    allocator hands out memory the process has not touched yet (most of the first steps of a
    process, and each step where the heap was trimmed: about 3 ms per 8 MB here), and
    autograd's version makes one per op (each score matrix, its softmax, their gradients,
    sums of gradients). Here the forward fills three buffers (the two softmaxes, kept for the
    backward, and the output); the backward forms each score gradient in a scratch slice per
    group of heads, softmax-backpropagates it there while in cache, and writes the gradients of
    the queries and keys over the spent softmaxes when ``m = D`` (then the values' gradient is
    its only new ``(L, ·)`` tensor); the landmark means' gradients are added in place. The
    ``(m, m)`` part (landmark scores, pseudo-inverse) has a hand-written backward too
    (:func:`_pinv_backward`), run for all heads at once between the two group passes. A second
    backward through the same graph (``retain_graph=True``) recomputes the softmaxes.

    With ``A₁ = softmax(Q K̃ᵀ)``, ``A₃ = softmax(Q̃ Kᵀ)``, ``X = A₃ V``, ``Y = Z X``,
    ``out = A₁ Y`` and ``G`` the output's gradient: ``dY = A₁ᵀ G``, ``dS₁ = softmax'(G Yᵀ)``,
    ``dQ ∋ dS₁ K̃``, ``dK̃ ∋ dS₁ᵀ Q``; ``dZ = dY Xᵀ``, ``dX = Zᵀ dY``; ``dV = A₃ᵀ dX``,
    ``dS₃ = softmax'(dX Vᵀ)``, ``dQ̃ ∋ dS₃ K``, ``dK ∋ dS₃ᵀ Q̃``; ``dA₂ = pinv'(dZ)``,
    ``dS₂ = softmax'(dA₂)``, ``dQ̃ ∋ dS₂ K̃``, ``dK̃ ∋ dS₂ᵀ Q̃`` (scales left out).
    """

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, segments: int, scale: float, iterations: int) -> Tensor:
        out, saved = _whole_runs_forward(q, k, v, segments, scale, iterations, keep=True)
        ctx.save_for_backward(q, k, v)
        ctx.saved, ctx.scale = saved, scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: Any) -> tuple[Tensor | None, ...]:
        q, k, v = ctx.saved_tensors
        saved, scale = ctx.saved, ctx.scale
        x, y, z, q_land, k_land = (saved[n] for n in ("x", "y", "z", "q_land", "k_land"))  # (N, m, ·)
        n, segments, t_len, s_len = y.shape[0], y.shape[1], q.shape[2], k.shape[2]
        d, dv = q.shape[-1], v.shape[-1]
        q3, k3, v3 = q.reshape(n, t_len, d), k.reshape(n, s_len, d), v.reshape(n, s_len, dv)
        g3 = grads[0].reshape(n, t_len, dv)
        # the kept softmaxes, handed over: they become dQ and dK below (a later backward recomputes them)
        kernel_1, kernel_3 = saved.pop("kernel_1", None), saved.pop("kernel_3", None)
        if kernel_1 is None or kernel_3 is None:
            kernel_1, kernel_3 = q3.new_empty(n, t_len, segments), q3.new_empty(n, segments, s_len)
            _kernels_(q3, k3, q_land, k_land, kernel_1, kernel_3)
        over = segments == d  # the gradients fit the softmaxes' buffers exactly
        d_q = kernel_1.view(n, t_len, d) if over else q3.new_empty(n, t_len, d)
        d_k = kernel_3.view(n, s_len, d) if over else k3.new_empty(n, s_len, d)
        softmax_backward_ = functools.partial(torch.ops.aten._softmax_backward_data.out, dim=-1, input_dtype=q.dtype)
        groups = _groups(n, max(t_len, s_len), max(segments, d, dv))
        scratch = q3.new_empty(groups[0].stop * segments * max(t_len, s_len))

        # the queries' side, out = A₁ Y: dS₁ = softmax'(G Yᵀ) in the scratch, then dK̃ and dQ (over A₁)
        d_y, d_k_mean = y.new_empty(y.shape), k_land.new_empty(k_land.shape)
        for g in groups:
            torch.bmm(kernel_1[g].transpose(-1, -2), g3[g], out=d_y[g])
            d_s1 = torch.bmm(g3[g], y[g].transpose(-1, -2), out=scratch[: kernel_1[g].numel()].view(kernel_1[g].shape))
            softmax_backward_(grad_output=d_s1, output=kernel_1[g], grad_input=d_s1)
            torch.bmm(d_s1.transpose(-1, -2), q3[g], out=d_k_mean[g])
            torch.bmm(d_s1, k_land[g], out=d_q[g])
        # the (m, m) part: Y = Z X, Z = pinv(A₂), A₂ = softmax(Q̃ K̃ᵀ)
        d_x = torch.bmm(z.transpose(-1, -2), d_y)
        kernel_2 = saved["kernel_2"]
        d_a2 = _pinv_backward(kernel_2, saved["tape"], torch.bmm(d_y, x.transpose(-1, -2)))
        d_s2 = softmax_backward_(grad_output=d_a2, output=kernel_2, grad_input=d_a2)
        d_k_mean.mul_(scale).baddbmm_(d_s2.transpose(-1, -2), q_land)
        d_q_mean = torch.bmm(d_s2, saved["k_mean"])
        # the landmarks' side, X = A₃ V: dS₃ = softmax'(dX Vᵀ) in the scratch, then dV, dQ̃ and dK (over A₃)
        d_v = v3.new_empty(n, s_len, dv)
        for g in groups:
            torch.bmm(kernel_3[g].transpose(-1, -2), d_x[g], out=d_v[g])
            d_s3 = torch.bmm(
                d_x[g], v3[g].transpose(-1, -2), out=scratch[: kernel_3[g].numel()].view(kernel_3[g].shape)
            )
            softmax_backward_(grad_output=d_s3, output=kernel_3[g], grad_input=d_s3)
            d_q_mean[g].baddbmm_(d_s3, k3[g])
            torch.bmm(d_s3.transpose(-1, -2), q_land[g], out=d_k[g])
            _spread_add_(d_k[g], d_k_mean[g])
        _spread_add_(d_q, d_q_mean.mul_(scale))
        return d_q.view(q.shape), d_k.view(k.shape), d_v.view(v.shape), None, None, None


def segment_means(x: Tensor, real: Tensor | None, segments: int) -> tuple[Tensor, Tensor | None]:
    """Means of ``segments`` consecutive runs of ``x``, counting only real positions.

    Args:
        x: ``(B, H, L, D)``.
        real: bool ``(B, L)``, positions that count (None: all of them).
        segments: ``m``; runs have ``ceil(L / m)`` positions (the tail is padded).

    Returns:
        ``(B, H, m, D)`` means (zeros for empty runs) and bool ``(B, m)``: the run has a real
        position (None when every run is full).
    """
    b, h, length, d = x.shape
    run = math.ceil(length / segments)
    pad = run * segments - length
    if real is None and pad == 0:
        return _EqualSegmentMeans.apply(x, segments), None
    if real is None:
        real = torch.ones(b, length, dtype=torch.bool, device=x.device)
    weight = F.pad(real.to(x.dtype), (0, pad))  # (B, m·run)
    xs = F.pad(x, (0, 0, 0, pad)) * weight[:, None, :, None]
    sums = xs.reshape(b, h, segments, run, d).sum(dim=3)
    counts = weight.reshape(b, segments, run).sum(dim=-1)  # (B, m)
    return sums / counts.clamp(min=1.0)[:, None, :, None], counts > 0


def masked_softmax(scores: Tensor, allowed: Tensor | None) -> Tensor:
    """Softmax over the last dim where ``allowed`` (None: everywhere); rows with nothing allowed are zeros."""
    if allowed is None:
        return torch.softmax(scores, dim=-1)
    row_ok = allowed.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~allowed, float("-inf")).masked_fill(~row_ok, 0.0)
    return torch.softmax(scores, dim=-1) * row_ok


def _pinv_forward(a: Tensor, iterations: int) -> tuple[Tensor, list[Tensor]]:
    """The iteration on ``a (N, m, m)``; returns ``Z`` and the tape its backward reads.

    Each step is ``P = A Z``, ``U = 7I − P``, ``V = 15I − P U``, ``W = ¼(13I − P V)``,
    ``Z ← Z W``: four products and one subtraction (the identities are broadcast, the ¼ goes
    into the last product's scalars). The tape holds ``c = ‖A‖₁ ‖A‖∞`` (unclamped), ``Z₀``
    and each step's ``Z, P, U, V, W``.
    """
    m = a.shape[-1]
    eye = torch.eye(m, dtype=a.dtype, device=a.device)
    magnitude = a.abs()
    norm_1 = magnitude.sum(dim=-2).amax(dim=-1)  # max column sum
    norm_inf = magnitude.sum(dim=-1).amax(dim=-1)  # max row sum
    c = norm_1 * norm_inf
    z = a.transpose(-1, -2) / c.clamp(min=torch.finfo(a.dtype).tiny)[:, None, None]
    tape = [c, z]
    for _ in range(iterations):
        p = torch.bmm(a, z)
        u = torch.sub(7 * eye, p)
        v = torch.baddbmm(15 * eye, p, u, alpha=-1.0)
        w = torch.baddbmm(3.25 * eye, p, v, alpha=-0.25)
        tape += [z, p, u, v, w]
        z = torch.bmm(z, w)
    return z, tape


def _pinv_backward(a: Tensor, tape: list[Tensor], grad: Tensor) -> Tensor:
    """``dA`` from ``dZ`` through :func:`_pinv_forward` (the same as autograd's, norms' maxima included)."""
    d_a = torch.zeros_like(a)
    d_z = grad
    for i in range(len(tape) - 5, 1, -5):
        z, p, u, v, w = tape[i : i + 5]
        d_w = torch.bmm(z.transpose(-1, -2), d_z)
        d_z_prev = torch.bmm(d_z, w.transpose(-1, -2))
        d_v = torch.bmm(p.transpose(-1, -2), d_w).mul_(-0.25)
        # dP from W = ¼(13I − P V), V = 15I − P U and U = 7I − P
        d_p = torch.bmm(d_w, v.transpose(-1, -2)).mul_(-0.25)
        d_p.baddbmm_(d_v, u.transpose(-1, -2), alpha=-1.0).baddbmm_(p.transpose(-1, -2), d_v)
        d_a.baddbmm_(d_p, z.transpose(-1, -2))
        d_z = d_z_prev.baddbmm_(a.transpose(-1, -2), d_p)
    # Z₀ = Aᵀ / clamp(c), c = max column sum · max row sum of |A| (ties share the gradient, as amax's)
    c, z0 = tape[0], tape[1]
    tiny = torch.finfo(a.dtype).tiny
    d_a.add_(d_z.transpose(-1, -2) / c.clamp(min=tiny)[:, None, None])
    d_c = -(d_z * z0).sum(dim=(-1, -2)) / c.clamp(min=tiny) * (c >= tiny)
    magnitude = a.abs()
    cols, rows = magnitude.sum(dim=-2), magnitude.sum(dim=-1)
    norm_1, norm_inf = cols.amax(dim=-1, keepdim=True), rows.amax(dim=-1, keepdim=True)
    at_1, at_inf = (cols == norm_1).to(a.dtype), (rows == norm_inf).to(a.dtype)
    d_cols = at_1 * (d_c[:, None] * norm_inf / at_1.sum(dim=-1, keepdim=True))
    d_rows = at_inf * (d_c[:, None] * norm_1 / at_inf.sum(dim=-1, keepdim=True))
    return d_a.add_((d_cols[:, None, :] + d_rows[:, :, None]) * a.sign())


class _IterativePinv(torch.autograd.Function):
    """:func:`_pinv_forward` with its hand-written backward (autograd's: 5 ms per call at m = 64, H = 8, mostly
    overhead around the 64×64 products)."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, iterations: int) -> Tensor:
        z, tape = _pinv_forward(a, iterations)
        ctx.save_for_backward(a)
        ctx.tape = tape
        return z

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: Any) -> tuple[Tensor | None, ...]:
        (a,) = ctx.saved_tensors
        return _pinv_backward(a, ctx.tape, grads[0]), None


def iterative_pinv(a: Tensor, iterations: int) -> Tensor:
    """The Nyströmformer pseudo-inverse iteration for ``a (…, m, m)``, per matrix.

    ``Z ← ¼ Z (13I − AZ (15I − AZ (7I − AZ)))`` from ``Z₀ = Aᵀ / (‖A‖₁ ‖A‖∞)``.
    """
    shape, m = a.shape, a.shape[-1]
    a = a.reshape(-1, m, m)
    if torch.is_grad_enabled() and a.requires_grad:
        return _IterativePinv.apply(a, iterations).reshape(shape)
    return _pinv_forward(a, iterations)[0].reshape(shape)


def _both(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a & b


@register(
    "nystrom",
    approximate_capabilities(
        "low_rank",
        # measured max 0.57 (median 0.44) on the contract's structured inputs at num_landmarks=16;
        # re-measured in test_kernel_family.py
        error_budget=0.65,
        summary="Nyströmformer, segment-mean landmarks + iterative pseudo-inverse (Xiong et al. 2021)",
    ),
    small_options={"num_landmarks": 16},
    benchmark_options={"num_landmarks": 64},
)
class NystromAttention(AttentionMechanism):
    """Nyström attention.

    Args:
        num_landmarks: ``m``, landmarks for queries and for keys.
        pinv_iterations: steps of the pseudo-inverse iteration (6 in the paper).
    """

    no_causal_reason = NO_CAUSAL_REASON

    def __init__(self, *, num_landmarks: int = 64, pinv_iterations: int = 6) -> None:
        super().__init__()
        self.num_landmarks = check_positive_int("num_landmarks", num_landmarks, example=64)
        self.pinv_iterations = check_positive_int("pinv_iterations", pinv_iterations, example=6)

    def _attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        causal: bool,
        attention_mask: Tensor | None,
        mask: MaskFunction | None,
        score_bias: ScoreBias | None,
        **call_kwargs: Any,
    ) -> Tensor:
        scale = q.shape[-1] ** -0.5
        m = self.num_landmarks
        if attention_mask is None and q.shape[2] % m == 0 and k.shape[2] % m == 0:
            if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
                return _WholeRunsNystrom.apply(q, k, v, m, scale, self.pinv_iterations)
            return _whole_runs_forward(q, k, v, m, scale, self.pinv_iterations, keep=False)[0]
        # the 1/√D scale goes on the (m, D) landmarks, never on a copy of the (T, D) queries
        q_land, q_ok = segment_means(q, None, m)  # (B, H, m, D), (B, m) or None
        q_land = q_land * scale
        k_land, k_ok = segment_means(k, attention_mask, m)

        # masks (None = nothing to mask): landmark keys that exist, landmark queries that exist, real keys
        k_cols = k_ok[:, None, None, :] if k_ok is not None else None
        q_rows = q_ok[:, None, :, None] if q_ok is not None else None
        real_k = attention_mask[:, None, None, :] if attention_mask is not None else None
        kernel_1 = masked_softmax(q @ (k_land * scale).transpose(-1, -2), k_cols)  # (B, H, T, m)
        kernel_2 = masked_softmax(q_land @ k_land.transpose(-1, -2), _both(k_cols, q_rows))  # (B, H, m, m)
        kernel_3 = masked_softmax(q_land @ k.transpose(-1, -2), _both(real_k, q_rows))  # (B, H, m, S)
        # right to left: never an (N, N) or (N, m)·(m, N) product
        return kernel_1 @ (iterative_pinv(kernel_2, self.pinv_iterations) @ (kernel_3 @ v))
