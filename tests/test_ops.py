"""gape.core.ops: attention blocks at a query offset, merged, with gradients from the
merged (out, lse) — the pieces context parallelism combines. Checked against
autograd through the float64 reference of the whole attention."""

from __future__ import annotations

import pytest
import torch

from gape.core import ops
from gape.core.reference import reference_attention

from helpers import Case, make_inputs

BACKENDS = ["torch", "reference"]


def _full_grads(inputs, causal, distance, dout, window):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = reference_attention(*leaves, None, causal, 0.3, distance, window=window)
    return out.detach(), torch.autograd.grad(out, leaves, dout)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal,distance", [(True, "log"), (False, "linear")], ids=["causal-log", "full-linear"])
@pytest.mark.parametrize("window", [None, (7, 3)], ids=["nowin", "win7_3"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_blocks_merge_to_the_whole_attention(backend, causal, distance, window, dtype):
    # query chunk = the last 13 of 30 positions; keys in 3 chunks [0, 9), [9, 20), [20, 30)
    q, k, v, lam, pi = make_inputs(Case(b=2, hq=4, hkv=2, lq=30, lk=30, d=16), lam_max=1.0)
    dout = torch.randn(2, 4, 30, 16, dtype=torch.float64)
    full_out, full_grads = _full_grads((q, k, v, lam, pi), causal, distance, dout, window)
    q0 = 17
    cuts = [(0, 9), (9, 20), (20, 30)]
    qc, lamc, doc = q[:, :, q0:], lam[:, :, q0:], dout[:, :, q0:]
    cast = lambda t: t.to(dtype)  # noqa: E731
    kw = dict(is_causal=causal, scale=0.3, distance=distance, window_size=window or (-1, -1), backend=backend)
    blocks = [ops.block_forward(cast(qc), cast(k[:, :, a:b]), cast(v[:, :, a:b]), cast(lamc), cast(pi[:, :, a:b]),
                                query_offset=q0 - a, **kw) for a, b in cuts]
    out, lse = ops.merge([o for o, _ in blocks], [x for _, x in blocks])
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out.double(), full_out[:, :, q0:], rtol=tol, atol=tol)
    grads = [ops.block_backward(cast(qc), cast(k[:, :, a:b]), cast(v[:, :, a:b]), cast(lamc), cast(pi[:, :, a:b]),
                                out, lse, cast(doc), query_offset=q0 - a, **kw) for a, b in cuts]
    dq = sum(g[0] for g in grads)
    dlam = sum(g[3] for g in grads)
    # the gradient of the query chunk's share of the whole attention: rows q0.. only
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, lam, pi)]
    o = reference_attention(*leaves, None, causal, 0.3, distance, window=window)
    want = torch.autograd.grad(o[:, :, q0:], leaves, doc)
    torch.testing.assert_close(dq.double(), want[0][:, :, q0:], rtol=tol, atol=tol)
    torch.testing.assert_close(dlam.double(), want[3][:, :, q0:], rtol=tol, atol=tol)
    for i, name in ((1, "key"), (2, "value"), (4, "key_gate")):
        got = torch.cat([g[i] for g in grads], dim=2).double()
        torch.testing.assert_close(got, want[i], rtol=tol, atol=tol, msg=name)
    assert all(g[0].dtype == dtype for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_block_is_attention_and_lse_is_logsumexp(backend):
    q, k, v, lam, pi = make_inputs(Case(b=1, hq=2, hkv=1, lq=6, lk=11, d=8))
    out, lse = ops.block_forward(q, k, v, lam, pi, query_offset=-2, scale=0.3, backend=backend)
    ref = reference_attention(q, k, v, lam, pi, None, True, 0.3, "log", query_offset=-2)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    # rows 0, 1 precede every key: zeros, lse +inf; row 2 sees key 0 only
    assert (out[:, :, :2] == 0).all() and torch.isposinf(lse[:, :, :2]).all()
    s0 = 0.3 * (q[0, :, 2] @ k[0, 0, 0])
    torch.testing.assert_close(lse[0, :, 2], s0, rtol=1e-12, atol=1e-12)


def test_merge_of_empty_blocks_stays_empty():
    o = torch.zeros(1, 1, 2, 4)
    lse = torch.full((1, 1, 2), float("inf"))
    out, l = ops.merge([o, o], [lse, lse])
    assert (out == 0).all() and torch.isposinf(l).all()


def test_block_backward_checks_shapes():
    q, k, v, lam, pi = make_inputs(Case(b=1, hq=2, hkv=1, lq=6, lk=11, d=8))
    out, lse = ops.block_forward(q, k, v, lam, pi, backend="reference")
    with pytest.raises(ValueError, match="lse must be"):
        ops.block_backward(q, k, v, lam, pi, out, lse[..., :3], out, backend="reference")


def test_merge_names_the_block_that_does_not_match():
    o, l = torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5)
    with pytest.raises(ValueError, match=r"outs\[1\] has shape \(1, 2, 3, 4\)"):
        ops.merge([o, torch.zeros(1, 2, 3, 4)], [l, torch.zeros(1, 2, 3)])
    with pytest.raises(ValueError, match=r"lses\[1\] its \[B, Hq, Lq\]"):
        ops.merge([o, o], [l, torch.zeros(1, 2, 4)])
    with pytest.raises(ValueError, match=r"outs\[0\] must be \[B, Hq, Lq, Dv\]"):
        ops.merge([torch.zeros(2, 5, 4)], [torch.zeros(2, 5)])
    with pytest.raises(TypeError, match=r"outs\[0\] and lses\[0\] must be tensors"):
        ops.merge([[0.0]], [l])
