"""The torch backend: GAPE attention on any device, the CPU default.

Four named forward strategies (``strategy=`` of :func:`torch_attention`; the
one place that picks among them is :func:`choose_strategy`):

- ``"kernel"``: the fused C++ CPU kernel of :mod:`gape.kernels.attention_cpu`
  (BLAS blocks with the bias and an online softmax in registers), forward and
  backward; needs CPU tensors and a built extension.
- ``"sdpa-tiles"`` and ``"gemm-tiles"``: the pure-PyTorch tiles of
  :mod:`gape.core.torch_tiles` (bias tiles into PyTorch's own SDPA, or our own
  GEMMs), with a recomputing backward (FlashAttention-style: a custom
  ``autograd.Function`` saves the inputs and the output only). They also run
  on CUDA.
- ``"decode"``: one query row without autograd, a handful of ops.

Learned sinks and logit soft-capping (``sinks=``, ``softcap=``) run on the
``"kernel"`` and ``"gemm-tiles"`` strategies: ``"auto"`` takes the kernel when it
can run, else the GEMM tiles; PyTorch's SDPA and the decode step do not implement
them, and naming one of those strategies for such a call is refused.
Otherwise ``"auto"`` takes ``"decode"`` for a one-row step without gradients, else
``"kernel"`` when it is built and takes the tensors, else ``"sdpa-tiles"`` on a
multi-threaded CPU for at least :data:`SDPA_TILES_MIN_ROWS` query rows, else
``"gemm-tiles"`` (the measurements behind the choice are in docs/kernels.md).

Float16 and bfloat16 inputs are computed in float32 and cast back; the kernel
reads them in place (its half-precision products: gape.kernels.attention_cpu).
"""

from __future__ import annotations

import torch

from .api import double_backward_error
from gape.kernels import attention_cpu
from .reference import delta_range, tie_to_inputs
from .reference import phi as _phi
from .torch_tiles import CHUNK_SIZE, TilePlan, compute_dtype, decode_forward, phi_reversed, tiles_backward, tiles_forward

STRATEGIES = ("auto", "kernel", "sdpa-tiles", "gemm-tiles", "decode")
SDPA_TILES_MIN_ROWS = 64
FUSED_MIN_ROWS = SDPA_TILES_MIN_ROWS  # old name

__all__ = ["CHUNK_SIZE", "STRATEGIES", "choose_strategy", "supports", "torch_attention", "torch_attention_varlen"]


def _kernel_ok(query, key, value) -> bool:
    return attention_cpu.supports(query, key, value) and attention_cpu.available()


def choose_strategy(strategy: str, query, key, value, needs_grad: bool = False, terms: bool = False) -> str:
    """The concrete forward strategy for these tensors (see the module docstring);
    ``terms``: the call has learned sinks or a soft-cap.

    A named strategy that cannot serve the call raises ValueError saying why.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if terms:
        if strategy not in ("auto", "kernel", "gemm-tiles"):
            raise ValueError(
                f"strategy={strategy!r} does not implement learned sinks or logit soft-capping (sinks=, softcap=); "
                "'kernel' and 'gemm-tiles' do (strategy='auto' picks one)"
            )
        if strategy == "auto":
            return "kernel" if _kernel_ok(query, key, value) else "gemm-tiles"
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


# Causal phi tables up to this many distances come from the shared reversed table
# (torch_tiles.phi_reversed); larger ones (queries far from their keys) are built per call.
_SHARED_PHI_MAX = 1 << 20


def _kernel_positions(b, lq, lk, is_causal, query_offset=None, window=None, segments=None) -> dict:
    """The kernel's position arguments: segments, allowed distances, and where delta 0 is in the table."""
    if segments is None:
        segments = attention_cpu.dense_segments(b, lq, lk, query_offset)
    dlo, dhi = attention_cpu.delta_bounds(*delta_range(is_causal, window))
    return dict(segments=segments, delta_lo=dlo, delta_hi=dhi)


