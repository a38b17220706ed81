"""Per-block attention for the ring: one query segment against one key segment
whose positions are not bottom-right aligned.

A block is given by ``query_offset`` = (global position of query row 0) minus
(global position of key column 0): query ``i`` and key ``j`` are at distance
``delta = i + query_offset - j``; causal masks ``delta < 0``. Each block kernel
provides

    forward(q, k, v, qg, kg, query_offset, is_causal, scale, distance)
        -> (out, lse)     out [B, Hq, Lq, Dv], lse [B, Hq, Lq] (natural log;
                          -inf for a row with no allowed key), both in the
                          compute dtype (float32, float64 for float64 inputs)
    backward(q, k, v, qg, kg, out, lse, dout, query_offset, is_causal, scale, distance)
        -> (dq, dk, dv, d query_gate, d key_gate)   in the compute dtype

where ``out`` and ``lse`` in the backward are the *merged* output and
log-sum-exp of the whole row (over every block), so that
``P = exp(s - lse)`` is the block's slice of the row's softmax and
``rowsum(dO * O)`` is the row's; the gradients of all blocks then add up.

``reference`` materializes the scores (any dtype, float64 too; the oracle).
``torch`` runs the fused C++ CPU kernels of :mod:`gape.kernels.attention_cpu`.
"""

from __future__ import annotations

import torch

from ..reference import phi as _phi


def _cdt(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _signed_delta(lq: int, lk: int, query_offset: int, device) -> torch.Tensor:
    i = torch.arange(lq, device=device, dtype=torch.int64)
    j = torch.arange(lk, device=device, dtype=torch.int64)
    return i[:, None] + query_offset - j[None, :]


# --------------------------------------------------------------------------- reference


def _ref_scores(q, k, qg, kg, query_offset, is_causal, scale, distance):
    cdt = _cdt(q.dtype)
    rep = q.shape[1] // k.shape[1]
    kx = k.to(cdt).repeat_interleave(rep, 1)
    keep = (1 - kg.to(cdt)).repeat_interleave(rep, 1)
    delta = _signed_delta(q.shape[2], k.shape[2], query_offset, q.device)
    ph = _phi(delta.clamp_min(0) if is_causal else delta.abs(), distance, cdt)
    s = scale * (q.to(cdt) @ kx.transpose(-1, -2)) - qg.to(cdt)[..., :, None] * keep[..., None, :] * ph
    if is_causal:
        s = s.masked_fill(delta < 0, float("-inf"))
    return s, kx, keep, ph, rep


def reference_forward(q, k, v, qg, kg, query_offset, is_causal, scale, distance):
    s, _, _, _, rep = _ref_scores(q, k, qg, kg, query_offset, is_causal, scale, distance)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).nan_to_num_(0.0)  # an all-masked row: zeros
    out = p @ v.to(s.dtype).repeat_interleave(rep, 1)
    return out, lse


def reference_backward(q, k, v, qg, kg, out, lse, dout, query_offset, is_causal, scale, distance):
    s, kx, keep, ph, rep = _ref_scores(q, k, qg, kg, query_offset, is_causal, scale, distance)
    cdt = s.dtype
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    lse = lse.to(cdt).masked_fill(torch.isneginf(lse), float("inf"))  # a row with no key: P = 0
    p = torch.exp(s - lse[..., None])
    do = dout.to(cdt)
    vx = v.to(cdt).repeat_interleave(rep, 1)
    dp = do @ vx.transpose(-1, -2)
    ds = p * (dp - (do * out.to(cdt)).sum(-1, keepdim=True))
    dq = scale * (ds @ kx)
    group = lambda t: t.view(b, hkv, rep, *t.shape[2:]).sum(2)  # noqa: E731  (sum over a GQA group)
    dk = group(scale * (ds.transpose(-1, -2) @ q.to(cdt)))
    dv = group(p.transpose(-1, -2) @ do)
    u = ds * ph
    dqg = -(u * keep[..., None, :]).sum(-1)
    dkg = group((u * qg.to(cdt)[..., :, None]).sum(-2))
    return dq, dk, dv, dqg, dkg


# --------------------------------------------------------------------------- fused C++ (CPU)


