"""``attnkit compress MODEL --prune heads=0.3 --quantize int8 --out DIR``: a smaller, faster model and its report.

MODEL is a training run folder (the ``out_dir`` of ``attnkit train``) or a model folder, resolved
as ``attnkit generate`` does. The steps run in a fixed order: the ``--prune`` steps in the order
given, then the optional fine-tune (which can only train float weights), then ``--quantize``
(structured pruning slices float weights, so it cannot follow quantization). DIR receives the
compressed model (``save_compressed``: config + weights + ``compression.json``, plus the
tokenizer) and the report (``report.md``, ``report.json``, ``report.png``) comparing the model
before and after, measured in the same process (:mod:`attnkit.compress.report`).

Data (for the gradient head/channel score, the fine-tune and the quality figures) is the run's
own training data, or ``--data`` for a model folder. The helpers here are shared with
``attnkit distill``. Only the standard library is imported at module level.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


# ---------------------------------------------------------------- arguments shared with distill


def add_data_arguments(parser: argparse.ArgumentParser, *, default_source: str) -> None:
    """The options that choose the data and the measurements (shared by ``compress`` and ``distill``)."""
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


def check_numbers(args: argparse.Namespace, flags: dict[str, int]) -> None:
    """Refuse non-positive counts, naming the flag (``flags``: flag -> smallest allowed value)."""
    for flag, low in flags.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None and value < low:
            what = "a positive integer" if low == 1 else f"an integer >= {low}"
            raise ValueError(f"{flag} must be {what}, got {value}")


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse a DIR that already holds anything, unless ``--overwrite`` (checked before any work)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        held = ", ".join(sorted(p.name for p in out.iterdir())[:5])
        raise ValueError(
            f"--out {out} already holds files ({held}); pass --overwrite to replace them, or choose another folder"
        )


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
        data = build_data(
            config.task,
            task_options=config.task_options,
            seq_len=config.seq_len,
            tokenizer=config.tokenizer,
            tokenizer_vocab_size=config.tokenizer_vocab_size,
            seed=seed,
            tokenizer_dir=model_dir,
        )
        description = f"the run's training data ({config.task})"
    return DataSetup(
        data=data,
        description=description,
        batch_size=args.batch_size or (config.batch_size if config is not None else 16),
        eval_examples=args.eval_examples or (config.eval_examples if config is not None else 128),
        seed=seed,
        lr=config.lr if config is not None else None,
    )


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


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "compress",
        help="prune and/or quantize a trained model, with a before/after report",
        description=textwrap.fill(
            "Prune (attention heads, feed-forward channels, smallest weights) and/or quantize (int8) a trained "
            "model, optionally fine-tune after pruning, save it to --out DIR and write a report there (report.md, "
            "report.json, report.png): parameters, bytes on disk, forward and generation latency at batch 1 and "
            "at the training batch, peak memory and quality (perplexity/bpc, accuracy, BLEU/ROUGE as the task "
            "has), before and after, measured in the same run. Order: the --prune steps as given, then the "
            "fine-tune, then --quantize. MODEL is a training run folder (its own data is used) or a model folder "
            "(pass --data).",
            width=100,
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "model", metavar="MODEL", help="a training run folder (e.g. runs/text_stdlib) or a model folder"
    )
    parser.add_argument(
        "--weights",
        choices=("best", "final", "last"),
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
    add_output_arguments(parser)
    add_data_arguments(parser, default_source="the run's own training data")
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
    check_numbers(
        args,
        {
            "--finetune-steps": 0,
            "--batch-size": 1,
            "--eval-examples": 1,
            "--rounds": 1,
            "--generate-tokens": 1,
            "--seq-len": 1,
        },
    )
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
    from attnkit.train.runs import resolve_weights, run_config

    steps = _check_arguments(args)
    out = Path(args.out)
    check_out_dir(out, args.overwrite)
    source = Path(args.model)
    weights = resolve_weights(source, args.weights)
    if out.resolve() == weights.directory.resolve():
        raise ValueError(f"--out {out} is the folder the model is read from; choose another folder")

    import copy

    from attnkit.cli import check_device
    from attnkit.compress import finetune, load_compressed, quantize

    device = check_device(args.device)
    model = load_compressed(weights.directory, map_location=str(device))
    print(
        f"attnkit compress: loaded {weights.directory} ({weights.description}): {type(model).__name__}, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters, on {device}",
        file=sys.stderr,
    )
    setup = resolve_data(args, run_config(source), weights.directory, model_flag="MODEL")
    check_data_fits(model, setup, model_flag="MODEL")
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
    doc = report_doc(args, device, setup, "before", ("model",))
    doc["source"] = {"model": str(source), "weights": str(weights.directory), "description": weights.description}
    doc["steps"] = done
    doc.update(
        measure(
            {"before": ("before", original, weights.directory), "after": ("after", saved, out)}, setup, args, device
        )
    )
    finish(doc, out, args)
    return 0