def _kernel_args(query, key, value, query_gate, key_gate, attn_mask, is_causal, distance, positions=None, sinks=None,
                 softcap=None):
    """The C++ kernel's inputs (q/k/v as they are, the rest in the compute dtype: float32 for
    half inputs), and its keyword arguments (positions, sinks, soft-cap)."""
    cdt = compute_dtype(query.dtype)
    b, lq, lk = query.shape[0], query.shape[2], key.shape[2]
    positions = dict(_kernel_positions(b, lq, lk, is_causal) if positions is None else positions)
    rng = attention_cpu.read_range(positions["segments"], positions["delta_lo"], positions["delta_hi"])
    if rng is None:  # no row sees a key: the table is never read
        phi_rev, zero = torch.zeros(1, dtype=cdt), 0
    elif rng[0] >= 0 and rng[1] < _SHARED_PHI_MAX:
        phi_rev, zero = phi_reversed(rng[1] + 1, distance, cdt, query.device), rng[1]
    else:
        phi_rev, zero = attention_cpu.phi_table(rng[0], rng[1], distance, cdt), rng[1]
    positions["phi_zero"] = zero
    if sinks is not None:
        positions["sinks"] = sinks
    if softcap is not None:
        positions["softcap"] = softcap
    args = (query, key, value, query_gate, 1 - key_gate.to(cdt), phi_rev, attn_mask)
    return args, positions


def _kernel_forward(query, key, value, query_gate, key_gate, attn_mask, is_causal, scale, distance, return_lse=False,
                    positions=None, sinks=None, softcap=None):
    """The fused C++ forward, in the compute dtype, written in ``[B, Lq, Hq, Dv]``
    storage (returned as a ``[B, Hq, Lq, Dv]`` view): the layout transformers
    wants, so its transpose back is free."""
    b, hq, lq, dv = query.shape[0], query.shape[1], query.shape[2], value.shape[3]
    out = torch.empty(b, lq, hq, dv, dtype=compute_dtype(query.dtype)).transpose(1, 2)
    args, kw = _kernel_args(query, key, value, query_gate, key_gate, attn_mask, is_causal, distance, positions, sinks,
                            softcap)
    return attention_cpu.attention_forward(*args, is_causal, scale, return_lse=return_lse, out=out, **kw)


def _kernel_backward(query, key, value, query_gate, key_gate, attn_mask, is_causal, scale, distance, out, lse,
                     grad_out, positions=None, sinks=None, softcap=None):
    """The fused C++ backward: ``(dq, dk, dv, d lambda, d pi)`` in the compute dtype, and
    ``d sinks`` after them with ``sinks``."""
    args, pos = _kernel_args(query, key, value, query_gate, key_gate, attn_mask, is_causal, distance, positions, sinks,
                             softcap)
    return attention_cpu.attention_backward(*args, is_causal, scale, out, lse, grad_out, **pos)


