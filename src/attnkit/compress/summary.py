"""The compression report: every compressed model against its baseline, measured in one run, with the floors.

``scripts/compress_report.sh`` makes the models (``attnkit train``, ``attnkit compress``,
``attnkit distill``) and then calls::

    python -m attnkit.compress.summary --baseline runs/compress_lm \\
        --row heads=runs/compress_report/heads --row int8_dynamic=runs/compress_report/int8_dynamic ... \\
        --out docs/compress-report

which loads every model from disk, scores it on one fixed evaluation set and times it in
alternating rounds next to the baseline (:func:`attnkit.compress.report.measure_speed`), so that
every ratio in the table compares models measured in the same process, under the same load.
Each row has: parameters, linear-layer weight bytes (:func:`linear_weight_bytes`), bytes on disk,
forward latency at a long context (2K by default) at batch 1, generation latency per new token at
batch 1 (greedy, cache, a short prompt), peak memory, perplexity and bits per character, and its
ratios to the baseline. The floors of the report (:data:`FLOORS`) are judged on those numbers and
marked met / not met; none is assumed.

Rows are known by name (:data:`ROW_LABELS`), so that the floors can refer to them.
"""

from __future__ import annotations

import argparse
import json
import operator
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnkit.compress.report import (
    REPORT_JSON,
    REPORT_MD,
    REPORT_PLOT,
    label_bars,
    metric_at,
    save_figure,
    speed_flag,
    table_head,
    write_report_files,
)

#: Row names -> labels in the table, in table order.
ROW_LABELS: dict[str, str] = {
    "baseline": "baseline (full attention, fp32)",
    "heads": "30% of heads pruned + fine-tune",
    "ffn": "FFN channels pruned + fine-tune",
    "magnitude": "50% of linear weights zeroed (magnitude, unstructured)",
    "int8_dynamic": "int8 dynamic",
    "int8_weight_only": "int8 weight-only",
    "sliding_window_distilled": "sliding_window student, distilled",
    "sliding_window_scratch": "sliding_window student, from scratch",
    "linear_distilled": "linear student, distilled",
    "linear_scratch": "linear student, from scratch",
    "combined": "combined: distilled sliding_window student, heads pruned + fine-tune, int8",
}

#: Report files written into ``--out``.
SUMMARY_JSON, SUMMARY_MD, SUMMARY_PLOT = REPORT_JSON, REPORT_MD, REPORT_PLOT

_COMPARE = {">=": operator.ge, "<=": operator.le, "<": operator.lt}


