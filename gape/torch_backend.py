"""Tiled PyTorch GAPE attention: the CPU default, also correct on CUDA.

The full ``[B, Hq, Lq, Lk]`` bias is never built. Queries are processed in
chunks of ``chunk_size`` rows; one chunk's bias ``[B, Hq, chunk, Lk]`` lives in
a buffer reused by every chunk, so the extra memory is
``O(B * Hq * chunk_size * Lk)``. A custom ``autograd.Function`` saves nothing
but the inputs and the output and recomputes each tile in the backward pass
(FlashAttention-style).

What makes it fast on the CPU:

- The forward runs the fused C++ kernel of :mod:`gape.kernels.attention_cpu`
  when it is built (CPU, float32/float64 compute): BLAS blocks with the bias
  and an online softmax in registers, 0.9-1.05x the time of PyTorch's no-bias
  CPU flash attention. Without it (no compiler, ``GAPE_CPU_KERNEL=0``, CUDA
  tensors) the pure-PyTorch tiles below run; the backward always does.
- Two pure-PyTorch forward strategies, picked per call (``FORWARD``): with several threads
  and a prefill-sized query (``fused``) each chunk's bias goes as a float
  ``attn_mask`` to PyTorch's own fused CPU attention
  (``F.scaled_dot_product_attention``: the blocked flash kernel keeps the
  ``QK^T`` blocks, the bias add and the softmax in cache, GQA native); on one
  thread and for decode (``gemm``) our own GEMMs fold the ``rep = Hq // Hkv``
  query heads of a group into the rows (``[B*Hkv, rep*chunk, D] @ [B*Hkv, D,
  Lk]``, each K/V tile read once per group, never repeated), the bias enters
  the ``QK^T`` GEMM as its ``C`` operand (``baddbmm``) and one in-place
  softmax per tile gives the probabilities. The backward is the ``gemm``
  recomputation followed by the gradient GEMMs.
- ``phi(delta)`` only depends on ``pos_q - pos_k``: a ``[chunk, Lq + Lk]``
  Toeplitz table built once per call (``phi`` evaluated once per distance)
  gives every chunk's ``phi`` tile as a slice. The per-kv-head product
  ``(1 - pi) * phi`` is formed once per chunk and shared by the ``rep`` query
  heads of the group.
- Causal chunks only touch keys up to their last position, and only the
  ``chunk x chunk`` diagonal block needs a ``-inf`` mask.

Distances are formed from int64 positions and converted to float32 (float64
for float64 inputs) before ``phi``: exact up to position 2**24. Float16 and
bfloat16 inputs are computed in float32 and cast back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kernels import attention_cpu
from .reference import delta_range
from .reference import phi as _phi

# Query rows per chunk. 64 keeps a [9 heads, 64, 4096] float32 bias tile (~9 MB)
# close to the caches of the benchmark machine while each fused-attention call
# still has enough (head, row block) work items for every thread; 32 and 128
# measured slower at L=4096 (benchmarks/bench_attention.py).
CHUNK_SIZE = 64

# Forward strategy: "kernel" is the fused C++ CPU kernel (gape.kernels.attention_cpu),
# "fused" hands each bias tile to F.scaled_dot_product_attention,
# "gemm" runs our own batched GEMMs (the query heads of a GQA group folded into
# the rows, so each K/V tile is read once per group) and softmax; "auto" takes
# "kernel" when it is built and takes the tensors, else "fused" on a
# multi-threaded CPU for at least FUSED_MIN_ROWS query rows, else "gemm". Measured at 9/3 heads, D=64, Lk=4096 (README): 2 threads, Lq=4096
# fused 1.50x the no-bias floor vs gemm 1.69x; 1 thread, Lq=4096 fused 1.53x vs
# gemm 1.43x; decode (Lq=1) gemm 600 us vs fused 781 us (1 thread), 462 vs 530 us (2).
FORWARD = "auto"
FUSED_MIN_ROWS = 64

_NEG_INF = float("-inf")
_softmax_out = torch.ops.aten._softmax.out


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Plan:
    """Everything about one call that does not depend on the chunk."""

    def __init__(self, query, key, value, query_gate, key_gate, attn_mask, is_causal, scale, distance, chunk_size,
                 query_offset=None, window=None):
        b, hq, lq, d = query.shape
        hkv, lk, dv = key.shape[1], key.shape[2], value.shape[3]
        self.b, self.hq, self.hkv, self.rep = b, hq, hkv, hq // hkv
        self.g = b * hkv
        self.lq, self.lk, self.d, self.dv = lq, lk, d, dv
        self.is_causal, self.scale = is_causal, scale
        self.c = c = max(1, min(int(chunk_size or CHUNK_SIZE), lq))
        cdt = _compute_dtype(query.dtype)
        self.cdt, self.device = cdt, query.device
        # K/V contiguous: the GEMM paths view them as [B*Hkv, Lk, D] (a no-op for cache tensors)
        self.query, self.key, self.value = query.to(cdt), key.to(cdt).contiguous(), value.to(cdt).contiguous()
        self.lam = query_gate.to(cdt).reshape(b, hkv, self.rep, lq)
        self.neg_lam = self.lam.neg().unsqueeze(-1)
        self.keep = (1 - key_gate.to(cdt)).reshape(b, hkv, lk)
        self.mask = attn_mask
        # query row i sits at position i + qoff (one int here: per-batch offsets are split
        # by the caller); the allowed signed distances are [dlo, dhi] (None = unbounded)
        default = query_offset is None
        self.qoff = lk - lq if default else int(query_offset)
        self.dlo, self.dhi = delta_range(is_causal, window)
        # Without a mask every row keeps its distance-0 key (or, non-causal, any
        # key) when Lq <= Lk at the default offset; only then may the empty-row guards be skipped.
        self.may_have_empty_rows = attn_mask is not None or lq > lk or not default or self.dhi is not None
        # Toeplitz table: toep[r, x] = phi(delta(r + off - x)), so the tile of a chunk whose
        # first row sits at position p0 over keys [ks, ke) is toep[:cc, off - p0 + ks : off - p0 + ke].
        # phi is evaluated once per distance (a vector, reversed) and the rows are windows of it.
        self.off = off = lq - 1 + self.qoff + c
        n = lq + lk + c
        delta = torch.arange(off + c - 1, off - n, -1, device=self.device, dtype=torch.int64)
        delta = delta.clamp_min_(0) if is_causal else delta.abs_()
        vec = _phi(delta, distance, cdt)
        # vec[z] = phi(delta(off + c - 1 - z)); row r of the table starts at z = c - 1 - r
        self.toep = vec.as_strided((c, n), (1, 1)).flip(0)
        self.buf = self.kp_buf = None

    def chunks(self):
        """(i0, i1, ks, ke) per chunk: the chunk's rows can see keys [ks, ke) at most."""
        for i0 in range(0, self.lq, self.c):
            i1 = min(self.lq, i0 + self.c)
            p0, p1 = i0 + self.qoff, i1 - 1 + self.qoff
            ks = 0 if self.dhi is None else min(max(p0 - self.dhi, 0), self.lk)
            ke = self.lk if self.dlo is None else min(max(p1 - self.dlo + 1, 0), self.lk)
            yield i0, i1, ks, max(ks, ke)

    def _band(self, s, p0, cc, ks, ke):
        """-inf where a row's key is outside [pos - dhi, pos - dlo]: only the two edge blocks can be."""
        p1 = p0 + cc - 1
        edges = []
        if self.dlo is not None:  # keys after the first row's last key
            edges.append((max(ks, p0 - self.dlo + 1), ke))
        if self.dhi is not None:  # keys before the last row's first key
            edges.append((ks, min(ke, p1 - self.dhi)))
        for j0, j1 in edges:
            if j1 <= j0:
                continue
            delta = (torch.arange(p0, p0 + cc, device=self.device)[:, None]
                     - torch.arange(j0, j1, device=self.device)[None, :])
            bad = torch.zeros_like(delta, dtype=torch.bool)
            if self.dlo is not None:
                bad |= delta < self.dlo
            if self.dhi is not None:
                bad |= delta > self.dhi
            s[..., j0 - ks : j1 - ks].masked_fill_(bad, _NEG_INF)

    def bias(self, i0, i1, ks, ke):
        """Bias of one chunk with every disallowed key at ``-inf``, as ``[B, Hkv, rep, cc, ke - ks]``.

        Also returns ``phi`` of the tile (``[cc, ke - ks]``, a view of the table).
        """
        b, hkv, rep, cc, kw = self.b, self.hkv, self.rep, i1 - i0, ke - ks
        n_s = b * self.hq * cc * kw
        if self.buf is None or self.buf.numel() < n_s:
            self.buf = torch.empty(b * self.hq * self.c * self.lk, device=self.device, dtype=self.cdt)
            self.kp_buf = torch.empty(b * hkv * self.c * self.lk, device=self.device, dtype=self.cdt)
        p0 = i0 + self.qoff
        x0 = self.off - p0 + ks
        phi = self.toep[:cc, x0 : x0 + kw]
        keep_phi = self.kp_buf[: b * hkv * cc * kw].view(b, hkv, 1, cc, kw)
        torch.mul(self.keep[:, :, None, None, ks:ke], phi, out=keep_phi)
        s = self.buf[:n_s].view(b, hkv, rep, cc, kw)
        torch.mul(self.neg_lam[..., i0:i1, :], keep_phi, out=s)
        self._band(s, p0, cc, ks, ke)
        if self.mask is not None:
            m = self.mask
            if m.shape[2] != 1:
                m = m[:, :, i0:i1]
            if m.shape[3] != 1:
                m = m[..., ks:ke]
            m = m.reshape(m.shape[0], hkv, rep, *m.shape[2:]) if m.shape[1] != 1 else m.unsqueeze(1)
            s.masked_fill_(m.logical_not(), _NEG_INF)
        return s, phi

    def probs(self, i0, i1, ks, ke):
        """Attention probabilities of one chunk as ``[B*Hkv, rep*cc, ke - ks]`` (our own GEMM and softmax).

        Also returns the folded query chunk and ``phi``.
        """
        g, rows = self.g, self.rep * (i1 - i0)
        s, phi = self.bias(i0, i1, ks, ke)
        qc = self.query.view(self.b, self.hkv, self.rep, self.lq, self.d)[:, :, :, i0:i1].reshape(g, rows, self.d)
        k = self.key.view(g, self.lk, self.d)[:, ks:ke]
        p = s.view(g, rows, ke - ks).baddbmm_(qc, k.transpose(1, 2), alpha=self.scale)
        _softmax_out(p, -1, False, out=p)
        if self.may_have_empty_rows:
            p.nan_to_num_(0.0)  # softmax of an all -inf row is NaN; GAPE's is zeros
        return p, qc, phi


