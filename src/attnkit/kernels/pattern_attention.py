"""Base class of the exact sparse mechanisms: one pattern, two backends.

A subclass states its pattern twice, as data for each backend: :meth:`pattern` (a
:class:`~attnkit.masks.Mask`, the dense oracle and FlexAttention's ``mask_mod``) and
:meth:`_blocked` (the :mod:`attnkit.kernels.blocked` gather core). ``backend`` picks:

- ``"blocked"``: the gather core; forward and backward on any device, ``O(T·W)``.
- ``"flex"``: FlexAttention under ``torch.compile``; on CPU only without gradients
  (torch 2.13 has no CPU backward for it).
- ``"auto"`` (default): FlexAttention on GPU, the blocked core on CPU, where it is the
  faster of the two for these patterns (``benchmarks/results/sparse.md``).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from torch import Tensor

from attnkit.core.base import AttentionMechanism
from attnkit.core.errors import check_choice, check_positive_float
from attnkit.core.types import ScoreBias
from attnkit.kernels.flex import flex_pattern_attention
from attnkit.masks.functions import Mask

BACKENDS = ("auto", "blocked", "flex")


class PatternAttention(AttentionMechanism):
    """Dispatches an exact sparse pattern to the blocked core or to FlexAttention.

    Args:
        backend: ``"auto"``, ``"blocked"`` or ``"flex"`` (see the module docstring).
        scale: score scale; default ``1/sqrt(D)``.
    """

    def __init__(self, *, backend: str = "auto", scale: float | None = None) -> None:
        super().__init__()
        self.backend = check_choice("backend", backend, BACKENDS)
        self.scale = None if scale is None else check_positive_float("scale", scale)

    def resolved_backend(self, q: Tensor) -> str:
        """The backend a call on ``q`` will use."""
        if self.backend != "auto":
            return self.backend
        return "flex" if q.is_cuda else "blocked"

    def _attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        causal: bool,
        attention_mask: Tensor | None,
        mask: Mask | None,
        score_bias: ScoreBias | None,
        **call_kwargs: Any,
    ) -> Tensor:
        if self.resolved_backend(q) == "flex":
            needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
            if needs_grad and q.device.type == "cpu":
                raise ValueError(
                    f"attention {self.name!r}: backend='flex' has no backward on CPU in this torch; "
                    "use backend='blocked' (or 'auto') for training on CPU"
                )
            pattern = self.pattern(q.shape[2], k.shape[2], causal=causal, **call_kwargs)
            assert pattern is not None
            return flex_pattern_attention(
                q, k, v, pattern, attention_mask=attention_mask, score_bias=score_bias, scale=self.scale
            )
        return self._blocked(
            q, k, v, causal=causal, attention_mask=attention_mask, score_bias=score_bias, **call_kwargs
        )

    @abstractmethod
    def _blocked(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        causal: bool,
        attention_mask: Tensor | None,
        score_bias: ScoreBias | None,
        **call_kwargs: Any,
    ) -> Tensor:
        """The pattern on the blocked core; same arguments as :meth:`_attend` (``T <= S``)."""
