"""Data-parallel meta-training with ``torch.distributed`` (launched by ``torchrun``).

Every rank samples the same full meta-batch (identical task-sampler generators), keeps its
contiguous share of the tasks, computes ``sum(query losses of its tasks) / meta_batch``, and
the gradients are summed over ranks with ``all_reduce``: the result is exactly the
single-process mean meta-gradient over the whole meta-batch. Backend: NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterable

import torch
import torch.distributed as dist

__all__ = ["DistributedContext", "init_distributed", "shard_range", "all_reduce_sum_", "broadcast_", "shutdown"]


@dataclasses.dataclass(frozen=True)
class DistributedContext:
    """This process's place in the job (``world_size == 1``: not distributed).

    Examples
    --------
    >>> DistributedContext().is_main
    True
    """

    rank: int = 0
    world_size: int = 1

    @property
    def active(self) -> bool:
        """Whether a process group with more than one process is running."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files, checkpoints and the progress bar."""
        return self.rank == 0


def init_distributed(device: torch.device) -> DistributedContext:
    """Join the process group described by torchrun's environment (``WORLD_SIZE``, ``RANK``, ...).

    Without those variables (a plain ``python -m`` run) nothing is initialized.
    On CUDA each rank uses the GPU ``LOCAL_RANK``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    if dist.is_initialized():
        return DistributedContext(dist.get_rank(), dist.get_world_size())
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return DistributedContext(dist.get_rank(), dist.get_world_size())


def shard_range(n_tasks: int, ctx: DistributedContext) -> tuple[int, int]:
    """``[start, stop)`` of this rank's contiguous share of ``n_tasks`` (sizes differ by at most one).

    Examples
    --------
    >>> [shard_range(10, DistributedContext(r, 3)) for r in range(3)]
    [(0, 4), (4, 7), (7, 10)]
    """
    if n_tasks < ctx.world_size:
        raise ValueError(
            f"meta-batch of {n_tasks} tasks cannot be shared by {ctx.world_size} processes; "
            "use a meta-batch of at least one task per process"
        )
    base, extra = divmod(n_tasks, ctx.world_size)
    start = ctx.rank * base + min(ctx.rank, extra)
    return start, start + base + (1 if ctx.rank < extra else 0)


def all_reduce_sum_(tensors: Iterable[torch.Tensor], ctx: DistributedContext) -> None:
    """Sum ``tensors`` over ranks in place (no-op when not distributed)."""
    if not ctx.active:
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def broadcast_(tensors: Iterable[torch.Tensor], ctx: DistributedContext, src: int = 0) -> None:
    """Copy rank ``src``'s values into every rank's ``tensors`` (no-op when not distributed)."""
    if not ctx.active:
        return
    for t in tensors:
        dist.broadcast(t, src=src)


def shutdown(ctx: DistributedContext) -> None:
    """Leave the process group (no-op when not distributed)."""
    if ctx.active and dist.is_initialized():
        dist.destroy_process_group()
