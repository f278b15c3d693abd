"""Reversible residual layers (Reformer, Kitaev et al. 2020, arXiv:2001.04451; RevNet, Gomez et al. 2017).

The residual stream is split into two copies ``(a, b)``, both starting as the input.
Branches alternate: the first updates ``a ← a + f(b)``, the next ``b ← b + g(a)``, and
so on through every layer (attention, cross-attention and feed-forward branches alike).
Each step can be undone exactly from its outputs (``a = a' - f(b)``), so the backward
pass rebuilds every layer's input from the final outputs instead of storing it:
activation memory no longer grows with depth. The output is ``(a + b) / 2``.

:class:`ReversibleFunction` is the custom autograd function doing this. Randomness is
replayed exactly: the RNG state before each branch is saved in the forward pass and
restored when the branch is recomputed, so dropout masks (and any random projections a
mechanism draws) are the same, and gradients equal those of ordinary autograd through
the same coupling (:func:`coupled_forward`) up to floating-point reconstruction error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from attnkit.models.layers import LayerInputs


class RngState:
    """The CPU (and, for a CUDA tensor, that device's) random generator state at one moment."""

    def __init__(self, device: torch.device) -> None:
        self.cpu = torch.get_rng_state()
        self.device = device
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextmanager
    def restored(self) -> Iterator[None]:
        """Run a block with the saved state, leaving the caller's RNG state untouched afterwards."""
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def coupled_forward(branches: Sequence[nn.Module], a: Tensor, b: Tensor, inputs: LayerInputs, caches: Any) -> Tensor:
    """The reversible coupling with ordinary autograd (generation, and the parity reference).

    Args:
        branches: the residual branches, in order.
        a: ``(B, T, dim)`` first stream.
        b: ``(B, T, dim)`` second stream.
        inputs: the layers' side inputs.
        caches: a list with one cache (or None) per branch, or None.

    Returns:
        ``(B, T, dim)``: ``(a + b) / 2`` after every branch.
    """
    for i, branch in enumerate(branches):
        cache = caches[i] if caches is not None else None
        if i % 2 == 0:
            a = a + branch(b, inputs, cache)
        else:
            b = b + branch(a, inputs, cache)
    return (a + b) / 2


class ReversibleFunction(torch.autograd.Function):
    """Runs the coupling without storing activations; rebuilds them in backward.

    ``apply(a, b, context, branches, inputs, *params) -> (a_out, b_out)`` where ``params``
    are every trainable parameter of ``branches`` (so their gradients are returned here).
    """

    @staticmethod
    def forward(
        ctx: Any,
        a: Tensor,
        b: Tensor,
        context: Tensor | None,
        branches: Sequence[nn.Module],
        inputs: LayerInputs,
        *params: Tensor,
    ) -> tuple[Tensor, Tensor]:
        rng_states = []
        for i, branch in enumerate(branches):
            rng_states.append(RngState(a.device))
            if i % 2 == 0:
                a = a + branch(b, inputs, None)
            else:
                b = b + branch(a, inputs, None)
        ctx.branches = branches
        ctx.inputs = inputs
        ctx.rng_states = rng_states
        ctx.has_context = context is not None
        ctx.save_for_backward(a, b, *([context] if context is not None else []))
        ctx.params = params
        return a, b

    @staticmethod
    def backward(ctx: Any, grad_a: Tensor | None, grad_b: Tensor | None) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        a, b = saved[0].detach(), saved[1].detach()
        grad_a = torch.zeros_like(a) if grad_a is None else grad_a
        grad_b = torch.zeros_like(b) if grad_b is None else grad_b
        context = saved[2].detach().requires_grad_(True) if ctx.has_context else None
        inputs = dataclasses.replace(ctx.inputs, context=context)
        index = {id(p): i for i, p in enumerate(ctx.params)}
        param_grads: list[Tensor | None] = [None] * len(ctx.params)
        grad_context: Tensor | None = None

        for i in reversed(range(len(ctx.branches))):
            branch = ctx.branches[i]
            updates_a = i % 2 == 0
            source = (b if updates_a else a).detach().requires_grad_(True)
            own = [p for p in branch.parameters() if id(p) in index]
            with torch.enable_grad(), ctx.rng_states[i].restored():
                out = branch(source, inputs, None)
            targets = [source, *own] + ([context] if context is not None else [])
            grads = torch.autograd.grad(out, targets, grad_a if updates_a else grad_b, allow_unused=True)
            with torch.no_grad():
                # Undo the step: the updated stream's input is its output minus the branch.
                if updates_a:
                    a = a - out
                    grad_b = grad_b + grads[0]
                else:
                    b = b - out
                    grad_a = grad_a + grads[0]
            for p, g in zip(own, grads[1 : 1 + len(own)]):
                if g is not None:
                    j = index[id(p)]
                    previous = param_grads[j]
                    param_grads[j] = g if previous is None else previous + g
            if context is not None and grads[-1] is not None:
                grad_context = grads[-1] if grad_context is None else grad_context + grads[-1]
        return (grad_a, grad_b, grad_context, None, None, *param_grads)


def reversible_forward(
    branches: Sequence[nn.Module], x: Tensor, inputs: LayerInputs, *, recompute: bool = True
) -> Tensor:
    """Run ``branches`` reversibly on ``x (B, T, dim)``; returns ``(B, T, dim)``.

    With ``recompute`` and gradients enabled, activations are rebuilt in backward
    (:class:`ReversibleFunction`); otherwise ordinary autograd runs the same coupling.
    """
    if not (recompute and torch.is_grad_enabled()):
        return coupled_forward(branches, x, x, inputs, None)
    params = [p for branch in branches for p in branch.parameters() if p.requires_grad]
    a, b = ReversibleFunction.apply(x, x, inputs.context, branches, inputs, *params)
    return (a + b) / 2
