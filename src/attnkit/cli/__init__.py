"""The ``attnkit`` command line. Each module here defining ``register(subparsers)`` adds a subcommand.

Modules in this package are imported to build the parser (``attnkit --help``), so they
import only the standard library at top level; PyTorch and the rest of attnkit are
imported inside each command's ``run`` function. The helpers below follow the same rule.
"""

from __future__ import annotations

import argparse
import textwrap
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: The ``--weights`` choices, the weights a training run folder holds, in the order tried when
#: ``--weights`` is not given: attnkit.train.runs.RUN_WEIGHTS, spelled out because importing
#: attnkit.train here would import torch for ``--help`` (tests/generate/test_cli.py keeps them equal).
RUN_WEIGHTS = ("best", "final", "last")


def add_command(
    subparsers: Any, name: str, *, summary: str, description: str, examples: str
) -> argparse.ArgumentParser:
    """The parser of subcommand ``name``: ``summary`` in ``attnkit --help``, ``description`` filled to
    100 columns at the top of ``attnkit NAME --help`` and ``examples`` after the options, one per line."""
    return subparsers.add_parser(
        name,
        help=summary,
        description=textwrap.fill(description, width=100),
        epilog=examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def available_devices() -> list[str]:
    """The devices this machine can run on, e.g. ``["cpu", "cuda:0", "cuda:1"]`` (imports torch)."""
    import torch

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return devices


def check_device(name: str, *, flag: str = "--device") -> torch.device:
    """The ``torch.device`` for ``name`` if this machine has it, else a ``ValueError`` that says what it has.

    Call it before loading anything onto the device: without this check, asking for CUDA on a
    machine without it surfaces deep inside the loader as an unrelated error.

    Args:
        name: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        flag: the option's name in the error message.

    Raises:
        ValueError: an unknown device string, or a device this machine does not have.
    """
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"{flag} must be cpu, cuda, cuda:N or mps, got {name!r}") from None
    available = available_devices()
    options = ", ".join(available)
    hint = f"available here: {options}; run with {flag} cpu" if available == ["cpu"] else f"available: {options}"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this PyTorch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU was found"
            raise ValueError(f"{flag} {name}: CUDA is not available on this machine ({why}); {hint}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA device(s); {hint}")
    elif device.type == "mps" and "mps" not in available:
        raise ValueError(f"{flag} {name}: Apple's MPS backend is not available on this machine; {hint}")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{flag} must be cpu, cuda, cuda:N or mps, got {name!r}")
    return device
