"""Markdown, JSON and a plot for the applications report (:mod:`attnkit.arena.applications`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPORT_NAME, JSON_NAME, PLOT_NAME = "report.md", "report.json", "report.png"
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


def _num(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _times(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _flag(spread: Any) -> str:
    # A figure whose slowest round took over 1.5x its fastest was measured on a busy machine.
    return " ?" if spread is not None and spread > 1.5 else ""


def recipe_table(name: str, recipe: Mapping[str, Any]) -> str:
    """One recipe: every mechanism's scores, baselines, speed and memory."""
    summarization = recipe["task"] == "docstrings"
    head = ["mechanism", "BLEU", "chrF", "ROUGE-1", "ROUGE-2", "ROUGE-L"]
    head += ["train step (ms)", "train speed-up", "train peak (MB)", "generation (ms/token)", "generation speed-up"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def score_cells(scores: Mapping[str, float]) -> list[str]:
        # BLEU and chrF come on 0-100 already, ROUGE as a fraction.
        return [_num(scores["bleu"]), _num(scores["chrf"])] + [_num(scores[k] * 100) for k in ROUGE_KEYS]

    for mechanism, run in recipe["runs"].items():
        speed = run["speed"]
        cells = [f"`{mechanism}`" + (f" ({run['options']})" if run.get("options") else "")]
        cells += score_cells(run["scores"]["model"])
        cells += [
            _num(speed["train_step_ms"], 0) + _flag(speed["spread"]["train_step_ms"]),
            _times(speed["train_speedup"]),
            _num(speed["train_peak_mb"], 0),
            _num(speed["generate_ms_per_token"], 2) + _flag(speed["spread"]["generate_ms_per_token"]),
            _times(speed["generate_speedup"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    full = recipe["runs"]["full"]["scores"]
    baselines = [("copy the source", full["copy_source"])]
    if summarization:
        baselines.append(("the source's first line", full["first_line"]))
    for label, scores in baselines:
        lines.append("| " + " | ".join([f"*baseline: {label}*", *score_cells(scores)] + [""] * 5) + " |")
    return "\n".join(lines)


def render_markdown(doc: Mapping[str, Any]) -> str:
    """The whole report."""
    settings, machine = doc["settings"], doc["machine"]
    parts = [
        "# Applications report",
        "",
        f"Made by `{doc['script']}`; the tables by `{doc['argv']}`.",
        "",
        "Every mechanism of a recipe was trained with the same configuration, steps, batches and seed; only "
        "the attention differs (for summarization, only the encoder's: the decoder keeps full attention over the "
        "short summaries).",
        "",
    ]
    for name, recipe in doc["recipes"].items():
        shape = next(iter(recipe["runs"].values()))["speed"]["shape"]
        parts += [
            f"## {name}: `{recipe['task']}`",
            "",
            f"Trained {recipe['steps']} steps of {recipe['batch_size']} examples, {recipe['seq_len']} tokens per "
            f"input at most ({recipe['tokenizer']} tokens); scored on {recipe['examples']} {settings['split']} "
            f"examples by greedy decoding. Speed and memory: batch of the {shape['batch']} longest training inputs "
            f"({shape['source_tokens']} tokens).",
            "",
            recipe_table(name, recipe),
            "",
            "Samples (full attention):",
            "",
        ]
        for sample in recipe["runs"]["full"]["scores"]["samples"]:
            source = sample["source"].replace("\n", " ")
            source = source if len(source) <= 160 else source[:157] + "..."
            parts += [
                f"- source: `{source}`",
                f"  - reference: {sample['reference']!r}",
                f"  - output: {sample['output']!r}",
            ]
        parts.append("")
    parts += ["## Floors", "", "| floor | measured | met |", "|---|---|:---:|"]
    for floor in doc["floors"]:
        parts.append(f"| {floor['floor']} | {floor['measured']} | {'met' if floor['met'] else '**not met**'} |")
    parts += [
        "",
        "## How it was measured",
        "",
        f"One process on {machine['platform']} ({settings['threads']} thread(s), {machine['cpu_count']} CPUs, "
        f"torch {machine['torch']}, attnkit at {machine.get('commit') or 'an unknown commit'}, load average "
        f"{machine.get('load_average') or '?'} at the start). Scores: BLEU and chrF by sacreBLEU with the tokenizer "
        "of the target language (`zh` for Chinese), ROUGE with CJK-aware tokens (attnkit.metrics); scores x 100. "
        f"Speed: {settings['rounds']} alternating rounds after a warm-up round, medians; a training step is forward, "
        "backward and an AdamW update; generation is greedy with the cache "
        f"({settings['generate_tokens']} new tokens at most, time / tokens produced); ratios to full attention come "
        "from the same rounds. Peak memory: resident-set high-water mark of a training step. `?`: the slowest "
        "round took over 1.5x the fastest (a busy machine).",
        "",
        f"![quality against training-step time]({PLOT_NAME})",
        "",
    ]
    return "\n".join(parts)


def plot(doc: Mapping[str, Any], path: Path) -> None:
    """Per recipe: the main score of each mechanism against its training-step speed-up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recipes = doc["recipes"]
    fig, axes = plt.subplots(1, len(recipes), figsize=(5 * len(recipes), 4), squeeze=False)
    for ax, (name, recipe) in zip(axes[0], recipes.items(), strict=True):
        metric, label = ("rougeL", "ROUGE-L") if recipe["task"] == "docstrings" else ("bleu", "BLEU")
        scale = 100 if metric == "rougeL" else 1
        for mechanism, run in recipe["runs"].items():
            x = run["speed"]["train_speedup"] or 0.0
            y = run["scores"]["model"][metric] * scale
            ax.scatter([x], [y], s=40)
            ax.annotate(mechanism, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        copy = recipe["runs"]["full"]["scores"]["copy_source"][metric] * scale
        ax.axhline(copy, linestyle=":", color="grey", label="copy the source")
        ax.set_xlabel("training-step speed-up vs full attention")
        ax.set_ylabel(label)
        ax.set_title(name)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(doc: Mapping[str, Any], directory: Path) -> list[Path]:
    """``report.md``, ``report.json`` and ``report.png`` in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / JSON_NAME).write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    (directory / REPORT_NAME).write_text(render_markdown(doc))
    plot(doc, directory / PLOT_NAME)
    return [directory / REPORT_NAME, directory / JSON_NAME, directory / PLOT_NAME]