class _GapeAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, query_gate, key_gate, attn_mask, is_causal, scale, distance, chunk_size,
                strategy, query_offset=None, window=None, segments=None, sinks=None, softcap=None):
        lse = None
        positions = None
        if segments is not None or strategy == "kernel":
            b, lq, lk = query.shape[0], query.shape[2], key.shape[2]
            positions = _kernel_positions(b, lq, lk, is_causal, query_offset, window, segments)
            out, lse = _kernel_forward(query, key, value, query_gate, key_gate, attn_mask, is_causal, scale, distance,
                                       True, positions, sinks, softcap)
        else:
            plan = TilePlan(query, key, value, query_gate, key_gate, attn_mask, is_causal, scale, distance, chunk_size,
                            query_offset, window, sinks, softcap)
            out = tiles_forward(plan, strategy)
        # lse (the kernel's row log-sum-exp) selects the kernel's backward
        ctx.save_for_backward(query, key, value, query_gate, key_gate, attn_mask, out, lse, sinks)
        ctx.args = (is_causal, scale, distance, chunk_size, query_offset, window)
        ctx.softcap = softcap
        ctx.positions = positions
        return out.view(query.shape[0], query.shape[1], query.shape[2], value.shape[3]).to(query.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        # create_graph=True runs the backward with grad mode on. This backward is not
        # itself differentiable: refuse (once_differentiable would silently drop the
        # second-order terms whenever grad_out does not require grad).
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            raise RuntimeError(double_backward_error("torch"))
        query, key, value, query_gate, key_gate, attn_mask, out, lse, sinks = ctx.saved_tensors
        is_causal, scale, distance, chunk_size, query_offset, window = ctx.args
        needs = ctx.needs_input_grad[:5]
        dsink = None
        if lse is not None:
            grads = _kernel_backward(query, key, value, query_gate, key_gate, attn_mask, is_causal, scale, distance,
                                     out, lse, grad_out, ctx.positions, sinks, ctx.softcap)
            dq, dk, dv, dlam, dpi = grads[:5]
            if sinks is not None:
                dsink = grads[5]
        else:
            plan = TilePlan(query, key, value, query_gate, key_gate, attn_mask, *ctx.args, sinks, ctx.softcap)
            dq, dk, dv, dlam, dpi, dsink = tiles_backward(plan, out, grad_out, needs)
            if dsink is not None:  # per (batch, kv head, query head of the group): summed over the batch
                dsink = dsink.sum(0).reshape(-1)
        if dsink is not None and ctx.needs_input_grad[14]:
            dsink = dsink.to(sinks.dtype)
        else:
            dsink = None
        return (
            dq.view(query.shape).to(query.dtype) if needs[0] else None,
            dk.view(key.shape).to(key.dtype) if needs[1] else None,
            dv.view(value.shape).to(value.dtype) if needs[2] else None,
            dlam.view(query_gate.shape).to(query_gate.dtype) if needs[3] else None,
            dpi.view(key_gate.shape).to(key_gate.dtype) if needs[4] else None,
            None, None, None, None, None, None, None, None, None, dsink, None,
        )


def _uniform(query_offset):
    """An offset tensor whose entries are all equal becomes that int (reads the values)."""
    if isinstance(query_offset, torch.Tensor):
        flat = query_offset.reshape(-1)
        if flat.numel() == 1 or bool((flat == flat[0]).all()):
            return int(flat[0])
    return query_offset


def _far_apart(query_offset: torch.Tensor, query, key) -> bool:
    """Whether per-batch offsets spread so far that the kernel's one phi table over all their
    distances would dwarf a table per batch element (its size grows with the spread: an offset
    of 0 beside one of 10**8 would take gigabytes for a few tokens)."""
    flat = query_offset.reshape(-1)
    return int(flat.max()) - int(flat.min()) > 2 * (query.shape[2] + key.shape[2]) + _SHARED_PHI_MAX


def supports(call) -> str | None:
    """The torch backend serves every validated call, on any device (see gape.core.api.select)."""
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
    *,
    query_offset=None,
    window=None,
    sinks=None,
    softcap=None,
) -> torch.Tensor:
    """GAPE attention on validated inputs (see :func:`gape.attention`).

    ``chunk_size`` (query rows per tile of the pure-PyTorch strategies, default
    :data:`CHUNK_SIZE`) trades memory (``B * Hq * chunk_size * Lk`` floats,
    twice in the backward) for fewer, larger GEMMs. ``strategy``: one of
    :data:`STRATEGIES` (module docstring). ``query_offset`` (None, an int or an
    int64 ``[B]`` tensor) and ``window`` (``(left, right)`` or None) as in
    :func:`gape.attention`; so are ``sinks`` (``[Hq]``) and ``softcap`` (a float),
    which run on the kernel or the GEMM tiles (module docstring).
    """
    if torch.compiler.is_compiling():
        if strategy in ("auto", "kernel") and query.device.type == "cpu" and attention_cpu.compiled_kernel_ready():
            # one opaque op with a fake implementation: the compiled graph calls the kernel
            return attention_cpu.fused_attention(query, key, value, query_gate, key_gate, attn_mask, is_causal, scale,
                                                 distance, query_offset=query_offset, window=window, sinks=sinks,
                                                 softcap=softcap)
    else:  # a traced decode step keeps its offset a tensor
        query_offset = _uniform(query_offset)
    if isinstance(query_offset, int) and query_offset == key.shape[2] - query.shape[2]:
        query_offset = None  # the bottom-right default: keep its fast paths
    tensors = (query, key, value, query_gate, key_gate)
    grad = torch.is_grad_enabled() and (any(t.requires_grad for t in tensors)
                                        or (sinks is not None and sinks.requires_grad))
    strategy = choose_strategy(strategy, query, key, value, grad, sinks is not None or softcap is not None)
    if strategy == "decode":
        return decode_forward(query, key, value, query_gate, key_gate, attn_mask, scale, distance, is_causal,
                              query_offset, window)
    if isinstance(query_offset, torch.Tensor) and (strategy != "kernel" or _far_apart(query_offset, query, key)):
        # per-batch offsets on the pure-PyTorch tiles, or too far apart for the kernel's one
        # phi table: one batch element at a time
        outs = []
        for i in range(query.shape[0]):
            m = None if attn_mask is None else attn_mask[i : i + 1] if attn_mask.shape[0] > 1 else attn_mask
            outs.append(torch_attention(*(t[i : i + 1] for t in tensors), m, is_causal, scale, distance, chunk_size,
                                        strategy, query_offset=int(query_offset.reshape(-1).expand(query.shape[0])[i]),
                                        window=window, sinks=sinks, softcap=softcap))
        return torch.cat(outs, dim=0)
    if grad:
        return _GapeAttention.apply(*tensors, attn_mask, is_causal, scale, distance, chunk_size, strategy,
                                    query_offset, window, None, sinks, softcap)
    if strategy == "kernel":
        pos = _kernel_positions(query.shape[0], query.shape[2], key.shape[2], is_causal, query_offset, window)
        out = _kernel_forward(query, key, value, query_gate, key_gate, attn_mask, is_causal, scale, distance,
                              positions=pos, sinks=sinks, softcap=softcap)
        return out.to(query.dtype)
    plan = TilePlan(query, key, value, query_gate, key_gate, attn_mask, is_causal, scale, distance, chunk_size,
                    query_offset, window, sinks, softcap)
    out = tiles_forward(plan, strategy)
    return out.view(query.shape[0], query.shape[1], query.shape[2], value.shape[3]).to(query.dtype)


