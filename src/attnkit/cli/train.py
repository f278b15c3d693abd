"""``attnkit train CONFIG [key=value ...] [--resume]``: train a model from a JSON or TOML config.

Runs under ``torchrun --nproc_per_node N -m attnkit.cli.main train ...`` for data-parallel
training (gloo on CPU, nccl on GPU). Only the standard library is imported at module level
(``attnkit --help`` builds every subcommand's parser); torch comes in with :func:`run`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model on a task from a JSON/TOML config",
        description=(
            "Train a model from a config file (JSON or TOML). Everything is written under the config's out_dir: "
            "log.jsonl, checkpoints/, best/ and model/. Override any key with key=value (dotted keys reach into "
            "tables: model.dim=128, task_options.max_length=200). Example: "
            "attnkit train configs/listops_short.toml attention=sliding_window max_steps=300"
        ),
        epilog=(
            "Every eval_every steps one line of validation metrics is printed. Ctrl-C (or SIGTERM) finishes the "
            "current step, saves a checkpoint of it and prints the command that resumes; a second Ctrl-C stops at "
            "once. --resume skips a damaged newest checkpoint (with a warning) for the newest one that loads. "
            "Every config key: docs/configuration.md; training on your own text or JSONL: docs/own-data.md."
        ),
    )
    parser.add_argument("config", help="path to a .toml or .json training config")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="override config keys (values parsed as JSON)"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint in out_dir")
    parser.add_argument("--json", action="store_true", help="print the final metrics as JSON")
    parser.set_defaults(func=run)


def resume_command(args: argparse.Namespace) -> str:
    """The shell command that continues this run: the same config and overrides, plus ``--resume``."""
    words = ["train", args.config, *args.overrides, *(["--json"] if args.json else []), "--resume"]
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return shlex.join(["attnkit", *words])
    command = shlex.join(["torchrun", "--nproc_per_node", os.environ.get("LOCAL_WORLD_SIZE", "1")])
    command += " " + shlex.join(["-m", "attnkit.cli.main", *words])
    if os.environ.get("LOCAL_WORLD_SIZE") != os.environ.get("WORLD_SIZE"):
        command += "   # plus your other torchrun options (--nnodes, --rdzv-endpoint, ...)"
    return command


def _report_interrupt(args: argparse.Namespace, stopped: Any) -> None:
    """Say on stderr, below the closed progress bar, what was saved and how to resume."""
    what = "Ctrl-C" if stopped.signal_name == "SIGINT" else stopped.signal_name
    if stopped.checkpoint is not None:
        saved = f"stopped by {what} after step {stopped.step}; checkpoint saved in {stopped.checkpoint}"
    elif stopped.resume_from is not None:
        saved = f"stopped at once by a second Ctrl-C; --resume continues from {stopped.resume_from}"
    else:
        saved = "stopped at once by a second Ctrl-C before any checkpoint was written; --resume starts from step 0"
    print(f"attnkit train: {saved}", file=sys.stderr)
    print(f"attnkit train: resume with: {resume_command(args)}", file=sys.stderr)
    if args.json:
        print(
            json.dumps(
                {
                    "interrupted": stopped.signal_name,
                    "step": stopped.step,
                    "checkpoint": None if stopped.checkpoint is None else str(stopped.checkpoint),
                    "resume_command": resume_command(args),
                }
            )
        )


def run(args: argparse.Namespace) -> int:
    from attnkit.train import Trainer, TrainingInterrupted, format_metrics, load_config
    from attnkit.train.distributed import shutdown

    config = load_config(args.config, args.overrides)
    trainer = Trainer(config, resume=args.resume)
    main = trainer.context.is_main
    try:
        if main:
            params = sum(p.numel() for p in trainer.model.parameters())
            print(
                f"attnkit train: {trainer.data.name} ({trainer.data.kind}, vocab {trainer.data.vocab_size}), "
                f"{type(trainer.model).__name__} with {params / 1e6:.2f}M parameters, attention {config.attention!r}, "
                f"{trainer.context.world_size} process(es) on {trainer.context.device}"
            )
        if main and trainer.resume_from is not None:
            print(f"attnkit train: resuming from {trainer.resume_from} (step {trainer.step})")
        elif main and args.resume:
            print(f"attnkit train: no checkpoint in {trainer.checkpoint_dir}; starting from step 0")
        metrics = trainer.fit()
    except TrainingInterrupted as stopped:
        if main:
            _report_interrupt(args, stopped)
        return stopped.exit_code
    finally:
        shutdown(trainer.context)
    if main:
        examples = getattr(trainer, "eval_size", None)
        if args.json:
            print(json.dumps({"step": trainer.step, "split": "validation", "examples": examples, **metrics}))
            return 0
        print(
            f"attnkit train: finished step {trainer.step}/{config.max_steps}; final validation metrics "
            f"({examples} examples): {format_metrics(metrics)}"
        )
        if trainer.best:
            best = trainer.best
            print(
                f"attnkit train: best validation {best['metric']} {best['value']:.4g} at step {best['step']}, "
                f"saved in {trainer.out_dir / 'best'}"
            )
        print(f"attnkit train: model saved to {trainer.out_dir / 'model'}; log in {trainer.out_dir / 'log.jsonl'}")
    return 0
