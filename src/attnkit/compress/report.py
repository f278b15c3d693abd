"""What compression gained and what it cost: models measured side by side in one process.

For each model (``before``/``after`` of ``attnkit compress``; ``teacher``/``student``/
``from scratch`` of ``attnkit distill``) a report holds:

- size: distinct parameters, and bytes on disk of its model files (``config.json``,
  ``model.safetensors``, ``compression.json``);
- speed: forward latency at batch 1 and at a training batch, generation latency per new token
  (greedy, KV cache) at the same two batch sizes, and the peak memory of the training-batch
  forward (:class:`~attnkit.metrics.memory.PeakMemoryMeter`: CUDA allocator peak, or resident-set
  high-water mark on Linux CPUs);
- quality: :func:`attnkit.train.evaluate` on a fixed evaluation set (loss and accuracy; perplexity
  and bits per character for language models; BLEU/ROUGE for seq2seq).

Speed is measured in alternating rounds (every model once per round, the order reversed every
other round, after one untimed warm-up round) and each figure is the median over rounds, so
that a machine getting busier or cooler affects every model alike. Timings are wall-clock on the
machine at hand, which the report records.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnkit.data.tasks import Batch

#: The files that make up a saved (compressed) model; their sizes add up to "bytes on disk".
MODEL_FILES: tuple[str, ...] = ("config.json", "model.safetensors", "compression.json")
REPORT_JSON, REPORT_MD, REPORT_PLOT = "report.json", "report.md", "report.png"

#: Speed keys -> (row label, unit); lower is better for all of them.
SPEED_ROWS: dict[str, str] = {
    "forward_ms_batch1": "forward, batch 1 (ms)",
    "forward_ms_batch": "forward, batch {batch} (ms)",
    "generate_ms_per_token_batch1": "generation, batch 1 (ms/token)",
    "generate_ms_per_token_batch": "generation, batch {batch} (ms/token)",
    "peak_memory_mb": "peak memory, forward at batch {batch} (MB)",
}
#: A timing whose slowest round took this many times its fastest is marked ``?`` (the machine was busy).
SPREAD_FLAG = 1.5
#: Quality keys shown, in order, and whether higher is better.
QUALITY_ROWS: dict[str, bool] = {
    "loss": False,
    "perplexity": False,
    "bpc": False,
    "accuracy": True,
    "exact_match": True,
    "bleu": True,
    "rouge1": True,
    "rougeL": True,
}


def bytes_on_disk(directory: str | Path) -> int:
    """Total size in bytes of the model files (:data:`MODEL_FILES`) present in ``directory``."""
    path = Path(directory)
    return sum((path / name).stat().st_size for name in MODEL_FILES if (path / name).is_file())


@dataclass
class Workload:
    """The inputs speed is measured on: one real example, and one training-sized batch of them.

    Attributes:
        batch1: a batch of one example.
        batch: a batch of ``batch.size`` examples (the training batch size).
        generate_tokens: new tokens per generation call (0: the model does not generate).
        prompt_length: prompt tokens of a language model's generation calls.
    """

    batch1: Batch
    batch: Batch
    generate_tokens: int
    prompt_length: int

    def describe(self) -> dict[str, Any]:
        """Shapes and settings, JSON-ready."""
        return {
            "batch_size": self.batch.size,
            "sequence_length": int(self.batch.input_ids.shape[1]),
            "generate_tokens": self.generate_tokens,
            "prompt_length": self.prompt_length,
        }


def make_workload(batch: Batch, *, generate_tokens: int, max_len: int, generates: bool) -> Workload:
    """A :class:`Workload` from a training-sized ``batch`` (its first row is the batch-1 input).

    Args:
        batch: real examples, as many as the training batch size.
        generate_tokens: new tokens per generation call.
        max_len: the model's ``max_len`` (a language model's prompt plus new tokens must fit).
        generates: whether the model generates (language model or encoder-decoder).
    """
    prompt = min(int(batch.input_ids.shape[1]), max(1, max_len - generate_tokens))
    return Workload(
        batch1=batch.rows(slice(0, 1)),
        batch=batch,
        generate_tokens=generate_tokens if generates else 0,
        prompt_length=prompt,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3, out


def _forward_ms(model: nn.Module, batch: Batch, device: torch.device) -> float:
    from attnkit.train.modeling import forward

    return _timed(lambda: forward(model, batch), device)[0]


def _generate_ms_per_token(model: nn.Module, batch: Batch, work: Workload, device: torch.device) -> float:
    """Wall time of one greedy generation call divided by the new tokens it produced."""
    from attnkit.models import EncoderDecoder, LanguageModel

    if isinstance(model, LanguageModel):
        ids = batch.input_ids[:, : work.prompt_length]
        mask = batch.attention_mask[:, : work.prompt_length]
        elapsed, out = _timed(lambda: model.generate(ids, work.generate_tokens, attention_mask=mask), device)
        produced = out.shape[1] - ids.shape[1]
    else:
        assert isinstance(model, EncoderDecoder), "make_workload sets generate_tokens for generating models only"
        seq2seq = model
        elapsed, out = _timed(
            lambda: seq2seq.generate(batch.input_ids, work.generate_tokens, src_mask=batch.attention_mask), device
        )
        produced = out.shape[1]
    # An end-of-sequence token can stop a call early; per token, calls of any length compare.
    return elapsed / max(int(produced), 1)


def _measure_once(model: nn.Module, work: Workload, device: torch.device, meter: Any) -> dict[str, float | None]:
    values: dict[str, float | None] = {
        "forward_ms_batch1": _forward_ms(model, work.batch1, device),
        "forward_ms_batch": _forward_ms(model, work.batch, device),
    }
    if work.generate_tokens:
        values["generate_ms_per_token_batch1"] = _generate_ms_per_token(model, work.batch1, work, device)
        values["generate_ms_per_token_batch"] = _generate_ms_per_token(model, work.batch, work, device)
    from attnkit.train.modeling import forward

    with meter.track() as peak:
        forward(model, work.batch)
    values["peak_memory_mb"] = peak.mb
    return values


def measure_speed(
    models: Mapping[str, nn.Module],
    work: Workload,
    *,
    rounds: int = 5,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Median latency and peak memory of every model over alternating rounds.

    Args:
        models: name -> model (put in eval mode; gradients off while measuring).
        work: the inputs (moved to ``device`` here).
        rounds: timed rounds (each model measured once per round, after one untimed warm-up round).
        device: where the models are.
        progress: show a progress bar.

    Returns:
        name -> ``{"median": {metric: median}, "spread": {metric: largest / smallest round},
        "rounds": [{metric: value} per timed round]}`` (round ``r`` of every model was measured in
        the same pass, so ratios can be paired round by round) with the keys of :data:`SPEED_ROWS` (generation keys only when ``work.generate_tokens``
        > 0; ``peak_memory_mb`` None where it cannot be measured).
    """
    from tqdm import tqdm

    from attnkit.core.errors import check_positive_int
    from attnkit.metrics.memory import PeakMemoryMeter

    check_positive_int("rounds", rounds, example=5)
    device = torch.device(device)
    work = Workload(work.batch1.to(device), work.batch.to(device), work.generate_tokens, work.prompt_length)
    meter = PeakMemoryMeter(str(device))
    names = list(models)
    samples: dict[str, list[dict[str, float | None]]] = {name: [] for name in names}
    for model in models.values():
        model.eval()
    bar = tqdm(total=(rounds + 1) * len(names), disable=not progress, desc="measure", unit="model", dynamic_ncols=True)
    with torch.inference_mode():
        for round_index in range(rounds + 1):
            order = names if round_index % 2 == 0 else names[::-1]
            for name in order:
                values = _measure_once(models[name], work, device, meter)
                if round_index > 0:  # round 0 warms caches, allocators and lazily built kernels up
                    samples[name].append(values)
                bar.update(1)
    bar.close()
    return {name: {**summarise(rows), "rounds": rows} for name, rows in samples.items()}


