"""The applications report: full attention against efficient mechanisms on the translation and
summarization recipes, at equal training budget (``docs/applications-report/``).

``scripts/applications_report.sh`` trains every run with ``attnkit train RECIPE attention=M ...``
(the same steps, batches and seed for each mechanism of a recipe). This module then loads each
run's best weights and, in one process:

- **scores** the test split by greedy decoding: BLEU and chrF (sacreBLEU; its tokenizer follows
  the target language, so Chinese is scored by characters) and ROUGE-1/2/L (tokens that keep CJK
  characters), next to baselines scored on the same examples: the source copied as the output
  and, for summarization, the source's first line;
- **times** a training step (forward, backward and an AdamW update with learning rate 0, so the
  weights stay as trained) and greedy generation with the cache, on the recipe's longest inputs:
  all runs of a recipe in alternating rounds, each figure the median of the rounds and every
  ratio to full attention taken from the same rounds; the peak memory of a training step;
- **judges** the floors of the applications issue (:data:`FLOORS`).

Run ``python -m attnkit.arena.applications --help``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: The mechanism every other one of a recipe is compared with.
REFERENCE = "full"
#: Shown examples per recipe in the report.
SAMPLES = 3


@dataclass(frozen=True)
class RunSpec:
    """One trained run: ``recipe`` (a name shared by the runs compared), its mechanism, its folder."""

    recipe: str
    mechanism: str
    directory: Path


def parse_runs(items: Sequence[str]) -> list[RunSpec]:
    """``RECIPE:MECHANISM=DIR`` items as :class:`RunSpec` (each recipe needs a ``full`` run).

    Raises:
        ValueError: a malformed item, a repeated run, or a recipe without full attention.
    """
    runs: list[RunSpec] = []
    for item in items:
        label, sep, directory = item.partition("=")
        recipe, colon, mechanism = label.partition(":")
        if not sep or not colon or not recipe or not mechanism or not directory:
            raise ValueError(f"--run {item!r}: expected RECIPE:MECHANISM=DIR, e.g. en_de:full=runs/apps/en_de/full")
        if any((r.recipe, r.mechanism) == (recipe, mechanism) for r in runs):
            raise ValueError(f"--run {item!r}: {recipe}:{mechanism} is given twice")
        runs.append(RunSpec(recipe, mechanism, Path(directory)))
    for recipe in dict.fromkeys(r.recipe for r in runs):
        if not any(r.recipe == recipe and r.mechanism == REFERENCE for r in runs):
            raise ValueError(f"--run: recipe {recipe!r} has no {REFERENCE!r} run to compare with")
    return runs


@dataclass
class LoadedRun:
    """A run's training config, data (its tokenizer) and best model."""

    spec: RunSpec
    config: Any
    data: Any
    model: nn.Module
    weights: Path


def load_run(spec: RunSpec) -> LoadedRun:
    """Load ``spec``'s best weights with its data.

    Raises:
        FileNotFoundError / ValueError: not a training run folder, or not a sequence-to-sequence task.
    """
    from attnkit.models import load_pretrained
    from attnkit.train.runs import resolve_weights, run_config

    weights = resolve_weights(spec.directory, None)
    config = run_config(spec.directory)
    if config is None:
        raise ValueError(f"{spec.directory} is a model folder; pass the training run folder (out_dir of attnkit train)")
    data = config.build_data(tokenizer_dir=weights.directory)
    if data.kind != "seq2seq":
        raise ValueError(f"{spec.directory}: task {config.task!r} is {data.kind}; the report scores seq2seq recipes")
    model = load_pretrained(weights.directory, map_location="cpu")
    return LoadedRun(spec, config, data, model, weights.directory)


def _real_ids(ids: list[int], keep: list[bool], specials: set[int]) -> list[int]:
    return [i for i, real in zip(ids, keep, strict=True) if real and i not in specials]


