"""Tiled PyTorch GAPE attention: the CPU default, also correct on CUDA.

The full ``[B, Hq, Lq, Lk]`` score tensor is never built. Queries are processed
in chunks of ``chunk_size`` rows; one chunk's scores ``[B, Hq, chunk, Lk]`` live
in a buffer reused by every chunk, so the extra memory is
``O(B * Hq * chunk_size * Lk)``. A custom ``autograd.Function`` saves only the
per-row log-sum-exp and recomputes each tile in the backward pass
(FlashAttention-style).

What makes it fast on the CPU:

- Grouped-query attention folds the ``rep = Hq // Hkv`` query heads of a group
  into the row dimension, so each GEMM is ``[B*Hkv, rep*chunk, D] @ [B*Hkv, D, Lk]``
  and K/V are never repeated.
- The bias enters the QK^T GEMM as its ``C`` input (``baddbmm`` with
  ``beta=1``), so adding it costs no extra pass.
- ``phi(delta)`` only depends on ``pos_q - pos_k``. With the rows of a chunk
  visited in reverse order it depends on ``row + col`` (a Hankel matrix), which
  is an ``as_strided`` view of one vector computed once per call: no ``log1p``
  per tile, no index tensors. The per-kv-head product ``(1 - pi) * phi`` is
  formed once per chunk and shared by the ``rep`` query heads of the group.
- Causal chunks only touch keys up to their last position, and only the
  ``chunk x chunk`` diagonal block needs a ``-inf`` mask.
- Normalisation is deferred to the ``[rows, Dv]`` output.

Distances are formed from int64 positions and converted to float32 (float64
for float64 inputs) before ``phi``: exact up to position 2**24. Float16 and
bfloat16 inputs are computed in float32 and cast back.
"""

from __future__ import annotations

import torch

# Query rows per chunk. 64 keeps a [9 heads, 64, 4096] float32 tile (~9 MB,
# half per core) near the 4 MB-per-core L2 of the benchmark machine while the
# GEMMs still have rep*64 rows; 32..128 measured within noise of each other.
CHUNK_SIZE = 64