def summarise(rows: Sequence[Mapping[str, float | None]]) -> dict[str, dict[str, float | None]]:
    """``{"median": {metric: median}, "spread": {metric: slowest / fastest round}}``."""
    median: dict[str, float | None] = {}
    spread: dict[str, float | None] = {}
    for key in rows[0]:
        values = [v for row in rows if (v := row[key]) is not None]
        median[key] = statistics.median(values) if values else None
        spread[key] = max(values) / min(values) if values and min(values) > 0 else None
    return {"median": median, "spread": spread}


def count_weights(model: nn.Module) -> int:
    """Distinct parameters plus the int8 weights and biases of quantized layers (which are buffers).

    A quantized model keeps its weights as int8 buffers, not parameters: counting only
    parameters would make quantization look like pruning. Scales are not counted.
    """
    from attnkit.compress.quantize import Int8Linear
    from attnkit.compress.records import count_parameters

    int8 = sum(
        m.qweight.numel() + (m.bias.numel() if m.bias is not None else 0)
        for m in model.modules()
        if isinstance(m, Int8Linear)
    )
    return count_parameters(model) + int8


def model_entry(
    label: str,
    model: nn.Module,
    directory: str | Path,
    quality: Mapping[str, Any],
    speed: Mapping[str, Mapping[str, float | None]],
) -> dict[str, Any]:
    """One model's column of the report (``parameters``: :func:`count_weights`; ``speed``: medians)."""
    return {
        "label": label,
        "directory": str(directory),
        "parameters": count_weights(model),
        "bytes_on_disk": bytes_on_disk(directory),
        "quality": dict(quality),
        "speed": dict(speed["median"]),
        "speed_spread": dict(speed["spread"]),
    }


