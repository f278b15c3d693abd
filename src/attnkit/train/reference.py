"""Generate ``docs/configuration.md``: every training config key, its type, default and meaning.

There is one source of truth: the dataclasses' fields give the keys, types and defaults, and
the ``Attributes:`` sections of their docstrings (``Args:`` for the synthetic tasks) give the
meaning. Regenerate after changing any of them::

    python -m attnkit.train.reference > docs/configuration.md

``tests/train/test_reference.py`` fails while the committed file is out of date, and while a
field has no docstring entry (or an entry has no field).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import sys
import types
import typing
from typing import Any

#: Keys of the ``[model]`` table that ``attnkit train`` sets itself or takes from the top level.
_NOT_IN_MODEL_TABLE: tuple[str, ...] = ("vocab_size", "num_classes", "pad_token_id", "attention", "attention_options")

_SCALARS: dict[Any, tuple[str, str]] = {
    str: ("string", "strings"),
    int: ("integer", "integers"),
    float: ("number", "numbers"),
    bool: ("boolean", "booleans"),
    dict: ("table", "tables"),
}


def docstring_entries(obj: Any, section: str = "Attributes") -> dict[str, str]:
    """``{name: description}`` from a Google-style docstring section (``Attributes:``, ``Args:``).

    Continuation lines are joined with single spaces.
    """
    lines = (inspect.getdoc(obj) or "").splitlines()
    try:
        start = lines.index(f"{section}:") + 1
    except ValueError:
        return {}
    entries: dict[str, str] = {}
    name = None
    for line in lines[start:]:
        if line and not line.startswith(" "):  # the next section
            break
        entry = re.match(r"^    (\*{0,2}\w+): (.*)$", line)
        if entry:
            name = entry.group(1).lstrip("*")
            entries[name] = entry.group(2).strip()
        elif name is not None and line.strip():
            entries[name] += " " + line.strip()
    return entries


def _markdown(text: str) -> str:
    """reST markup of the docstrings as Markdown, safe inside a table cell."""
    text = re.sub(r":\w+:`~?([\w.]+)`", lambda m: f"`{m.group(1).split('.')[-1]}`", text)
    return text.replace("``", "`").replace("|", "\\|")


def type_name(annotation: Any) -> str:
    """A config-file name for a field's type: ``integer``, ``string or list of strings``, ...

    Raises:
        TypeError: for a type this reference does not know how to name (extend it).
    """
    if annotation in _SCALARS:
        return _SCALARS[annotation][0]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        names = [type_name(arg) for arg in args if arg is not type(None)]
        return " or ".join(dict.fromkeys(names))
    if origin is dict:
        return "table"
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"list of {_plural(args[0])}"
    if origin is tuple and args and all(arg == args[0] for arg in args):
        return f"list of {len(args)} {_plural(args[0])}"
    raise TypeError(f"attnkit.train.reference cannot name the type {annotation!r}; add it to type_name")


def _plural(annotation: Any) -> str:
    if annotation in _SCALARS:
        return _SCALARS[annotation][1]
    if typing.get_origin(annotation) is dict:
        return "tables"
    raise TypeError(f"attnkit.train.reference cannot name a list of {annotation!r}; add it to _plural")


def default_text(value: Any) -> str:
    """A default as it would be written in a config file (``unset`` for None)."""
    if value is None:
        return "unset"
    if isinstance(value, tuple):
        value = list(value)
    return f"`{json.dumps(value)}`"


def _field_default(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        return default_text(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return default_text(f.default_factory())
    return "required"


def _table(rows: list[tuple[str, str, str, str]], header: tuple[str, str, str, str]) -> list[str]:
    out = [f"| {' | '.join(header)} |", "|---|---|---|---|"]
    out += [f"| `{key}` | {kind} | {default} | {_markdown(doc)} |" for key, kind, default, doc in rows]
    return out


def dataclass_rows(cls: type, *, skip: tuple[str, ...] = ()) -> list[tuple[str, str, str, str]]:
    """``(key, type, default, description)`` of every field of dataclass ``cls``.

    Raises:
        ValueError: a field without an ``Attributes:`` entry in the class docstring.
    """
    docs = docstring_entries(cls)
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        if f.name not in docs:
            raise ValueError(f"{cls.__name__}.{f.name} has no entry in the class docstring's Attributes section")
        rows.append((f.name, type_name(hints[f.name]), _field_default(f), docs[f.name]))
    return rows


def task_rows(name: str) -> list[tuple[str, str, str, str]]:
    """``(option, type, default, description)`` of synthetic task ``name``'s options."""
    from attnkit.data.tasks import make_task

    cls = type(make_task(name))
    docs = docstring_entries(cls, "Args")
    hints = typing.get_type_hints(cls.__init__)
    rows = []
    for param in inspect.signature(cls.__init__).parameters.values():
        if param.name == "self" or (param.name == "mode" and name in ("reverse", "sort")):
            continue  # make_task fixes the mode of "reverse" and "sort"
        rows.append((param.name, type_name(hints[param.name]), default_text(param.default), docs.get(param.name, "")))
    return rows


