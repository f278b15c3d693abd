"""What ``attnkit compress`` and ``attnkit distill`` share: data and output arguments, the run's data,
the starting model, the side-by-side measurement and the report folder. Only the standard library and
:mod:`attnkit.core.errors` (which imports no torch) are imported at module level: the command line's
``--help`` must not import torch.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnkit.core.errors import check_out_dir

# ---------------------------------------------------------------- arguments shared with distill


def add_shared_arguments(parser: argparse.ArgumentParser, *, default_source: str) -> None:
    """The options of both commands: the output (:func:`add_output_arguments`), then the data and measurements."""
    add_output_arguments(parser)
    data = parser.add_argument_group("data and measurements", f"Default data: {default_source}; --data replaces it.")
    data.add_argument(
        "--data",
        metavar="TASK",
        default=None,
        help="a synthetic task name, 'text' (the standard-library corpus), or a .jsonl/text file or folder",
    )
    data.add_argument(
        "--task-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of a synthetic --data task (value parsed as JSON; repeat for several)",
    )
    data.add_argument(
        "--seq-len", type=int, default=None, metavar="N", help="text window / JSONL length (default: the run's, or 256)"
    )
    data.add_argument(
        "--tokenizer",
        choices=("byte", "bpe"),
        default=None,
        help="tokenizer of text --data when the model folder has no tokenizer.json (default byte)",
    )
    data.add_argument(
        "--batch-size",
        type=int,
        default=None,
        metavar="N",
        help="training batch: latency, fine-tune, scores (default: the run's, or 16)",
    )
    data.add_argument(
        "--eval-examples",
        type=int,
        default=None,
        metavar="N",
        help="examples scored for quality (default: the run's, or 128)",
    )
    data.add_argument(
        "--split", choices=("validation", "test"), default="validation", help="split scored (default validation)"
    )
    data.add_argument(
        "--rounds",
        type=int,
        default=5,
        metavar="N",
        help="alternating timing rounds; the median is reported (default 5)",
    )
    data.add_argument(
        "--generate-tokens", type=int, default=32, metavar="N", help="new tokens per timed generation call (default 32)"
    )
    data.add_argument(
        "--seed",
        type=int,
        default=None,
        metavar="N",
        help="data order and initialisation seed (default: the run's, or 0)",
    )
    data.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default cpu)")


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """``--out``, ``--overwrite``, ``--json``."""
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the model and the report")
    parser.add_argument("--overwrite", action="store_true", help="replace a model and report already in DIR")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")


#: The counts :func:`add_shared_arguments` adds -> the smallest value each takes.
DATA_COUNTS: dict[str, int] = {
    "--batch-size": 1,
    "--eval-examples": 1,
    "--rounds": 1,
    "--generate-tokens": 1,
    "--seq-len": 1,
}


def check_numbers(args: argparse.Namespace, flags: dict[str, int]) -> None:
    """Refuse counts below their smallest value, naming the flag: the command's own ``flags`` (flag ->
    smallest allowed value), then the shared :data:`DATA_COUNTS`."""
    for flag, low in {**flags, **DATA_COUNTS}.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None and value < low:
            what = "a positive integer" if low == 1 else f"an integer >= {low}"
            raise ValueError(f"{flag} must be {what}, got {value}")


def _parse_task_options(items: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--task-option must look like key=value (e.g. max_length=64), got {item!r}")
        try:
            options[key] = json.loads(text)
        except json.JSONDecodeError:
            options[key] = text
    return options


@dataclass
class DataSetup:
    """The data of a command and the sizes it runs at."""

    data: Any  # attnkit.data.pipeline.TrainingData
    description: str
    batch_size: int
    eval_examples: int
    seed: int
    lr: float | None  # the run's learning rate, when the data came from a run


def resolve_data(args: argparse.Namespace, config: Any, model_dir: Path, *, model_flag: str) -> DataSetup:
    """The run's data (``config``), or ``--data``; a model folder without ``--data`` is refused.

    Raises:
        ValueError: no data, task options without ``--data``, or a vocabulary that is not the model's.
    """
    from attnkit.data.pipeline import build_data

    if args.task_option and args.data is None:
        raise ValueError("--task-option applies to --data: add --data TASK, or drop --task-option")
    if args.data is None and config is None:
        raise ValueError(
            f"{model_flag} {model_dir} is a model folder, which carries no data: pass --data TASK (e.g. --data text, "
            "or the task it was trained on) for the quality figures, or pass the training run folder instead"
        )
    seed = args.seed if args.seed is not None else (config.seed if config is not None else 0)
    if args.data is not None:
        data = build_data(
            args.data,
            task_options=_parse_task_options(args.task_option) or None,
            seq_len=args.seq_len or 256,
            tokenizer=args.tokenizer or "byte",
            seed=seed,
            tokenizer_dir=model_dir,
        )
        description = f"--data {args.data}"
    else:
        for flag in ("--seq-len", "--tokenizer"):
            if getattr(args, flag[2:].replace("-", "_")) is not None:
                raise ValueError(f"{flag} sets up --data; the run's own data is used here: add --data, or drop {flag}")
        data = config.build_data(tokenizer_dir=model_dir, seed=seed)
        description = f"the run's training data ({config.task})"
    return DataSetup(
        data=data,
        description=description,
        batch_size=args.batch_size or (config.batch_size if config is not None else 16),
        eval_examples=args.eval_examples or (config.eval_examples if config is not None else 128),
        seed=seed,
        lr=config.lr if config is not None else None,
    )


@dataclass
class Source:
    """The model a command starts from (``MODEL``, ``--teacher``), loaded on ``--device``, and its data."""

    path: Path  # the folder given: a training run folder or a model folder
    weights: Any  # attnkit.train.runs.Weights: the model folder read and how it was chosen
    model: Any
    device: Any  # torch.device
    setup: DataSetup


def load_source(args: argparse.Namespace, path: Path, which: str | None, *, flag: str, role: str) -> Source:
    """Check ``--out``, then load the model of ``path`` (its ``which`` weights) and the data it is measured on.

    Args:
        args: the command's arguments (``--out``, ``--overwrite``, ``--device`` and the data arguments).
        path: a training run folder or a model folder.
        which: the run's ``best``/``final``/``last`` weights, or None (see ``attnkit generate``).
        flag: how the command line names ``path`` in messages (``MODEL``, ``--teacher``).
        role: what the model is, for the progress line (``"loaded"``, ``"teacher"``).

    Raises:
        ValueError: an ``--out`` that holds files (without ``--overwrite``) or is the folder read
            from, no data for a model folder, or data that is not the model's.
        FileNotFoundError: ``path`` is neither a run folder nor a model folder.
    """
    from attnkit.train.runs import resolve_weights, run_config

    out = Path(args.out)
    check_out_dir(out, args.overwrite)
    weights = resolve_weights(path, which)
    if out.resolve() == weights.directory.resolve():
        raise ValueError(f"--out {out} is the folder the model is read from; choose another folder")

    from attnkit.cli import check_device
    from attnkit.compress import load_compressed

    device = check_device(args.device)
    model = load_compressed(weights.directory, map_location=str(device))
    print(
        f"attnkit {args.command}: {role} {weights.directory} ({weights.description}): {type(model).__name__}, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters, on {device}",
        file=sys.stderr,
    )
    setup = resolve_data(args, run_config(path), weights.directory, model_flag=flag)
    check_data_fits(model, setup, model_flag=flag)
    return Source(path, weights, model, device, setup)


def check_data_fits(model: Any, setup: DataSetup, *, model_flag: str) -> None:
    """Refuse data whose vocabulary or classes are not the model's (naming ``--data``)."""
    cfg, data = model.config, setup.data
    if data.vocab_size != cfg.vocab_size:
        raise ValueError(
            f"{setup.description} has a vocabulary of {data.vocab_size} ids but the model ({model_flag}) has "
            f"{cfg.vocab_size}: pass the --data the model was trained on (and its --tokenizer)"
        )
    if data.kind == "classification" and data.num_classes != cfg.num_classes:
        raise ValueError(
            f"{setup.description} has {data.num_classes} classes but the model ({model_flag}) has {cfg.num_classes}"
        )


