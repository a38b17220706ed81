"""The tiled PyTorch backend against the float64 reference: forward and all
five gradients, odd shapes, GQA, decode, masks, extreme gates, chunk
boundaries, low precision, and a decode step at cache position ~1e6."""

from __future__ import annotations

import math
import sys

import pytest
import torch

import gape
from gape.core import torch_backend
from gape.core.reference import reference_attention
from gape.core.torch_backend import torch_attention

from helpers import Case, assert_matches_reference, make_inputs


def backend(chunk_size=None):
    return lambda *args, **kwargs: torch_attention(*args, chunk_size=chunk_size, **kwargs)


@pytest.fixture(autouse=True, params=["kernel", "sdpa-tiles", "gemm-tiles"])
def forward_strategy(request, monkeypatch):
    """Every test runs with each forward strategy: the fused C++ kernel and the
    two pure-PyTorch tilings (the backward is shared). The strategy is the
    backend's argument; here it is bound into this module's torch_attention.
    A one-row step without autograd keeps its own decode strategy, as "auto" does."""
    real = torch_backend.torch_attention

    def with_strategy(query, key, value, query_gate, key_gate, *args, **kwargs):
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value, query_gate, key_gate))
        strategy = "decode" if query.shape[2] == 1 and not grad and request.param != "kernel" else request.param
        return real(query, key, value, query_gate, key_gate, *args, strategy=strategy, **kwargs)

    monkeypatch.setattr(sys.modules[__name__], "torch_attention", with_strategy)
    return request.param


# Lq x (Lk = Lq or Lq + 37), with D and the head grouping cycling so every
# value of each appears; chunk 16 makes 63 and 130 cross several chunk edges.
_GROUPS = ((6, 2), (9, 3))
_DIMS = (16, 64, 80)
SHAPES = []
for _i, (_lq, _extra) in enumerate((lq, e) for lq in (1, 7, 63, 130) for e in (0, 37)):
    _hq, _hkv = _GROUPS[_i % 2]
    SHAPES.append(Case(b=2 if _lq < 100 else 1, hq=_hq, hkv=_hkv, lq=_lq, lk=_lq + _extra, d=_DIMS[_i % 3]))
MODES = [(True, "log"), (True, "linear"), (False, "log"), (False, "linear")]


@pytest.mark.parametrize("case", SHAPES, ids=Case.ident)
@pytest.mark.parametrize("causal,distance", MODES, ids=lambda m: str(m))
def test_matches_reference_fp32(case, causal, distance):
    inputs = make_inputs(case)
    assert_matches_reference(backend(16), inputs, dtype=torch.float32, is_causal=causal, distance=distance)


@pytest.mark.parametrize("d", [16, 64, 80], ids=lambda d: f"D{d}")
def test_float64_is_exact(d):
    case = Case(b=1, hq=9, hkv=3, lq=45, lk=70, d=d, dv=24)
    assert_matches_reference(backend(16), make_inputs(case), dtype=torch.float64)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("distance", ["log", "linear"])
