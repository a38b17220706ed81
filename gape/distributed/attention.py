"""Context-parallel GAPE attention: ring attention over ``torch.distributed``.

Every rank holds a shard of the sequence (see :mod:`.layout`). The forward
passes K, V and the key gate around the ring (``W - 1`` shifts, each
overlapped with the blocks of the current step); each (query segment, key
segment) block is one call of a block kernel with its ``query_offset``
(:mod:`.blocks`), and the blocks of a row are merged by log-sum-exp. The
backward sends K, V and the key gate around the ring again, and beside them
the running dK, dV and d key_gate of the block each rank holds, which arrive
back at their owner after the last step (``W`` shifts). Every sum runs in a
fixed order (owner first, then along the ring), so results are bitwise
reproducible for a fixed world size.

GAPE's bias depends on global distances and on the gate of remote keys,
which is why a query offset per block, and the key gate travelling with its
keys, are all it needs: nothing ``[L, L]``-sized exists anywhere.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from gape.core import api
from gape.core.reference import DISTANCES
from . import blocks
from .layout import LAYOUTS, check_layout, local_length_error, segments
from .ring import Ring

# --------------------------------------------------------------------------- validation across ranks

_MSG_BYTES = 400
# How long a rank waits in one of this package's collectives (the agreement, a
# ring shift) for its peers. A peer that died or left for other work makes the
# waiting ranks raise after this long instead of waiting for the group's own
# timeout (30 min for gloo) or forever. Every call takes ``timeout=`` to change it.
DEFAULT_TIMEOUT = timedelta(minutes=10)


def as_timeout(timeout) -> timedelta:
    """``timeout`` (seconds, a timedelta, or None for :data:`DEFAULT_TIMEOUT`) as a positive timedelta."""
    if timeout is None:
        return DEFAULT_TIMEOUT
    if isinstance(timeout, timedelta):
        seconds = timeout.total_seconds()
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        seconds = float(timeout)
    else:
        raise TypeError(f"timeout must be seconds (a number) or a datetime.timedelta, got {type(timeout).__name__}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"timeout must be a positive, finite number of seconds, got {timeout!r}")
    return timedelta(seconds=seconds)


def wait(work, timeout: timedelta, what: str) -> None:
    """Wait for a collective; a peer that never joins is a RuntimeError naming ``what``, not a hang."""
    try:
        work.wait(timeout=timeout)
    except RuntimeError as exc:
        raise RuntimeError(
            f"{what}: a peer rank did not join within {timeout.total_seconds():g} s (it died, raised outside "
            f"gape, or is busy elsewhere); the process group is no longer usable. Cause: {exc}"
        ) from exc

_FIELDS = (
    "batch size", "query heads", "key/value heads", "local length", "head dim", "value head dim", "dtype",
    "is_causal", "distance", "layout", "backend", "scale", "group size",
)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_BACKENDS = api.BACKENDS


def _local_description(query, key, value, query_gate, key_gate, is_causal, scale, distance, layout, backend, world,
                       refusal=None):
    """(error message or None, field values) of this rank's call; ``refusal`` is a
    reason the caller found already (it is agreed on like any other)."""
    if refusal is not None:
        return f"ValueError: {refusal}", None
    try:
        _, scale = api._validate(query, key, value, query_gate, key_gate, None, is_causal, scale, distance, "reference")
        check_layout(layout)
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        b, hq, lq, d = query.shape
        lk = key.shape[2]
        if lk != lq:
            raise ValueError(
                f"query and key shards must hold the same positions (self-attention over one sequence): "
                f"query has {lq} rows, key {lk}"
            )
        err = local_length_error(layout, lq)
        if err:
            raise ValueError(err)
        reason = blocks.unsupported_reason(blocks.resolve(backend, query), query)
        if reason:
            raise ValueError(reason)
    except (TypeError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}", None
    values = (
        b, hq, key.shape[1], lq, d, value.shape[3], _DTYPES.index(query.dtype), int(is_causal),
        DISTANCES.index(distance), LAYOUTS.index(layout), _BACKENDS.index(backend),
        struct.unpack("<q", struct.pack("<d", scale))[0], world,
    )
    return None, values


def _describe(field: str, value: int):
    if field == "dtype":
        return str(_DTYPES[value])
    if field == "distance":
        return DISTANCES[value]
    if field == "layout":
        return LAYOUTS[value]
    if field == "backend":
        return _BACKENDS[value]
    if field == "is_causal":
        return bool(value)
    if field == "scale":
        return struct.unpack("<d", struct.pack("<q", value))[0]
    return value


def agree(group, device, error: str | None, values=(), fields=_FIELDS, what="context_parallel_attention",
          timeout=None) -> None:
    """All-gather every rank's call description (``values``, one int per name
    in ``fields``); raise the same error on every rank when a rank refused its
    inputs (``error``) or the ranks disagree. One collective, so a bad input on
    one rank never leaves the others waiting in the ring; a rank that never
    arrives is a RuntimeError after ``timeout``."""
    world = dist.get_world_size(group)
    n = len(fields)
    row = torch.zeros(2 + n + _MSG_BYTES, dtype=torch.int64)
    if error is not None:
        msg = error.encode("utf-8")[:_MSG_BYTES]
        row[0] = 1
        row[1] = len(msg)
        row[2 + n : 2 + n + len(msg)] = torch.tensor(list(msg), dtype=torch.int64)
    elif n:
        row[2 : 2 + n] = torch.tensor(values, dtype=torch.int64)
    row = row.to(device)
    rows = [torch.empty_like(row) for _ in range(world)]
    wait(dist.all_gather(rows, row, group=group, async_op=True), as_timeout(timeout), what)
    table = torch.stack(rows).cpu().tolist()
    bad = [r for r in range(world) if table[r][0]]
    if bad:
        by_message: dict[str, list[int]] = {}
        for r in bad:
            by_message.setdefault(bytes(table[r][2 + n : 2 + n + table[r][1]]).decode("utf-8", "replace"), []).append(r)
        details = "; ".join(
            f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}: {msg}" for msg, rs in by_message.items()
        )
        raise ValueError(f"{what}: refused on {len(bad)} of {world} ranks ({details})")
    for i, field in enumerate(fields):
        column = [table[r][2 + i] for r in range(world)]
        if len(set(column)) != 1:
            per_rank = ", ".join(f"rank {r}: {_describe(field, v)}" for r, v in enumerate(column))
            hint = (
                " (every rank must hold an equal shard: cut the sequence with gape.distributed.shard)"
                if field == "local length"
                else ""
            )
            raise ValueError(f"{what}: the ranks disagree on the {field} ({per_rank}){hint}")


# --------------------------------------------------------------------------- the ring


@dataclass(frozen=True)
class _Plan:
    ring: Ring
    segs: tuple  # segs[r]: the (global_start, local_start, length) blocks of group rank r
    is_causal: bool
    scale: float
    distance: str
    kernel: str  # the block kernel (gape.core.ops backend)
    timeout: timedelta = DEFAULT_TIMEOUT

    def pairs(self, src: int):
        """(query rows, key columns, query_offset) of every block that has an allowed key."""
        for qg, ql, n in self.segs[self.ring.rank]:
            for kg, kl, m in self.segs[src]:
                if self.is_causal and qg + n - 1 < kg:
                    continue  # every key of the block is in the future of every query
                yield slice(ql, ql + n), slice(kl, kl + m), qg - kg


def _merge(out, lse, rows, o, l):
    """Fold a block's (out, lse) into the running rows by log-sum-exp."""
    acc_o, acc_l = out[:, :, rows], lse[:, :, rows]
    new = torch.logaddexp(acc_l, l)
    finite = torch.isfinite(new)
    w_old = torch.where(finite, torch.exp(acc_l - new), 0.0)
    w_new = torch.where(finite, torch.exp(l - new), 0.0)
    acc_o.mul_(w_old[..., None]).add_(o * w_new[..., None])
    acc_l.copy_(new)