def _use_cpu_kernel(query, key, value) -> bool:
    if FORWARD not in ("auto", "kernel"):
        return False
    ok = attention_cpu.supports(query, key, value)
    if FORWARD == "kernel":
        if not ok or not attention_cpu.available():
            raise RuntimeError(
                f"torch_backend.FORWARD='kernel' but the fused CPU kernel cannot run here: "
                f"{attention_cpu.unavailable_reason() or 'needs CPU tensors with int32-sized strides'}"
            )
        return True
    return ok and attention_cpu.available()


# Causal phi tables up to this many distances come from the shared reversed table
# (_phi_reversed); larger ones (queries far from their keys) are built per call.
_SHARED_PHI_MAX = 1 << 20


def _kernel_positions(b, lq, lk, is_causal, query_offset=None, window=None, segments=None) -> dict:
    """The kernel's position arguments: segments, allowed distances, and where delta 0 is in the table."""
    if segments is None:
        segments = attention_cpu.dense_segments(b, lq, lk, query_offset)
    dlo, dhi = attention_cpu.delta_bounds(*delta_range(is_causal, window))
    return dict(segments=segments, delta_lo=dlo, delta_hi=dhi)


def _kernel_args(query, key, value, query_gate, key_gate, attn_mask, is_causal, distance, positions=None):
    """The C++ kernel's inputs in the compute dtype (float32 for half inputs), and its position arguments."""
    cdt = _compute_dtype(query.dtype)
    b, lq, lk = query.shape[0], query.shape[2], key.shape[2]
    positions = dict(_kernel_positions(b, lq, lk, is_causal) if positions is None else positions)
    rng = attention_cpu.read_range(positions["segments"], positions["delta_lo"], positions["delta_hi"])
    if rng is None:  # no row sees a key: the table is never read
        phi_rev, zero = torch.zeros(1, dtype=cdt), 0
    elif rng[0] >= 0 and rng[1] < _SHARED_PHI_MAX:
        phi_rev, zero = _phi_reversed(rng[1] + 1, distance, cdt, query.device), rng[1]
    else:
        phi_rev, zero = attention_cpu.phi_table(rng[0], rng[1], distance, cdt), rng[1]
    positions["phi_zero"] = zero
    args = (query.to(cdt), key.to(cdt), value.to(cdt), query_gate, 1 - key_gate.to(cdt), phi_rev, attn_mask)
    return args, positions


