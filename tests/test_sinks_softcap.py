"""Learned attention sinks and logit soft-capping: the reference against the formulas
written out, every backend that serves them (the torch backend's GEMM tiles and its fused
C++ CPU kernel, float64, float32 and the kernel's bfloat16/float16 path) against the
float64 reference (forward and the gradients of query, key, value, both gates and the
sinks), and clear refusals where a backend does not serve them."""

from __future__ import annotations

import math
import os

import pytest
import torch

import gape
from gape.core import api, torch_backend
from gape.core.reference import reference_attention
from gape.core.torch_backend import torch_attention
from gape.kernels import attention_cpu

from helpers import Case, make_inputs

NAMES = ("output", "query", "key", "value", "query_gate", "key_gate", "sinks")


def sinks_for(hq, seed=7):
    return torch.randn(hq, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 2


def test_reference_is_the_formula():
    """Sink: exp(sink) joins the denominator only. Soft-cap: c * tanh(scale <q, k> / c), the
    bias added after it. Written out per row in float64."""
    q, k, v, lam, pi = make_inputs(Case(b=1, hq=2, hkv=1, lq=5, lk=7, d=8), lam_max=1.0)
    sinks, cap, scale = sinks_for(2), 0.7, 1 / math.sqrt(8)
    mask = torch.rand(1, 1, 5, 7, generator=torch.Generator().manual_seed(3)) > 0.3
    got = reference_attention(q, k, v, lam, pi, mask, True, scale, "log", sinks=sinks, softcap=cap)
    want = torch.zeros_like(got)
    for h in range(2):
        for i in range(5):
            pos_q = i + 2
            num, den = torch.zeros(8, dtype=torch.float64), math.exp(float(sinks[h]))
            for j in range(7):
                if j > pos_q or not mask[0, 0, i, j]:
                    continue
                s = cap * math.tanh(float(q[0, h, i] @ k[0, 0, j]) * scale / cap)
                s -= float(lam[0, h, i]) * (1 - float(pi[0, 0, j])) * math.log1p(pos_q - j)
                num += math.exp(s) * v[0, 0, j]
                den += math.exp(s)
            want[0, h, i] = num / den
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _run(fn, inputs, sinks, grad_out, dtype, **kw):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (*inputs, sinks)]
    out = fn(*leaves[:5], sinks=leaves[5], **kw)
    assert out.dtype == dtype
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    for name, leaf, g in zip(NAMES[1:], leaves, grads):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape, f"d {name}: {g.dtype} {tuple(g.shape)}"
    return [out.detach().double()] + [g.double() for g in grads]


def _check(fn, case, *, mask=None, causal=True, distance="log", cap=None, with_sinks=True, factor=2.0,
           dtype=torch.float32, atol=2e-6, **positions):
    inputs = make_inputs(case, lam_max=0.8)
    sinks = sinks_for(case.hq) if with_sinks else None
    scale = 1 / math.sqrt(case.d)
    kw = dict(attn_mask=mask, is_causal=causal, scale=scale, distance=distance, softcap=cap, **positions)
    grad_out = torch.randn(case.b, case.hq, case.lq, case.dv or case.d, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(5))

    def ref(q, k, v, lam, pi, sinks=None, attn_mask=None, is_causal=True, scale=None, distance="log", **kw):
        return reference_attention(q, k, v, lam, pi, attn_mask, is_causal, scale, distance, sinks=sinks, **kw)

    if sinks is None:  # the harness wants a sinks leaf; a zero-gradient stand-in is not passed on
        def strip(f):
            return lambda *a, sinks=None, **k: f(*a, **k) + 0 * sinks.sum()
        fn, ref_fn = strip(fn), strip(ref)
        sinks = torch.zeros(case.hq, dtype=torch.float64)
    else:
        ref_fn = ref
    truth = _run(ref_fn, inputs, sinks, grad_out, torch.float64, **kw)
    same = _run(ref_fn, inputs, sinks, grad_out, dtype, **kw)
    got = _run(fn, inputs, sinks, grad_out, dtype, **kw)
    for name, x, s, t in zip(NAMES, got, same, truth):
        assert not x.isnan().any(), f"{name} has NaN"
        err, ref_err = float((x - t).abs().max()), float((s - t).abs().max())
        bound = factor * ref_err + atol * max(1.0, float(t.abs().max()))
        assert err <= bound, (f"{name}: error {err:.2e} vs float64 exceeds {factor} x the {dtype} reference's "
                              f"{ref_err:.2e} + atol")
    # the terms matter: without them the result is far off
    if with_sinks:
        plain = reference_attention(*inputs, mask, causal, scale, distance, softcap=cap, **positions)
        assert float((plain - truth[0]).abs().max()) > 1e-2


