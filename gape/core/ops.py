"""Attention blocks for callers that combine several of them: context parallelism,
ring attention, chunked prefill with a custom schedule.

A block is one query chunk against one key chunk at a given ``query_offset``
(position of the chunk's query row 0 minus that of its key column 0).
:func:`block_forward` returns the block's output and the row log-sum-exp of its
logits; :func:`merge` combines the blocks of one query chunk into the output
over all their keys; :func:`block_backward` gives a block's five gradients from
the *merged* ``(out, lse)``, so that summing the blocks' gradients gives the
gradients of the whole attention (FlashAttention-2's backward: ``P = exp(S -
lse)``, ``dS = P (dP - rowsum(dO * O))``, both read from the merged rows).

Conventions: ``lse`` is ``[B, Hq, Lq]``, natural log, float32 (float64 for
float64 inputs), ``+inf`` for a row that sees no key in the block (its output
rows are zeros). No autograd: these are the raw kernels.

Example (two key chunks of one sequence, causal)::

    o1, l1 = block_forward(q, k1, v1, lam, pi1, query_offset=p_q - p_k1)
    o2, l2 = block_forward(q, k2, v2, lam, pi2, query_offset=p_q - p_k2)
    out, lse = merge([o1, o2], [l1, l2])
    g1 = block_backward(q, k1, v1, lam, pi1, out, lse, dout, query_offset=p_q - p_k1)
    g2 = block_backward(q, k2, v2, lam, pi2, out, lse, dout, query_offset=p_q - p_k2)
    # dq = g1[0] + g2[0], d lambda = g1[3] + g2[3]; dk1 = g1[1], dk2 = g2[1], ...
"""

from __future__ import annotations

import math

import torch

from . import api

BLOCK_BACKENDS = ("auto", "torch", "triton", "reference")
_LN2 = math.log(2.0)


def block_backend(backend: str, query, distance: str = "log") -> str:
    """The block kernel ``backend`` names for ``query``: ``"auto"`` is Triton where
    :func:`gape.core.api.select` would pick it, else the fused C++ kernel."""
    if backend != "auto":
        return backend
    return "triton" if api.resolve_backend("auto", query, distance) == "triton" else "torch"


def _prepare(query, key, value, query_gate, key_gate, is_causal, scale, distance, query_offset, window_size, backend):
    if backend not in BLOCK_BACKENDS:
        raise ValueError(f"backend must be one of {BLOCK_BACKENDS}, got {backend!r}")
    _, scale = api._validate(query, key, value, query_gate, key_gate, None, is_causal, scale, distance, "auto")
    b, lq, lk = query.shape[0], query.shape[2], key.shape[2]
    offset = api._check_query_offset(query_offset, b, lq, lk, query.device)
    window = api._check_window(window_size, is_causal)
    backend = block_backend(backend, query, distance)
    if backend == "triton":
        reason = api.unsupported_reason("triton", query, distance, None, is_causal)
        if reason is not None:
            raise ValueError(f"backend='triton' cannot serve this block: {reason}")
    if backend == "torch":
        from gape.kernels import attention_cpu

        if not (attention_cpu.supports(query, key, value) and attention_cpu.available()):
            raise ValueError(
                "backend='torch' blocks run the fused C++ CPU kernel, which cannot run here ("
                + (attention_cpu.unavailable_reason() or f"needs CPU tensors, got {query.device}")
                + '); use backend="triton" on CUDA or backend="reference"'
            )
    return scale, offset, window, backend


