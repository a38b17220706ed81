"""The pure-PyTorch tiles of the torch backend: forward strategies "sdpa-tiles"
and "gemm-tiles", the recomputing backward they share, and the decode step.

The full ``[B, Hq, Lq, Lk]`` bias is never built. Queries are processed in
chunks of ``chunk_size`` rows; one chunk's bias ``[B, Hq, chunk, Lk]`` lives in
a buffer reused by every chunk, so the extra memory is
``O(B * Hq * chunk_size * Lk)``.

- ``sdpa_tiles_forward``: each chunk's bias goes as a float ``attn_mask`` to
  PyTorch's own fused CPU attention (``F.scaled_dot_product_attention``: the
  blocked flash kernel keeps the ``QK^T`` blocks, the bias add and the softmax
  in cache, GQA native); best with several threads and a prefill-sized query.
- ``gemm_tiles_forward``: our own GEMMs fold the ``rep = Hq // Hkv`` query heads
  of a group into the rows (``[B*Hkv, rep*chunk, D] @ [B*Hkv, D, Lk]``, each
  K/V tile read once per group, never repeated), the bias enters the ``QK^T``
  GEMM as its ``C`` operand (``baddbmm``) and one in-place softmax per tile
  gives the probabilities. ``tiles_backward`` is this recomputation followed
  by the gradient GEMMs.
- ``phi(delta)`` only depends on ``pos_q - pos_k``: a ``[chunk, Lq + Lk]``
  Toeplitz table built once per call (``phi`` evaluated once per distance)
  gives every chunk's ``phi`` tile as a slice. The per-kv-head product
  ``(1 - pi) * phi`` is formed once per chunk and shared by the ``rep`` query
  heads of the group.
- Causal chunks only touch keys up to their last position, and only the
  ``chunk x chunk`` diagonal block needs a ``-inf`` mask.

Distances are formed from int64 positions and converted to float32 (float64
for float64 inputs) before ``phi``: exact up to position 2**24.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import delta_range
from .reference import phi as _phi

# Query rows per chunk. 64 keeps a [9 heads, 64, 4096] float32 bias tile close to
# the caches while each fused-attention call still has enough (head, row block)
# work items for every thread (32 and 128 were slower: docs/kernels.md, "The torch backend").
CHUNK_SIZE = 64

_NEG_INF = float("-inf")
_softmax_out = torch.ops.aten._softmax.out


def _viewable(t: torch.Tensor, shape) -> bool:
    try:
        t.view(shape)
    except RuntimeError:
        return False
    return True


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class TilePlan:
    """Everything about one call that does not depend on the chunk."""

    def __init__(self, query, key, value, query_gate, key_gate, attn_mask, is_causal, scale, distance, chunk_size,
                 query_offset=None, window=None, sinks=None, softcap=None):
        b, hq, lq, d = query.shape
        hkv, lk, dv = key.shape[1], key.shape[2], value.shape[3]
        self.b, self.hq, self.hkv, self.rep = b, hq, hkv, hq // hkv
        self.g = b * hkv
        self.lq, self.lk, self.d, self.dv = lq, lk, d, dv
        self.is_causal, self.scale = is_causal, scale
        self.c = c = max(1, min(int(chunk_size or CHUNK_SIZE), lq))
        cdt = compute_dtype(query.dtype)
        self.cdt, self.device = cdt, query.device
        # K/V contiguous: the GEMM paths view them as [B*Hkv, Lk, D] (a no-op for cache tensors)
        self.query, self.key, self.value = query.to(cdt), key.to(cdt).contiguous(), value.to(cdt).contiguous()
        if not _viewable(self.query, (b, hkv, self.rep, lq, d)):
            self.query = self.query.contiguous()  # e.g. as_strided heads: the GEMM path views the query per group
        self.lam = query_gate.to(cdt).reshape(b, hkv, self.rep, lq)
        self.neg_lam = self.lam.neg().unsqueeze(-1)
        self.keep = (1 - key_gate.to(cdt)).reshape(b, hkv, lk)
        self.mask = attn_mask
        # learned sinks [Hq] (one logit per head in each row's denominator) as [B*Hkv, rep, 1, 1],
        # and the logit soft-cap (applied to scale <q, k> before the bias is added)
        self.sinks = None if sinks is None else sinks.to(cdt).reshape(1, hkv, self.rep, 1, 1).expand(
            b, hkv, self.rep, 1, 1).reshape(self.g, self.rep, 1, 1)
        self.softcap = None if softcap is None else float(softcap)
        # query row i sits at position i + qoff (one int here: per-batch offsets are split
        # by the caller); the allowed signed distances are [dlo, dhi] (None = unbounded)
        default = query_offset is None
        self.qoff = lk - lq if default else int(query_offset)
        self.dlo, self.dhi = delta_range(is_causal, window)
        # Without a mask every row keeps its distance-0 key (or, non-causal, any
        # key) when Lq <= Lk at the default offset; only then may the empty-row guards be skipped.
        self.may_have_empty_rows = attn_mask is not None or lq > lk or not default or self.dhi is not None
        # NaN/inf in the query or keys (one pass over each, no bigger than a GEMM's read)
        self.nonfinite = (attn_mask is not None or is_causal or window is not None) and not bool(
            torch.isfinite(self.query).all() and torch.isfinite(self.key).all()
        )
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
        self._mask_(s, i0, i1, ks, ke)
        return s, phi

    def _mask_(self, s, i0, i1, ks, ke):
        """Set the disallowed keys of one chunk's ``[B, Hkv, rep, cc, ke - ks]`` tile to ``-inf``."""
        hkv, rep = self.hkv, self.rep
        self._band(s, i0 + self.qoff, i1 - i0, ks, ke)
        if self.mask is not None:
            m = self.mask
            if m.shape[2] != 1:
                m = m[:, :, i0:i1]
            if m.shape[3] != 1:
                m = m[..., ks:ke]
            m = m.reshape(m.shape[0], hkv, rep, *m.shape[2:]) if m.shape[1] != 1 else m.unsqueeze(1)
            s.masked_fill_(m.logical_not(), _NEG_INF)

    def probs(self, i0, i1, ks, ke):
        """Attention probabilities of one chunk as ``[B*Hkv, rep*cc, ke - ks]`` (our own GEMM and softmax).

        Also returns the folded query chunk, ``phi`` and, with a soft-cap, ``tanh(scale <q, k> / cap)``
        of the chunk (its derivative is the cap's, for the backward), else None.
        """
        g, rows = self.g, self.rep * (i1 - i0)
        s, phi = self.bias(i0, i1, ks, ke)
        qc = self.query.view(self.b, self.hkv, self.rep, self.lq, self.d)[:, :, :, i0:i1].reshape(g, rows, self.d)
        k = self.key.view(g, self.lk, self.d)[:, ks:ke]
        t = None
        if self.softcap is None:
            p = s.view(g, rows, ke - ks).baddbmm_(qc, k.transpose(1, 2), alpha=self.scale)
        else:
            t = torch.bmm(qc, k.transpose(1, 2)).mul_(self.scale / self.softcap).tanh_()
            p = s.view(g, rows, ke - ks).add_(t, alpha=self.softcap)
        if self.nonfinite:
            # -inf + NaN is NaN: mask again after the product, so a NaN key the row may not
            # see (or a NaN query row with no allowed key) stays out, as in the reference
            self._mask_(p.view(self.b, self.hkv, self.rep, i1 - i0, ke - ks), i0, i1, ks, ke)
        sink = None
        if self.sinks is not None:
            sink = self.sinks.expand(g, self.rep, i1 - i0, 1).reshape(g, rows, 1)
        _softmax_rows(p, self.may_have_empty_rows, sink)
        return p, qc, phi, t


