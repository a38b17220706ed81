"""GapeGate: the parameterisation of docs/maths.md written out by hand, rotation
invariance, identity at initialisation with gradient flow, lambda >= 0."""

import math

import pytest
import torch
from torch.nn import functional as F

from gape.hf.config import GapeConfig
from gape.hf.gates import GapeGate, inverse_softplus, pair_features

HQ, HKV, D = 4, 2, 16


def _random_gate(layout="half", **cfg) -> GapeGate:
    gate = GapeGate(HQ, HKV, D, GapeConfig(rope_layout=layout, **cfg), dtype=torch.float64)
    with torch.no_grad():
        for p in gate.parameters():
            p.normal_()
        gate.alpha.abs_()
    return gate


def _rotate(x: torch.Tensor, angles: torch.Tensor, layout: str) -> torch.Tensor:
    """Apply a RoPE-style rotation of each channel pair by ``angles [P]``."""
    p = x.shape[-1] // 2
    if layout == "half":
        a, b = x[..., :p], x[..., p:]
    else:
        a, b = x[..., 0::2], x[..., 1::2]
    cos, sin = angles.cos(), angles.sin()
    ra, rb = a * cos - b * sin, a * sin + b * cos
    if layout == "half":
        return torch.cat([ra, rb], dim=-1)
    return torch.stack([ra, rb], dim=-1).flatten(-2)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_gates_match_formula(layout):
    gate = _random_gate(layout)
    q = torch.randn(2, HQ, 5, D, dtype=torch.float64)
    k = torch.randn(2, HKV, 7, D, dtype=torch.float64)
    lam, pi = gate(q, k)
    assert lam.dtype == torch.float32 and pi.dtype == torch.float32
    # By hand, one element at a time.
    for h, m in ((0, 0), (3, 4), (1, 2)):
        x = q[1, h, m]
        pairs = [(x[i], x[i + D // 2]) if layout == "half" else (x[2 * i], x[2 * i + 1]) for i in range(D // 2)]
        f = torch.stack([torch.sqrt(a * a + b * b) for a, b in pairs]) / math.sqrt(D)
        want = gate.alpha[h] * F.softplus(f @ gate.w[h] + gate.b[h])
        torch.testing.assert_close(lam[1, h, m].double(), want, rtol=1e-5, atol=1e-6)
    for g, n in ((0, 6), (1, 0)):
        x = k[0, g, n]
        pairs = [(x[i], x[i + D // 2]) if layout == "half" else (x[2 * i], x[2 * i + 1]) for i in range(D // 2)]
        f = torch.stack([torch.sqrt(a * a + b * b) for a, b in pairs]) / math.sqrt(D)
        want = torch.sigmoid(f @ gate.u[g] + gate.c[g])
        torch.testing.assert_close(pi[0, g, n].double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_gates_are_rotation_invariant(layout):
    gate = _random_gate(layout)
    q = torch.randn(1, HQ, 6, D, dtype=torch.float64)
    k = torch.randn(1, HKV, 6, D, dtype=torch.float64)
    angles = torch.rand(D // 2, dtype=torch.float64) * 100
    lam, pi = gate(q, k)
    lam_r, pi_r = gate(_rotate(q, angles, layout), _rotate(k, angles, layout))
    torch.testing.assert_close(lam_r, lam, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pi_r, pi, rtol=1e-5, atol=1e-6)
    # The wrong layout is not invariant: the test can tell the layouts apart.
    other = "interleaved" if layout == "half" else "half"
    lam_wrong, _ = gate(_rotate(q, angles, other), k)
    assert not torch.allclose(lam_wrong, lam, rtol=1e-3)


def test_identity_at_init_with_gradient_to_alpha():
    gate = GapeGate(HQ, HKV, D, GapeConfig())
    q = torch.randn(2, HQ, 5, D)
    lam = gate.query_gate(q)
    assert torch.equal(lam, torch.zeros_like(lam)) and gate.is_identity()
    lam.sum().backward()
    # d lambda / d alpha = softplus(b) > 0 at init: training can leave identity.
    assert (gate.alpha.grad > 0).all()


def test_negative_alpha_gives_zero_lambda_and_still_gets_gradient():
    gate = _random_gate()
    with torch.no_grad():
        gate.alpha[0] = -2.0
    q = torch.randn(1, HQ, 3, D, dtype=torch.float64)
    lam = gate.query_gate(q)
    assert (lam >= 0).all() and torch.equal(lam[:, 0], torch.zeros_like(lam[:, 0]))
    lam.sum().backward()
    assert gate.alpha.grad[0] > 0


def test_fixed_lambda_and_no_key_gate_have_no_parameters():
    gate = GapeGate(HQ, HKV, D, GapeConfig(fixed_lambda=[0.1, 0.2, 0.3, 0.4], learned_pi=False))
    assert list(gate.parameters()) == []
    lam, pi = gate(torch.randn(2, HQ, 3, D), torch.randn(2, HKV, 5, D))
    torch.testing.assert_close(lam[1, :, 2], torch.tensor([0.1, 0.2, 0.3, 0.4]))
    assert torch.equal(pi, torch.zeros(2, HKV, 5))
    with pytest.raises(ValueError, match="fixed_lambda has 2 values"):
        GapeGate(HQ, HKV, D, GapeConfig(fixed_lambda=[0.1, 0.2]))


def test_constant_lambda_through_learned_layout():
    """The training-free setting: w = 0, alpha = 1, b = inverse_softplus(target)."""
    gate = GapeGate(HQ, HKV, D, GapeConfig())
    target = torch.tensor([0.05, 0.5, 1.0, 3.0])
    with torch.no_grad():
        gate.alpha.fill_(1.0)
        gate.b.copy_(inverse_softplus(target))
    lam = gate.query_gate(torch.randn(1, HQ, 4, D))
    torch.testing.assert_close(lam[0, :, 1], target)
    assert abs(F.softplus(torch.tensor(inverse_softplus(0.3))).item() - 0.3) < 1e-6


def test_trainable_parts():
    gate = GapeGate(HQ, HKV, D, GapeConfig(trainable=["key"]))
    grads = {n: p.requires_grad for n, p in gate.named_parameters()}
    assert grads == {"alpha": False, "w": False, "b": False, "u": True, "c": True}


def test_parameters_in_model_dtype():
    gate = GapeGate(HQ, HKV, D, GapeConfig(), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in gate.parameters())
    assert sum(p.numel() for p in gate.parameters()) == HQ * (D // 2 + 2) + HKV * (D // 2 + 1)


def test_pair_features_norm_is_rms():
    x = torch.randn(3, 64, dtype=torch.float64)
    f = pair_features(x)
    torch.testing.assert_close(f.double().norm(dim=-1), x.pow(2).mean(-1).sqrt(), rtol=1e-5, atol=1e-6)


def test_pair_features_gradient_is_finite_at_zero_pair():
    x = torch.zeros(2, 8)
    x[1] = torch.randn(8)
    x.requires_grad_(True)
    f = pair_features(x)
    f.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.equal(x.grad[0], torch.zeros(8))
    with torch.no_grad():
        torch.testing.assert_close(pair_features(x), f.detach(), rtol=1e-6, atol=1e-10)
