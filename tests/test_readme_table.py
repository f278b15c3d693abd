"""The README's mechanism table is the registry's: this test rebuilds it and fails, printing it, when they differ.

Each row comes from ``attnkit.list_attention()`` (in registry order) and the mechanism's declared
``attnkit.attention_capabilities(name)``: family, ``exact`` or ``~budget`` (the documented relative
error budget each approximate mechanism declares as ``Capabilities.error_budget``), causal, key
padding, cross-attention, decoding state and complexity. A new mechanism, a changed budget or a
changed capability fails here until the README shows it; the failure message is the table to paste.
"""

from __future__ import annotations

import re
from pathlib import Path

import attnkit

README = Path(__file__).resolve().parents[1] / "README.md"
HEADER = "| name | family | exact / error budget | causal | padding | cross | decoding | complexity |"


def _yes(flag: bool) -> str:
    return "yes" if flag else "-"


def expected_table() -> str:
    """The mechanism table, built from the registry."""
    lines = [HEADER, "|---|---|---|---|---|---|---|---|"]
    for name in attnkit.list_attention():
        caps = attnkit.attention_capabilities(name)
        if caps.exact:
            accuracy = "exact"
        else:
            assert caps.error_budget is not None, f"{name} is approximate but declares no error budget"
            accuracy = f"~{caps.error_budget:g}"
        cells = [
            f"`{name}`",
            caps.family,
            accuracy,
            _yes(caps.causal),
            _yes(caps.key_padding),
            _yes(caps.cross_attention),
            caps.decoding or "-",
            caps.complexity,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def readme_table(text: str) -> str:
    """The table under the README's "## The mechanisms" heading (header row to the last table line)."""
    section = re.search(r"^## The mechanisms\n(.*?)(?=^## )", text, re.MULTILINE | re.DOTALL)
    assert section, 'README.md has no "## The mechanisms" section'
    rows = [line.rstrip() for line in section.group(1).splitlines() if line.startswith("|")]
    assert rows and rows[0] == HEADER, f"the mechanism table should start with {HEADER!r}"
    return "\n".join(rows)


def differences(readme: str, expected: str) -> list[str]:
    """The lines of ``expected`` missing from ``readme`` and the README lines not in ``expected``, in order."""
    have, want = readme.splitlines(), expected.splitlines()
    out = [f"missing or different: {line}" for line in want if line not in have]
    out += [f"not in the registry:  {line}" for line in have if line not in want]
    if not out and have != want:
        out.append("same rows, different order (the registry's order is the table's)")
    return out


def test_readme_mechanism_table_matches_the_registry() -> None:
    expected = expected_table()
    found = differences(readme_table(README.read_text()), expected)
    assert not found, (
        "README.md's mechanism table disagrees with the registry:\n  "
        + "\n  ".join(found)
        + "\n\nPaste this table under '## The mechanisms':\n\n"
        + expected
    )


def test_the_check_notices_a_changed_cell_a_missing_row_and_the_order() -> None:
    expected = expected_table()
    lines = expected.splitlines()
    changed = expected.replace("| yes |", "| - |", 1)
    assert differences(changed, expected)
    assert differences("\n".join(lines[:-1]), expected)
    swapped = "\n".join([*lines[:2], lines[3], lines[2], *lines[4:]])
    assert differences(swapped, expected) == ["same rows, different order (the registry's order is the table's)"]
    assert differences(expected, expected) == []
