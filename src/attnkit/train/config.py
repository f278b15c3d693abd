"""Training configuration: a validated dataclass read from JSON or TOML plus ``key=value`` overrides.

Every error names where the bad value came from, what was given and what was expected:
the config file, the line and the key path (``configs/x.toml, line 14:
[attention_options.sliding_window] key 'windw' ...``) or the command-line override that set
it (``command-line override 'max_steps=abc': key 'max_steps' must be a positive integer, got
'abc'``). Unknown keys are errors with a did-you-mean hint: a typo never silently trains
with a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnkit.data.catalogs import TASK_PREFIX
from attnkit.data.objectives import OBJECTIVES
from attnkit.data.tasks import TASK_NAMES
from attnkit.train.config_files import KeyPath, Locator, apply_overrides, parse_override, read_config_file

__all__ = [
    "DATA_MODEL_FIELDS",
    "NAMED_DATA",
    "PRECISIONS",
    "TOKENIZERS",
    "TrainConfig",
    "apply_overrides",
    "load_config",
    "parse_override",
    "read_config_file",
]

#: ``task`` values that name data rather than a path: synthetic tasks and the built-in corpora.
NAMED_DATA: tuple[str, ...] = (*TASK_NAMES, "text", "docstrings")


PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
TOKENIZERS: tuple[str, ...] = ("byte", "bpe")
#: Model fields the data decides; a config may not set them.
DATA_MODEL_FIELDS: tuple[str, ...] = ("vocab_size", "num_classes", "pad_token_id")


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``attnkit train`` needs.

    These attribute descriptions are the reference: ``docs/configuration.md`` is generated from
    them (``python -m attnkit.train.reference``).

    Attributes:
        task: a synthetic task (``"listops"``, ``"copy"``, ``"mqar"``, ``"reverse"``, ``"sort"``), a quality-suite
            task (``"text_classification"``, ``"document_matching"``, ``"pathfinder"``, ``"passkey"``, ``"char_lm"``),
            ``"text"`` (the Python standard library as a language-modelling corpus),
            ``"gettext:LOCALE"`` (translation: English→LOCALE message pairs from this machine's
            gettext catalogs, e.g. ``"gettext:de"``, ``"gettext:zh_CN"``), ``"docstrings"``
            (summarization: standard-library functions and classes → their docstring's first
            sentence; long inputs), or a path to your own data: a ``.jsonl`` file, a text file or a directory of ``.txt``/``.md``/``.py``
            files (see docs/own-data.md). A relative path is tried against the working
            directory, then the config file's directory.
        out_dir: where checkpoints, the model and ``log.jsonl`` go.
        attention: registered mechanism name (``attnkit list``) for every layer, or a list with one
            name per layer. Per-head mixing: a list of head groups ``{mechanism = NAME, heads = N,
            options = {...}}`` (their ``heads`` add up to ``model.heads``) for every layer, or such a
            list in place of a name in the per-layer list.
        attention_options: the mechanisms' options: one table for every layer (``window = 64``)
            or tables keyed by mechanism name (``[attention_options.sliding_window]``, for an
            ``attention`` list that mixes mechanisms). Each mechanism's options and defaults:
            ``attnkit list --json``.
        task_options: the synthetic task's options (see the task tables below); only for
            synthetic tasks.
        model: :class:`~attnkit.models.TransformerConfig` fields (``dim``, ``depth``, ...; the
            ``[model]`` table below). ``vocab_size``, ``num_classes`` and ``pad_token_id`` come
            from the data; ``max_len`` defaults to the data's longest sequence.
        max_steps: optimizer steps to train for (may be raised when resuming).
        batch_size: examples per optimizer step, summed over processes and accumulation.
        grad_accum: micro-batches per step (``batch_size`` must divide evenly).
        lr: peak learning rate.
        min_lr_ratio: final learning rate as a fraction of ``lr`` (cosine floor), in [0, 1].
        warmup_steps: linear warm-up steps.
        weight_decay: decoupled (AdamW) weight decay, not applied to biases and norms.
        betas: AdamW betas, two numbers in [0, 1).
        grad_clip: clip the global gradient norm to this (0 disables).
        precision: ``"fp32"``, ``"bf16"`` (autocast, CPU or GPU) or ``"fp16"`` (GPU, loss scaling).
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        seed: seeds the model initialisation, the data order and dropout.
        checkpoint_every: steps between checkpoints (the last step is always saved, and so is
            the current step on Ctrl-C or SIGTERM).
        keep_checkpoints: complete checkpoints kept (older ones are deleted after a new one lands).
        eval_every: steps between evaluations on the validation split, each printed as one
            line (0: only at the end).
        eval_examples: validation examples per evaluation (the first ones of the split, fixed
            for the whole run).
        eval_batch_size: batch size of evaluation (unset: ``batch_size``).
        log_every: steps between ``log.jsonl`` records (evaluation steps are always logged).
        seq_len: window length for text files, and the truncation length of JSONL records.
        tokenizer: ``"byte"`` or ``"bpe"`` (text and JSONL data; BPE is trained on the
            training data and saved with the model).
        tokenizer_vocab_size: BPE vocabulary size.
        bucket_batches: batches per length-sorted pool (1 disables bucketing).
        pad_to_multiple_of: pad batch lengths to a multiple of this.
        threads: torch intra-op threads (unset: torch's default).
        progress: show a progress bar.
        tensorboard: also write TensorBoard events when the package is installed.
        init_from: start from saved weights (fine-tuning): a training run's ``out_dir`` (its
            ``best`` model) or a folder written by ``save_pretrained``. Tensors whose names and
            shapes match are copied (a classifier or encoder-decoder on a pretrained encoder
            takes its ``embed.*`` and ``encoder.*``); its tokenizer is used. Applies when a run
            starts, not when it resumes.
        freeze: glob patterns of parameter names not to train (``["embed.*",
            "encoder.layers.[0-3].*"]``); each must match at least one parameter.
        objective: ``"causal"`` (train on the task as it is), ``"mlm"`` (BERT masked LM: a
            language-modelling corpus such as ``"text"`` trains a bidirectional
            ``MaskedLanguageModel`` to predict 15% of the tokens, masked) or ``"span"`` (T5 span
            corruption: it becomes encoder-decoder examples whose encoder input has spans
            replaced by sentinels and whose decoder reconstructs them).
        objective_options: the objective's settings: for mlm ``mask_prob`` (0.15),
            ``mask_token_fraction`` (0.8), ``random_token_fraction`` (0.1); for span
            ``noise_density`` (0.15), ``mean_span_length`` (3), ``num_sentinels`` (100).
    """

    task: str
    out_dir: str
    attention: str | tuple[str, ...] | tuple[dict[str, Any], ...] = "full"
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
    init_from: str | None = None
    freeze: tuple[str, ...] = ()
    objective: str = "causal"
    objective_options: dict[str, Any] = field(default_factory=dict)

    def build_data(
        self, *, tokenizer_dir: str | Path | None = None, seed: int | None = None, seq_len: int | None = None
    ) -> Any:
        """This run's :class:`~attnkit.data.pipeline.TrainingData`: its task, options, tokenizer and objective.

        Args:
            tokenizer_dir: a folder holding the run's saved tokenizer (a model or checkpoint folder), so
                the ids are the ones the model was trained on; None builds (or trains) it afresh.
            seed: the data seed, default the run's.
            seq_len: tokens per example, default the run's (e.g. a longer window to time).
        """
        from attnkit.data.pipeline import build_data

        return build_data(
            self.task,
            task_options=self.task_options,
            seq_len=self.seq_len if seq_len is None else seq_len,
            tokenizer=self.tokenizer,
            tokenizer_vocab_size=self.tokenizer_vocab_size,
            seed=self.seed if seed is None else seed,
            tokenizer_dir=tokenizer_dir,
            objective=self.objective,
            objective_options=self.objective_options,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (round-trips through :meth:`from_dict`)."""
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        out["freeze"] = list(self.freeze)
        if isinstance(self.attention, tuple):
            out["attention"] = json.loads(json.dumps(self.attention))  # nested tuples (per-head mixes) as lists
        return out

    @classmethod
    def from_dict(
        cls,
        data: dict[str, Any],
        *,
        source: str = "<dict>",
        text: str | None = None,
        overrides: Sequence[str] = (),
    ) -> TrainConfig:
        """Validate ``data`` and build the config.

        Args:
            data: the parsed configuration, with ``overrides`` already applied.
            source: file name used in error messages.
            text: the file's text, used to find the line of a bad key.
            overrides: the ``key=value`` items applied to ``data``: a bad value one of them set
                is reported against the override, not the file.

        Raises:
            ValueError: naming where the bad value came from (the override, or the file, line
                and key path), the value and what was expected.
        """
        return _build(data, source, text, overrides)


_INT_KEYS: tuple[str, ...] = ("max_steps", "batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints")
_INT_KEYS += ("log_every", "seq_len", "tokenizer_vocab_size", "bucket_batches", "pad_to_multiple_of", "eval_examples")
_NON_NEGATIVE_INT_KEYS = ("warmup_steps", "eval_every", "seed")
_FLOAT_KEYS = ("lr",)
_NON_NEGATIVE_FLOAT_KEYS = ("weight_decay", "grad_clip", "min_lr_ratio")
_BOOL_KEYS = ("progress", "tensorboard")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_scalars(data: dict[str, Any], err: Locator) -> None:
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
    if data.get("objective", "causal") not in OBJECTIVES:
        raise err("objective", f"must be one of {', '.join(map(repr, OBJECTIVES))}, got {data['objective']!r}")
    if data.get("init_from") is not None and not (isinstance(data["init_from"], str) and data["init_from"]):
        raise err("init_from", f"must be the path of a run or a saved model, got {data['init_from']!r}")
    freeze = data.get("freeze", [])
    if not (isinstance(freeze, (list, tuple)) and all(isinstance(p, str) and p for p in freeze)):
        raise err("freeze", f"must be a list of parameter-name patterns such as ['embed.*'], got {freeze!r}")


def _check_task(data: dict[str, Any], err: Locator, base: Path | None) -> None:
    task = data["task"]
    if not isinstance(task, str) or not task:
        raise err("task", f"must be a task name or a data path, got {task!r}")
    if task in NAMED_DATA:
        return
    if task.startswith(TASK_PREFIX):
        from attnkit.data.catalogs import find_catalogs

        try:
            find_catalogs(task[len(TASK_PREFIX) :])
        except (FileNotFoundError, ValueError) as error:
            raise err("task", str(error)) from None
        return
    path = Path(task)
    if not path.is_absolute() and base is not None and not path.exists():
        path = base / path
    if not path.exists():
        raise err(
            "task",
            f"must be one of {', '.join(NAMED_DATA)}, gettext:LOCALE or an existing data path, got {task!r}",
        )


def _config_path(path: KeyPath) -> KeyPath:
    """A TransformerConfig key path as a training config key path: attention keys live at the
    top level, every other model field under ``model``."""
    return path if path and path[0] in ("attention", "attention_options") else ("model", *path)


def _check_model(data: dict[str, Any], err: Locator) -> None:
    from attnkit.models import TransformerConfig
    from attnkit.models.config import ConfigFieldError

    model = data.get("model", {})
    if not isinstance(model, dict):
        raise err("model", f"must be a table of TransformerConfig fields, got {model!r}")
    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    for key in model:
        if key in DATA_MODEL_FIELDS:
            raise err(("model", key), "is set from the data; remove it from the config")
        if key in ("attention", "attention_options"):
            raise err(("model", key), f"belongs at the top level of the config ({key} = ...)")
        if key not in fields:
            hint = difflib.get_close_matches(key, sorted(fields), n=1)
            raise err(
                ("model", key), "is not a TransformerConfig field" + (f" (did you mean '{hint[0]}'?)" if hint else "")
            )
    try:
        config = TransformerConfig(
            vocab_size=2,
            attention=data.get("attention", "full"),
            attention_options=data.get("attention_options", {}),
            **model,
        )
    except ConfigFieldError as exc:
        raise err(_config_path(exc.path), f"is invalid: {exc}") from exc
    except (ValueError, TypeError) as exc:
        raise err("model", f"is invalid: {exc}") from exc
    _check_option_values(config, err)


def _check_option_values(config: Any, err: Locator) -> None:
    """Build each configured mechanism once, so a bad option value (``window = 0``) is reported
    against its key now rather than from deep inside model construction later."""
    import torch

    from attnkit.core.registry import build_attention

    layers = config.attention_layers() + config.attention_layers(decoder=True)
    built: set[str] = set()
    for layer in (part for whole in layers for part in whole.parts()):  # a per-head mix: each group
        signature = json.dumps([layer.name, layer.options], sort_keys=True, default=repr)
        if signature in built:
            continue
        built.add(signature)
        try:
            with torch.random.fork_rng(devices=[]):  # random features etc. must not move the run's RNG
                build_attention(layer.name, **layer.options)
        except (ValueError, TypeError) as exc:
            option = str(exc).split(" ", 1)[0]
            path = (*layer.options_path, option) if option in layer.options else layer.options_path
            raise err(_config_path(path), f"is invalid for attention {layer.name!r}: {exc}") from exc


def _build(data: dict[str, Any], source: str, text: str | None, overrides: Sequence[str]) -> TrainConfig:
    err = Locator(source, text, overrides)
    if not isinstance(data, dict):
        raise ValueError(f"{source}: the configuration must be a table/object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    for key in data:
        if key not in names:
            hint = difflib.get_close_matches(key, sorted(names), n=1)
            raise err(key, "is not a training option" + (f" (did you mean '{hint[0]}'?)" if hint else ""))
    for key in ("task", "out_dir"):
        if key not in data:
            raise ValueError(f"{source}: missing required key '{key}' (add {key} = ... or pass {key}=...)")
    if not isinstance(data["out_dir"], str) or not data["out_dir"]:
        raise err("out_dir", f"must be a directory path, got {data['out_dir']!r}")
    base = Path(source).parent if source and not source.startswith("<") else None
    _check_task(data, err, base)
    _check_scalars(data, err)
    for key in ("task_options", "attention_options", "objective_options"):
        if not isinstance(data.get(key, {}), dict):
            raise err(key, f"must be a table of options, got {data[key]!r}")
    attention = data.get("attention", "full")
    if not isinstance(attention, (str, list)):  # the forms inside a list are checked by TransformerConfig
        raise err("attention", f"must be a mechanism name, a list of names or a list of head groups, got {attention!r}")
    betas = data.get("betas", [0.9, 0.98])
    if not (
        isinstance(betas, (list, tuple))
        and len(betas) == 2
        and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)
    ):
        raise err("betas", f"must be two numbers in [0, 1), got {betas!r}")
    _check_model(data, err)
    values = dict(data)
    values["betas"] = (float(betas[0]), float(betas[1]))
    values["freeze"] = tuple(data.get("freeze", ()))
    if isinstance(attention, list):
        from attnkit.models.config import normalize_attention

        values["attention"] = normalize_attention(attention)
    config = TrainConfig(**values)
    if config.batch_size % config.grad_accum:
        raise err("grad_accum", f"must divide batch_size={config.batch_size}, got {config.grad_accum}")
    _check_task_options(config, err)
    _check_objective_options(config, err)
    return config


def _check_objective_options(config: TrainConfig, err: Locator) -> None:
    if config.objective == "causal":
        if config.objective_options:
            raise err("objective_options", "only applies to objective = 'mlm' or 'span'")
        return
    from attnkit.data.objectives import make_objective

    try:
        make_objective(config.objective, 1 << 16, config.objective_options)
    except ValueError as exc:
        raise err("objective_options", str(exc).removeprefix("objective_options: ")) from None


def _check_task_options(config: TrainConfig, err: Locator) -> None:
    if config.task in TASK_NAMES:
        from attnkit.data.tasks import make_task

        try:
            make_task(config.task, **config.task_options)
        except (ValueError, TypeError) as exc:
            raise err("task_options", f"is invalid for task {config.task!r}: {exc}") from exc
    elif config.task_options:
        raise err("task_options", f"only applies to synthetic tasks ({', '.join(TASK_NAMES)}), not {config.task!r}")


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read, override and validate a training config file.

    A relative data path in ``task`` is resolved against the config file's directory when
    it does not exist relative to the working directory.
    """
    data, text = read_config_file(path)
    data = apply_overrides(data, overrides or [])
    config = TrainConfig.from_dict(data, source=str(path), text=text, overrides=overrides or [])
    task = Path(config.task)
    if config.task not in NAMED_DATA and not config.task.startswith(TASK_PREFIX) and not task.exists():
        config = dataclasses.replace(config, task=str(Path(path).parent / task))
    return config
