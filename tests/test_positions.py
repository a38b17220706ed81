"""Positions as an input: ``query_offset`` and ``window_size`` in every
backend against the float64 reference, forward and all five gradients; the
reference itself against a brute-force loop over docs/maths.md; validation."""

from __future__ import annotations

import math

import sys

import numpy as np
import pytest
import torch

import gape
from gape.core import torch_backend
from gape.kernels import attention_cpu
from gape.core.reference import phi, reference_attention
from gape.core.torch_backend import torch_attention

from helpers import Case, assert_matches_reference, make_inputs


def brute_force(q, k, v, lam, pi, is_causal, scale, distance, offsets, window):
    """docs/maths.md one logit at a time: query i at i + offsets[b], key j at j."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    left, right = window
    out = torch.zeros(b, hq, lq, v.shape[-1], dtype=torch.float64)
    for bb in range(b):
        for h in range(hq):
            kh = h // (hq // hkv)
            for i in range(lq):
                logits, vals = [], []
                for j in range(lk):
                    delta = i + offsets[bb] - j
                    if is_causal and delta < 0:
                        continue
                    if left >= 0 and delta > left:
                        continue
                    if right >= 0 and not is_causal and -delta > right:
                        continue
                    dist = delta if is_causal else abs(delta)
                    ph = math.log1p(dist) if distance == "log" else float(dist)
                    s = scale * float(q[bb, h, i] @ k[bb, kh, j]) - float(lam[bb, h, i]) * (1 - float(pi[bb, kh, j])) * ph
                    logits.append(s)
                    vals.append(v[bb, kh, j])
                if logits:
                    w = torch.softmax(torch.tensor(logits, dtype=torch.float64), 0)
                    out[bb, h, i] = (w[:, None] * torch.stack(vals)).sum(0)
    return out


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("distance", ["log", "linear"])
@pytest.mark.parametrize("window", [(-1, -1), (3, -1), (0, 2), (5, 1)], ids=lambda w: f"win{w[0]}_{w[1]}")
def test_reference_is_gape_md_with_offsets_and_windows(causal, distance, window):
    q, k, v, lam, pi = make_inputs(Case(b=2, hq=4, hkv=2, lq=5, lk=9, d=8), lam_max=1.0)
    offs = torch.tensor([-3, 11])
    got = reference_attention(q, k, v, lam, pi, None, causal, 0.4, distance, query_offset=offs,
                              window=None if window == (-1, -1) else window)
    want = brute_force(q, k, v, lam, pi, causal, 0.4, distance, offs.tolist(), window)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # an int offset equals the same offset for every batch element
    got_int = reference_attention(q, k, v, lam, pi, None, causal, 0.4, distance, query_offset=2)
    want_int = brute_force(q, k, v, lam, pi, causal, 0.4, distance, [2, 2], (-1, -1))
    torch.testing.assert_close(got_int, want_int, rtol=1e-12, atol=1e-12)


def test_default_offset_is_bottom_right():
    q, k, v, lam, pi = make_inputs(Case(b=1, hq=2, hkv=1, lq=6, lk=13, d=8))
    for causal in (True, False):
        a = reference_attention(q, k, v, lam, pi, None, causal, 0.3, "log")
        b = reference_attention(q, k, v, lam, pi, None, causal, 0.3, "log", query_offset=7)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.fixture(params=["kernel", "sdpa-tiles", "gemm-tiles"])
def strategy(request, monkeypatch):
    """The fused C++ kernel (forward and backward) and both pure-PyTorch tilings: the
    torch backend's strategy argument, bound into this module's torch_attention (a
    one-row step without autograd keeps its decode strategy, as "auto" does)."""
    real = torch_backend.torch_attention

    def with_strategy(query, key, value, query_gate, key_gate, *args, **kwargs):
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value, query_gate, key_gate))
        chosen = "decode" if query.shape[2] == 1 and not grad and request.param != "kernel" else request.param
        return real(query, key, value, query_gate, key_gate, *args, strategy=chosen, **kwargs)

    monkeypatch.setattr(sys.modules[__name__], "torch_attention", with_strategy)
    return request.param


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(attention_cpu, "Q_BLOCK", 8)
    monkeypatch.setattr(attention_cpu, "Q_BLOCK_LONG", 12)
    monkeypatch.setattr(attention_cpu, "LONG_QUERY", 30)
    monkeypatch.setattr(attention_cpu, "K_BLOCK", 16)


def _torch(chunk=8):
    def fn(*args, **kw):
        return torch_attention(*args, chunk_size=chunk, **kw)

    return fn


# (case, offset): negative, zero, default, beyond Lk, per batch; decode; Lq > Lk
OFFSET_CASES = [
    (Case(b=2, hq=6, hkv=2, lq=19, lk=41, d=16), -7),
    (Case(b=2, hq=6, hkv=2, lq=19, lk=41, d=16), 0),
    (Case(b=1, hq=4, hkv=4, lq=19, lk=41, d=16), 60),
    (Case(b=3, hq=4, hkv=2, lq=23, lk=30, d=16, dv=8), "per-batch"),
    (Case(b=2, hq=6, hkv=3, lq=1, lk=37, d=16), "per-batch"),  # decode at positions of its own
    (Case(b=1, hq=2, hkv=1, lq=40, lk=23, d=16), -5),  # Lq > Lk
]
WINDOWS = [None, (4, -1), (0, 0), (9, 3)]


def _offset(case, spec):
    if spec == "per-batch":
        return torch.tensor([-4, case.lk - case.lq, case.lk + 9][: case.b])
    return spec


def _oid(x):
    case, off = x
    return f"{case.ident()}-off{off}"


@pytest.mark.parametrize("case_off", OFFSET_CASES, ids=_oid)
@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: "nowin" if w is None else f"win{w[0]}_{w[1]}")
@pytest.mark.parametrize("causal,distance", [(True, "log"), (False, "linear")], ids=["causal-log", "full-linear"])
def test_torch_backend_offsets_and_windows(strategy, small_blocks, case_off, window, causal, distance):
    case, spec = case_off
    inputs = make_inputs(case, lam_max=1.0)
    positions = {"query_offset": _offset(case, spec), "window": window}
    assert_matches_reference(_torch(), inputs, dtype=torch.float32, is_causal=causal, distance=distance,
                             positions=positions)


@pytest.mark.parametrize("causal,distance", [(True, "linear"), (False, "log")], ids=["causal-linear", "full-log"])
def test_torch_backend_float64_exact_with_mask_and_offsets(strategy, small_blocks, causal, distance):
    case = Case(b=2, hq=4, hkv=2, lq=21, lk=33, d=16)
    inputs = make_inputs(case, lam_max=1.0)
    mask = torch.rand(2, 1, 21, 33, generator=torch.Generator().manual_seed(5)) > 0.3
    assert_matches_reference(_torch(), inputs, dtype=torch.float64, attn_mask=mask, is_causal=causal,
                             distance=distance, positions={"query_offset": torch.tensor([3, 30]), "window": (6, 2)})


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("distance", ["log", "linear"])
@pytest.mark.parametrize("window", [None, (5, 2)], ids=["nowin", "win5_2"])
def test_decode_fast_path_with_offsets(strategy, causal, distance, window):
    q, k, v, lam, pi = make_inputs(Case(b=3, hq=6, hkv=2, lq=1, lk=29, d=16), lam_max=1.0)
    for off in (torch.tensor([3, 28, 40]), 10, -2):
        with torch.no_grad():
            got = torch_attention(q, k, v, lam, pi, None, causal, 0.25, distance, query_offset=off, window=window)
        ref = reference_attention(q, k, v, lam, pi, None, causal, 0.25, distance, query_offset=off, window=window)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_rows_outside_every_window_are_zero_with_zero_gradients(strategy):
    q, k, v, lam, pi = (t.float().requires_grad_() for t in make_inputs(Case(b=1, hq=2, hkv=1, lq=6, lk=10, d=8)))
    # causal, offset -3: rows 0..2 precede every key
    out = torch_attention(q, k, v, lam, pi, None, True, 0.3, "log", query_offset=-3)
    assert torch.isfinite(out).all() and (out[:, :, :3] == 0).all() and (out[:, :, 3:].abs() > 0).any()
    gq, glam = torch.autograd.grad(out.sum(), [q, lam])
    assert (gq[:, :, :3] == 0).all() and (glam[:, :, :3] == 0).all()


def test_backend_sdpa_offsets_and_windows():
    inputs = make_inputs(Case(b=2, hq=4, hkv=2, lq=11, lk=20, d=16), lam_max=0.3)
    from gape.core.sdpa_backend import sdpa_attention

    for positions in ({"query_offset": torch.tensor([-2, 25])}, {"query_offset": 4, "window": (3, -1)}):
        assert_matches_reference(sdpa_attention, inputs, dtype=torch.float64, is_causal=True, distance="linear",
                                 positions=positions)


@pytest.mark.parametrize("backend", ["reference", "torch", "sdpa"])
def test_public_api_passes_positions(backend):
    q, k, v, lam, pi = (t.float() for t in make_inputs(Case(b=2, hq=4, hkv=2, lq=9, lk=15, d=16), lam_max=0.3))
    off = torch.tensor([2, 17])
    got = gape.attention(q, k, v, lam, pi, distance="linear", query_offset=off, window_size=(4, -1), backend=backend)
    ref = reference_attention(q.double(), k.double(), v.double(), lam.double(), pi.double(), None, True,
                              0.25, "linear", query_offset=off, window=(4, -1))
    torch.testing.assert_close(got.double(), ref, rtol=2e-5, atol=2e-5)


def test_causal_right_window_changes_nothing():
    q, k, v, lam, pi = make_inputs(Case(b=1, hq=2, hkv=1, lq=9, lk=9, d=8))
    a = gape.attention(q, k, v, lam, pi, window_size=(3, 5), backend="torch")
    b = gape.attention(q, k, v, lam, pi, window_size=(3, -1), backend="torch")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_large_offset_bias_is_exact():
    # a query chunk a million positions after its keys (context parallelism): the
    # distances are integers, so float32 logits match float64 at that range
    q, k, v, lam, pi = make_inputs(Case(b=1, hq=2, hkv=1, lq=8, lk=16, d=16), lam_max=1e-4)
    off = 1_000_003
    got = gape.attention(*(t.float() for t in (q, k, v, lam, pi)), query_offset=off, backend="torch")
    ref = reference_attention(q, k, v, lam, pi, None, True, 0.25, "log", query_offset=off)
    torch.testing.assert_close(got.double(), ref, rtol=2e-6, atol=2e-6)


BAD_OFFSETS = {
    "float": (1.5, TypeError, "query_offset must be None, an int"),
    "float tensor": (torch.tensor([1.0]), TypeError, "integer tensor"),
    "bool": (True, TypeError, "bool"),
    "wrong batch": (torch.tensor([1, 2, 3]), ValueError, r"shape \[B=2\]"),
    "2-D": (torch.zeros(2, 1, dtype=torch.int64), ValueError, "query_offset must be an int or an integer tensor"),
    "too large": (2**31, ValueError, r"\|query_offset\| \+ Lq \+ Lk"),
    "too small tensor": (torch.tensor([0, -(2**31)]), ValueError, "query_offset must satisfy"),
    # 2**64 - 3 would wrap to -3 in the int64 cast
    "uint64": (torch.tensor([2**64 - 3, 0], dtype=torch.uint64), TypeError, "got torch.uint64"),
    "numpy array": (np.array([1, 2]), TypeError, "query_offset must be None, an int or an integer torch tensor"),
    "sparse": (torch.tensor([1, 2]).to_sparse(), TypeError, "query_offset must be a dense integer tensor"),
}


@pytest.mark.parametrize("name", list(BAD_OFFSETS))
def test_bad_query_offset_is_named(name):
    q, k, v, lam, pi = make_inputs(Case(b=2, hq=2, hkv=1, lq=4, lk=6, d=8))
    value, exc, match = BAD_OFFSETS[name]
    with pytest.raises(exc, match=match):
        gape.attention(q, k, v, lam, pi, query_offset=value)


def test_integer_scalars_of_other_libraries_are_offsets():
    q, k, v, lam, pi = make_inputs(Case(b=2, hq=2, hkv=1, lq=4, lk=6, d=8))
    want = gape.attention(q, k, v, lam, pi, query_offset=5)
    torch.testing.assert_close(gape.attention(q, k, v, lam, pi, query_offset=np.int64(5)), want, rtol=0, atol=0)


@pytest.mark.parametrize("offsets", [[10**8, 0], [2**31 - 20, 3], [-(2**31 - 20), 2**31 - 20]], ids=str)
def test_per_batch_offsets_far_apart_run_in_memory_of_their_own_size(offsets, monkeypatch):
    """The kernel reads one phi table over every batch element's distances; offsets 10**8
    apart would make it gigabytes for a few tokens. Each element then runs alone, and the
    answer, forward and gradients, is the float64 reference's."""
    built = []
    real = attention_cpu.phi_table

    def bounded(dmin, dmax, *args):
        built.append(dmax - dmin + 1)
        assert dmax - dmin < 1 << 22, f"a phi table of {dmax - dmin + 1} entries"
        return real(dmin, dmax, *args)

    monkeypatch.setattr(attention_cpu, "phi_table", bounded)
    q, k, v, lam, pi = make_inputs(Case(b=2, hq=2, hkv=1, lq=4, lk=6, d=8), lam_max=1e-6)
    off = torch.tensor(offsets)
    leaves = [t.float().requires_grad_() for t in (q, k, v, lam, pi)]
    got = gape.attention(*leaves, query_offset=off, is_causal=False, backend="torch")
    grads = torch.autograd.grad(got.sum(), leaves)
    refs = [t.clone().requires_grad_() for t in (q, k, v, lam, pi)]
    want = reference_attention(*refs, None, False, None, "log", query_offset=off)
    want_grads = torch.autograd.grad(want.sum(), refs)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("window,exc,match", [
    ((-2, 0), ValueError, ">= -1"), ((1,), TypeError, "pair of ints"), ((1.0, 2), TypeError, "pair of ints"),
    (5, TypeError, "window_size"),
])
def test_bad_window_is_named(window, exc, match):
    q, k, v, lam, pi = make_inputs(Case(b=1, hq=2, hkv=1, lq=4, lk=6, d=8))
    with pytest.raises(exc, match=match):
        gape.attention(q, k, v, lam, pi, window_size=window)


def test_kernel_checks_its_phi_table():
    q, k, v, lam, pi = make_inputs(Case(lq=4, lk=9))
    seg = attention_cpu.dense_segments(1, 4, 9, 30)  # distances up to 33
    table = phi(torch.arange(9, -1, -1), "log", torch.float64)
    with pytest.raises(ValueError, match="phi_reversed"):
        attention_cpu.attention_forward(q, k, v, lam, 1 - pi, table, None, True, 0.25, segments=seg, delta_lo=0,
                                        delta_hi=attention_cpu.UNBOUNDED, phi_zero=9)
