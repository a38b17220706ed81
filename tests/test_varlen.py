"""gape.attention_varlen: packed sequences (FlashAttention's varlen layout) equal
each sequence run alone, forward and all five gradients, in every backend;
validation of cu_seqlens and max_seqlen."""

from __future__ import annotations

import random

import pytest
import torch

import gape
from gape.core import torch_backend
from gape.kernels import attention_cpu
from gape.core.reference import reference_attention

GRADS = ("query", "key", "value", "query_gate", "key_gate")


def packed_inputs(lens_q, lens_k, hq=4, hkv=2, d=16, dv=None, seed=0, lam_max=0.6):
    g = torch.Generator().manual_seed(seed)
    tq, tk, dv = sum(lens_q), sum(lens_k), dv or d
    f = dict(dtype=torch.float64, generator=g)
    q, k, v = torch.randn(tq, hq, d, **f), torch.randn(tk, hkv, d, **f), torch.randn(tk, hkv, dv, **f)
    lam, pi = torch.rand(tq, hq, **f) * lam_max, torch.rand(tk, hkv, **f)
    cu = lambda ls: torch.tensor([0] + list(torch.tensor(ls).cumsum(0)), dtype=torch.int32)  # noqa: E731
    return (q, k, v, lam, pi), cu(lens_q), cu(lens_k)


def _each_alone(inputs, cu_q, cu_k, causal, distance, window, scale):
    """Float64 truth: every sequence through the dense reference on its own."""
    q, k, v, lam, pi = inputs
    outs = []
    for s in range(len(cu_q) - 1):
        a, b, c, e = int(cu_q[s]), int(cu_q[s + 1]), int(cu_k[s]), int(cu_k[s + 1])
        if b == a:
            continue
        o = reference_attention(q[a:b].transpose(0, 1)[None], k[c:e].transpose(0, 1)[None],
                                v[c:e].transpose(0, 1)[None], lam[a:b].t()[None], pi[c:e].t()[None], None, causal,
                                scale, distance, window=window)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs)


def check_varlen(fn, lens_q, lens_k, causal, distance, window, dtype, hq=4, hkv=2, d=16, tol=None):
    inputs, cu_q, cu_k = packed_inputs(lens_q, lens_k, hq, hkv, d)
    scale = 0.3
    dout = torch.randn(sum(lens_q), hq, d, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    leaves64 = [t.clone().requires_grad_() for t in inputs]
    want = _each_alone(leaves64, cu_q, cu_k, causal, distance, window, scale)
    want_grads = torch.autograd.grad(want, leaves64, dout)
    leaves = [t.to(dtype).requires_grad_() for t in inputs]
    got = fn(*leaves, cu_q, cu_k, max(lens_q), max(lens_k), causal, scale, distance, window)
    assert got.shape == want.shape and got.dtype == dtype
    grads = torch.autograd.grad(got, leaves, dout.to(dtype))
    tol = tol or (1e-10 if dtype == torch.float64 else 3e-5)
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    for name, g, w in zip(GRADS, grads, want_grads):
        torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol * max(1.0, float(w.abs().max())), msg=name)


