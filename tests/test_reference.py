"""The properties of docs/maths.md, each as its own test, on the reference and the
backends that implement them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gape
from gape.core.reference import gape_bias, phi, reference_attention
from gape.core.sdpa_backend import sdpa_attention
from gape.core.torch_backend import torch_attention

from helpers import Case, assert_matches_reference, make_inputs

f64 = torch.float64


def _plain_sdpa(q, k, v, is_causal):
    """Plain RoPE attention with bottom-right causal alignment."""
    lq, lk = q.shape[2], k.shape[2]
    mask = None
    if is_causal:
        mask = (torch.arange(lq)[:, None] + lk - lq) >= torch.arange(lk)[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_identity_lambda_zero_is_plain_attention(backend, causal):
    """Property 1: lambda == 0 gives exactly RoPE attention, whatever pi and distance."""
    q, k, v, _, pi = make_inputs(Case(b=2, hq=6, hkv=2, lq=19, lk=30, d=16))
    lam = torch.zeros(2, 6, 19, dtype=f64)
    want = _plain_sdpa(q, k, v, causal)
    for distance in ("log", "linear"):
        got = gape.attention(q, k, v, lam, pi, is_causal=causal, distance=distance, backend=backend)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-13)


@pytest.mark.parametrize("distance", ["log", "linear"])
def test_protected_keys_have_zero_bias(distance):
    """Property 2: pi_n = 1 makes b_mn = 0 for every query at any distance."""
    lq, lk = 5, 2**20 + 3
    lam = torch.full((1, 1, lq), 1e3)
    pi = torch.zeros(1, 1, lk)
    protected = torch.tensor([0, 7, lk - 1])
    pi[..., protected] = 1.0
    bias = gape_bias(lam, pi, lq, lk, True, distance)
    assert (bias[..., protected] == 0).all()
    assert (bias[..., 1:7] < 0).all()  # unprotected distant keys are pushed down
    # and through attention: with every key protected the gates have no effect
    q, k, v, lam2, _ = make_inputs(Case(b=1, hq=4, hkv=2, lq=12, lk=20, d=8), lam_max=50.0)
    ones = torch.ones(1, 2, 20, dtype=f64)
    want = _plain_sdpa(q, k, v, True)
    for backend in ("reference", "torch"):
        got = gape.attention(q, k, v, lam2, ones, distance=distance, backend=backend)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-13)


@pytest.mark.parametrize("distance", ["log", "linear"])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_contraction_ratio_and_monotone_in_lambda(distance, backend):
    """Property 3: with equal content scores and pi = 0 the weight of the key at
    distance delta relative to the key at distance 0 is exp(-lambda phi(delta)),
    and the mass on distant keys does not grow with lambda."""
    lk, d = 200, 8
    q = torch.randn(1, 1, 1, d, dtype=f64)
    k = torch.randn(1, 1, 1, d, dtype=f64).expand(1, 1, lk, d).contiguous()  # equal content scores
    v = torch.eye(lk, dtype=f64)[None, None]  # output = the attention weights
    pi = torch.zeros(1, 1, lk, dtype=f64)
    delta = torch.arange(lk - 1, -1, -1)
    far = delta > 20
    mass = []
    for lam_value in (0.0, 0.01, 0.1, 0.5, 1.0, 3.0):
        lam = torch.full((1, 1, 1), lam_value, dtype=f64)
        w = gape.attention(q, k, v, lam, pi, distance=distance, backend=backend)[0, 0, 0]
        ratio = w / w[-1]
        torch.testing.assert_close(ratio, torch.exp(-lam_value * phi(delta, distance, f64)), rtol=1e-12, atol=1e-300)
        mass.append(float(w[far].sum()))
    assert all(a >= b for a, b in zip(mass, mass[1:])), mass
    assert mass[-1] < mass[0]


@pytest.mark.parametrize(
    "case,masked",
    [
        (Case(b=2, hq=6, hkv=2, lq=33, lk=33, d=16), False),
        (Case(b=1, hq=9, hkv=3, lq=17, lk=50, d=64), False),
        (Case(b=2, hq=4, hkv=4, lq=1, lk=40, d=16), False),
        (Case(b=2, hq=6, hkv=2, lq=25, lk=31, d=16), True),
    ],
    ids=lambda x: x.ident() if isinstance(x, Case) else ("mask" if x else "nomask"),
)
def test_linear_distance_is_plain_sdpa_on_augmented_channels(case, masked):
    """Property 4: the sdpa backend (two extra channels) equals the reference for linear distance."""
    mask = None
    if masked:
        mask = torch.ones(case.b, 1, 1, case.lk, dtype=torch.bool)
        mask[1, ..., :9] = False  # left padding, some rows with no key
    assert_matches_reference(sdpa_attention, make_inputs(case), dtype=f64, distance="linear", attn_mask=mask)
    assert_matches_reference(sdpa_attention, make_inputs(case), dtype=torch.float32, distance="linear", attn_mask=mask)


def test_sdpa_backend_refuses_what_is_not_bilinear():
    q, k, v, lam, pi = make_inputs(Case())
    with pytest.raises(ValueError, match="linear"):
        gape.attention(q, k, v, lam, pi, distance="log", backend="sdpa")
    with pytest.raises(ValueError, match="is_causal"):
        gape.attention(q, k, v, lam, pi, distance="linear", is_causal=False, backend="sdpa")


def test_sdpa_backend_refuses_what_it_would_get_wrong():
    q, k, v, lam, pi = make_inputs(Case())
    for scale in (0.0, -0.5):  # the key channels are divided by scale; PyTorch's SDPA gives NaN below 0
        with pytest.raises(ValueError, match="sdpa.*needs scale > 0"):
            gape.attention(q, k, v, lam, pi, distance="linear", backend="sdpa", scale=scale)
    # SDPA adds the mask to q.k: a key the mask hides, at inf, would make every row NaN
    k_inf = k.clone()
    k_inf[:, :, -1] = float("inf")
    keep = torch.ones(k.shape[2], dtype=torch.bool)
    keep[-1] = False
    want = gape.attention(q, k_inf, v, lam, pi, distance="linear", backend="reference", attn_mask=keep)
    assert torch.isfinite(want).all()
    with pytest.raises(ValueError, match="non-finite query or key"):
        gape.attention(q, k_inf, v, lam, pi, distance="linear", backend="sdpa", attn_mask=keep)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_reference_backend_computes_half_inputs_in_float32(dtype):
    """A bias past float16's range (lambda * delta = 1e6) made the whole row -inf in float16,
    hence NaN; backend="reference" computes in float32 and matches float64 to the output's rounding."""
    q, k, v, lam, pi = make_inputs(Case(b=1, hq=2, hkv=1, lq=6, lk=6, d=8))
    lam, pi = torch.full_like(lam, 1e4), torch.zeros_like(pi)
    got = gape.attention(q.to(dtype), k.to(dtype), v.to(dtype), lam.float(), pi.float(), query_offset=100,
                         distance="linear", backend="reference")
    want = reference_attention(q, k, v, lam, pi, None, True, None, "linear", query_offset=100)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-2)
    # the direct call keeps its same-dtype mode (the error the kernels are held to)
    same = reference_attention(q.to(dtype), k.to(dtype), v.to(dtype), lam.float(), pi.float(), None, True, None,
                               "linear", query_offset=100)
    assert same.dtype == dtype


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_decode_needs_only_cached_pi(backend):
    """Property 5: decoding with the cached keys, values and one pi per key and
    head reproduces the last rows of a full prefill; chunked prefill too."""
    q, k, v, lam, pi = make_inputs(Case(b=2, hq=6, hkv=2, lq=40, lk=40, d=16), lam_max=2.0)
    full = gape.attention(q, k, v, lam, pi, backend=backend)
    for t in (0, 17, 39):  # decode step for query t with a cache of t + 1 keys
        step = gape.attention(
            q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], lam[:, :, t : t + 1], pi[:, :, : t + 1], backend=backend
        )
        torch.testing.assert_close(step, full[:, :, t : t + 1], rtol=0, atol=1e-13)
    part = gape.attention(q[:, :, 25:32], k[:, :, :32], v[:, :, :32], lam[:, :, 25:32], pi[:, :, :32], backend=backend)
    torch.testing.assert_close(part, full[:, :, 25:32], rtol=0, atol=1e-13)


