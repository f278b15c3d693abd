"""Training configuration: a validated dataclass read from JSON or TOML plus ``key=value`` overrides.

Every error names the file, the key and (where it can be found) the line, what was given
and what was expected, e.g. ``configs/x.toml, line 4: key 'max_steps' must be a positive
integer, got 'ten'``. Unknown keys are errors with a did-you-mean hint: a typo never
silently trains with a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnkit.data.tasks import TASK_NAMES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
TOKENIZERS: tuple[str, ...] = ("byte", "bpe")
#: Model fields the data decides; a config may not set them.
DATA_MODEL_FIELDS: tuple[str, ...] = ("vocab_size", "num_classes", "pad_token_id")


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``attnkit train`` needs.

    Attributes:
        task: ``"listops"``, ``"copy"``, ``"mqar"``, ``"reverse"``, ``"sort"``, ``"text"`` (the
            standard-library corpus), or a path to a ``.jsonl`` file, a text file or a directory.
        task_options: the synthetic task's options (e.g. ``min_length``, ``max_length``).
        attention: registered mechanism name (or one per layer) for the model.
        attention_options: the mechanism's options (e.g. ``{"window": 64}``).
        model: :class:`~attnkit.models.TransformerConfig` fields (``dim``, ``depth``, ...);
            ``vocab_size``, ``num_classes`` and ``pad_token_id`` come from the data.
        max_steps: optimizer steps.
        batch_size: examples per optimizer step, summed over processes and accumulation.
        grad_accum: micro-batches per step (``batch_size`` must divide evenly).
        lr: peak learning rate.
        min_lr_ratio: final learning rate as a fraction of ``lr`` (cosine floor).
        warmup_steps: linear warm-up steps.
        weight_decay: decoupled (AdamW) weight decay, not applied to biases and norms.
        betas: AdamW betas.
        grad_clip: clip the global gradient norm to this (0 disables).
        precision: ``"fp32"``, ``"bf16"`` (autocast, CPU or GPU) or ``"fp16"`` (GPU, loss scaling).
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        seed: seeds the model initialisation, the data and dropout.
        out_dir: where checkpoints, the model and ``log.jsonl`` go.
        checkpoint_every: steps between checkpoints (the last step is always saved).
        keep_checkpoints: complete checkpoints kept (older ones are deleted after a new one lands).
        eval_every: steps between evaluations (0: only at the end).
        eval_examples: validation examples per evaluation.
        eval_batch_size: batch size of evaluation (default ``batch_size``).
        log_every: steps between ``log.jsonl`` records.
        seq_len: window length for text, and the truncation length of JSONL records.
        tokenizer: ``"byte"`` or ``"bpe"`` (text and data files).
        tokenizer_vocab_size: BPE vocabulary size.
        bucket_batches: batches per length-sorted pool (1 disables bucketing).
        pad_to_multiple_of: pad batch lengths to a multiple of this.
        threads: torch intra-op threads (None: torch's default).
        progress: show a progress bar.
        tensorboard: also write TensorBoard events when the package is installed.
    """

    task: str
    out_dir: str
    attention: str | tuple[str, ...] = "full"
    attention_options: dict[str, Any] = field(default_factory=dict)
    task_options: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    max_steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    precision: str = "fp32"
    device: str = "auto"
    seed: int = 0
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    eval_every: int = 200
    eval_examples: int = 256
    eval_batch_size: int | None = None
    log_every: int = 1
    seq_len: int = 256
    tokenizer: str = "byte"
    tokenizer_vocab_size: int = 4096
    bucket_batches: int = 8
    pad_to_multiple_of: int = 1
    threads: int | None = None
    progress: bool = True
    tensorboard: bool = False

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (round-trips through :meth:`from_dict`)."""
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        if isinstance(self.attention, tuple):
            out["attention"] = list(self.attention)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "<dict>", text: str | None = None) -> TrainConfig:
        """Validate ``data`` and build the config.

        Args:
            data: the parsed configuration.
            source: file name used in error messages.
            text: the file's text, used to find the line of a bad key.

        Raises:
            ValueError: naming the source, the key, the line where found, the value and what was expected.
        """
        return _build(data, source, text)


# ----------------------------------------------------------------------------- validation


def _line_of(text: str | None, key: str) -> int | None:
    if not text:
        return None
    leaf = key.split(".")[-1]
    pattern = re.compile(rf'^\s*(?:"{re.escape(leaf)}"\s*:|{re.escape(leaf)}\s*=)')
    for number, line in enumerate(text.splitlines(), start=1):
        if pattern.search(line):
            return number
    return None


class _Errors:
    def __init__(self, source: str, text: str | None) -> None:
        self.source, self.text = source, text

    def __call__(self, key: str, message: str) -> ValueError:
        line = _line_of(self.text, key)
        where = f"{self.source}, line {line}" if line else self.source
        return ValueError(f"{where}: key '{key}' {message}")


_INT_KEYS: tuple[str, ...] = ("max_steps", "batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints")
_INT_KEYS += ("log_every", "seq_len", "tokenizer_vocab_size", "bucket_batches", "pad_to_multiple_of", "eval_examples")
_NON_NEGATIVE_INT_KEYS = ("warmup_steps", "eval_every", "seed")
_FLOAT_KEYS = ("lr",)
_NON_NEGATIVE_FLOAT_KEYS = ("weight_decay", "grad_clip", "min_lr_ratio")
_BOOL_KEYS = ("progress", "tensorboard")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_scalars(data: dict[str, Any], err: _Errors) -> None:
    for key in _INT_KEYS:
        if key in data and not (_is_int(data[key]) and data[key] > 0):
            raise err(key, f"must be a positive integer, got {data[key]!r}")
    for key in _NON_NEGATIVE_INT_KEYS:
        if key in data and not (_is_int(data[key]) and data[key] >= 0):
            raise err(key, f"must be a non-negative integer, got {data[key]!r}")
    for key in _FLOAT_KEYS:
        if key in data and not (
            isinstance(data[key], (int, float)) and not isinstance(data[key], bool) and data[key] > 0
        ):
            raise err(key, f"must be a positive number, got {data[key]!r}")
    for key in _NON_NEGATIVE_FLOAT_KEYS:
        value = data.get(key, 0)
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0):
            raise err(key, f"must be a non-negative number, got {value!r}")
    for key in _BOOL_KEYS:
        if key in data and not isinstance(data[key], bool):
            raise err(key, f"must be true or false, got {data[key]!r}")
    for key in ("eval_batch_size", "threads"):
        if data.get(key) is not None and not (_is_int(data[key]) and data[key] > 0):
            raise err(key, f"must be a positive integer or absent, got {data[key]!r}")
    for key, choices in (("precision", PRECISIONS), ("tokenizer", TOKENIZERS), ("device", ("auto", "cpu", "cuda"))):
        if key in data and data[key] not in choices:
            raise err(key, f"must be one of {', '.join(map(repr, choices))}, got {data[key]!r}")
    if "min_lr_ratio" in data and data["min_lr_ratio"] > 1:
        raise err("min_lr_ratio", f"must be between 0 and 1, got {data['min_lr_ratio']!r}")


def _check_task(data: dict[str, Any], err: _Errors, base: Path | None) -> None:
    task = data["task"]
    if not isinstance(task, str) or not task:
        raise err("task", f"must be a task name or a data path, got {task!r}")
    if task in (*TASK_NAMES, "text"):
        return
    path = Path(task)
    if not path.is_absolute() and base is not None and not path.exists():
        path = base / path
    if not path.exists():
        raise err("task", f"must be one of {', '.join((*TASK_NAMES, 'text'))} or an existing data path, got {task!r}")


def _check_model(data: dict[str, Any], err: _Errors) -> None:
    from attnkit.models import TransformerConfig

    model = data.get("model", {})
    if not isinstance(model, dict):
        raise err("model", f"must be a table of TransformerConfig fields, got {model!r}")
    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    for key in model:
        if key in DATA_MODEL_FIELDS:
            raise err(f"model.{key}", "is set from the data; remove it from the config")
        if key in ("attention", "attention_options"):
            raise err(f"model.{key}", f"belongs at the top level of the config ({key} = ...)")
        if key not in fields:
            hint = difflib.get_close_matches(key, sorted(fields), n=1)
            raise err(
                f"model.{key}", "is not a TransformerConfig field" + (f" (did you mean '{hint[0]}'?)" if hint else "")
            )
    try:
        TransformerConfig(
            vocab_size=2,
            attention=data.get("attention", "full"),
            attention_options=data.get("attention_options", {}),
            **model,
        )
    except (ValueError, TypeError) as exc:
        # TransformerConfig messages start with the field name: point at that key's line.
        first = str(exc).split(" ", 1)[0]
        key = f"model.{first}" if first in model else "attention" if first.startswith("attention") else "model"
        raise err(key, f"is invalid: {exc}") from exc


def _build(data: dict[str, Any], source: str, text: str | None) -> TrainConfig:
    err = _Errors(source, text)
    if not isinstance(data, dict):
        raise ValueError(f"{source}: the configuration must be a table/object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    for key in data:
        if key not in names:
            hint = difflib.get_close_matches(key, sorted(names), n=1)
            raise err(key, "is not a training option" + (f" (did you mean '{hint[0]}'?)" if hint else ""))
    for key in ("task", "out_dir"):
        if key not in data:
            raise ValueError(f"{source}: missing required key '{key}'")
    if not isinstance(data["out_dir"], str) or not data["out_dir"]:
        raise err("out_dir", f"must be a directory path, got {data['out_dir']!r}")
    base = Path(source).parent if source and not source.startswith("<") else None
    _check_task(data, err, base)
    _check_scalars(data, err)
    for key in ("task_options", "attention_options"):
        if not isinstance(data.get(key, {}), dict):
            raise err(key, f"must be a table of options, got {data[key]!r}")
    attention = data.get("attention", "full")
    if not (isinstance(attention, str) or (isinstance(attention, list) and all(isinstance(a, str) for a in attention))):
        raise err("attention", f"must be a mechanism name or a list of names, got {attention!r}")
    betas = data.get("betas", [0.9, 0.98])
    if not (isinstance(betas, (list, tuple)) and len(betas) == 2 and all(0 <= float(b) < 1 for b in betas)):
        raise err("betas", f"must be two numbers in [0, 1), got {betas!r}")
    _check_model(data, err)
    values = dict(data)
    values["betas"] = (float(betas[0]), float(betas[1]))
    if isinstance(attention, list):
        values["attention"] = tuple(attention)
    config = TrainConfig(**values)
    if config.batch_size % config.grad_accum:
        raise err("grad_accum", f"must divide batch_size={config.batch_size}, got {config.grad_accum}")
    _check_task_options(config, err)
    return config


def _check_task_options(config: TrainConfig, err: _Errors) -> None:
    if config.task in TASK_NAMES:
        from attnkit.data.tasks import make_task

        try:
            make_task(config.task, **config.task_options)
        except (ValueError, TypeError) as exc:
            raise err("task_options", f"is invalid for task {config.task!r}: {exc}") from exc
    elif config.task_options:
        raise err("task_options", f"only applies to synthetic tasks ({', '.join(TASK_NAMES)}), not {config.task!r}")


# ----------------------------------------------------------------------------- files and overrides


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"model.dim=64"`` -> ``(["model", "dim"], 64)``; values are JSON when they parse, else strings.

    Raises:
        ValueError: if ``item`` has no ``=`` or an empty key.
    """
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {item!r} must look like key=value (e.g. max_steps=200 or model.dim=64)")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of ``data`` with each ``key=value`` (dotted keys reach into tables) applied."""
    out = json.loads(json.dumps(data))
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"override {item!r}: '{part}' is not a table")
            node = child
        node[path[-1]] = value
    return out


def read_config_file(path: str | Path) -> tuple[dict[str, Any], str]:
    """Parse a ``.toml`` or ``.json`` file; returns the data and the text.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: for another extension or a syntax error (with the parser's line and column).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {p} does not exist")
    text = p.read_text()
    if p.suffix == ".toml":
        try:
            return tomllib.loads(text), text
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{p}: invalid TOML: {exc}") from exc
    if p.suffix == ".json":
        try:
            return json.loads(text), text
        except json.JSONDecodeError as exc:
            raise ValueError(f"{p}, line {exc.lineno}, column {exc.colno}: invalid JSON: {exc.msg}") from exc
    raise ValueError(f"{p}: config files must end in .toml or .json, got {p.suffix or 'no extension'!r}")


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read, override and validate a training config file.

    A relative data path in ``task`` is resolved against the config file's directory when
    it does not exist relative to the working directory.
    """
    data, text = read_config_file(path)
    data = apply_overrides(data, overrides or [])
    config = TrainConfig.from_dict(data, source=str(path), text=text)
    task = Path(config.task)
    if config.task not in (*TASK_NAMES, "text") and not task.exists():
        config = dataclasses.replace(config, task=str(Path(path).parent / task))
    return config
