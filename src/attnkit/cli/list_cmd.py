"""``attnkit list``: the registered mechanisms and what each can do."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "list",
        help="list the registered attention mechanisms and their capabilities",
        description="List every registered attention mechanism with its declared capabilities.",
    )
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
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


def run(args: argparse.Namespace) -> int:
    rows = capability_rows()
    if args.json:
        print(json.dumps(rows, indent=2, default=repr))
        return 0

    def yes(flag: bool) -> str:
        return "yes" if flag else "-"

    header = ["name", "family", "exact", "causal", "padding", "cross", "decoding", "bias", "complexity", "summary"]
    table = [
        [
            r["name"],
            r["family"],
            yes(r["exact"]) if r["exact"] else f"~{r['error_budget']:g}",
            yes(r["causal"]),
            yes(r["key_padding"]),
            yes(r["cross_attention"]),
            r["decoding"] or "-",
            yes(r["score_bias"]),
            r["complexity"],
            r["summary"],
        ]
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *table)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for line in table:
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)))
    print(
        f"\n{len(rows)} mechanisms. '~x' = approximate, documented relative error budget x. Options: attnkit list --json"
    )
    return 0
