"""Two CPU processes (gloo, a store on 127.0.0.1) stay in sync and match single-process training."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from attnkit.train import TrainConfig, Trainer
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