def _torch(chunk_size, strategy="gemm-tiles"):
    def fn(q, k, v, lam, pi, sinks=None, attn_mask=None, is_causal=True, scale=None, distance="log", softcap=None,
           **positions):
        return torch_attention(q, k, v, lam, pi, attn_mask, is_causal, scale, distance, chunk_size, strategy,
                               sinks=sinks, softcap=softcap, **positions)
    return fn


def _api(backend):
    def fn(q, k, v, lam, pi, sinks=None, attn_mask=None, is_causal=True, scale=None, distance="log", softcap=None,
           query_offset=None, window=None):
        return gape.attention(q, k, v, lam, pi, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                              distance=distance, backend=backend, sinks=sinks, softcap=softcap,
                              query_offset=query_offset, window_size=window or (-1, -1))
    return fn


CASES = [Case(b=2, hq=6, hkv=2, lq=37, lk=37, d=16), Case(b=1, hq=4, hkv=4, lq=9, lk=50, d=24, dv=8),
         Case(b=2, hq=3, hkv=1, lq=1, lk=23, d=16)]
TERMS = [dict(with_sinks=True, cap=None), dict(with_sinks=False, cap=0.8), dict(with_sinks=True, cap=2.5)]


@pytest.mark.parametrize("case", CASES, ids=Case.ident)
@pytest.mark.parametrize("terms", TERMS, ids=lambda t: f"sinks{int(t['with_sinks'])}-cap{t['cap']}")
@pytest.mark.parametrize("causal,distance", [(True, "log"), (False, "linear")])
def test_torch_tiles_match_reference(case, terms, causal, distance):
    _check(_torch(16), case, causal=causal, distance=distance, **terms)


def test_tiles_with_mask_window_offset_and_empty_rows():
    case = Case(b=2, hq=4, hkv=2, lq=20, lk=30, d=16)
    mask = torch.rand(2, 1, 20, 30, generator=torch.Generator().manual_seed(1)) > 0.4
    mask[0, :, 3] = False  # a row with no key: zeros, and no gradient
    _check(_torch(8), case, mask=mask, cap=1.5)
    _check(_torch(8), case, window=(5, -1), query_offset=torch.tensor([2, 12]), cap=3.0)


@pytest.mark.parametrize("backend", ["auto", "torch", "reference"])
def test_api_routes_sinks_and_softcap(backend):
    _check(_api(backend), CASES[0], cap=1.2)


def test_sink_gradient_by_finite_differences():
    q, k, v, lam, pi = make_inputs(Case(b=1, hq=2, hkv=1, lq=6, lk=6, d=8))
    sinks = sinks_for(2).requires_grad_()
    out = torch_attention(q, k, v, lam, pi, None, True, 0.3, "log", 4, sinks=sinks, softcap=0.9)
    (g,) = torch.autograd.grad(out.sum(), sinks)
    for h in range(2):
        e = torch.zeros(2, dtype=torch.float64)
        e[h] = 1e-6
        up = torch_attention(q, k, v, lam, pi, None, True, 0.3, "log", 4, sinks=sinks.detach() + e, softcap=0.9)
        dn = torch_attention(q, k, v, lam, pi, None, True, 0.3, "log", 4, sinks=sinks.detach() - e, softcap=0.9)
        assert abs(float((up.sum() - dn.sum()) / 2e-6) - float(g[h])) < 1e-6