@dataclass(frozen=True)
class Floor:
    """A bound on ``metric(numerator row) / metric(denominator row)``.

    A speed-up is ``baseline time / row time`` (numerator: the baseline); a quality cost is
    ``row perplexity / baseline perplexity`` (numerator: the row).

    Attributes:
        description: what the floor asks, in words.
        numerator: ``(row name, metric path)`` on top of the ratio.
        denominator: ``(row name, metric path)`` below.
        compare: ``">="``, ``"<="`` or ``"<"``.
        bound: the ratio's bound.
    """

    description: str
    numerator: tuple[str, str]
    denominator: tuple[str, str]
    compare: str
    bound: float

    def judge(self, rows: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        """``{"floor", "value", "bound", "met"}``; ``met`` is None when a row or a number is missing."""
        top, bottom = rows.get(self.numerator[0]), rows.get(self.denominator[0])
        value = paired_ratio(top, bottom, self.numerator[1], self.denominator[1])
        met = None if value is None else bool(_COMPARE[self.compare](value, self.bound))
        return {"floor": self.description, "value": value, "bound": f"{self.compare} {self.bound:g}", "met": met}


_FORWARD = "speed.forward_ms_batch1"
_GENERATE = "speed.generate_ms_per_token_batch1"
_PERPLEXITY = "quality.perplexity"
_LINEAR = "linear_weight_bytes"

#: The report's floors (issue 20). Speed-ups: baseline time / row time; costs: row / baseline.
FLOORS: tuple[Floor, ...] = (
    Floor("heads pruned 30% + fine-tune: forward at the long context, batch 1, >= 1.2x faster",
          ("baseline", _FORWARD), ("heads", _FORWARD), ">=", 1.2),
    Floor("heads pruned 30% + fine-tune: perplexity at most 5% higher",
          ("heads", _PERPLEXITY), ("baseline", _PERPLEXITY), "<=", 1.05),
    Floor("int8 dynamic: batch-1 generation >= 1.5x faster",
          ("baseline", _GENERATE), ("int8_dynamic", _GENERATE), ">=", 1.5),
    Floor("int8 dynamic: linear-layer weights >= 3.5x smaller",
          ("baseline", _LINEAR), ("int8_dynamic", _LINEAR), ">=", 3.5),
    Floor("int8 dynamic: perplexity at most 3% higher",
          ("int8_dynamic", _PERPLEXITY), ("baseline", _PERPLEXITY), "<=", 1.03),
    Floor("sliding_window student: distilled perplexity below from-scratch (same steps)",
          ("sliding_window_distilled", _PERPLEXITY), ("sliding_window_scratch", _PERPLEXITY), "<", 1.0),
    Floor("linear student: distilled perplexity below from-scratch (same steps)",
          ("linear_distilled", _PERPLEXITY), ("linear_scratch", _PERPLEXITY), "<", 1.0),
)  # fmt: skip

#: Table columns: (header, metric path, kind) with kind "int", "mb" (bytes shown in MB) or "num".
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("parameters", "parameters", "int"),
    ("linear weights (MB)", _LINEAR, "mb"),
    ("on disk (MB)", "bytes_on_disk", "mb"),
    ("forward {context}, batch 1 (ms)", _FORWARD, "num"),
    ("generation, batch 1 (ms/token)", _GENERATE, "num"),
    ("peak memory (MB)", "speed.peak_memory_mb", "num"),
    ("perplexity", _PERPLEXITY, "num"),
    ("bpc", "quality.bpc", "num"),
)
#: Ratio columns: (header, metric path, True when the ratio is baseline / row (a speed-up or a saving)).
RATIOS: tuple[tuple[str, str, bool], ...] = (
    ("forward speed-up", _FORWARD, True),
    ("generation speed-up", _GENERATE, True),
    ("linear weights smaller", _LINEAR, True),
    ("perplexity ratio", _PERPLEXITY, False),
)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of every linear layer's weight: float weights, or int8 weights plus their float scales.

    Each tensor is counted once (the LM head's weight, tied to the token embedding, is counted
    as one linear weight). Biases are not weights and are left out.
    """
    from attnkit.compress.quantize import Int8Linear

    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if isinstance(module, Int8Linear):
            tensors = [module.qweight, module.scale]
        elif isinstance(module, nn.Linear):
            tensors = [module.weight]
        else:
            continue
        for tensor in tensors:
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                total += tensor.numel() * tensor.element_size()
    return total


def paired_ratio(
    top: Mapping[str, Any] | None, bottom: Mapping[str, Any] | None, path: str, bottom_path: str | None = None
) -> float | None:
    """``top / bottom`` of a metric (``bottom_path``: another metric below); for timings, the median of the per-round ratios.

    Both models of a round were measured in the same pass, minutes apart from other rounds, so a
    load change between rounds moves both sides of a round's ratio alike; the median of those
    ratios is steadier than the ratio of two medians taken over different rounds. Entries without
    per-round timings (``speed_rounds``) fall back to the ratio of the medians.
    """
    bottom_path = bottom_path or path
    first, second = metric_at(top, path), metric_at(bottom, bottom_path)
    if not (_number(first) and _number(second)) or not first or not second:
        return None
    if path == bottom_path and path.startswith("speed."):
        key = path.removeprefix("speed.")
        pairs = zip((top or {}).get("speed_rounds") or [], (bottom or {}).get("speed_rounds") or [])
        ratios = [a[key] / b[key] for a, b in pairs if _number(a.get(key)) and _number(b.get(key)) and b[key]]
        if ratios:
            return float(statistics.median(ratios))
    return float(first) / float(second)


def ratio(entry: Mapping[str, Any], baseline: Mapping[str, Any], path: str, saving: bool) -> float | None:
    """``baseline / entry`` (``saving``: a speed-up or size saving) or ``entry / baseline`` of a metric."""
    return paired_ratio(baseline, entry, path) if saving else paired_ratio(entry, baseline, path)


def judge_floors(rows: Mapping[str, Mapping[str, Any]], floors: Sequence[Floor] = FLOORS) -> list[dict[str, Any]]:
    """Every floor judged on ``rows`` (row name -> entry)."""
    return [floor.judge(rows) for floor in floors]


# ---------------------------------------------------------------- rendering


def _cell(value: Any, kind: str) -> str:
    if not _number(value):
        return "-"
    if kind == "int":
        return f"{int(value):,}"
    if kind == "mb":
        return f"{value / 1e6:.2f}"
    return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"


def summary_table(doc: Mapping[str, Any]) -> str:
    """One row per model: its figures, then its ratios to the baseline (Markdown)."""
    rows, baseline = doc["rows"], doc["rows"]["baseline"]
    context = doc["workload"]["context"]
    header = ["model", *(h.format(context=context) for h, _, _ in COLUMNS), *(h for h, _, _ in RATIOS)]
    lines = table_head(header)
    for entry in rows.values():
        cells = [entry["label"]]
        cells += [_cell(metric_at(entry, path), kind) + speed_flag(entry, path) for _, path, kind in COLUMNS]
        for _, path, saving in RATIOS:
            value = ratio(entry, baseline, path, saving)
            cells.append("-" if value is None else f"{value:.3f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def floors_table(floors: Sequence[Mapping[str, Any]]) -> str:
    """The floors, their measured ratio and whether each is met (Markdown)."""
    lines = ["| floor | measured | bound | met |", "|---|---:|---:|:---:|"]
    for floor in floors:
        value = "-" if floor["value"] is None else f"{floor['value']:.3f}"
        met = {True: "met", False: "**not met**", None: "not measured"}[floor["met"]]
        lines.append(f"| {floor['floor']} | {value} | {floor['bound']} | {met} |")
    return "\n".join(lines)


def render_markdown(doc: Mapping[str, Any]) -> str:
    """The whole report: how it was made, the table, the floors, each row's steps."""
    work, machine = doc["workload"], doc["machine"]
    parts = [
        "# Compression report",
        "",
        f"Made by `{doc['script']}`; the table by `{doc['argv']}`.",
        "",
        summary_table(doc),
        "",
        "## Floors",
        "",
        floors_table(doc["floors"]),
        "",
        "## How it was measured",
        "",
        f"Every model was loaded from its folder and measured in one process on {doc['device']} "
        f"({machine['threads']} thread(s), {machine['cpu_count']} CPUs, torch {machine['torch']}, attnkit at "
        f"{machine.get('commit') or 'an unknown commit'}, load average {machine.get('load_average') or '?'} "
        "at the start), in "
        f"{doc['settings']['rounds']} alternating rounds after a warm-up round (each figure is the median; a "
        "speed ratio is the median of the per-round ratios, each taken between two models measured in the same "
        "round). Forward: one "
        f"{work['context']}-token window of the corpus at batch 1. Generation: greedy with the cache, "
        f"{work['generate_tokens']} new tokens after a {work['prompt_length']}-token prompt at batch 1 "
        "(wall time of the call / new tokens, the same generation code for every model). Peak memory: "
        f"resident-set high-water mark of a forward at the training batch ({work['batch_size']} x "
        f"{work['sequence_length']} tokens). Quality: {doc['settings']['eval_examples']} {doc['settings']['split']} "
        f"windows of {work['sequence_length']} bytes of {doc['settings']['data']}. Linear weights: every linear "
        "layer's weight (int8 weights + float32 row scales once quantized; the LM head, tied to the embedding, "
        "in float). `?`: the slowest round took over 1.5x the fastest (a busy machine).",
        "",
        "## Rows",
        "",
    ]
    for entry in doc["rows"].values():
        parts.append(f"- **{entry['label']}** (`{entry['directory']}`)" + ("" if entry["steps"] else ": as trained"))
        parts += [f"  - {step}" for step in entry["steps"]]
    parts += ["", f"![ratios to the baseline]({SUMMARY_PLOT})", ""]
    return "\n".join(parts)


