"""The report of ``attnkit convert``: ``report.json``, ``report.md`` (tables) and ``report.png`` (speed-ups)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from attnkit.compress.report import REPORT_JSON, REPORT_MD, REPORT_PLOT, SPREAD_FLAG, save_figure, spread_mark

_QUALITY_LABELS = {
    "teacher": "teacher (original attention)",
    "swapped": "swapped, no distillation",
    "distilled": "swapped + distilled",
}


def _number(value: Any, digits: str = ".4g") -> str:
    return "-" if value is None else format(value, digits)


def _flagged(entry: Mapping[str, Any], metric: str) -> str:
    return spread_mark(entry["spread"].get(metric))


def quality_table(doc: Mapping[str, Any]) -> str:
    """Perplexity and mean NLL of the three models, and each one's ratio to the teacher."""
    quality = doc["quality"]
    teacher = quality["teacher"]["perplexity"]
    lines = ["| model | perplexity | mean NLL (nats) | / teacher |", "|---|---:|---:|---:|"]
    for key, label in _QUALITY_LABELS.items():
        row = quality[key]
        lines.append(f"| {label} | {row['perplexity']:.4f} | {row['nll']:.4f} | {row['perplexity'] / teacher:.3f}x |")
    return "\n".join(lines)


def speed_table(doc: Mapping[str, Any]) -> str:
    """Per context length: training step and decoding time and memory, teacher vs converted, and the speed-ups."""
    speed = doc["speed"]
    if not speed:
        return "(speed not measured: no --lengths)"
    lines = [
        "| context | fwd+bwd teacher (ms) | fwd+bwd converted (ms) | speed-up | peak MB teacher | peak MB converted "
        "| decode teacher (ms/token) | decode converted (ms/token) | speed-up |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for length in speed["teacher"]:
        t, c = speed["teacher"][length], speed["converted"][length]
        cells = [length]
        for metric, ratio in (("train_ms", True), ("train_peak_mb", False), ("decode_ms_per_token", True)):
            a, b = t["median"].get(metric), c["median"].get(metric)
            cells += [_number(a, ".1f") + _flagged(t, metric), _number(b, ".1f") + _flagged(c, metric)]
            if ratio:
                cells.append(f"{a / b:.2f}x" if a and b else "-")
        lines.append("| " + " | ".join(str(x) for x in cells) + " |")
    return "\n".join(lines)


def speedups(doc: Mapping[str, Any], metric: str) -> dict[int, float]:
    """``{length: teacher / converted}`` of ``metric`` (higher = the converted model is faster)."""
    out = {}
    for length, entry in doc["speed"].get("teacher", {}).items():
        a, b = entry["median"].get(metric), doc["speed"]["converted"][length]["median"].get(metric)
        if a and b:
            out[int(length)] = a / b
    return out


def markdown(doc: Mapping[str, Any]) -> str:
    """``report.md``."""
    settings, data = doc["settings"], doc["data"]
    gap = doc["gap_closed"]
    options = ", ".join(f"{k}={v}" for k, v in doc["options"].items()) or "defaults"
    layers = "all layers" if doc["layers"] is None else f"layers {doc['layers']}"
    parts = [
        f"# attnkit convert: {doc['family']} -> {doc['attention']}",
        "",
        f"Command: `{doc['command']}`",
        "",
        f"- teacher: {doc['teacher']} ({doc['parameters']:,} parameters); attention `{doc['attention']}` "
        f"({options}) in {layers}",
        f"- stage 1 (attention transfer): {settings['layer_steps']} steps at lr {settings['layer_lr']}; "
        f"stage 2 (logit distillation, T={settings['temperature']}, ce weight {settings['ce_weight']}): "
        f"{settings['steps']} steps at lr {settings['lr']}; trained: `{settings['train']}`; batch "
        f"{settings['batch_size']} x {settings['seq_len']} tokens",
        f"- data: {data['train_files']} training files ({data['train_tokens']:,} tokens), "
        f"{data['heldout_files']} held-out files; tokenizer {data['tokenizer']}",
        "",
        f"## Perplexity on held-out text ({data['eval_windows']} windows of {data['eval_length']} tokens)",
        "",
        quality_table(doc),
        "",
        "Gap closed by distillation: " + ("-" if gap is None else f"{gap:.1%}") + " of (swapped - teacher) perplexity.",
        "",
        f"## Speed and memory vs the teacher with SDPA (batch 1, {doc['device']})",
        "",
        speed_table(doc),
        "",
        f"Median of {settings['rounds']} alternating rounds (after one warm-up round at the first length); fwd+bwd = one forward and "
        f"backward of next-token cross-entropy; decode = time per new token over {settings['decode_tokens']} "
        "greedy cached steps after a prefill of the context. Peak MB: extra memory of the fwd+bwd "
        "(CUDA allocator peak, or resident-set high-water mark on CPU). "
        f"`?`: the slowest round took over {SPREAD_FLAG}x the fastest (busy machine). Machine: "
        f"{doc['machine']['platform']}, {doc['machine']['threads']} threads, torch {doc['machine']['torch']}.",
        "",
    ]
    if doc["speed"]:
        parts += [f"![speed-ups]({REPORT_PLOT})", ""]
    return "\n".join(parts)


def plot(doc: Mapping[str, Any], path: Path) -> None:
    """Speed-ups of the converted model over the teacher against context length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for metric, label in (("train_ms", "forward+backward"), ("decode_ms_per_token", "decode, per token")):
        points = speedups(doc, metric)
        if points:
            ax.plot(list(points), list(points.values()), marker="o", label=label)
    speedup_axes(ax, f"{doc['family']} -> {doc['attention']}: speed-up (higher is better)")
    save_figure(fig, path)


def speedup_axes(ax: Any, title: str) -> None:
    """Dress axes that plot speed-ups over the teacher against the context length (log2 axis, 1x line)."""
    ax.axhline(1.0, color="black", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("teacher (SDPA) time / converted time")
    ax.set_title(title)
    ax.legend()


def write_report(doc: Mapping[str, Any], directory: Path) -> list[Path]:
    """Write ``report.json``, ``report.md`` and (with speed results) ``report.png``; returns the paths."""
    written = [directory / REPORT_JSON, directory / REPORT_MD]
    written[0].write_text(json.dumps(doc, indent=2, default=str) + "\n")
    written[1].write_text(markdown(doc))
    if doc["speed"]:
        plot(doc, directory / REPORT_PLOT)
        written.append(directory / REPORT_PLOT)
    return written