def block_forward(query, key, value, query_gate, key_gate, *, query_offset=None, is_causal=True, scale=None,
                  distance="log", window_size=(-1, -1), backend="auto"):
    """``(out, lse)`` of one attention block. Shapes and arguments as :func:`gape.attention`.

    Returns ``out`` ``[B, Hq, Lq, Dv]`` in the query dtype and ``lse`` ``[B, Hq, Lq]``
    (see the module docstring).
    """
    scale, offset, window, backend = _prepare(query, key, value, query_gate, key_gate, is_causal, scale, distance,
                                              query_offset, window_size, backend)
    if backend == "torch":
        from . import torch_backend as tb

        pos = tb._kernel_positions(query.shape[0], query.shape[2], key.shape[2], is_causal, offset, window)
        out, lse = tb._kernel_forward(query, key, value, query_gate, key_gate, None, is_causal, scale, distance, True,
                                      pos)
        return out.to(query.dtype), lse
    if backend == "triton":
        from gape.kernels import attention as kattn

        out, lse2 = kattn.block_forward(query, key, value, query_gate, key_gate, offset, window, is_causal, scale,
                                        distance)
        return out, lse2 * _LN2
    return _reference_forward(query, key, value, query_gate, key_gate, is_causal, scale, distance, offset, window)


def block_backward(query, key, value, query_gate, key_gate, out, lse, grad_out, *, query_offset=None, is_causal=True,
                   scale=None, distance="log", window_size=(-1, -1), backend="auto"):
    """``(d query, d key, d value, d query_gate, d key_gate)`` of one block, from the merged
    ``out`` ``[B, Hq, Lq, Dv]``, ``lse`` ``[B, Hq, Lq]`` and ``grad_out`` of its query rows.

    With a single block (``out, lse`` from :func:`block_forward`) these are the gradients
    of :func:`gape.attention`. Gradients come back in the dtypes of the inputs.
    """
    scale, offset, window, backend = _prepare(query, key, value, query_gate, key_gate, is_causal, scale, distance,
                                              query_offset, window_size, backend)
    want = (b, hq, lq, dv) = (query.shape[0], query.shape[1], query.shape[2], value.shape[3])
    for name, t, shape in (("out", out, want), ("grad_out", grad_out, want), ("lse", lse, (b, hq, lq))):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be {list(shape)}, got {got}")
    if backend == "torch":
        from . import torch_backend as tb

        cdt = tb.compute_dtype(query.dtype)
        pos = tb._kernel_positions(b, lq, key.shape[2], is_causal, offset, window)
        grads = tb._kernel_backward(query, key, value, query_gate, key_gate, None, is_causal, scale, distance,
                                    out.to(cdt), lse.to(cdt), grad_out.to(cdt), pos)
    elif backend == "triton":
        from gape.kernels import attention as kattn

        grads = kattn.block_backward(grad_out, query, key, value, query_gate, key_gate, out,
                                     (lse.float() / _LN2).contiguous(), offset, window, is_causal, scale, distance)
    else:
        grads = _reference_backward(query, key, value, query_gate, key_gate, out, lse, grad_out, is_causal, scale,
                                    distance, offset, window)
    return tuple(g.reshape(t.shape).to(t.dtype)
                 for g, t in zip(grads, (query, key, value, query_gate, key_gate)))


def merge(outs, lses):
    """Combine blocks of the same query rows: ``(out, lse)`` over all their keys.

    ``outs``: ``[B, Hq, Lq, Dv]`` each; ``lses``: ``[B, Hq, Lq]`` each (``+inf`` = the
    block saw no key for that row). A row no block saw stays zeros with ``lse = +inf``.
    """
    if len(outs) != len(lses) or not outs:
        raise ValueError(f"merge needs as many outs as lses (at least one), got {len(outs)} and {len(lses)}")
    for i, (o, x) in enumerate(zip(outs, lses)):
        if not isinstance(o, torch.Tensor) or not isinstance(x, torch.Tensor):
            raise TypeError(f"merge: outs[{i}] and lses[{i}] must be tensors, got {type(o).__name__} and {type(x).__name__}")
        if o.dim() != 4 or tuple(x.shape) != tuple(o.shape[:3]):
            raise ValueError(
                f"merge: outs[{i}] must be [B, Hq, Lq, Dv] and lses[{i}] its [B, Hq, Lq], got {tuple(o.shape)} "
                f"and {tuple(x.shape)}"
            )
        if o.shape != outs[0].shape:
            raise ValueError(
                f"merge combines blocks of the same query rows: outs[{i}] has shape {tuple(o.shape)} "
                f"[B, Hq, Lq, Dv], outs[0] {tuple(outs[0].shape)}"
            )
        if o.device != outs[0].device or x.device != outs[0].device:
            raise ValueError(f"merge: outs[{i}] / lses[{i}] are on {o.device} / {x.device}, outs[0] on {outs[0].device}")
    dt = torch.float64 if lses[0].dtype == torch.float64 else torch.float32
    ls = torch.stack([torch.where(torch.isinf(x) & (x > 0), float("-inf"), x.to(dt)) for x in lses])
    total = torch.logsumexp(ls, dim=0)
    empty = torch.isneginf(total)
    w = torch.exp(ls - torch.where(empty, 0.0, total)).nan_to_num_(0.0)  # [n, B, Hq, Lq]
    out = sum(wi[..., None] * o.to(dt) for wi, o in zip(w, outs))
    lse = torch.where(empty, float("inf"), total)
    return out.to(outs[0].dtype), lse


