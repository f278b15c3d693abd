"""What each mechanism attends to, as a matrix to draw.

Exact mechanisms declare the boolean pattern they compute softmax over
(:meth:`AttentionMechanism.pattern`; None means all keys, under causality if asked).
Approximate mechanisms have no fixed pattern, but their output is linear in the values,
so feeding the identity matrix as values reads off the *effective* attention matrix:
with ``v = I`` the output row ``i`` is exactly the weights query ``i`` gives each key.
The mechanism runs at its ``small_options`` so its structure is visible at a length
that fits in a picture.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

import attnkit
from attnkit.attention.reference import reference_attention
from attnkit.inputs import self_attention_qkv
from attnkit.masks.functions import materialize

#: Side of the pictured matrix (queries = keys = values' width, so ``v`` is square).
PATTERN_LENGTH = 64


@dataclass(frozen=True)
class PatternPicture:
    """One mechanism's attention, ready to draw.

    Attributes:
        name: mechanism name.
        causal: which mode the matrix is for.
        matrix: ``(L, L)`` float: the boolean pattern (exact mechanisms) as 0/1, or the
            absolute effective weights (approximate ones).
        kind: ``"pattern"`` or ``"effective weights"``.
    """

    name: str
    causal: bool
    matrix: Tensor
    kind: str


def attention_picture(name: str, *, causal: bool, length: int = PATTERN_LENGTH, seed: int = 0) -> PatternPicture:
    """The pattern or effective attention matrix of mechanism ``name``.

    Raises:
        ValueError: unknown name, or ``causal=True`` for a mechanism without a causal mode.
    """
    spec = attnkit.get_spec(name)
    if causal and not spec.capabilities.causal:
        raise ValueError(f"attention {name!r} has no causal mode; draw it with causal=False")
    module = attnkit.build_attention(name, **spec.small_options).eval()
    if spec.capabilities.exact:
        mask = module.pattern(length, length, causal=causal)
        if mask is None:
            dense = torch.ones(length, length, dtype=torch.bool)
            matrix = dense.tril() if causal else dense
        else:
            matrix = materialize(mask, 1, 1, length, length)[0, 0]
        return PatternPicture(name, causal, matrix.float(), "pattern")
    return PatternPicture(
        name, causal, effective_weights(module, causal=causal, length=length, seed=seed), "effective weights"
    )


def effective_weights(module: torch.nn.Module, *, causal: bool, length: int = PATTERN_LENGTH, seed: int = 0) -> Tensor:
    """``|A|`` with ``A (length, length)`` read off ``module`` by feeding identity values.

    ``module`` is any callable ``(q, k, v, causal=...)`` whose output is linear in ``v``;
    ``q`` and ``k`` are the arena's headline fidelity inputs (self-attention over smooth
    hidden states, :func:`attnkit.inputs.self_attention_qkv`), one head of width ``length``.
    """
    q, k, _ = self_attention_qkv(1, 1, length, length, seed=seed)
    identity = torch.eye(length).view(1, 1, length, length)  # v = I  =>  out = attention weights
    torch.manual_seed(seed)
    with torch.no_grad():
        weights = module(q, k, identity, causal=causal)[0, 0]
    return weights.abs().float()


def exact_weights(*, causal: bool, length: int = PATTERN_LENGTH, seed: int = 0) -> PatternPicture:
    """Exact softmax weights on the same inputs: what the approximations are aiming at."""

    def softmax_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool) -> Tensor:
        return reference_attention(q, k, v, causal=causal)

    matrix = effective_weights(softmax_attention, causal=causal, length=length, seed=seed)  # type: ignore[arg-type]
    return PatternPicture("exact softmax", causal, matrix, "reference weights")
