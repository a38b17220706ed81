"""How a sequence is cut into per-rank shards, and ``shard`` / ``unshard``.

A layout maps rank ``r`` of a group of ``W`` ranks to the *segments* of the
global sequence it holds: ``(global_start, local_start, length)`` triples,
in local order. Everything else (the ring's block pairs, the query offsets,
the position ids a model must be given) is derived from these segments, so
the layout is decided here and nowhere else.

- ``"contiguous"``: rank ``r`` holds block ``r`` of ``W`` equal blocks.
- ``"zigzag"``: the sequence is cut into ``2W`` equal blocks and rank ``r``
  holds blocks ``r`` and ``2W - 1 - r``. Under causal masking every rank then
  does the same work (a contiguous split leaves the last rank with ``W``
  blocks of keys and the first with one).
"""

from __future__ import annotations

import torch

LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def blocks_per_rank(layout: str) -> int:
    return 2 if check_layout(layout) == "zigzag" else 1


def local_length_error(layout: str, local_length: int) -> str | None:
    """Why ``local_length`` cannot be a shard in ``layout`` (None when it can)."""
    if local_length < 1:
        return f"each rank's shard must hold at least one position, got local length {local_length}"
    n = blocks_per_rank(layout)
    if local_length % n:
        return (
            f"layout={layout!r} needs a local length divisible by {n} (each rank holds {n} equal blocks), "
            f"got {local_length}; pad the sequence to a multiple of {2 * n} x world size, or use layout='contiguous'"
        )
    return None


def segments(layout: str, world_size: int, rank: int, local_length: int) -> tuple[tuple[int, int, int], ...]:
    """``(global_start, local_start, length)`` of each block rank ``rank`` holds."""
    err = local_length_error(layout, local_length)
    if err:
        raise ValueError(err)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a group of {world_size}")
    if layout == "contiguous":
        return ((rank * local_length, 0, local_length),)
    c = local_length // 2
    first, second = (rank * c, 0, c), ((2 * world_size - 1 - rank) * c, c, c)
    if second[0] == first[0] + c:  # one rank: the two blocks are adjacent, one segment
        return ((first[0], 0, local_length),)
    return (first, second)


def global_positions(layout: str, world_size: int, rank: int, local_length: int, device=None) -> torch.Tensor:
    """Global positions (int64 ``[local_length]``) of the rows rank ``rank`` holds."""
    parts = [torch.arange(g, g + n, device=device) for g, _, n in segments(layout, world_size, rank, local_length)]
    return torch.cat(parts)


def _group_rank_size(group) -> tuple[int, int]:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialized: call torch.distributed.init_process_group "
            "(gloo on CPU, nccl on CUDA) first, or launch with torchrun"
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the given process group")
    return rank, dist.get_world_size(group)


def shard_along(x: torch.Tensor, dim: int, world_size: int, rank: int, layout: str = "zigzag") -> torch.Tensor:
    """Rank ``rank``'s shard of the full tensor ``x`` along ``dim`` (no communication)."""
    check_layout(layout)
    n = x.shape[dim]
    parts = world_size * blocks_per_rank(layout)
    if n % parts:
        raise ValueError(
            f"shard: length {n} along dim {dim} is not divisible by {parts} "
            f"({blocks_per_rank(layout)} block(s) per rank x {world_size} ranks, layout={layout!r}); pad it first"
        )
    local = n // world_size
    return torch.cat([x.narrow(dim, g, m) for g, _, m in segments(layout, world_size, rank, local)], dim=dim)


def unshard_from(shards: list[torch.Tensor], dim: int, layout: str = "zigzag") -> torch.Tensor:
    """The full tensor from every rank's shard (``shards[r]`` is rank ``r``'s)."""
    world = len(shards)
    local = shards[0].shape[dim]
    if any(s.shape[dim] != local for s in shards):
        raise ValueError(f"unshard: shards differ in length along dim {dim}: {[s.shape[dim] for s in shards]}")
    pieces: dict[int, torch.Tensor] = {}
    for r, s in enumerate(shards):
        for g, lo, m in segments(layout, world, r, local):
            pieces[g] = s.narrow(dim, lo, m)
    return torch.cat([pieces[g] for g in sorted(pieces)], dim=dim)


def shard(x: torch.Tensor, dim: int, group=None, layout: str = "zigzag") -> torch.Tensor:
    """This rank's shard of ``x`` (the full tensor, present on every rank) along ``dim``.

    Example (every rank, after ``init_process_group``):
        >>> ids = torch.arange(4096)[None]                  # [B, L], same on every rank
        >>> local_ids = shard(ids, 1)                       # [B, L / W]
        >>> local_pos = shard(torch.arange(4096)[None], 1)  # position_ids for the model
    """
    rank, world = _group_rank_size(group)
    return shard_along(x, dim, world, rank, layout)


def unshard(x: torch.Tensor, dim: int, group=None, layout: str = "zigzag") -> torch.Tensor:
    """The full tensor along ``dim`` from every rank's shard ``x`` (an all-gather; not differentiable)."""
    import torch.distributed as dist

    rank, world = _group_rank_size(group)
    x = x.contiguous()
    sizes = torch.tensor([x.shape[dim]], dtype=torch.int64, device=x.device)
    all_sizes = [torch.empty_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes, group=group)
    lengths = [int(s) for s in all_sizes]
    if len(set(lengths)) != 1:
        raise ValueError(f"unshard: shards differ in length along dim {dim} across ranks: {lengths}")
    gathered = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(gathered, x, group=group)
    return unshard_from(gathered, dim, layout)
