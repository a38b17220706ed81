"""The fused C++ CPU forward (gape.kernels.attention_cpu) against the float64
reference: block edges, GQA, decode, Lq > Lk, masks, both distances, causal
and not, strided queries, extreme gates; and the fallback when it cannot be built.
The torch backend's tests also run every case through it (strategy "kernel"),
the decode at cache position 2**20 included."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from gape.core import torch_backend
from gape.kernels import attention_cpu
from gape.core.reference import phi, reference_attention
from gape.core.torch_backend import torch_attention

from helpers import Case, assert_matches_reference, make_inputs


def phi_reversed(lq, lk, causal, distance, dtype):
    delta = torch.arange(lk - 1, -lq, -1)
    return phi(delta.clamp_min(0) if causal else delta.abs(), distance, dtype)


def kernel(q, k, v, lam, pi, mask, causal, scale, distance):
    rv = phi_reversed(q.shape[2], k.shape[2], causal, distance, q.dtype)
    return attention_cpu.attention_forward(q, k, v, lam, 1 - pi, rv, mask, causal, scale)


def test_kernel_builds_and_loads():
    # CI and every machine with a C++ compiler build it; a failure here means the torch backend runs ~1.5x slower
    assert attention_cpu.available(), attention_cpu.unavailable_reason()
    assert hasattr(torch.ops.gape, "cpu_attention_fwd")


@pytest.fixture
def small_blocks(monkeypatch):
    # 8 query rows (12 from 30 rows on, the "long query" blocks) x 16 keys per block,
    # so small shapes cross many block edges
    monkeypatch.setattr(attention_cpu, "Q_BLOCK", 8)
    monkeypatch.setattr(attention_cpu, "Q_BLOCK_LONG", 12)
    monkeypatch.setattr(attention_cpu, "LONG_QUERY", 30)
    monkeypatch.setattr(attention_cpu, "K_BLOCK", 16)


CASES = [
    Case(b=2, hq=6, hkv=2, lq=1, lk=37, d=16),  # decode
    Case(b=1, hq=9, hkv=3, lq=7, lk=7, d=64),
    Case(b=2, hq=4, hkv=2, lq=8, lk=16, d=80, dv=24),  # exact block multiples
    Case(b=1, hq=6, hkv=2, lq=33, lk=70, d=16),
    Case(b=1, hq=2, hkv=1, lq=40, lk=23, d=16),  # Lq > Lk: the first rows see no key when causal
]


@pytest.mark.parametrize("case", CASES, ids=Case.ident)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("distance", ["log", "linear"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_matches_reference(small_blocks, case, causal, distance, dtype):
    inputs = make_inputs(case, lam_max=1.0)
    mask = torch.rand(case.b, 1, case.lq, case.lk, generator=torch.Generator().manual_seed(1)) > 0.25
    mask[0, 0, -1] = False  # one row with no allowed key: zeros, not NaN
    for m in (None, mask):
        got = kernel(*(t.to(dtype) for t in inputs), m, causal, 0.3, distance)
        ref = reference_attention(*inputs, m, causal, 0.3, distance)
        tol = 1e-12 if dtype == torch.float64 else 2e-6
        assert got.dtype == dtype and not got.isnan().any()
        torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("case", CASES, ids=Case.ident)
@pytest.mark.parametrize("causal,distance", [(True, "log"), (False, "linear")], ids=["causal-log", "full-linear"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_backward_matches_reference(small_blocks, monkeypatch, case, causal, distance, dtype):
    # the kernel's backward (FlashAttention-2 with the bias in registers): all five gradients, with and
    # without a padding mask that leaves one row empty, across many block edges
    inputs = make_inputs(case, lam_max=1.0)
    fn = functools.partial(torch_attention, strategy="kernel")
    mask = torch.rand(case.b, 1, case.lq, case.lk, generator=torch.Generator().manual_seed(3)) > 0.25
    mask[0, 0, -1] = False
    for m in (None, mask):
        assert_matches_reference(fn, inputs, dtype=dtype, attn_mask=m, is_causal=causal, distance=distance)


@pytest.fixture
def chunked_blocks(monkeypatch):
    # query blocks of 150 rows (more than the forward's 64-row chunk: two full chunks and one of 22)
    # against 96-key blocks, so causal diagonal blocks are cut into chunks, some of which see no key
    monkeypatch.setattr(attention_cpu, "Q_BLOCK", 150)
    monkeypatch.setattr(attention_cpu, "Q_BLOCK_LONG", 150)
    monkeypatch.setattr(attention_cpu, "K_BLOCK", 96)


CHUNK_CASES = [
    Case(b=1, hq=2, hkv=1, lq=200, lk=230, d=16),  # rows start at position 30
    Case(b=1, hq=2, hkv=1, lq=230, lk=200, d=16),  # the first 30 rows see no key when causal
    Case(b=2, hq=3, hkv=3, lq=150, lk=150, d=8),  # exactly one query block
]


@pytest.mark.parametrize("case", CHUNK_CASES, ids=Case.ident)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_chunked_diagonal_matches_reference(chunked_blocks, case, dtype):
    assert attention_cpu.available(), attention_cpu.unavailable_reason()
    inputs = make_inputs(case, lam_max=1.0)
    mask = torch.rand(case.b, 1, case.lq, case.lk, generator=torch.Generator().manual_seed(4)) > 0.25
    mask[0, 0, -1] = False
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for m in (None, mask):
        got = kernel(*(t.to(dtype) for t in inputs), m, True, 0.3, "log")
        ref = reference_attention(*inputs, m, True, 0.3, "log")
        assert got.dtype == dtype and not got.isnan().any()
        torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)
    # with a window, a sink and the soft-cap: the chunks read the same positions and terms
    sinks = torch.linspace(-1.0, 2.0, case.hq, dtype=torch.float64)
    kw = dict(query_offset=7, window=(40, -1), sinks=sinks, softcap=2.0)
    got = torch_attention(*(t.to(dtype) for t in inputs), None, True, 0.3, "log", None, "kernel",
                          **{**kw, "sinks": sinks.to(dtype)})
    ref = reference_attention(*inputs, None, True, 0.3, "log", **kw)
    assert not got.isnan().any()
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)


def test_head_mask_strided_query_and_extreme_gates(small_blocks):
    case = Case(b=2, hq=4, hkv=2, lq=21, lk=50, d=16)
    q, k, v, lam, pi = make_inputs(case)
    lam[0, 0] = 1e4  # contracts to the distance-0 key
    lam[1, 1] = 0.0  # plain RoPE attention
    pi[0, 0, ::3] = 1.0  # protected keys
    pi[1, 1] = 0.0
    mask = torch.rand(2, 4, 21, 50, generator=torch.Generator().manual_seed(2)) > 0.5  # per head
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, L, H, D] storage, as transformers hands it over
    assert not q_t.is_contiguous()
    for m in (None, mask):
        got = kernel(q_t, k, v, lam, pi, m, True, 0.25, "log")
        ref = reference_attention(q, k, v, lam, pi, m, True, 0.25, "log")
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_rejects_a_short_phi_table():
    q, k, v, lam, pi = make_inputs(Case(lq=4, lk=9))
    with pytest.raises(ValueError, match="phi_reversed"):
        attention_cpu.attention_forward(q, k, v, lam, 1 - pi, torch.zeros(8, dtype=q.dtype), None, True, 0.25)


_FALLBACK_SCRIPT = textwrap.dedent(
    """
    import warnings, torch, gape
    from gape.kernels import attention_cpu
    from gape.core import torch_backend
    {setup}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = attention_cpu.available()
    q, k, v = torch.randn(1, 4, 70, 16), torch.randn(1, 2, 70, 16), torch.randn(1, 2, 70, 16)
    lam, pi = torch.rand(1, 4, 70), torch.rand(1, 2, 70)
    got = gape.attention(q, k, v, lam, pi, backend="torch")
    ref = gape.attention(q, k, v, lam, pi, backend="reference")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    print(ok, torch_backend.choose_strategy("auto", q, k, v) == "kernel", len(caught), attention_cpu.unavailable_reason())
    """
)


def _run_fallback(setup: str, **env) -> list[str]:
    code = _FALLBACK_SCRIPT.format(setup=setup)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env},
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1].split(" ", 3)


def test_switched_off_by_the_environment():
    ok, used, warned, reason = _run_fallback("", GAPE_CPU_KERNEL="0")
    assert (ok, used, warned) == ("False", "False", "0") and "GAPE_CPU_KERNEL=0" in reason


def test_a_failed_build_warns_once_and_falls_back_to_the_tiles():
    setup = textwrap.dedent(
        """
        import torch.utils.cpp_extension as ext
        def broken(**kw):
            raise RuntimeError("no C++ compiler here")
        ext.load = broken
        """
    )
    ok, used, warned, reason = _run_fallback(setup)
    assert (ok, used, warned) == ("False", "False", "1") and "no C++ compiler" in reason


@pytest.mark.slow
@pytest.mark.parametrize("isa", ["AVX2", "DEFAULT"])
def test_other_instruction_sets_build_and_agree(isa):
    # builds the AVX2 and portable variants (about a minute each); they run on any x86-64 with AVX2
    ok, used, warned, reason = _run_fallback("assert attention_cpu.capability() == %r" % isa, GAPE_CPU_CAPABILITY=isa)
    assert (ok, used) == ("True", "True"), reason
