"""``attnkit compress MODEL --prune heads=0.3 --quantize int8 --out DIR``: a smaller, faster model and its report.

MODEL is a training run folder (the ``out_dir`` of ``attnkit train``) or a model folder, resolved
as ``attnkit generate`` does. The steps run in a fixed order: the ``--prune`` steps in the order
given, then the optional fine-tune (which can only train float weights), then ``--quantize``
(structured pruning slices float weights, so it cannot follow quantization). DIR receives the
compressed model (``save_compressed``: config + weights + ``compression.json``, plus the
tokenizer) and the report (``report.md``, ``report.json``, ``report.png``) comparing the model
before and after, measured in the same process (:mod:`attnkit.compress.report`).

Data (for the gradient head/channel score, the fine-tune and the quality figures) is the run's
own training data, or ``--data`` for a model folder. The helpers shared with ``attnkit distill``
are in :mod:`attnkit.cli._compression`. Only the standard library is imported at module level.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnkit.cli import RUN_WEIGHTS, add_command
from attnkit.cli._compression import (
    add_shared_arguments,
    check_numbers,
    load_source,
    report,
    train_batches,
    write_model_folder,
)

#: ``--prune`` kinds -> what they remove.
PRUNE_KINDS: dict[str, str] = {
    "heads": "whole attention heads (key/value groups with grouped-query attention), structured",
    "ffn": "feed-forward hidden channels, structured",
    "magnitude": "the smallest linear weights, unstructured (zeros stored densely)",
}
#: ``--quantize`` choices -> the library's mode names.
QUANTIZE_CHOICES: dict[str, str] = {"int8": "int8_dynamic", "int8_weight_only": "int8_weight_only"}

EXAMPLES = """\
examples:
  attnkit compress runs/text_stdlib --prune heads=0.3 --finetune-steps 200 --out runs/text_stdlib-heads30
  attnkit compress runs/text_stdlib --quantize int8 --out runs/text_stdlib-int8
  attnkit compress runs/text_stdlib --prune heads=0.25 --prune ffn=0.25 --quantize int8 --out runs/small --json
  attnkit compress my_model/ --data text --prune magnitude=0.5 --out runs/sparse
