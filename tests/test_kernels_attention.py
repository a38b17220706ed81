"""The fused Triton GAPE kernel, run in Triton's interpreter on CPU tensors.

Forward and all five gradients against the float64 reference; the tolerance
is relative to the same-dtype PyTorch reference's own error (STYLE.md).
Every output buffer is NaN-filled before the kernels run, so an unwritten
tile fails. Shapes are tiny: the interpreter executes numpy per block.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

import gape
from gape.core.api import unsupported_reason
from gape.kernels import attention as kattn
from gape.kernels.key_ranges import mask_to_key_ranges
from gape.core.reference import reference_attention

import helpers

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or kattn._is_interpreted()),
    reason="needs CUDA or TRITON_INTERPRET=1 (conftest sets it on CPU-only machines)",
)

@dataclass(frozen=True)
class Case:
    b: int
    hq: int
    hkv: int
    lq: int
    lk: int
    d: int
    causal: bool
    distance: str
    dtype: torch.dtype = torch.float32
    dv: int | None = None
    gate_dtype: torch.dtype = torch.float32

    @property
    def id(self) -> str:
        dv = f"-Dv{self.dv}" if self.dv else ""
        g = "-gates16" if self.gate_dtype == torch.float16 else ""
        dt = str(self.dtype).removeprefix("torch.")
        return (f"B{self.b}-H{self.hq}/{self.hkv}-Lq{self.lq}-Lk{self.lk}-D{self.d}{dv}-"
                f"{'causal' if self.causal else 'full'}-{self.distance}-{dt}{g}")


CASES = [
    Case(1, 4, 2, 33, 47, 24, True, "log"),  # GQA, Lq != Lk, tails of 16-wide blocks
    Case(1, 4, 2, 33, 47, 24, False, "linear"),
    Case(2, 2, 1, 17, 17, 80, True, "linear"),  # head dim 80 padded to 128
    Case(2, 4, 1, 1, 37, 32, True, "log"),  # decode step
    Case(1, 2, 2, 24, 9, 16, True, "log"),  # Lq > Lk: the first rows see no key
    Case(1, 2, 1, 20, 30, 32, False, "log", dv=16),  # value head dim differs
    Case(1, 2, 2, 33, 33, 32, True, "log", torch.float16, gate_dtype=torch.float16),
    Case(1, 4, 2, 19, 35, 16, False, "linear", torch.float16),
]


def _inputs(case: Case):
    """Float64 master inputs, with some keys exactly protected (pi = 1) or not (pi = 0)."""
    shapes = helpers.Case(case.b, case.hq, case.hkv, case.lq, case.lk, case.d, case.dv)
    # lambda large enough that the bias moves the softmax visibly
    q, k, v, lam, pi = helpers.make_inputs(shapes, lam_max=0.6 if case.distance == "log" else 0.15, seed=1234)
    pi[..., ::5] = 1.0
    pi[..., 1::7] = 0.0
    return q, k, v, lam, pi


def _check(fn, case: Case, **kw):
    """Output and the five gradients vs float64, tolerance from the same-dtype reference."""
    return helpers.assert_matches_reference(fn, _inputs(case), dtype=case.dtype, gate_dtype=case.gate_dtype,
                                            is_causal=case.causal, distance=case.distance, **kw)


@pytest.fixture(autouse=True)
def _nan_outputs(monkeypatch):
    """Every kernel output starts as NaN, so an unwritten tile fails the comparison."""
    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(kattn, "_new_output", nan_empty)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_forward_and_gradients_match_reference(case):
    _check(kattn.triton_attention, case)


def test_rows_without_visible_keys_are_zero():
    case = Case(1, 2, 1, 12, 5, 16, True, "log")  # causal, Lq > Lk: the first 7 rows see no key
    q, k, v, lam, pi = (t.float().requires_grad_() for t in _inputs(case))
    out = kattn.gape_attention_triton(q, k, v, lam, pi, is_causal=True)
    out.sum().backward()
    assert torch.equal(out[:, :, :7], torch.zeros_like(out[:, :, :7]))
    assert not q.grad[:, :, :7].any() and not lam.grad[:, :, :7].any()
    assert out[:, :, 7:].abs().sum() > 0


def test_bias_changes_the_output():
    """Guards the comparisons against a kernel that ignores the gates."""
    q, k, v, lam, pi = (t.float() for t in _inputs(CASES[0]))
    with_bias = kattn.gape_attention_triton(q, k, v, lam, pi, is_causal=True, distance="log")
    no_bias = kattn.gape_attention_triton(q, k, v, lam, pi, is_causal=True, distance="log", has_bias=False)
    plain = reference_attention(q, k, v, torch.zeros_like(lam), pi, is_causal=True)
    assert helpers.max_err(no_bias, plain) < 1e-5
    assert helpers.max_err(with_bias, no_bias) > 1e-2


@pytest.mark.parametrize("layout", ["left-pad-causal", "right-pad-full", "empty-batch"])
def test_key_ranges_match_masked_reference(layout):
    causal = layout == "left-pad-causal"
    case = Case(3, 2, 1, 21, 21, 16, causal, "log")
    if layout == "left-pad-causal":
        start, end = torch.tensor([0, 5, 17]), torch.tensor([21, 21, 21])
    elif layout == "right-pad-full":
        start, end = torch.tensor([0, 0, 0]), torch.tensor([21, 9, 16])
    else:
        start, end = torch.tensor([0, 4, 0]), torch.tensor([21, 4, 0])
    j = torch.arange(case.lk)
    mask = ((j >= start[:, None]) & (j < end[:, None]))[:, None, None, :]

    def fused(q, k, v, lam, pi, attn_mask, is_causal, scale, distance):
        # the kernel gets the ranges; the reference gets the equivalent mask
        return kattn.gape_attention_triton(q, k, v, lam, pi, start, end, is_causal, scale, distance)

    _check(fused, case, attn_mask=mask)
    if layout == "empty-batch":
        q, k, v, lam, pi = (t.float().requires_grad_() for t in _inputs(case))
        out = kattn.gape_attention_triton(q, k, v, lam, pi, start, end, is_causal=False)
        out.sum().backward()
        for t in (out, q.grad, k.grad, v.grad, lam.grad, pi.grad):
            assert not t[1:].any(), "a batch element with no visible key must give zero output and gradients"


def _transformers_mask(start, lq, lk):
    """[B, 1, Lq, Lk]: causal (bottom-right) AND key >= start_b, as transformers builds it."""
    pos_q = torch.arange(lq) + (lk - lq)
    j = torch.arange(lk)
    causal = pos_q[:, None] >= j[None, :]
    return (causal[None] & (j[None, None, :] >= start[:, None, None]))[:, None]


@pytest.mark.parametrize("is_causal", [True, False], ids=["is_causal", "mask-only"])
def test_transformers_padding_mask_through_backend(is_causal):
    case = Case(2, 2, 1, 18, 26, 16, is_causal, "log")
    mask = _transformers_mask(torch.tensor([0, 11]), case.lq, case.lk)
    assert unsupported_reason("triton", torch.zeros(2, 2, 18, 16), "log", mask, is_causal) is None
    _check(kattn.triton_attention, case, attn_mask=mask)


def test_mask_conversion_rules():
    lq = lk = 12
    start = torch.tensor([0, 3])
    ranges = mask_to_key_ranges(_transformers_mask(start, lq, lk), lq, lk, is_causal=False)
    assert ranges.causal and ranges.start.tolist() == [0, 3] and ranges.end.tolist() == [12, 12]
    pad = (torch.arange(lk)[None, :] < torch.tensor([12, 7])[:, None])[:, None, None, :]
    ranges = mask_to_key_ranges(pad, lq, lk, is_causal=False)
    assert not ranges.causal and ranges.end.tolist() == [12, 7]

    q = torch.zeros(2, 2, lq, 16)
    holes = torch.ones(2, 1, 1, lk, dtype=torch.bool)
    holes[1, 0, 0, 4] = False  # not one contiguous range
    per_head = torch.ones(2, 2, 1, lk, dtype=torch.bool)
    per_head[0, 1, 0, :3] = False  # differs between heads
    for bad in (holes, per_head, torch.rand(2, 1, lq, lk) > 0.5):
        assert unsupported_reason("triton", q, "log", bad) is not None
        with pytest.raises(ValueError, match="cannot serve"):
            gape.attention(q, torch.zeros(2, 1, lk, 16), torch.zeros(2, 1, lk, 16), torch.zeros(2, 2, lq),
                           torch.zeros(2, 1, lk), attn_mask=bad, backend="triton")


def test_fake_impl_gives_shapes_without_running():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 4, 7, 80, dtype=torch.float16)
        k = torch.empty(2, 2, 9, 80, dtype=torch.float16)
        v = torch.empty(2, 2, 9, 48, dtype=torch.float16)
        out, lse = torch.ops.gape.triton_attention_fwd(q, k, v, torch.empty(2, 4, 7), torch.empty(2, 2, 9), None,
                                                       None, True, 0.1, "log", True)
        assert tuple(out.shape) == (2, 4, 7, 48) and out.dtype == torch.float16
        assert tuple(lse.shape) == (2, 4, 7) and lse.dtype == torch.float32


def test_opcheck_registration(monkeypatch):
    # opcheck compares repeated runs, which NaN-filled buffers would not disturb,
    # but keep real allocation to test the op exactly as shipped.
    monkeypatch.setattr(kattn, "_new_output", lambda s, d, dev: torch.empty(s, dtype=d, device=dev))
    case = Case(1, 2, 1, 16, 16, 16, True, "log")
    xs = [t.float().requires_grad_() for t in _inputs(case)]
    args = (*xs, None, None, True, 0.25, "log", True)
    torch.library.opcheck(torch.ops.gape.triton_attention_fwd.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_cpu_without_interpreter_is_a_clear_error():
    code = (
        "import torch, gape\n"
        "from gape.kernels.attention import gape_attention_triton\n"
        "q = torch.randn(1, 1, 4, 16); g = torch.rand(1, 1, 4)\n"
        "for call in (lambda: gape.attention(q, q, q, g, g, backend='triton'),\n"
        "             lambda: gape_attention_triton(q, q, q, g, g)):\n"
        "    try:\n"
        "        call()\n"
        "    except ValueError as e:\n"
        "        assert 'CUDA' in str(e) and 'TRITON_INTERPRET' in str(e), e\n"
        "    else:\n"
        "        raise SystemExit('no error')\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_torch_compile_traces_the_op():
    """fullgraph: the op is opaque to dynamo (fake impl) and differentiable."""
    xs = _inputs(Case(1, 2, 1, 16, 20, 16, True, "linear"))

    def fn(q, k, v, lam, pi):
        return kattn.gape_attention_triton(q, k, v, lam, pi, is_causal=True, distance="linear")

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    results = []
    for f in (compiled, fn):
        leaves = [t.float().requires_grad_() for t in xs]
        out = f(*leaves)
        results.append([out] + list(torch.autograd.grad(out.sum(), leaves)))
    for got, want in zip(*results):
        assert torch.equal(got, want)


def test_autotune_pruning_rules():
    cfg = kattn._cfg
    configs = [cfg(128, 64, 8, 3, (64,), (64, 128)), cfg(64, 64, 4, 2), cfg(16, 64, 4, 2), cfg(16, 32, 4, 1)]
    prune = kattn._pruner("fwd")
    q = torch.empty(1, 1, 1, 128, dtype=torch.float16)

    def kept(lq, d, **extra):
        args = dict(BLOCK_D=d, BLOCK_DV=d, Lq=lq, Lk=4096, **extra)
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in prune(configs, {"Q": q}, **args)]

    # on this CPU-only machine the rules of an sm_80-class device apply
    assert kept(4096, 64) == [(128, 64), (64, 64), (16, 64), (16, 32)]
    assert kept(4096, 128) == [(64, 64), (16, 64), (16, 32)]  # the big tile is shipped for D <= 64 only
    assert kept(1, 128) == [(16, 64), (16, 32)]  # decode: no 64-row query tiles
    assert kept(4096, 256) == [(64, 64), (16, 64), (16, 32)]
    # fp32 doubles the tiles: only the single-stage 16x32 tile still fits 163 KB of shared memory
    q32 = torch.empty(1, 1, 1, 256, dtype=torch.float32)
    args = dict(BLOCK_D=256, BLOCK_DV=256, Lq=4096, Lk=4096)
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in prune(configs, {"Q": q32}, **args)] == [(16, 32)]