def first_line(text: str) -> str:
    """The first non-blank line of ``text``, stripped (the summarization lead baseline)."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def text_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """BLEU, chrF and ROUGE-1/2/L (tokenizers chosen from the references' language)."""
    from attnkit.metrics import bleu, chrf, rouge

    return {"bleu": bleu(hypotheses, references), "chrf": chrf(hypotheses, references), **rouge(hypotheses, references)}


def score_run(run: LoadedRun, *, split: str, count: int, batch_size: int) -> dict[str, Any]:
    """Greedy-decoding scores of ``run`` on ``count`` examples of ``split``, with the baselines."""
    from attnkit.data.batching import eval_batches
    from attnkit.train.evaluate import greedy_decode

    data = run.data
    assert data.bos_id is not None and data.eos_id is not None, "seq2seq data has BOS and EOS ids"
    examples = data.eval_examples(split, count)
    if not examples:
        raise ValueError(f"{run.spec.directory}: split {split!r} has no examples")
    specials = {data.pad_id, data.bos_id, data.eos_id}
    sources: list[str] = []
    references: list[str] = []
    hypotheses: list[str] = []
    run.model.eval()
    with torch.inference_mode():
        for batch in eval_batches(examples, batch_size=batch_size, pad_id=data.pad_id):
            targets = [[y for y in row if y >= 0 and y not in specials] for row in batch.labels.tolist()]
            decoded = greedy_decode(
                run.model,
                batch,
                bos_id=data.bos_id,
                eos_id=data.eos_id,
                max_new_tokens=max(map(len, targets)) + 1,
            )
            for ids, keep, target, hyp in zip(
                batch.input_ids.tolist(), batch.attention_mask.tolist(), targets, decoded, strict=True
            ):
                sources.append(data.decode(_real_ids(ids, keep, specials)))
                references.append(data.decode(target))
                hypotheses.append(data.decode(hyp))
    result: dict[str, Any] = {
        "examples": len(examples),
        "model": text_scores(hypotheses, references),
        "copy_source": text_scores(sources, references),
        "samples": [
            {"source": s, "reference": r, "output": h}
            for s, r, h in zip(sources[:SAMPLES], references[:SAMPLES], hypotheses[:SAMPLES], strict=True)
        ],
    }
    if run.config.task == "docstrings":
        result["first_line"] = text_scores([first_line(s) for s in sources], references)
    return result


def longest_batch(run: LoadedRun, *, size: int, scan: int = 2000) -> Any:
    """The ``size`` longest of the first ``scan`` training examples, as one batch (what the recipe's
    longest inputs cost)."""
    import itertools

    from attnkit.data.tasks import collate

    stream = run.data.stream("train")
    examples = sorted(itertools.islice(stream, scan), key=lambda e: -e.length)[:size]
    return collate(examples, pad_id=run.data.pad_id)


def _train_step_ms(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Any) -> float:
    from attnkit.train.modeling import forward, summed_loss

    model.train()
    start = time.perf_counter()
    loss = summed_loss(forward(model, batch), batch.labels) / max(batch.num_targets, 1)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) * 1e3


def _generate_ms_per_token(model: nn.Module, batch: Any, tokens: int) -> float:
    model.eval()
    with torch.inference_mode():
        start = time.perf_counter()
        # min_new_tokens: every mechanism decodes the same number of steps, whatever it predicts.
        out = model.generate(  # type: ignore[operator]
            batch.input_ids, tokens, src_mask=batch.attention_mask, min_new_tokens=tokens
        )
        elapsed = (time.perf_counter() - start) * 1e3
    return elapsed / max(int(out.shape[1]), 1)


def measure_recipe(
    runs: Sequence[LoadedRun], *, batch_size: int, rounds: int, generate_tokens: int, progress: bool = True
) -> dict[str, dict[str, Any]]:
    """Training-step time, its peak memory and generation time per token of every run of one recipe,
    in alternating rounds after a warm-up round, on the longest inputs of the reference run's data.

    Returns:
        mechanism -> ``{"train_step_ms", "train_peak_mb", "generate_ms_per_token"}`` (medians), their
        ``"spread"`` (slowest / fastest round), the batch shape, and the ratios to full attention
        from the same rounds (``"train_speedup"``, ``"generate_speedup"``, ``"memory_ratio"``).
    """
    from tqdm import tqdm

    from attnkit.metrics.memory import PeakMemoryMeter

    reference = next(r for r in runs if r.spec.mechanism == REFERENCE)
    batch = longest_batch(reference, size=batch_size)
    meter = PeakMemoryMeter("cpu")
    # lr 0 (and so no weight decay): the optimizer's work is timed, the trained weights stay.
    optimizers = {r.spec.mechanism: torch.optim.AdamW(r.model.parameters(), lr=0.0) for r in runs}
    samples: dict[str, list[dict[str, float | None]]] = {r.spec.mechanism: [] for r in runs}
    bar = tqdm(total=(rounds + 1) * len(runs), disable=not progress, desc="measure", unit="run", dynamic_ncols=True)
    for index in range(rounds + 1):
        for run in runs if index % 2 == 0 else list(reversed(runs)):
            name = run.spec.mechanism
            with meter.track() as peak:
                step = _train_step_ms(run.model, optimizers[name], batch)
            values = {
                "train_step_ms": step,
                "train_peak_mb": peak.mb,
                "generate_ms_per_token": _generate_ms_per_token(run.model, batch, generate_tokens),
            }
            if index > 0:  # round 0 warms caches and lazily built kernels up
                samples[name].append(values)
            bar.update(1)
    bar.close()
    shape = {"batch": int(batch.input_ids.shape[0]), "source_tokens": int(batch.input_ids.shape[1])}
    out: dict[str, dict[str, Any]] = {}
    for name, rows in samples.items():
        median = {key: _median([row[key] for row in rows]) for key in rows[0]}
        spread = {key: _spread([row[key] for row in rows]) for key in rows[0]}
        out[name] = {**median, "spread": spread, "shape": shape}
    base = out[REFERENCE]
    for entry in out.values():
        entry["train_speedup"] = _ratio(base["train_step_ms"], entry["train_step_ms"])
        entry["generate_speedup"] = _ratio(base["generate_ms_per_token"], entry["generate_ms_per_token"])
        entry["memory_ratio"] = _ratio(entry["train_peak_mb"], base["train_peak_mb"])
    return out