def test_gradcheck_float64(causal, distance):
    case = Case(b=1, hq=4, hkv=2, lq=5, lk=7, d=3, dv=2)
    q, k, v, lam, pi = (t.requires_grad_() for t in make_inputs(case, lam_max=1.0))
    mask = torch.ones(1, 1, 5, 7, dtype=torch.bool)
    mask[..., 1, :] = False  # one empty row: zero output and zero gradient
    mask[..., 3, 0] = False

    def fn(q, k, v, lam, pi):
        return torch_attention(q, k, v, lam, pi, mask, causal, 0.7, distance, chunk_size=2)

    assert torch.autograd.gradcheck(fn, (q, k, v, lam, pi), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("chunk", [1, 3, 16, 64, 1000], ids=lambda c: f"chunk{c}")
def test_chunk_size_does_not_change_result(chunk):
    case = Case(b=1, hq=6, hkv=2, lq=50, lk=61, d=16)
    q, k, v, lam, pi = make_inputs(case)
    want = reference_attention(q, k, v, lam, pi, None, True, 0.25, "log")
    got = torch_attention(q, k, v, lam, pi, None, True, 0.25, "log", chunk_size=chunk)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_default_chunk_boundaries_crossed():
    # Lq > CHUNK_SIZE so the default chunking runs more than one tile
    case = Case(b=1, hq=2, hkv=1, lq=torch_backend.CHUNK_SIZE * 2 + 5, lk=torch_backend.CHUNK_SIZE * 2 + 9, d=8)
    assert_matches_reference(backend(None), make_inputs(case), dtype=torch.float32)


def test_decode_gqa():
    case = Case(b=3, hq=9, hkv=3, lq=1, lk=300, d=64)
    for causal in (True, False):
        assert_matches_reference(backend(), make_inputs(case), dtype=torch.float32, is_causal=causal)


def test_left_padding_batch():
    """Each batch row left-padded by a different amount (as HF batches prompts)."""
    case = Case(b=3, hq=6, hkv=2, lq=40, lk=40, d=16)
    pad = torch.tensor([0, 5, 17])
    mask = (torch.arange(40)[None, :] >= pad[:, None])[:, None, None, :]  # [B, 1, 1, Lk]
    inputs = make_inputs(case)
    assert_matches_reference(backend(16), inputs, dtype=torch.float32, attn_mask=mask)
    # rows inside the padding see no key: exact zeros
    out = torch_attention(*(t.float() for t in inputs), mask, True, 0.25, "log", chunk_size=16)
    assert (out[1, :, :5] == 0).all() and (out[2, :, :17] == 0).all()
    assert out[0].abs().sum(-1).min() > 0


@pytest.mark.parametrize(
    "shape", [(40,), (30, 40), (2, 1, 30, 40), (1, 6, 30, 40), (2, 6, 1, 40), (2, 6, 30, 1)], ids=str
)
def test_general_mask_broadcast(shape):
    case = Case(b=2, hq=6, hkv=2, lq=30, lk=40, d=16)
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(shape, generator=g) > 0.3
    full = mask
    while full.dim() < 4:
        full = full.unsqueeze(0)
    inputs = make_inputs(case)
    for causal in (True, False):
        assert_matches_reference(backend(8), inputs, dtype=torch.float32, attn_mask=full, is_causal=causal)


@pytest.mark.parametrize("lam", [0.0, 1e4], ids=lambda x: f"lam{x:g}")
@pytest.mark.parametrize("pi", [0.0, 1.0], ids=lambda x: f"pi{x:g}")
def test_extreme_gates(lam, pi):
    case = Case(b=1, hq=4, hkv=2, lq=33, lk=50, d=16)
    q, k, v, _, _ = make_inputs(case)
    lam_t = torch.full((1, 4, 33), lam, dtype=torch.float64)
    pi_t = torch.full((1, 2, 50), pi, dtype=torch.float64)
    for causal in (True, False):
        assert_matches_reference(backend(8), (q, k, v, lam_t, pi_t), dtype=torch.float32, is_causal=causal)


def test_empty_rows_are_zero_with_zero_grads():
    """Causal Lq > Lk leaves the first rows without any key; a mask can empty others."""
    case = Case(b=1, hq=2, hkv=1, lq=20, lk=12, d=8)
    q, k, v, lam, pi = (t.float().requires_grad_() for t in make_inputs(case))
    mask = torch.ones(1, 1, 20, 12, dtype=torch.bool)
    mask[..., 15, :] = False
    out = torch_attention(q, k, v, lam, pi, mask, True, 0.3, "log", chunk_size=6)
    assert torch.isfinite(out).all()
    assert (out[:, :, :8] == 0).all() and (out[:, :, 15] == 0).all()
    out.square().sum().backward()
    for t in (q, k, v, lam, pi):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[:, :, :8] == 0).all() and (lam.grad[:, :, 15] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_low_precision(dtype, causal):
    case = Case(b=1, hq=6, hkv=2, lq=37, lk=70, d=64)
    assert_matches_reference(backend(16), make_inputs(case), dtype=dtype, is_causal=causal)
    # gates may stay float32 while q/k/v are half precision
    assert_matches_reference(backend(16), make_inputs(case), dtype=dtype, gate_dtype=torch.float32, is_causal=causal)


def test_no_grad_path_equals_autograd_path():
    case = Case(b=1, hq=6, hkv=2, lq=70, lk=90, d=16)
    inputs = [t.float() for t in make_inputs(case)]
    with torch.no_grad():
        a = torch_attention(*inputs, None, True, 0.25, "log", chunk_size=16)
    b = torch_attention(*(t.requires_grad_() for t in inputs), None, True, 0.25, "log", chunk_size=16)
    torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)


def test_decode_at_cache_position_one_million():
    """Lq = 1 after 2**20 cached keys: the bias is formed from integer
    positions, so it is exact and the output finite.

    With q = k = 0 every content score is 0 and, for pi = 0 and lambda = 1 with
    ``phi = log(1 + delta)``, the weight of the key at distance ``delta`` is
    ``(1 + delta)^-1 / H`` with ``H`` the harmonic number of 2**20 keys. Values
    are one-hot in the distance, so the output reads the weights back.
    """
    lk = 2**20
    q = torch.zeros(1, 1, 1, 4)
    k = torch.zeros(1, 1, lk, 4)
    delta = torch.arange(lk - 1, -1, -1, dtype=torch.float64)  # key j is at distance lk-1-j
    v = torch.zeros(1, 1, lk, 4)
    probe = {0: 0, 1: 1, 999: 2, lk - 1: 3}  # distance -> value channel
    for dist, ch in probe.items():
        v[0, 0, lk - 1 - dist, ch] = 1.0
    lam = torch.ones(1, 1, 1)
    pi = torch.zeros(1, 1, lk)
    out = torch_attention(q, k, v, lam, pi, None, True, 0.5, "log")
    harmonic = float((1.0 / (1.0 + delta)).sum())
    want = torch.tensor([1.0 / (1 + d) / harmonic for d in probe], dtype=torch.float64)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 0, 0].double(), want, rtol=1e-5, atol=0)
    # and with random content at that position against the float64 reference
    g = torch.Generator().manual_seed(3)
    qr, kr = torch.randn(1, 1, 1, 4, generator=g), torch.randn(1, 1, lk, 4, generator=g)
    lam_r, pi_r = torch.full((1, 1, 1), 0.3), torch.rand(1, 1, lk, generator=g)
    got = torch_attention(qr, kr, v, lam_r, pi_r, None, True, 0.5, "linear")
    ref = reference_attention(qr.double(), kr.double(), v.double(), lam_r.double(), pi_r.double(), None, True, 0.5, "linear")
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-7)