def _ring_forward(plan: _Plan, q, k, v, qg, kg):
    b, hq, lq, _ = q.shape
    cdt = blocks.compute_dtype(q.dtype)
    out = torch.zeros(b, hq, lq, v.shape[3], dtype=cdt, device=q.device)
    lse = torch.full((b, hq, lq), float("-inf"), dtype=cdt, device=q.device)
    ring = plan.ring
    kv = (k.contiguous(), v.contiguous(), kg.contiguous())
    for step in range(ring.world):
        pending = ring.shift(kv) if step < ring.world - 1 else None
        kc, vc, kgc = kv
        for rows, cols, off in plan.pairs(ring.source(step)):
            o, l = blocks.forward(
                plan.kernel, q[:, :, rows], kc[:, :, cols], vc[:, :, cols], qg[:, :, rows], kgc[:, :, cols],
                off, plan.is_causal, plan.scale, plan.distance,
            )
            _merge(out, lse, rows, o, l)
        if pending is not None:
            kv = pending.wait(plan.timeout)
    return out, lse


def _ring_backward(plan: _Plan, q, k, v, qg, kg, out, lse, dout):
    cdt = out.dtype
    ring = plan.ring
    dq = torch.zeros(q.shape, dtype=cdt, device=q.device)
    dqg = torch.zeros(qg.shape, dtype=cdt, device=q.device)
    kv = (k.contiguous(), v.contiguous(), kg.contiguous())
    shapes = (k.shape, v.shape, kg.shape)
    grads = None  # in flight: the running (dK, dV, d key_gate) of the block arriving next
    for step in range(ring.world):
        pending = ring.shift(kv) if step < ring.world - 1 else None
        kc, vc, kgc = kv
        mine = tuple(torch.zeros(s, dtype=cdt, device=q.device) for s in shapes)
        for rows, cols, off in plan.pairs(ring.source(step)):
            g = blocks.backward(
                plan.kernel, q[:, :, rows], kc[:, :, cols], vc[:, :, cols], qg[:, :, rows], kgc[:, :, cols],
                out[:, :, rows], lse[:, :, rows], dout[:, :, rows], off, plan.is_causal, plan.scale, plan.distance,
            )
            dq[:, :, rows] += g[0]
            dqg[:, :, rows] += g[3]
            mine[0][:, :, cols] += g[1]
            mine[1][:, :, cols] += g[2]
            mine[2][:, :, cols] += g[4]
        if grads is not None:
            # the running sum (owner first, then along the ring) plus this rank's part; a + m == m + a
            # exactly, so adding in place into the received buffers keeps the order
            mine = tuple(a.add_(m) for a, m in zip(grads.wait(plan.timeout), mine))
        if ring.world == 1:
            dkv = mine
            break
        grads = ring.shift(mine, tag=8)  # the last shift brings each block's sum home
        if pending is not None:
            kv = pending.wait(plan.timeout)
    else:
        dkv = grads.wait(plan.timeout)
    return dq, dkv[0], dkv[1], dqg, dkv[2]


