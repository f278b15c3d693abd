"""A summarization corpus that is already on the machine: Python code → its docstring's summary.

Every documented function, method and class of the Python standard library becomes one pair:
the *source* is its code with the docstring removed (signature, decorators and body, dedented),
the *target* is the docstring's summary — its first sentence (PEP 257: "the first line should
be a short summary"). Inputs run from a few hundred to tens of thousands of characters, so the
long-input encoders (``longformer`` with global tokens, ``bigbird``, ``linear``) are what the task
is for. Test files are left out (their docstrings describe tests, not code).

Pairs are split like the ``text`` corpus, by a hash of the module's path relative to the library
root, so a module's functions all land in one split. :func:`corpus_file` writes them once into a
cached JSONL file (the ``task = "docstrings"`` of a training config).
"""

from __future__ import annotations

import ast
import hashlib
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from textwrap import dedent

from attnkit.data.catalogs import Pair, cache_dir, write_jsonl
from attnkit.data.sources import hash_split, stdlib_root

__all__ = ["TASK_NAME", "corpus_file", "docstring_pairs", "pairs_of_module", "summary_of"]

#: The ``task`` of a training config that trains on this corpus.
TASK_NAME = "docstrings"

_DOCUMENTED = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


@dataclass(frozen=True)
class _Limits:
    min_source_chars: int = 200
    max_source_chars: int = 20000
    min_summary_chars: int = 10
    max_summary_chars: int = 200


def summary_of(docstring: str) -> str:
    """The summary of a (cleaned) docstring: its first paragraph's first sentence, on one line."""
    paragraph = docstring.strip().split("\n\n", 1)[0]
    text = " ".join(paragraph.split())
    match = _SENTENCE_END.search(text)
    return text[: match.start()] if match else text


def _without_docstring(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> str:
    docstring = node.body[0]
    first = min([node.lineno, *(d.lineno for d in node.decorator_list)]) - 1
    assert node.end_lineno is not None and docstring.end_lineno is not None
    kept = lines[first : docstring.lineno - 1] + lines[docstring.end_lineno : node.end_lineno]
    return dedent("".join(kept)).strip("\n")


def pairs_of_module(source: str, *, limits: _Limits = _Limits()) -> Iterator[tuple[str, str]]:
    """``(code without its docstring, summary)`` for every documented definition in ``source``."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    lines = source.splitlines(keepends=True)
    for node in ast.walk(tree):
        if not isinstance(node, _DOCUMENTED):
            continue
        docstring = ast.get_docstring(node, clean=True)
        if not docstring or len(node.body) < 2:  # a docstring and nothing else says nothing to summarize
            continue
        summary = summary_of(docstring)
        code = _without_docstring(lines, node)
        if not limits.min_summary_chars <= len(summary) <= limits.max_summary_chars:
            continue
        if not limits.min_source_chars <= len(code) <= limits.max_source_chars:
            continue
        yield code, summary


def _modules(root: Path) -> Iterator[tuple[str, Path]]:
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        parts = rel.split("/")
        if "site-packages" in parts or "dist-packages" in parts:
            continue
        if any(part in ("test", "tests", "idle_test") or part.startswith("test_") for part in parts):
            continue
        yield rel, path


def docstring_pairs(root: Path | None = None) -> list[Pair]:
    """All pairs of the standard library under ``root`` (default: the running interpreter's),
    deduplicated, split by module."""
    root = stdlib_root() if root is None else root
    seen: set[tuple[str, str]] = set()
    pairs: list[Pair] = []
    for rel, path in _modules(root):
        split = hash_split(rel)
        for code, summary in pairs_of_module(path.read_text(encoding="utf-8", errors="replace")):
            if (code, summary) in seen:
                continue
            seen.add((code, summary))
            pairs.append(Pair(source=code, target=summary, split=split, catalog=rel))
    if not pairs:
        raise FileNotFoundError(f"no documented Python definitions found under {root}")
    return pairs


def corpus_file(root: Path | None = None) -> Path:
    """The corpus as a JSONL file in the cache directory, built once per Python version and root."""
    root = stdlib_root() if root is None else root
    key = hashlib.blake2b(f"{root}\0{sys.version}".encode(), digest_size=8).hexdigest()
    target = cache_dir() / "docstrings" / f"stdlib-{key}.jsonl"
    if not target.is_file():
        write_jsonl(docstring_pairs(root), target)
    return target
