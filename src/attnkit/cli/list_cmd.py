"""``attnkit list``: the registered mechanisms and what each can do.

Everything here comes from the registry (:func:`attnkit.list_attention` and each mechanism's
declared :class:`~attnkit.Capabilities`), so a newly registered mechanism is listed without
touching this file; ``--markdown`` prints the README's mechanism table.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

#: The README's mechanism table (``--markdown``): header, then one row per mechanism.
MARKDOWN_HEADER = "| name | family | exact / error budget | causal | padding | cross | decoding | complexity |"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "list",
        help="list the registered attention mechanisms and their capabilities",
        description=(
            "List every registered attention mechanism with its declared capabilities: exact or approximate "
            "(with its documented relative error budget), causal, key padding, cross-attention, decoding state, "
            "score biases and complexity."
        ),
    )
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print machine-readable JSON (with every option)")
    output.add_argument(
        "--markdown", action="store_true", help="print the README's mechanism table (Markdown), built from the registry"
    )
    parser.set_defaults(func=run)


def capability_rows() -> list[dict[str, Any]]:
    """One dict per mechanism: name, capabilities and accepted options."""
    import attnkit

    rows = []
    for name in attnkit.list_attention():
        caps = attnkit.attention_capabilities(name).as_dict()
        options = {k: v for k, v in attnkit.accepted_options(name).items()}
        rows.append({"name": name, **caps, "options": options})
    return rows


def _yes(flag: bool) -> str:
    return "yes" if flag else "-"


def _accuracy(row: dict[str, Any]) -> str:
    """``exact``, or ``~budget`` for an approximate mechanism (its documented relative error budget)."""
    return "exact" if row["exact"] else f"~{row['error_budget']:g}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The README's mechanism table for :func:`capability_rows`, in registry order."""
    lines = [MARKDOWN_HEADER, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [
            f"`{r['name']}`",
            r["family"],
            _accuracy(r),
            _yes(r["causal"]),
            _yes(r["key_padding"]),
            _yes(r["cross_attention"]),
            r["decoding"] or "-",
            r["complexity"],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def text_table(rows: list[dict[str, Any]]) -> str:
    """The human-readable listing, columns padded to their widest cell."""
    header = ["name", "family", "exact", "causal", "padding", "cross", "decoding", "bias", "complexity", "summary"]
    table = [
        [
            r["name"],
            r["family"],
            "yes" if r["exact"] else _accuracy(r),
            _yes(r["causal"]),
            _yes(r["key_padding"]),
            _yes(r["cross_attention"]),
            r["decoding"] or "-",
            _yes(r["score_bias"]),
            r["complexity"],
            r["summary"],
        ]
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *table)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in table]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    rows = capability_rows()
    if args.json:
        print(json.dumps(rows, indent=2, default=repr))
    elif args.markdown:
        print(markdown_table(rows))
    else:
        print(text_table(rows))
        print(
            f"\n{len(rows)} mechanisms. '~x' = approximate, documented relative error budget x. "
            "Options: attnkit list --json"
        )
    return 0
