"""Choosing the next token from logits: greedy, temperature, top-k and nucleus (top-p) sampling.

Nucleus sampling: Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration"
(arXiv:1904.09751): keep the smallest set of most likely tokens whose probability
reaches ``top_p``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


def argument_name(names: Mapping[str, str] | None, name: str) -> str:
    """How to call argument ``name`` in an error: ``names[name]`` (e.g. a command-line flag) or ``name``."""
    return names.get(name, name) if names else name


def check_sampling(
    temperature: float | None,
    top_k: int | None,
    top_p: float | None,
    *,
    names: Mapping[str, str] | None = None,
) -> None:
    """Validate sampling settings; each error names the argument.

    Args:
        temperature, top_k, top_p: as in :func:`filter_logits`.
        names: how to call each argument in the errors (``{"top_k": "--top-k"}`` for a
            command line); default: the Python names.

    Raises:
        ValueError: ``temperature < 0``, ``top_k < 1`` or ``top_p`` outside ``(0, 1]``.
    """
    if temperature is not None and (
        isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0
    ):
        name = argument_name(names, "temperature")
        raise ValueError(f"{name} must be a number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"{argument_name(names, 'top_k')} must be a positive integer, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"{argument_name(names, 'top_p')} must be a number in (0, 1], got {top_p!r}")


def filter_logits(
    logits: Tensor, *, temperature: float | None = None, top_k: int | None = None, top_p: float | None = None
) -> Tensor:
    """Scale by ``1/temperature`` and set every token outside top-k / the nucleus to ``-inf``.

    Args:
        logits: ``(N, V)``.
        temperature: divide the logits by this (> 0); None leaves them.
        top_k: keep the ``top_k`` largest logits per row (ties at the boundary kept).
        top_p: keep the smallest prefix of tokens, by decreasing probability, whose total
            probability reaches ``top_p`` (always at least the most likely token).

    Returns:
        float32 ``(N, V)`` filtered logits.
    """
    check_sampling(temperature, top_k, top_p)
    out = logits.float()
    if temperature is not None and temperature > 0:
        out = out / temperature
    if top_k is not None and top_k < out.shape[-1]:
        kth = out.topk(top_k, dim=-1).values[..., -1:]  # (N, 1)
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = out.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # A token is dropped when the tokens before it already reach top_p.
        before = probs.cumsum(dim=-1) - probs
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def next_tokens(
    logits: Tensor,
    *,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick one token per row of ``logits (N, V)``; returns long ``(N,)``.

    Greedy (argmax) unless a sampling setting is given; ``temperature=0`` is greedy too.
    Sampling draws from ``generator`` when given (reproducible runs).
    """
    sampling = (temperature is not None and temperature > 0) or top_k is not None or top_p is not None
    if temperature == 0 or not sampling:
        check_sampling(temperature, top_k, top_p)
        return logits.argmax(dim=-1)
    filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    probs = filtered.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