def machine() -> dict[str, Any]:
    """Where and on what code the measurements were taken: the commit of attnkit's source checkout
    (``None`` outside one; ``dirty`` when ``src/`` has uncommitted changes) and the load average."""
    import os
    import platform
    import subprocess

    source = Path(__file__).resolve().parents[3]

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=source, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD") if (source / ".git").exists() else None
    changes = git("status", "--porcelain", "--", "src") if commit else None
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "commit": None if commit is None else commit + ("-dirty" if changes else ""),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


def _ratio(value: Any, reference: Any) -> float | None:
    if not isinstance(value, (int, float)) or not isinstance(reference, (int, float)) or reference == 0:
        return None
    return float(value) / float(reference)


def _rows(doc: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    """``(label, key path, higher is better)`` of every row some model has a value for."""
    batch = doc["workload"]["batch_size"]
    models = doc["models"].values()
    rows = [("parameters", "parameters", False), ("bytes on disk", "bytes_on_disk", False)]
    for key, label in SPEED_ROWS.items():
        if any(m["speed"].get(key) is not None for m in models):
            rows.append((label.format(batch=batch), f"speed.{key}", False))
    split = doc["settings"].get("split", "validation")
    for key, higher in QUALITY_ROWS.items():
        if any(key in m["quality"] for m in models):
            rows.append((f"{key} ({split})", f"quality.{key}", higher))
    return rows


def metric_at(entry: Mapping[str, Any] | None, path: str) -> Any:
    """The value at the dotted ``path`` of a model's entry (``"speed.forward_ms_batch1"``), None where absent."""
    value: Any = entry
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def _show(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    return str(value)


def spread_mark(spread: Any) -> str:
    """`` ?`` for a timing whose slowest round took over :data:`SPREAD_FLAG` times its fastest, else ``""``."""
    return " ?" if isinstance(spread, (int, float)) and spread > SPREAD_FLAG else ""


def speed_flag(entry: Mapping[str, Any], path: str) -> str:
    """:func:`spread_mark` of the metric at ``path`` of a model's entry (``""`` for a metric that is not a timing)."""
    if not path.startswith("speed."):
        return ""
    return spread_mark(entry.get("speed_spread", {}).get(path.removeprefix("speed.")))


def table_head(header: Sequence[str]) -> list[str]:
    """The first two lines of a Markdown table: ``header``, then the first column left-aligned, the others right."""
    return ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]


def report_table(doc: Mapping[str, Any]) -> str:
    """The before/after table in Markdown: one column per model, then each model's ratio to the reference."""
    reference = doc["reference"]
    names = list(doc["models"])
    others = [n for n in names if n != reference]
    header = [
        "",
        *(doc["models"][n]["label"] for n in names),
        *(f"{doc['models'][n]['label']} / {reference}" for n in others),
    ]
    lines = table_head(header)
    for label, path, _ in _rows(doc):
        values = [_show(metric_at(doc["models"][n], path)) + speed_flag(doc["models"][n], path) for n in names]
        ratios = [_ratio(metric_at(doc["models"][n], path), metric_at(doc["models"][reference], path)) for n in others]
        cells = [label, *values, *(f"{r:.3f}x" if r is not None else "-" for r in ratios)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _markdown(doc: Mapping[str, Any]) -> str:
    work, settings = doc["workload"], doc["settings"]
    parts = [f"# attnkit {doc['command']} report", "", f"Command: `{doc['argv']}`", ""]
    parts += [f"- {step['summary']}" for step in doc["steps"]]
    parts += [
        "",
        report_table(doc),
        "",
        f"Speed: median of {settings['rounds']} alternating rounds after a warm-up round, on {doc['device']} "
        f"({doc['machine']['threads']} threads, torch {doc['machine']['torch']}); real training examples padded "
        f"to {work['sequence_length']} tokens, at batch 1 and at batch {work['batch_size']}"
        + (
            f"; generation: {work['generate_tokens']} new tokens (greedy, cache) after a "
            f"{work['prompt_length']}-token prompt, time per new token."
            if work["generate_tokens"]
            else "."
        ),
        f"`?`: the slowest timed round took over {SPREAD_FLAG}x the fastest (a busy machine; the median is shown, "
        "the spread is in report.json as speed_spread): rerun with more --rounds on a quiet machine. "
        f"Quality: {settings['eval_examples']} examples of the {settings['split']} split of {settings['data']}. "
        "Bytes on disk: config.json + model.safetensors + compression.json.",
        "",
        f"![ratios]({REPORT_PLOT})",
        "",
    ]
    return "\n".join(parts)


def plot_report(doc: Mapping[str, Any], path: str | Path) -> None:
    """Each model's ratio to the reference, one bar per row of the table (log scale; 1 = unchanged)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    reference = doc["reference"]
    others = [n for n in doc["models"] if n != reference]
    rows = [(label, p, higher) for label, p, higher in _rows(doc) if p != "quality.loss"]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) * max(len(others), 1) + 1.5))
    height = 0.8 / max(len(others), 1)
    for i, name in enumerate(others):
        ratios = [_ratio(metric_at(doc["models"][name], p), metric_at(doc["models"][reference], p)) for _, p, _ in rows]
        ys = [r + i * height for r in range(len(rows))]
        shown = [v if v is not None and v > 0 else math.nan for v in ratios]
        ax.barh(ys, shown, height=height, label=doc["models"][name]["label"])
        label_bars(ax, ys, shown)
    ax.set_yticks([r + height * (len(others) - 1) / 2 for r in range(len(rows))])
    ax.set_yticklabels([f"{label} ({'higher' if higher else 'lower'} is better)" for label, _, higher in rows])
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.15)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xlabel(f"ratio to {doc['models'][reference]['label']} (log scale)")
    ax.set_title(f"attnkit {doc['command']}: each model against {doc['models'][reference]['label']}")
    ax.legend(loc="best", fontsize=8)
    save_figure(fig, path)


def label_bars(ax: Any, ys: Sequence[float], values: Sequence[float | None]) -> None:
    """Write each horizontal bar's ratio (``1.23x``) just past its end; None or NaN gets no label."""
    for y, value in zip(ys, values):
        if value is not None and not math.isnan(value):
            ax.annotate(f"{value:.2f}x", (value, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)


def save_figure(fig: Any, path: str | Path) -> None:
    """Lay out a matplotlib figure, write it to ``path`` (110 dpi) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(doc: Mapping[str, Any], directory: str | Path) -> list[Path]:
    """Write ``report.json``, ``report.md`` and ``report.png`` into ``directory``; returns their paths."""
    return write_report_files(doc, directory, _markdown(doc), plot_report)


def write_report_files(
    doc: Mapping[str, Any], directory: str | Path, markdown: str, plot: Callable[[Mapping[str, Any], Path], None]
) -> list[Path]:
    """``doc`` as ``report.json``, ``markdown`` as ``report.md`` and ``plot(doc, path)`` as ``report.png``.

    ``directory`` is created if needed; returns the three paths.
    """
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    (path / REPORT_JSON).write_text(json.dumps(doc, indent=2) + "\n")
    (path / REPORT_MD).write_text(markdown)
    plot(doc, path / REPORT_PLOT)
    return [path / REPORT_JSON, path / REPORT_MD, path / REPORT_PLOT]