"""


def register(subparsers: Any) -> None:
    parser = add_command(
        subparsers,
        "compress",
        summary="prune and/or quantize a trained model, with a before/after report",
        description=(
            "Prune (attention heads, feed-forward channels, smallest weights) and/or quantize (int8) a trained "
            "model, optionally fine-tune after pruning, save it to --out DIR and write a report there (report.md, "
            "report.json, report.png): parameters, bytes on disk, forward and generation latency at batch 1 and "
            "at the training batch, peak memory and quality (perplexity/bpc, accuracy, BLEU/ROUGE as the task "
            "has), before and after, measured in the same run. Order: the --prune steps as given, then the "
            "fine-tune, then --quantize. MODEL is a training run folder (its own data is used) or a model folder "
            "(pass --data)."
        ),
        examples=EXAMPLES,
    )
    parser.add_argument(
        "model", metavar="MODEL", help="a training run folder (e.g. runs/text_stdlib) or a model folder"
    )
    parser.add_argument(
        "--weights",
        choices=RUN_WEIGHTS,
        default=None,
        help="which weights of a run folder (as in 'attnkit generate'; default: best, else final, else last)",
    )
    parser.add_argument(
        "--prune",
        action="append",
        default=[],
        metavar="KIND=FRACTION",
        help="remove a fraction: heads=0.3 (attention heads), ffn=0.25 (feed-forward channels), magnitude=0.5 "
        "(smallest weights, unstructured); repeat for several, applied in the order given",
    )
    parser.add_argument(
        "--score",
        choices=("gradient", "magnitude"),
        default="gradient",
        help="importance of heads and channels: gradient (Michel et al. 2019, on training batches; default) or "
        "magnitude (weight norms, no data)",
    )
    parser.add_argument(
        "--magnitude-scope",
        choices=("global", "layer"),
        default="global",
        help="magnitude pruning ranks all linear weights together (global, default) or each layer alone",
    )
    parser.add_argument(
        "--quantize",
        choices=tuple(QUANTIZE_CHOICES),
        default=None,
        help="int8: int8 weights and dynamic int8 activations (fast route chosen for the device); int8_weight_only: "
        "int8 weights only (smaller, not faster on CPU)",
    )
    parser.add_argument(
        "--finetune-steps",
        type=int,
        default=0,
        metavar="N",
        help="fine-tune this many steps after pruning, on the training data (default 0: none)",
    )
    parser.add_argument(
        "--finetune-lr",
        type=float,
        default=None,
        metavar="X",
        help="peak fine-tune learning rate (default: the run's lr / 10, or 1e-4)",
    )
    add_shared_arguments(parser, default_source="the run's own training data")
    parser.set_defaults(func=run)


@dataclass(frozen=True)
class PruneStep:
    """One ``--prune KIND=FRACTION``."""

    kind: str
    amount: float

    def __str__(self) -> str:
        return f"{self.kind}={self.amount:g}"


def parse_prune(items: list[str]) -> list[PruneStep]:
    """The ``--prune`` steps, checked (kind known, fraction in [0, 1), each kind once)."""
    steps: list[PruneStep] = []
    for item in items:
        kind, sep, text = item.partition("=")
        if kind not in PRUNE_KINDS:
            known = "; ".join(f"{k} ({what})" for k, what in PRUNE_KINDS.items())
            raise ValueError(f"--prune {item}: unknown kind {kind!r}; use KIND=FRACTION with KIND one of: {known}")
        try:
            amount = float(text) if sep else float("nan")
        except ValueError:
            amount = float("nan")
        if not 0.0 < amount < 1.0:
            raise ValueError(f"--prune {item}: the fraction must be a number in (0, 1), e.g. --prune {kind}=0.3")
        if any(s.kind == kind for s in steps):
            raise ValueError(f"--prune {kind} is given twice; give each kind once with the fraction you want")
        steps.append(PruneStep(kind, amount))
    return steps


def _check_arguments(args: argparse.Namespace) -> list[PruneStep]:
    steps = parse_prune(args.prune)
    check_numbers(args, {"--finetune-steps": 0})
    if not steps and args.quantize is None:
        raise ValueError("nothing to do: add --prune KIND=FRACTION and/or --quantize int8")
    if args.finetune_steps and not steps:
        raise ValueError("--finetune-steps fine-tunes after pruning (int8 weights cannot be trained): add --prune")
    if args.finetune_lr is not None and not args.finetune_steps:
        raise ValueError("--finetune-lr applies to the fine-tune: add --finetune-steps N, or drop --finetune-lr")
    if args.finetune_lr is not None and not args.finetune_lr > 0:
        raise ValueError(f"--finetune-lr must be a positive number, got {args.finetune_lr}")
    if args.score == "magnitude" and not any(s.kind in ("heads", "ffn") for s in steps):
        raise ValueError("--score ranks heads and channels: add --prune heads=... or ffn=..., or drop --score")
    return steps


def _prune(model: Any, step: PruneStep, args: argparse.Namespace, batches: Any) -> Any:
    from attnkit.compress import prune_ffn, prune_heads, prune_magnitude

    try:
        if step.kind == "heads":
            return prune_heads(model, step.amount, score=args.score, data=batches)[1]
        if step.kind == "ffn":
            return prune_ffn(model, step.amount, score=args.score, data=batches)[1]
        return prune_magnitude(model, step.amount, scope=args.magnitude_scope)[1]
    except ValueError as err:
        raise ValueError(f"--prune {step}: {err}") from None


def run(args: argparse.Namespace) -> int:
    steps = _check_arguments(args)
    source = load_source(args, Path(args.model), args.weights, flag="MODEL", role="loaded")
    out, model, setup, device, weights = Path(args.out), source.model, source.setup, source.device, source.weights

    import copy

    from attnkit.compress import finetune, load_compressed, quantize

    original = copy.deepcopy(model)
    batches = train_batches(setup)
    done: list[dict[str, Any]] = []
    for step in steps:
        print(f"attnkit compress: pruning {step} ({PRUNE_KINDS[step.kind]})", file=sys.stderr)
        result = _prune(model, step, args, batches)
        done.append({"step": f"prune {step}", "summary": str(result), "result": result.to_dict()})
    if args.finetune_steps:
        lr = args.finetune_lr or (setup.lr / 10 if setup.lr is not None else 1e-4)
        _, tuned = finetune(
            model, batches, steps=args.finetune_steps, lr=lr, warmup_steps=min(100, args.finetune_steps // 10)
        )
        summary = f"fine-tuned {tuned.steps} steps at lr {lr:g} ({tuned.tokens:,} tokens): last batch ce {tuned.final['ce']:.4f}"
        done.append({"step": f"fine-tune {tuned.steps} steps", "summary": summary, "result": tuned.to_dict()})
    if args.quantize is not None:
        try:
            _, quantized = quantize(model, QUANTIZE_CHOICES[args.quantize])
        except ValueError as err:
            raise ValueError(f"--quantize {args.quantize}: {err}") from None
        summary = f"{quantized} (route {quantized.route}: {quantized.reason})"
        done.append({"step": f"quantize {args.quantize}", "summary": summary, "result": quantized.to_dict()})

    write_model_folder(model, out, weights.directory, args.overwrite)
    saved = load_compressed(out, map_location=str(device))  # measure what was written, as a user will load it
    report(
        args,
        source,
        {"before": ("before", original, weights.directory), "after": ("after", saved, out)},
        done,
        reference="before",
        positional=("model",),
        described={"model": str(source.path), "weights": str(weights.directory), "description": weights.description},
    )
    return 0