class _ContextParallelAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, query_gate, key_gate, plan):
        out, lse = _ring_forward(plan, query, key, value, query_gate, key_gate)
        ctx.save_for_backward(query, key, value, query_gate, key_gate, out, lse)
        ctx.plan = plan
        return out.to(query.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        query, key, value, query_gate, key_gate, out, lse = ctx.saved_tensors
        dq, dk, dv, dqg, dkg = _ring_backward(ctx.plan, query, key, value, query_gate, key_gate, out, lse, grad_out)
        needs = ctx.needs_input_grad
        grads = [dq, dk, dv, dqg, dkg]
        like = [query, key, value, query_gate, key_gate]
        return (*[g.to(t.dtype) if n else None for g, t, n in zip(grads, like, needs)], None)


def context_parallel_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_gate: torch.Tensor,
    key_gate: torch.Tensor,
    *,
    group=None,
    is_causal: bool = True,
    scale: float | None = None,
    distance: str = "log",
    layout: str = "zigzag",
    backend: str = "auto",
    timeout: float | timedelta | None = None,
) -> torch.Tensor:
    """GAPE attention over a sequence split across the ranks of ``group``.

    Equal to :func:`gape.attention` on the full sequence (self-attention,
    ``Lq == Lk``), returned as this rank's shard. Call it on every rank of
    ``group`` with that rank's shards, cut by :func:`gape.distributed.shard`
    with the same ``layout``.

    Args:
        query: ``[B, Hq, L_local, D]`` post-RoPE queries of this rank's positions.
        key: ``[B, Hkv, L_local, D]``; value ``[B, Hkv, L_local, Dv]``.
        query_gate: ``[B, Hq, L_local]`` (lambda >= 0); key_gate ``[B, Hkv, L_local]`` (pi in [0, 1]).
        group: the process group (default: the whole world). Its ranks hold
            the shards in rank order.
        is_causal, scale, distance: as in :func:`gape.attention`; distances
            are global (``pos_q - pos_k`` over the whole sequence).
        layout: ``"zigzag"`` (``2W`` blocks, rank ``r`` holds ``r`` and
            ``2W - 1 - r``: balanced causal work; ``L_local`` must be even) or
            ``"contiguous"`` (rank ``r`` holds block ``r``).
        backend: the block kernel: ``"auto"`` (the fused C++ kernel on the
            CPU, Triton on CUDA), ``"torch"``, ``"triton"`` or ``"reference"``
            (materialized, float64-capable; for checks). ``"sdpa"`` is refused.
        timeout: seconds (or a ``timedelta``) a rank waits for its peers in
            the agreement and in each ring shift before raising RuntimeError
            (default :data:`DEFAULT_TIMEOUT`, 10 minutes): a dead peer is an
            error, not a wait.

    Every rank checks its inputs and the ranks compare shapes, dtype and
    settings in one all-gather before the ring starts: an invalid input or a
    disagreement (e.g. shards of different lengths) raises the same
    ValueError on every rank instead of leaving some ranks waiting.

    Returns:
        ``[B, Hq, L_local, Dv]``, this rank's rows of the output, differentiable
        in all five inputs (the backward is a ring too).

    Example (under ``torchrun --nproc-per-node 2``):
        >>> dist.init_process_group("gloo")
        >>> q_local = gape.distributed.shard(q, dim=2)       # q: the full [B, Hq, L, D], same on every rank
        >>> out_local = context_parallel_attention(q_local, k_local, v_local, lam_local, pi_local)
        >>> out = gape.distributed.unshard(out_local, dim=2)  # == gape.attention(q, k, v, lam, pi)
    """
    return _context_parallel_attention(query, key, value, query_gate, key_gate, group=group, is_causal=is_causal,
                                       scale=scale, distance=distance, layout=layout, backend=backend,
                                       timeout=timeout)