def _random_lengths(n, seed):
    rnd = random.Random(seed)
    lens_k = [rnd.choice([1, 2, 3, 5, 8, 13, 17, 31, 40]) for _ in range(n)]
    lens_q = [rnd.choice([0, 1, k // 2, k]) for k in lens_k]
    lens_q[0] = max(lens_q[0], 1)
    return lens_q, lens_k


@pytest.fixture(params=["kernel", "tiles"])
def torch_varlen(request, monkeypatch):
    """The C++ kernel (one call over every sequence) and the per-sequence tiles fallback."""
    if request.param == "tiles":
        monkeypatch.setattr(torch_backend, "_kernel_ok", lambda *args: False)
    else:
        monkeypatch.setattr(attention_cpu, "Q_BLOCK", 8)
        monkeypatch.setattr(attention_cpu, "K_BLOCK", 16)
    return torch_backend.torch_attention_varlen


@pytest.mark.parametrize("n", [1, 2, 5, 8])
@pytest.mark.parametrize("causal,distance,window", [(True, "log", None), (False, "linear", None),
                                                    (True, "linear", (6, -1)), (False, "log", (3, 5))], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_torch_varlen_equals_each_sequence_alone(torch_varlen, n, causal, distance, window, dtype):
    lens_q, lens_k = _random_lengths(n, seed=n)
    check_varlen(torch_varlen, lens_q, lens_k, causal, distance, window, dtype)


def test_reference_varlen_through_the_api():
    inputs, cu_q, cu_k = packed_inputs([3, 0, 7], [5, 2, 7])
    got = gape.attention_varlen(*inputs, cu_q, cu_k, 7, 7, backend="reference", scale=0.3)
    want = _each_alone(inputs, cu_q, cu_k, True, "log", None, 0.3)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_api_varlen_default_backend_runs_the_kernel():
    inputs, cu_q, cu_k = packed_inputs([1, 11, 4], [9, 11, 4])
    x = [t.float() for t in inputs]
    got = gape.attention_varlen(*x, cu_q, cu_k, 11, 11, window_size=(3, -1))
    want = _each_alone(inputs, cu_q, cu_k, True, "log", (3, -1), 0.25)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)


def _args():
    inputs, cu_q, cu_k = packed_inputs([3, 4], [3, 4])
    return [*inputs, cu_q, cu_k, 4, 4]


BAD = {
    "not increasing": (5, torch.tensor([0, 5, 3, 7], dtype=torch.int32), ValueError, "cu_seqlens_q must be non-decreasing"),
    "not starting at 0": (6, torch.tensor([1, 3, 7], dtype=torch.int32), ValueError, "cu_seqlens_k must start at 0"),
    "not ending at T": (6, torch.tensor([0, 3, 6], dtype=torch.int32), ValueError, "cu_seqlens_k must end at Tk = 7"),
    "int64": (5, torch.tensor([0, 3, 7]), TypeError, "cu_seqlens_q must be int32"),
    "max too small": (7, 3, ValueError, "max_seqlen_q = 3 is smaller than the longest"),
    "max not int": (8, 4.0, TypeError, "max_seqlen_k must be a non-negative int"),
    "2-D": (5, torch.tensor([[0, 3, 7]], dtype=torch.int32), ValueError, "cu_seqlens_q must be 1-D"),
    "count differs": (6, torch.tensor([0, 7], dtype=torch.int32), ValueError, "both have N \\+ 1 entries"),
    "a list": (6, [0, 3, 7], TypeError, "cu_seqlens_k must be an int32 tensor"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_varlen_arguments_are_named(name):
    args = _args()
    i, value, exc, match = BAD[name]
    args[i] = value
    with pytest.raises(exc, match=match):
        gape.attention_varlen(*args)


def test_varlen_cu_seqlens_on_another_device_is_named():
    if not torch.cuda.is_available():
        args = _args()
        args[0] = args[0].to("meta")
        with pytest.raises(ValueError):
            gape.attention_varlen(*args)
        return
    args = _args()
    args[5] = args[5].cuda()
    with pytest.raises(ValueError, match="cu_seqlens_q is on"):
        gape.attention_varlen(*args)


def test_varlen_bad_layout_is_named():
    args = _args()
    args[3] = args[3][:5]
    with pytest.raises(ValueError, match=r"query_gate must be \[Tq, Hq\]"):
        gape.attention_varlen(*args)


@pytest.mark.parametrize("lens_q,lens_k", [([0, 0], [4, 3]), ([0, 3], [4, 0])], ids=["no-rows", "no-row-sees-a-key"])
@pytest.mark.parametrize("backend", ["torch-kernel", "torch-tiles", "reference"])
def test_an_output_that_sees_no_key_still_backpropagates(backend, lens_q, lens_k, monkeypatch):
    """Zeros by definition, and zero gradients for every input (as from the kernel), not an
    output cut from the graph that makes backward raise."""
    if backend == "torch-tiles":
        monkeypatch.setattr(torch_backend, "_kernel_ok", lambda *args: False)
    inputs, cu_q, cu_k = packed_inputs(lens_q, lens_k)
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = gape.attention_varlen(*leaves, cu_q, cu_k, max(lens_q), max(lens_k), is_causal=False,
                                backend=backend.split("-")[0])
    assert out.shape == (sum(lens_q), inputs[0].shape[1], inputs[2].shape[2]) and (out == 0).all()
    out.sum().backward()
    for t in leaves:
        assert t.grad is not None and (t.grad == 0).all()


def test_sequence_without_keys_gives_zero_rows(torch_varlen):
    # non-causal: a sequence with queries but no keys sees nothing (zeros, zero gradients)
    inputs, cu_q, cu_k = packed_inputs([3, 4, 2], [5, 0, 6])
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = torch_varlen(*leaves, cu_q, cu_k, 4, 6, False, 0.3, "log", None)
    assert (out[3:7] == 0).all() and (out[:3].abs() > 0).any() and (out[7:].abs() > 0).any()
    want = torch.cat([_each_alone(inputs, cu_q[[0, 1]], cu_k[[0, 1]], False, "log", None, 0.3),
                      torch.zeros(4, 4, 16, dtype=torch.float64),
                      _each_alone(inputs, cu_q[[2, 3]], cu_k[[2, 3]] - 0, False, "log", None, 0.3)])
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    gq = torch.autograd.grad(out.sum(), leaves[0])[0]
    assert (gq[3:7] == 0).all()
