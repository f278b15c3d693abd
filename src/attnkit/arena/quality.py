"""Quality cells: train a small model per mechanism on a task for a fixed budget.

A cell trains :class:`~attnkit.arena.tiny_model.TinyTransformer` with the mechanism at
its ``small_options`` (so its approximation actually bites at the task's short length)
for ``train_steps`` AdamW steps (one fresh batch each), then evaluates on batches of the
disjoint validation split. Seeds fix the data, the initialisation and every
random feature, so a cell is reproducible on one machine.

Tasks (see :mod:`attnkit.arena.tasks`):

- ``mqar``: multi-query associative recall, accuracy at the query positions.
- ``listops``: ListOps with short sequences, accuracy of the 10-way label.
- ``lm``: character-level language modelling on the built-in text corpus, bits per
  character on held-out text (causal; mechanisms without a causal mode sit it out).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F

import attnkit
from attnkit.arena.config import ArenaConfig
from attnkit.arena.tasks import Batch, QualityTask, get_task
from attnkit.arena.tiny_model import TinyTransformer
from attnkit.data.tasks import IGNORE_INDEX


def task_is_causal(task: str) -> bool:
    """Whether ``task`` needs a causal mechanism (only language modelling does)."""
    return task == "lm"


def quality_params(cfg: ArenaConfig, task: str) -> dict[str, Any]:
    """The parameters that identify a quality cell (part of its cache key)."""
    return {
        "task": task,
        "steps": cfg.train_steps,
        "eval_batches": cfg.eval_batches,
        "dim": cfg.model_dim,
        "depth": cfg.model_depth,
        "heads": cfg.model_heads,
        "length": cfg.task_length,
        "batch_size": cfg.batch_size,
        "learning_rate": get_task(task, length=cfg.task_length).learning_rate,
        "seed": cfg.seed,
        "device": cfg.device.split(":")[0],
    }


#: Options that fix a mechanism's maximum sequence length (raised to the task length when smaller).
LENGTH_OPTIONS = ("max_len", "max_length", "seq_len")


def quality_options(name: str, cfg: ArenaConfig) -> dict[str, Any]:
    """The mechanism's ``small_options``, with any fixed maximum length raised to ``cfg.task_length``.

    Small options are sized for the contract suite's ~40-token inputs; a mechanism that
    needs its length up front (Linformer's projections) must accept the task's length.
    """
    options = dict(attnkit.get_spec(name).small_options)
    accepted = attnkit.accepted_options(name)
    for key in LENGTH_OPTIONS:
        if key in accepted:
            current = options.get(key, accepted[key])
            if not isinstance(current, int) or current < cfg.task_length:
                options[key] = cfg.task_length
    return options


def fidelity_options(name: str, cfg: ArenaConfig) -> dict[str, Any]:
    """The mechanism's ``benchmark_options`` with any fixed maximum length set to ``cfg.fidelity_length``.

    A mechanism built for longer inputs than it is given (Linformer with ``max_len=16384`` on
    1024 tokens) would leave most of its projection unused; sized to the input, as its own
    benchmark builds it, the error measures the approximation rather than that mismatch.
    """
    options = dict(attnkit.get_spec(name).benchmark_options)
    accepted = attnkit.accepted_options(name)
    for key in LENGTH_OPTIONS:
        if key in accepted:
            options[key] = cfg.fidelity_length
    return options


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)


def train_quality_cell(name: str, options: dict[str, Any], task_name: str, cfg: ArenaConfig) -> dict[str, Any]:
    """Train and evaluate one (mechanism, task) cell.

    On CPU the cell runs on one thread: a model this small gains nothing from intra-op
    parallelism, and on a busy machine extra threads only contend (measured 15x slower
    with two threads on a loaded 2-core box).

    Returns:
        ``{"status": "ok", "metric", "value", "final_loss", "train_seconds"}``, or
        ``{"status": "error", "error": message}`` when the mechanism raised.
    """
    threads = torch.get_num_threads()
    if not cfg.device.startswith("cuda"):
        torch.set_num_threads(1)
    try:
        return _train(name, options, task_name, cfg)
    finally:
        torch.set_num_threads(threads)


def _train(name: str, options: dict[str, Any], task_name: str, cfg: ArenaConfig) -> dict[str, Any]:
    task = get_task(task_name, length=cfg.task_length)
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    try:
        model = TinyTransformer(
            vocab_size=task.vocab_size,
            num_outputs=task.num_outputs,
            dim=cfg.model_dim,
            depth=cfg.model_depth,
            heads=cfg.model_heads,
            max_len=cfg.task_length,
            attention=name,
            options=options,
            causal=task.causal,
            pooled=task.pooled,
            mask_padding=attnkit.attention_capabilities(name).key_padding,
        ).to(device)
    except (ValueError, TypeError) as err:
        return {"status": "error", "error": f"{type(err).__name__}: {err}"}
    optimizer = torch.optim.AdamW(model.parameters(), lr=task.learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup(cfg.train_steps))
    train_batches = task.batches("train", cfg.train_steps, cfg.batch_size, cfg.seed)
    started = time.perf_counter()
    loss = torch.tensor(float("nan"))
    try:
        model.train()
        for batch in train_batches:
            tokens, targets, padding = _to(batch, device)
            loss = _loss(model(tokens, padding), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
        train_seconds = time.perf_counter() - started
        value = _evaluate(model, task, cfg, device)
    except (RuntimeError, ValueError, TypeError) as err:
        return {"status": "error", "error": f"{type(err).__name__}: {str(err).strip()[:300]}"}
    return {
        "status": "ok",
        "metric": task.metric,
        "value": value,
        "final_loss": float(loss.detach()),
        "train_seconds": round(train_seconds, 2),
    }


def task_baseline(task_name: str, cfg: ArenaConfig) -> dict[str, Any]:
    """What a model that ignores the context scores on a task's validation batches.

    Accuracy tasks: always answering the most frequent training target (majority class);
    language modelling: a unigram (character frequency) model fit on the training batches,
    add-one smoothed. A trained cell that does not beat this has learned nothing about
    the sequence, whatever its mechanism.

    Returns:
        ``{"metric", "value", "what"}``.
    """
    task = get_task(task_name, length=cfg.task_length)
    counts = torch.zeros(task.num_outputs, dtype=torch.float64)
    for _, targets, _ in task.batches("train", cfg.train_steps, cfg.batch_size, cfg.seed):
        kept = targets[targets != IGNORE_INDEX]
        counts += torch.bincount(kept.reshape(-1), minlength=task.num_outputs).double()
    val = torch.cat(
        [
            t[t != IGNORE_INDEX].reshape(-1)
            for _, t, _ in task.batches("validation", cfg.eval_batches, cfg.batch_size, cfg.seed)
        ]
    )
    if task.metric == "accuracy":
        value = float((val == counts.argmax()).double().mean())
        return {"metric": task.metric, "value": value, "what": "majority class"}
    probs = (counts + 1) / (counts + 1).sum()
    value = float(-probs[val].log2().mean())
    return {"metric": task.metric, "value": value, "what": "unigram model"}


def _to(batch: Batch, device: torch.device) -> Batch:
    tokens, targets, padding = batch
    return tokens.to(device), targets.to(device), None if padding is None else padding.to(device)


def _warmup(steps: int) -> Any:
    # Linear warm-up over the first 10% of steps, then constant: with a budget this short a
    # decaying rate stalls the exact model just before it learns MQAR's look-up (measured).
    warmup = max(1, steps // 10)
    return lambda step: min(1.0, (step + 1) / warmup)


@torch.no_grad()
def _evaluate(model: TinyTransformer, task: QualityTask, cfg: ArenaConfig, device: torch.device) -> float:
    """Accuracy over target positions, or bits per character, on held-out batches."""
    model.eval()
    correct = total = 0
    nll = 0.0
    for batch in task.batches("validation", cfg.eval_batches, cfg.batch_size, cfg.seed):
        tokens, targets, padding = _to(batch, device)
        logits = model(tokens, padding)
        keep = targets != IGNORE_INDEX
        if task.metric == "accuracy":
            correct += int((logits.argmax(-1)[keep] == targets[keep]).sum())
        else:
            nll += float(F.cross_entropy(logits[keep], targets[keep], reduction="sum"))
        total += int(keep.sum())
    if task.metric == "accuracy":
        return correct / max(1, total)
    return nll / max(1, total) / math.log(2)
