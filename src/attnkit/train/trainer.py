"""The training loop: AdamW, warm-up + cosine, clipping, accumulation, mixed precision,
periodic evaluation, best-model keeping, crash-safe checkpoints, resumption, DDP.

Files under ``out_dir``::

    train_config.json      the validated configuration
    log.jsonl              one record per logged step: step, loss, lr, tokens_per_s, grad_norm,
                           elapsed_s, and eval_* metrics on evaluation steps
    checkpoints/step_*/    complete checkpoints (see attnkit.train.checkpoint)
    best/                  the model with the best validation metric so far (+ metrics.json)
    model/                 the final model (config.json, model.safetensors, tokenizer.json)

Resumption is exact: the checkpoint holds the weights, the optimizer, the step, the Python
and torch RNG states and the data position, so on CPU the continued loss curve is
bit-identical to an uninterrupted run (with the same ``threads``). A checkpoint that does not
load (a truncated file) is skipped with a warning for the newest one that does.

Ctrl-C or SIGTERM stops the run at the end of the current step with a checkpoint of that
step (see :mod:`attnkit.train.interrupt`); every evaluation prints one line of validation
metrics above the progress bar.
"""

from __future__ import annotations

import contextlib
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnkit.data.batching import BucketBatcher, eval_batches
from attnkit.data.pipeline import TrainingData
from attnkit.data.tasks import Batch
from attnkit.train.checkpoint import (
    Checkpoint,
    CorruptCheckpointError,
    latest_checkpoint,
    load_intact_checkpoint,
    save_checkpoint,
    write_atomically,
)
from attnkit.train.config import TrainConfig
from attnkit.train.distributed import DistributedContext, all_reduce_sum, barrier, init_distributed
from attnkit.train.evaluate import evaluate
from attnkit.train.init import InitResult, find_weights_dir, freeze, init_from
from attnkit.train.interrupt import StopRequest, TrainingInterrupted
from attnkit.train.loop_api import optimizer_update, param_groups
from attnkit.train.modeling import forward, model_class, model_config, summed_loss
from attnkit.train.schedule import learning_rate