_NEG_INF = float("-inf")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Plan:
    """Everything about one call that does not depend on the chunk."""

    def __init__(self, query, key, value, query_gate, key_gate, attn_mask, is_causal, scale, distance, chunk_size):
        b, hq, lq, d = query.shape
        hkv, lk, dv = key.shape[1], key.shape[2], value.shape[3]
        self.b, self.hq, self.hkv, self.rep = b, hq, hkv, hq // hkv
        self.lq, self.lk, self.d, self.dv = lq, lk, d, dv
        self.is_causal, self.scale = is_causal, scale
        self.c = max(1, min(int(chunk_size or CHUNK_SIZE), lq))
        cdt = _compute_dtype(query.dtype)
        self.cdt, self.device = cdt, query.device
        g = b * hkv
        # [B, Hkv, rep, Lq, D]: the query heads of one kv group side by side.
        self.q = query.to(cdt).reshape(b, hkv, self.rep, lq, d)
        self.k = key.to(cdt).reshape(g, lk, d)
        self.v = value.to(cdt).reshape(g, lk, dv)
        self.lam = query_gate.to(cdt).reshape(b, hkv, self.rep, lq)
        self.keep = (1 - key_gate.to(cdt)).reshape(b, hkv, lk)
        self.mask = attn_mask
        # Without a mask every row keeps its distance-0 key (or, non-causal, any
        # key) when Lq <= Lk; only then may the empty-row guards be skipped.
        self.may_have_empty_rows = attn_mask is not None or lq > lk
        # Hankel vector: tile[r', j] = phi(|p_last - r' - j|) = R[N - p_last + r' + j]
        # with N the largest p_last (see module docstring); slots N - x < 0 are
        # masked by causality and hold phi(0) = 0 there.
        self.n = lk - 1
        x = torch.arange(lq + lk, device=self.device, dtype=torch.int64)
        delta = self.n - x
        delta = delta.clamp_min(0) if is_causal else delta.abs()
        delta = delta.to(cdt)
        self.phi_vec = torch.log1p(delta) if distance == "log" else delta
        self.buf = None
        self.pbuf = None
        self._future = {}  # chunk rows -> [cc, cc] causal mask of the diagonal block

    def chunks(self):
        """(i0, i1, kend) per chunk; kend = number of keys the chunk can see."""
        for i0 in range(0, self.lq, self.c):
            i1 = min(self.lq, i0 + self.c)
            kend = min(self.lk, i1 + self.lk - self.lq) if self.is_causal else self.lk
            yield i0, i1, kend

    def scores(self, i0, i1, kend):
        """Masked logits of one chunk, rows reversed, as ``[B, Hkv, rep, cc, kend]``.

        Also returns the query chunk (reversed rows, folded) and ``(1-pi)*phi``.
        """
        b, hkv, rep, cc = self.b, self.hkv, self.rep, i1 - i0
        g = b * hkv
        n_s, n_p = b * self.hq * cc * kend, g * cc * kend
        if self.buf is None or self.buf.numel() < n_s:
            self.buf = torch.empty(b * self.hq * self.c * self.lk, device=self.device, dtype=self.cdt)
            self.pbuf = torch.empty(g * self.c * self.lk, device=self.device, dtype=self.cdt)
        p_last = i1 - 1 + self.lk - self.lq
        phi = self.phi_vec.as_strided((cc, kend), (1, 1), self.n - p_last)
        keep_phi = torch.mul(self.keep[:, :, None, :kend], phi, out=self.pbuf[:n_p].view(b, hkv, cc, kend))
        s = self.buf[:n_s].view(b, hkv, rep, cc, kend)
        neg_lam = self.lam[..., i0:i1].flip(-1).unsqueeze(-1).neg()
        torch.mul(neg_lam, keep_phi.unsqueeze(2), out=s)
        qc = self.q[:, :, :, i0:i1].flip(-2).reshape(g, rep * cc, self.d)
        # s = scale * q k^T + bias. beta stays 1: MKL makes an extra pass over C for beta = -1
        s.view(g, rep * cc, kend).baddbmm_(qc, self.k[:, :kend].transpose(1, 2), alpha=self.scale)
        if self.is_causal:
            ds = kend - cc  # first column of the diagonal block (may be < 0 when Lq > Lk)
            future = self._future.get(cc)
            if future is None:
                r = torch.arange(cc, device=self.device)
                # reversed row r' sits at p_last - r'; column j is in the future iff r' + j > p_last
                future = self._future[cc] = (r[:, None] + r[None, :]) >= cc
            if ds < 0:
                future = future[:, -ds:]
            s[..., max(ds, 0):kend].masked_fill_(future, _NEG_INF)
        if self.mask is not None:
            m = self.mask
            if m.shape[2] != 1:
                m = m[:, :, i0:i1].flip(2)
            if m.shape[3] != 1:
                m = m[..., :kend]
            m = m.reshape(m.shape[0], hkv, rep, *m.shape[2:]) if m.shape[1] != 1 else m.unsqueeze(1)
            s.masked_fill_(m.logical_not(), _NEG_INF)
        return s, qc, keep_phi, phi


def _forward(plan: _Plan, need_lse: bool):
    b, hkv, rep, lq, dv = plan.b, plan.hkv, plan.rep, plan.lq, plan.dv
    g = b * hkv
    out = torch.zeros(b, hkv, rep, lq, dv, device=plan.device, dtype=plan.cdt)
    # +inf marks a row with no allowed key: exp(s - inf) = 0 in the backward.
    lse = torch.full((b, hkv, rep, lq), float("inf"), device=plan.device, dtype=plan.cdt) if need_lse else None
    for i0, i1, kend in plan.chunks():
        if kend <= 0:
            continue  # every row of this chunk precedes the cache: zeros
        cc = i1 - i0
        s, _, _, _ = plan.scores(i0, i1, kend)
        sv = s.view(g, rep * cc, kend)
        mx = sv.amax(-1, keepdim=True)
        if plan.may_have_empty_rows:
            empty = mx == _NEG_INF
            mx.masked_fill_(empty, 0.0)
        sv.sub_(mx).exp_()
        tot = sv.sum(-1, keepdim=True)
        o = torch.bmm(sv, plan.v[:, :kend])
        # an empty row has tot == 0 and o == 0; every other row has tot >= 1
        o.div_(tot.clamp_min(1e-30) if plan.may_have_empty_rows else tot)
        out[:, :, :, i0:i1] = o.view(b, hkv, rep, cc, dv).flip(-2)
        if need_lse:
            row_lse = mx + tot.log()
            if plan.may_have_empty_rows:
                row_lse.masked_fill_(empty, float("inf"))
            lse[:, :, :, i0:i1] = row_lse.view(b, hkv, rep, cc).flip(-1)
    return out, lse


