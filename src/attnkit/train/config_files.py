"""Reading training configs: TOML/JSON files, ``key=value`` overrides, and where each value came from.

:class:`Locator` turns a key path into the place a user can fix: the config file and line
(``configs/x.toml, line 14: [attention_options.sliding_window] key 'windw' ...``) or the
command-line override that set it. :mod:`attnkit.train.config` validates with it.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = ["KeyPath", "Locator", "apply_overrides", "parse_override", "read_config_file"]


# ----------------------------------------------------------------------------- where a value came from

#: A key path into the config: ``("max_steps",)``, ``("attention_options", "sliding_window", "window")``;
#: an int is an index into a list.
KeyPath = tuple[str | int, ...]

_TOML_HEADER = re.compile(r"^\[\[?\s*([^\]]+?)\s*\]\]?$")
_TOML_KEY = re.compile(
    r"^((?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*'))*)\s*="
)


def _toml_parts(dotted: str) -> KeyPath:
    return tuple(part.strip().strip("\"'") for part in re.split(r"\.(?=(?:[^\"']|\"[^\"]*\"|'[^']*')*$)", dotted))


def _toml_key_lines(text: str) -> dict[KeyPath, int]:
    """The line of every table header and ``key = value`` in a TOML text, by full key path.

    Keys inside inline tables and arrays are not listed: their value's line is the line of the
    enclosing key, which :meth:`Locator.line` falls back to.
    """
    lines: dict[KeyPath, int] = {}
    table: KeyPath = ()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        header = _TOML_HEADER.match(line)
        if header:
            table = _toml_parts(header.group(1))
            lines.setdefault(table, number)
            continue
        key = _TOML_KEY.match(line)
        if key:
            lines.setdefault((*table, *_toml_parts(key.group(1))), number)
    return lines


def _json_key_line(text: str, path: KeyPath) -> int | None:
    """The line of the deepest key of ``path`` found by following it through a JSON text."""
    position, line = 0, None
    for part in path:
        if isinstance(part, int):
            break
        found = re.compile(rf'"{re.escape(part)}"\s*:').search(text, position)
        if found is None:
            break
        position, line = found.end(), text.count("\n", 0, found.start()) + 1
    return line


def _dotted(path: KeyPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


class Locator:
    """Builds errors that say where a key's value came from: a command-line override, or a line
    of the config file (with the TOML table or the dotted key path)."""

    def __init__(self, source: str, text: str | None, overrides: Sequence[str]) -> None:
        self.source, self.text = source, text
        self.toml = source.endswith(".toml")
        self.toml_lines = _toml_key_lines(text) if self.toml and text else {}
        # Later overrides win, like in apply_overrides.
        self.overrides: list[tuple[KeyPath, str]] = [(tuple(parse_override(item)[0]), item) for item in overrides]

    def line(self, path: KeyPath) -> int | None:
        if not self.text:
            return None
        if not self.toml:
            return _json_key_line(self.text, path)
        for depth in range(len(path), 0, -1):  # the deepest written prefix (inline tables, arrays)
            if path[:depth] in self.toml_lines:
                return self.toml_lines[path[:depth]]
        return None

    def describe(self, path: KeyPath) -> str:
        """``key 'max_steps'``, ``[model] key 'dim'`` (TOML) or ``key 'model.dim'``."""
        if self.toml and len(path) > 1 and all(isinstance(p, str) for p in path):
            return f"[{'.'.join(map(str, path[:-1]))}] key '{path[-1]}'"
        return f"key '{_dotted(path)}'"

    def __call__(self, key: str | KeyPath, message: str) -> ValueError:
        path: KeyPath = tuple(key.split(".")) if isinstance(key, str) else key
        setting = [item for p, item in self.overrides if path[: len(p)] == p]
        if setting:  # an override set this key, or a whole table holding it
            return ValueError(f"command-line override {setting[-1]!r}: key '{_dotted(path)}' {message}")
        line = self.line(path)
        where = f"{self.source}, line {line}" if line else self.source
        inside = [item for p, item in self.overrides if p[: len(path)] == path]
        if inside:  # the file's table plus overrides of some of its keys
            where += f" (with command-line override{'s' if len(inside) > 1 else ''} {', '.join(map(repr, inside))})"
        return ValueError(f"{where}: {self.describe(path)} {message}")


# ----------------------------------------------------------------------------- validation


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