def _cpu_phi_table(lq: int, lk: int, query_offset: int, is_causal: bool, distance: str, dtype, device):
    """The kernel reads ``phi(delta(i, j))`` at ``phi_reversed[Lq - 1 - i + j]``,
    so ``t = Lq - 1 - i + j`` holds ``phi`` of ``delta = query_offset + Lq - 1 - t``."""
    delta = query_offset + lq - 1 - torch.arange(lq + lk - 1, device=device, dtype=torch.int64)
    return _phi(delta.clamp_min(0) if is_causal else delta.abs(), distance, dtype)


def _cpu_causal_flag(lq: int, lk: int, query_offset: int, is_causal: bool) -> bool:
    """The kernel's causal rule is bottom-right (``j <= i + Lk - Lq``); a block
    is served when that is its rule or when no key of it is masked."""
    if not is_causal or query_offset - (lk - 1) >= 0:
        return False  # every delta >= 0: nothing masked
    if query_offset == lk - lq:
        return True
    raise NotImplementedError(
        f"the C++ block kernel without query_offset serves fully visible or bottom-right causal blocks, "
        f"not Lq={lq}, Lk={lk}, query_offset={query_offset}"
    )


def cpu_forward(q, k, v, qg, kg, query_offset, is_causal, scale, distance):
    from ..kernels import attention_cpu

    cdt = _cdt(q.dtype)
    lq, lk = q.shape[2], k.shape[2]
    causal = _cpu_causal_flag(lq, lk, query_offset, is_causal)
    table = _cpu_phi_table(lq, lk, query_offset, is_causal, distance, cdt, q.device)
    out, lse = attention_cpu.attention_forward(
        q.to(cdt), k.to(cdt), v.to(cdt), qg, 1 - kg.to(cdt), table, None, causal, scale, return_lse=True
    )
    return out, lse.masked_fill_(torch.isposinf(lse), float("-inf"))  # the kernel marks empty rows +inf


def cpu_backward(q, k, v, qg, kg, out, lse, dout, query_offset, is_causal, scale, distance):
    from ..kernels import attention_cpu

    cdt = _cdt(q.dtype)
    lq, lk = q.shape[2], k.shape[2]
    causal = _cpu_causal_flag(lq, lk, query_offset, is_causal)
    table = _cpu_phi_table(lq, lk, query_offset, is_causal, distance, cdt, q.device)
    lse = lse.to(cdt).masked_fill(torch.isneginf(lse), float("inf"))
    dq, dk, dv, dqg, dkeep = attention_cpu.attention_backward(
        q.to(cdt), k.to(cdt), v.to(cdt), qg, 1 - kg.to(cdt), table, None, causal, scale, out.to(cdt), lse, dout
    )
    return dq, dk, dv, dqg, dkeep.neg_()


# --------------------------------------------------------------------------- registry

# backend -> (forward, backward)
KERNELS = {
    "reference": (reference_forward, reference_backward),
    "torch": (cpu_forward, cpu_backward),
}
WITHOUT_OFFSET = {
    "sdpa": "its rank-2 channel trick has no row log-sum-exp to merge blocks with",
}


def resolve(backend: str, query: torch.Tensor) -> str:
    """The block kernel ``backend`` names for ``query`` (``auto``: the fused kernel of its device)."""
    if backend == "auto":
        return "triton" if query.device.type == "cuda" and query.dtype != torch.float64 else "torch"
    return backend


def unsupported_reason(name: str, query: torch.Tensor) -> str | None:
    """Why block kernel ``name`` cannot serve ``query`` (None when it can)."""
    if name in WITHOUT_OFFSET:
        return (
            f"backend={name!r} has no query_offset block kernel ({WITHOUT_OFFSET[name]}); context parallelism "
            f"needs one of {tuple(KERNELS)}"
        )
    if name not in KERNELS:
        return f"backend={name!r} has no context-parallel block kernel; choose one of {('auto',) + tuple(KERNELS)}"
    if name == "torch":
        if query.device.type != "cpu":
            return f"backend='torch' (the C++ kernel) needs CPU tensors, got {query.device}"
        from ..kernels import attention_cpu

        reason = attention_cpu.unavailable_reason()
        if reason is not None:
            return f"the fused C++ CPU kernel is unavailable ({reason}); use backend='reference' for small checks"
    return None