def train_batches(setup: DataSetup) -> Any:
    """An endless, deterministic stream of training batches (the trainer's batcher)."""
    from attnkit.data.batching import BucketBatcher

    return BucketBatcher(
        setup.data.stream("train"), batch_size=setup.batch_size, seed=setup.seed, pad_id=setup.data.pad_id
    )


def eval_set(setup: DataSetup, split: str) -> list[Any]:
    """The fixed evaluation batches of ``split``."""
    from attnkit.data.batching import eval_batches

    examples = setup.data.eval_examples(split, setup.eval_examples)
    if not examples:
        raise ValueError(f"split {split!r} of {setup.description} has no examples; choose another --split")
    return eval_batches(examples, batch_size=setup.batch_size, pad_id=setup.data.pad_id)


def workload(models: list[Any], setup: DataSetup, generate_tokens: int) -> Any:
    """Speed inputs: a training batch of real training examples (its first row is the batch-1 input).

    Generation is timed when every model generates, with a prompt that leaves room for the new
    tokens within the smallest ``max_len``.
    """
    from attnkit.compress.report import make_workload
    from attnkit.data.tasks import collate
    from attnkit.models import EncoderDecoder, LanguageModel

    stream = setup.data.stream("train")
    examples = [next(stream) for _ in range(setup.batch_size)]
    return make_workload(
        collate(examples, pad_id=setup.data.pad_id),
        generate_tokens=generate_tokens,
        max_len=min(m.config.max_len for m in models),
        generates=all(isinstance(m, (LanguageModel, EncoderDecoder)) for m in models),
    )