#: Keys that define the model, the data order or the optimisation; a resumed run must keep them.
_FIXED_ON_RESUME: tuple[str, ...] = (
    "task",
    "task_options",
    "attention",
    "attention_options",
    "model",
    "seed",
    "batch_size",
    "grad_accum",
    "bucket_batches",
    "seq_len",
    "tokenizer",
    "init_from",
    "freeze",
    "objective",
    "objective_options",
)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def format_metrics(metrics: dict[str, Any]) -> str:
    """``loss 0.6931, accuracy 0.5`` (4 significant digits)."""
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def _write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Train one model on one task as described by a :class:`TrainConfig`.

    Args:
        config: the validated configuration.
        context: the process's place in a distributed run (default: read from the environment).
        resume: continue from the newest checkpoint in ``out_dir/checkpoints`` whose files all
            load; newer ones that do not are listed in :attr:`skipped_checkpoints` and
            reported on stderr.

    Attributes:
        resume_from: the checkpoint the run continued from (None for a fresh run).
        skipped_checkpoints: newer checkpoints that did not load when resuming.

    Raises:
        ValueError: for settings the machine cannot honour (fp16 without a GPU, a batch that
            does not split over processes and accumulation steps), an ``out_dir`` that
            already holds checkpoints when ``resume`` is False, or checkpoints none of which
            loads when it is True.
    """

    def __init__(self, config: TrainConfig, *, context: DistributedContext | None = None, resume: bool = False) -> None:
        self.config = config
        self.context = context or init_distributed(config.device)
        if config.threads:
            torch.set_num_threads(config.threads)
        self.out_dir = Path(config.out_dir)
        self.checkpoint_dir = self.out_dir / "checkpoints"
        shards = config.grad_accum * self.context.world_size
        if config.batch_size % shards:
            raise ValueError(
                f"batch_size={config.batch_size} must be divisible by grad_accum * processes = {shards} "
                f"(grad_accum={config.grad_accum}, processes={self.context.world_size})"
            )
        if config.precision == "fp16" and self.context.device.type != "cuda":
            raise ValueError("precision='fp16' needs a GPU; use precision='bf16' (or 'fp32') on CPU")
        if not resume and latest_checkpoint(self.checkpoint_dir) is not None:
            raise ValueError(
                f"{self.checkpoint_dir} already holds checkpoints; pass --resume to continue, or choose another out_dir"
            )
        self.skipped_checkpoints: list[CorruptCheckpointError] = []
        loaded = self._find_resume_point() if resume else None
        self.resume_from = loaded.path if loaded is not None else None

        random.seed(config.seed)
        torch.manual_seed(config.seed)
        self.data: TrainingData = config.build_data(tokenizer_dir=self.resume_from or self._init_dir())
        self.model_config = model_config(self.data, config.attention, config.attention_options, config.model)
        self.model: nn.Module = model_class(self.data.kind)(self.model_config).to(self.context.device)
        self.initialised: InitResult | None = None
        if config.init_from is not None and loaded is None:
            self.initialised = init_from(self.model, config.init_from)
        self.frozen = freeze(self.model, config.freeze)
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, config.weight_decay), lr=config.lr, betas=config.betas
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=config.precision == "fp16")
        self.batcher = BucketBatcher(
            self.data.stream("train"),
            batch_size=config.batch_size,
            bucket_batches=config.bucket_batches,
            seed=config.seed,
            pad_id=self.data.pad_id,
            pad_to_multiple_of=config.pad_to_multiple_of,
        )
        self.step = 0
        self.best: dict[str, Any] = {}
        self._eval_batches: list[Batch] | None = None
        self.wrapped: nn.Module = self.model
        if self.context.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.context.device.index] if self.context.device.type == "cuda" else None
            self.wrapped = DistributedDataParallel(self.model, device_ids=ids)
        if loaded is not None:
            self._restore(loaded)

    # ------------------------------------------------------------------ state

    def _init_dir(self) -> Path | None:
        """The saved model ``init_from`` names (its tokenizer is the run's), or None."""
        return None if self.config.init_from is None else find_weights_dir(self.config.init_from)

    def _write_model(self, directory: Path) -> None:
        self.model.save_pretrained(directory)  # type: ignore[operator]
        if self.data.tokenizer is not None:
            self.data.tokenizer.save(directory)

    def state_dict(self) -> dict[str, Any]:
        """Everything but the weights needed to continue exactly (``weights_only``-loadable)."""
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": _rng_state(),
            "data": json.dumps(self.batcher.state_dict()),
            "best": json.dumps(self.best),
            "config": json.dumps(self.config.to_dict()),
        }

    def _find_resume_point(self) -> Checkpoint | None:
        """The newest checkpoint that loads, saying on stderr which newer ones did not and why."""
        loaded = load_intact_checkpoint(
            self.checkpoint_dir, map_location=self.context.device, on_skip=self.skipped_checkpoints.append
        )
        if loaded is not None and self.context.is_main:
            for skipped in self.skipped_checkpoints:
                print(
                    f"attnkit train: warning: skipping checkpoint {skipped.checkpoint} ({skipped.reason}); "
                    f"resuming from {loaded.path} instead",
                    file=sys.stderr,
                )
        return loaded

    def _restore(self, checkpoint: Checkpoint) -> None:
        state = checkpoint.state
        saved = json.loads(state["config"])
        changed = [k for k in _FIXED_ON_RESUME if saved.get(k) != self.config.to_dict().get(k)]
        if changed:
            detail = "; ".join(f"{k}: {saved.get(k)!r} -> {self.config.to_dict().get(k)!r}" for k in changed)
            raise ValueError(
                f"cannot resume {checkpoint.path}: the config changed keys that define the run ({detail}); "
                "only schedule and logging keys (max_steps, eval_every, checkpoint_every, ...) may change"
            )
        self.model.load_state_dict(checkpoint.model.state_dict())
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.batcher.load_state_dict(json.loads(state["data"]))
        self.best = json.loads(state["best"])
        self.step = int(state["step"])
        _set_rng_state(state["rng"])

    # ------------------------------------------------------------------ steps

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.config.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.config.precision == "bf16" else torch.float16
        return torch.autocast(self.context.device.type, dtype=dtype)

    def train_step(self, batch: Batch) -> dict[str, float]:
        """One optimizer step on a global batch; returns its mean loss over all counted targets."""
        ctx, cfg = self.context, self.config
        total = max(batch.num_targets, 1)
        micro_rows = batch.size // cfg.grad_accum
        loss_sum = torch.zeros((), device=ctx.device)
        self.model.train()
        for i in range(cfg.grad_accum):
            micro = batch.rows(slice(i * micro_rows, (i + 1) * micro_rows))
            local = micro.rows(slice(ctx.rank, None, ctx.world_size)).to(ctx.device)
            last = i == cfg.grad_accum - 1
            sync = contextlib.nullcontext() if last or not ctx.enabled else self.wrapped.no_sync()  # type: ignore[operator]
            with sync:
                with self._autocast():
                    logits = forward(self.wrapped, local)
                part = summed_loss(logits, local.labels)
                # DDP averages gradients over processes; scaling by world_size / total makes the
                # result the gradient of the mean loss over the whole global batch.
                self.scaler.scale(part * (ctx.world_size / total)).backward()
            loss_sum += part.detach()
        lr = learning_rate(
            self.step + 1,
            lr=cfg.lr,
            warmup_steps=cfg.warmup_steps,
            max_steps=cfg.max_steps,
            min_lr_ratio=cfg.min_lr_ratio,
        )
        grad_norm = optimizer_update(self.model, self.optimizer, lr=lr, grad_clip=cfg.grad_clip, scaler=self.scaler)
        self.step += 1
        loss = float(all_reduce_sum(loss_sum, ctx)) / total
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm}

    def evaluate(self, split: str = "validation", *, generate: bool = False) -> dict[str, Any]:
        """Metrics of the current model on the fixed evaluation set of ``split``."""
        if self._eval_batches is None or split != "validation":
            examples = self.data.eval_examples(split, self.config.eval_examples)
            size = self.config.eval_batch_size or self.config.batch_size
            batches = eval_batches(examples, batch_size=size, pad_id=self.data.pad_id)
            if split != "validation":
                return evaluate(self.model, batches, self.data, device=self.context.device, generate=generate)
            self._eval_batches = batches
            self.eval_size = len(examples)
        return evaluate(self.model, self._eval_batches, self.data, device=self.context.device, generate=generate)

    # ------------------------------------------------------------------ files

    def _prepare_out_dir(self) -> Path:
        log = self.out_dir / "log.jsonl"
        if not self.context.is_main:
            return log
        self.out_dir.mkdir(parents=True, exist_ok=True)
        _write_text_atomically(self.out_dir / "train_config.json", json.dumps(self.config.to_dict(), indent=2) + "\n")
        if log.exists():
            # Records written after the checkpoint we resume from belong to the lost future.
            kept = [text for step, text in self._log_records(log) if self.resume_from is not None and step <= self.step]
            _write_text_atomically(log, "".join(text + "\n" for text in kept))
        return log

    @staticmethod
    def _log_records(log: Path) -> list[tuple[int, str]]:
        """``(step, line)`` of each record; a last line cut short by a crash is dropped, any other bad line is an error."""
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        records = []
        for number, line in enumerate(lines, start=1):
            try:
                records.append((int(json.loads(line)["step"]), line))
            except (ValueError, KeyError, TypeError) as err:
                if number < len(lines):
                    raise ValueError(f"{log}, line {number}: not a training log record ({err})") from err
        return records

    def _keep_best(self, metrics: dict[str, Any]) -> None:
        key, higher = ("accuracy", True) if self.data.kind == "classification" else ("loss", False)
        value = metrics[key]
        previous = self.best.get("value")
        if previous is not None and (value <= previous if higher else value >= previous):
            return
        self.best = {"metric": key, "value": value, "step": self.step}

        def write(directory: Path) -> None:
            self._write_model(directory)
            (directory / "metrics.json").write_text(json.dumps({"step": self.step, **metrics}, indent=2) + "\n")

        write_atomically(self.out_dir / "best", write)

    def _tensorboard(self) -> Any:
        if not (self.config.tensorboard and self.context.is_main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print("attnkit train: tensorboard is not installed; logging to log.jsonl only", file=sys.stderr)
            return None
        return SummaryWriter(str(self.out_dir / "tensorboard"))

    # ------------------------------------------------------------------ loop

    def fit(self) -> dict[str, Any]:
        """Train until ``max_steps``; returns the final validation metrics.

        Raises:
            TrainingInterrupted: after Ctrl-C or SIGTERM, once the current step is finished
                and checkpointed (or at once, with no new checkpoint, after a second Ctrl-C).
        """
        from tqdm import tqdm

        cfg, ctx = self.config, self.context
        log_path = self._prepare_out_dir()
        barrier(ctx)
        writer = self._tensorboard()
        if ctx.is_main and self.step == 0:
            if self.initialised is not None:
                print(f"attnkit train: init_from: {self.initialised.summary()}", file=sys.stderr)
            if self.frozen:
                print(f"attnkit train: frozen: {len(self.frozen)} parameters ({cfg.freeze})", file=sys.stderr)
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            disable=not (cfg.progress and ctx.is_main),
            desc=f"train {self.data.name}",
            unit="step",
            dynamic_ncols=True,
        )
        stop = StopRequest(on_request=lambda name: self._announce_stop(bar, name))
        metrics: dict[str, Any] = {}
        start = time.perf_counter()
        try:
            with stop, open(log_path, "a") if ctx.is_main else contextlib.nullcontext() as log:
                while self.step < cfg.max_steps:
                    metrics = self._fit_step(bar, log, writer, start) or metrics
                    if self.step < cfg.max_steps and self._stop_agreed(stop):
                        raise self._stop(stop.signal_name or "SIGTERM", saved=self.step % cfg.checkpoint_every == 0)
        except TrainingInterrupted:
            raise
        except KeyboardInterrupt:
            # A second Ctrl-C: the step or the save in progress was abandoned; nothing new was saved.
            raise TrainingInterrupted("SIGINT", self.step, None, latest_checkpoint(self.checkpoint_dir)) from None
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        if not metrics and ctx.is_main:  # resumed a finished run: nothing trained, still report
            metrics = self.evaluate()
        if ctx.is_main:
            write_atomically(self.out_dir / "model", self._write_model)
        barrier(ctx)
        return metrics

    def _fit_step(self, bar: Any, log: Any, writer: Any, start: float) -> dict[str, Any] | None:
        """One step with its evaluation, log record and checkpoint; returns the metrics if it evaluated."""
        cfg, ctx = self.config, self.context
        tick = time.perf_counter()
        batch = next(self.batcher)
        record: dict[str, Any] = {"step": self.step + 1, **self.train_step(batch)}
        record["tokens_per_s"] = batch.num_tokens / max(time.perf_counter() - tick, 1e-9)
        record["elapsed_s"] = time.perf_counter() - start
        last = self.step == cfg.max_steps
        metrics = None
        if (cfg.eval_every and self.step % cfg.eval_every == 0) or last:
            if ctx.is_main:
                metrics = self.evaluate()
                record.update({f"eval_{k}": v for k, v in metrics.items()})
                self._keep_best(metrics)
                bar.write(f"step {self.step}/{cfg.max_steps}: validation {format_metrics(metrics)}")
            barrier(ctx)
        if log is not None and (self.step % cfg.log_every == 0 or "eval_loss" in record or last):
            log.write(json.dumps(record) + "\n")
            log.flush()
            if writer is not None:
                for key, value in record.items():
                    if key != "step":
                        writer.add_scalar(key, value, self.step)
        bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        bar.update(1)
        if self.step % cfg.checkpoint_every == 0 or last:
            self.save_checkpoint()
        return metrics

    def _announce_stop(self, bar: Any, signal_name: str) -> None:
        if not self.context.is_main:
            return
        what = "Ctrl-C" if signal_name == "SIGINT" else signal_name
        again = " (press Ctrl-C again to stop at once without saving)" if signal_name == "SIGINT" else ""
        bar.write(
            f"attnkit train: {what}: stopping after the current step to save a checkpoint{again}", file=sys.stderr
        )

    def _stop_agreed(self, stop: StopRequest) -> bool:
        """Whether any process was asked to stop: every process must stop after the same step."""
        if not self.context.enabled:
            return stop.requested
        flag = torch.tensor([1.0 if stop.requested else 0.0], device=self.context.device)
        return bool(all_reduce_sum(flag, self.context).item() > 0)

    def _stop(self, signal_name: str, *, saved: bool) -> TrainingInterrupted:
        """Checkpoint the finished step (unless the loop just did) and describe the stop."""
        checkpoint = self.checkpoint_dir / f"step_{self.step:08d}"
        if not saved:
            self.save_checkpoint()
        return TrainingInterrupted(signal_name, self.step, checkpoint, checkpoint)

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the current step (on the main process); returns its directory."""
        path = None
        if self.context.is_main:
            path = save_checkpoint(
                self.checkpoint_dir, self.step, self._write_model, self.state_dict(), keep=self.config.keep_checkpoints
            )
        barrier(self.context)
        return path