def test_bias_is_exact_at_large_positions():
    """The bias comes from integer distances: at cache position 2**20 + 1 the
    float32 bias equals the float64 one rounded once."""
    lq, lk = 3, 2**20 + 1
    lam = torch.full((1, 1, lq), 0.75)
    pi = torch.full((1, 1, lk), 0.25)
    for distance in ("log", "linear"):
        b32 = gape_bias(lam, pi, lq, lk, True, distance)
        b64 = gape_bias(lam.double(), pi.double(), lq, lk, True, distance, torch.float64)
        rel = ((b32.double() - b64).abs() / b64.abs().clamp_min(1e-30)).max()
        assert rel < 4e-7, rel  # a few float32 roundings, no catastrophic cancellation


def test_reference_upcast_matches_float64():
    q, k, v, lam, pi = make_inputs(Case(b=1, hq=4, hkv=2, lq=10, lk=12, d=8))
    want = reference_attention(q, k, v, lam, pi)
    got = reference_attention(q.half(), k.half(), v.half(), lam.float(), pi.float(), upcast=True)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.double(), want, rtol=0, atol=5e-3)
    same = torch_attention(q, k, v, lam, pi, None, True, 8**-0.5, "log")
    torch.testing.assert_close(same, want, rtol=0, atol=1e-13)
