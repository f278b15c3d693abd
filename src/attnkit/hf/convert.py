"""``convert``: a pretrained Transformers causal LM onto an attnkit mechanism, distilled from the original.

::

    from attnkit.hf.convert import convert
    from attnkit.hf.transfer import TransferSettings
    doc = convert("teacher_dir", "linear", data=["corpus/"], out="converted",
                  settings=TransferSettings(layer_steps=200, steps=200))
    model = attnkit.hf.load("converted")

Steps: load the teacher (Llama, Qwen2, Mistral or GPT-2 causal LM, SDPA attention, fp32), copy
it as the student and :func:`attnkit.hf.apply` the mechanism (all layers or ``layers``), train
the student in two stages (:mod:`attnkit.hf.transfer`: layer-wise attention transfer, then logit
distillation), write the checkpoint, then measure: perplexity of the teacher, of the swapped
model without distillation and of the distilled model on held-out files
(:mod:`attnkit.hf.text`), and speed and memory of training and decoding steps at long contexts
against the teacher with SDPA (:mod:`attnkit.hf.speed`). ``out`` receives the checkpoint
(loads with :func:`attnkit.hf.load`, bit-exact) and ``report.json``, ``report.md``, ``report.png``.

Work happens in ``<out>.partial/``, which also holds the resumable training state: running the
same call again after an interruption resumes from the last saved step. When everything is
written, the folder is renamed to ``out`` in one step, so ``out`` is either complete or absent.
An ``out`` that already holds files is refused unless ``overwrite=True``.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

import attnkit.hf
from attnkit.core.errors import check_out_dir
from attnkit.hf.families import family_of
from attnkit.hf.text import (
    eval_windows,
    find_text_files,
    perplexity,
    read_tokens,
    resolve_tokenizer,
    split_by_file,
)
from attnkit.hf.transfer import RESUME_FILE, StepCallback, TransferSettings, distill

DEFAULT_LENGTHS = (2048, 4096, 8192, 16384)
#: Tokenizer files copied from the teacher's directory into the converted checkpoint.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
)


def load_teacher(source: str | Path | PreTrainedModel, device: torch.device) -> tuple[PreTrainedModel, Path | None]:
    """The teacher in fp32 eval mode with SDPA attention, and its directory (None for a model object).

    Raises:
        FileNotFoundError: a directory that does not exist.
        ValueError: no ``config.json``, a family the bridge does not support, a model that is not a
            causal LM, or a model that was already converted.
    """
    if isinstance(source, PreTrainedModel):
        model, directory = source, None
        config = model.config
    else:
        directory = Path(source)
        if not directory.is_dir():
            raise FileNotFoundError(f"CHECKPOINT_DIR {directory} does not exist; pass a Transformers model folder")
        if not (directory / "config.json").is_file():
            raise ValueError(f"CHECKPOINT_DIR {directory} has no config.json; pass a folder written by save_pretrained")
        config = AutoConfig.from_pretrained(directory)
    family = family_of(config)
    if family.model_type == "bert":
        raise ValueError(
            "the teacher is a BERT model (a bidirectional encoder): convert distils causal language models "
            "(Llama, Qwen2, Mistral, GPT-2)"
        )
    if getattr(config, "attnkit", None):
        raise ValueError("the teacher already uses an attnkit mechanism (config.attnkit); convert the original model")
    if directory is not None:
        model = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="sdpa", dtype=torch.float32)
    if not type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        raise ValueError(f"the teacher must be a causal LM (…ForCausalLM), got {type(model).__name__}")
    nn.Module.to(model, device)  # Transformers' typed `to` does not accept a torch.device
    return model.eval(), directory


def build_student(
    teacher: PreTrainedModel, attention: str, options: dict[str, Any], layers: Sequence[int] | None, seed: int
) -> PreTrainedModel:
    """A deep copy of ``teacher`` with ``attention`` applied (the mechanism initialised from ``seed``)."""
    student = copy.deepcopy(teacher)
    torch.manual_seed(seed)  # mechanisms with random state (Performer features) are rebuilt identically
    return attnkit.hf.apply(student, attention, layers=layers, **options)


def _position_limit(model: PreTrainedModel) -> int | None:
    # GPT-2's learned positions end at n_positions; rotary families (Llama, ...) extrapolate.
    return int(model.config.n_positions) if model.config.model_type == "gpt2" else None


def _check_lengths(model: PreTrainedModel, lengths: Sequence[int], seq_len: int) -> None:
    for length in lengths:
        if isinstance(length, bool) or not isinstance(length, int) or length < 2:
            raise ValueError(f"--lengths must be integers >= 2, got {list(lengths)}")
    limit = _position_limit(model)
    too_long = [n for n in (*lengths, seq_len) if limit is not None and n > limit]
    if too_long:
        raise ValueError(
            f"--lengths/--seq-len {too_long} exceed the teacher's {limit} learned positions (n_positions); "
            f"use lengths <= {limit}"
        )


def _copy_tokenizer(directory: Path | None, target: Path) -> None:
    if directory is None:
        return
    for name in TOKENIZER_FILES:
        if (directory / name).is_file():
            shutil.copy2(directory / name, target / name)


def _check_round_trip(student: PreTrainedModel, loaded: PreTrainedModel) -> None:
    saved, back = student.state_dict(), loaded.state_dict()
    differ = [k for k in saved if k not in back or not torch.equal(saved[k].cpu(), back[k].cpu())]
    if differ or set(back) - set(saved):
        raise RuntimeError(f"the saved checkpoint does not load back bit-exactly (tensors {differ[:5]})")


def _publish(work: Path, out: Path) -> None:
    """Rename ``work`` to ``out`` (an old ``out`` is moved aside first and removed after)."""
    aside = None
    if out.exists():
        aside = out.with_name(out.name + ".old")
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(out, aside)
    os.replace(work, out)
    if aside is not None:
        shutil.rmtree(aside)


def convert(
    teacher: str | Path | PreTrainedModel,
    attention: str,
    options: dict[str, Any] | None = None,
    data: Sequence[str | Path] = (),
    out: str | Path = "converted",
    *,
    layers: Sequence[int] | None = None,
    settings: TransferSettings | None = None,
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    rounds: int = 3,
    decode_tokens: int = 8,
    eval_windows_count: int = 32,
    heldout_fraction: float = 0.1,
    max_tokens: int = 4_000_000,
    overwrite: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
    on_step: StepCallback | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Convert, distill, save and measure (module docstring); returns the report document.

    Args:
        teacher: a Transformers causal-LM directory, or the model itself.
        attention: the attnkit mechanism name.
        options: the mechanism's options (JSON values).
        data: text files or directories; held-out files are chosen by :func:`split_by_file`.
        out: the folder for the checkpoint and the report.
        layers: attention-layer indices to convert (default all).
        settings: the two stages (:class:`~attnkit.hf.transfer.TransferSettings`).
        lengths: context lengths of the speed and memory measurements (empty: none).
        rounds: timed rounds of those measurements.
        decode_tokens: new tokens per decoding measurement.
        eval_windows_count: held-out windows of ``settings.seq_len`` tokens for perplexity.
        heldout_fraction: share of the files held out.
        max_tokens: most training tokens read (held-out: a tenth of it).
        overwrite: replace an ``out`` that holds files.
        device: where to train and measure.
        progress: progress bars.
        on_step: called after every optimizer step with ``(stage, step, values)``.
        command: the command line, recorded in the report.

    Returns:
        The report (also ``out/report.json``).

    Raises:
        ValueError, TypeError, FileNotFoundError: bad arguments, found before any training.
    """
    from attnkit.compress.report import machine

    settings = settings or TransferSettings()
    options = dict(options or {})
    out = Path(out)
    check_out_dir(out, overwrite)
    device = torch.device(device)
    teacher_model, directory = load_teacher(teacher, device)
    _check_lengths(teacher_model, list(lengths), settings.seq_len)
    tokenizer = resolve_tokenizer(directory, int(teacher_model.config.vocab_size))
    files = find_text_files(data)
    train_files, heldout_files = split_by_file(files, heldout_fraction)
    student = build_student(teacher_model, attention, options, layers, settings.seed)  # refuses bad options early
    train_tokens = read_tokens(train_files, tokenizer, max_tokens)
    heldout = eval_windows(
        read_tokens(heldout_files, tokenizer, max(max_tokens // 10, settings.seq_len + 1)),
        seq_len=settings.seq_len,
        max_windows=eval_windows_count,
    )
    work = out.with_name(out.name + ".partial")
    work.mkdir(parents=True, exist_ok=True)
    identity = {
        "teacher": str(directory) if directory else "model object",
        "teacher_config": teacher_model.config.to_dict(),
        "attention": attention,
        "options": options,
        "layers": None if layers is None else sorted(layers),
        "train_files": [str(f) for f in train_files],
        "max_tokens": max_tokens,
    }
    history = distill(
        teacher_model,
        student,
        train_tokens.to(device),
        settings,
        state_path=work / RESUME_FILE,
        identity=identity,
        progress=progress,
        on_step=on_step,
    )
    student.save_pretrained(work)
    _copy_tokenizer(directory, work)
    converted = attnkit.hf.load(work)
    nn.Module.to(converted, device)
    _check_round_trip(student, converted)
    swapped = build_student(teacher_model, attention, options, layers, settings.seed)
    quality = {
        name: perplexity(model, heldout.to(device), batch_size=settings.batch_size)
        for name, model in (("teacher", teacher_model), ("swapped", swapped), ("distilled", converted))
    }
    del swapped
    speed: dict[str, Any] = {}
    if lengths:
        from attnkit.hf.speed import measure

        speed = measure(
            {"teacher": teacher_model, "converted": converted},
            list(lengths),
            rounds=rounds,
            decode_tokens=decode_tokens,
            device=device,
            progress=progress,
        )
    doc = {
        "command": command or f"convert({attention!r})",
        "teacher": identity["teacher"],
        "family": teacher_model.config.model_type,
        "parameters": sum(p.numel() for p in teacher_model.parameters()),
        "attention": attention,
        "options": options,
        "layers": identity["layers"],
        "settings": {
            **{k: v for k, v in vars(settings).items()},
            "lengths": list(lengths),
            "rounds": rounds,
            "decode_tokens": decode_tokens,
        },
        "data": {
            "tokenizer": tokenizer.name,
            "train_files": len(train_files),
            "heldout_files": len(heldout_files),
            "train_tokens": int(train_tokens.numel()),
            "eval_windows": int(heldout.shape[0]),
            "eval_length": settings.seq_len,
        },
        "history": history,
        "quality": quality,
        "gap_closed": gap_closed(quality),
        "speed": speed,
        "device": str(device),
        "machine": machine(),
    }
    from attnkit.hf.convert_report import write_report

    write_report(doc, work)
    (work / RESUME_FILE).unlink(missing_ok=True)
    _publish(work, out)
    if progress:
        print(f"attnkit convert: checkpoint and report written to {out}", file=sys.stderr)
    return json.loads(json.dumps(doc))


def gap_closed(quality: dict[str, dict[str, float]]) -> float | None:
    """Share of the swapped model's perplexity gap to the teacher that distillation closed (1 = all).

    None when there is no gap: the swapped model is already as good as the teacher or better.
    """
    teacher, swapped, distilled = (quality[k]["perplexity"] for k in ("teacher", "swapped", "distilled"))
    if swapped <= teacher:
        return None
    return (swapped - distilled) / (swapped - teacher)