def test_backends_without_them_refuse_clearly():
    q, k, v, lam, pi = (t.float() for t in make_inputs(Case(b=1, hq=2, hkv=1, lq=4, lk=4, d=16)))
    sinks = torch.zeros(2)
    with pytest.raises(ValueError, match='"sdpa" backend does not implement sinks'):
        gape.attention(q, k, v, lam, pi, distance="linear", backend="sdpa", sinks=sinks)
    with pytest.raises(ValueError, match="does not implement softcap"):
        gape.attention(q, k, v, lam, pi, distance="linear", backend="sdpa", softcap=5.0)
    call = api.AttentionCall(q, k, v, None, True, "log", sinks=sinks, softcap=2.0)
    if not isinstance(api._module("triton"), str):
        # the Triton kernels implement both terms: only its usual limits can refuse the call
        assert "sinks" not in str(api._module("triton").supports(call))
    for strategy in ("sdpa-tiles", "decode"):
        with pytest.raises(ValueError, match=f"strategy='{strategy}' does not implement"):
            torch_attention(q, k, v, lam, pi, None, True, 0.25, "log", strategy=strategy, sinks=sinks)
    assert api.select("auto", q, k, v, sinks=sinks).name == "torch"


@pytest.mark.parametrize("bad,match", [
    (dict(sinks=torch.zeros(3)), r"sinks must have shape \[Hq=2\]"),
    (dict(sinks=torch.zeros(2, dtype=torch.long)), "sinks must be None or a floating tensor"),
    (dict(sinks=torch.tensor([0.0, float("-inf")])), "sinks must be finite"),
    (dict(softcap=0.0), "softcap must be a positive finite float"),
    (dict(softcap=-1.0), "softcap must be a positive finite float"),
    (dict(softcap=float("inf")), "softcap must be a positive finite float"),
    (dict(softcap="5"), "softcap must be None or a positive float"),
    (dict(softcap=True), "softcap must be None or a positive float"),
    (dict(softcap=10**400), r"softcap must be a positive finite float .*got 1000000"),  # past float range
    (dict(sinks=torch.zeros(2).to_sparse()), "sinks must be a dense"),
    (dict(sinks=torch.nested.nested_tensor([torch.zeros(2)])), "sinks must be a dense .*got a nested tensor"),
    # finite in float64, inf where attention accumulates (float32): refused, not NaN rows
    (dict(sinks=torch.tensor([0.0, 1e39], dtype=torch.float64)), "sinks must be finite in torch.float32"),
])
def test_bad_terms_are_refused(bad, match):
    q, k, v, lam, pi = (t.float() for t in make_inputs(Case(b=1, hq=2, hkv=1, lq=4, lk=4, d=16)))
    with pytest.raises((ValueError, TypeError), match=match):
        gape.attention(q, k, v, lam, pi, **bad)


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["f16", "bf16", "f32"])
def test_sinks_beyond_the_input_dtype_are_computed_in_the_accumulation_dtype(backend, dtype):
    """A sink of 1e5 is finite in float32 (where attention accumulates) though not in float16:
    the rows give it almost all their weight, so the output is about 0, never NaN."""
    q, k, v, lam, pi = make_inputs(Case(b=1, hq=2, hkv=1, lq=5, lk=5, d=8))
    sinks = torch.tensor([1e5, -3.0], dtype=torch.float64)
    got = gape.attention(q.to(dtype), k.to(dtype), v.to(dtype), lam.float(), pi.float(), sinks=sinks.float(),
                         backend=backend)
    want = reference_attention(q, k, v, lam, pi, None, True, None, "log", sinks=sinks)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=0, atol=3e-2 if dtype != torch.float32 else 1e-5)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the Triton kernel runs in its interpreter")