def measure(
    models: dict[str, tuple[str, Any, Path]], setup: DataSetup, args: argparse.Namespace, device: Any
) -> dict[str, dict[str, Any]]:
    """Quality and speed of every model (``name -> (label, model, its folder)``), measured side by side."""
    from attnkit.compress.report import measure_speed, model_entry
    from attnkit.data.pipeline import TrainingData
    from attnkit.train import evaluate

    data: TrainingData = setup.data
    batches = eval_set(setup, args.split)
    quality = {}
    for name, (label, model, _) in models.items():
        print(
            f"attnkit {args.command}: scoring {label} on {setup.eval_examples} {args.split} examples", file=sys.stderr
        )
        quality[name] = evaluate(model, batches, data, device=device, generate=data.kind == "seq2seq")
    work = workload([model for _, model, _ in models.values()], setup, args.generate_tokens)
    speed = measure_speed(
        {name: model for name, (_, model, _) in models.items()}, work, rounds=args.rounds, device=device
    )
    entries = {
        name: model_entry(label, model, folder, quality[name], speed[name])
        for name, (label, model, folder) in models.items()
    }
    return {"models": entries, "workload": work.describe()}


def write_model_folder(model: Any, out: Path, tokenizer_from: Path | None, overwrite: bool) -> None:
    """``save_compressed`` into ``out``, with the tokenizer the model was trained with (so ``generate`` can use it)."""
    from attnkit.compress import save_compressed
    from attnkit.data.tokenizers import TOKENIZER_FILE

    save_compressed(model, out, overwrite=overwrite)
    source = tokenizer_from / TOKENIZER_FILE if tokenizer_from is not None else None
    if source is not None and source.is_file():
        shutil.copyfile(source, out / TOKENIZER_FILE)
    elif (out / TOKENIZER_FILE).exists():  # left by an overwritten earlier model, not this one's
        (out / TOKENIZER_FILE).unlink()


def finish(doc: dict[str, Any], out: Path, args: argparse.Namespace) -> None:
    """Write the report files and print the table (or the JSON document)."""
    from attnkit.compress.report import REPORT_MD, report_table, write_report

    write_report(doc, out)
    if args.json:
        print(json.dumps(doc))
        return
    for step in doc["steps"]:
        print(f"attnkit {args.command}: {step['summary']}")
    print(report_table(doc))
    print(f"attnkit {args.command}: model and report ({REPORT_MD}, report.json, report.png) written to {out}")


def command_line(args: argparse.Namespace, positional: tuple[str, ...]) -> str:
    """The command as a shell line, every option spelled out (defaults included), to rerun it."""
    words = ["attnkit", args.command, *(str(getattr(args, name)) for name in positional)]
    for key, value in vars(args).items():
        if key in ("func", "command", *positional) or value is None or value is False or value == []:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            words.append(flag)
        elif isinstance(value, list):
            words += [w for item in value for w in (flag, str(item))]
        else:
            words += [flag, str(value)]
    return shlex.join(words)


def report(
    args: argparse.Namespace,
    source: Source,
    models: dict[str, tuple[str, Any, Path]],
    steps: list[dict[str, Any]],
    *,
    reference: str,
    positional: tuple[str, ...],
    described: dict[str, str],
) -> None:
    """Measure ``models`` side by side (:func:`measure`), then write the report into ``--out`` and print it.

    Args:
        args: the command's arguments.
        source: the model the command started from, with its device and data.
        models: name -> ``(label, model, its folder)``, in table order.
        steps: what the command did, each ``{"step", "summary", "result"}``.
        reference: the name of the model the others are compared with.
        positional: the command's positional arguments (to spell the command out).
        described: the report's ``source`` entry (where the models came from, in words).
    """
    doc = report_doc(args, source.device, source.setup, reference, positional)
    doc["source"] = described
    doc["steps"] = steps
    doc.update(measure(models, source.setup, args, source.device))
    finish(doc, Path(args.out), args)


def report_doc(
    args: argparse.Namespace, device: Any, setup: DataSetup, reference: str, positional: tuple[str, ...]
) -> dict[str, Any]:
    """The report's header fields."""
    from attnkit.compress.report import machine

    return {
        "command": args.command,
        "argv": command_line(args, positional),
        "device": str(device),
        "machine": machine(),
        "reference": reference,
        "settings": {
            "data": setup.description,
            "split": args.split,
            "eval_examples": setup.eval_examples,
            "batch_size": setup.batch_size,
            "rounds": args.rounds,
            "seed": setup.seed,
        },
    }


# ---------------------------------------------------------------- compress
