"""What one arena run measures: lengths, shapes, budgets and tasks, with three presets.

The presets trade thoroughness for time. ``quick`` (≤ 3 minutes on a 2-core CPU) and
the default (≤ 10 minutes with ~16 mechanisms) keep every stage but shrink lengths,
repeats and training steps; ``full`` sweeps to 64K and trains longer. Any field can be
overridden on top of a preset (``ArenaConfig.preset("quick", lengths=(512, 1024))``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from attnkit.core.errors import check_choice, check_positive_float, check_positive_int

#: The quality tasks the arena knows, in leaderboard order.
TASKS: tuple[str, ...] = ("mqar", "listops", "lm")
#: Efficiency modes: forward only (inference) and forward + backward (training).
MODES: tuple[str, ...] = ("fwd", "fwd+bwd")
#: The fidelity inputs (see attnkit.arena.fidelity): self-attention over smooth states (the
#: headline error), independent locally correlated queries and keys, and i.i.d. noise.
FIDELITY_INPUTS: tuple[str, ...] = ("self", "local", "iid")
#: The input kind behind the leaderboard's and the advisor's error.
HEADLINE_INPUT = "self"


@dataclass(frozen=True)
class ArenaConfig:
    """Settings of one arena run.

    Attributes:
        mechanisms: names to measure; empty = every registered mechanism. ``full`` (the
            exact baseline every ratio is taken against) is always added.
        lengths: efficiency sweep lengths, ascending.
        batch: efficiency batch size ``B``.
        heads: efficiency heads ``H``.
        head_dim: efficiency head dimension ``D``.
        repeats: timed repeats per cell after one warm-up; the median is reported.
        cell_seconds: a cell stops repeating once it has spent this long (at least one
            timed repeat always runs).
        step_budget_s: a mechanism's sweep stops when one step (fwd+bwd) takes longer,
            or is projected to take longer at the next length.
        memory_budget_gb: a sweep stops when a cell's peak memory exceeds this, or is
            projected to exceed it at the next length (the cell is then not run).
        fidelity_length: sequence length of the fidelity inputs.
        fidelity_heads: heads of the fidelity inputs (head dimension = ``head_dim``).
        tasks: quality tasks to train, a subset of :data:`TASKS`.
        train_steps: optimizer steps per quality cell (fixed, so results are reproducible).
        eval_batches: held-out batches per quality cell.
        model_dim: width of the quality models.
        model_depth: layers of the quality models.
        model_heads: heads of the quality models.
        task_length: sequence length of the quality tasks.
        batch_size: training batch size of the quality cells.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        threads: intra-op CPU threads (``torch.set_num_threads``) for the efficiency and
            fidelity cells; None = PyTorch's default for this machine. On a busy machine
            fewer threads stall less (a 2-thread step was measured 45x slower than a
            1-thread one under load). Quality cells always train on one CPU thread.
        seed: seed of every input, initialisation and data stream.
        preset_name: which preset the config came from (for the report).
    """

    mechanisms: tuple[str, ...] = ()
    lengths: tuple[int, ...] = (1024, 2048, 4096, 8192)
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    repeats: int = 3
    cell_seconds: float = 1.0
    step_budget_s: float = 10.0
    memory_budget_gb: float = 6.0
    fidelity_length: int = 1024
    fidelity_heads: int = 4
    tasks: tuple[str, ...] = TASKS
    train_steps: int = 120
    eval_batches: int = 4
    model_dim: int = 64
    model_depth: int = 2
    model_heads: int = 4
    task_length: int = 64
    batch_size: int = 16
    device: str = "cpu"
    threads: int | None = None
    seed: int = 0
    preset_name: str = "default"

    def __post_init__(self) -> None:
        for name in ("batch", "heads", "head_dim", "repeats", "fidelity_length", "fidelity_heads"):
            check_positive_int(name, getattr(self, name))
        for name in ("train_steps", "eval_batches", "model_dim", "model_depth", "model_heads"):
            check_positive_int(name, getattr(self, name))
        check_positive_int("task_length", self.task_length)
        check_positive_int("batch_size", self.batch_size)
        if self.threads is not None:
            check_positive_int("threads", self.threads, example=1)
        for name in ("cell_seconds", "step_budget_s", "memory_budget_gb"):
            check_positive_float(name, getattr(self, name))
        if not self.lengths:
            raise ValueError("lengths must name at least one sequence length (e.g. --lengths 1024,2048)")
        for length in self.lengths:
            check_positive_int("lengths", length, example=1024)
        if list(self.lengths) != sorted(set(self.lengths)):
            raise ValueError(f"lengths must be strictly increasing, got {list(self.lengths)}")
        for task in self.tasks:
            check_choice("tasks", task, TASKS)
        if self.model_dim % self.model_heads:
            raise ValueError(f"model_dim must be divisible by model_heads, got {self.model_dim} and {self.model_heads}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")

    @staticmethod
    def preset(name: str, **overrides: Any) -> ArenaConfig:
        """The ``"quick"``, ``"default"`` or ``"full"`` preset with ``overrides`` applied.

        Raises:
            ValueError: unknown preset name or an invalid override.
            TypeError: an override that is not a field.
        """
        check_choice("preset", name, tuple(PRESETS))
        fields = {f.name for f in dataclasses.fields(ArenaConfig)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise TypeError(f"unknown arena setting(s) {', '.join(unknown)}; accepted: {', '.join(sorted(fields))}")
        return ArenaConfig(**{**PRESETS[name], "preset_name": name, **overrides})

    def with_(self, **changes: Any) -> ArenaConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready settings."""
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> ArenaConfig:
        """The config stored by :meth:`as_dict` (e.g. ``results.json``'s ``meta.config``); unknown keys are refused."""
        fields = {f.name for f in dataclasses.fields(ArenaConfig)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"not arena settings: {', '.join(unknown)} (a results.json from another attnkit version?)")
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return ArenaConfig(**values)


PRESETS: dict[str, dict[str, Any]] = {
    "quick": {
        "lengths": (512, 1024, 2048),
        "repeats": 2,
        "cell_seconds": 0.6,
        "step_budget_s": 2.0,
        "fidelity_length": 512,
        "tasks": TASKS,
        "train_steps": 64,  # 80 took the whole run to 174 s of its 180 s budget (measured, quiet machine)
        "eval_batches": 4,
        "task_length": 32,
    },
    "default": {},
    "full": {
        "lengths": (1024, 2048, 4096, 8192, 16384, 32768, 65536),
        "repeats": 5,
        "cell_seconds": 10.0,
        "step_budget_s": 120.0,
        "memory_budget_gb": 16.0,
        "fidelity_length": 2048,
        "train_steps": 600,
        "eval_batches": 8,
        "model_dim": 128,
        "model_depth": 2,
        "task_length": 256,
        "batch_size": 32,
    },
}