def test_triton_serves_them_and_auto_takes_it_on_cuda(monkeypatch):
    """The Triton kernels implement both terms (tests/test_kernels_sinks_softcap.py checks the
    numbers); on CUDA "auto" routes them there, on the CPU to the torch backend."""
    q, k, v, lam, pi = (t.float() for t in make_inputs(Case(b=1, hq=2, hkv=1, lq=4, lk=4, d=16)))
    sinks = torch.tensor([0.5, -1.0])
    want = reference_attention(q, k, v, lam, pi, None, True, None, "log", sinks=sinks, softcap=3.0)
    got = gape.attention(q, k, v, lam, pi, backend="triton", sinks=sinks, softcap=3.0)
    assert float((got - want).abs().max()) < 1e-5
    assert api.select("auto", q, k, v, sinks=sinks, softcap=3.0).name == "torch"
    monkeypatch.setattr(api, "_on_gpu", lambda query: True)
    assert api.select("auto", q, k, v, sinks=sinks, softcap=3.0).name == "triton"


def test_packed_sequences_refuse_bad_terms():
    q, k = torch.randn(6, 2, 8), torch.randn(6, 1, 8)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    args = (q, k, k, torch.rand(6, 2), torch.rand(6, 1), cu, cu, 4, 4)
    with pytest.raises(ValueError, match=r"sinks must have shape \[Hq=2\]"):
        gape.attention_varlen(*args, sinks=torch.zeros(3))
    with pytest.raises(ValueError, match="softcap must be a positive finite float"):
        gape.attention_varlen(*args, softcap=-1.0)


# ---------------------------------------------------------------------------------------------
# The fused C++ CPU kernel (strategy "kernel"): the sink joins each row's log-sum-exp, the cap is
# a template flag of its logit loop; both cross its block edges here.

kernel_only = pytest.mark.skipif(not attention_cpu.available(), reason="the fused CPU kernel is not built here")


@pytest.fixture
def small_blocks(monkeypatch):
    # 8 query rows (12 from 30 rows on) x 16 keys per block: small shapes cross many block edges
    monkeypatch.setattr(attention_cpu, "Q_BLOCK", 8)
    monkeypatch.setattr(attention_cpu, "Q_BLOCK_LONG", 12)
    monkeypatch.setattr(attention_cpu, "LONG_QUERY", 30)
    monkeypatch.setattr(attention_cpu, "K_BLOCK", 16)


KERNEL = _torch(None, "kernel")
KERNEL_CASES = [*CASES, Case(b=1, hq=2, hkv=1, lq=40, lk=23, d=16)]  # Lq > Lk: causal rows with no key
TIGHT = {torch.float64: 1e-10, torch.float32: 2e-6}


@kernel_only
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=Case.ident)
@pytest.mark.parametrize("terms", TERMS, ids=lambda t: f"sinks{int(t['with_sinks'])}-cap{t['cap']}")
@pytest.mark.parametrize("causal,distance", [(True, "log"), (False, "linear")])
def test_kernel_matches_reference(small_blocks, case, terms, causal, distance, dtype):
    _check(KERNEL, case, causal=causal, distance=distance, dtype=dtype, atol=TIGHT[dtype], **terms)


@kernel_only
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_kernel_masks_windows_offsets_and_empty_rows(small_blocks, dtype):
    tol = dict(dtype=dtype, atol=TIGHT[dtype])
    case = Case(b=2, hq=4, hkv=2, lq=20, lk=30, d=16)
    mask = torch.rand(2, 1, 20, 30, generator=torch.Generator().manual_seed(1)) > 0.4
    mask[0, :, 3] = False  # a row with no key: zeros, and no gradient
    head_mask = torch.rand(2, 4, 20, 30, generator=torch.Generator().manual_seed(2)) > 0.5
    _check(KERNEL, case, mask=mask, cap=1.5, **tol)
    _check(KERNEL, case, mask=head_mask, **tol)
    _check(KERNEL, case, window=(5, -1), query_offset=torch.tensor([2, 12]), cap=3.0, **tol)
    _check(KERNEL, case, causal=False, distance="linear", window=(4, 3), query_offset=-6, cap=0.9, **tol)
    decode = Case(b=2, hq=6, hkv=2, lq=1, lk=41, d=24, dv=8)
    _check(KERNEL, decode, query_offset=torch.tensor([40, 17]), cap=2.0, **tol)  # at the end, mid-cache
    _check(KERNEL, decode, window=(9, -1), **tol)
    # caps far above and far below the logits: the float tanh's polynomial and saturated ranges
    _check(KERNEL, case, cap=50.0, **tol)
    _check(KERNEL, case, cap=0.05, with_sinks=False, factor=2.0, **tol)


