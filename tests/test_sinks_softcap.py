"""Learned attention sinks and logit soft-capping: the reference against the formulas
written out, every backend that serves them against the float64 reference (forward and
the gradients of query, key, value, both gates and the sinks), and clear refusals where
a backend does not serve them."""

from __future__ import annotations

import math
import os

import pytest
import torch

import gape
from gape.core import api
from gape.core.reference import reference_attention
from gape.core.torch_backend import torch_attention

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
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return [out.detach().double()] + [g.double() for g in grads]


def _check(fn, case, *, mask=None, causal=True, distance="log", cap=None, with_sinks=True, factor=2.0,
           dtype=torch.float32, **positions):
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
        err, ref_err = float((x - t).abs().max()), float((s - t).abs().max())
        bound = factor * ref_err + 2e-6 * max(1.0, float(t.abs().max()))
        assert err <= bound, f"{name}: error {err:.2e} vs float64 exceeds {factor} x the fp32 reference's {ref_err:.2e}"
    # the terms matter: without them the result is far off
    if with_sinks:
        plain = reference_attention(*inputs, mask, causal, scale, distance, softcap=cap, **positions)
        assert float((plain - truth[0]).abs().max()) > 1e-2


def _torch(chunk_size):
    def fn(q, k, v, lam, pi, sinks=None, attn_mask=None, is_causal=True, scale=None, distance="log", softcap=None,
           **positions):
        return torch_attention(q, k, v, lam, pi, attn_mask, is_causal, scale, distance, chunk_size, "auto",
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
    for strategy in ("kernel", "sdpa-tiles", "decode"):
        with pytest.raises(ValueError, match=f"strategy='{strategy}' does not implement"):
            torch_attention(q, k, v, lam, pi, None, True, 0.25, "log", strategy=strategy, sinks=sinks)
    # selection: the CPU default takes the tiles, never the fused kernel
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
])
def test_bad_terms_are_refused(bad, match):
    q, k, v, lam, pi = (t.float() for t in make_inputs(Case(b=1, hq=2, hkv=1, lq=4, lk=4, d=16)))
    with pytest.raises((ValueError, TypeError), match=match):
        gape.attention(q, k, v, lam, pi, **bad)


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
