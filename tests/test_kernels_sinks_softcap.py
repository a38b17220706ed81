"""Learned sinks and logit soft-capping in the fused Triton kernels, run in Triton's
interpreter on CPU tensors: forward and every gradient (query, key, value, both gates
and the sinks) against the float64 reference, with the tolerance of the interpreter
tests (2x the same-dtype reference's own error). Every kernel output, the sink
gradient's partial sums included, starts as NaN so an unwritten tile fails.
"""

from __future__ import annotations

import math

import pytest
import torch

import gape
from gape.core import api
from gape.core.reference import reference_attention
from gape.kernels import attention as kattn

import helpers
from helpers import Case

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or kattn._is_interpreted()),
    reason="needs CUDA or TRITON_INTERPRET=1 (conftest sets it on CPU-only machines)",
)

NAMES = ("output", "query", "key", "value", "query_gate", "key_gate", "sinks")
TERMS = {"sinks": (True, None), "softcap": (False, 1.3), "sinks+softcap": (True, 2.5)}


@pytest.fixture(autouse=True)
def _nan_outputs(monkeypatch):
    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(kattn, "_new_output", nan_empty)


def _inputs(case: Case, seed=11):
    q, k, v, lam, pi = helpers.make_inputs(case, lam_max=0.6, seed=seed)
    pi[..., ::5] = 1.0
    g = torch.Generator().manual_seed(seed + 1)
    # sinks of both signs and sizes, so p_sink spans small to dominant
    sinks = torch.randn(case.hq, dtype=torch.float64, generator=g) * 2
    # logits large enough that a cap of ~1-3 bends them
    return (q * 1.5, k, v, lam, pi), sinks


def _run(fn, inputs, sinks, grad_out, dtype, gate_dtype, sinks_dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs[:3]]
    leaves += [t.detach().to(gate_dtype).requires_grad_() for t in inputs[3:]]
    s = None if sinks is None else sinks.detach().to(sinks_dtype).requires_grad_()
    out = fn(*leaves, s)
    wrt = leaves + ([] if s is None else [s])
    grads = torch.autograd.grad(out, wrt, grad_out.to(out.dtype))
    for name, leaf, gr in zip(NAMES[1:], wrt, grads):
        assert gr.dtype == leaf.dtype and gr.shape == leaf.shape, f"gradient of {name}: {gr.dtype} {tuple(gr.shape)}"
    return [out.detach().double()] + [gr.double() for gr in grads]


