"""Which boolean attention masks the fused kernel can serve, as per-batch key ranges.

The Triton kernel never reads a mask tensor. It takes, per batch element, one
half-open range of keys ``[key_start[b], key_end[b])`` that every query row may
see, optionally intersected with the bottom-right causal rule. That covers
key padding (left or right), which is what the transformers integration
needs. Any other mask is reported as unsupported so that ``backend="auto"``
falls back to the tiled PyTorch backend.

This module needs only torch, so ``gape.core.api`` can consult it without
importing Triton.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gape.core.reference import allowed_mask


@dataclass(frozen=True)
class KeyRanges:
    """``start``/``end``: int32 ``[B]``; ``causal``: whether the causal rule
    must be applied in the kernel (the mask itself may carry it)."""

    start: torch.Tensor
    end: torch.Tensor
    causal: bool


def _causal(lq: int, lk: int, device, query_offset=None, window=None, is_causal=True) -> torch.Tensor:
    """``[1 or B, lq, lk]``: the keys query row ``i`` (at ``i + query_offset``, None: ``lk - lq``)
    may see under the causal rule (when ``is_causal``) and the window (gape.core.reference.allowed_mask)."""
    allowed = allowed_mask(lq, lk, is_causal, None, device, query_offset, window)
    if allowed is None:
        return torch.ones(1, lq, lk, dtype=torch.bool, device=device)
    return allowed.reshape(-1, lq, lk)


def analyse_mask(attn_mask: torch.Tensor, lq: int, lk: int | None, is_causal: bool, query_offset=None,
             window=None) -> KeyRanges | str:
    """Key ranges equivalent to ``attn_mask`` (AND the causal rule and window), or the
    reason string when the mask is another pattern. Reads the mask's values (a device
    sync on CUDA): analyse once per call (``gape.core.api.AttentionCall.key_ranges``)."""
    if attn_mask.dtype != torch.bool:
        return f"attn_mask must be bool, got {attn_mask.dtype}"
    m = attn_mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    if m.dim() != 4:
        return f"attn_mask must broadcast to [B, Hq, Lq, Lk], got shape {tuple(attn_mask.shape)}"
    if m.shape[1] > 1 and not bool((m == m[:, :1]).all()):
        return "the mask differs between heads; the Triton kernel takes one key range per batch element"
    m = m[:, 0]  # [B, Lq or 1, Lk or 1]
    n_keys = m.shape[-1] if lk is None else lk
    m = m.expand(m.shape[0], m.shape[1], n_keys)
    idx = torch.arange(n_keys, device=m.device)
    if m.shape[1] != lq and m.shape[1] != 1:
        return f"attn_mask has {m.shape[1]} query rows but the query has {lq}"
    causal = _causal(lq, n_keys, m.device, query_offset, window, True)
    inside = causal if is_causal else _causal(lq, n_keys, m.device, query_offset, window, False)
    # The keys some row may attend (only those the causal rule and the window leave can matter)
    # must form one contiguous range per batch element.
    row = (m & inside).any(dim=1)  # [B, Lk]
    count = row.sum(-1)
    big = torch.full_like(idx, n_keys)
    start = torch.where(row, idx, big).amin(-1)
    end = torch.where(row, idx + 1, torch.zeros_like(idx)).amax(-1)
    start = torch.where(count > 0, start, torch.zeros_like(start))
    if not bool((end - start == count).all()):
        return "the allowed keys of a row are not one contiguous range (only key padding can be served)"
    rng = (idx[None, :] >= start[:, None]) & (idx[None, :] < end[:, None])  # [B, Lk]
    rng = rng[:, None, :]
    if is_causal:
        # Entries above the diagonal (or outside the window) are never read, so only compare inside.
        if bool(((m & causal) == (rng & causal)).all()):
            return KeyRanges(start.to(torch.int32), end.to(torch.int32), True)
    else:
        if bool(((m & inside) == (rng & inside)).all()):
            return KeyRanges(start.to(torch.int32), end.to(torch.int32), False)
        # A causal-and-padding mask (what transformers builds) with
        # is_causal=False: the allowed keys have pos_q >= pos_k, where
        # |pos_q - pos_k| equals the causal distance, so the causal kernel is exact.
        if m.shape[1] == lq and bool(((m & inside) == (rng & causal)).all()):
            return KeyRanges(start.to(torch.int32), end.to(torch.int32), True)
    return ("the mask is not a key-padding pattern (same key range for every query row, "
            "optionally intersected with the bottom-right causal rule)")


def mask_to_key_ranges(attn_mask: torch.Tensor, lq: int, lk: int, is_causal: bool, query_offset=None,
                       window=None) -> KeyRanges:
    """Key ranges equivalent to ``attn_mask`` (AND the causal rule when ``is_causal``,
    query row ``i`` at ``i + query_offset``, None = bottom-right).

    Raises ValueError naming the reason when the mask has another shape of
    pattern. Reads the mask's values (a device sync on CUDA).
    """
    got = analyse_mask(attn_mask, lq, lk, is_causal, query_offset, window)
    if isinstance(got, str):
        raise ValueError(f'backend="triton" cannot serve this attn_mask: {got}; use backend="torch"')
    return got


def unsupported_mask_reason(attn_mask: torch.Tensor | None, lq: int, is_causal: bool = False,
                            query_offset=None, window=None) -> str | None:
    """Why the Triton kernel cannot serve ``attn_mask`` (None when it can).

    Without ``is_causal`` the mask alone must be a key-padding pattern, which
    is sufficient whatever ``is_causal`` the call uses.
    """
    if attn_mask is None:
        return None
    got = analyse_mask(attn_mask, lq, None, is_causal, query_offset, window)
    return got if isinstance(got, str) else None
