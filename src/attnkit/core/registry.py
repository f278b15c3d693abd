"""The registry of attention mechanisms: one name, one class, one capabilities record.

Adding a mechanism touches three places: its file (which calls :func:`register`), one
import line in ``attnkit/attention/__init__.py``, and its test file. The contract suite,
``attnkit list``, the demo and the arena read everything else from here.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from attnkit.core.base import AttentionMechanism
from attnkit.core.capabilities import Capabilities


@dataclass(frozen=True)
class MechanismSpec:
    """A registry entry.

    Attributes:
        name: registered name.
        cls: the mechanism class.
        capabilities: declared abilities.
        small_options: options that make the mechanism non-trivial on tiny inputs
            (lengths ~10-40); used by the contract suite and the demo.
        benchmark_options: options for long-sequence runs (arena, benchmarks).
    """

    name: str
    cls: type[AttentionMechanism]
    capabilities: Capabilities
    small_options: dict[str, Any] = field(default_factory=dict)
    benchmark_options: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, MechanismSpec] = {}

M = TypeVar("M", bound=type[AttentionMechanism])


def register(
    name: str,
    capabilities: Capabilities,
    *,
    small_options: dict[str, Any] | None = None,
    benchmark_options: dict[str, Any] | None = None,
) -> Callable[[M], M]:
    """Class decorator registering a mechanism under ``name``.

    Raises:
        ValueError: if ``name`` is already taken by another class.
    """

    def wrap(cls: M) -> M:
        # Built-ins first, so the listing order is the same whether a plugin is imported before
        # or after attnkit.attention (inside that package's own import this returns at once).
        _ensure_loaded()
        existing = _REGISTRY.get(name)
        if existing is not None and existing.cls.__qualname__ != cls.__qualname__:
            raise ValueError(f"attention name {name!r} is already registered by {existing.cls.__qualname__}")
        cls.name = name
        cls.capabilities = capabilities
        _REGISTRY[name] = MechanismSpec(
            name, cls, capabilities, dict(small_options or {}), dict(benchmark_options or {})
        )
        return cls

    return wrap


def _ensure_loaded() -> None:
    import attnkit.attention  # noqa: F401  (registers the built-in mechanisms)


def list_attention() -> list[str]:
    """Names of every registered mechanism, in registration order."""
    _ensure_loaded()
    return list(_REGISTRY)


def get_spec(name: str) -> MechanismSpec:
    """The registry entry for ``name``.

    Raises:
        ValueError: unknown name; the message lists the names and suggests the closest.
    """
    _ensure_loaded()
    if not isinstance(name, str) or name not in _REGISTRY:
        names = list(_REGISTRY)
        close = difflib.get_close_matches(str(name), names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown attention {name!r}.{hint} Registered: {', '.join(names)}")
    return _REGISTRY[name]


def attention_capabilities(name: str) -> Capabilities:
    """The declared :class:`Capabilities` of mechanism ``name``."""
    return get_spec(name).capabilities


def accepted_options(name: str) -> dict[str, Any]:
    """Constructor options of mechanism ``name`` with their defaults."""
    cls = get_spec(name).cls
    params = inspect.signature(cls.__init__).parameters
    return {
        p.name: p.default
        for p in params.values()
        if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


def build_attention(name: str, **options: Any) -> AttentionMechanism:
    """Build mechanism ``name`` with keyword ``options``.

    Raises:
        ValueError: unknown name (with a did-you-mean) or an invalid option value.
        TypeError: an unknown option (the message lists the accepted ones).
    """
    spec = get_spec(name)
    accepted = accepted_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        suggestions = []
        for opt in unknown:
            close = difflib.get_close_matches(opt, list(accepted), n=1)
            suggestions.append(f"{opt!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        listing = ", ".join(f"{k}={v!r}" for k, v in accepted.items()) or "none"
        raise TypeError(f"attention {name!r} got unknown option(s) {', '.join(suggestions)}; accepted: {listing}")
    module = spec.cls(**options)
    module._options_repr = ", ".join(f"{k}={v!r}" for k, v in sorted(options.items()))
    return module