def _assert_close(fn, ref, inputs, sinks, out_shape, dtype=torch.float32, gate_dtype=torch.float32,
                  sinks_dtype=torch.float32, factor=2.0):
    """``fn`` / ``ref``: ``(q, k, v, lam, pi, sinks) -> out``; ``ref`` is run in float64 (truth) and
    in ``dtype`` (its error sets the tolerance). Inputs on any device. Returns the float64 results
    and the errors ``{name: (err, same-dtype reference err)}``."""
    grad_out = torch.randn(*out_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    grad_out = grad_out.to(inputs[0].device)
    truth = _run(ref, inputs, sinks, grad_out, torch.float64, torch.float64, torch.float64)
    same = _run(ref, inputs, sinks, grad_out, dtype, gate_dtype, sinks_dtype)
    got = _run(fn, inputs, sinks, grad_out, dtype, gate_dtype, sinks_dtype)
    atol = helpers.ATOL[dtype]
    errors = {}
    for name, x, s, t in zip(NAMES, got, same, truth):
        assert torch.isfinite(x).all(), f"{name} has non-finite values"
        err, ref_err = helpers.max_err(x, t), helpers.max_err(s, t)
        bound = factor * ref_err + atol * max(1.0, float(t.abs().max()))
        errors[name] = (err, ref_err)
        assert err <= bound, (f"{name}: max error vs float64 {err:.3e} exceeds {factor} x the same-dtype "
                              f"reference's {ref_err:.3e} + atol ({bound:.3e}); dtype {dtype}")
    return truth, errors


def _dense(kernel_kw, ref_kw):
    def fn(q, k, v, lam, pi, sinks):
        return kattn.gape_attention_triton(q, k, v, lam, pi, sinks=sinks, **kernel_kw)

    def ref(q, k, v, lam, pi, sinks):
        return reference_attention(q, k, v, lam, pi, sinks=sinks, **ref_kw)

    return fn, ref


def _check_dense(case, terms, causal=True, distance="log", dtype=torch.float32, sinks_dtype=torch.float32,
                 query_offset=None, window=None, device="cpu"):
    with_sinks, cap = TERMS[terms]
    inputs, sinks = _inputs(case)
    inputs = tuple(t.to(device) for t in inputs)
    sinks = sinks.to(device) if with_sinks else None
    if isinstance(query_offset, torch.Tensor):
        query_offset = query_offset.to(device)
    scale = 1 / math.sqrt(case.d)
    common = dict(is_causal=causal, scale=scale, distance=distance, softcap=cap, query_offset=query_offset,
                  window=window)
    fn, ref = _dense(common, common)
    truth, errors = _assert_close(fn, ref, inputs, sinks, (case.b, case.hq, case.lq, case.dv or case.d),
                                  dtype=dtype, gate_dtype=dtype, sinks_dtype=sinks_dtype)
    # guard: the terms move the result, so a kernel that ignored them would fail above
    plain = reference_attention(*inputs, None, causal, scale, distance, query_offset=query_offset, window=window)
    assert helpers.max_err(plain, truth[0]) > 1e-2
    return errors


CASES = [
    Case(b=2, hq=4, hkv=2, lq=19, lk=27, d=24),  # GQA, odd lengths and head dim, ragged 16-wide tiles
    Case(b=1, hq=3, hkv=1, lq=24, lk=9, d=16, dv=32),  # Lq > Lk: the first rows see no key; Dv != D
]


@pytest.mark.parametrize("terms", list(TERMS))
@pytest.mark.parametrize("case", CASES, ids=Case.ident)
def test_forward_and_gradients_match_reference(case, terms):
    _check_dense(case, terms)


@pytest.mark.parametrize("terms", ["sinks", "sinks+softcap"])
def test_decode_with_per_batch_offsets(terms):
    """One query row per head at positions of a longer cache (and one before every key)."""
    case = Case(b=3, hq=4, hkv=1, lq=1, lk=37, d=32)
    _check_dense(case, terms, causal=True, distance="log", query_offset=torch.tensor([36, 20, -1]))


def test_window_noncausal_linear():
    case = Case(b=2, hq=2, hkv=1, lq=21, lk=30, d=16)
    _check_dense(case, "sinks+softcap", causal=False, distance="linear", window=(4, 3))


def test_half_inputs_with_half_sinks():
    """fp16 inputs and gates, fp16 sinks: the sink gradient comes back in the sinks' dtype."""
    case = Case(b=1, hq=4, hkv=2, lq=17, lk=23, d=16)
    _check_dense(case, "sinks+softcap", dtype=torch.float16, sinks_dtype=torch.float16)


def test_key_ranges_through_the_api():
    """gape.attention(backend="triton") with a left-padding mask, a window and both terms."""
    case = Case(b=3, hq=4, hkv=2, lq=20, lk=20, d=16)
    inputs, sinks = _inputs(case)
    start = torch.tensor([0, 6, 15])
    j = torch.arange(case.lk)
    mask = (j[None, :] >= start[:, None])[:, None, None, :]
    kw = dict(attn_mask=mask, is_causal=True, scale=0.3, distance="log", softcap=1.7)

    def fn(q, k, v, lam, pi, s):
        return gape.attention(q, k, v, lam, pi, backend="triton", sinks=s, window_size=(6, -1), **kw)

    def ref(q, k, v, lam, pi, s):
        return reference_attention(q, k, v, lam, pi, mask, True, 0.3, "log", sinks=s, softcap=1.7, window=(6, -1))

    _assert_close(fn, ref, inputs, sinks, (case.b, case.hq, case.lq, case.d))


def test_rows_without_keys_give_zeros_and_no_sink_gradient():
    """A row that sees no key puts all its weight on the sink: output zero, and (delta = 0)
    it adds nothing to any gradient, the sink's included."""
    case = Case(b=1, hq=2, hkv=1, lq=12, lk=5, d=16)
    inputs, sinks = _inputs(case)
    leaves = [t.float().requires_grad_() for t in (*inputs, sinks)]
    out = kattn.gape_attention_triton(*leaves[:5], is_causal=True, sinks=leaves[5], softcap=2.0)
    go = torch.zeros_like(out)
    go[:, :, :7] = 1.0  # gradient only on the 7 rows that see no key
    grads = torch.autograd.grad(out, leaves, go)
    assert torch.equal(out[:, :, :7], torch.zeros_like(out[:, :, :7]))
    for name, g in zip(NAMES[1:], grads):
        assert not g.any(), f"{name} has a gradient from rows that see no key"


def _varlen_ref(cu_q, cu_k, causal, scale, distance, window, cap):
    """Each packed sequence alone through the reference (bottom-right aligned), sinks shared."""
    def ref(q, k, v, lam, pi, sinks):
        outs = []
        cq, ck = cu_q.tolist(), cu_k.tolist()
        for s in range(len(cq) - 1):
            q0, q1, k0, k1 = cq[s], cq[s + 1], ck[s], ck[s + 1]
            o = reference_attention(q[q0:q1].transpose(0, 1)[None], k[k0:k1].transpose(0, 1)[None],
                                    v[k0:k1].transpose(0, 1)[None], lam[q0:q1].t()[None], pi[k0:k1].t()[None],
                                    None, causal, scale, distance, window=window, sinks=sinks, softcap=cap)
            outs.append(o[0].transpose(0, 1))
        return torch.cat(outs)

    return ref


def check_varlen(lens_q, lens_k, terms, hq=4, hkv=2, d=16, causal=True, distance="log", window=(5, -1),
                 dtype=torch.float32, device="cpu"):
    """Packed sequences through the kernel against each sequence alone through the reference."""
    with_sinks, cap = TERMS[terms]
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    tq, tk = sum(lens_q), sum(lens_k)
    g = torch.Generator().manual_seed(3)
    f64 = dict(dtype=torch.float64, generator=g)
    inputs = (torch.randn(tq, hq, d, **f64) * 1.5, torch.randn(tk, hkv, d, **f64), torch.randn(tk, hkv, d, **f64),
              torch.rand(tq, hq, **f64) * 0.6, torch.rand(tk, hkv, **f64))
    inputs = tuple(t.to(device) for t in inputs)
    sinks = (torch.randn(hq, **f64) * 2).to(device) if with_sinks else None
    scale = 1 / math.sqrt(d)
    cu_qd, cu_kd = cu_q.to(device), cu_k.to(device)

    def fn(q, k, v, lam, pi, s):
        return kattn.triton_attention_varlen(q, k, v, lam, pi, cu_qd, cu_kd, max(lens_q), max(lens_k), causal, scale,
                                             distance, window, sinks=s, softcap=cap)

    return _assert_close(fn, _varlen_ref(cu_q, cu_k, causal, scale, distance, window, cap), inputs, sinks,
                         (tq, hq, d), dtype=dtype, gate_dtype=dtype, sinks_dtype=dtype)[1]


def check_on_device(kind: str, case, device: str) -> dict:
    """One case of benchmarks/gpu_check.py: ``kind`` is ``terms[-window|-decode|-varlen]:<terms>`` and
    ``case`` a test_kernels_attention.Case (shapes, causality, distance, dtype). Returns the errors."""
    variant, terms = kind.split(":")
    shapes = Case(case.b, case.hq, case.hkv, case.lq, case.lk, case.d, case.dv)
    kw = dict(causal=case.causal, distance=case.distance, dtype=case.dtype, sinks_dtype=case.dtype, device=device)
    if variant == "terms":
        errors = _check_dense(shapes, terms, **kw)
    elif variant == "terms-window":
        errors = _check_dense(shapes, terms, window=(case.lk // 5, 0 if case.causal else case.lk // 9), **kw)
    elif variant == "terms-decode":
        offsets = torch.tensor([case.lk - 1, case.lk // 3] + [case.lk // 2] * (case.b - 2))[: case.b]
        errors = _check_dense(shapes, terms, query_offset=offsets, **kw)
    elif variant == "terms-varlen":
        errors = check_varlen([case.lq, 1, case.lq // 2], [case.lk, case.lk // 3 + 1, case.lk // 2], terms,
                              case.hq, case.hkv, case.d, case.causal, case.distance, (case.lk // 4, -1), case.dtype,
                              device)
    else:
        raise ValueError(f"unknown case kind {kind!r}")
    return {name: f"{err:.2e}/{ref:.2e}" for name, (err, ref) in errors.items()}


@pytest.mark.parametrize("terms", ["sinks", "sinks+softcap"])
def test_varlen_packed_sequences(terms):
    check_varlen([7, 1, 18], [7, 12, 18], terms)


def test_sink_gradient_by_finite_differences():
    """d sink from the kernel against a central difference of the kernel's own forward (fp32)."""
    case = Case(b=2, hq=2, hkv=1, lq=9, lk=13, d=16)
    inputs, sinks = _inputs(case)
    x = [t.float() for t in inputs]
    s = sinks.float().requires_grad_()
    out = kattn.gape_attention_triton(*x, sinks=s, softcap=1.5)
    (g,) = torch.autograd.grad(out.sum(), s)
    for h in range(case.hq):
        e = torch.zeros(case.hq)
        e[h] = 1e-2
        up = kattn.gape_attention_triton(*x, sinks=s.detach() + e, softcap=1.5).double().sum()
        dn = kattn.gape_attention_triton(*x, sinks=s.detach() - e, softcap=1.5).double().sum()
        fd = float((up - dn) / 2e-2)
        assert abs(fd - float(g[h])) < 2e-3 * max(1.0, abs(fd)), (h, fd, float(g[h]))


def test_auto_routes_terms_to_triton_on_cuda(monkeypatch):
    q = torch.zeros(1, 2, 4, 16)
    sinks = torch.zeros(2)
    monkeypatch.setattr(api, "_on_gpu", lambda query: True)
    assert api.select("auto", q, sinks=sinks).name == "triton"
    assert api.select("auto", q, softcap=5.0).name == "triton"
    assert api.select("auto", q, sinks=sinks, softcap=5.0).name == "triton"


def test_fake_and_opcheck_with_terms(monkeypatch):
    """The custom ops keep their registrations with the new arguments (schema, fake, autograd)."""
    monkeypatch.setattr(kattn, "_new_output", lambda s, d, dev: torch.empty(s, dtype=d, device=dev))
    case = Case(b=1, hq=2, hkv=1, lq=16, lk=16, d=16)
    inputs, sinks = _inputs(case)
    xs = [t.float().requires_grad_() for t in inputs]
    args = (*xs, None, None, True, 0.25, "log", True, None, None, None, None, 0, 0,
            sinks.float().requires_grad_(), 2.0)
    torch.library.opcheck(torch.ops.gape.triton_attention_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.slow
@pytest.mark.parametrize("terms", list(TERMS))
@pytest.mark.parametrize("causal,distance", [(True, "linear"), (False, "log")])
def test_wider_grid(terms, causal, distance):
    """Head dim 80 (padded to 128), more heads, longer rows than the default suite."""
    _check_dense(Case(b=2, hq=6, hkv=2, lq=45, lk=70, d=80), terms, causal=causal, distance=distance)
    _check_dense(Case(b=2, hq=4, hkv=4, lq=33, lk=33, d=32), terms, causal=causal, distance=distance,
                 dtype=torch.float16, window=(9, 2))
