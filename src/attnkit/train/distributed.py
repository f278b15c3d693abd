"""Multi-process training through ``torchrun`` (gloo on CPU, nccl on GPU).

Every process builds the same global batch from the same seeded stream and keeps its own
rows (``rank::world_size``), so no sampler state has to be exchanged and a resumed or
re-sharded run sees exactly the data of a single-process run with the same global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands.

    Attributes:
        rank: global rank (0 writes logs and checkpoints).
        world_size: number of processes.
        device: this process's device.
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """True on the process that writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True when more than one process trains."""
        return self.world_size > 1


def resolve_device(preference: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` without a GPU is an error."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but no CUDA device is available (use device='auto' or 'cpu')")
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


def init_distributed(device_preference: str = "auto") -> DistributedContext:
    """Join the process group that ``torchrun`` (or a test's launcher) describes in the environment.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; with
    no ``WORLD_SIZE`` or ``WORLD_SIZE=1`` this is a single-process run.
    """
    device = resolve_device(device_preference)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistributedContext(device=device)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return DistributedContext(rank=rank, world_size=world, device=device)


def all_reduce_sum(value: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """Sum ``value`` over processes (a no-op in a single process)."""
    if context.enabled:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier(context: DistributedContext) -> None:
    """Wait for every process (a no-op in a single process)."""
    if context.enabled:
        dist.barrier()


def shutdown(context: DistributedContext) -> None:
    """Leave the process group."""
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()
