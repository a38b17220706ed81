"""The Triton kernels with positions as an input, in Triton's
interpreter on CPU tensors: query offsets (negative, zero, beyond Lk, per batch),
local windows, packed sequences; forward and all five gradients against the
float64 reference. Every output buffer starts as NaN so an unwritten tile fails."""

from __future__ import annotations

import pytest
import torch

import gape
from gape.core import ops
from gape.kernels import attention as kattn
from gape.core.reference import reference_attention, reference_attention_varlen

from helpers import Case, assert_matches_reference, make_inputs
from test_varlen import packed_inputs, check_varlen

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or kattn._is_interpreted()),
    reason="needs CUDA or TRITON_INTERPRET=1 (conftest sets it on CPU-only machines)",
)


@pytest.fixture(autouse=True)
def _nan_outputs(monkeypatch):
    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(kattn, "_new_output", nan_empty)


def triton_fn(q, k, v, lam, pi, attn_mask, is_causal, scale, distance, **positions):
    return kattn.triton_attention(q, k, v, lam, pi, attn_mask, is_causal, scale, distance, **positions)


CASES = [
    # (shapes, causal, distance, query_offset, window)
    (Case(b=2, hq=4, hkv=2, lq=19, lk=37, d=16), True, "log", -5, None),
    (Case(b=2, hq=4, hkv=2, lq=19, lk=37, d=16), True, "log", "per-batch", (6, -1)),
    (Case(b=1, hq=2, hkv=1, lq=19, lk=37, d=16), True, "linear", 50, (20, -1)),
    (Case(b=2, hq=4, hkv=2, lq=19, lk=37, d=16), False, "linear", 0, (3, 9)),
    (Case(b=2, hq=4, hkv=2, lq=19, lk=37, d=16), False, "log", "per-batch", None),
    (Case(b=3, hq=4, hkv=1, lq=1, lk=33, d=32), True, "log", "per-batch", (10, -1)),  # decode
    (Case(b=1, hq=2, hkv=2, lq=40, lk=17, d=16, dv=32), True, "log", None, (4, -1)),  # Lq > Lk
]


def _cid(c):
    case, causal, distance, off, win = c
    return f"{case.ident()}-{'causal' if causal else 'full'}-{distance}-off{off}-win{win}"


@pytest.mark.parametrize("c", CASES, ids=_cid)
def test_offsets_and_windows_match_reference(c):
    case, causal, distance, off, window = c
    if off == "per-batch":
        off = torch.tensor([-3, case.lk - case.lq, case.lk + 6][: case.b])
    inputs = make_inputs(case, lam_max=0.6 if distance == "log" else 0.15, seed=7)
    assert_matches_reference(triton_fn, inputs, dtype=torch.float32, is_causal=causal, distance=distance,
                             positions={"query_offset": off, "window": window})


def test_key_padding_with_offset():
    case = Case(b=2, hq=2, hkv=1, lq=9, lk=21, d=16)
    inputs = make_inputs(case, seed=3)
    mask = torch.ones(2, 1, 1, 21, dtype=torch.bool)
    mask[0, ..., :5] = False  # left padding
    mask[1, ..., 17:] = False  # right padding
    assert_matches_reference(triton_fn, inputs, dtype=torch.float32, attn_mask=mask, is_causal=True,
                             positions={"query_offset": torch.tensor([14, 3]), "window": (8, -1)})


def test_public_api_dispatches_positions_to_triton():
    q, k, v, lam, pi = (t.float() for t in make_inputs(Case(b=2, hq=2, hkv=1, lq=8, lk=20, d=16)))
    off = torch.tensor([2, 30])
    got = gape.attention(q, k, v, lam, pi, query_offset=off, window_size=(5, -1), backend="triton")
    ref = reference_attention(q, k, v, lam, pi, None, True, 0.25, "log", query_offset=off, window=(5, -1))
    torch.testing.assert_close(got, ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("causal,distance,window", [(True, "log", None), (False, "linear", (4, 2)),
                                                    (True, "linear", (5, -1))], ids=str)
def test_varlen_matches_each_sequence_alone(causal, distance, window):
    lens_q, lens_k = [1, 17, 0, 9, 4], [6, 17, 3, 20, 4]
    check_varlen(kattn.triton_attention_varlen, lens_q, lens_k, causal, distance, window, torch.float32, hq=4, hkv=2,
                 d=16)


def test_ops_blocks_on_triton():
    q, k, v, lam, pi = (t.float() for t in make_inputs(Case(b=1, hq=2, hkv=1, lq=16, lk=16, d=16), lam_max=0.5))
    dout = torch.randn(1, 2, 16, 16)
    kw = dict(scale=0.25, backend="triton")
    o1, l1 = ops.block_forward(q, k[:, :, :7], v[:, :, :7], lam, pi[:, :, :7], query_offset=0, **kw)
    o2, l2 = ops.block_forward(q, k[:, :, 7:], v[:, :, 7:], lam, pi[:, :, 7:], query_offset=-7, **kw)
    out, lse = ops.merge([o1, o2], [l1, l2])
    ref_out, ref_lse = ops.block_forward(q, k, v, lam, pi, **kw)
    torch.testing.assert_close(out, ref_out, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=2e-5, atol=2e-5)
    g1 = ops.block_backward(q, k[:, :, :7], v[:, :, :7], lam, pi[:, :, :7], out, lse, dout, query_offset=0, **kw)
    g2 = ops.block_backward(q, k[:, :, 7:], v[:, :, 7:], lam, pi[:, :, 7:], out, lse, dout, query_offset=-7, **kw)
    want = ops.block_backward(q, k, v, lam, pi, ref_out, ref_lse, dout, **kw)
    torch.testing.assert_close(g1[0] + g2[0], want[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g1[3] + g2[3], want[3], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat([g1[1], g2[1]], 2), want[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat([g1[4], g2[4]], 2), want[4], rtol=1e-4, atol=1e-5)


def test_varlen_sequence_without_keys():
    inputs, cu_q, cu_k = packed_inputs([3, 4, 2], [5, 0, 6], hq=2, hkv=1)
    x = [t.float() for t in inputs]
    got = kattn.triton_attention_varlen(*x, cu_q, cu_k, 4, 6, False, 0.3, "log")
    want = reference_attention_varlen(*inputs, cu_q, cu_k, False, 0.3, "log")
    assert (got[3:7] == 0).all()
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)