def plot_summary(doc: Mapping[str, Any], path: str | Path) -> None:
    """One panel per ratio column: a bar per row, the floors as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, baseline = doc["rows"], doc["rows"]["baseline"]
    names = [name for name in rows if name != "baseline"]
    fig, axes = plt.subplots(1, len(RATIOS), figsize=(4 * len(RATIOS), 0.42 * len(names) + 1.8), sharey=True)
    for ax, (header, metric, saving) in zip(axes, RATIOS):
        values = [ratio(rows[name], baseline, metric, saving) for name in names]
        shown = [v if v is not None else 0.0 for v in values]
        ax.barh(range(len(names)), shown, color=["tab:blue" if saving else "tab:orange"] * len(names))
        label_bars(ax, range(len(names)), values)
        ax.axvline(1.0, color="black", linewidth=1)
        for floor in FLOORS:  # a floor on this ratio against the baseline: draw its bound
            if "baseline" in (floor.numerator[0], floor.denominator[0]) and floor.numerator[1] == metric:
                ax.axvline(floor.bound, color="red", linestyle="--", linewidth=1)
        ax.set_title(f"{header} ({'higher' if saving else 'lower'} is better)", fontsize=9)
        ax.margins(x=0.2)
    axes[0].set_yticks(range(len(names)))
    axes[0].set_yticklabels([rows[name]["label"] for name in names], fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle("each model against the baseline (red dashes: the floors)", fontsize=10)
    save_figure(fig, path)


def write_summary(doc: Mapping[str, Any], directory: str | Path) -> list[Path]:
    """``report.json``, ``report.md`` and ``report.png`` in ``directory``; returns their paths."""
    return write_report_files(doc, directory, render_markdown(doc), plot_summary)


# ---------------------------------------------------------------- measuring


def parse_rows(items: Sequence[str]) -> dict[str, Path]:
    """``--row NAME=DIR`` items -> ``{name: folder}`` (names from :data:`ROW_LABELS`, each once)."""
    rows: dict[str, Path] = {}
    known = ", ".join(name for name in ROW_LABELS if name != "baseline")
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not folder:
            raise ValueError(f"--row must look like NAME=DIR (e.g. --row heads=runs/heads30), got {item!r}")
        if name not in ROW_LABELS or name == "baseline":
            raise ValueError(f"--row {item}: unknown row name {name!r}; use one of: {known} (baseline is --baseline)")
        if name in rows:
            raise ValueError(f"--row {name} is given twice; give each row once")
        rows[name] = Path(folder)
    return rows


def _steps_of(directory: Path) -> list[str]:
    """What made the model: the step summaries of the ``attnkit compress``/``distill`` report in its folder."""
    report = directory / "report.json"
    if not report.is_file():
        return []
    doc = json.loads(report.read_text())
    return [f"{step['summary']}" for step in doc.get("steps", [])] + [f"command: `{doc.get('argv', '?')}`"]


def _workload(config: Any, weights_dir: Path, *, context: int, prompt_length: int, generate_tokens: int) -> Any:
    """A ``context``-token window at batch 1 (forward, generation prompt) and a training batch (peak memory)."""
    from attnkit.compress.report import Workload
    from attnkit.data.tasks import collate

    def examples(seq_len: int, count: int) -> tuple[list[Any], int]:
        data = config.build_data(tokenizer_dir=weights_dir, seq_len=seq_len)
        stream = data.stream("train")
        return [next(stream) for _ in range(count)], data.pad_id

    long_rows, pad = examples(context, 1)
    if long_rows[0].length < context:
        raise ValueError(f"--context {context}: the corpus gave a window of {long_rows[0].length} tokens; lower it")
    batch_rows, _ = examples(config.seq_len, config.batch_size)
    return Workload(
        batch1=collate(long_rows, pad_id=pad),
        batch=collate(batch_rows, pad_id=pad),
        generate_tokens=generate_tokens,
        prompt_length=prompt_length,
    )


def build_summary(args: argparse.Namespace) -> dict[str, Any]:
    """Load, score and time every model; the report document (see :func:`write_summary`)."""
    from attnkit.compress import load_compressed
    from attnkit.compress.report import bytes_on_disk, count_weights, machine, measure_speed
    from attnkit.data.batching import eval_batches
    from attnkit.train import evaluate
    from attnkit.train.runs import resolve_weights, run_config

    baseline_run = Path(args.baseline)
    config = run_config(baseline_run)
    if config is None:
        raise ValueError(f"--baseline {baseline_run} must be a training run folder (out_dir of 'attnkit train')")
    folders = {"baseline": resolve_weights(baseline_run, None).directory} | {
        name: resolve_weights(folder, None).directory for name, folder in parse_rows(args.row).items()
    }
    models = {name: load_compressed(folder) for name, folder in folders.items()}
    vocab = models["baseline"].config.vocab_size
    for name, model in models.items():
        if model.config.vocab_size != vocab:
            raise ValueError(
                f"--row {name}={folders[name]} has a vocabulary of {model.config.vocab_size} ids, the baseline "
                f"{vocab}: every row must be a model of the baseline's data"
            )
        if model.config.max_len < args.context:
            raise ValueError(f"--context {args.context} is longer than {name}'s max_len {model.config.max_len}")
    data = config.build_data(tokenizer_dir=folders["baseline"])
    examples = data.eval_examples(args.split, args.eval_examples)
    batches = eval_batches(examples, batch_size=config.batch_size, pad_id=data.pad_id)
    quality = {}
    for name, model in models.items():
        print(f"summary: scoring {name} on {len(examples)} {args.split} windows", file=sys.stderr)
        quality[name] = evaluate(model, batches, data)
    work = _workload(
        config,
        folders["baseline"],
        context=args.context,
        prompt_length=args.prompt_length,
        generate_tokens=args.generate_tokens,
    )
    if args.threads is not None:  # for the timings only: scoring above used every thread
        torch.set_num_threads(args.threads)
    speed = measure_speed(models, work, rounds=args.rounds)
    rows = {
        name: {
            "label": ROW_LABELS[name],
            "directory": str(folders[name]),
            "parameters": count_weights(model),
            "linear_weight_bytes": linear_weight_bytes(model),
            "bytes_on_disk": bytes_on_disk(folders[name]),
            "quality": quality[name],
            "speed": speed[name]["median"],
            "speed_spread": speed[name]["spread"],
            "speed_rounds": speed[name]["rounds"],
            "steps": _steps_of(folders[name]),
        }
        for name, model in sorted(models.items(), key=lambda item: list(ROW_LABELS).index(item[0]))
    }
    return {
        "script": args.script,
        "argv": "python -m attnkit.compress.summary " + " ".join(sys.argv[1:]),
        "device": "cpu",
        "machine": machine(),
        "settings": {
            "data": f"the baseline run's data ({config.task}, {config.tokenizer} tokenizer)",
            "split": args.split,
            "eval_examples": len(examples),
            "rounds": args.rounds,
        },
        "workload": {
            "context": args.context,
            "prompt_length": args.prompt_length,
            "generate_tokens": args.generate_tokens,
            "batch_size": config.batch_size,
            "sequence_length": config.seq_len,
        },
        "rows": rows,
        "floors": judge_floors(rows),
    }


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m attnkit.compress.summary``."""
    p = argparse.ArgumentParser(
        prog="python -m attnkit.compress.summary",
        description="Measure a baseline run and its compressed models side by side in one process and write "
        "the compression report (report.md, report.json, report.png) with the floors judged.",
    )
    p.add_argument("--baseline", required=True, metavar="RUN", help="the teacher's training run folder")
    p.add_argument(
        "--row",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help=f"a model folder for a row (repeat); NAME one of: {', '.join(n for n in ROW_LABELS if n != 'baseline')}",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the report")
    p.add_argument("--overwrite", action="store_true", help="replace a report already in DIR")
    p.add_argument("--context", type=int, default=2048, metavar="N", help="forward window, tokens (default 2048)")
    p.add_argument("--prompt-length", type=int, default=64, metavar="N", help="generation prompt (default 64)")
    p.add_argument("--generate-tokens", type=int, default=32, metavar="N", help="new tokens per call (default 32)")
    p.add_argument("--eval-examples", type=int, default=128, metavar="N", help="windows scored (default 128)")
    p.add_argument("--split", choices=("validation", "test"), default="validation", help="split scored")
    p.add_argument("--rounds", type=int, default=3, metavar="N", help="alternating timing rounds (default 3)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch threads (default: torch's)")
    p.add_argument("--script", default="python -m attnkit.compress.summary", help="the command that made the rows")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 on bad input, with the reason on stderr)."""
    args = parser().parse_args(argv)
    try:
        for flag in ("context", "prompt_length", "generate_tokens", "eval_examples", "rounds", "threads"):
            value = getattr(args, flag)
            if value is not None and value < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")
        if args.prompt_length + args.generate_tokens > args.context:
            raise ValueError("--prompt-length + --generate-tokens must fit in --context; shorten the prompt")
        out = Path(args.out)
        if (out / SUMMARY_JSON).exists() and not args.overwrite:
            raise ValueError(f"--out {out} already holds a report; pass --overwrite to replace it")
        parse_rows(args.row)  # before any work
        doc = build_summary(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"python -m attnkit.compress.summary: error: {err}", file=sys.stderr)
        return 2
    write_summary(doc, out)
    print(summary_table(doc))
    print()
    print(floors_table(doc["floors"]))
    print(f"summary: report written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
