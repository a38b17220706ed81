"""Liger-style convergence: mini Llama, Mistral, Qwen3 and Gemma trained for 20 steps,
patched with identity gates (frozen at alpha = 0, run through GAPE's kernels: no identity
shortcut) against the unpatched model: the same loss curve. With the gates on and trained,
the loss falls."""

from __future__ import annotations

import pytest
import torch

import gape
from gape import hf

from test_archs import make

STEPS = 20
# 12 short training runs: over a minute of CPU (about 8 min wall on a loaded 2-core machine)
pytestmark = pytest.mark.slow


def _batch():
    # a learnable signal: each row repeats a short random motif
    g = torch.Generator().manual_seed(0)
    motif = torch.randint(3, 96, (4, 6), generator=g)
    return motif.repeat(1, 5)


def _train(model, params, steps=STEPS, lr=3e-3):
    torch.manual_seed(1)
    opt = torch.optim.AdamW(params, lr=lr)
    ids = _batch()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen3", "gemma"])
def test_identity_gates_train_like_the_unpatched_model(arch):
    plain = make(arch).train()
    want = _train(plain, list(plain.parameters()))
    model = make(arch).train()
    gape.patch(model, gape.GapeConfig(identity_shortcut=False))
    for p in hf.gate_parameters(model):
        p.requires_grad_(False)  # gates stay at identity; the model's weights train as before
    got = _train(model, [p for p in model.parameters() if p.requires_grad])
    assert want[-1] < want[0] - 0.5, "the run does not learn: the comparison proves little"
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=0, atol=2e-4)
    assert all(float(g.alpha.abs().max()) == 0 for _, g in hf.iter_gates(model))


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen3", "gemma"])
def test_with_gates_on_the_loss_falls(arch):
    model = make(arch).train()
    gape.patch(model, gape.GapeConfig(alpha_init=0.5))
    losses = _train(model, list(model.parameters()))
    assert losses[-1] < losses[0] - 0.5
    assert all(float(g.alpha.detach().abs().max()) > 0 for _, g in hf.iter_gates(model))
