"""Stopping a training run cleanly on Ctrl-C (SIGINT) or SIGTERM.

A signal that lands in the middle of a step would leave the weights updated but the
optimizer, the step counter or the data position not (or the other way round), so a
checkpoint written there would not resume exactly. While :class:`StopRequest` is active, the
first SIGINT or SIGTERM (what torchrun, SLURM and Kubernetes send before they kill) only
*asks* the trainer to stop: it finishes the step, writes a checkpoint of it (atomically) and
raises :class:`TrainingInterrupted`. A second Ctrl-C stops at once with a
``KeyboardInterrupt``: nothing more is saved, and the atomic writes leave every complete
checkpoint as it was.

Under torchrun the agent forwards the terminal's SIGINT to every worker, which therefore
receives it twice; there a repeated signal never escalates, and torchrun's own kill timeout
is the hard stop. Signals reach only the main thread, so elsewhere (a trainer run in a worker
thread) nothing is installed and Ctrl-C keeps its default behaviour.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by a signal.

    Attributes:
        signal_name: ``"SIGINT"`` (Ctrl-C) or ``"SIGTERM"``.
        step: the last step whose training finished.
        checkpoint: the checkpoint written for ``step``, or None when a second Ctrl-C stopped
            the run before it was written.
        resume_from: the checkpoint ``--resume`` continues from (None: no checkpoint yet,
            ``--resume`` starts from step 0).
    """

    def __init__(self, signal_name: str, step: int, checkpoint: Path | None, resume_from: Path | None) -> None:
        super().__init__(f"training stopped by {signal_name} after step {step}")
        self.signal_name, self.step, self.checkpoint, self.resume_from = signal_name, step, checkpoint, resume_from

    @property
    def exit_code(self) -> int:
        """The shell's code for death by this signal: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + int(getattr(signal, self.signal_name, signal.SIGINT))


def under_torchrun() -> bool:
    """True in a worker started by torchrun (its agent forwards signals to the workers)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


class StopRequest:
    """Turn the first SIGINT/SIGTERM into a request to stop at the next step boundary.

    Use as a context manager around the training loop; the previous handlers come back on exit.
    A signal that was ignored when the block started (``nohup``, a background job) stays ignored.

    Args:
        on_request: called (inside the signal handler) with the signal's name when the first
            signal arrives, e.g. to tell the user the run is stopping.
        escalate: a second SIGINT raises ``KeyboardInterrupt`` at once (default: yes, except
            under torchrun, see the module docstring).

    Attributes:
        signal_name: the name of the first signal received, or None.
    """

    def __init__(self, *, on_request: Callable[[str], None] | None = None, escalate: bool | None = None) -> None:
        self.on_request = on_request
        self.escalate = not under_torchrun() if escalate is None else escalate
        self.signal_name: str | None = None
        self._previous: dict[signal.Signals, Any] = {}

    @property
    def requested(self) -> bool:
        """True once a stop was asked for."""
        return self.signal_name is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            if self.on_request is not None:
                self.on_request(self.signal_name)
        elif signum == signal.SIGINT and self.escalate:
            raise KeyboardInterrupt

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                previous = signal.getsignal(sig)
                if previous is not signal.SIG_IGN:
                    self._previous[sig] = previous
                    signal.signal(sig, self._handle)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
