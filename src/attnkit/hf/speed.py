"""Speed and memory of Transformers causal LMs at long contexts, measured side by side.

For each context length ``T`` and each model:

- ``train_ms``: one forward and backward pass (next-token cross-entropy) on a ``(1, T)`` batch;
  ``train_peak_mb`` its peak extra memory (:class:`~attnkit.metrics.memory.PeakMemoryMeter`:
  the CUDA allocator's peak, or the resident-set high-water mark on Linux CPUs);
- ``decode_ms_per_token``: after a ``T``-token prefill (untimed), the time per new token of
  ``decode_tokens`` greedy steps with the cache (:func:`attnkit.hf.new_cache` for converted
  models, so recurrent mechanisms decode from their O(1) state); ``decode_peak_mb`` the peak
  extra memory of the prefill and the steps.

Models are measured in alternating rounds (every model once per round, the order reversed every
other round, after one untimed warm-up round at the first length) and each figure is the median over rounds, so a
machine getting busier affects every model alike; ``spread`` is the slowest round over the fastest.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

#: Metric names, in report order.
METRICS = ("train_ms", "train_peak_mb", "decode_ms_per_token", "decode_peak_mb")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def _tokens(model: nn.Module, length: int, device: torch.device) -> torch.Tensor:
    config: Any = model.config
    vocab = int(config.vocab_size)
    generator = torch.Generator().manual_seed(length)
    return torch.randint(0, vocab, (1, length), generator=generator).to(device)


def train_step(model: nn.Module, ids: torch.Tensor) -> None:
    """One forward and backward pass of next-token cross-entropy (gradients freed after)."""
    logits = model(input_ids=ids, use_cache=False).logits  # (1, T, V)
    loss = nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
    loss.backward()
    model.zero_grad(set_to_none=True)


@torch.no_grad()
def decode(model: nn.Module, ids: torch.Tensor, new_tokens: int, device: torch.device) -> float:
    """Milliseconds per new token of ``new_tokens`` greedy cached steps after prefilling ``ids``."""
    import attnkit.hf

    converted: Any = model  # a PreTrainedModel; typed as a module like the rest of this file
    cache = attnkit.hf.new_cache(converted) if getattr(converted.config, "attnkit", None) else None
    out = model(input_ids=ids, cache=cache, use_cache=True)
    cache = out.cache
    token = out.logits[:, -1:].argmax(-1)

    def steps() -> None:
        nonlocal cache, token
        for _ in range(new_tokens):
            step = model(input_ids=token, cache=cache, use_cache=True)
            cache, token = step.cache, step.logits[:, -1:].argmax(-1)

    return _timed(steps, device) / new_tokens


def _measure_once(
    model: nn.Module, length: int, decode_tokens: int, device: torch.device, meter: Any
) -> dict[str, float | None]:
    ids = _tokens(model, length, device)
    with meter.track() as peak:
        elapsed = _timed(lambda: train_step(model, ids), device)
    values: dict[str, float | None] = {"train_ms": elapsed, "train_peak_mb": peak.mb}
    if decode_tokens:
        with meter.track() as peak:
            values["decode_ms_per_token"] = decode(model, ids, decode_tokens, device)
        values["decode_peak_mb"] = peak.mb
    return values


def measure(
    models: Mapping[str, nn.Module],
    lengths: Sequence[int],
    *,
    rounds: int = 3,
    decode_tokens: int = 8,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict[str, dict[str, dict[str, dict[str, float | None]]]]:
    """Median speed and memory of every model at every length.

    Args:
        models: name -> causal LM (left in eval mode: no dropout; gradients on for ``train_ms``).
        lengths: context lengths ``T``.
        rounds: timed rounds per length (after one warm-up round at the first length).
        decode_tokens: new tokens per decoding measurement (0: no decoding).
        device: where the models are.
        progress: show a progress bar.

    Returns:
        ``{name: {str(T): {"median": {metric: value}, "spread": {metric: slowest / fastest}}}}``.
    """
    from tqdm import tqdm

    from attnkit.compress.report import summarise  # one median/spread rule for every report
    from attnkit.core.errors import check_non_negative_int, check_positive_int
    from attnkit.metrics.memory import PeakMemoryMeter

    check_positive_int("rounds", rounds, example=3)
    check_non_negative_int("decode_tokens", decode_tokens)
    device = torch.device(device)
    meter = PeakMemoryMeter(str(device))
    names = list(models)
    for model in models.values():
        model.eval()
    samples: dict[str, dict[int, list[dict[str, float | None]]]] = {n: {t: [] for t in lengths} for n in names}
    # One untimed warm-up round, at the first length only (it warms allocators and lazily built
    # kernels up; repeating it at every length would double the cost of the longest contexts).
    plan = [(lengths[0], -1)] + [(length, r) for length in lengths for r in range(rounds)]
    bar = tqdm(total=len(plan) * len(names), disable=not progress, desc="measure speed", unit="run", dynamic_ncols=True)
    try:
        for length, round_index in plan:
            order = names if round_index % 2 == 0 else names[::-1]
            for name in order:
                bar.set_postfix(length=length, model=name)
                values = _measure_once(models[name], length, decode_tokens, device, meter)
                if round_index >= 0:
                    samples[name][length].append(values)
                bar.update(1)
    finally:
        bar.close()
    return {n: {str(t): summarise(rows) for t, rows in per_length.items()} for n, per_length in samples.items()}
