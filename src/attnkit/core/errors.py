"""Helpers that turn bad input into errors naming the argument and what was expected."""

from __future__ import annotations

import warnings
from collections.abc import Hashable
from pathlib import Path
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


def check_non_negative_float(name: str, value: Any) -> float:
    """Return ``value`` as float if it is a real number >= 0, else raise a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    return float(value)


def check_fraction(name: str, value: Any, *, example: float | None = None) -> float:
    """Return ``value`` as float if it is a number in ``[0, 1)`` (a rate or decay), else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        hint = f" (set {name}={example}, say)" if example is not None else ""
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}{hint}")
    return float(value)


def check_positive_float(name: str, value: Any) -> float:
    """Return ``value`` as float if it is a positive real number, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` if it is a bool, else raise a ``ValueError`` naming ``name`` (1 and 0 are not bools)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value


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


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse an output folder ``out`` that is a file, or that already holds files unless ``overwrite``.

    Checked before any work, so a long run never ends on a folder it may not write.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        held = ", ".join(sorted(p.name for p in out.iterdir())[:5])
        raise ValueError(
            f"--out {out} already holds files ({held}); pass --overwrite to replace them, or choose another folder"
        )


def warn_once(seen: set[Any], key: Hashable, message: str, *, stacklevel: int = 1) -> None:
    """``warnings.warn(message)`` unless ``key`` is in ``seen`` (then nothing); adds ``key`` to ``seen``.

    ``seen`` is the caller's own module-level set, so each warning is given once per process
    (and a test can reset it). ``stacklevel`` counts as in :func:`warnings.warn` called at the
    caller's line (1: that line).
    """
    if key in seen:
        return
    seen.add(key)
    warnings.warn(message, stacklevel=stacklevel + 1)
