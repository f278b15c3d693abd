"""The conversion recipe's two helpers: train a small Llama teacher, and summarise the conversions.

::

    python -m attnkit.hf.recipe teacher configs/hf/llama_small.toml --out runs/hf-recipe/teacher
    attnkit convert runs/hf-recipe/teacher --attention linear --data ... --out runs/hf-recipe/linear
    python -m attnkit.hf.recipe summary runs/hf-recipe/{sliding_window,linear,performer} --out docs/hf-convert-report

``teacher`` trains a ``LlamaForCausalLM`` with Transformers (its own modules, SDPA attention)
on the running interpreter's standard-library sources (:func:`attnkit.data.sources.stdlib_files`,
the training split; nothing downloaded) or on the files listed in ``[data] paths``, as UTF-8
bytes + 4 (attnkit's byte tokenizer, which ``attnkit convert`` uses for a folder without a
tokenizer), and saves it with ``save_pretrained``. The config file has three tables: ``[model]``
(``LlamaConfig`` fields), ``[train]`` (steps, batch_size, seq_len, lr, warmup_steps, max_tokens,
seed) and ``[data]`` (``source = "stdlib"`` or ``paths = [...]``).

``summary`` gathers the ``report.json`` of each conversion into one ``report.md``/``report.json``
/``report.png`` and checks the issue's floors: distilled ``sliding_window`` within 5% of the
teacher's perplexity, distilled ``linear``/``performer`` closing at least half of the gap; the
floor of a forward+backward at 16K at least 4x faster than SDPA for ``sliding_window`` and
``linear`` is a benchmark (``python -m benchmarks run hf_convert``), quoted from
``benchmarks/results/hf_convert.json`` when it exists.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

#: Floors of issue 19 checked by ``summary``.
PERPLEXITY_WITHIN = 0.05
GAP_CLOSED_AT_LEAST = 0.5
TRAIN_SPEEDUP_AT_LEAST = 4.0
_TRAIN_KEYS = {"steps", "batch_size", "seq_len", "lr", "warmup_steps", "max_tokens", "seed"}


def read_config(path: Path) -> dict[str, Any]:
    """The recipe config (TOML or JSON) with its three tables checked.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a missing table, or unknown ``[train]``/``[data]`` keys.
    """
    import tomllib

    if not path.is_file():
        raise FileNotFoundError(f"CONFIG {path} does not exist")
    text = path.read_text()
    config = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    missing = [t for t in ("model", "train", "data") if not isinstance(config.get(t), dict)]
    if missing:
        raise ValueError(f"CONFIG {path} needs the tables {missing} ([model], [train], [data])")
    unknown = sorted(set(config["train"]) - _TRAIN_KEYS)
    if unknown:
        raise ValueError(f"CONFIG {path}: unknown [train] keys {unknown}; known: {sorted(_TRAIN_KEYS)}")
    data = config["data"]
    if sorted(data) not in (["source"], ["paths"]) or data.get("source", "stdlib") != "stdlib":
        raise ValueError(f'CONFIG {path}: [data] must be source = "stdlib" or paths = ["file or folder", ...]')
    return config


def _files(data: dict[str, Any]) -> list[Path]:
    from attnkit.data.sources import stdlib_files
    from attnkit.hf.text import find_text_files

    if "source" in data:
        return stdlib_files("train")
    return [f for f, _ in find_text_files(data["paths"])]


def train_teacher(config: dict[str, Any], out: Path, *, progress: bool = True) -> dict[str, Any]:
    """Train and save the teacher (module docstring); returns the training record written to ``out/teacher.json``."""
    from tqdm import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    from attnkit.hf.text import batch_at, read_tokens, resolve_tokenizer
    from attnkit.train.schedule import learning_rate

    train = {"warmup_steps": 0, "max_tokens": 8_000_000, "seed": 0, **config["train"]}
    model_config = LlamaConfig(**config["model"])
    torch.manual_seed(train["seed"])
    model = LlamaForCausalLM(model_config)
    model.config._attn_implementation = "sdpa"
    tokenizer = resolve_tokenizer(None, model_config.vocab_size)
    tokens = read_tokens(_files(config["data"]), tokenizer, int(train["max_tokens"]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=train["lr"], weight_decay=0.1, betas=(0.9, 0.95))
    model.train()
    history = []
    start = time.perf_counter()
    bar = tqdm(range(1, train["steps"] + 1), disable=not progress, desc="train teacher", unit="step")
    for step in bar:
        window = batch_at(
            tokens, seed=train["seed"], stage=0, step=step, batch_size=train["batch_size"], seq_len=train["seq_len"]
        )
        loss = model(input_ids=window[:, :-1], labels=window[:, :-1]).loss
        # labels=input_ids: Transformers shifts them itself (predicts token t+1 from tokens <= t).
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        rate = learning_rate(step, lr=train["lr"], warmup_steps=train["warmup_steps"], max_steps=train["steps"])
        for group in optimizer.param_groups:
            group["lr"] = rate
        optimizer.step()
        bar.set_postfix(loss=f"{float(loss):.3f}")
        if step % 25 == 0 or step == train["steps"]:
            history.append({"step": step, "loss": float(loss), "lr": rate})
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    record = {
        "config": config,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_tokens": int(tokens.numel()),
        "elapsed_s": time.perf_counter() - start,
        "history": history,
    }
    (out / "teacher.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _floors(report: dict[str, Any]) -> list[dict[str, Any]]:
    checks = []
    quality = report["quality"]
    if report["attention"] == "sliding_window":
        ratio = quality["distilled"]["perplexity"] / quality["teacher"]["perplexity"]
        checks.append(
            {
                "floor": f"perplexity within {PERPLEXITY_WITHIN:.0%} of the teacher",
                "value": f"{ratio:.3f}x",
                "met": ratio <= 1 + PERPLEXITY_WITHIN,
            }
        )
    else:
        gap = report["gap_closed"]
        checks.append(
            {
                "floor": f"closes >= {GAP_CLOSED_AT_LEAST:.0%} of the perplexity gap",
                "value": "-" if gap is None else f"{gap:.1%}",
                "met": gap is not None and gap >= GAP_CLOSED_AT_LEAST,
            }
        )
    return checks


def benchmark_floor(results: Path = Path("benchmarks/results/hf_convert.json")) -> list[dict[str, Any]]:
    """Issue 19's speed floor as the benchmark measured it: forward+backward at 16K vs SDPA (none if not run)."""
    if not results.is_file():
        return []
    rows = [r for r in json.loads(results.read_text())["rows"] if r.get("status") == "ok" and r["length"] == 16384]
    sdpa = next((r["median_s"] for r in rows if r["role"] == "sdpa"), None)
    checks = []
    for row in rows:
        if row["role"] != "attnkit" or sdpa is None:
            continue
        speedup = sdpa / row["median_s"]
        checks.append(
            {
                "attention": row["label"].removeprefix("attnkit "),
                "floor": f"forward+backward at 16K >= {TRAIN_SPEEDUP_AT_LEAST:g}x faster than SDPA (benchmark hf_convert)",
                "value": f"{speedup:.2f}x",
                "met": speedup >= TRAIN_SPEEDUP_AT_LEAST,
            }
        )
    return checks


