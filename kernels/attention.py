"""Fused GAPE attention in Triton: forward and backward, FlashAttention-2 style.

Computes, per head (docs/maths.md),

    O = softmax(scale * Q K^T - lambda_m (1 - pi_n) phi(delta_mn)) V

without ever writing the ``[Lq, Lk]`` score matrix to memory.

Tiling
    Forward: one program per (block of ``BLOCK_M`` queries, batch x query
    head). It keeps its query tile in registers and streams ``BLOCK_N`` keys
    at a time with an online softmax in base 2: ``log2(e)`` is folded into the
    logit scale *and* into the bias, so every exponential is one ``exp2``.
    Only the log-sum-exp per row (base 2) is stored for the backward.
    The causal rule (bottom-right aligned: query ``i`` sits at cache slot
    ``i + Lk - Lq``) and per-batch key ranges ``[key_start[b], key_end[b])``
    (left or right padding) shorten the key loop; ragged tails of ``Lq``,
    ``Lk`` and the head dimension (padded to ``BLOCK_D``, a power of two, so
    80/96/112 work) are masked.

Where the bias lives
    Inside the key loop, in fp32 registers; no bias tensor exists. ``delta``
    is an integer difference of positions (exact at any cache position) and
    the tile is ``-lambda_m * (1 - pi_n) * phi2(delta)`` from one query-gate
    vector loaded once per program and one key-gate vector loaded with each
    key tile. ``phi2 = phi * log2(e)`` puts the bias in the same base-2 units
    as the scaled logits; for ``"log"`` that is ``log2(1 + delta)``, a single
    hardware ``lg2`` per score (a libdevice ``logf`` would cost a dozen FMAs).

Backward and gate gradients
    ``dS = P * (dP - rowsum(dO * O))`` (the preprocess kernel computes the
    rowsum). Since ``d bias / d pi_n = lambda_m phi`` and
    ``d bias / d lambda_m = -(1 - pi_n) phi``:

    * the dK/dV kernel (one program per key block and key/value head) walks
      the queries of every query head in its GQA group, accumulating dK, dV
      and ``d pi_n = sum_m dS_mn lambda_m phi_mn`` -- a column reduction done
      in registers, summed over the group inside the program;
    * the dQ kernel (one program per query block and query head) walks the
      keys, accumulating dQ and ``d lambda_m = -sum_n dS_mn (1 - pi_n) phi_mn``
      -- a row reduction.

    Both sums run on ``phi2`` and are multiplied by ``ln 2`` once at the end.
    Every output element is written by exactly one program: deterministic,
    no atomics, no repeated K/V for GQA.

Host side: :func:`triton_attention` is ``backend="triton"`` of
:func:`gape.attention`. The forward and backward are ``torch.library`` custom
ops (``gape::triton_attention_fwd`` / ``_bwd``) with fake implementations and a
registered autograd formula, so ``torch.compile`` traces through them.
Under ``TRITON_INTERPRET=1`` (read by Triton when the kernels are decorated,
i.e. when this module is imported) the kernels run on CPU tensors.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .key_ranges import mask_to_key_ranges

LOG2E = 1.4426950408889634  # 1/ln 2: exp(x) == exp2(x * LOG2E)
DISTANCE_CODES = {"log": 0, "linear": 1}
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# The interpreter has no libdevice fast-math functions.
HW_LOG2 = tl.constexpr(not INTERPRET)

# ---------------------------------------------------------------------------
# Autotuning. Keys: the padded head dims, causality, and power-of-two buckets of
# the lengths (a decode step must not retune at every new cache length).
# The dtype of every tensor argument is part of Triton's key already.
# ---------------------------------------------------------------------------


ALL = (64, 128, 256)


def _cfg(bm, bn, warps, stages, sm80=ALL, sm90=ALL, window80=None, window90=None, softcap80=ALL, softcap90=ALL):
    """A tile shipped for the head-dim classes (padded head dim <= 64, <= 128,
    <= 256) listed per architecture family: the classes where
    ``gape audit-kernels`` measured zero spills and shared memory in bounds.
    ``window80`` / ``window90``: the classes for the windowed and packed
    (varlen) variants, whose extra bounds cost registers (default: the same).
    ``softcap80`` / ``softcap90``: the classes also allowed with the soft-cap, whose
    backward keeps a tanh tile live (default: all)."""
    cfg = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
    cfg.head_dims = {80: tuple(sm80), 90: tuple(sm90)}
    cfg.window_head_dims = {80: tuple(sm80 if window80 is None else window80),
                            90: tuple(sm90 if window90 is None else window90)}
    cfg.softcap_head_dims = {80: tuple(softcap80), 90: tuple(softcap90)}
    return cfg


if INTERPRET:
    # The interpreter runs numpy per block: one small config, no tuning, and
    # 16-wide blocks exercise the ragged-tail masks at tiny test shapes.
    FWD_CONFIGS = [_cfg(16, 16, 1, 1)]
    BWD_KV_CONFIGS = [_cfg(16, 16, 1, 1)]
    BWD_Q_CONFIGS = [_cfg(16, 16, 1, 1)]
else:
    D64, D128 = (64,), (64, 128)
    # window80/window90 drop a tile from the windowed/varlen variants where it spills
    # (audit, triton 3.9.0) and keep it for the dense ones, where it is the fastest.
    FWD_CONFIGS = [
        _cfg(128, 64, 8, 3, D128, D128), _cfg(128, 128, 8, 2, D128, D64, window80=()), _cfg(64, 128, 8, 2, D128, D128),
        _cfg(64, 64, 4, 3, (128,), D128), _cfg(128, 32, 8, 2, (128,), D128),
        # (16x128 with the soft-cap spills 8 B on sm_80 at D128, causal window: softcap80)
        _cfg(64, 32, 4, 2, (128, 256), ALL), _cfg(16, 64, 4, 2), _cfg(16, 128, 4, 2, D128, D128, softcap80=D64),  # decode, D=256
    ]
    # dK/dV: BLOCK_N keys stay resident, BLOCK_M queries stream.
    BWD_KV_CONFIGS = [
        # (64x128 w8 is gone: on sm_90 it spills at D64 in the causal linear dense variant too)
        # (softcap90: the soft-cap's tanh tile spills 64x64 w8 at D64 and 32x64 w8 at D128 (varlen) on sm_90)
        _cfg(32, 128, 8, 2, (), D64), _cfg(64, 64, 8, 2, (), D64, window90=(), softcap90=()),
        _cfg(16, 128, 8, 2, D64, D128, window80=()), _cfg(32, 64, 8, 2, (128,), D128, softcap90=D64),
        _cfg(32, 64, 4, 2, (), D64),
        _cfg(16, 64, 4, 2, D64, D128), _cfg(16, 32, 4, 1, (128, 256), ALL, window90=(128, 256)),
    ]
    # dQ: BLOCK_M queries stay resident, BLOCK_N keys stream.
    # (softcap90: with the soft-cap's tanh tile the 64-key tiles spill 16-104 B on sm_90 at D128)
    BWD_Q_CONFIGS = [
        _cfg(128, 32, 8, 2, D64, D128), _cfg(128, 64, 8, 2, (), D128, softcap90=D64), _cfg(128, 32, 8, 1, D64, D128),
        _cfg(64, 64, 8, 2, (128,), D128, softcap90=D64), _cfg(64, 64, 4, 2, (), D128, softcap90=D64),
        _cfg(64, 32, 4, 3, D128, D128, window80=D64),
        _cfg(64, 32, 8, 2, D128, D128), _cfg(16, 32, 4, 2),
    ]

# Shared memory per block on the targets we audit (A100 164 KB, H100 228 KB);
# used when no GPU is visible to bound the configs.
DEFAULT_SMEM_BYTES = 163 * 1024


def _device_limits() -> tuple[int, int]:
    """(architecture family 80 or 90, shared memory per block) of the current GPU."""
    if torch.cuda.is_available():
        dev = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(dev)
        family = 90 if torch.cuda.get_device_capability(dev)[0] >= 9 else 80
        return family, int(getattr(props, "shared_memory_per_block_optin", DEFAULT_SMEM_BYTES))
    return 80, DEFAULT_SMEM_BYTES


def head_dim_class(block_d: int) -> int:
    return 64 if block_d <= 64 else 128 if block_d <= 128 else 256


def config_fits(kernel: str, cfg: triton.Config, block_d: int, block_dv: int, elt: int, lq: int, lk: int,
                smem_limit: int, family: int = 80, windowed: bool = False, softcap: bool = False) -> bool:
    """Whether ``cfg`` is worth trying for these sizes.

    Rules, each because it changes the outcome: the tile is shipped for this
    head-dim class on this architecture (``head_dims``, from the audit's
    spill counts; ``windowed``: the window/varlen variants, ``window_head_dims``; ``softcap``: the
    soft-capped variants, also ``softcap_head_dims``); blocks longer than the sequence only add masked work
    (decode keeps ``BLOCK_M = 16``); fp32 inputs keep small tiles; the
    pipelined tiles fit shared memory.
    """
    bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    shipped = getattr(cfg, "window_head_dims" if windowed else "head_dims", {})
    cls = head_dim_class(max(block_d, block_dv))
    if cls not in shipped.get(family, ALL):
        return False
    if softcap and cls not in getattr(cfg, "softcap_head_dims", {}).get(family, ALL):
        return False
    if bm > max(16, triton.next_power_of_2(lq)) or bn > max(16, triton.next_power_of_2(lk)):
        return False
    if elt >= 4 and bm * bn > 16 * 64:
        # fp32 inputs use exact fp32 products (no tensor cores): large tiles only spill
        return False
    stages = max(cfg.num_stages, 1)
    if kernel == "fwd":
        smem = elt * (bm * block_d + stages * bn * (block_d + block_dv))
    elif kernel == "bwd_kv":
        smem = elt * (bn * (block_d + block_dv) + stages * bm * (block_d + block_dv))
    else:
        smem = elt * (bm * (block_d + block_dv) + stages * bn * (block_d + block_dv))
    return smem <= smem_limit


def _pruner(kernel: str):
    def prune(configs, named_args, **kwargs):
        # named_args holds the positional launch arguments, kwargs the rest
        args = {**named_args, **kwargs}
        block_d, block_dv = args["BLOCK_D"], args["BLOCK_DV"]
        family, limit = _device_limits()
        elt = args["Q"].element_size()
        kept = [c for c in configs
                if config_fits(kernel, c, block_d, block_dv, elt, args["Lq"], args["Lk"], limit, family,
                               windowed=bool(args.get("HAS_WINDOW", False)),
                               softcap=bool(args.get("HAS_SOFTCAP", False)))]
        # Never empty: the smallest tile compiles for every head dim we accept.
        return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]

    return prune


# HAS_BIAS: the bias-free benchmark twin must tune for itself, not reuse the biased kernel's choice.
# HAS_SINKS / HAS_SOFTCAP: the cap keeps a tanh tile live in the backward (registers).
_TUNE_KEY = ["BLOCK_D", "BLOCK_DV", "IS_CAUSAL", "HAS_BIAS", "HAS_SINKS", "HAS_SOFTCAP", "q_bucket", "k_bucket"]

# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------


@triton.jit
def _phi2(delta, IS_CAUSAL: tl.constexpr, DISTANCE: tl.constexpr):
    """phi(delta) * log2(e) in fp32 from an integer tile ``pos_q - pos_k``.

    Base 2 because the softmax runs in base 2: for "log" the factors cancel,
    ``log(1 + d) * log2(e) = log2(1 + d)``, one MUFU ``lg2`` instead of a
    libdevice ``logf`` (a dozen FMAs per score).
    """
    if IS_CAUSAL:
        delta = tl.maximum(delta, 0)  # negative entries are masked out anyway
    else:
        delta = tl.abs(delta)
    d = delta.to(tl.float32)
    if DISTANCE == 0:
        # 1 + d is exact in fp32 up to 2**24, and log2(1) == 0 keeps phi(0) exact.
        if HW_LOG2:
            # the hardware lg2.approx (relative error ~2**-22)
            return libdevice.fast_log2f(1.0 + d)
        else:
            return tl.math.log2(1.0 + d)
    else:
        return d * 1.4426950408889634


@triton.jit
def _softcap(s, softcap2):
    """``(softcap2 * tanh(s / softcap2), tanh(s / softcap2))`` for logits ``s`` in base-2 units
    (``softcap2 = softcap * log2(e)``, so the capped logit is ``softcap * tanh(scale <q, k> / softcap)``
    in base 2). ``tanh(y) = 1 - 2 / (exp(2y) + 1)``: one ``exp2``, exact at +-inf (no NaN)
    and the same code in the interpreter; the tanh is returned for the backward's
    ``1 - tanh**2``."""
    e = tl.math.exp2(s * (2.8853900817779268 / softcap2))  # exp(2 s / softcap2): 2 log2(e)
    t = 1.0 - 2.0 / (e + 1.0)
    return t * softcap2, t


@triton.jit
def _segment(QOFF, CU_Q, CU_K, off_b, Lq, Lk, IS_VARLEN: tl.constexpr):
    """The program's problem: (batch element, first query row, query rows, first key,
    keys, query offset). Dense: batch element ``off_b``, offset ``QOFF[off_b]``. Varlen:
    packed sequence ``off_b`` of batch element 0, bottom-right aligned on its own."""
    if IS_VARLEN:
        q0 = tl.load(CU_Q + off_b)
        nq = tl.load(CU_Q + off_b + 1) - q0
        k0 = tl.load(CU_K + off_b)
        nk = tl.load(CU_K + off_b + 1) - k0
        qoff = nk - nq
        batch = off_b * 0
    else:
        batch = off_b
        q0 = off_b * 0
        nq = Lq + q0
        k0 = off_b * 0
        nk = Lk + k0
        qoff = tl.load(QOFF + off_b)
    return batch, q0, nq, k0, nk, qoff


@triton.jit
def _key_bounds(KSTART, KEND, off_b, Lk, HAS_KEY_RANGE: tl.constexpr):
    if HAS_KEY_RANGE:
        lo = tl.load(KSTART + off_b)
        hi = tl.minimum(tl.load(KEND + off_b), Lk)
    else:
        lo = Lk * 0
        hi = Lk
    return lo, hi


@triton.jit
def _visible_keys(lo, hi, p_first, p_last, win_lo, win_hi, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Keys ``[lo, hi)`` that queries at positions ``p_first..p_last`` may see: the key
    range, the causal rule, and the window ``win_lo <= pos_q - pos_k <= win_hi``
    (bounds in int64: an unbounded side is +-(2**31 - 1))."""
    if IS_CAUSAL:
        hi = tl.minimum(hi, p_last + 1)
    if HAS_WINDOW:
        lo = tl.maximum(lo.to(tl.int64), p_first.to(tl.int64) - win_hi)
        hi = tl.minimum(hi.to(tl.int64), p_last.to(tl.int64) + 1 - win_lo)
        lo = tl.minimum(lo, tl.maximum(hi, 0)).to(tl.int32)
        hi = tl.maximum(hi, 0).to(tl.int32)
    return lo, hi


