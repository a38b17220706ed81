"""gape.attention: every validation error names its argument; masks broadcast;
rows with no allowed key give zeros, never NaN."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import gape
from gape.core import api

from helpers import Case, make_inputs


def _inputs(b=2, hq=4, hkv=2, lq=6, lk=9, d=8, dtype=torch.float32):
    return [t.to(dtype) for t in make_inputs(Case(b=b, hq=hq, hkv=hkv, lq=lq, lk=lk, d=d))]


def _call(q, k, v, lam, pi, **kw):
    kw.setdefault("backend", "reference")
    return gape.attention(q, k, v, lam, pi, **kw)


def _replace(i, value):
    args = _inputs()
    args[i] = value
    return args


BAD_INPUTS = {
    "query-rank": (lambda: _replace(0, torch.zeros(2, 4, 6)), ValueError, "query must be 4-D"),
    "key-rank": (lambda: _replace(1, torch.zeros(2, 2, 9, 8, 1)), ValueError, "key must be 4-D"),
    "value-rank": (lambda: _replace(2, torch.zeros(2, 9, 8)), ValueError, "value must be 4-D"),
    "query_gate-rank": (lambda: _replace(3, torch.zeros(2, 4, 6, 1)), ValueError, "query_gate must be 3-D"),
    "key_gate-rank": (lambda: _replace(4, torch.zeros(2, 2)), ValueError, "key_gate must be 3-D"),
    "query-not-tensor": (lambda: _replace(0, [[1.0]]), TypeError, "query must be a torch.Tensor"),
    "batch": (lambda: _replace(1, torch.zeros(3, 2, 9, 8)), ValueError, "batch"),
    "head-dim": (lambda: _replace(1, torch.zeros(2, 2, 9, 16)), ValueError, "key head dim"),
    "value-heads": (lambda: _replace(2, torch.zeros(2, 1, 9, 8)), ValueError, "value must be"),
    "value-length": (lambda: _replace(2, torch.zeros(2, 2, 8, 8)), ValueError, "value must be"),
    "gqa-multiple": (
        lambda: [torch.zeros(2, 5, 6, 8), torch.zeros(2, 2, 9, 8), torch.zeros(2, 2, 9, 8), torch.zeros(2, 5, 6), torch.zeros(2, 2, 9)],
        ValueError,
        "multiple of key/value heads",
    ),
    "query_gate-shape": (lambda: _replace(3, torch.zeros(2, 4, 5)), ValueError, "query_gate must be"),
    "key_gate-shape": (lambda: _replace(4, torch.zeros(2, 4, 9)), ValueError, "key_gate must be"),
    "query_gate-dtype": (lambda: _replace(3, torch.zeros(2, 4, 6, dtype=torch.float16)), TypeError, "query_gate must be"),
    "key_gate-dtype": (lambda: _replace(4, torch.zeros(2, 2, 9, dtype=torch.float64)), TypeError, "key_gate must be"),
    "query-int": (lambda: _replace(0, torch.zeros(2, 4, 6, 8, dtype=torch.int64)), TypeError, "query must have a floating"),
    "key_gate-int": (lambda: _replace(4, torch.zeros(2, 2, 9, dtype=torch.int32)), TypeError, "key_gate must have a floating"),
    "value-dtype": (lambda: _replace(2, torch.zeros(2, 2, 9, 8, dtype=torch.float64)), TypeError, "value"),
    "key_gate-device": (lambda: _replace(4, torch.zeros(2, 2, 9, device="meta")), ValueError, "key_gate is on meta"),
    "query_gate-negative": (lambda: _replace(3, -torch.ones(2, 4, 6)), ValueError, "query_gate"),
    "query_gate-nan": (lambda: _replace(3, torch.full((2, 4, 6), float("nan"))), ValueError, "query_gate"),
    "query_gate-inf": (lambda: _replace(3, torch.full((2, 4, 6), float("inf"))), ValueError, "query_gate"),
    "key_gate-above-one": (lambda: _replace(4, torch.full((2, 2, 9), 1.5)), ValueError, "key_gate"),
    "key_gate-negative": (lambda: _replace(4, torch.full((2, 2, 9), -0.1)), ValueError, "key_gate"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_names_the_argument(name):
    make, exc, match = BAD_INPUTS[name]
    with pytest.raises(exc, match=match):
        _call(*make())


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(distance="cubic"), ValueError, "distance must be one of"),
        (dict(backend="cuda-magic"), ValueError, "backend must be one of"),
        (dict(is_causal=1), TypeError, "is_causal must be a bool"),
        (dict(scale=float("nan")), ValueError, "scale must be"),
        (dict(attn_mask=torch.ones(6, 9)), TypeError, "attn_mask must be a bool"),
        (dict(attn_mask=torch.ones(6, 8, dtype=torch.bool)), ValueError, "attn_mask shape"),
        (dict(attn_mask=torch.ones(1, 1, 1, 6, 9, dtype=torch.bool)), ValueError, "attn_mask must broadcast"),
        (dict(backend="sdpa", distance="log"), ValueError, "sdpa.*linear"),
        (dict(backend="sdpa", distance="linear", is_causal=False), ValueError, "sdpa.*is_causal"),
    ],
    ids=["distance", "backend", "is_causal", "scale", "mask-dtype", "mask-shape", "mask-rank", "sdpa-log", "sdpa-noncausal"],
)
def test_bad_option_names_the_argument(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        _call(*_inputs(), **kwargs)


def test_triton_backend_refuses_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="triton.*CUDA"):
        _call(*_inputs(), backend="triton")


def test_triton_backend_refuses_float64():
    with pytest.raises(ValueError, match="triton.*float64"):
        _call(*_inputs(dtype=torch.float64), backend="triton")


def test_gate_check_accepts_the_boundaries():
    q, k, v, lam, pi = _inputs()
    lam = torch.zeros_like(lam)
    pi = torch.zeros_like(pi)
    pi[..., ::2] = 1.0
    out = _call(q, k, v, lam, pi)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "shape", [(9,), (6, 9), (2, 1, 1, 9), (1, 4, 6, 9), (2, 1, 6, 1), (1, 1, 1, 1)], ids=str
)
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_attn_mask_broadcasts_like_its_expansion(shape, backend):
    q, k, v, lam, pi = _inputs(dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(shape, generator=g) > 0.4
    full = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(2, 4, 6, 9).contiguous()
    for causal in (True, False):
        a = _call(q, k, v, lam, pi, attn_mask=mask, is_causal=causal, backend=backend)
        b = _call(q, k, v, lam, pi, attn_mask=full, is_causal=causal, backend="reference")
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


@pytest.mark.parametrize("backend", ["reference", "torch", "sdpa"])
def test_rows_without_keys_are_zero_not_nan(backend):
    q, k, v, lam, pi = (t.requires_grad_() for t in _inputs(lq=12, lk=9))  # causal Lq > Lk: 3 empty rows
    mask = torch.ones(2, 1, 12, 9, dtype=torch.bool)
    mask[0, :, 7] = False
    out = _call(q, k, v, lam, pi, attn_mask=mask, distance="linear", backend=backend)
    assert torch.isfinite(out).all()
    assert (out[:, :, :3] == 0).all() and (out[0, :, 7] == 0).all()
    out.sum().backward()
    for t in (q, k, v, lam, pi):
        assert torch.isfinite(t.grad).all()


def test_auto_backend_runs_and_matches_reference():
    q, k, v, lam, pi = _inputs()
    a = gape.attention(q, k, v, lam, pi)
    b = _call(q, k, v, lam, pi)
    torch.testing.assert_close(a, b)
    assert api.resolve_backend("auto", q) == "torch"


def _band(lq, lk, window):
    """Sliding-window mask as transformers builds it: causal AND pos_q - pos_k < window."""
    delta = torch.arange(lq)[:, None] + (lk - lq) - torch.arange(lk)[None, :]
    return ((delta >= 0) & (delta < window))[None, None]


def test_auto_on_cuda_falls_back_for_band_mask_and_head_dim(monkeypatch):
    """The "CUDA" route (device check patched; the kernel runs in Triton's interpreter):
    a key-padding mask goes to Triton, a band mask and an unsupported head dim fall
    back to the torch backend, and a named backend that cannot serve the call says why."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    monkeypatch.setattr(api, "_on_gpu", lambda query: True)
    q, k, v, lam, pi = _inputs(lq=12, lk=12, d=16)
    pad = torch.ones(2, 1, 1, 12, dtype=torch.bool)
    pad[1, ..., :4] = False
    assert api.select("auto", q, k, v, attn_mask=pad).name == "triton"
    assert api.select("auto", q, k, v).name == "triton"
    band = _band(12, 12, window=5)
    assert api.select("auto", q, k, v, attn_mask=band).name == "torch"
    with pytest.raises(ValueError, match="cannot serve.*contiguous|cannot serve.*key-padding"):
        api.select("triton", q, k, v, attn_mask=band)
    small = torch.randn(2, 4, 12, 8)
    assert api.select("auto", small, small[:, :2], small[:, :2]).name == "torch"
    with pytest.raises(ValueError, match="head dims"):
        api.select("triton", small, small[:, :2], small[:, :2])
    # and the fallback computes GAPE with the band mask
    out = gape.attention(q, k, v, lam, pi, attn_mask=band)
    torch.testing.assert_close(out, _call(q, k, v, lam, pi, attn_mask=band, backend="reference"))