def _kernel_forward(query, key, value, query_gate, key_gate, attn_mask, is_causal, scale, distance, return_lse=False,
                    positions=None):
    """The fused C++ forward, in the compute dtype."""
    args, pos = _kernel_args(query, key, value, query_gate, key_gate, attn_mask, is_causal, distance, positions)
    return attention_cpu.attention_forward(*args, is_causal, scale, return_lse=return_lse, **pos)


def _kernel_backward(query, key, value, query_gate, key_gate, attn_mask, is_causal, scale, distance, out, lse,
                     grad_out, positions=None):
    """The fused C++ backward: ``(dq, dk, dv, d lambda, d pi)`` in the compute dtype."""
    args, pos = _kernel_args(query, key, value, query_gate, key_gate, attn_mask, is_causal, distance, positions)
    dq, dk, dv, dlam, dkeep = attention_cpu.attention_backward(*args, is_causal, scale, out, lse, grad_out, **pos)
    return dq, dk, dv, dlam, dkeep.neg_()


def _use_fused_kernel(plan: _Plan) -> bool:
    if FORWARD != "auto":
        return FORWARD == "fused"
    return plan.device.type == "cpu" and plan.lq >= FUSED_MIN_ROWS and torch.get_num_threads() > 1


def _forward(plan: _Plan):
    b, hq, lq, dv = plan.b, plan.hq, plan.lq, plan.dv
    out = torch.empty(b, hq, lq, dv, device=plan.device, dtype=plan.cdt)
    fused = _use_fused_kernel(plan)
    for i0, i1, ks, ke in plan.chunks():
        if ke <= ks:
            out[:, :, i0:i1] = 0  # no row of this chunk sees a key (before the cache, or outside the window)
            continue
        if fused:
            s, _ = plan.bias(i0, i1, ks, ke)
            # a row whose keys are all -inf comes back as zeros from the fused kernel
            out[:, :, i0:i1] = F.scaled_dot_product_attention(
                plan.query[:, :, i0:i1],
                plan.key[:, :, ks:ke],
                plan.value[:, :, ks:ke],
                attn_mask=s.view(b, hq, i1 - i0, ke - ks),
                scale=plan.scale,
                enable_gqa=plan.rep > 1,
            )
        else:
            p, _, _ = plan.probs(i0, i1, ks, ke)
            o = torch.bmm(p, plan.value.view(plan.g, plan.lk, dv)[:, ks:ke])
            out[:, :, i0:i1] = o.view(b, hq, i1 - i0, dv)
    return out


