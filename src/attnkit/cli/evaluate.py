"""``attnkit eval RUN``: score a trained model on its task's validation or test split.

Reports what fits the task: accuracy and loss always; perplexity for language models and
seq2seq; bits per character for byte-level text; exact match, BLEU (sacrebleu) and ROUGE
(rouge-score) from greedy decoding for seq2seq.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a trained model (accuracy, loss, perplexity/bpc, BLEU, ROUGE)",
        description=(
            "Evaluate a model trained with 'attnkit train'. RUN is the run's out_dir (or its config file). "
            "Example: attnkit eval runs/listops_short --split test"
        ),
    )
    parser.add_argument("run", help="a training out_dir, or the config file that names it")
    parser.add_argument("--split", default="test", choices=["validation", "test"], help="split to score (default test)")
    parser.add_argument(
        "--model",
        default="best",
        help="'best' (default), 'final', 'last' (newest checkpoint) or a directory holding config.json + model.safetensors",
    )
    parser.add_argument(
        "--examples", type=int, default=None, help="examples to score (default: the run's eval_examples)"
    )
    parser.add_argument("--batch-size", type=int, default=None, help="evaluation batch size")
    parser.add_argument("--no-generate", action="store_true", help="seq2seq: skip greedy decoding (no BLEU/ROUGE)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.set_defaults(func=run)


def _run_dir(path: Path) -> Path:
    if path.is_file():
        from attnkit.train import load_config

        return Path(load_config(path).out_dir)
    if not (path / "train_config.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a training run (no train_config.json); pass the out_dir of 'attnkit train'"
        )
    return path


def _newest_loadable_checkpoint(run_dir: Path, device: Any) -> tuple[Path, Any]:
    """The newest checkpoint whose model loads, warning about each newer one that does not (as --resume)."""
    from attnkit.models import load_pretrained
    from attnkit.train.checkpoint import checkpoint_dirs

    found = checkpoint_dirs(run_dir / "checkpoints")
    if not found:
        raise FileNotFoundError(f"no complete checkpoint under {run_dir / 'checkpoints'}")
    failures = []
    for candidate in reversed(found):
        try:
            return candidate, load_pretrained(candidate, map_location=device)
        except (ValueError, FileNotFoundError) as err:
            failures.append(f"{candidate.name}: {err}")
            print(f"attnkit eval: warning: skipping checkpoint {candidate} ({err})", file=sys.stderr)
    raise ValueError(
        f"none of the {len(found)} checkpoint(s) under {run_dir / 'checkpoints'} loads: " + "; ".join(failures)
    )


def _model_dir(run_dir: Path, which: str) -> Path:
    choices = {"best": run_dir / "best", "final": run_dir / "model"}
    directory = choices.get(which, Path(which))
    if which == "best" and not directory.is_dir():
        directory = run_dir / "model"
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"no saved model in {directory} (expected config.json and model.safetensors)")
    return directory


def run(args: argparse.Namespace) -> int:
    import torch

    from attnkit.data.batching import eval_batches
    from attnkit.models import load_pretrained
    from attnkit.train import TrainConfig, evaluate

    run_dir = _run_dir(Path(args.run))
    config_path = run_dir / "train_config.json"
    config = TrainConfig.from_dict(json.loads(config_path.read_text()), source=str(config_path))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.model == "last":
        model_dir, model = _newest_loadable_checkpoint(run_dir, device)
    else:
        model_dir = _model_dir(run_dir, args.model)
        model = load_pretrained(model_dir, map_location=device)
    data = config.build_data(tokenizer_dir=model_dir)
    for name, value in (("--examples", args.examples), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    count = args.examples or config.eval_examples
    examples = data.eval_examples(args.split, count)
    if not examples:
        raise ValueError(f"split {args.split!r} of {config.task!r} has no examples")
    size = args.batch_size or config.eval_batch_size or config.batch_size
    batches = eval_batches(examples, batch_size=size, pad_id=data.pad_id)
    metrics = evaluate(model, batches, data, device=device, generate=not args.no_generate)
    result = {"run": str(run_dir), "model": str(model_dir), "split": args.split, "examples": len(examples), **metrics}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{config.task} ({data.kind}), {args.split} split, {len(examples)} examples, model {model_dir}")
    for key, value in metrics.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"  {key:<12} {shown}")
    return 0
