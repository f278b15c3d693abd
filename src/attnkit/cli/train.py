"""``attnkit train CONFIG [key=value ...] [--resume]``: train a model from a JSON or TOML config.

Runs under ``torchrun --nproc_per_node N -m attnkit.cli.main train ...`` for data-parallel
training (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import argparse
import json
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
    )
    parser.add_argument("config", help="path to a .toml or .json training config")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="override config keys (values parsed as JSON)"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint in out_dir")
    parser.add_argument("--json", action="store_true", help="print the final metrics as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from attnkit.train import Trainer, load_config
    from attnkit.train.distributed import shutdown

    config = load_config(args.config, args.overrides)
    trainer = Trainer(config, resume=args.resume)
    try:
        if trainer.context.is_main:
            params = sum(p.numel() for p in trainer.model.parameters())
            print(
                f"attnkit train: {trainer.data.name} ({trainer.data.kind}, vocab {trainer.data.vocab_size}), "
                f"{type(trainer.model).__name__} with {params / 1e6:.2f}M parameters, attention {config.attention!r}, "
                f"{trainer.context.world_size} process(es) on {trainer.context.device}"
            )
        if trainer.context.is_main and trainer.resume_from is not None:
            print(f"attnkit train: resuming from {trainer.resume_from} (step {trainer.step})")
        elif trainer.context.is_main and args.resume:
            print(f"attnkit train: no checkpoint in {trainer.checkpoint_dir}; starting from step 0")
        metrics = trainer.fit()
    finally:
        shutdown(trainer.context)
    if trainer.context.is_main:
        if args.json:
            print(json.dumps({"step": trainer.step, **metrics}))
        else:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            print(f"attnkit train: step {trainer.step}: {shown}")
            print(f"attnkit train: model saved to {trainer.out_dir / 'model'}; log in {trainer.out_dir / 'log.jsonl'}")
    return 0