@kernel_only
def test_kernel_rows_with_no_key_give_zeros_and_no_sink_gradient():
    """A row with no allowed key is zeros with a sink as without: the sink has no value, so its
    output is empty, and its gradients (the sink's included) are zero, never NaN. With every row
    empty the sinks' gradient is exactly zero."""
    q, k, v, lam, pi = make_inputs(Case(b=2, hq=4, hkv=2, lq=6, lk=9, d=8))
    sinks = sinks_for(4)
    mask = torch.ones(2, 1, 6, 9, dtype=torch.bool)
    mask[1, :, 2] = False
    leaves = [t.clone().requires_grad_() for t in (q, k, v, lam, pi, sinks)]
    out = torch_attention(*leaves[:5], mask, True, 0.3, "log", strategy="kernel", sinks=leaves[5], softcap=1.0)
    assert float(out.detach()[1, :, 2].abs().max()) == 0.0
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    assert all(torch.isfinite(g).all() for g in grads)
    assert float(grads[0][1, :, 2].abs().max()) == 0.0 and float(grads[3][1, :, 2].abs().max()) == 0.0
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v, lam, pi, sinks)]
    ref = reference_attention(*ref_leaves[:5], mask, True, 0.3, "log", sinks=ref_leaves[5], softcap=1.0)
    (want,) = torch.autograd.grad(ref, ref_leaves[5:], torch.ones_like(ref))
    torch.testing.assert_close(grads[5], want, rtol=1e-10, atol=1e-12)
    # no row sees a key: a query before the cache
    leaves = [t.clone().requires_grad_() for t in (q, k, v, lam, pi, sinks)]
    out = torch_attention(*leaves[:5], None, True, 0.3, "log", strategy="kernel", sinks=leaves[5],
                          query_offset=-20)
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    assert float(out.detach().abs().max()) == 0.0 and all(float(g.abs().max()) == 0.0 for g in grads)


@kernel_only
@pytest.mark.parametrize("q_dtype,sink_dtype", [(torch.float64, torch.float32), (torch.float32, torch.bfloat16),
                                                (torch.bfloat16, torch.float32)])
def test_kernel_sink_gradient_in_the_sinks_dtype(q_dtype, sink_dtype):
    q, k, v, lam, pi = (t.to(q_dtype) for t in make_inputs(Case(b=1, hq=4, hkv=2, lq=5, lk=7, d=8)))
    sinks = sinks_for(4).to(sink_dtype).requires_grad_()
    out = gape.attention(q, k, v, lam.float(), pi.float(), sinks=sinks, softcap=2.0)
    (g,) = torch.autograd.grad(out.float().sum(), sinks)
    assert g.dtype == sink_dtype and g.shape == (4,)
    assert torch_backend.choose_strategy("auto", q, k, v, True, terms=True) == "kernel"


