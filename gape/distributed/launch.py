"""Processes launched by ``torchrun`` for data-parallel jobs (``gape niah``):
each process runs its own model on its share of the work and the processes
meet only at a barrier at the end.

``torchrun --nproc-per-node N`` sets ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT``; without them there is one process and
nothing is initialized.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

# a rank done early waits this long at the final barrier for the slowest one
BARRIER_TIMEOUT = timedelta(hours=72)


@dataclass(frozen=True)
class Processes:
    rank: int
    world_size: int

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def mine(self, index: int) -> bool:
        """Work item ``index`` of a fixed plan belongs to this rank (round robin,
        so the assignment never depends on what is already done)."""
        return index % self.world_size == self.rank


def from_env() -> tuple[int, int]:
    """``(rank, world_size)`` from torchrun's environment (``(0, 1)`` without it)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError as exc:
        raise ValueError(f"RANK / WORLD_SIZE must be integers (as torchrun sets them): {exc}") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is not a rank of WORLD_SIZE={world}")
    return rank, world


@contextlib.contextmanager
def data_parallel():
    """The :class:`Processes` of this job; under torchrun a gloo group for the
    barrier is created (and destroyed on exit) unless one exists already."""
    rank, world = from_env()
    created = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
        created = True
    if world > 1 and (dist.get_rank(), dist.get_world_size()) != (rank, world):
        raise ValueError(
            f"the process group (rank {dist.get_rank()} of {dist.get_world_size()}) does not match "
            f"RANK={rank}, WORLD_SIZE={world}"
        )
    try:
        yield Processes(rank, world)
    finally:
        if created:
            dist.destroy_process_group()