def _backward(plan: _Plan, out, grad_out, needs):
    b, hkv, rep, g, lq, lk, d, dv = plan.b, plan.hkv, plan.rep, plan.g, plan.lq, plan.lk, plan.d, plan.dv
    k = plan.key.view(g, lk, d)
    v = plan.value.view(g, lk, dv)
    do = grad_out.to(plan.cdt).reshape(b, hkv, rep, lq, dv)
    delta_row = (do * out.view(b, hkv, rep, lq, dv)).sum(-1)  # rowsum(dO * O), [B, Hkv, rep, Lq]
    dq = torch.zeros(b, hkv, rep, lq, d, device=plan.device, dtype=plan.cdt)
    dk = torch.zeros(g, lk, d, device=plan.device, dtype=plan.cdt)
    dvv = torch.zeros(g, lk, dv, device=plan.device, dtype=plan.cdt)
    dlam = torch.zeros(b, hkv, rep, lq, device=plan.device, dtype=plan.cdt)
    dpi = torch.zeros(g, 1, lk, device=plan.device, dtype=plan.cdt)
    keep = plan.keep.reshape(g, lk, 1)
    dbuf = None
    for i0, i1, ks, ke in plan.chunks():
        if ke <= ks:
            continue
        cc, kw = i1 - i0, ke - ks
        rows = rep * cc
        p, qc, phi = plan.probs(i0, i1, ks, ke)
        doc = do[:, :, :, i0:i1].reshape(g, rows, dv)
        dvv[:, ks:ke].baddbmm_(p.transpose(1, 2), doc)
        n_s = g * rows * kw
        if dbuf is None or dbuf.numel() < n_s:
            dbuf = torch.empty(plan.buf.numel(), device=plan.device, dtype=plan.cdt)
        ds = torch.bmm(doc, v[:, ks:ke].transpose(1, 2), out=dbuf[:n_s].view(g, rows, kw))
        ds.sub_(delta_row[:, :, :, i0:i1].reshape(g, rows, 1)).mul_(p)
        if needs[0]:
            dq[:, :, :, i0:i1] = torch.bmm(ds, k[:, ks:ke]).mul_(plan.scale).view(b, hkv, rep, cc, d)
        if needs[1]:
            dk[:, ks:ke].baddbmm_(ds.transpose(1, 2), qc, alpha=plan.scale)
        if needs[3] or needs[4]:
            # u = dS * phi; d lambda = -u @ (1 - pi) (rows), d pi = lambda^T u (columns)
            u = torch.mul(ds.view(b, hkv, rep, cc, kw), phi, out=p.view(b, hkv, rep, cc, kw))
            u = u.view(g, rows, kw)
            if needs[3]:
                dlam[:, :, :, i0:i1] = torch.bmm(u, keep[:, ks:ke]).neg_().view(b, hkv, rep, cc)
            if needs[4]:
                dpi[:, :, ks:ke].baddbmm_(plan.lam[..., i0:i1].reshape(g, 1, rows), u)
    return dq, dk, dvv, dlam, dpi


