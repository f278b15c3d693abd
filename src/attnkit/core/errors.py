"""Helpers that turn bad input into errors naming the argument and what was expected."""

from __future__ import annotations

from typing import Any


def check_positive_int(name: str, value: Any, *, example: int | None = None) -> int:
    """Return ``value`` if it is a positive int, else raise a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        hint = f" (set {name}={example}, say)" if example is not None else ""
        raise ValueError(f"{name} must be a positive integer, got {value!r}{hint}")
    return value


def check_non_negative_int(name: str, value: Any) -> int:
    """Return ``value`` if it is an int >= 0, else raise a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def check_positive_float(name: str, value: Any) -> float:
    """Return ``value`` as float if it is a positive real number, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise a ``ValueError`` listing them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return str(value)


def check_scale(value: Any) -> float | None:
    """Return an attention score scale (a positive number, as float) or None (the default ``1/sqrt(D)``)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"scale must be a positive number or None (for 1/sqrt(D)), got {value!r}")
    return float(value)