def _softmax_rows(p: torch.Tensor, may_have_empty_rows: bool, sink: torch.Tensor | None = None) -> None:
    """In-place softmax over the last dim. A row whose logits are all ``-inf`` (no
    allowed key) becomes zeros, as GAPE defines it; a NaN logit (NaN in the query,
    key or value) keeps its row NaN, as in the reference (not ``nan_to_num``).
    ``sink`` (``[..., 1]``, finite): one more logit per row in the denominator only."""
    if sink is not None:
        # the sink is finite, so the row maximum is too and a row with no key gives zeros
        m = torch.maximum(p.amax(-1, keepdim=True), sink)
        p.sub_(m).exp_()
        p.div_(p.sum(-1, keepdim=True).add_((sink - m).exp_()))
        return
    empty = p.amax(-1, keepdim=True) == _NEG_INF if may_have_empty_rows else None
    _softmax_out(p, -1, False, out=p)
    if empty is not None:
        p.masked_fill_(empty, 0.0)


def tiles_forward(plan: TilePlan, strategy: str):
    """The forward of ``strategy`` ("sdpa-tiles" or "gemm-tiles") in the compute dtype."""
    b, hq, lq, dv = plan.b, plan.hq, plan.lq, plan.dv
    out = torch.empty(b, hq, lq, dv, device=plan.device, dtype=plan.cdt)
    # SDPA adds the -inf mask to a NaN logit: only our GEMM path masks after the product
    fused = strategy == "sdpa-tiles" and not plan.nonfinite and plan.sinks is None and plan.softcap is None
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
            p, _, _, _ = plan.probs(i0, i1, ks, ke)
            o = torch.bmm(p, plan.value.view(plan.g, plan.lk, dv)[:, ks:ke])
            out[:, :, i0:i1] = o.view(b, hq, i1 - i0, dv)
    return out