# distance -> (dtype, device) -> R with R[n - 1 - t] = phi(t) for t < n = len(R): the
# phi row of a decode step over Lk keys is the view R[n - Lk:], shared by every
# layer of the step and by later steps until Lk outgrows it.
_PHI_REVERSED: dict = {}


def _phi_reversed(lk: int, distance: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (distance, dtype, device)
    r = _PHI_REVERSED.get(key)
    if r is None or r.numel() < lk:
        n = max(4096, 1 << (lk - 1).bit_length())
        delta = torch.arange(n - 1, -1, -1, device=device, dtype=torch.int64)
        r = _PHI_REVERSED[key] = _phi(delta, distance, dtype)
    return r[r.numel() - lk :]


def _decode(query, key, value, query_gate, key_gate, attn_mask, scale, distance, is_causal=True, query_offset=None,
            window=None):
    """One query row per head (a decode step), no gradient: a handful of ops.

    At the default offset the row sits at position ``Lk - 1``, so key ``j`` is at
    distance ``Lk - 1 - j`` causal or not, and no causal mask is needed.
    """
    b, hq, _, d = query.shape
    hkv, lk, dv = key.shape[1], key.shape[2], value.shape[3]
    rep, g = hq // hkv, b * hkv
    cdt = _compute_dtype(query.dtype)
    band = None
    if query_offset is None and window is None:
        phi = _phi_reversed(lk, distance, cdt, query.device).view(1, 1, lk)
    else:
        off = lk - 1 if query_offset is None else query_offset
        off = torch.as_tensor(off, device=query.device).view(-1, 1)
        delta = off - torch.arange(lk, device=query.device)  # [B or 1, Lk]
        dlo, dhi = delta_range(is_causal, window)
        if dlo is not None:
            band = delta >= dlo
        if dhi is not None:
            band = (delta <= dhi) if band is None else band & (delta <= dhi)
        phi = _phi(delta.clamp_min(0) if is_causal else delta.abs(), distance, cdt).unsqueeze(1)
    # bias = -lambda (1 - pi) phi = lambda (pi - 1) phi, as [B, Hkv, rep, Lk]
    keep_phi = (key_gate.to(cdt) - 1).mul_(phi).view(b, hkv, 1, lk)
    s = torch.mul(query_gate.to(cdt).reshape(b, hkv, rep, 1), keep_phi)
    if band is not None:
        s.masked_fill_(band.logical_not().view(-1, 1, 1, lk), _NEG_INF)
    if attn_mask is not None:
        m = attn_mask.expand(b, hq, 1, lk).reshape(b, hkv, rep, lk)
        s.masked_fill_(m.logical_not(), _NEG_INF)
    k = key.to(cdt).reshape(g, lk, d)
    p = s.view(g, rep, lk).baddbmm_(query.to(cdt).reshape(g, rep, d), k.transpose(1, 2), alpha=scale)
    _softmax_out(p, -1, False, out=p)
    if attn_mask is not None or band is not None:
        p.nan_to_num_(0.0)  # a row with every key masked: zeros, as GAPE defines it
    out = torch.bmm(p, value.to(cdt).reshape(g, lk, dv))
    return out.view(b, hq, 1, dv).to(query.dtype)


class _GapeAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, query_gate, key_gate, attn_mask, is_causal, scale, distance, chunk_size,
                query_offset=None, window=None, segments=None):
        lse = None
        positions = None
        if segments is not None or _use_cpu_kernel(query, key, value):
            b, lq, lk = query.shape[0], query.shape[2], key.shape[2]
            positions = _kernel_positions(b, lq, lk, is_causal, query_offset, window, segments)
            out, lse = _kernel_forward(query, key, value, query_gate, key_gate, attn_mask, is_causal, scale, distance,
                                       True, positions)
        else:
            plan = _Plan(query, key, value, query_gate, key_gate, attn_mask, is_causal, scale, distance, chunk_size,
                         query_offset, window)
            out = _forward(plan)
        # lse (the kernel's row log-sum-exp) selects the kernel's backward
        ctx.save_for_backward(query, key, value, query_gate, key_gate, attn_mask, out, lse)
        ctx.args = (is_causal, scale, distance, chunk_size, query_offset, window)
        ctx.positions = positions
        return out.view(query.shape[0], query.shape[1], query.shape[2], value.shape[3]).to(query.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        query, key, value, query_gate, key_gate, attn_mask, out, lse = ctx.saved_tensors
        is_causal, scale, distance, chunk_size, query_offset, window = ctx.args
        needs = ctx.needs_input_grad[:5]
        if lse is not None:
            dq, dk, dv, dlam, dpi = _kernel_backward(query, key, value, query_gate, key_gate, attn_mask, is_causal,
                                                     scale, distance, out, lse, grad_out, ctx.positions)
        else:
            plan = _Plan(query, key, value, query_gate, key_gate, attn_mask, *ctx.args)
            dq, dk, dv, dlam, dpi = _backward(plan, out, grad_out, needs)
        return (
            dq.view(query.shape).to(query.dtype) if needs[0] else None,
            dk.view(key.shape).to(key.dtype) if needs[1] else None,
            dv.view(value.shape).to(value.dtype) if needs[2] else None,
            dlam.view(query_gate.shape).to(query_gate.dtype) if needs[3] else None,
            dpi.view(key_gate.shape).to(key_gate.dtype) if needs[4] else None,
            None, None, None, None, None, None, None, None,
        )


def _uniform(query_offset):
    """An offset tensor whose entries are all equal becomes that int (reads the values)."""
    if isinstance(query_offset, torch.Tensor):
        flat = query_offset.reshape(-1)
        if flat.numel() == 1 or bool((flat == flat[0]).all()):
            return int(flat[0])
    return query_offset


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
    *,
    query_offset=None,
    window=None,
) -> torch.Tensor:
    """GAPE attention on validated inputs (see :func:`gape.attention`).

    ``chunk_size`` (query rows per tile, default :data:`CHUNK_SIZE`) trades
    memory (``B * Hq * chunk_size * Lk`` floats, twice in the backward) for
    fewer, larger GEMMs. ``query_offset`` (None, an int or an int64 ``[B]``
    tensor) and ``window`` (``(left, right)`` or None) as in :func:`gape.attention`.
    """
    if not torch.compiler.is_compiling():  # a traced decode step keeps its offset a tensor
        query_offset = _uniform(query_offset)
    if isinstance(query_offset, int) and query_offset == key.shape[2] - query.shape[2]:
        query_offset = None  # the bottom-right default: keep its fast paths
    tensors = (query, key, value, query_gate, key_gate)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    # A decode step (Lq = 1) is faster through _decode, whose GEMMs fold a GQA group's
    # query heads into rows: 496 vs 722 us at Lk = 4096, 9/3 heads, one thread.
    if not grad and query.shape[2] == 1 and FORWARD != "kernel":
        return _decode(query, key, value, query_gate, key_gate, attn_mask, scale, distance, is_causal, query_offset,
                       window)
    kernel = _use_cpu_kernel(query, key, value)
    if isinstance(query_offset, torch.Tensor) and not kernel:
        # per-batch offsets on the pure-PyTorch tiles: one batch element at a time
        outs = []
        for i in range(query.shape[0]):
            m = None if attn_mask is None else attn_mask[i : i + 1] if attn_mask.shape[0] > 1 else attn_mask
            outs.append(torch_attention(*(t[i : i + 1] for t in tensors), m, is_causal, scale, distance, chunk_size,
                                        query_offset=int(query_offset.reshape(-1).expand(query.shape[0])[i]),
                                        window=window))
        return torch.cat(outs, dim=0)
    if grad:
        return _GapeAttention.apply(*tensors, attn_mask, is_causal, scale, distance, chunk_size, query_offset, window)
    if kernel:
        pos = _kernel_positions(query.shape[0], query.shape[2], key.shape[2], is_causal, query_offset, window)
        out = _kernel_forward(query, key, value, query_gate, key_gate, attn_mask, is_causal, scale, distance,
                              positions=pos)
        return out.to(query.dtype)
    plan = _Plan(query, key, value, query_gate, key_gate, attn_mask, is_causal, scale, distance, chunk_size,
                 query_offset, window)
    out = _forward(plan)
    return out.view(query.shape[0], query.shape[1], query.shape[2], value.shape[3]).to(query.dtype)


