"""GAPE through ``F.scaled_dot_product_attention`` on augmented channels.

the SDPA identity, docs/maths.md: with ``distance="linear"`` and causal masking the bias

    b_mn = -lambda_m (1 - pi_n) (pos_q_m - pos_k_n)
         = (-lambda_m t_m) * (1 - pi_n)  +  lambda_m * (1 - pi_n) t'_n

(``t = pos - c`` for any constant ``c``) is a rank-2 bilinear form, so
appending two channels to the queries, ``[-lambda t, lambda]``, and two to the
keys, ``[(1 - pi), (1 - pi) t'] / scale``, makes plain SDPA compute
``scale * q.k + b`` exactly in exact arithmetic. Any SDPA kernel (flash, memory
efficient, math; CPU or CUDA) and its backward then give GAPE with all five
gradients.

Non-causal attention uses ``|pos_q - pos_k|``, which is not bilinear: that
request is refused (:func:`supports`).

Precision limit. The two bias terms grow with ``|t|`` and cancel for nearby
tokens, so their rounding error is about ``eps * lambda * |t|`` instead of
``eps * lambda * delta``. Positions are centred on the newest token
(``c = Lk - 1``), which leaves a decode step without cancellation (its query
side is 0) and
hurts the earliest rows of a long prefill most; docs/kernels.md ("The sdpa backend
and its precision limit") has the errors measured against float64. Float16 and
bfloat16 inputs are computed in float32 (rounded to half precision the
channels themselves would dominate the error) and cast back, so the float32
limits hold for them too. More than ``2**24`` keys (positions no
longer exact in float32) are refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import allowed_mask, positions

MAX_POSITION = 2**24  # float32 holds every integer position up to here exactly


def augment(query, key, query_gate, key_gate, scale: float, center: int, query_offset=None):
    """Queries and keys with the two GAPE channels appended (``D + 2``).

    ``center`` is subtracted from every cache position before it enters a
    channel; the result does not depend on it in exact arithmetic.
    """
    lq, lk = query.shape[2], key.shape[2]
    dt = query.dtype
    # positions as exact integers, shifted, then cast once
    pos_q, _ = positions(lq, lk, query.device, query_offset)  # [Lq] or [B, Lq]
    t_q = (pos_q - center).to(dt)
    if t_q.dim() == 2:
        t_q = t_q[:, None, :]
    t_k = (torch.arange(lk, device=key.device, dtype=torch.int64) - center).to(dt)
    lam = query_gate.to(dt)
    keep = (1 - key_gate.to(dt)) / scale
    q_extra = torch.stack((-lam * t_q, lam), dim=-1)
    k_extra = torch.stack((keep, keep * t_k), dim=-1)
    return torch.cat((query, q_extra), dim=-1), torch.cat((key, k_extra), dim=-1)


def supports(call) -> str | None:
    """Why this backend cannot serve ``call`` (a :class:`gape.core.api.AttentionCall`), None when it can."""
    if call.terms:
        return (f'the "sdpa" backend does not implement {call.terms} (its bias enters '
                'F.scaled_dot_product_attention as extra channels); use backend="torch" or "reference"')
    return _reason(call.distance, call.is_causal)


def _reason(distance: str, is_causal: bool) -> str | None:
    if distance != "linear":
        return 'the "sdpa" backend is exact only for distance="linear" (the SDPA identity, docs/maths.md); use backend="torch" or "triton" for "log"'
    if not is_causal:
        return (
            'the "sdpa" backend needs is_causal=True: the non-causal distance |pos_q - pos_k| is not a bilinear '
            'form (the SDPA identity, docs/maths.md); use backend="torch" or "triton"'
        )
    return None


def sdpa_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_gate: torch.Tensor,
    key_gate: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    distance: str,
    *,
    query_offset=None,
    window=None,
) -> torch.Tensor:
    """GAPE attention via SDPA (linear distance, causal only). Shapes, ``query_offset``
    and ``window`` as :func:`gape.attention`."""
    reason = _reason(distance, is_causal)
    if reason is not None:
        raise ValueError(reason)
    if not scale > 0:
        # the key channels are divided by scale, and PyTorch's CPU SDPA gives NaN for a negative one
        raise ValueError(f'the "sdpa" backend needs scale > 0 (its bias channels are divided by it), got {scale}; '
                         'use backend="torch" or "reference"')
    lq, lk = query.shape[2], key.shape[2]
    span = lk + lq
    if query_offset is not None:
        off = query_offset if isinstance(query_offset, int) else int(query_offset.abs().max())
        span += abs(off)
    if span > MAX_POSITION:
        raise ValueError(
            f'the "sdpa" backend takes positions up to {MAX_POSITION} (exact in float32), got Lq + Lk'
            f'{" + |query_offset|" if query_offset is not None else ""} = {span}; use backend="torch" or "triton"'
        )
    out_dtype = query.dtype
    if out_dtype in (torch.float16, torch.bfloat16):
        # The channels lambda * t grow with the position: rounded to half precision they
        # cost ~0.15 logit error at 2k tokens (float16). Computed in float32 instead.
        query, key, value = query.float(), key.float(), value.float()
    q_aug, k_aug = augment(query, key, query_gate, key_gate, scale, center=lk - 1, query_offset=query_offset)
    # The fused SDPA kernels (CPU flash included) want one head dim for q, k and v,
    # a multiple of 8 on CUDA; zero channels change neither the logits nor the output.
    dv = value.shape[-1]
    width = -(-max(q_aug.shape[-1], dv) // 8) * 8
    q_aug = F.pad(q_aug, (0, width - q_aug.shape[-1]))
    k_aug = F.pad(k_aug, (0, width - k_aug.shape[-1]))
    value = F.pad(value, (0, width - dv))
    gqa = query.shape[1] != key.shape[1]
    empty = None
    if attn_mask is None and lq == lk and query_offset is None and window is None:
        # SDPA's is_causal is top-left aligned, which equals bottom-right when Lq == Lk
        out = F.scaled_dot_product_attention(q_aug, k_aug, value, is_causal=True, scale=scale, enable_gqa=gqa)
        return out[..., :dv].to(out_dtype)
    if not bool(torch.isfinite(query).all() and torch.isfinite(key).all()):
        # SDPA adds the mask to q.k, and -inf + inf is NaN: a hidden non-finite key (or a
        # non-finite query row with no allowed key) would poison rows the reference keeps finite
        raise ValueError('the "sdpa" backend cannot keep a non-finite query or key out of the rows a mask hides '
                         '(SDPA adds the mask to the logits); use backend="torch" or "reference"')
    allowed = allowed_mask(lq, lk, True, attn_mask, query.device, query_offset, window)
    empty = ~allowed.any(dim=-1, keepdim=True)
    if bool(empty.any()):
        # let an empty row attend everywhere (finite softmax, finite gradients), then zero it
        allowed = allowed | empty
    else:
        empty = None
    out = F.scaled_dot_product_attention(q_aug, k_aug, value, attn_mask=allowed, scale=scale, enable_gqa=gqa)
    out = out[..., :dv]
    if empty is not None:
        out = out.masked_fill(empty, 0.0)
    return out.to(out_dtype)
