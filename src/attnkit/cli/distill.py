"""``attnkit distill --teacher DIR --student CONFIG_OR_DIR --steps N --out DIR``: knowledge distillation, with a report.

The teacher is a training run folder or a model folder (resolved as ``attnkit generate`` does).
The student is a model folder (its weights are the starting point) or a JSON/TOML file of model
settings laid over the teacher's config: ``{"attention": "sliding_window", "attention_options":
{"window": 64}, "depth": 2}`` is the teacher's architecture with a cheaper mechanism and half the
layers, freshly initialised (the teacher's ``attention_options`` are kept only when the file keeps
its ``attention``). The student is trained with :func:`attnkit.compress.distill` on the teacher
run's training data (or ``--data``); with ``--baseline`` the same student, from the same
initial weights and on the same batches, is also trained from scratch (cross-entropy only), so
the report shows what distillation bought. DIR receives the student (and ``baseline/``) and the
report comparing teacher, student and baseline (:mod:`attnkit.compress.report`).
"""

from __future__ import annotations

import argparse
import json
import sys
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

BASELINE_DIR = "baseline"

EXAMPLES = """\
examples:
  echo '{"attention": "sliding_window", "attention_options": {"window": 64}}' > student.json
  attnkit distill --teacher runs/text_stdlib --student student.json --steps 500 --baseline --out runs/distilled-swa
  attnkit distill --teacher runs/text_stdlib --student student_small.toml --steps 500 --hidden-weight 1 --out runs/d
"""


def register(subparsers: Any) -> None:
    parser = add_command(
        subparsers,
        "distill",
        summary="train a cheaper student to match a trained teacher (knowledge distillation), with a report",
        description=(
            "Distill a trained teacher into a student (e.g. the same model with an efficient attention mechanism "
            "and fewer layers): temperature-scaled KL on the logits, plus optional cross-entropy, hidden-state "
            "and attention-output matching. --out DIR receives the student and a report (report.md, report.json, "
            "report.png) comparing teacher and student (and, with --baseline, the same student trained from "
            "scratch for the same steps): parameters, bytes on disk, latency, peak memory and quality, measured "
            "in the same run."
        ),
        examples=EXAMPLES,
    )
    parser.add_argument(
        "--teacher", required=True, metavar="DIR", help="the teacher: a training run folder or a model folder"
    )
    parser.add_argument(
        "--teacher-weights",
        choices=RUN_WEIGHTS,
        default=None,
        help="which weights of a teacher run folder (default: best, else final, else last)",
    )
    parser.add_argument(
        "--student",
        required=True,
        metavar="CONFIG_OR_DIR",
        help="a model folder (its weights are the start) or a .json/.toml file of model settings laid over the "
        "teacher's config (a fresh student)",
    )
    parser.add_argument("--steps", type=int, required=True, metavar="N", help="optimizer steps")
    parser.add_argument(
        "--lr", type=float, default=None, metavar="X", help="peak learning rate (default: the teacher run's, or 3e-4)"
    )
    parser.add_argument(
        "--warmup-steps", type=int, default=None, metavar="N", help="warm-up steps (default: steps / 10, at most 100)"
    )
    parser.add_argument(
        "--temperature", type=float, default=2.0, metavar="X", help="softmax temperature of the logit loss (default 2)"
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=0.9,
        metavar="X",
        help="weight of the logit loss; 1 - alpha goes to cross-entropy (default 0.9)",
    )
    parser.add_argument(
        "--hidden-weight", type=float, default=0.0, metavar="X", help="weight of hidden-state matching (default 0: off)"
    )
    parser.add_argument(
        "--attention-weight",
        type=float,
        default=0.0,
        metavar="X",
        help="weight of attention-output matching (default 0: off)",
    )
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="also train the same student from scratch (cross-entropy, same steps, batches and initial weights)",
    )
    add_shared_arguments(parser, default_source="the teacher run's training data")
    parser.set_defaults(func=run)


def _read_settings(path: Path) -> dict[str, Any]:
    """A student settings file (JSON or TOML) as a dict."""
    import tomllib

    try:
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        raise ValueError(f"--student {path}: cannot read it as {path.suffix.lstrip('.').upper()} ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--student {path} must hold an object of model settings, got {type(data).__name__}")
    return data