def render() -> str:
    """The text of ``docs/configuration.md``."""
    from attnkit.data.tasks import TASK_NAMES, make_task
    from attnkit.models import TransformerConfig
    from attnkit.train.config import TrainConfig
    from attnkit.train.trainer import _FIXED_ON_RESUME

    header = ("key", "type", "default", "meaning")
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m attnkit.train.reference > docs/configuration.md` from the docstrings of",
        "     TrainConfig, TransformerConfig and the synthetic tasks. Edit those, not this file. -->",
        "",
        "`attnkit train CONFIG [key=value ...] [--resume]` reads a TOML or JSON file (examples in",
        "[`configs/`](../configs)). Any key can be overridden on the command line as `key=value`; the value is",
        "parsed as JSON when it can be (`max_steps=500`, `betas=[0.9,0.95]`) and is a string otherwise, and",
        "dotted keys reach into tables (`model.dim=128`, `attention_options.window=64`). An unknown key or a bad",
        "value stops the run before it starts, naming the file and line, or the override, it came from.",
        "Training on your own text or JSONL files: [own-data.md](own-data.md).",
        "",
        "## Top-level keys",
        "",
        *_table(dataclass_rows(TrainConfig), header),
        "",
        "`--resume` continues a run from its newest intact checkpoint; it refuses a config that changes a key",
        "which defines the run: " + ", ".join(f"`{k}`" for k in _FIXED_ON_RESUME) + ".",
        "Schedule and logging keys (`max_steps`, `eval_every`, `checkpoint_every`, ...) may change.",
        "",
        "## `[model]`",
        "",
        "Fields of `attnkit.TransformerConfig`. `vocab_size`, `num_classes` and `pad_token_id` come from the",
        "data, and `attention` / `attention_options` are top-level keys, so none of them goes here.",
        "",
        *_table(dataclass_rows(TransformerConfig, skip=_NOT_IN_MODEL_TABLE), header),
        "",
        "## `[task_options]`",
        "",
        "Options of the synthetic tasks (only with `task` set to one of them).",
    ]
    for name in TASK_NAMES:
        kind = make_task(name).kind
        out += ["", f"### `{name}` ({kind})", "", *_table(task_rows(name), ("option", "type", "default", "meaning"))]
    out += [
        "",
        "## `[attention_options]`",
        "",
        "Each mechanism's options and their defaults are listed by `attnkit list --json` (and explained in",
        "the mechanism's docstring). Two forms: one table for every layer (`[attention_options]` with",
        "`window = 64`), or tables keyed by mechanism name (`[attention_options.sliding_window]`), for an",
        "`attention` list that mixes mechanisms. Options for a mechanism that no layer uses are an error.",
        "",
    ]
    return "\n".join(out)


def main() -> int:
    """Print the reference (redirect it to ``docs/configuration.md``)."""
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
