"""The suites: one module each, declaring ``SUITE`` (see :mod:`benchmarks.suite`) and its targets."""

from __future__ import annotations

import importlib
import pkgutil

from benchmarks.suite import Suite


def all_suites() -> dict[str, Suite]:
    """Every suite declared in this package, by name."""
    found: dict[str, Suite] = {}
    for info in pkgutil.iter_modules(__path__):
        suite = getattr(importlib.import_module(f"{__name__}.{info.name}"), "SUITE", None)
        if isinstance(suite, Suite):
            found[suite.name] = suite
    return dict(sorted(found.items()))


def get_suite(name: str) -> Suite:
    """The suite called ``name``; ``KeyError`` listing the suites when there is none."""
    suites = all_suites()
    if name not in suites:
        raise KeyError(f"no suite {name!r}; suites: {', '.join(suites)} (python -m benchmarks list)")
    return suites[name]