def build_student(spec: Path, teacher: Any, seed: int, device: Any) -> tuple[Any, str]:
    """The student model and where it came from, in words.

    Raises:
        FileNotFoundError: ``spec`` does not exist.
        ValueError: a folder without ``config.json``, an unreadable file, or settings the config refuses.
    """
    import torch

    from attnkit.compress import load_compressed
    from attnkit.models import TransformerConfig

    if not spec.exists():
        raise FileNotFoundError(f"--student {spec} does not exist; pass a model folder or a .json/.toml settings file")
    if spec.is_dir():
        if not (spec / "config.json").is_file():
            raise ValueError(
                f"--student {spec} is a folder without config.json; pass a model folder or a settings file"
            )
        return load_compressed(spec, map_location=str(device)), f"the model in {spec}"
    if spec.suffix not in (".json", ".toml"):
        raise ValueError(f"--student {spec} must be a .json or .toml file of model settings, or a model folder")
    settings = _read_settings(spec)
    values = teacher.config.to_dict()
    if "attention" in settings and settings["attention"] != values["attention"] and "attention_options" not in settings:
        values["attention_options"] = {}  # the teacher's options belong to the teacher's mechanism
    unknown = sorted(set(settings) - set(values))
    if unknown:
        raise ValueError(f"--student {spec}: unknown model settings {unknown}; known: {', '.join(sorted(values))}")
    values.update(settings)
    try:
        config = TransformerConfig.from_dict(values)
    except (ValueError, TypeError) as err:
        raise ValueError(f"--student {spec}: {err}") from None
    torch.manual_seed(seed)
    student = type(teacher)(config).to(device)
    changed = ", ".join(f"{k}={settings[k]!r}" for k in sorted(settings))
    return student, f"the teacher's config with {changed or 'no changes'} ({spec}), freshly initialised"


def _check_arguments(args: argparse.Namespace) -> None:
    check_numbers(args, {"--steps": 1, "--warmup-steps": 0})
    if args.lr is not None and not args.lr > 0:
        raise ValueError(f"--lr must be a positive number, got {args.lr}")
    if not args.temperature > 0:
        raise ValueError(f"--temperature must be a positive number, got {args.temperature}")
    if not 0.0 <= args.alpha <= 1.0:
        raise ValueError(f"--alpha must be in [0, 1] (the weight of the logit loss), got {args.alpha}")
    for flag in ("--hidden-weight", "--attention-weight"):
        value = getattr(args, flag[2:].replace("-", "_"))
        if not value >= 0:
            raise ValueError(f"{flag} must be a number >= 0 (0 turns it off), got {value}")


def run(args: argparse.Namespace) -> int:
    _check_arguments(args)
    source = load_source(args, Path(args.teacher), args.teacher_weights, flag="--teacher", role="teacher")
    out, teacher, setup, device, weights = Path(args.out), source.model, source.setup, source.device, source.weights

    import copy

    from attnkit.compress import distill, finetune, load_compressed

    student, origin = build_student(Path(args.student), teacher, setup.seed, device)
    print(f"attnkit distill: student: {origin}", file=sys.stderr)
    start = copy.deepcopy(student) if args.baseline else None
    lr = args.lr or setup.lr or 3e-4
    warmup = args.warmup_steps if args.warmup_steps is not None else min(100, args.steps // 10)
    try:
        _, result = distill(
            student,
            teacher,
            train_batches(setup),
            steps=args.steps,
            lr=lr,
            warmup_steps=warmup,
            temperature=args.temperature,
            alpha=args.alpha,
            hidden_weight=args.hidden_weight,
            attention_weight=args.attention_weight,
        )
    except ValueError as err:
        raise ValueError(f"--teacher/--student: {err}") from None
    steps = [{"step": "distill", "summary": str(result), "result": result.to_dict()}]
    write_model_folder(student, out, weights.directory, args.overwrite)
    models = {
        "teacher": ("teacher", teacher, weights.directory),
        "student": ("student", load_compressed(out, map_location=str(device)), out),
    }
    baseline_dir = out / BASELINE_DIR
    if start is not None:
        _, scratch = finetune(
            start, train_batches(setup), steps=args.steps, lr=lr, warmup_steps=warmup, keep_zeros=False
        )
        summary = f"from scratch (cross-entropy only, same batches): {scratch.steps} steps, last batch ce {scratch.final['ce']:.4f}"
        steps.append({"step": "baseline", "summary": summary, "result": scratch.to_dict()})
        write_model_folder(start, baseline_dir, weights.directory, args.overwrite)
        models["baseline"] = ("from scratch", load_compressed(baseline_dir, map_location=str(device)), baseline_dir)
    elif baseline_dir.exists():
        import shutil

        shutil.rmtree(baseline_dir)  # an overwritten earlier run's baseline; this report has none
    described = {"teacher": str(source.path), "weights": str(weights.directory), "student": origin}
    report(args, source, models, steps, reference="teacher", positional=(), described=described)
    return 0
