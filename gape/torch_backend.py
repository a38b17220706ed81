"""The torch backend: GAPE attention on any device, the CPU default.

Four named forward strategies (``strategy=`` of :func:`torch_attention`; the
one place that picks among them is :func:`choose_strategy`):

- ``"kernel"``: the fused C++ CPU kernel of :mod:`gape.kernels.attention_cpu`
  (BLAS blocks with the bias and an online softmax in registers), forward and
  backward; needs CPU tensors and a built extension.
- ``"sdpa-tiles"`` and ``"gemm-tiles"``: the pure-PyTorch tiles of
  :mod:`gape.torch_tiles` (bias tiles into PyTorch's own SDPA, or our own
  GEMMs), with a recomputing backward (FlashAttention-style: a custom
  ``autograd.Function`` saves the inputs and the output only). They also run
  on CUDA.
- ``"decode"``: one query row without autograd, a handful of ops.

``"auto"`` takes ``"decode"`` for a one-row step without gradients, else
``"kernel"`` when it is built and takes the tensors, else ``"sdpa-tiles"`` on a
multi-threaded CPU for at least :data:`SDPA_TILES_MIN_ROWS` query rows, else
``"gemm-tiles"`` (the measurements behind the choice are in the README).

Float16 and bfloat16 inputs are computed in float32 and cast back.
"""

from __future__ import annotations

import torch

from .api import double_backward_error
from .kernels import attention_cpu
from .reference import phi as _phi
from .torch_tiles import CHUNK_SIZE, TilePlan, compute_dtype, decode_forward, phi_reversed, tiles_backward, tiles_forward

STRATEGIES = ("auto", "kernel", "sdpa-tiles", "gemm-tiles", "decode")
SDPA_TILES_MIN_ROWS = 64
FUSED_MIN_ROWS = SDPA_TILES_MIN_ROWS  # old name

__all__ = ["CHUNK_SIZE", "STRATEGIES", "choose_strategy", "supports", "torch_attention"]


def _kernel_ok(query, key, value) -> bool:
    return attention_cpu.supports(query, key, value) and attention_cpu.available()


def choose_strategy(strategy: str, query, key, value, needs_grad: bool = False) -> str:
    """The concrete forward strategy for these tensors (see the module docstring).

    A named strategy that cannot serve the call raises ValueError saying why.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    lq = query.shape[2]
    if strategy == "auto":
        if lq == 1 and not needs_grad:
            return "decode"
        if _kernel_ok(query, key, value):
            return "kernel"
        multi = query.device.type == "cpu" and lq >= SDPA_TILES_MIN_ROWS and torch.get_num_threads() > 1
        return "sdpa-tiles" if multi else "gemm-tiles"
    if strategy == "kernel" and not _kernel_ok(query, key, value):
        raise ValueError(
            "strategy='kernel' but the fused CPU kernel cannot run here: "
            f"{attention_cpu.unavailable_reason() or 'needs CPU tensors with int32-sized strides'}; use strategy='auto'"
        )
    if strategy == "decode" and (lq != 1 or needs_grad):
        raise ValueError(f"strategy='decode' takes one query row without autograd, got Lq={lq}, needs_grad={needs_grad}")
    return strategy


def _kernel_args(query, key, value, query_gate, key_gate, attn_mask, is_causal, distance):
    """The C++ kernel's inputs in the compute dtype (float32 for half inputs)."""
    cdt = compute_dtype(query.dtype)
    lq, lk = query.shape[2], key.shape[2]
    if is_causal:
        phi_rev = phi_reversed(lk, distance, cdt, query.device)  # only delta >= 0 is read
    else:
        phi_rev = _phi(torch.arange(lk - 1, -lq, -1, device=query.device).abs_(), distance, cdt)
    return query.to(cdt), key.to(cdt), value.to(cdt), query_gate, 1 - key_gate.to(cdt), phi_rev, attn_mask


