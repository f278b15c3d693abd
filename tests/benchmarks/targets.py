"""Measurement targets for the harness tests: closures that record their calls instead of doing work."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

CALLS: list[str] = []


def recorder(length: int, causal: bool, *, name: str) -> Callable[[], torch.Tensor]:
    """A closure that appends ``name`` to :data:`CALLS` each time it runs."""

    def run() -> torch.Tensor:
        CALLS.append(name)
        return torch.zeros(1)

    run.info = lambda: {"calls": CALLS.count(name), "length": length}  # type: ignore[attr-defined]
    return run


def sleeper(length: int, causal: bool, *, seconds: float) -> Callable[[], torch.Tensor]:
    """A closure that sleeps ``seconds`` per step (a slow case for the time-budget rules)."""

    def run() -> torch.Tensor:
        CALLS.append("sleep")
        time.sleep(seconds)
        return torch.zeros(1)

    return run