def torch_attention_varlen(query, key, value, query_gate, key_gate, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                           max_seqlen_k, is_causal, scale, distance, window=None):
    """``backend="torch"`` of :func:`gape.attention_varlen` (arguments validated there).

    The C++ kernel takes the packed tensors as one batch element of ``[1, H, T, D]``
    views with one segment per sequence: no padding, no loop over sequences. Without
    the kernel (CUDA tensors, no compiler) each sequence runs through the tiles.
    """
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (query, key, value))
    lam, pi = query_gate.t().unsqueeze(0), key_gate.t().unsqueeze(0)
    if _use_cpu_kernel(q4, k4, v4):
        seg = attention_cpu.varlen_segments(cu_seqlens_q, cu_seqlens_k)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value, query_gate, key_gate)):
            out = _GapeAttention.apply(q4, k4, v4, lam, pi, None, is_causal, scale, distance, None, None, window, seg)
        else:
            pos = _kernel_positions(1, q4.shape[2], k4.shape[2], is_causal, None, window, seg)
            out = _kernel_forward(q4, k4, v4, lam, pi, None, is_causal, scale, distance, positions=pos)
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
                            None, is_causal, scale, distance, window=window)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs, dim=0) if outs else query.new_zeros(0, query.shape[1], value.shape[-1])