def summarise(runs: list[Path], out: Path) -> dict[str, Any]:
    """One report over several conversions' ``report.json`` (module docstring); writes it into ``out``."""
    from attnkit.hf.convert import gap_closed
    from attnkit.hf.convert_report import quality_table, speed_table

    reports = []
    for run in runs:
        path = run / "report.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: run attnkit convert --out {run} first")
        reports.append(json.loads(path.read_text()))
    for report in reports:
        report["gap_closed"] = gap_closed(report["quality"])  # the current definition, for older reports too
        report["floors"] = _floors(report)
    teacher_record = None
    teacher_json = Path(reports[0]["teacher"]) / "teacher.json"
    if teacher_json.is_file():
        teacher_record = json.loads(teacher_json.read_text())
    speed_floors = benchmark_floor()
    doc = {"teacher": teacher_record, "conversions": reports, "benchmark_floors": speed_floors}
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = ["# attnkit convert recipe: a small Llama onto sliding_window, linear and performer", ""]
    if teacher_record:
        train = teacher_record["config"]["train"]
        lines += [
            f"Teacher: LlamaForCausalLM, {teacher_record['parameters']:,} parameters, trained "
            f"{train['steps']} steps of {train['batch_size']} x {train['seq_len']} bytes drawn from "
            f"{teacher_record['train_tokens']:,} bytes of this machine's Python standard library in "
            f"{teacher_record['elapsed_s'] / 60:.1f} min (`configs/hf/llama_small.toml`), last training loss "
            f"{teacher_record['history'][-1]['loss']:.3f} nats/byte.",
            "",
        ]
    lines += ["| attention | floor | value | met |", "|---|---|---:|:---:|"]
    for check in speed_floors:  # the 16K speed floor is a benchmark (hf_convert)
        lines.append(
            f"| {check['attention']} | {check['floor']} | {check['value']} | {'yes' if check['met'] else 'NO'} |"
        )
    for report in reports:
        for check in report["floors"]:
            lines.append(
                f"| {report['attention']} | {check['floor']} | {check['value']} | {'yes' if check['met'] else 'NO'} |"
            )
    for report in reports:
        options = ", ".join(f"{k}={v}" for k, v in report["options"].items()) or "defaults"
        lines += ["", f"## {report['attention']} ({options})", "", f"Command: `{report['command']}`", ""]
        lines += [quality_table(report), "", speed_table(report)]
    machine = reports[0]["machine"]
    lines += [
        "",
        f"Measured on {reports[0]['device']} ({machine['platform']}, {machine['threads']} threads, torch "
        f"{machine['torch']}); speed: median of {reports[0]['settings']['rounds']} alternating rounds (after one "
        "warm-up round at the first length), batch 1; `?` marks a timing whose rounds disagreed by over 1.5x (busy machine).",
        "",
        "![speed-ups](report.png)",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    _plot(reports, out / "report.png")
    return doc


def _plot(reports: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from attnkit.compress.report import save_figure
    from attnkit.hf.convert_report import speedup_axes, speedups

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for report in reports:
        for ax, metric in zip(axes, ("train_ms", "decode_ms_per_token")):
            points = speedups(report, metric)
            if points:
                ax.plot(list(points), list(points.values()), marker="o", label=report["attention"])
    for ax, title in zip(axes, ("forward+backward", "decoding, per new token")):
        speedup_axes(ax, f"{title}: speed-up over the teacher")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    """``python -m attnkit.hf.recipe teacher CONFIG --out DIR`` | ``summary RUN... --out DIR``."""
    parser = argparse.ArgumentParser(prog="python -m attnkit.hf.recipe", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    teacher = commands.add_parser("teacher", help="train and save the recipe's small Llama teacher")
    teacher.add_argument("config", type=Path, metavar="CONFIG", help="e.g. configs/hf/llama_small.toml")
    teacher.add_argument("--out", type=Path, required=True, metavar="DIR", help="where save_pretrained writes it")
    summary = commands.add_parser("summary", help="one report over several attnkit convert --out folders")
    summary.add_argument("runs", type=Path, nargs="+", metavar="RUN", help="attnkit convert --out folders")
    summary.add_argument("--out", type=Path, required=True, metavar="DIR", help="where the report goes")
    args = parser.parse_args(argv)
    try:
        if args.command == "teacher":
            if args.out.is_dir() and any(args.out.iterdir()):
                raise ValueError(f"--out {args.out} already holds files; choose another folder or delete it")
            record = train_teacher(read_config(args.config), args.out)
            print(
                f"teacher: {record['parameters']:,} parameters, last loss {record['history'][-1]['loss']:.3f}, "
                f"{record['elapsed_s'] / 60:.1f} min; saved to {args.out}"
            )
        else:
            doc = summarise(args.runs, args.out)
            failed = [(r["attention"], c["floor"]) for r in doc["conversions"] for c in r["floors"] if not c["met"]]
            print((args.out / "report.md").read_text())
            if failed:
                print(f"floors not met: {failed}", file=sys.stderr)
    except (ValueError, FileNotFoundError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
