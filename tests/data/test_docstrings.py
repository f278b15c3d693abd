"""The code → docstring-summary corpus, against hand-made modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from attnkit.data.docstrings import _Limits, docstring_pairs, pairs_of_module, summary_of

MODULE = '''
import functools


@functools.cache
def area(width, height):
    """Return the area of a rectangle.  Negative sides are refused.

    More text that is not the summary.
    """
    if width < 0 or height < 0:
        raise ValueError("negative side")
    return width * height


class Stack:
    """A last-in, first-out stack
    of items."""

    def __init__(self):
        self.items = []

    def only_docstring(self):
        """Nothing else in here."""
'''

LOOSE = _Limits(min_source_chars=10, max_source_chars=10_000, min_summary_chars=5, max_summary_chars=200)


def test_summary_is_the_first_sentence_of_the_first_paragraph() -> None:
    assert summary_of("Return the area.  Negative sides\nare refused.\n\nMore.") == "Return the area."
    assert summary_of("A last-in, first-out stack\nof items.") == "A last-in, first-out stack of items."
    assert summary_of("Version 3.11 or later is needed") == "Version 3.11 or later is needed"


def test_pairs_drop_the_docstring_and_keep_decorators() -> None:
    pairs = dict((summary, code) for code, summary in pairs_of_module(MODULE, limits=LOOSE))
    assert set(pairs) == {"Return the area of a rectangle.", "A last-in, first-out stack of items."}
    assert pairs["Return the area of a rectangle."] == (
        "@functools.cache\n"
        "def area(width, height):\n"
        "    if width < 0 or height < 0:\n"
        '        raise ValueError("negative side")\n'
        "    return width * height"
    )
    stack = pairs["A last-in, first-out stack of items."]
    assert stack.startswith("class Stack:\n\n    def __init__(self):") and '"""Nothing else in here."""' in stack
    assert list(pairs_of_module("def broken(:\n")) == []


def test_limits_filter_short_code_and_long_summaries() -> None:
    assert list(pairs_of_module(MODULE)) == []  # every definition here is under 200 characters
    strict = _Limits(min_source_chars=10, max_source_chars=10_000, min_summary_chars=5, max_summary_chars=32)
    assert [s for _, s in pairs_of_module(MODULE, limits=strict)] == ["Return the area of a rectangle."]


def test_corpus_splits_by_module_and_skips_tests(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(40))
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "tool.py").write_text(f'def tool():\n    """Do the tool thing."""\n{body}\n')
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "test_tool.py").write_text(f'def test_it():\n    """Check the tool."""\n{body}\n')
    (pair,) = docstring_pairs(tmp_path)
    assert (pair.target, pair.catalog) == ("Do the tool thing.", "pkg/tool.py")
    with pytest.raises(FileNotFoundError, match="no documented Python definitions"):
        docstring_pairs(tmp_path / "test")
