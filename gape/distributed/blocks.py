"""Per-block attention for the ring: :mod:`gape.core.ops` with the ring's conventions.

A block is one query segment against one key segment; ``query_offset`` is
(global position of query row 0) minus (global position of key column 0).
:func:`forward` returns ``(out, lse)`` with ``lse = -inf`` for a row that sees
no key of the block (so a running log-sum-exp starts at ``-inf``);
:func:`backward` takes the *merged* ``(out, lse)`` of the rows and returns
the block's five gradients.

The block kernels are :func:`gape.core.ops.block_forward` / ``block_backward``:
the fused C++ kernel on the CPU (``"torch"``), the Triton kernel on CUDA
(``"triton"``) and the materialized oracle (``"reference"``, float64 too).
This module only decides which of them may serve a ring, in one place.
"""

from __future__ import annotations

import torch

from gape.core import ops

WITHOUT_OFFSET = {
    "sdpa": "its two-extra-channel form gives no row log-sum-exp to merge blocks with",
}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def forward(name, q, k, v, qg, kg, query_offset, is_causal, scale, distance):
    out, lse = ops.block_forward(q, k, v, qg, kg, query_offset=query_offset, is_causal=is_causal, scale=scale,
                                 distance=distance, backend=name)
    return out, lse.masked_fill(torch.isposinf(lse), float("-inf"))


def backward(name, q, k, v, qg, kg, out, lse, dout, query_offset, is_causal, scale, distance):
    lse = lse.masked_fill(torch.isneginf(lse), float("inf"))  # a row without keys: P = 0
    return ops.block_backward(q, k, v, qg, kg, out, lse, dout, query_offset=query_offset, is_causal=is_causal,
                              scale=scale, distance=distance, backend=name)


def resolve(backend: str, query: torch.Tensor) -> str:
    """The block kernel ``backend`` names for ``query`` (``auto``: the fused kernel of its device)."""
    return ops.block_backend(backend, query)


def unsupported_reason(name: str, query: torch.Tensor) -> str | None:
    """Why block kernel ``name`` cannot serve ``query`` in a ring (None when it can)."""
    served = tuple(b for b in ops.BLOCK_BACKENDS if b != "auto")
    if name in WITHOUT_OFFSET:
        return (
            f"backend={name!r} has no query_offset block kernel ({WITHOUT_OFFSET[name]}); context parallelism "
            f"needs one of {('auto',) + served}"
        )
    if name not in served:
        return f"backend={name!r} has no context-parallel block kernel; choose one of {('auto',) + served}"
    if name == "torch":
        from ..kernels import attention_cpu

        if query.device.type != "cpu":
            return f"backend='torch' (the fused C++ kernel) needs CPU tensors, got {query.device}"
        reason = attention_cpu.unavailable_reason()
        if reason is not None:
            return f"the fused C++ CPU kernel is unavailable ({reason}); use backend='reference' for small checks"
    if name == "triton":
        from gape.core import api

        return api.unsupported_reason("triton", query, "log", None)
    return None