def _backward(plan: _Plan, out, lse, grad_out, needs):
    b, hkv, rep, lq, lk, d, dv = plan.b, plan.hkv, plan.rep, plan.lq, plan.lk, plan.d, plan.dv
    g = b * hkv
    do = grad_out.to(plan.cdt).reshape(b, hkv, rep, lq, dv)
    delta_row = (do * out).sum(-1)  # rowsum(dO * O), [B, Hkv, rep, Lq]
    dq = torch.zeros(b, hkv, rep, lq, d, device=plan.device, dtype=plan.cdt)
    dk = torch.zeros(g, lk, d, device=plan.device, dtype=plan.cdt)
    dvv = torch.zeros(g, lk, dv, device=plan.device, dtype=plan.cdt)
    dlam = torch.zeros(b, hkv, rep, lq, device=plan.device, dtype=plan.cdt)
    dpi = torch.zeros(g, 1, lk, device=plan.device, dtype=plan.cdt)
    dbuf = None
    for i0, i1, kend in plan.chunks():
        if kend <= 0:
            continue
        cc = i1 - i0
        s, qc, keep_phi, phi = plan.scores(i0, i1, kend)
        p = s.view(g, rep * cc, kend)
        p.sub_(lse[:, :, :, i0:i1].flip(-1).reshape(g, rep * cc, 1)).exp_()
        doc = do[:, :, :, i0:i1].flip(-2).reshape(g, rep * cc, dv)
        dvv[:, :kend].baddbmm_(p.transpose(1, 2), doc)
        n_s = g * rep * cc * kend
        if dbuf is None or dbuf.numel() < n_s:
            dbuf = torch.empty(plan.buf.numel(), device=plan.device, dtype=plan.cdt)
        ds = torch.bmm(doc, plan.v[:, :kend].transpose(1, 2), out=dbuf[:n_s].view(g, rep * cc, kend))
        ds.sub_(delta_row[:, :, :, i0:i1].flip(-1).reshape(g, rep * cc, 1)).mul_(p)
        if needs[0]:
            dqc = torch.bmm(ds, plan.k[:, :kend]).mul_(plan.scale)
            dq[:, :, :, i0:i1] = dqc.view(b, hkv, rep, cc, d).flip(-2)
        if needs[1]:
            dk[:, :kend].baddbmm_(ds.transpose(1, 2), qc, alpha=plan.scale)
        if needs[3] or needs[4]:
            # u = dS * phi; d lambda = -u @ (1 - pi) (rows), d pi = lambda^T u (columns)
            u = p.view(b, hkv, rep, cc, kend)
            torch.mul(ds.view(b, hkv, rep, cc, kend), phi, out=u)
            u = u.view(g, rep * cc, kend)
            if needs[3]:
                dl = torch.bmm(u, plan.keep.reshape(g, lk, 1)[:, :kend]).neg_()
                dlam[:, :, :, i0:i1] = dl.view(b, hkv, rep, cc).flip(-1)
            if needs[4]:
                lamc = plan.lam[..., i0:i1].flip(-1).reshape(g, 1, rep * cc)
                dpi[:, :, :kend].baddbmm_(lamc, u)
    return dq, dk, dvv, dlam, dpi


class _GapeAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, query_gate, key_gate, attn_mask, is_causal, scale, distance, chunk_size):
        plan = _Plan(query, key, value, query_gate, key_gate, attn_mask, is_causal, scale, distance, chunk_size)
        out, lse = _forward(plan, need_lse=True)
        ctx.save_for_backward(query, key, value, query_gate, key_gate, attn_mask, out, lse)
        ctx.args = (is_causal, scale, distance, chunk_size)
        return out.view(query.shape[0], query.shape[1], query.shape[2], value.shape[3]).to(query.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        query, key, value, query_gate, key_gate, attn_mask, out, lse = ctx.saved_tensors
        plan = _Plan(query, key, value, query_gate, key_gate, attn_mask, *ctx.args)
        needs = ctx.needs_input_grad[:5]
        dq, dk, dv, dlam, dpi = _backward(plan, out, lse, grad_out, needs)
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
        )


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
) -> torch.Tensor:
    """GAPE attention on validated inputs (see :func:`gape.attention`).

    ``chunk_size`` (query rows per tile, default :data:`CHUNK_SIZE`) trades
    memory (``B * Hq * chunk_size * Lk`` floats, twice in the backward) for
    fewer, larger GEMMs.
    """
    tensors = (query, key, value, query_gate, key_gate)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _GapeAttention.apply(*tensors, attn_mask, is_causal, scale, distance, chunk_size)
    plan = _Plan(query, key, value, query_gate, key_gate, attn_mask, is_causal, scale, distance, chunk_size)
    out, _ = _forward(plan, need_lse=False)
    return out.view(query.shape[0], query.shape[1], query.shape[2], value.shape[3]).to(query.dtype)
