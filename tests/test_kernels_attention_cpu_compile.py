"""torch.compile keeps the fused C++ CPU kernel: its ops have fake implementations, so a
compiled GAPE-patched model (and a compiled gape.attention) calls the kernel as one opaque op
instead of a formulation that materialises the [Lq, Lk] scores; outputs and gradients equal
eager's."""

from __future__ import annotations

import pytest
import torch
from test_hf import make_model, randomize_gates, tokens

import gape
from gape.kernels import attention_cpu

pytestmark = pytest.mark.skipif(not attention_cpu.available(), reason="the fused CPU kernel is not built here")

FUSED = "gape.cpu_attention_fused"


class Capture:
    """A torch.compile backend that records the ops of the graphs dynamo hands it and runs them as captured."""

    def __init__(self):
        self.targets = []

    def __call__(self, gm, example_inputs):
        self.targets += [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
        return gm.forward


def _uses_fused(targets) -> bool:
    return any(FUSED in t for t in targets)


@pytest.mark.slow  # about a minute each: dynamo traces a whole model
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_compiled_patched_model_calls_the_fused_op(dtype):
    torch._dynamo.reset()
    model = make_model("qwen3")
    gape.patch(model, gape.GapeConfig())
    randomize_gates(model)
    model.to(dtype)
    ids = tokens(2, 14)
    cap = Capture()
    compiled = torch.compile(model, fullgraph=True, backend=cap)
    with torch.no_grad():
        want = model(ids).logits
        got = compiled(ids).logits
    assert got.dtype == dtype
    assert _uses_fused(cap.targets), "the compiled graph does not call the fused kernel"
    # the reference formulation's softmax over materialised scores is not in the graph
    assert not any("softmax" in t for t in cap.targets), [t for t in cap.targets if "softmax" in t]
    # the captured graph runs the same ops as eager: equal up to the dtype's rounding of a
    # reordered sum, not a different formulation
    atol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps * float(want.float().abs().max())
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=atol)


@pytest.mark.slow  # about a minute
def test_compiled_patched_model_trains_through_the_fused_op():
    torch._dynamo.reset()
    model = make_model("llama")
    gape.patch(model, gape.GapeConfig())
    randomize_gates(model)
    ids = tokens(1, 20)
    model(ids).logits.square().mean().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled(ids).logits.square().mean().backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and any("gape" in n for n in got)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)


def _compiled_equals_eager(fn, leaves):
    """``fn`` compiled (fullgraph) runs the fused op and gives eager's output and gradients
    (dtypes included) exactly; returns the compiled output."""
    want = fn(*leaves)
    want_grads = torch.autograd.grad(want.float().square().sum(), leaves)
    cap = Capture()
    got = torch.compile(fn, fullgraph=True, backend=cap)(*leaves)
    got_grads = torch.autograd.grad(got.float().square().sum(), leaves)
    assert _uses_fused(cap.targets)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for a, b in zip(got_grads, want_grads):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("positions", [{}, dict(query_offset=3, window_size=(5, 0)), "per-batch"],
                         ids=["dense", "offset-window", "per-batch-offset"])
def test_compiled_attention_equals_eager(dtype, positions):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 9, 16, generator=g).to(dtype)
    k, v = (torch.randn(2, 2, 21, 16, generator=g).to(dtype) for _ in range(2))
    lam, pi = torch.rand(2, 4, 9, generator=g), torch.rand(2, 2, 21, generator=g)
    if positions == "per-batch":
        positions = dict(query_offset=torch.tensor([12, 4]))
    leaves = [t.requires_grad_() for t in (q, k, v, lam, pi)]

    got = _compiled_equals_eager(lambda *xs: gape.attention(*xs, backend="torch", **positions), leaves)
    assert got.dtype == dtype


def test_fake_implementation_matches_the_kernel():
    q = torch.randn(1, 4, 7, 8, dtype=torch.bfloat16)
    k, v = torch.randn(1, 2, 7, 8, dtype=torch.bfloat16), torch.randn(1, 2, 7, 12, dtype=torch.bfloat16)
    lam, pi = torch.rand(1, 4, 7), torch.rand(1, 2, 7)
    args = (q, k, v, lam, pi, None, True, 0.3, "log", None, None, None)
    torch.library.opcheck(torch.ops.gape.cpu_attention_fused.default, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_compiled_attention_with_sinks_and_softcap_equals_eager(dtype):
    """Learned sinks and the soft-cap go through the fused op too (the sinks' gradient included)."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 9, 16, generator=g).to(dtype)
    k, v = (torch.randn(2, 2, 21, 16, generator=g).to(dtype) for _ in range(2))
    lam, pi = torch.rand(2, 4, 9, generator=g), torch.rand(2, 2, 21, generator=g)
    sinks = torch.randn(4, generator=g) * 2
    leaves = [t.requires_grad_() for t in (q, k, v, lam, pi, sinks)]

    _compiled_equals_eager(
        lambda *xs: gape.attention(*xs[:5], backend="torch", sinks=xs[5], softcap=1.5, window_size=(6, 0)), leaves)


def test_fake_implementation_with_sinks_and_softcap_matches_the_kernel():
    q = torch.randn(1, 4, 7, 8)
    k, v = torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 12)
    lam, pi, sinks = torch.rand(1, 4, 7), torch.rand(1, 2, 7), torch.randn(4)
    # requiring grad, so opcheck also traces the backward op (its fake gives the sinks' gradient)
    args = (q, k, v, lam, pi, None, True, 0.3, "log", None, None, None, sinks.requires_grad_(), 2.0)
    torch.library.opcheck(torch.ops.gape.cpu_attention_fused.default, args)
