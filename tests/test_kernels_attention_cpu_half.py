"""The fused C++ CPU kernel on bfloat16 and float16 inputs against the float64
reference, forward and all five gradients: both forms of its products (half-precision
operands with float32 accumulation, and operand blocks widened to float32), each at
most 2x the error of the reference run in the same dtype. Odd shapes, GQA, decode,
Lq > Lk, query offsets (int and per batch), windows, masks and packed sequences;
and the choice between the two forms (the fallback where the CPU has no
half-precision arithmetic, forced)."""

from __future__ import annotations

import pytest
import torch

import gape
from gape.kernels import attention_cpu
from gape.core.torch_backend import torch_attention

from helpers import Case, assert_matches_reference, make_inputs

pytestmark = pytest.mark.skipif(not attention_cpu.available(), reason="the fused CPU kernel is not built here")

HALVES = [torch.bfloat16, torch.float16]


def half_ulp(dtype):
    """Slack of half a unit in the last place of ``dtype`` (relative to each tensor's largest
    entry): both sides round their inputs and results to ``dtype``, in different places, so
    where the same-dtype reference happens to be nearly exact the ratio alone is noise."""
    return torch.finfo(dtype).eps / 2


@pytest.fixture
def small_blocks(monkeypatch):
    # blocks of 8 (12 for long queries) rows x 16 keys: small shapes cross many block edges
    monkeypatch.setattr(attention_cpu, "Q_BLOCK", 8)
    monkeypatch.setattr(attention_cpu, "Q_BLOCK_LONG", 12)
    monkeypatch.setattr(attention_cpu, "LONG_QUERY", 30)
    monkeypatch.setattr(attention_cpu, "K_BLOCK", 16)


@pytest.fixture(params=["half", "float"])
def dot(request, monkeypatch):
    """Both forms of the products, forced through the environment switch."""
    if request.param == "half" and not attention_cpu.half_gemm_linked(torch.bfloat16):
        pytest.skip("this torch's BLAS has no half-precision GEMM")
    monkeypatch.setenv(attention_cpu.ENV_DOT, request.param)
    return request.param


def kernel_fn(q, k, v, lam, pi, mask, causal, scale, distance, **positions):
    return torch_attention(q, k, v, lam, pi, mask, causal, scale, distance, strategy="kernel", **positions)


CASES = [
    Case(b=2, hq=6, hkv=2, lq=1, lk=37, d=16),  # decode (with gradients)
    Case(b=1, hq=9, hkv=3, lq=7, lk=7, d=64),
    Case(b=2, hq=4, hkv=2, lq=33, lk=70, d=24, dv=40),  # odd sizes, Dv != D
    Case(b=1, hq=2, hkv=1, lq=40, lk=23, d=16),  # Lq > Lk: the first causal rows see no key
]


@pytest.mark.parametrize("dtype", HALVES, ids=["bf16", "f16"])
@pytest.mark.parametrize("case", CASES, ids=Case.ident)
def test_forward_and_gradients_match_reference(small_blocks, dot, dtype, case):
    inputs = make_inputs(case, lam_max=1.0)
    for causal, distance in ((True, "log"), (False, "linear")):
        errors = assert_matches_reference(kernel_fn, inputs, dtype=dtype, gate_dtype=torch.float32, is_causal=causal,
                                          distance=distance, factor=2.0, atol=half_ulp(dtype))
        assert set(errors) == {"output", "query", "key", "value", "query_gate", "key_gate"}


@pytest.mark.parametrize("dtype", HALVES, ids=["bf16", "f16"])
@pytest.mark.parametrize(
    "positions",
    [dict(query_offset=5), dict(window=(6, 0)), dict(window=(4, 3), query_offset=9), "per-batch"],
    ids=["offset", "window", "window-offset", "per-batch-offset"],
)
def test_positions_match_reference(small_blocks, dot, dtype, positions):
    case = Case(b=2, hq=4, hkv=2, lq=19, lk=45, d=16)
    inputs = make_inputs(case, lam_max=1.0, seed=3)
    if positions == "per-batch":
        positions = dict(query_offset=torch.tensor([26, 3]))
    mask = torch.rand(case.b, 1, case.lq, case.lk, generator=torch.Generator().manual_seed(2)) > 0.2
    for m in (None, mask):
        assert_matches_reference(kernel_fn, inputs, dtype=dtype, gate_dtype=torch.float32, attn_mask=m,
                                 positions=positions, factor=2.0, atol=half_ulp(dtype))


@pytest.mark.parametrize("dtype", HALVES, ids=["bf16", "f16"])
def test_packed_sequences_match_reference(small_blocks, dot, dtype):
    lens = [5, 17, 0, 30, 1]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    t, hq, hkv, d = cu[-1].item(), 4, 2, 16
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(t, h, d, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv))
    lam, pi = torch.rand(t, hq, generator=g, dtype=torch.float64), torch.rand(t, hkv, generator=g, dtype=torch.float64)
    dout = torch.randn(t, hq, d, generator=g, dtype=torch.float64)

    def run(dtype, backend):
        leaves = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        leaves += [x.float().requires_grad_() if dtype != torch.float64 else x.clone().requires_grad_()
                   for x in (lam, pi)]
        out = gape.attention_varlen(*leaves, cu, cu, max(lens), max(lens), is_causal=True, window_size=(9, 0),
                                    backend=backend)
        grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
        return [out.detach().double()] + [x.double() for x in grads]

    truth, same, got = run(torch.float64, "reference"), run(dtype, "reference"), run(dtype, "torch")
    for name, x, s, tr in zip(("output", "query", "key", "value", "query_gate", "key_gate"), got, same, truth):
        err, ref_err = float((x - tr).abs().max()), float((s - tr).abs().max())
        bound = 2 * ref_err + half_ulp(dtype) * float(tr.abs().max())
        assert err <= bound, f"{name}: {err:.3e} vs same-dtype reference {ref_err:.3e}"