@triton.jit
def _visible_queries(j_first, j_last, qoff, nq, win_lo, win_hi, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Query rows ``[m_lo, m_hi)`` that may see some key of ``j_first..j_last``."""
    m_lo = nq * 0
    m_hi = nq
    if IS_CAUSAL:
        m_lo = tl.maximum(j_first - qoff, 0)
    if HAS_WINDOW:
        lo = tl.maximum(m_lo.to(tl.int64), j_first.to(tl.int64) + win_lo - qoff)
        hi = tl.minimum(m_hi.to(tl.int64), j_last.to(tl.int64) + win_hi - qoff + 1)
        m_lo = tl.minimum(lo, nq).to(tl.int32)
        m_hi = tl.maximum(hi, 0).to(tl.int32)
    return m_lo, m_hi


@triton.autotune(configs=FWD_CONFIGS, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _pruner("fwd")})
@triton.jit
def _gape_fwd_kernel(
    Q, K, V, QG, KG, KSTART, KEND, QOFF, CU_Q, CU_K, SINKS, O, LSE,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    n_qheads, group, Lq, Lk, head_dim, head_dim_v,
    win_lo, win_hi,  # allowed pos_q - pos_k when HAS_WINDOW
    qk_scale,  # scale * log2(e)
    softcap2,  # softcap * log2(e) when HAS_SOFTCAP
    q_bucket, k_bucket,  # autotune keys only
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,  # padded head dims: tile shapes must be powers of two
    IS_CAUSAL: tl.constexpr, DISTANCE: tl.constexpr,  # variants of one kernel (dead code folded away)
    HAS_KEY_RANGE: tl.constexpr, HAS_BIAS: tl.constexpr,  # HAS_BIAS=False only to benchmark the bias cost
    HAS_WINDOW: tl.constexpr, IS_VARLEN: tl.constexpr,  # local window; packed sequences (cu_seqlens)
    HAS_SINKS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,  # a learned sink logit per head; tanh logit cap
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (tf32 would lose the fp32 reference's accuracy)
):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    off_b = bh // n_qheads
    off_h = bh % n_qheads
    off_kvh = off_h // group
    batch, q0, nq, k0, nk, qoff = _segment(QOFF, CU_Q, CU_K, off_b, Lq, Lk, IS_VARLEN)
    if start_m * BLOCK_M >= nq:  # a packed sequence shorter than the grid's longest
        return
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_valid = offs_m < nq
    d_valid = offs_d < head_dim
    dv_valid = offs_dv < head_dim_v

    q_base = Q + batch.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh + q0.to(tl.int64) * stride_qm
    k_base = K + batch.to(tl.int64) * stride_kb + off_kvh.to(tl.int64) * stride_kh + k0.to(tl.int64) * stride_kn
    v_base = V + batch.to(tl.int64) * stride_vb + off_kvh.to(tl.int64) * stride_vh + k0.to(tl.int64) * stride_vn
    row = (batch * n_qheads + off_h).to(tl.int64) * Lq + q0
    kg_base = KG + (batch * (n_qheads // group) + off_kvh).to(tl.int64) * Lk + k0

    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    lam = tl.load(QG + row + offs_m, mask=m_valid, other=0.0)
    pos_q = offs_m + qoff

    lo, hi = _key_bounds(KSTART, KEND, batch, nk, HAS_KEY_RANGE)
    # keys outside every row's window (after the block's last query, causal) are never visited
    lo, hi = _visible_keys(lo, hi, start_m * BLOCK_M + qoff, (start_m + 1) * BLOCK_M - 1 + qoff, win_lo, win_hi,
                           IS_CAUSAL, HAS_WINDOW)
    lo_blk = (lo // BLOCK_N) * BLOCK_N

    if HAS_SINKS:
        # The sink is one more logit of every row with no value row: it opens the online
        # softmax as (max, sum) = (sink, 1), so it ends up in l_i and the stored LSE.
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(SINKS + off_h) * 1.4426950408889634
        l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for start_n in range(lo_blk, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_in = offs_n < hi
        kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None],
                     mask=n_in[None, :] & d_valid[:, None], other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        if HAS_SOFTCAP:
            s, _ = _softcap(s, softcap2)  # the cap first: the GAPE bias is added after it
        valid = m_valid[:, None] & n_in[None, :] & (offs_n >= lo)[None, :]
        if IS_CAUSAL:
            valid = valid & (pos_q[:, None] >= offs_n[None, :])
        if HAS_WINDOW:
            dlt = pos_q[:, None] - offs_n[None, :]
            valid = valid & (dlt >= win_lo) & (dlt <= win_hi)
        if HAS_BIAS:
            pi = tl.load(kg_base + offs_n, mask=n_in, other=0.0)
            ph2 = _phi2(pos_q[:, None] - offs_n[None, :], IS_CAUSAL, DISTANCE)
            s = s - lam[:, None] * (1.0 - pi)[None, :] * ph2
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing visible yet keeps m = -inf; subtract 0 instead so
        # exp2 sees -inf - 0 = -inf (weight 0), never -inf - -inf = NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :],
                    mask=n_in[:, None] & dv_valid[None, :], other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0  # never with a sink: a row that sees no key gives zeros and LSE = sink
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    # +inf for a row with no visible key makes every backward weight exp2(s - inf) = 0.
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    o_base = O + batch.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh + q0.to(tl.int64) * stride_om
    tl.store(o_base + offs_m[:, None] * stride_om + offs_dv[None, :], acc.to(O.dtype.element_ty),
             mask=m_valid[:, None] & dv_valid[None, :])
    tl.store(LSE + row + offs_m, lse, mask=m_valid)


@triton.jit
def _gape_bwd_preprocess(
    O, DO, DELTA, LSE, SINKS, DSINK,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    n_qheads, Lq, head_dim_v,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_SINKS: tl.constexpr,  # also reduce the sink gradient of this block of rows
):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    off_b = bh // n_qheads
    off_h = bh % n_qheads
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = (offs_m < Lq)[:, None] & (offs_dv < head_dim_v)[None, :]
    o = tl.load(O + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
                + offs_m[:, None] * stride_om + offs_dv[None, :], mask=mask, other=0.0)
    do = tl.load(DO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
                 + offs_m[:, None] * stride_dom + offs_dv[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * Lq + offs_m, delta, mask=offs_m < Lq)
    if HAS_SINKS:
        # d sink = -sum_rows p_sink * delta with p_sink = exp2(sink2 - LSE) (the LSE includes
        # the sink); one partial per program, summed on the host: deterministic, no atomics.
        lse = tl.load(LSE + bh.to(tl.int64) * Lq + offs_m, mask=offs_m < Lq, other=float("inf"))
        sink2 = tl.load(SINKS + off_h) * 1.4426950408889634
        p_sink = tl.math.exp2(sink2 - lse)
        part = -tl.sum(tl.where(offs_m < Lq, p_sink * delta, 0.0), 0)
        tl.store(DSINK + bh.to(tl.int64) * tl.num_programs(0) + start_m, part)


@triton.autotune(configs=BWD_KV_CONFIGS, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _pruner("bwd_kv")})
@triton.jit
def _gape_bwd_kv_kernel(
    Q, K, V, QG, KG, KSTART, KEND, QOFF, CU_Q, CU_K, SINKS, DO, LSE, DELTA, DK, DV, DKG,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    n_qheads, group, Lq, Lk, head_dim, head_dim_v,
    win_lo, win_hi,
    sm_scale, qk_scale,  # scale, and scale * log2(e)
    softcap2,  # softcap * log2(e) when HAS_SOFTCAP
    q_bucket, k_bucket,  # autotune keys only
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, DISTANCE: tl.constexpr,
    HAS_KEY_RANGE: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_WINDOW: tl.constexpr, IS_VARLEN: tl.constexpr,
    HAS_SINKS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,  # sinks only enter through the LSE here
    DOT_PRECISION: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    n_kvheads = n_qheads // group
    off_b = bh // n_kvheads
    off_kvh = bh % n_kvheads
    batch, q0, nq, k0, nk, qoff = _segment(QOFF, CU_Q, CU_K, off_b, Lq, Lk, IS_VARLEN)
    if start_n >= nk:  # a packed sequence shorter than the grid's longest
        return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_valid = offs_d < head_dim
    dv_valid = offs_dv < head_dim_v
    lo, hi = _key_bounds(KSTART, KEND, batch, nk, HAS_KEY_RANGE)
    n_valid = offs_n < nk
    key_ok = n_valid & (offs_n >= lo) & (offs_n < hi)

    k = tl.load(K + batch.to(tl.int64) * stride_kb + off_kvh.to(tl.int64) * stride_kh + k0.to(tl.int64) * stride_kn
                + offs_n[:, None] * stride_kn + offs_d[None, :], mask=n_valid[:, None] & d_valid[None, :], other=0.0)
    v = tl.load(V + batch.to(tl.int64) * stride_vb + off_kvh.to(tl.int64) * stride_vh + k0.to(tl.int64) * stride_vn
                + offs_n[:, None] * stride_vn + offs_dv[None, :], mask=n_valid[:, None] & dv_valid[None, :], other=0.0)
    kg_row = (batch * n_kvheads + off_kvh).to(tl.int64) * Lk + k0
    keep = 1.0 - tl.load(KG + kg_row + offs_n, mask=n_valid, other=0.0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    dpi = tl.zeros([BLOCK_N], dtype=tl.float32)

    # Only queries whose window can reach this key block (causal: not before its first key).
    m_lo, m_hi = _visible_queries(start_n, start_n + BLOCK_N - 1, qoff, nq, win_lo, win_hi, IS_CAUSAL, HAS_WINDOW)
    m_lo = (m_lo // BLOCK_M) * BLOCK_M
    for g in range(0, group):
        off_h = off_kvh * group + g
        q_base = Q + batch.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh + q0.to(tl.int64) * stride_qm
        do_base = (DO + batch.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
                   + q0.to(tl.int64) * stride_dom)
        row = (batch * n_qheads + off_h).to(tl.int64) * Lq + q0
        for start_m in range(m_lo, m_hi, BLOCK_M):
            offs_m = start_m + offs_m0
            m_valid = offs_m < nq
            qt = tl.load(q_base + offs_m[None, :] * stride_qm + offs_d[:, None],
                         mask=m_valid[None, :] & d_valid[:, None], other=0.0)
            lam = tl.load(QG + row + offs_m, mask=m_valid, other=0.0)
            lse = tl.load(LSE + row + offs_m, mask=m_valid, other=float("inf"))
            delta = tl.load(DELTA + row + offs_m, mask=m_valid, other=0.0)
            pos_q = offs_m + qoff
            st = tl.dot(k, qt, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
            if HAS_SOFTCAP:
                st, tt = _softcap(st, softcap2)
            valid = key_ok[:, None] & m_valid[None, :]
            if IS_CAUSAL:
                valid = valid & (pos_q[None, :] >= offs_n[:, None])
            if HAS_WINDOW:
                dlt = pos_q[None, :] - offs_n[:, None]
                valid = valid & (dlt >= win_lo) & (dlt <= win_hi)
            if HAS_BIAS:
                ph2 = _phi2(pos_q[None, :] - offs_n[:, None], IS_CAUSAL, DISTANCE)
                st = st - lam[None, :] * keep[:, None] * ph2
            st = tl.where(valid, st, float("-inf"))
            pt = tl.math.exp2(st - lse[None, :])
            do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_dv[None, :],
                         mask=m_valid[:, None] & dv_valid[None, :], other=0.0)
            dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
            dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            dst = pt * (dpt - delta[None, :])
            if HAS_SOFTCAP:
                # only the content logit went through tanh; the gates' bias was added after it
                dk = tl.dot((dst * (1.0 - tt * tt)).to(qt.dtype), tl.trans(qt), dk, input_precision=DOT_PRECISION)
            else:
                dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=DOT_PRECISION)
            if HAS_BIAS:
                dpi += tl.sum(dst * lam[None, :] * ph2, 1)

    dk = dk * sm_scale
    dpi = dpi * 0.6931471805599453  # ln 2: phi2 is phi in base-2 units
    tl.store(DK + batch.to(tl.int64) * stride_dkb + off_kvh.to(tl.int64) * stride_dkh + k0.to(tl.int64) * stride_dkn
             + offs_n[:, None] * stride_dkn + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=n_valid[:, None] & d_valid[None, :])
    tl.store(DV + batch.to(tl.int64) * stride_dvb + off_kvh.to(tl.int64) * stride_dvh + k0.to(tl.int64) * stride_dvn
             + offs_n[:, None] * stride_dvn + offs_dv[None, :], dv.to(DV.dtype.element_ty),
             mask=n_valid[:, None] & dv_valid[None, :])
    tl.store(DKG + kg_row + offs_n, dpi, mask=n_valid)


@triton.autotune(configs=BWD_Q_CONFIGS, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _pruner("bwd_q")})
@triton.jit
def _gape_bwd_q_kernel(
    Q, K, V, QG, KG, KSTART, KEND, QOFF, CU_Q, CU_K, SINKS, DO, LSE, DELTA, DQ, DQG,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    n_qheads, group, Lq, Lk, head_dim, head_dim_v,
    win_lo, win_hi,
    sm_scale, qk_scale,  # scale, and scale * log2(e)
    softcap2,  # softcap * log2(e) when HAS_SOFTCAP
    q_bucket, k_bucket,  # autotune keys only
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, DISTANCE: tl.constexpr,
    HAS_KEY_RANGE: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_WINDOW: tl.constexpr, IS_VARLEN: tl.constexpr,
    HAS_SINKS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,  # sinks only enter through the LSE here
    DOT_PRECISION: tl.constexpr,
):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    off_b = bh // n_qheads
    off_h = bh % n_qheads
    off_kvh = off_h // group
    batch, q0, nq, k0, nk, qoff = _segment(QOFF, CU_Q, CU_K, off_b, Lq, Lk, IS_VARLEN)
    if start_m * BLOCK_M >= nq:
        return
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_valid = offs_m < nq
    d_valid = offs_d < head_dim
    dv_valid = offs_dv < head_dim_v
    row = (batch * n_qheads + off_h).to(tl.int64) * Lq + q0
    k_base = K + batch.to(tl.int64) * stride_kb + off_kvh.to(tl.int64) * stride_kh + k0.to(tl.int64) * stride_kn
    v_base = V + batch.to(tl.int64) * stride_vb + off_kvh.to(tl.int64) * stride_vh + k0.to(tl.int64) * stride_vn
    kg_base = KG + (batch * (n_qheads // group) + off_kvh).to(tl.int64) * Lk + k0

    q = tl.load(Q + batch.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh + q0.to(tl.int64) * stride_qm
                + offs_m[:, None] * stride_qm + offs_d[None, :], mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    do = tl.load(DO + batch.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh + q0.to(tl.int64) * stride_dom
                 + offs_m[:, None] * stride_dom + offs_dv[None, :], mask=m_valid[:, None] & dv_valid[None, :],
                 other=0.0)
    lam = tl.load(QG + row + offs_m, mask=m_valid, other=0.0)
    lse = tl.load(LSE + row + offs_m, mask=m_valid, other=float("inf"))
    delta = tl.load(DELTA + row + offs_m, mask=m_valid, other=0.0)
    pos_q = offs_m + qoff

    lo, hi = _key_bounds(KSTART, KEND, batch, nk, HAS_KEY_RANGE)
    lo, hi = _visible_keys(lo, hi, start_m * BLOCK_M + qoff, (start_m + 1) * BLOCK_M - 1 + qoff, win_lo, win_hi,
                           IS_CAUSAL, HAS_WINDOW)
    lo_blk = (lo // BLOCK_N) * BLOCK_N

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dlam = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(lo_blk, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_in = offs_n < hi
        kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None],
                     mask=n_in[None, :] & d_valid[:, None], other=0.0)
        vt = tl.load(v_base + offs_n[None, :] * stride_vn + offs_dv[:, None],
                     mask=n_in[None, :] & dv_valid[:, None], other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        if HAS_SOFTCAP:
            s, t = _softcap(s, softcap2)
        valid = m_valid[:, None] & n_in[None, :] & (offs_n >= lo)[None, :]
        if IS_CAUSAL:
            valid = valid & (pos_q[:, None] >= offs_n[None, :])
        if HAS_WINDOW:
            dlt = pos_q[:, None] - offs_n[None, :]
            valid = valid & (dlt >= win_lo) & (dlt <= win_hi)
        if HAS_BIAS:
            keep = 1.0 - tl.load(kg_base + offs_n, mask=n_in, other=0.0)
            ph2 = _phi2(pos_q[:, None] - offs_n[None, :], IS_CAUSAL, DISTANCE)
            s = s - lam[:, None] * keep[None, :] * ph2
        s = tl.where(valid, s, float("-inf"))
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            dq = tl.dot((ds * (1.0 - t * t)).to(kt.dtype), tl.trans(kt), dq, input_precision=DOT_PRECISION)
        else:
            dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            dlam -= tl.sum(ds * keep[None, :] * ph2, 1)

    dq = dq * sm_scale
    dlam = dlam * 0.6931471805599453  # ln 2: phi2 is phi in base-2 units
    tl.store(DQ + batch.to(tl.int64) * stride_dqb + off_h.to(tl.int64) * stride_dqh + q0.to(tl.int64) * stride_dqm
             + offs_m[:, None] * stride_dqm + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=m_valid[:, None] & d_valid[None, :])
    tl.store(DQG + row + offs_m, dlam, mask=m_valid)


# ---------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------

MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
PREPROCESS_BLOCK_M = 16 if INTERPRET else 64


def _is_interpreted() -> bool:
    """Whether the kernels were decorated for Triton's interpreter (at import)."""
    return type(_gape_fwd_kernel.fn).__name__ == "InterpretedFunction"


def check_device(query: torch.Tensor) -> None:
    if query.device.type != "cuda" and not _is_interpreted():
        raise ValueError(
            f'the Triton GAPE kernel needs CUDA tensors, got query on {query.device}; use backend="torch" on the CPU, '
            "or set TRITON_INTERPRET=1 before importing gape to run the kernel in Triton's interpreter"
        )


def _new_output(shape, dtype, device) -> torch.Tensor:
    """Every kernel output is allocated here (uninitialized: each element is
    written by exactly one program). Tests swap in a NaN-filled allocator."""
    return torch.empty(shape, dtype=dtype, device=device)


def _bucket(n: int) -> int:
    return min(triton.next_power_of_2(max(n, 1)), 1 << 16)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _common(q, k, v, is_causal, distance, key_start, has_bias, window=None, cu_seqlens_q=None, max_seqlen_q=0,
            max_seqlen_k=0, sinks=None, softcap=None):
    b, hq, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    if not (MIN_HEAD_DIM <= d <= MAX_HEAD_DIM and MIN_HEAD_DIM <= dv <= MAX_HEAD_DIM):
        raise ValueError(f"the Triton GAPE kernel takes head dims {MIN_HEAD_DIM}..{MAX_HEAD_DIM}, got D={d}, Dv={dv}")
    if distance not in DISTANCE_CODES:
        raise ValueError(f"distance must be one of {tuple(DISTANCE_CODES)}, got {distance!r}")
    varlen = cu_seqlens_q is not None
    lo, hi = _window_bounds(is_causal, window)
    return dict(
        n_qheads=hq, group=hq // hkv, Lq=lq, Lk=lk, head_dim=d, head_dim_v=dv, win_lo=lo, win_hi=hi,
        q_bucket=_bucket(max_seqlen_q if varlen else lq), k_bucket=_bucket(max_seqlen_k if varlen else lk),
        BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_DV=max(16, triton.next_power_of_2(dv)),
        IS_CAUSAL=bool(is_causal), DISTANCE=DISTANCE_CODES[distance],
        HAS_KEY_RANGE=key_start is not None, HAS_BIAS=bool(has_bias),
        HAS_WINDOW=window is not None, IS_VARLEN=varlen,
        HAS_SINKS=sinks is not None, HAS_SOFTCAP=softcap is not None,
        softcap2=1.0 if softcap is None else float(softcap) * LOG2E,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )


def _sinks32(sinks, device) -> torch.Tensor:
    """The sinks as fp32 ``[Hq]`` (a one-element dummy without them)."""
    if sinks is None:
        return torch.zeros(1, dtype=torch.float32, device=device)
    return sinks.detach().to(device=device, dtype=torch.float32).contiguous()


_INT32_MAX = 2**31 - 1


def _window_bounds(is_causal, window) -> tuple[int, int]:
    """The allowed ``pos_q - pos_k`` as int32 kernel arguments (unbounded = +-(2**31 - 1))."""
    from gape.core.reference import delta_range

    lo, hi = delta_range(is_causal, window)
    return (-_INT32_MAX if lo is None else int(lo)), (_INT32_MAX if hi is None else int(hi))


def _ranges(key_start, key_end, device):
    if key_start is None:
        dummy = torch.zeros(1, dtype=torch.int32, device=device)
        return dummy, dummy
    return tuple(t.to(device=device, dtype=torch.int32).contiguous() for t in (key_start, key_end))


def _positions(q, k, query_offset, cu_seqlens_q, cu_seqlens_k):
    """(QOFF, CU_Q, CU_K, number of problems): int32 device tensors (dummies where unused)."""
    b, lq, lk = q.shape[0], q.shape[2], k.shape[2]
    dummy = torch.zeros(1, dtype=torch.int32, device=q.device)
    if cu_seqlens_q is not None:
        cu_q = cu_seqlens_q.to(device=q.device, dtype=torch.int32).contiguous()
        cu_k = cu_seqlens_k.to(device=q.device, dtype=torch.int32).contiguous()
        return dummy, cu_q, cu_k, cu_q.numel() - 1
    if query_offset is None:
        qoff = torch.full((b,), lk - lq, dtype=torch.int32, device=q.device)
    else:
        qoff = query_offset.to(device=q.device, dtype=torch.int32).reshape(-1).expand(b).contiguous()
    return qoff, dummy, dummy, b


def _forward_impl(q, k, v, qg, kg, key_start, key_end, is_causal, scale, distance, has_bias=True, query_offset=None,
                  window=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0, sinks=None,
                  softcap=None):
    check_device(q)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    meta = _common(q, k, v, is_causal, distance, key_start, has_bias, window, cu_seqlens_q, max_seqlen_q,
                   max_seqlen_k, sinks, softcap)
    b, hq, lq, _ = q.shape
    qg = qg.to(torch.float32).contiguous()
    kg = kg.to(torch.float32).contiguous()
    out = _new_output((b, hq, lq, v.shape[3]), q.dtype, q.device)
    lse = _new_output((b, hq, lq), torch.float32, q.device)
    ks, ke = _ranges(key_start, key_end, q.device)
    qoff, cu_q, cu_k, n = _positions(q, k, query_offset, cu_seqlens_q, cu_seqlens_k)
    rows = max_seqlen_q if cu_seqlens_q is not None else lq
    grid = lambda m: (triton.cdiv(rows, m["BLOCK_M"]), n * hq)  # noqa: E731
    _gape_fwd_kernel[grid](
        q, k, v, qg, kg, ks, ke, qoff, cu_q, cu_k, _sinks32(sinks, q.device), out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        qk_scale=scale * LOG2E, **meta,
    )
    return out, lse


def _backward_impl(do, q, k, v, qg, kg, out, lse, key_start, key_end, is_causal, scale, distance, has_bias=True,
                   query_offset=None, window=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0,
                   max_seqlen_k=0, sinks=None, softcap=None):
    """``(dq, dk, dv, d query_gate, d key_gate, d sinks)``; d sinks is None without sinks."""
    check_device(q)
    q, k, v, out, do = (_last_dim_contiguous(t) for t in (q, k, v, out, do))
    meta = _common(q, k, v, is_causal, distance, key_start, has_bias, window, cu_seqlens_q, max_seqlen_q,
                   max_seqlen_k, sinks, softcap)
    b, hq, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    qg32 = qg.to(torch.float32).contiguous()
    kg32 = kg.to(torch.float32).contiguous()
    ks, ke = _ranges(key_start, key_end, q.device)
    qoff, cu_q, cu_k, n = _positions(q, k, query_offset, cu_seqlens_q, cu_seqlens_k)
    varlen = cu_seqlens_q is not None
    rows, keys = (max_seqlen_q, max_seqlen_k) if varlen else (lq, lk)

    delta = _new_output((b, hq, lq), torch.float32, q.device)
    row_blocks = triton.cdiv(lq, PREPROCESS_BLOCK_M)
    sinks32 = _sinks32(sinks, q.device)
    # one partial sink gradient per (batch x head, row block)
    dsink_part = _new_output((b, hq, row_blocks) if sinks is not None else (1,), torch.float32, q.device)
    _gape_bwd_preprocess[(row_blocks, b * hq)](
        out, do, delta, lse, sinks32, dsink_part,
        out.stride(0), out.stride(1), out.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        hq, lq, v.shape[3],
        BLOCK_M=PREPROCESS_BLOCK_M, BLOCK_DV=meta["BLOCK_DV"], HAS_SINKS=sinks is not None,
    )
    dq = _new_output(q.shape, q.dtype, q.device)
    dk = _new_output(k.shape, k.dtype, k.device)
    dv = _new_output(v.shape, v.dtype, v.device)
    dqg = _new_output((b, hq, lq), torch.float32, q.device)
    dkg = _new_output((b, hkv, lk), torch.float32, q.device)
    _gape_bwd_kv_kernel[lambda m: (triton.cdiv(keys, m["BLOCK_N"]), n * hkv)](
        q, k, v, qg32, kg32, ks, ke, qoff, cu_q, cu_k, sinks32, do, lse, delta, dk, dv, dkg,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        sm_scale=scale, qk_scale=scale * LOG2E, **meta,
    )
    _gape_bwd_q_kernel[lambda m: (triton.cdiv(rows, m["BLOCK_M"]), n * hq)](
        q, k, v, qg32, kg32, ks, ke, qoff, cu_q, cu_k, sinks32, do, lse, delta, dq, dqg,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        sm_scale=scale, qk_scale=scale * LOG2E, **meta,
    )
    dsinks = None if sinks is None else dsink_part.sum((0, 2)).to(sinks.dtype)
    return dq, dk, dv, dqg.to(qg.dtype), dkg.to(kg.dtype), dsinks


# torch.library ops: opaque to torch.compile (it sees the fake shapes) and
# differentiable through the registered backward. Positions: query_offset (int32
# [B] or None = bottom-right), window (None or [left, right]), and for packed
# sequences cu_seqlens_q/k with max_seqlen_q/k (query/key then [1, H, T, D] views).
# Terms: sinks ([Hq] learned sink logits or None) and softcap (None = no cap).


@torch.library.custom_op("gape::triton_attention_fwd", mutates_args=())
def _fwd_op(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    query_gate: torch.Tensor, key_gate: torch.Tensor,
    key_start: Optional[torch.Tensor], key_end: Optional[torch.Tensor],
    is_causal: bool, scale: float, distance: str, has_bias: bool,
    query_offset: Optional[torch.Tensor] = None, window: Optional[list[int]] = None,
    cu_seqlens_q: Optional[torch.Tensor] = None, cu_seqlens_k: Optional[torch.Tensor] = None,
    max_seqlen_q: int = 0, max_seqlen_k: int = 0,
    sinks: Optional[torch.Tensor] = None, softcap: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward_impl(query, key, value, query_gate, key_gate, key_start, key_end, is_causal, scale, distance,
                         has_bias, query_offset, None if window is None else tuple(window), cu_seqlens_q,
                         cu_seqlens_k, max_seqlen_q, max_seqlen_k, sinks, softcap)


@_fwd_op.register_fake
def _(query, key, value, query_gate, key_gate, key_start, key_end, is_causal, scale, distance, has_bias,
      query_offset=None, window=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0,
      sinks=None, softcap=None):
    b, hq, lq, _ = query.shape
    out = query.new_empty(b, hq, lq, value.shape[3])
    lse = query.new_empty(b, hq, lq, dtype=torch.float32)
    return out, lse


@torch.library.custom_op("gape::triton_attention_bwd", mutates_args=())
def _bwd_op(
    grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    query_gate: torch.Tensor, key_gate: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    key_start: Optional[torch.Tensor], key_end: Optional[torch.Tensor],
    is_causal: bool, scale: float, distance: str, has_bias: bool,
    query_offset: Optional[torch.Tensor] = None, window: Optional[list[int]] = None,
    cu_seqlens_q: Optional[torch.Tensor] = None, cu_seqlens_k: Optional[torch.Tensor] = None,
    max_seqlen_q: int = 0, max_seqlen_k: int = 0,
    sinks: Optional[torch.Tensor] = None, softcap: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The five gradients and d sinks (an empty tensor without sinks: an op returns no None)."""
    *grads, dsinks = _backward_impl(grad_out, query, key, value, query_gate, key_gate, out, lse, key_start, key_end,
                                    is_causal, scale, distance, has_bias, query_offset,
                                    None if window is None else tuple(window), cu_seqlens_q, cu_seqlens_k,
                                    max_seqlen_q, max_seqlen_k, sinks, softcap)
    return (*grads, query.new_empty(0, dtype=torch.float32) if dsinks is None else dsinks)


@_bwd_op.register_fake
def _(grad_out, query, key, value, query_gate, key_gate, out, lse, key_start, key_end, is_causal, scale, distance,
      has_bias, query_offset=None, window=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0,
      max_seqlen_k=0, sinks=None, softcap=None):
    dsinks = query.new_empty(0, dtype=torch.float32) if sinks is None else torch.empty_like(sinks)
    return (torch.empty_like(query), torch.empty_like(key), torch.empty_like(value),
            torch.empty_like(query_gate), torch.empty_like(key_gate), dsinks)


_N_TENSOR_INPUTS = 7  # query .. key_end
_TENSOR_POSITIONS = (11, 13, 14, 17)  # query_offset, cu_seqlens_q, cu_seqlens_k, sinks
_SINKS = 17


_POSITION_DEFAULTS = (None, None, None, None, 0, 0, None, None)  # query_offset .. softcap


def _setup_context(ctx, inputs, output):
    out, lse = output
    inputs = tuple(inputs) + _POSITION_DEFAULTS[len(inputs) - 11:]
    tensors = list(inputs[:_N_TENSOR_INPUTS]) + [inputs[i] for i in _TENSOR_POSITIONS]
    ctx.save_for_backward(*tensors, out, lse)
    ctx.args = inputs
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():  # create_graph=True
        from gape.core.api import double_backward_error

        raise RuntimeError(double_backward_error("triton"))
    saved = ctx.saved_tensors
    query, key, value, query_gate, key_gate, key_start, key_end, qoff, cu_q, cu_k, sinks, out, lse = saved
    a = ctx.args
    *grads, dsinks = _bwd_op(grad_out.contiguous(), query, key, value, query_gate, key_gate, out, lse, key_start,
                             key_end, a[7], a[8], a[9], a[10], qoff, a[12], cu_q, cu_k, a[15], a[16], sinks, a[18])
    rest = [None] * (len(a) - 5)
    rest[_SINKS - 5] = None if sinks is None else dsinks
    return (*grads, *rest)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _offset_tensor(query_offset, b, device):
    if query_offset is None or isinstance(query_offset, torch.Tensor):
        return query_offset
    return torch.full((b,), int(query_offset), dtype=torch.int32, device=device)


def gape_attention_triton(query, key, value, query_gate, key_gate, key_start=None, key_end=None, is_causal=True,
                          scale=None, distance="log", has_bias=True, *, query_offset=None, window=None, sinks=None,
                          softcap=None) -> torch.Tensor:
    """The fused op with explicit per-batch key ranges (int ``[B]``, half-open).

    ``has_bias=False`` compiles the bias out (plain attention; for benchmarks).
    Shapes, ``query_offset``, ``window``, ``sinks`` and ``softcap`` as
    :func:`gape.attention`; no gate-range validation here.
    """
    if (key_start is None) != (key_end is None):
        raise ValueError("key_start and key_end must be given together (int tensors of shape [B])")
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    out, _ = _fwd_op(query, key, value, query_gate, key_gate, key_start, key_end, bool(is_causal), scale, distance,
                     bool(has_bias), _offset_tensor(query_offset, query.shape[0], query.device),
                     None if window is None else list(window), None, None, 0, 0, sinks,
                     None if softcap is None else float(softcap))
    return out


gape_attention_fused = gape_attention_triton  # the old name


def supports(call) -> str | None:
    """Why ``backend="triton"`` cannot serve ``call`` (a :class:`gape.core.api.AttentionCall`), None when it can.

    The one place that knows what the kernel takes: CUDA (or the interpreter),
    float16/bfloat16/float32, head dims MIN_HEAD_DIM..MAX_HEAD_DIM, and masks
    that are per-batch key ranges (key padding, with or without the causal rule).
    Learned sinks and the logit soft-cap are constexpr variants of the kernels.
    """
    query = call.query
    # the interpreter must be on both when the kernels were decorated and now
    if query.device.type != "cuda" and not (_is_interpreted() and os.environ.get("TRITON_INTERPRET") == "1"):
        return (
            f'the "triton" backend needs CUDA tensors (got {query.device}); on the CPU use backend="torch", '
            "or set TRITON_INTERPRET=1 before importing gape to run the kernel in Triton's interpreter"
        )
    if query.dtype == torch.float64:
        return 'the "triton" backend takes float16, bfloat16 or float32; use backend="torch" for float64'
    d, dv = query.shape[-1], call.value.shape[-1]
    if not (MIN_HEAD_DIM <= d <= MAX_HEAD_DIM and MIN_HEAD_DIM <= dv <= MAX_HEAD_DIM):
        return f'the "triton" backend takes head dims {MIN_HEAD_DIM}..{MAX_HEAD_DIM}, got D={d}, Dv={dv}; use backend="torch"'
    ranges = call.key_ranges
    return ranges if isinstance(ranges, str) else None


def triton_attention(query, key, value, query_gate, key_gate, attn_mask, is_causal, scale, distance, *,
                     query_offset=None, window=None, key_ranges=None, sinks=None, softcap=None):
    """``backend="triton"`` of :func:`gape.attention` (arguments already validated there).

    A key-padding ``attn_mask`` (see :mod:`gape.kernels.key_ranges`) becomes
    per-batch key ranges; any other mask raises ValueError. ``key_ranges``
    (from :func:`gape.core.api.select`) is the mask already analysed.
    """
    check_device(query)
    key_start = key_end = None
    if attn_mask is not None:
        ranges = key_ranges or mask_to_key_ranges(attn_mask, query.shape[2], key.shape[2], is_causal, query_offset, window)
        key_start, key_end, is_causal = ranges.start, ranges.end, ranges.causal
    return gape_attention_triton(query, key, value, query_gate, key_gate, key_start, key_end, is_causal, scale,
                                 distance, query_offset=query_offset, window=window, sinks=sinks, softcap=softcap)


def triton_attention_varlen(query, key, value, query_gate, key_gate, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                            max_seqlen_k, is_causal, scale, distance, window=None, *, sinks=None, softcap=None):
    """``backend="triton"`` of :func:`gape.attention_varlen`: one launch over every
    sequence (grid rows sized by ``max_seqlen_q``), the packed tensors read in place
    as ``[1, H, T, D]`` views. ``sinks`` ``[Hq]`` and ``softcap`` as :func:`gape.attention`."""
    check_device(query)
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (query, key, value))
    lam, pi = query_gate.t().unsqueeze(0), key_gate.t().unsqueeze(0)
    out, _ = _fwd_op(q4, k4, v4, lam, pi, None, None, bool(is_causal), float(scale), distance, True, None,
                     None if window is None else list(window), cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q),
                     int(max_seqlen_k), sinks, None if softcap is None else float(softcap))
    return out[0].transpose(0, 1)


def block_forward(query, key, value, query_gate, key_gate, query_offset, window, is_causal, scale, distance):
    """``(out, lse in base 2)`` of one block (for :mod:`gape.core.ops`), no autograd."""
    off = _offset_tensor(query_offset, query.shape[0], query.device)
    return _forward_impl(query, key, value, query_gate, key_gate, None, None, is_causal, scale, distance, True, off,
                         window)


def block_backward(grad_out, query, key, value, query_gate, key_gate, out, lse2, query_offset, window, is_causal,
                   scale, distance):
    """The five gradients of one block from the merged ``(out, lse in base 2)`` (for :mod:`gape.core.ops`)."""
    off = _offset_tensor(query_offset, query.shape[0], query.device)
    return _backward_impl(grad_out.contiguous(), query, key, value, query_gate, key_gate, out, lse2, None, None,
                          is_causal, scale, distance, True, off, window)[:5]