# --------------------------------------------------------------------------- materialized oracle


def _reference_scores(query, key, query_gate, key_gate, is_causal, scale, distance, offset, window):
    from .reference import allowed_mask, gape_bias

    b, hq, lq, _ = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    rep = hq // hkv
    cdt = torch.float64 if query.dtype == torch.float64 else torch.float32
    q, k = query.to(cdt), key.to(cdt).repeat_interleave(rep, dim=1)
    pi = key_gate.to(cdt).repeat_interleave(rep, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    s = s + gape_bias(query_gate.to(cdt), pi, lq, lk, is_causal, distance, cdt, offset)
    mask = allowed_mask(lq, lk, is_causal, None, query.device, offset, window)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s, cdt


def _reference_forward(query, key, value, query_gate, key_gate, is_causal, scale, distance, offset, window):
    s, cdt = _reference_scores(query, key, query_gate, key_gate, is_causal, scale, distance, offset, window)
    rep = query.shape[1] // key.shape[1]
    lse = torch.logsumexp(s, dim=-1)
    empty = torch.isneginf(lse)
    p = torch.exp(s - torch.where(empty, 0.0, lse)[..., None])
    out = torch.matmul(p, value.to(cdt).repeat_interleave(rep, dim=1))
    return out.to(query.dtype), torch.where(empty, float("inf"), lse)


def _reference_backward(query, key, value, query_gate, key_gate, out, lse, grad_out, is_causal, scale, distance,
                        offset, window):
    from .reference import phi, signed_distance

    s, cdt = _reference_scores(query, key, query_gate, key_gate, is_causal, scale, distance, offset, window)
    b, hq, lq, _ = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    rep = hq // hkv
    p = torch.exp(s - lse.to(cdt)[..., None])  # +inf lse: zero weights
    do, o = grad_out.to(cdt), out.to(cdt)
    v = value.to(cdt).repeat_interleave(rep, dim=1)
    k = key.to(cdt).repeat_interleave(rep, dim=1)
    dv = torch.matmul(p.transpose(-1, -2), do)
    ds = p * (torch.matmul(do, v.transpose(-1, -2)) - (do * o).sum(-1, keepdim=True))
    dq = torch.matmul(ds, k) * scale
    dk = torch.matmul(ds.transpose(-1, -2), query.to(cdt)) * scale
    delta = signed_distance(lq, lk, query.device, offset)
    ph = phi(delta.clamp_min(0) if is_causal else delta.abs(), distance, cdt)
    u = ds * ph
    keep = (1 - key_gate.to(cdt)).repeat_interleave(rep, dim=1)
    dlam = -(u * keep[..., None, :]).sum(-1)
    dpi = (u * query_gate.to(cdt)[..., None]).sum(-2)

    def fold(t):  # sum the query heads of each GQA group
        return t.reshape(b, hkv, rep, *t.shape[2:]).sum(2)

    return dq, fold(dk), fold(dv), dlam, fold(dpi)
