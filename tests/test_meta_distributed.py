"""Distributed meta-training (2 gloo processes on CPU) equals single-process training on the same tasks."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from applications.meta_learning.data import SinusoidTasks
from applications.meta_learning.distributed import DistributedContext, shard_range
from applications.meta_learning.trainer import MetaTrainer, TrainConfig

CONFIG = dict(task="sinusoid", algorithm="imaml", inner_solver="gd", inner_lr=0.02, inner_steps=4, lam=2.0,
              cg_steps=3, meta_batch=5, iterations=3, seed=11, use_vmap=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        ctx = DistributedContext(rank, world)
        trainer = MetaTrainer(TrainConfig(**CONFIG), SinusoidTasks(shots=10, queries=10), ctx=ctx)
        history = trainer.train(progress=False)
        torch.save({"theta": {k: v.detach() for k, v in trainer.theta.items()}, "history": history,
                    "grad": {k: v.grad for k, v in trainer.theta.items()}},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_two_process_meta_training_equals_single_process(tmp_path):
    torch.set_num_threads(1)
    single = MetaTrainer(TrainConfig(**CONFIG), SinusoidTasks(shots=10, queries=10))
    single.train(progress=False)

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for k, v in single.theta.items():
            # the last all-reduced meta-gradient (Adam alone would hide a wrong scale) and the parameters
            torch.testing.assert_close(got["grad"][k], v.grad, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(got["theta"][k], v.detach(), rtol=1e-6, atol=1e-7)
        for a, b in zip(got["history"], single.history):
            assert a["meta_loss"] == pytest.approx(b["meta_loss"], rel=1e-6)
            assert a["inner_residual"] == pytest.approx(b["inner_residual"], rel=1e-6)


def test_shards_cover_the_meta_batch_exactly_once():
    for n, world in [(5, 2), (32, 3), (4, 4)]:
        ranges = [shard_range(n, DistributedContext(r, world)) for r in range(world)]
        covered = [i for a, b in ranges for i in range(a, b)]
        assert covered == list(range(n))
    with pytest.raises(ValueError, match="at least one task per process"):
        shard_range(2, DistributedContext(0, 3))
