"""Materialized GAPE attention: the oracle every backend is tested against.

This is ``../shared/GAPE.md`` written as directly as possible. It builds the
full ``[B, Hq, Lq, Lk]`` score matrix, so it is only for tests, tiny shapes and
float64 checks. Autograd gives every gradient (query, key, value, both gates).
"""

from __future__ import annotations

import math

import torch

DISTANCES = ("log", "linear")


def positions(lq: int, lk: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Cache-slot positions with bottom-right alignment (FlashAttention-2).

    Query row ``i`` sits at ``i + lk - lq`` and key column ``j`` at ``j``, so a
    decode step (``lq == 1``) sits after the whole cache.
    """
    pos_q = torch.arange(lq, device=device, dtype=torch.int64) + (lk - lq)
    pos_k = torch.arange(lk, device=device, dtype=torch.int64)
    return pos_q, pos_k


def signed_distance(lq: int, lk: int, device, rows=None) -> torch.Tensor:
    """``pos_q - pos_k`` as int64 ``[lq, lk]`` (exact at any cache position);
    only the query rows ``rows`` (an index tensor) when given."""
    pos_q, pos_k = positions(lq, lk, device)
    if rows is not None:
        pos_q = pos_q[rows]
    return pos_q[:, None] - pos_k[None, :]


def causal_mask(lq: int, lk: int, device) -> torch.Tensor:
    """Bool ``[lq, lk]``: ``pos_q >= pos_k`` with bottom-right alignment (the causal rule)."""
    return signed_distance(lq, lk, device) >= 0


def phi(delta: torch.Tensor, distance: str, dtype=torch.float32) -> torch.Tensor:
    """Distance transform of a non-negative integer distance, computed in ``dtype``.

    ``log1p`` keeps ``phi(0) == 0`` exact and is accurate for small distances.
    """
    d = delta.to(dtype)
    if distance == "log":
        return torch.log1p(d)
    if distance == "linear":
        return d
    raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")


def allowed_mask(lq: int, lk: int, is_causal: bool, attn_mask, device) -> torch.Tensor | None:
    """Boolean ``[.., Lq, Lk]`` of keys a query may attend to (None = all)."""
    mask = None
    if is_causal:
        mask = causal_mask(lq, lk, device)
    if attn_mask is not None:
        mask = attn_mask if mask is None else (attn_mask & mask)
    return mask


def gape_bias(
    query_gate: torch.Tensor,
    key_gate: torch.Tensor,
    lq: int,
    lk: int,
    is_causal: bool,
    distance: str,
    dtype=torch.float32,
    rows=None,
) -> torch.Tensor:
    """``b[b, h, m, n] = -lambda_m * (1 - pi_n) * phi(delta_mn)`` as ``[B, Hq, Lq, Lk]``
    (``[B, Hq, R, Lk]`` for the query rows ``rows``, whose ``query_gate`` is ``[B, Hq, R]``).

    ``key_gate`` must already be expanded to the query heads. The distance is
    formed from integer positions and only then converted to ``dtype``, so it
    stays exact at cache positions around 1e6 and beyond.
    """
    delta = signed_distance(lq, lk, query_gate.device, rows)
    delta = delta.clamp_min(0) if is_causal else delta.abs()
    ph = phi(delta, distance, dtype)
    lam = query_gate.to(dtype)[..., :, None]
    keep = (1 - key_gate.to(dtype))[..., None, :]
    return -(lam * keep) * ph


def supports(call) -> str | None:
    """The reference serves every validated call (see gape.api.select)."""
    return None


def reference_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_gate: torch.Tensor,
    key_gate: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = True,
    scale: float | None = None,
    distance: str = "log",
    upcast: bool = False,
) -> torch.Tensor:
    """Plain GAPE attention. Shapes as :func:`gape.attention`.

    ``upcast=False`` computes scores and softmax in the input dtype (the
    "same-dtype PyTorch reference" whose own error sets kernel tolerances);
    the bias is always formed in at least float32. ``upcast=True`` computes in
    float32 (or float64 for float64 inputs) and casts the result back.
    """
    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    rep = hq // hkv
    out_dtype = query.dtype
    if upcast:
        cdt = torch.float64 if query.dtype == torch.float64 else torch.float32
        query, key, value = query.to(cdt), key.to(cdt), value.to(cdt)
    cdt = query.dtype
    bias_dtype = torch.float64 if cdt == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(d) if scale is None else scale

    k = key.repeat_interleave(rep, dim=1)
    v = value.repeat_interleave(rep, dim=1)
    pi = key_gate.repeat_interleave(rep, dim=1)

    scores = torch.matmul(query, k.transpose(-1, -2)) * scale
    bias = gape_bias(query_gate, pi, lq, lk, is_causal, distance, bias_dtype)
    scores = (scores.to(bias_dtype) + bias).to(cdt)
    mask = allowed_mask(lq, lk, is_causal, attn_mask, query.device)
    if mask is not None:
        mask = mask.expand(b, hq, lq, lk)
        scores = scores.masked_fill(~mask, float("-inf"))
        empty = ~mask.any(dim=-1, keepdim=True)
        # A row with no allowed key gives zeros (and zero gradients), not NaN.
        scores = scores.masked_fill(empty, 0.0)
    probs = torch.softmax(scores, dim=-1)
    if mask is not None:
        probs = probs.masked_fill(empty, 0.0)
    out = torch.matmul(probs, v)
    return out.to(out_dtype)