def tiles_backward(plan: TilePlan, out, grad_out, needs):
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
    # d sink = -sum over rows of p_sink * rowsum(dO * O), p_sink = 1 - sum_j p_j
    dsink = torch.zeros(b, hkv, rep, device=plan.device, dtype=plan.cdt) if plan.sinks is not None else None
    keep = plan.keep.reshape(g, lk, 1)
    dbuf = None
    for i0, i1, ks, ke in plan.chunks():
        if ke <= ks:
            continue
        cc, kw = i1 - i0, ke - ks
        rows = rep * cc
        p, qc, phi, t = plan.probs(i0, i1, ks, ke)
        doc = do[:, :, :, i0:i1].reshape(g, rows, dv)
        if dsink is not None:
            p_sink = 1 - p.sum(-1).view(b, hkv, rep, cc)
            dsink -= (p_sink * delta_row[:, :, :, i0:i1]).sum(-1)
        dvv[:, ks:ke].baddbmm_(p.transpose(1, 2), doc)
        n_s = g * rows * kw
        if dbuf is None or dbuf.numel() < n_s:
            dbuf = torch.empty(plan.buf.numel(), device=plan.device, dtype=plan.cdt)
        ds = torch.bmm(doc, v[:, ks:ke].transpose(1, 2), out=dbuf[:n_s].view(g, rows, kw))
        ds.sub_(delta_row[:, :, :, i0:i1].reshape(g, rows, 1)).mul_(p)
        # the gates' bias is added after the cap: only the content logit goes through tanh
        dqk = ds if t is None else t.mul_(t).neg_().add_(1).mul_(ds)
        if needs[0]:
            dq[:, :, :, i0:i1] = torch.bmm(dqk, k[:, ks:ke]).mul_(plan.scale).view(b, hkv, rep, cc, d)
        if needs[1]:
            dk[:, ks:ke].baddbmm_(dqk.transpose(1, 2), qc, alpha=plan.scale)
        if needs[3] or needs[4]:
            # u = dS * phi; d lambda = -u @ (1 - pi) (rows), d pi = lambda^T u (columns)
            u = torch.mul(ds.view(b, hkv, rep, cc, kw), phi, out=p.view(b, hkv, rep, cc, kw))
            u = u.view(g, rows, kw)
            if needs[3]:
                dlam[:, :, :, i0:i1] = torch.bmm(u, keep[:, ks:ke]).neg_().view(b, hkv, rep, cc)
            if needs[4]:
                dpi[:, :, ks:ke].baddbmm_(plan.lam[..., i0:i1].reshape(g, 1, rows), u)
    return dq, dk, dvv, dlam, dpi, dsink


# distance -> (dtype, device) -> R with R[n - 1 - t] = phi(t) for t < n = len(R): the
# phi row of a decode step over Lk keys is the view R[n - Lk:], shared by every
# layer of the step and by later steps until Lk outgrows it.
_PHI_REVERSED: dict = {}


def phi_reversed(lk: int, distance: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (distance, dtype, device)
    r = _PHI_REVERSED.get(key)
    if r is None or r.numel() < lk:
        n = max(4096, 1 << (lk - 1).bit_length())
        delta = torch.arange(n - 1, -1, -1, device=device, dtype=torch.int64)
        r = _PHI_REVERSED[key] = _phi(delta, distance, dtype)
    return r[r.numel() - lk :]


def decode_forward(query, key, value, query_gate, key_gate, attn_mask, scale, distance, is_causal=True, query_offset=None,
            window=None):
    """One query row per head (a decode step), no gradient: a handful of ops.

    At the default offset the row sits at position ``Lk - 1``, so key ``j`` is at
    distance ``Lk - 1 - j`` causal or not, and no causal mask is needed.
    """
    b, hq, _, d = query.shape
    hkv, lk, dv = key.shape[1], key.shape[2], value.shape[3]
    rep, g = hq // hkv, b * hkv
    cdt = compute_dtype(query.dtype)
    band = None
    if query_offset is None and window is None:
        phi = phi_reversed(lk, distance, cdt, query.device).view(1, 1, lk)
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
    k = key.to(cdt).reshape(g, lk, d)
    p = s.view(g, rep, lk).baddbmm_(query.to(cdt).reshape(g, rep, d), k.transpose(1, 2), alpha=scale)
    # masked after the product: a NaN key the row may not see stays out, as in the reference
    if band is not None:
        p.view(b, hkv, rep, lk).masked_fill_(band.logical_not().view(-1, 1, 1, lk), _NEG_INF)
    if attn_mask is not None:
        m = attn_mask.expand(b, hq, 1, lk).reshape(g, rep, lk)
        p.masked_fill_(m.logical_not(), _NEG_INF)
    _softmax_rows(p, attn_mask is not None or band is not None)  # a row with every key masked: zeros
    out = torch.bmm(p, value.to(cdt).reshape(g, lk, dv))
    return out.view(b, hq, 1, dv).to(query.dtype)
