"""Two CPU processes (gloo, a store on 127.0.0.1) stay in sync, match single-process training, and stop together."""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from attnkit.train import TrainConfig, Trainer, TrainingInterrupted
from attnkit.train.distributed import init_distributed, shutdown

from .conftest import tiny_config

STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, config: dict, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    context = init_distributed("cpu")
    try:
        trainer = Trainer(TrainConfig.from_dict(config), context=context)
        trainer.fit()
        torch.save({k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, Path(out) / f"rank{rank}.pt")
    finally:
        shutdown(context)


def test_two_processes_stay_in_sync_and_match_one_process(tmp_path: Path) -> None:
    # Variable-length copy sequences: ranks see different token counts, so the loss
    # normalisation over the global batch is exercised too.
    config = tiny_config(tmp_path / "ddp", max_steps=STEPS, eval_every=0, checkpoint_every=STEPS, grad_accum=2)
    mp.spawn(_worker, args=(2, _free_port(), config, str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"replicas diverged at {name}"

    torch.set_num_threads(1)
    single = Trainer(
        TrainConfig.from_dict(tiny_config(tmp_path / "single", max_steps=STEPS, eval_every=0, grad_accum=2))
    )
    single.fit()
    for name, value in single.model.state_dict().items():
        torch.testing.assert_close(rank0[name], value, atol=1e-5, rtol=1e-4, msg=name)

    def losses(run: str) -> list[float]:
        lines = (tmp_path / run / "log.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines]

    assert len(losses("ddp")) == STEPS
    torch.testing.assert_close(torch.tensor(losses("ddp")), torch.tensor(losses("single")), atol=1e-5, rtol=1e-5)


def _interrupted_worker(rank: int, world: int, port: int, config: dict, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    os.environ.pop("TORCHELASTIC_RUN_ID", None)
    torch.set_num_threads(1)
    context = init_distributed("cpu")
    try:
        trainer = Trainer(TrainConfig.from_dict(config), context=context)
        train_step = trainer.train_step

        def step_then_signal(batch: Any) -> dict[str, float]:
            result = train_step(batch)
            if rank == 1 and trainer.step == 2:  # only one process is told to stop
                signal.raise_signal(signal.SIGTERM)
            return result

        trainer.train_step = step_then_signal  # type: ignore[method-assign]
        try:
            trainer.fit()
            stopped_at = None
        except TrainingInterrupted as stop:
            stopped_at = stop.step
        (Path(out) / f"rank{rank}.json").write_text(json.dumps({"stopped_at": stopped_at, "step": trainer.step}))
    finally:
        shutdown(context)


def test_a_signal_to_one_process_stops_every_process_after_the_same_step(tmp_path: Path) -> None:
    config = tiny_config(tmp_path / "ddp", max_steps=STEPS, eval_every=0, checkpoint_every=STEPS)
    mp.spawn(_interrupted_worker, args=(2, _free_port(), config, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == {"stopped_at": 2, "step": 2}
    checkpoints = sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir())
    assert checkpoints == ["step_00000002"]