def _median(values: Sequence[float | None]) -> float | None:
    real = [v for v in values if v is not None]
    return statistics.median(real) if real else None


def _spread(values: Sequence[float | None]) -> float | None:
    real = [v for v in values if v is not None]
    return max(real) / min(real) if real and min(real) > 0 else None


def _ratio(top: float | None, bottom: float | None) -> float | None:
    return top / bottom if top is not None and bottom else None


# ---------------------------------------------------------------------------------------------
# Floors
# ---------------------------------------------------------------------------------------------

#: BLEU points by which full attention must beat copying the source on English -> German ("clearly above").
COPY_MARGIN_BLEU = 5.0
#: Share of full attention's ROUGE-L an efficient summarization encoder must keep ...
ROUGE_SHARE = 0.95
#: ... at this training-step speed-up at the recipe's longest inputs.
STEP_SPEEDUP = 2.0


def judge_floors(recipes: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The issue's floors over the measured recipes (a recipe's task decides which apply)."""
    floors: list[dict[str, Any]] = []
    for name, recipe in recipes.items():
        runs = recipe["runs"]
        full = runs[REFERENCE]
        if recipe["task"] == "gettext:de":
            bleu, copy = full["scores"]["model"]["bleu"], full["scores"]["copy_source"]["bleu"]
            floors.append(
                {
                    "floor": f"{name}: full attention's BLEU at least {COPY_MARGIN_BLEU:g} above copying the source",
                    "measured": f"{bleu:.1f} vs {copy:.1f}",
                    "met": bleu >= copy + COPY_MARGIN_BLEU,
                }
            )
            chrf, copy_chrf = full["scores"]["model"]["chrf"], full["scores"]["copy_source"]["chrf"]
            floors.append(
                {
                    "floor": f"{name}: character n-gram overlap (chrF) above copying the source: the model learned",
                    "measured": f"{chrf:.1f} vs {copy_chrf:.1f}",
                    "met": chrf > copy_chrf,
                }
            )
        if recipe["task"] == "docstrings":
            best: tuple[str, float, float] | None = None
            for mechanism, run in runs.items():
                if mechanism == REFERENCE:
                    continue
                share = run["scores"]["model"]["rougeL"] / max(full["scores"]["model"]["rougeL"], 1e-9)
                speedup = run["speed"]["train_speedup"] or 0.0
                if best is None or (share >= ROUGE_SHARE and speedup > best[2]) or (best[1] < ROUGE_SHARE <= share):
                    best = (mechanism, share, speedup)
            if best is not None:
                mechanism, share, speedup = best
                floors.append(
                    {
                        "floor": (
                            f"{name}: an efficient encoder keeps >= {ROUGE_SHARE:.0%} of full attention's ROUGE-L "
                            f"at >= {STEP_SPEEDUP:g}x lower training-step time (longest inputs)"
                        ),
                        "measured": f"{mechanism}: {share:.1%} of ROUGE-L, {speedup:.2f}x",
                        "met": share >= ROUGE_SHARE and speedup >= STEP_SPEEDUP,
                    }
                )
    return floors


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def build_report(args: argparse.Namespace) -> dict[str, Any]:
    """Load, score and measure every run of ``args.run``; the report's document."""
    from attnkit.compress.report import machine

    specs = parse_runs(args.run)
    torch.set_num_threads(args.threads)
    host = machine()  # load average before the work starts
    recipes: dict[str, dict[str, Any]] = {}
    for recipe in dict.fromkeys(s.recipe for s in specs):
        # full attention first: the reference of every ratio, and the first row of the table
        ordered = sorted((s for s in specs if s.recipe == recipe), key=lambda s: s.mechanism != REFERENCE)
        loaded = [load_run(spec) for spec in ordered]
        tasks = {run.config.task for run in loaded}
        if len(tasks) != 1:
            raise ValueError(f"recipe {recipe!r} mixes tasks {sorted(tasks)}; compare runs of one task")
        entries: dict[str, dict[str, Any]] = {}
        for run in loaded:
            print(f"applications: scoring {recipe}:{run.spec.mechanism}", flush=True)
            entries[run.spec.mechanism] = {
                "directory": str(run.spec.directory),
                "options": run.config.attention_options or None,
                "steps": run.config.max_steps,
                "scores": score_run(run, split=args.split, count=args.examples, batch_size=args.batch_size),
            }
        speed = measure_recipe(
            loaded, batch_size=args.speed_batch, rounds=args.rounds, generate_tokens=args.generate_tokens
        )
        for mechanism, entry in entries.items():
            entry["speed"] = speed[mechanism]
        first = loaded[0].config
        steps = {e["steps"] for e in entries.values()}
        if len(steps) != 1:
            raise ValueError(
                f"recipe {recipe!r}: runs trained for different steps {sorted(steps)}; the budget must match"
            )
        recipes[recipe] = {
            "task": first.task,
            "steps": first.max_steps,
            "batch_size": first.batch_size,
            "seq_len": first.seq_len,
            "tokenizer": first.tokenizer,
            "examples": next(iter(entries.values()))["scores"]["examples"],
            "runs": entries,
        }
    doc: dict[str, Any] = {
        "script": args.script,
        "argv": "python -m attnkit.arena.applications " + " ".join(args.argv),
        "machine": host,
        "settings": {
            "split": args.split,
            "rounds": args.rounds,
            "threads": args.threads,
            "generate_tokens": args.generate_tokens,
            "speed_batch": args.speed_batch,
        },
        "recipes": recipes,
    }
    doc["floors"] = judge_floors(recipes)
    return doc


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m attnkit.arena.applications",
        description=(
            "Score and time trained translation/summarization runs side by side: full attention against "
            "efficient mechanisms at equal training budget (BLEU, chrF, ROUGE with copy-the-source baselines; "
            "training-step and generation time and memory on the longest inputs). Writes report.md, report.json "
            "and report.png. scripts/applications_report.sh trains the runs and calls this."
        ),
    )
    p.add_argument(
        "--run",
        action="append",
        required=True,
        metavar="RECIPE:MECHANISM=DIR",
        help="a training run folder (repeat; each recipe needs a 'full' run), e.g. en_de:linear=runs/apps/en_de/linear",
    )
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report in --out")
    p.add_argument("--split", default="test", choices=["validation", "test"], help="split scored (default test)")
    p.add_argument("--examples", type=int, default=200, help="examples scored per run (default 200)")
    p.add_argument("--batch-size", type=int, default=32, help="decoding batch size while scoring (default 32)")
    p.add_argument("--speed-batch", type=int, default=8, help="longest training inputs per timed batch (default 8)")
    p.add_argument("--rounds", type=int, default=3, help="timing rounds after a warm-up round (default 3)")
    p.add_argument("--generate-tokens", type=int, default=32, help="new tokens per timed generation (default 32)")
    p.add_argument("--threads", type=int, default=2, help="torch threads while measuring (default 2)")
    p.add_argument("--script", default="(by hand)", help="what made the runs, recorded in the report")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    import sys

    from attnkit.arena.applications_report import JSON_NAME, write_report
    from attnkit.core.errors import check_positive_int

    raw = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(raw)
    args.argv = raw
    try:
        for name in ("examples", "batch_size", "speed_batch", "rounds", "generate_tokens", "threads"):
            check_positive_int(f"--{name.replace('_', '-')}", getattr(args, name))
        out = Path(args.out)
        if (out / JSON_NAME).exists() and not args.overwrite:
            raise FileExistsError(f"--out {out} already holds a report; pass --overwrite to replace it")
        written = write_report(build_report(args), out)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"applications: error: {err}", file=sys.stderr)
        return 2
    print("applications: wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