def torch_attention_varlen(query, key, value, query_gate, key_gate, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                           max_seqlen_k, is_causal, scale, distance, window=None, sinks=None, softcap=None):
    """``backend="torch"`` of :func:`gape.attention_varlen` (arguments validated there).

    The C++ kernel takes the packed tensors as one batch element of ``[1, H, T, D]``
    views with one segment per sequence: no padding, no loop over sequences. Without
    the kernel (CUDA tensors, no compiler) each sequence runs through the tiles.
    """
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (query, key, value))
    lam, pi = query_gate.t().unsqueeze(0), key_gate.t().unsqueeze(0)
    if _kernel_ok(q4, k4, v4):
        seg = attention_cpu.varlen_segments(cu_seqlens_q, cu_seqlens_k)
        leaves = (query, key, value, query_gate, key_gate) + (() if sinks is None else (sinks,))
        if torch.is_grad_enabled() and any(t.requires_grad for t in leaves):
            out = _GapeAttention.apply(q4, k4, v4, lam, pi, None, is_causal, scale, distance, None, "kernel", None,
                                       window, seg, sinks, softcap)
        else:
            pos = _kernel_positions(1, q4.shape[2], k4.shape[2], is_causal, None, window, seg)
            out = _kernel_forward(q4, k4, v4, lam, pi, None, is_causal, scale, distance, positions=pos, sinks=sinks,
                                  softcap=softcap)
            out = out.to(query.dtype)
        return out[0].transpose(0, 1)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs = []
    for s in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[s], cq[s + 1], ck[s], ck[s + 1]
        if q1 == q0:
            continue
        if k1 == k0:
            outs.append(query.new_zeros(q1 - q0, query.shape[1], value.shape[-1]))
            continue
        o = torch_attention(q4[:, :, q0:q1], k4[:, :, k0:k1], v4[:, :, k0:k1], lam[:, :, q0:q1], pi[:, :, k0:k1],
                            None, is_causal, scale, distance, window=window, sinks=sinks, softcap=softcap)
        outs.append(o[0].transpose(0, 1))
    out = torch.cat(outs, dim=0) if outs else query.new_zeros(0, query.shape[1], value.shape[-1])
    return tie_to_inputs(out, query, key, value, query_gate, key_gate, sinks)