def _kernel_forward(query, key, value, query_gate, key_gate, attn_mask, is_causal, scale, distance, return_lse=False):
    """The fused C++ forward, in the compute dtype, written in ``[B, Lq, Hq, Dv]``
    storage (returned as a ``[B, Hq, Lq, Dv]`` view): the layout transformers
    wants, so its transpose back is free."""
    b, hq, lq, dv = query.shape[0], query.shape[1], query.shape[2], value.shape[3]
    out = torch.empty(b, lq, hq, dv, dtype=compute_dtype(query.dtype)).transpose(1, 2)
    args = _kernel_args(query, key, value, query_gate, key_gate, attn_mask, is_causal, distance)
    return attention_cpu.attention_forward(*args, is_causal, scale, return_lse=return_lse, out=out)


class _GapeAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, query_gate, key_gate, attn_mask, is_causal, scale, distance, chunk_size,
                strategy):
        lse = None
        if strategy == "kernel":
            out, lse = _kernel_forward(query, key, value, query_gate, key_gate, attn_mask, is_causal, scale, distance, True)
        else:
            plan = TilePlan(query, key, value, query_gate, key_gate, attn_mask, is_causal, scale, distance, chunk_size)
            out = tiles_forward(plan, strategy)
        # lse (the kernel's row log-sum-exp) selects the kernel's backward
        ctx.save_for_backward(query, key, value, query_gate, key_gate, attn_mask, out, lse)
        ctx.args = (is_causal, scale, distance, chunk_size)
        return out.view(query.shape[0], query.shape[1], query.shape[2], value.shape[3]).to(query.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        # create_graph=True runs the backward with grad mode on. This backward is not
        # itself differentiable: refuse (once_differentiable would silently drop the
        # second-order terms whenever grad_out does not require grad).
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            raise RuntimeError(double_backward_error("torch"))
        query, key, value, query_gate, key_gate, attn_mask, out, lse = ctx.saved_tensors
        is_causal, scale, distance, chunk_size = ctx.args
        needs = ctx.needs_input_grad[:5]
        if lse is not None:
            args = _kernel_args(query, key, value, query_gate, key_gate, attn_mask, is_causal, distance)
            dq, dk, dv, dlam, dpi = attention_cpu.attention_backward(*args, is_causal, scale, out, lse, grad_out)
        else:
            plan = TilePlan(query, key, value, query_gate, key_gate, attn_mask, *ctx.args)
            dq, dk, dv, dlam, dpi = tiles_backward(plan, out, grad_out, needs)
        return (
            dq.view(query.shape).to(query.dtype) if needs[0] else None,
            dk.view(key.shape).to(key.dtype) if needs[1] else None,
            dv.view(value.shape).to(value.dtype) if needs[2] else None,
            dlam.view(query_gate.shape).to(query_gate.dtype) if needs[3] else None,
            dpi.view(key_gate.shape).to(key_gate.dtype) if needs[4] else None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def supports(call) -> str | None:
    """The torch backend serves every validated call, on any device (see gape.api.select)."""
    return None


def torch_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_gate: torch.Tensor,
    key_gate: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    distance: str,
    chunk_size: int | None = None,
    strategy: str = "auto",
) -> torch.Tensor:
    """GAPE attention on validated inputs (see :func:`gape.attention`).

    ``chunk_size`` (query rows per tile of the pure-PyTorch strategies, default
    :data:`CHUNK_SIZE`) trades memory (``B * Hq * chunk_size * Lk`` floats,
    twice in the backward) for fewer, larger GEMMs. ``strategy``: one of
    :data:`STRATEGIES` (module docstring).
    """
    tensors = (query, key, value, query_gate, key_gate)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    strategy = choose_strategy(strategy, query, key, value, needs_grad)
    if needs_grad:
        return _GapeAttention.apply(*tensors, attn_mask, is_causal, scale, distance, chunk_size, strategy)
    if strategy == "decode":
        return decode_forward(query, key, value, query_gate, key_gate, attn_mask, scale, distance)
    if strategy == "kernel":
        out = _kernel_forward(query, key, value, query_gate, key_gate, attn_mask, is_causal, scale, distance)
        return out.to(query.dtype)
    plan = TilePlan(query, key, value, query_gate, key_gate, attn_mask, is_causal, scale, distance, chunk_size)
    out = tiles_forward(plan, strategy)
    return out.view(query.shape[0], query.shape[1], query.shape[2], value.shape[3]).to(query.dtype)