def _context_parallel_attention(query, key, value, query_gate, key_gate, *, group, is_causal, scale, distance, layout,
                                backend, timeout, refusal=None):
    """:func:`context_parallel_attention`; ``refusal``: a reason the caller found to
    refuse this rank's call, raised on every rank through the agreement."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "context_parallel_attention needs torch.distributed: call torch.distributed.init_process_group "
            "(gloo on CPU, nccl on CUDA) on every rank first, or launch with torchrun"
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("context_parallel_attention: this process is not a member of the given group")
    world = dist.get_world_size(group)
    try:
        timeout = as_timeout(timeout)
    except (TypeError, ValueError) as exc:  # refused on every rank through the agreement, not on this one alone
        refusal, timeout = refusal or str(exc), DEFAULT_TIMEOUT
    error, values = _local_description(
        query, key, value, query_gate, key_gate, is_causal, scale, distance, layout, backend, world, refusal
    )
    device = query.device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    agree(group, device, error, values, timeout=timeout)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    local = query.shape[2]
    plan = _Plan(
        ring=Ring(group),
        segs=tuple(segments(layout, world, r, local) for r in range(world)),
        is_causal=is_causal, scale=scale, distance=distance, kernel=blocks.resolve(backend, query), timeout=timeout,
    )
    return _ContextParallelAttention.apply(query, key, value, query_gate, key_gate, plan)
