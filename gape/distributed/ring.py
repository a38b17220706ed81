"""The ring: each rank sends a tuple of tensors to the next rank and receives
the same tuple from the previous one, with ``torch.distributed.batch_isend_irecv``
(gloo on CPU, NCCL on CUDA), so the transfer runs while the caller computes.

``traffic`` counts the bytes this process has sent through rings (the
benchmark reads it; nothing else depends on it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Traffic:
    bytes_sent: int = 0
    messages: int = 0

    def reset(self) -> None:
        self.bytes_sent = self.messages = 0


traffic = Traffic()


class Pending:
    """Tensors on their way in; :meth:`wait` returns them once they have arrived."""

    def __init__(self, works, received):
        self._works, self._received = works, received

    def wait(self, timeout=None) -> tuple[torch.Tensor, ...]:
        """The received tensors; ``timeout`` (a timedelta): raise RuntimeError when a
        peer has not sent by then (it died or left) instead of waiting forever."""
        from .attention import DEFAULT_TIMEOUT, wait

        for w in self._works:
            wait(w, timeout or DEFAULT_TIMEOUT, "context-parallel ring shift")
        self._works = []
        return self._received


class Ring:
    """Rank ``r`` of ``group`` sends to ``r + 1`` and receives from ``r - 1`` (mod W)."""

    def __init__(self, group=None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.world) if group is not None else (self.rank + 1) % self.world
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.world) if group is not None else (self.rank - 1) % self.world

    def source(self, step: int) -> int:
        """Group rank whose tensors this rank holds after ``step`` shifts."""
        return (self.rank - step) % self.world

    def shift(self, tensors: tuple[torch.Tensor, ...], tag: int = 0) -> Pending:
        """Send ``tensors`` to the next rank, receive the previous rank's into new buffers.

        ``tag`` separates two rings in flight at once (the backward's K/V and
        dK/dV): gloo matches messages by peer and tag.
        """
        received = tuple(torch.empty_like(t) for t in tensors)
        ops = []
        for i, (t, r) in enumerate(zip(tensors, received)):
            ops.append(dist.P2POp(dist.isend, t, self.next, self.group, tag + i))
            ops.append(dist.P2POp(dist.irecv, r, self.prev, self.group, tag + i))
            traffic.bytes_sent += t.numel() * t.element_size()
            traffic.messages += 1
        return Pending(dist.batch_isend_irecv(ops), received)
