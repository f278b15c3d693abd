"""Quality cells: train a small public model per mechanism on a task for a fixed budget.

A cell builds the :mod:`attnkit.models` model the task needs (:func:`build_model`: a
:class:`~attnkit.models.MaskedLanguageModel`, :class:`~attnkit.models.SequenceClassifier` or
:class:`~attnkit.models.LanguageModel`, chosen by the task's kind) with the mechanism at its
``small_options`` (so its approximation actually bites at the task's short length), rotary
positions and the token shift (:data:`attnkit.arena.config.TOKEN_SHIFT`, or the suite task's own width), and trains it for ``train_steps`` steps
(one fresh batch each) through :func:`attnkit.train.loop_api.train_on_batches`: the trainer's
AdamW groups, schedule, clipping and post-step hooks, so online mechanism state (Routing's
k-means centroids) moves as it does in ``attnkit train``. It then evaluates on batches of the
disjoint validation split. Seeds fix the data, the initialisation and every random feature,
so a cell is reproducible on one machine.

Tasks (see :mod:`attnkit.arena.tasks`):

- ``mqar``: multi-query associative recall, accuracy at the query positions.
- ``listops``: ListOps with short sequences, accuracy of the 10-way label.
- ``lm``: character-level language modelling on the built-in text corpus, bits per
  character on held-out text (causal; mechanisms without a causal mode sit it out).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import attnkit
from attnkit.arena.config import ArenaConfig
from attnkit.arena.tasks import QualityTask, get_task
from attnkit.data.tasks import IGNORE_INDEX, Batch
from attnkit.models import TransformerConfig
from attnkit.train.loop_api import train_on_batches
from attnkit.train.modeling import forward, model_class

#: Where a mechanism cannot mask padding, the note its cells carry (the task's padding is then fed as tokens).
UNMASKED_NOTE = (
    "no padding mask: the mechanism cannot honour one, so it attends to the pad tokens and the "
    "classifier's mean pools over them"
)


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
        "token_shift": cfg.model_token_shift,
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


#: Options that set how much of the sequence one query sees (a window, a block, kept keys, landmarks).
SIZE_OPTIONS = ("window", "block_size", "stride", "cols", "topk", "proj_len", "num_landmarks", "bucket_size")

#: Sizes that must shrink together, each dividing the next (NSA's compression stride, compressed
#: block and selection block): halved together until the largest is at most an eighth of the length.
LINKED_SIZES = ("compress_stride", "compress_block", "select_block")

#: Options that count blocks a query attends: ``{option: (the option sizing those blocks, least value)}``.
#: Capped at a quarter of the blocks the task's length holds; left as benchmarked, top-8 of the eight
#: 14-token blocks of a 112-token MQAR input is every block, i.e. exact attention.
COUNT_OPTIONS = {
    "topk_blocks": ("block_size", 1),
    "num_random_blocks": ("block_size", 1),
    "select_blocks": ("select_block", 3),  # NSA: its own block, the first, and at least one chosen
}


def suite_options(name: str, length: int) -> dict[str, Any]:
    """The mechanism's options in the quality suite at sequence length ``length``.

    Its ``benchmark_options`` (sized for 1K-64K), scaled down so that the approximation bites at
    the suite's reduced lengths as it does at LRA's (LRA's local attention saw 256 of 1K-4K tokens),
    where unchanged a 256-key window or the top 8 of 8 blocks would be exact attention:

    - each :data:`SIZE_OPTIONS` value capped at ``length // 8`` (never below its ``small_options`` value);
    - :data:`LINKED_SIZES` halved together until the largest fits that cap, or until one would fall
      below its ``small_options`` value or stop dividing evenly (their divisibility kept);
    - each :data:`COUNT_OPTIONS` count capped at a quarter of the ``length / block`` blocks;
    - any fixed maximum length set to ``length``.
    """
    spec = attnkit.get_spec(name)
    options = dict(spec.benchmark_options)
    small = spec.small_options
    cap = length // 8
    for key in SIZE_OPTIONS:
        if isinstance(options.get(key), int):
            options[key] = max(min(options[key], cap), small.get(key, 1))
    linked = [key for key in LINKED_SIZES if isinstance(options.get(key), int)]
    while linked and max(options[k] for k in linked) > cap:
        if any(options[k] % 2 or options[k] // 2 < small.get(k, 1) for k in linked):
            break
        for key in linked:
            options[key] //= 2
    for key, (size_key, least) in COUNT_OPTIONS.items():
        if isinstance(options.get(key), int) and isinstance(options.get(size_key), int):
            blocks = -(-length // options[size_key])
            options[key] = max(min(options[key], blocks // 4), least)
    for key in LENGTH_OPTIONS:
        if key in attnkit.accepted_options(name):
            options[key] = length
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


def model_config(name: str, options: dict[str, Any], task: QualityTask, cfg: ArenaConfig) -> TransformerConfig:
    """The :class:`~attnkit.models.TransformerConfig` of a quality cell's model.

    Raises:
        ConfigFieldError: options the mechanism does not accept.
    """
    return TransformerConfig(
        vocab_size=task.vocab_size,
        dim=cfg.model_dim,
        depth=cfg.model_depth,
        heads=cfg.model_heads,
        attention=name,
        attention_options=options,
        max_len=cfg.task_length,
        position="rotary",  # relative positions make MQAR's look-up heads far quicker to learn
        token_shift=cfg.model_token_shift,
        # GPT-2's 0.02 is sized for wide models; at width 64 it leaves the exact model at chance on
        # MQAR after the 120-step budget, where dim ** -0.5 learns it (11% vs 99.4%, measured).
        init_std=cfg.model_dim**-0.5,
        num_classes=task.num_outputs if task.kind == "classification" else None,
    )


def build_model(name: str, options: dict[str, Any], task: QualityTask, cfg: ArenaConfig) -> nn.Module:
    """The model a quality cell trains, initialised from ``cfg.seed``.

    Raises:
        ValueError: the mechanism cannot be built with ``options``, or lacks a mode the model needs.
    """
    torch.manual_seed(cfg.seed)
    return model_class(task.kind)(model_config(name, options, task, cfg))


def train_quality_cell(
    name: str, options: dict[str, Any], task_name: str | QualityTask, cfg: ArenaConfig, *, step_time: bool = False
) -> dict[str, Any]:
    """Train and evaluate one (mechanism, task) cell.

    ``task_name`` is one of the arena's tasks (built at ``cfg.task_length``) or a suite task
    (:func:`attnkit.arena.tasks.suite_task`), trained with ``cfg``'s model size and budget.

    On CPU the cell runs on one thread: a model this small gains nothing from intra-op
    parallelism, and on a busy machine extra threads only contend (measured 15x slower
    with two threads on a loaded 2-core box).

    Returns:
        ``{"status": "ok", "metric", "value", "final_loss", "train_seconds"}`` (with ``step_time``, also
        ``"step_ms"``: the median step, see :func:`_median_step`; plus ``"note"``
        when the mechanism could not mask the task's padding: :data:`UNMASKED_NOTE`), or
        ``{"status": "error", "error": message}`` when the mechanism raised.
    """
    threads = torch.get_num_threads()
    if not cfg.device.startswith("cuda"):
        torch.set_num_threads(1)
    try:
        return _train(name, options, task_name, cfg, step_time)
    finally:
        torch.set_num_threads(threads)


def _train(
    name: str, options: dict[str, Any], task_name: str | QualityTask, cfg: ArenaConfig, step_time: bool
) -> dict[str, Any]:
    task = task_name if isinstance(task_name, QualityTask) else get_task(task_name, length=cfg.task_length)
    device = torch.device(cfg.device)
    try:
        model = build_model(name, options, task, cfg).to(device)
    except (ValueError, TypeError) as err:
        return {"status": "error", "error": f"{type(err).__name__}: {err}"}
    masks_padding = attnkit.attention_capabilities(name).key_padding
    batches = task.batches("train", cfg.train_steps, cfg.batch_size, cfg.seed)
    train = maskable(batches, masks_padding)
    started = time.perf_counter()
    stamps: list[float] = []
    try:
        losses = train_on_batches(
            model,
            _stamped(train, stamps),
            max_steps=len(train),
            lr=task.learning_rate,
            # Warm-up over the first 10% of steps, then constant: with a budget this short a
            # decaying rate stalls the exact model just before it learns MQAR's look-up (measured).
            warmup_steps=max(1, cfg.train_steps // 10),
            min_lr_ratio=1.0,
            device=device,
        )
        train_seconds = time.perf_counter() - started
        value = _evaluate(model, task, cfg, device, masks_padding)
    except (RuntimeError, ValueError, TypeError) as err:
        return {"status": "error", "error": f"{type(err).__name__}: {str(err).strip()[:300]}"}
    result: dict[str, Any] = {
        "status": "ok",
        "metric": task.metric,
        "value": value,
        "final_loss": losses[-1],
        "train_seconds": round(train_seconds, 2),
    }
    if step_time:
        result["step_ms"] = round(1000 * _median_step(stamps, train_seconds / max(1, len(train))), 2)
    if not masks_padding and any(not bool(b.attention_mask.all()) for b in batches):
        result["note"] = UNMASKED_NOTE
    return result


def _stamped(batches: list[Batch], stamps: list[float]) -> Iterator[Batch]:
    """``batches``, noting the time each is handed out (the start of its step)."""
    for batch in batches:
        stamps.append(time.perf_counter())
        yield batch


def _median_step(stamps: list[float], fallback: float) -> float:
    """The median seconds between consecutive steps' starts: one step's time without the first step's
    one-time costs (a worker's first cell warms up the libraries) or a stall from the machine's load.
    ``fallback`` (the mean step) when there are too few steps to take a gap."""
    gaps = sorted(b - a for a, b in itertools.pairwise(stamps))
    return gaps[len(gaps) // 2] if gaps else fallback


def maskable(batches: list[Batch], masks_padding: bool) -> list[Batch]:
    """``batches`` as the mechanism can take them: padding marked only where it can mask it."""
    if masks_padding:
        return batches
    return [Batch(b.input_ids, torch.ones_like(b.attention_mask), b.labels) for b in batches]


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
    for batch in task.batches("train", cfg.train_steps, cfg.batch_size, cfg.seed):
        kept = batch.labels[batch.labels != IGNORE_INDEX]
        counts += torch.bincount(kept.reshape(-1), minlength=task.num_outputs).double()
    val = torch.cat(
        [
            b.labels[b.labels != IGNORE_INDEX].reshape(-1)
            for b in task.batches("validation", cfg.eval_batches, cfg.batch_size, cfg.seed)
        ]
    )
    if task.metric == "accuracy":
        value = float((val == counts.argmax()).double().mean())
        return {"metric": task.metric, "value": value, "what": "majority class"}
    probs = (counts + 1) / (counts + 1).sum()
    value = float(-probs[val].log2().mean())
    return {"metric": task.metric, "value": value, "what": "unigram model"}


@torch.no_grad()
def _evaluate(
    model: nn.Module, task: QualityTask, cfg: ArenaConfig, device: torch.device, masks_padding: bool
) -> float:
    """Accuracy over target positions, or bits per character, on held-out batches."""
    model.eval()
    correct = total = 0
    nll = 0.0
    for batch in maskable(task.batches("validation", cfg.eval_batches, cfg.batch_size, cfg.seed), masks_padding):
        batch = batch.to(device)
        logits = forward(model, batch)  # (B, C) or (B, T, V)
        keep = batch.labels != IGNORE_INDEX
        if task.metric == "accuracy":
            correct += int((logits.argmax(-1)[keep] == batch.labels[keep]).sum())
        else:
            nll += float(F.cross_entropy(logits[keep], batch.labels[keep], reduction="sum"))
        total += int(keep.sum())
    if task.metric == "accuracy":
        return correct / max(1, total)
    return nll / max(1, total) / math.log(2)