def test_auto_uses_torch_on_cpu():
    assert gape.core.api.resolve_backend("auto", torch.zeros(1, 1, 1, 4)) == "torch"


def test_output_dtype_and_noncontiguous_inputs():
    # B > 1 and [B, L, H, D] storage, as transformers hands over q/k/v before the cache copies them
    case = Case(b=2, hq=4, hkv=2, lq=20, lk=20, d=16)
    q, k, v, lam, pi = (t.float() for t in make_inputs(case))
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))  # same values, non-contiguous
    a = torch_attention(qt, kt, vt, lam, pi, None, True, 0.25, "log", chunk_size=8)
    b = torch_attention(q, k, v, lam, pi, None, True, 0.25, "log", chunk_size=8)
    assert a.dtype == torch.float32 and not (qt.is_contiguous() or kt.is_contiguous() or vt.is_contiguous())
    torch.testing.assert_close(a, b)
    qt, kt, vt = (t.requires_grad_() for t in (qt, kt, vt))
    torch_attention(qt, kt, vt, lam, pi, None, True, 0.25, "log", chunk_size=8).sum().backward()
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch_attention(q, k, v, lam, pi, None, True, 0.25, "log", chunk_size=8).sum().backward()
    for x, y in ((qt, q), (kt, k), (vt, v)):
        torch.testing.assert_close(x.grad, y.grad)


def test_auto_strategy_prefers_the_kernel_then_follows_threads_and_rows(monkeypatch):
    case = Case(b=1, hq=4, hkv=2, lq=torch_backend.SDPA_TILES_MIN_ROWS, lk=80, d=16)
    q, k, v, lam, pi = (t.float() for t in make_inputs(case))
    choose = torch_backend.choose_strategy

    assert choose("auto", q, k, v) == "kernel"  # built on every machine with a C++ compiler (CI included)
    assert choose("auto", q[:, :, :1], k, v) == "decode"
    assert choose("auto", q[:, :, :1], k, v, needs_grad=True) == "kernel"
    monkeypatch.setattr(torch_backend.attention_cpu, "available", lambda: False)
    with pytest.raises(ValueError, match="strategy='kernel'"):
        choose("kernel", q, k, v)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert choose("auto", q, k, v) == "sdpa-tiles"
    assert choose("auto", q[:, :, :1], k, v, needs_grad=True) == "gemm-tiles"  # one row
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert choose("auto", q, k, v) == "gemm-tiles"
    with pytest.raises(ValueError, match="strategy must be one of"):
        choose("fused", q, k, v)


def test_scale_is_used():
    case = Case(b=1, hq=2, hkv=1, lq=9, lk=9, d=16)
    inputs = make_inputs(case)
    assert_matches_reference(backend(4), inputs, dtype=torch.float64, scale=1.7)
    assert math.isfinite(float(torch_attention(*inputs, None, True, 1.7, "log").sum()))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("distance", ["log", "linear"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_decode_fast_path_without_grad(causal, distance, dtype):
    # Lq = 1 without autograd takes its own short path: against the reference, with GQA, B > 1,
    # a per-row padding mask with one fully masked row, and a cache longer than the phi memo
    case = Case(b=3, hq=6, hkv=2, lq=1, lk=4099, d=16)
    q, k, v, lam, pi = (t.to(dtype) for t in make_inputs(case))
    mask = torch.ones(3, 1, 1, case.lk, dtype=torch.bool)
    mask[1, ..., :50] = False
    mask[2] = False
    with torch.no_grad():
        got = torch_attention(q, k, v, lam, pi, mask, causal, 0.25, distance)
    assert got.dtype == dtype and got.shape == (3, 6, 1, 16)
    ref = reference_attention(*(t.double() for t in (q, k, v, lam, pi)), mask, causal, 0.25, distance)
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)
    assert not got[2].any()
    # the same step through the chunked forward (autograd path) agrees
    grad_path = torch_attention(q, k, v, lam.clone().requires_grad_(), pi, mask, causal, 0.25, distance)
    torch.testing.assert_close(got, grad_path.detach(), rtol=tol, atol=tol)
