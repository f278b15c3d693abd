"""How many bytes a mechanism's decoding state holds after ``length`` tokens: measured, not modelled.

The mechanism is built, given a fresh :meth:`~attnkit.core.base.AttentionMechanism.new_state`,
and fed ``length`` random tokens through :meth:`~attnkit.core.base.AttentionMechanism.decode`
(one prefill call); the bytes are those of every tensor the state then holds. A key/value cache
(:class:`~attnkit.core.base.KVState`) grows with the length, a rolling window stops at its
capacity, a recurrent state (:class:`~attnkit.kernels.recurrent.PrefixState`) stays ``F x (Dv + 1)``
per head: Zoology's recall-vs-state axis. Counted: the filled part of a cache, not the head-room
its preallocated stores keep for the next tokens (fields named ``*_store``), so the figure is what
the state must hold, whatever the allocator rounds it up to.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

import attnkit


def state_tensors(state: Any) -> list[Tensor]:
    """The distinct tensors a decoding state holds (``*_store`` capacity fields left out)."""
    found: dict[tuple[int, tuple[int, ...]], Tensor] = {}

    def visit(value: Any) -> None:
        if isinstance(value, Tensor):
            found.setdefault((value.data_ptr(), tuple(value.shape)), value)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            for f in dataclasses.fields(value):
                if not f.name.endswith("_store"):
                    visit(getattr(value, f.name))
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)

    visit(state)
    return list(found.values())


def tensor_bytes(tensors: list[Tensor]) -> int:
    """Bytes of ``tensors``' elements."""
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.no_grad()
def decoding_state_bytes(
    name: str,
    options: dict[str, Any],
    *,
    length: int,
    heads: int,
    head_dim: int,
    dtype: torch.dtype = torch.float32,
) -> int | None:
    """Bytes of one attention layer's decoding state for one sequence after ``length`` tokens.

    Args:
        name: a registered mechanism.
        options: its options.
        length: tokens decoded.
        heads: attention heads ``H``.
        head_dim: ``D`` per head (values too).
        dtype: of the keys and values fed.

    Returns:
        The bytes, or None when the mechanism has no decoding state (it recomputes the prefix).

    Raises:
        ValueError: a bad length, or options the mechanism refuses.
    """
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive integer, got {length!r}")
    if attnkit.attention_capabilities(name).decoding is None:
        return None
    torch.manual_seed(0)
    module = attnkit.build_attention(name, **options).eval()
    q, k, v = torch.randn(3, 1, heads, length, head_dim, dtype=dtype).unbind(0)  # each (1, H, T, D)
    state = module.new_state()
    module.decode(q, k, v, state)
    return tensor_bytes(state_tensors(state))