@pytest.mark.parametrize("backend", ["torch", "reference", "auto"])
@pytest.mark.parametrize("cap", [None, 1.3])
def test_packed_sequences_with_sinks(small_blocks, backend, cap):
    """gape.attention_varlen with sinks (on the CPU the C++ kernel walks the sequences as its
    segments): each sequence as its own reference call, the sinks' gradient summed over all of
    them; a sequence with no keys gives zeros and adds nothing."""
    cu_q, cu_k = (torch.tensor(c, dtype=torch.int32) for c in ([0, 5, 5, 17, 20], [0, 9, 13, 26, 26]))
    tq, tk, hq, hkv, d = 20, 26, 4, 2, 8
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(t, h, d, dtype=torch.float64, generator=g) for h, t in ((hq, tq), (hkv, tk), (hkv, tk)))
    lam = torch.rand(tq, hq, dtype=torch.float64, generator=g)
    pi = torch.rand(tk, hkv, dtype=torch.float64, generator=g)
    sinks = sinks_for(hq)
    grad_out = torch.randn(tq, hq, d, dtype=torch.float64, generator=g)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, lam, pi, sinks)]
    out = gape.attention_varlen(*leaves[:5], cu_q, cu_k, 12, 13, scale=0.3, sinks=leaves[5], softcap=cap,
                                backend=backend)
    got = [out] + list(torch.autograd.grad(out, leaves, grad_out))
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v, lam, pi, sinks)]
    outs = []
    for s in range(4):
        q0, q1, k0, k1 = int(cu_q[s]), int(cu_q[s + 1]), int(cu_k[s]), int(cu_k[s + 1])
        if k1 == k0:
            outs.append(torch.zeros(q1 - q0, hq, d, dtype=torch.float64))
            continue
        q_, l_ = ref_leaves[0][q0:q1].transpose(0, 1)[None], ref_leaves[3][q0:q1].t()[None]
        k_, v_ = ref_leaves[1][k0:k1].transpose(0, 1)[None], ref_leaves[2][k0:k1].transpose(0, 1)[None]
        o = reference_attention(q_, k_, v_, l_, ref_leaves[4][k0:k1].t()[None], None, True, 0.3, "log",
                                sinks=ref_leaves[5], softcap=cap)
        outs.append(o[0].transpose(0, 1))
    ref = torch.cat(outs, dim=0)
    want = [ref] + list(torch.autograd.grad(ref, ref_leaves, grad_out))
    for name, x, w in zip(NAMES, got, want):
        torch.testing.assert_close(x, w, rtol=1e-10, atol=1e-10, msg=name)


@kernel_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("dot", ["half", "float"])
@pytest.mark.parametrize("case", [CASES[0], CASES[2], Case(b=1, hq=4, hkv=2, lq=33, lk=70, d=24, dv=40)],
                         ids=Case.ident)
def test_kernel_half_precision_matches_reference(small_blocks, monkeypatch, dtype, dot, case):
    """bfloat16/float16 inputs (computed in float32 with either form of products) at most 2x the
    error of the reference run in that dtype, half an ulp of slack."""
    if dot == "half" and not attention_cpu.half_gemm_linked(dtype):
        pytest.skip("this torch's BLAS has no half-precision GEMM")
    monkeypatch.setenv(attention_cpu.ENV_DOT, dot)
    atol = torch.finfo(dtype).eps / 2
    for terms in TERMS:
        _check(KERNEL, case, dtype=dtype, atol=atol, **terms)
    _check(KERNEL, case, dtype=dtype, atol=atol, causal=False, distance="linear", window=(7, 2), cap=1.1)


@kernel_only
def test_kernel_sink_far_above_the_logits():
    """A sink far above every logit takes (nearly) all the weight without overflowing."""
    q, k, v, lam, pi = (t.float() for t in make_inputs(Case(b=1, hq=2, hkv=1, lq=7, lk=7, d=8)))
    sinks = torch.tensor([200.0, -200.0])
    got = torch_attention(q, k, v, lam, pi, None, True, 0.3, "log", strategy="kernel", sinks=sinks)
    want = reference_attention(*(t.double() for t in (q, k, v, lam, pi)), None, True, 0.3, "log",
                               sinks=sinks.double())
    assert torch.isfinite(got).all() and float(got[0, 0].abs().max()) < 1e-30
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
