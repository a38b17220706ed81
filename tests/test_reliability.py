"""Nothing silently wrong in gape.attention, on every backend and path:
every tensor layout the API accepts (expanded, overlapping, unfolded, strided,
zero-size, meta) computes what the reference computes; NaN in gives NaN out;
double backward works or is refused loudly; the gate range holds under
torch.compile."""

from __future__ import annotations

import functools

import pytest
import torch

import gape
from gape.core import torch_backend

B, HQ, HKV, L, D = 1, 4, 2, 40, 16

# (backend, torch backend strategy): the torch backend's C++ kernel and its two PyTorch tile paths
PATHS = [("reference", None), ("torch", "auto"), ("torch", "gemm-tiles"), ("torch", "sdpa-tiles"), ("sdpa", None),
         ("triton", None)]
PATH_IDS = [b if f is None else f"torch-{f}" for b, f in PATHS]


@pytest.fixture(params=PATHS, ids=PATH_IDS)
def path(request, monkeypatch):
    backend, forward = request.param
    if forward is not None:
        _use_strategy(monkeypatch, forward)
    return backend


def _use_strategy(monkeypatch, strategy):
    """gape.attention(backend="torch") with the torch backend's ``strategy`` argument bound."""
    monkeypatch.setattr(torch_backend, "torch_attention", functools.partial(_TORCH_ATTENTION, strategy=strategy))


_TORCH_ATTENTION = torch_backend.torch_attention


def _call(backend, q, k, v, lam, pi, **kw):
    kw.setdefault("distance", "linear")  # every backend serves linear causal
    return gape.attention(q, k, v, lam, pi, backend=backend, **kw)


def _gates(lq=L, lk=L, hq=HQ, hkv=HKV, b=B):
    g = torch.Generator().manual_seed(3)
    return torch.rand(b, hq, lq, generator=g) * 0.5, torch.rand(b, hkv, lk, generator=g)


# name -> (base shape from the view shape, the view of a base). Rows of the first four share memory.
LAYOUTS = {
    "expand-seq": (lambda s: (s[0], s[1], 1, s[3]), lambda x, s: x.expand(s)),
    "as_strided": (
        lambda s: (s[0] * s[1] * (s[2] + s[3]),),
        lambda x, s: x.as_strided(s, (s[1] * (s[2] + s[3]), s[2] + s[3], 1, 1)),
    ),
    "unfold": (lambda s: (s[0], s[1], s[2] + s[3] - 1), lambda x, s: x.unfold(2, s[3], 1)),
    "expand-heads": (lambda s: (s[0], 1, s[2], s[3]), lambda x, s: x.expand(s)),
    "every-other-channel": (lambda s: (*s[:3], 2 * s[3]), lambda x, s: x[..., ::2]),
    "transposed": (lambda s: (s[0], s[2], s[1], s[3]), lambda x, s: x.transpose(1, 2)),
}


def _layout(layout, shape, requires_grad=False):
    """(leaf, view of the leaf with ``shape`` in ``layout``)."""
    base_shape, view = LAYOUTS[layout]
    leaf = torch.randn(base_shape(shape), requires_grad=requires_grad)
    return leaf, view(leaf, shape)


