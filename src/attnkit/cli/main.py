"""Entry point of the ``attnkit`` command.

Subcommands are discovered: every module in ``attnkit.cli`` that defines
``register(subparsers)`` adds one (so a new command touches only its own file). Building
the parser imports only the standard library and those modules (the ``attnkit`` package
exports its names lazily), and each module imports PyTorch and the rest of attnkit inside
its ``run`` function, so ``attnkit --help`` and ``attnkit COMMAND --help`` answer in a
fraction of a second (``tests/cli/test_lazy_imports.py`` checks that torch stays unloaded).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

import attnkit.cli


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every discovered subcommand."""
    from attnkit import __version__

    parser = argparse.ArgumentParser(
        prog="attnkit",
        description=(
            "Efficient attention for PyTorch: every mechanism behind one interface, checked against an exact "
            "float64 oracle, and measured on your own machine."
        ),
        epilog="Run 'attnkit COMMAND --help' for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"attnkit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(attnkit.cli.__path__), key=lambda m: m.name):
        if info.name == "main" or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"attnkit.cli.{info.name}")
        register = getattr(module, "register", None)
        if callable(register):
            register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse stops filling a positional list at the first option, so `train c.toml --resume x=1` leaves
        # x=1 over: key=value words after an option are still overrides.
        if isinstance(getattr(args, "overrides", None), list) and all(_is_override(word) for word in extra):
            args.overrides.extend(extra)
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"attnkit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"attnkit {args.command}: interrupted", file=sys.stderr)
        return 130


def _is_override(word: str) -> bool:
    return "=" in word and not word.startswith("-")


if __name__ == "__main__":
    sys.exit(main())
