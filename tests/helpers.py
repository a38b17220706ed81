"""Shared checks of a GAPE attention implementation against the float64 reference.

A backend is any callable with the backend signature

    fn(query, key, value, query_gate, key_gate, attn_mask, is_causal, scale, distance)

(see ``gape/core/api.py``). :func:`assert_matches_reference` runs it forward and
backward in a given dtype, runs the reference in float64 (the truth) and in
the same dtype (whose own error sets the tolerance, as in flash-attention's
tests), and asserts that the output and all five gradients are within
``factor`` times the same-dtype reference's error plus a small ``atol``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gape.core.reference import reference_attention

GRAD_NAMES = ("query", "key", "value", "query_gate", "key_gate")

# absolute slack per dtype, relative to the magnitude of the float64 tensor
ATOL = {
    torch.float64: 1e-10,
    torch.float32: 2e-6,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


@dataclass
class Case:
    """Shapes of one check; ``ident`` gives a readable parametrize id."""

    b: int = 1
    hq: int = 2
    hkv: int = 1
    lq: int = 8
    lk: int = 8
    d: int = 16
    dv: int | None = None

    def ident(self) -> str:
        dv = "" if self.dv in (None, self.d) else f"-Dv{self.dv}"
        return f"B{self.b}-H{self.hq}/{self.hkv}-Lq{self.lq}-Lk{self.lk}-D{self.d}{dv}"


def make_inputs(case: Case, *, lam_max: float = 0.5, seed: int = 0, device="cpu"):
    """Float64 master inputs (query, key, value, query_gate, key_gate).

    ``lam_max`` bounds the forgetting rate; the gates are uniform in
    ``[0, lam_max]`` and ``[0, 1]``.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    dv = case.dv or case.d
    f64 = dict(dtype=torch.float64, generator=g)
    q = torch.randn(case.b, case.hq, case.lq, case.d, **f64)
    k = torch.randn(case.b, case.hkv, case.lk, case.d, **f64)
    v = torch.randn(case.b, case.hkv, case.lk, dv, **f64)
    lam = torch.rand(case.b, case.hq, case.lq, **f64) * lam_max
    pi = torch.rand(case.b, case.hkv, case.lk, **f64)
    return tuple(t.to(device) for t in (q, k, v, lam, pi))


def run_fwd_bwd(fn, inputs, grad_out, dtype, gate_dtype=None, positions=None, **kwargs):
    """Output and the five gradients of ``fn`` with inputs cast to ``dtype``.

    Gates are cast to ``gate_dtype`` (default: ``dtype``). Returns float64
    copies and the gradient dtypes.
    """
    gate_dtype = gate_dtype or dtype
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs[:3]]
    leaves += [t.detach().to(gate_dtype).requires_grad_() for t in inputs[3:]]
    out = fn(*leaves, kwargs["attn_mask"], kwargs["is_causal"], kwargs["scale"], kwargs["distance"], **(positions or {}))
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype), allow_unused=True)
    for name, leaf, gr in zip(GRAD_NAMES, leaves, grads):
        assert gr is not None, f"no gradient for {name}"
        assert gr.dtype == leaf.dtype, f"gradient of {name} is {gr.dtype}, input was {leaf.dtype}"
        assert gr.shape == leaf.shape, f"gradient of {name} has shape {tuple(gr.shape)}, want {tuple(leaf.shape)}"
    return out.detach().double(), [gr.double() for gr in grads], out.dtype


def _reference(upcast=False):
    def fn(q, k, v, lam, pi, attn_mask, is_causal, scale, distance, **positions):
        return reference_attention(q, k, v, lam, pi, attn_mask, is_causal, scale, distance, upcast=upcast, **positions)

    return fn


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


def assert_matches_reference(
    fn,
    inputs,
    *,
    dtype=torch.float32,
    gate_dtype=None,
    attn_mask=None,
    is_causal=True,
    scale=None,
    distance="log",
    factor: float = 2.0,
    atol: float | None = None,
    check_grads: bool = True,
    positions: dict | None = None,
):
    """Assert ``fn`` in ``dtype`` is as close to float64 truth as the same-dtype reference.

    ``inputs`` are float64 (see :func:`make_inputs`). ``positions`` (``query_offset``,
    ``window``) go to ``fn`` and to the reference as keywords. Returns the measured
    errors ``{name: (err_fn, err_same_dtype_reference)}`` for reporting.
    """
    d = inputs[0].shape[-1]
    kw = dict(attn_mask=attn_mask, is_causal=is_causal, scale=1 / math.sqrt(d) if scale is None else scale, distance=distance)
    g = torch.Generator(device="cpu").manual_seed(123)
    b, hq, lq = inputs[0].shape[:3]
    grad_out = torch.randn(b, hq, lq, inputs[2].shape[-1], dtype=torch.float64, generator=g).to(inputs[0].device)
    atol = ATOL[dtype] if atol is None else atol

    kw["positions"] = positions
    truth_out, truth_grads = run_fwd_bwd(_reference(upcast=False), inputs, grad_out, torch.float64, **kw)[:2]
    same_out, same_grads = run_fwd_bwd(_reference(upcast=False), inputs, grad_out, dtype, gate_dtype, **kw)[:2]
    got_out, got_grads, got_dtype = run_fwd_bwd(fn, inputs, grad_out, dtype, gate_dtype, **kw)
    assert got_dtype == dtype, f"output dtype {got_dtype}, want {dtype}"

    names = ("output",) + GRAD_NAMES if check_grads else ("output",)
    got = [got_out] + got_grads
    same = [same_out] + same_grads
    truth = [truth_out] + truth_grads
    errors = {}
    for name, x, s, t in zip(names, got, same, truth):
        assert torch.isfinite(x).all(), f"{name} has non-finite values"
        err, ref_err = max_err(x, t), max_err(s, t)
        bound = factor * ref_err + atol * max(1.0, float(t.abs().max()) if t.numel() else 1.0)
        errors[name] = (err, ref_err)
        assert err <= bound, (
            f"{name}: max abs error vs float64 {err:.3e} exceeds {factor} x same-dtype reference error "
            f"{ref_err:.3e} + atol ({bound:.3e}); dtype {dtype}"
        )
    return errors


def rewrite_safetensors(src, dst, tensors=None, metadata=None):
    """Copy a safetensors file with some tensors / metadata entries replaced (a None value
    drops the entry): the faulty gate files of the loading tests. Returns ``dst``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        ts = {k: f.get_tensor(k) for k in f.keys()}
    for k, v in (tensors or {}).items():
        ts.pop(k) if v is None else ts.__setitem__(k, v)
    for k, v in (metadata or {}).items():
        meta.pop(k) if v is None else meta.__setitem__(k, v)
    save_file(ts, str(dst), metadata=meta)
    return dst
