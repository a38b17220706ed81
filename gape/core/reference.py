"""Materialized GAPE attention: the oracle every backend is tested against.

This is ``docs/maths.md`` written as directly as possible. It builds the
full ``[B, Hq, Lq, Lk]`` score matrix, so it is only for tests, tiny shapes and
float64 checks. Autograd gives every gradient (query, key, value, both gates).
"""

from __future__ import annotations

import math

import torch

DISTANCES = ("log", "linear")


def positions(lq: int, lk: int, device, query_offset=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cache-slot positions: bottom-right alignment (FlashAttention-2) by default.

    Query row ``i`` sits at ``i + query_offset`` and key column ``j`` at ``j``;
    ``query_offset=None`` means ``lk - lq``, so a decode step (``lq == 1``) sits
    after the whole cache. An int gives ``[lq]``; a ``[B]`` integer tensor gives
    ``pos_q`` as ``[B, lq]``.
    """
    pos_k = torch.arange(lk, device=device, dtype=torch.int64)
    rows = torch.arange(lq, device=device, dtype=torch.int64)
    if query_offset is None:
        query_offset = lk - lq
    if isinstance(query_offset, torch.Tensor):
        return rows[None, :] + query_offset.to(device=device, dtype=torch.int64).reshape(-1, 1), pos_k
    return rows + int(query_offset), pos_k


def signed_distance(lq: int, lk: int, device, query_offset=None, rows=None) -> torch.Tensor:
    """``pos_q - pos_k`` as int64 ``[lq, lk]`` (``[B, 1, lq, lk]`` for per-batch
    offsets), exact at any cache position; only the query rows ``rows`` (an index
    tensor) when given."""
    pos_q, pos_k = positions(lq, lk, device, query_offset)
    if rows is not None:
        pos_q = pos_q[..., rows]
    if pos_q.dim() == 2:
        return (pos_q[:, :, None] - pos_k)[:, None]
    return pos_q[:, None] - pos_k[None, :]


def causal_mask(lq: int, lk: int, device) -> torch.Tensor:
    """Bool ``[lq, lk]``: ``pos_q >= pos_k`` with bottom-right alignment (the causal rule)."""
    return signed_distance(lq, lk, device) >= 0


def delta_range(is_causal: bool, window=None) -> tuple[int | None, int | None]:
    """The signed distances ``pos_q - pos_k`` a query may attend, ``[lo, hi]`` (None = unbounded).

    ``window = (left, right)`` in FlashAttention's convention (``-1`` = unbounded):
    keys from ``left`` positions before the query to ``right`` after it. Causal
    attention allows ``delta >= 0`` (a ``right`` window changes nothing then).
    """
    left, right = (-1, -1) if window is None else window
    lo = 0 if is_causal else (-right if right >= 0 else None)
    hi = left if left >= 0 else None
    return lo, hi


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


def allowed_mask(lq: int, lk: int, is_causal: bool, attn_mask, device, query_offset=None, window=None):
    """Boolean ``[.., Lq, Lk]`` of keys a query may attend to (None = all)."""
    lo, hi = delta_range(is_causal, window)
    mask = None
    if lo is not None or hi is not None:
        delta = signed_distance(lq, lk, device, query_offset)
        if lo is not None:
            mask = delta >= lo
        if hi is not None:
            mask = (delta <= hi) if mask is None else (mask & (delta <= hi))
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
    query_offset=None,
    rows=None,
) -> torch.Tensor:
    """``b[b, h, m, n] = -lambda_m * (1 - pi_n) * phi(delta_mn)`` as ``[B, Hq, Lq, Lk]``
    (``[B, Hq, R, Lk]`` for the query rows ``rows``, whose ``query_gate`` is ``[B, Hq, R]``).

    ``key_gate`` must already be expanded to the query heads. The distance is
    formed from integer positions and only then converted to ``dtype``, so it
    stays exact at cache positions around 1e6 and beyond.
    """
    delta = signed_distance(lq, lk, query_gate.device, query_offset, rows)
    delta = delta.clamp_min(0) if is_causal else delta.abs()
    ph = phi(delta, distance, dtype)
    lam = query_gate.to(dtype)[..., :, None]
    keep = (1 - key_gate.to(dtype))[..., None, :]
    return -(lam * keep) * ph


def supports(call) -> str | None:
    """The reference serves every validated call (see gape.core.api.select)."""
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
    query_offset=None,
    window=None,
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Plain GAPE attention. Shapes and ``query_offset`` as :func:`gape.attention`;
    ``window`` is its ``window_size`` (None = unbounded).

    ``softcap``: the content logit is ``softcap * tanh(scale <q, k> / softcap)``
    and the GAPE bias is added after the cap (docs/maths.md). ``sinks [Hq]``:
    one learned logit per query head, in the softmax denominator only (no value).

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
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    bias = gape_bias(query_gate, pi, lq, lk, is_causal, distance, bias_dtype, query_offset)
    scores = (scores.to(bias_dtype) + bias).to(cdt)
    mask = allowed_mask(lq, lk, is_causal, attn_mask, query.device, query_offset, window)
    if mask is not None:
        mask = mask.expand(b, hq, lq, lk)
        scores = scores.masked_fill(~mask, float("-inf"))
        empty = ~mask.any(dim=-1, keepdim=True)
        # A row with no allowed key gives zeros (and zero gradients), not NaN.
        scores = scores.masked_fill(empty, 0.0)
    if sinks is not None:
        # the sink is one more logit in each row's denominator; its column is dropped after
        sink = sinks.to(cdt).reshape(1, hq, 1, 1).expand(b, hq, lq, 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :lk]
    else:
        probs = torch.softmax(scores, dim=-1)
    if mask is not None:
        probs = probs.masked_fill(empty, 0.0)
    out = torch.matmul(probs, v)
    return out.to(out_dtype)


def reference_backend(query, key, value, query_gate, key_gate, attn_mask=None, is_causal=True, scale=None,
                      distance="log", **positions) -> torch.Tensor:
    """``backend="reference"`` of :func:`gape.attention`: :func:`reference_attention` computed
    in float32 (float64 for float64 inputs) and cast back, so a half-precision call gives the
    answer, not float16's overflow: a bias or sink past 65504 would make a whole row -inf (NaN)."""
    return reference_attention(query, key, value, query_gate, key_gate, attn_mask, is_causal, scale, distance,
                               upcast=True, **positions)


def reference_attention_varlen(
    query, key, value, query_gate, key_gate, cu_seqlens_q, cu_seqlens_k,
    is_causal: bool = True, scale: float | None = None, distance: str = "log", window=None, upcast: bool = False,
    sinks=None, softcap=None,
) -> torch.Tensor:
    """Packed sequences (FlashAttention's varlen layout) one at a time: query
    ``[Tq, Hq, D]``, key/value ``[Tk, Hkv, D]``, gates ``[Tq, Hq]`` / ``[Tk, Hkv]``;
    each sequence bottom-right aligned on its own. Returns ``[Tq, Hq, Dv]``."""
    outs = []
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for s in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[s], cq[s + 1], ck[s], ck[s + 1]
        if q1 == q0:
            continue
        if k1 == k0:  # no key at all: zero rows
            outs.append(query.new_zeros(q1 - q0, query.shape[1], value.shape[-1]))
            continue
        o = reference_attention(
            query[q0:q1].transpose(0, 1)[None], key[k0:k1].transpose(0, 1)[None],
            value[k0:k1].transpose(0, 1)[None], query_gate[q0:q1].t()[None], key_gate[k0:k1].t()[None],
            None, is_causal, scale, distance, upcast=upcast, window=window, sinks=sinks, softcap=softcap,
        )
        outs.append(o[0].transpose(0, 1))
    out = torch.cat(outs, dim=0) if outs else query.new_zeros(0, query.shape[1], value.shape[-1])
    return tie_to_inputs(out, query, key, value, query_gate, key_gate, sinks)


def tie_to_inputs(out: torch.Tensor, *inputs) -> torch.Tensor:
    """``out`` unchanged, with a zero gradient to the inputs when nothing in it depends on them
    (no query row, or none with a key: zeros by definition), so backward runs as it does
    through the kernels instead of raising "does not require grad"."""
    tied = [t for t in inputs if t is not None and t.requires_grad]
    if out.requires_grad or not tied or not torch.is_grad_enabled():
        return out
    never = torch.zeros((), dtype=torch.bool, device=out.device)
    # where() keeps an inf or NaN input out of the value and of the gradient (0 * inf would not)
    anchor = sum(torch.where(never, t.sum(), 0) for t in tied)
    return out + anchor.to(out.dtype)


def reference_attention_varlen_backend(query, key, value, query_gate, key_gate, cu_seqlens_q, cu_seqlens_k,
                                       max_seqlen_q, max_seqlen_k, is_causal, scale, distance, window, sinks=None,
                                       softcap=None):
    """``backend="reference"`` of :func:`gape.attention_varlen`."""
    return reference_attention_varlen(query, key, value, query_gate, key_gate, cu_seqlens_q, cu_seqlens_k,
                                      is_causal, scale, distance, window, upcast=True, sinks=sinks, softcap=softcap)