def test_widened_products_equal_the_float32_kernel(monkeypatch):
    # the widening form reads the half inputs in place and widens them: exactly the float32
    # kernel on the same (exactly representable) values
    monkeypatch.setenv(attention_cpu.ENV_DOT, "float")
    case = Case(b=1, hq=4, hkv=2, lq=70, lk=70, d=32)
    q, k, v, lam, pi = make_inputs(case, lam_max=1.0)
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    lam, pi = lam.float(), pi.float()
    got = torch_attention(q, k, v, lam, pi, None, True, 0.2, "log", strategy="kernel")
    want = torch_attention(q.float(), k.float(), v.float(), lam, pi, None, True, 0.2, "log", strategy="kernel")
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want.to(torch.bfloat16))


def test_the_products_follow_the_hardware(monkeypatch):
    monkeypatch.delenv(attention_cpu.ENV_DOT, raising=False)
    for dtype in HALVES:
        # a CPU without half-precision arithmetic widens (forced here, whatever this CPU has)
        monkeypatch.setattr(attention_cpu, "native_half", lambda dt: False)
        assert attention_cpu.half_dot(dtype) is False
        # one with it takes the half-precision products when the BLAS has them
        monkeypatch.setattr(attention_cpu, "native_half", lambda dt: True)
        assert attention_cpu.half_dot(dtype) is attention_cpu.half_gemm_linked(dtype)
    assert attention_cpu.half_dot(torch.float32) is False
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        attention_cpu.half_dot(torch.float32, True)
    monkeypatch.setenv(attention_cpu.ENV_DOT, "fast")
    with pytest.raises(ValueError, match=attention_cpu.ENV_DOT):
        attention_cpu.half_dot(torch.bfloat16)


def test_forced_fallback_runs_and_agrees(monkeypatch):
    # the path a CPU without AVX512-BF16 takes, forced on any CPU, against the float64 reference
    monkeypatch.delenv(attention_cpu.ENV_DOT, raising=False)
    monkeypatch.setattr(attention_cpu, "native_half", lambda dt: False)
    case = Case(b=1, hq=6, hkv=2, lq=50, lk=50, d=32)
    assert_matches_reference(kernel_fn, make_inputs(case, lam_max=1.0), dtype=torch.bfloat16,
                             gate_dtype=torch.float32, factor=2.0, atol=half_ulp(torch.bfloat16))


@pytest.mark.parametrize("dtype", HALVES, ids=["bf16", "f16"])
def test_without_native_half_the_auto_choice_is_the_forced_widening(monkeypatch, dtype):
    # a CPU without AVX512-BF16/FP16 (forced on any CPU) takes exactly the GAPE_CPU_DOT=float
    # path, forward and gradients, whatever this CPU has
    monkeypatch.setattr(attention_cpu, "native_half", lambda dt: False)
    case = Case(b=1, hq=4, hkv=2, lq=40, lk=40, d=32)
    runs = {}
    for env in (None, "float"):
        if env is None:
            monkeypatch.delenv(attention_cpu.ENV_DOT, raising=False)
        else:
            monkeypatch.setenv(attention_cpu.ENV_DOT, env)
        assert attention_cpu.half_dot(dtype) is False
        q, k, v, lam, pi = make_inputs(case, lam_max=1.0)
        q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
        lam, pi = lam.float().requires_grad_(), pi.float().requires_grad_()
        out = torch_attention(q, k, v, lam, pi, None, True, 0.2, "log", strategy="kernel")
        out.float().square().sum().backward()
        runs[env] = [out.detach()] + [t.grad for t in (q, k, v, lam, pi)]
    for name, a, b in zip(("out", "dq", "dk", "dv", "dlam", "dpi"), runs[None], runs["float"]):
        assert torch.equal(a, b), name


def test_the_kernel_refuses_mismatched_buffers():
    q = torch.randn(1, 1, 4, 8, dtype=torch.bfloat16)
    lam, keep = torch.zeros(1, 1, 4), torch.ones(1, 1, 4)
    rv = torch.zeros(8)
    seg = attention_cpu.dense_segments(1, 4, 4)
    out = torch.empty(1, 1, 4, 8, dtype=torch.bfloat16)  # must be float32 for bfloat16 inputs
    with pytest.raises(RuntimeError, match="(?i)float"):
        torch.ops.gape.cpu_attention_fwd(q, q, q, lam, keep, rv, 3, None, seg, 0, 1 << 40, out, None, 1.0, 8, 8,
                                         False)