@pytest.mark.parametrize("which", ["query", "key", "value"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_matches_the_reference(path, layout, which):
    shapes = {"query": (B, HQ, L, D), "key": (B, HKV, L, D), "value": (B, HKV, L, D)}
    tensors = {n: torch.randn(s) for n, s in shapes.items()}
    tensors[which] = _layout(layout, shapes[which])[1]
    q, k, v = tensors["query"], tensors["key"], tensors["value"]
    lam, pi = _gates()
    want = _call("reference", q.contiguous(), k.contiguous(), v.contiguous(), lam, pi)
    got = _call(path, q, k, v, lam, pi)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_expanded_and_strided_gates(path):
    q, k, v = torch.randn(B, HQ, L, D), torch.randn(B, HKV, L, D), torch.randn(B, HKV, L, D)
    lam = (torch.rand(B, HQ, 1) * 0.5).expand(B, HQ, L)
    pi = torch.rand(B, HKV, 2 * L)[..., ::2]
    want = _call("reference", q, k, v, lam.contiguous(), pi.contiguous())
    torch.testing.assert_close(_call(path, q, k, v, lam, pi), want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("layout", ["expand-seq", "as_strided", "unfold"])
def test_decode_step_with_overlapping_rows(layout, monkeypatch):
    """Lq = 1 without grad takes the torch backend's decode path (and the kernel with strategy="kernel")."""
    for forward in ("auto", "kernel"):
        _use_strategy(monkeypatch, forward)
        q = torch.randn(B, HQ, 1, D)
        k, v = _layout(layout, (B, HKV, L, D))[1], _layout(layout, (B, HKV, L, D))[1]
        lam, pi = _gates(lq=1)
        mask = torch.rand(B, 1, 1, L) > 0.3
        want = _call("reference", q, k.contiguous(), v.contiguous(), lam, pi, attn_mask=mask)
        got = _call("torch", q, k, v, lam, pi, attn_mask=mask)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("layout", ["expand-seq", "as_strided", "unfold", "expand-heads"])
def test_gradients_with_odd_layouts_and_grad_out(path, layout):
    torch.manual_seed(1)
    kv_leaves = [_layout(layout, (B, HKV, L, D))[0] for _ in range(2)]
    q, lam, pi = torch.randn(B, HQ, L, D), *_gates()
    # a grad_out whose rows share memory (stride 0 along the sequence): what (out * w).sum() gives
    w = torch.randn(B, HQ, 1, D).expand(B, HQ, L, D)
    grads = {}
    for backend in ("reference", path):
        leaves = [t.detach().clone().requires_grad_() for t in (q, *kv_leaves, lam, pi)]
        k, v = (LAYOUTS[layout][1](x, (B, HKV, L, D)) for x in leaves[1:3])
        out = _call(backend, leaves[0], k, v, leaves[3], leaves[4])
        grads[backend] = torch.autograd.grad(out, leaves, w)
    for name, a, b in zip(("query", "key", "value", "query_gate", "key_gate"), grads[path], grads["reference"]):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4, msg=lambda m: f"d {name}: {m}")


@pytest.mark.parametrize(
    "shape",
    [dict(b=0), dict(lq=0), dict(hq=0)],
    ids=["B0", "Lq0", "Hq0"],
)
def test_zero_size_inputs_give_empty_outputs_and_gradients(path, shape):
    b, lq, hq = shape.get("b", B), shape.get("lq", L), shape.get("hq", HQ)
    hkv = HKV if hq else 1
    q = torch.randn(b, hq, lq, D, requires_grad=True)
    k = torch.randn(b, hkv, L, D, requires_grad=True)
    v = torch.randn(b, hkv, L, D, requires_grad=True)
    lam, pi = _gates(lq=lq, hq=hq, hkv=hkv, b=b)
    out = _call(path, q, k, v, lam, pi)
    assert out.shape == (b, hq, lq, D)
    out.sum().backward()
    assert k.grad.shape == k.shape and (k.grad == 0).all()


def test_meta_tensors_give_meta_outputs_of_the_right_shape(path):
    q = torch.empty(2, HQ, 7, D, device="meta", requires_grad=True)
    k, v = torch.empty(2, HKV, 9, D, device="meta"), torch.empty(2, HKV, 9, 24, device="meta")
    lam, pi = torch.empty(2, HQ, 7, device="meta"), torch.empty(2, HKV, 9, device="meta")
    out = _call(path, q, k, v, lam, pi)
    assert out.device.type == "meta" and out.shape == (2, HQ, 7, 24) and out.requires_grad


# --------------------------------------------------------------------------- NaN / inf


def _nan_rows(t):
    return torch.isnan(t).any(-1)


@pytest.mark.parametrize("where", ["query", "key"])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("lq", [L, 1], ids=["prefill", "decode"])
def test_nan_in_gives_nan_out_like_the_reference(path, where, masked, lq):
    q, k, v = torch.randn(B, HQ, lq, D), torch.randn(B, HKV, L, D), torch.randn(B, HKV, L, D)
    lam, pi = _gates(lq=lq)
    if where == "query":
        q[0, 1, lq // 2, 3] = float("nan")
    else:
        k[0, 1, 5, 0] = float("nan")  # causal: rows before 5 do not see it
    mask = None
    if masked:
        # left padding (a mask every backend serves): causal rows 0-2 have no key and stay zeros
        mask = torch.ones(B, 1, 1, L, dtype=torch.bool)
        mask[..., :3] = False
        k[0, 0, 1, 1] = float("nan")  # a masked NaN key stays out
        if lq > 1:
            q[0, 0, 1, 0] = float("nan")  # a NaN query row with no allowed key: zeros, as the reference
    want = _call("reference", q, k, v, lam, pi, attn_mask=mask)
    assert _nan_rows(want).any()
    if path == "sdpa" and (masked or lq != L):
        # SDPA adds its mask to the NaN logits, which would spread NaN to rows the reference
        # keeps finite: refused, naming what to use instead
        with pytest.raises(ValueError, match='non-finite query or key.*backend="torch"'):
            _call(path, q, k, v, lam, pi, attn_mask=mask)
        return
    got = _call(path, q, k, v, lam, pi, attn_mask=mask)
    assert torch.equal(_nan_rows(got), _nan_rows(want))
    ok = ~torch.isnan(want)
    torch.testing.assert_close(got[ok], want[ok], atol=2e-5, rtol=1e-4)


def test_nan_in_value_reaches_every_row_that_sees_it(path):
    q, k, v = torch.randn(B, HQ, L, D), torch.randn(B, HKV, L, D), torch.randn(B, HKV, L, D)
    lam, pi = _gates()
    v[0, 0, 10, 2] = float("inf")
    got = _call(path, q, k, v, lam, pi)
    assert (~torch.isfinite(got[0, :2, 10:])).any(-1).all()  # every query of kv head 0 at or after key 10


# --------------------------------------------------------------------------- double backward


def test_double_backward_is_exact_or_refused(path):
    q, k, v = torch.randn(B, HQ, 12, D), torch.randn(B, HKV, 12, D), torch.randn(B, HKV, 12, D)
    lam, pi = _gates(lq=12, lk=12)
    results = {}
    for backend in ("reference", path):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, lam, pi)]
        out = _call(backend, *leaves)
        try:
            (gq,) = torch.autograd.grad(out.square().sum(), leaves[0], create_graph=True)
            penalty = gq.square().sum()
            results[backend] = torch.autograd.grad(penalty, leaves)
        except RuntimeError as err:
            assert backend != "reference"
            assert "double backward" in str(err) or "not implemented" in str(err).lower(), err
            if backend in ("torch", "triton"):
                assert 'backend="reference"' in str(err)
            return
    for a, b in zip(results[path], results["reference"]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


# --------------------------------------------------------------------------- torch.compile


def test_gate_range_is_checked_under_torch_compile():
    q, k, v = torch.randn(1, 2, 8, D), torch.randn(1, 2, 8, D), torch.randn(1, 2, 8, D)
    lam, pi = _gates(lq=8, lk=8, hq=2, hkv=2)

    def fn(q, k, v, lam, pi):
        return gape.attention(q, k, v, lam, pi, backend="reference")

    fn(q, k, v, lam, pi)  # backend loaded (its import is not traced)
    compiled = torch.compile(fn, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, lam, pi), fn(q, k, v, lam, pi))
    with pytest.raises(RuntimeError, match="query_gate"):
        compiled(q, k, v, -lam, pi)
    with pytest.raises(RuntimeError, match="key_gate"):
        compiled(q, k, v, lam, pi + 1.5)
    assert torch.is_grad_enabled()  # a failed compiled check leaves grad mode as it was


# --------------------------------------------------------------------------- sdpa in half precision


def test_sdpa_in_float16_at_2k_tokens_is_as_accurate_as_the_fused_backends():
    g = torch.Generator().manual_seed(0)
    n = 2048
    q, k, v = (torch.randn(1, 1, n, 16, generator=g) for _ in range(3))
    lam, pi = torch.rand(1, 1, n, generator=g), torch.rand(1, 1, n, generator=g) * 0.5
    truth = gape.attention(q.double(), k.double(), v.double(), lam, pi.float(), distance="linear", backend="torch")
    errs = {}
    for backend in ("sdpa", "torch"):
        out = gape.attention(q.half(), k.half(), v.half(), lam, pi, distance="linear", backend=backend)
        errs[backend] = float((out.double() - truth).abs().max())
    assert errs["sdpa"] <= 2 * errs["torch"] + 1e-3, errs


def _flash_cuda_mask(lq, lk, left, right, is_causal):
    """The keys FlashAttention's CUDA kernel lets query i see, written from its C++
    entry point: sides >= seqlen_k become -1, a causal right side 0, then a missing
    side of a bounded window seqlen_k; the kernel keeps
    i + lk - lq - left <= j <= i + lk - lq + right (a side of -1 unbounded)."""
    if left >= lk:
        left = -1
    if right >= lk:
        right = -1
    if is_causal:
        right = 0
    if left < 0 and right >= 0:
        left = lk
    if left >= 0 and right < 0:
        right = lk
    i = torch.arange(lq)[:, None] + lk - lq
    j = torch.arange(lk)[None, :]
    ok = torch.ones(lq, lk, dtype=torch.bool)
    if left >= 0:
        ok &= j >= i - left
    if right >= 0:
        ok &= j <= i + right
    return ok


@pytest.mark.parametrize("lq,lk,window,is_causal", [
    (12, 5, (2, -1), False), (12, 5, (-1, 1), False), (12, 5, (3, 0), True), (6, 9, (9, 2), False),
    (6, 9, (1, 20), False), (9, 9, (4, 4), False), (16, 4, (1, 1), False),
])
def test_flash_cuda_window_reproduces_flash_attentions_cuda_window(lq, lk, window, is_causal):
    from gape.core.api import flash_cuda_window

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, lq, 8, dtype=torch.float64), torch.randn(1, 1, lk, 8, dtype=torch.float64), \
        torch.randn(1, 1, lk, 8, dtype=torch.float64)
    lam, pi = torch.rand(1, 2, lq, dtype=torch.float64) * 0.3, torch.rand(1, 1, lk, dtype=torch.float64)
    want = gape.attention(q, k, v, lam, pi, attn_mask=_flash_cuda_mask(lq, lk, *window, is_causal),
                          is_causal=False, backend="reference")
    got = gape.attention(q, k, v, lam, pi, window_size=flash_cuda_window(window, lq, lk, is_causal),
                         is_causal=False, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="window_size"):
        flash_cuda_window((1.0, 2), lq, lk)
