"""gape calibrate (gate-only training) and the training-free GAPE setting, on a tiny random Llama."""

from __future__ import annotations

import json
import math

import pytest
import torch

import gape
from gape.experiments import calibrate as cal
from gape import hf
from gape.experiments.training_free import apply_training_free
from tiny_models import tiny_llama_config, tiny_tokenizer

TASKS = ("passkey", "single")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def tiny_model(seed=0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(max_position_embeddings=1024))
    return model.eval()


def test_calibrate_trains_only_gates_saves_and_resumes(tok, tmp_path, one_thread):
    model = tiny_model()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = tmp_path / "cal"
    card = cal.calibrate(model, tok, out=str(out), minutes=5, max_steps=3, min_len=400, max_len=460, lr=0.05,
                         save_every=2, eval_items=2, tasks=TASKS, log=lambda *a: None)
    # base weights bit-identical (checked here independently of the card's hashes)
    state = {k: v for k, v in model.state_dict().items() if "gape_gate" not in k}
    assert state.keys() == base.keys()
    assert all(torch.equal(state[k], base[k]) for k in base)
    assert card["base_weights_unchanged"] is True
    # the gates moved away from identity
    alphas = torch.cat([g.alpha.detach() for _, g in hf.iter_gates(model)])
    assert alphas.abs().max() > 0
    assert card["steps"] == 3 and len(card["losses"]) == 3
    assert all(math.isfinite(l[-1]) for l in card["losses"])
    on_disk = json.loads((out / "card.json").read_text())
    assert on_disk["steps"] == 3 and "eval_loss_after" in on_disk and on_disk["config"]["learned_pi"] is True
    # the saved gates load into a fresh model and reproduce the trained one
    fresh = tiny_model()
    gape.load_gates(fresh, out / "gates.safetensors")
    ids = torch.randint(0, 256, (1, 50))
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
    # resume: same --out continues from 3 steps to 5
    hf.unpatch(model)
    card2 = cal.calibrate(model, tok, out=str(out), minutes=5, max_steps=5, min_len=400, max_len=460, lr=0.05,
                          save_every=2, eval_items=2, tasks=TASKS, log=lambda *a: None)
    assert card2["steps"] == 5 and card2["losses"][:3] == card["losses"]
    assert card2["eval_loss_before"] == card["eval_loss_before"]


def test_calibrate_rejects_long_windows_and_untrainable_gates(tok, tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match="max_len"):
        cal.calibrate(model, tok, out=str(tmp_path / "a"), max_len=8192)
    hf.patch(model, gape.GapeConfig(fixed_lambda=0.1, learned_pi=False))
    with pytest.raises(ValueError, match="trainable"):
        cal.calibrate(model, tok, out=str(tmp_path / "b"), max_steps=1, min_len=400, max_len=420, tasks=TASKS)


def test_data_stream_labels_only_the_answer(tok):
    stream = cal.DataStream(tok, min_len=400, max_len=420, text_fraction=0.0, seed=1, tasks=("passkey",))
    x, y, task = stream.next()
    assert task == "passkey"
    answer = y[0][y[0] != -100]
    assert 0 < len(answer) < 12
    assert torch.equal(x[0, -len(answer):], answer)
    assert tok.decode(answer).strip().isdigit()
    text = cal.DataStream(tok, min_len=64, max_len=64, text_fraction=1.0, seed=1)
    x, y, task = text.next()
    assert task == "text" and x.shape == (1, 64) and torch.equal(x, y)


def test_training_free_gates_in_range(tok):
    model = tiny_model()
    lam = 0.3
    summary = apply_training_free(model, tok, lam=lam, length=200)
    assert hf.is_patched(model) and sorted(summary) == [0, 1]
    ids = torch.randint(0, 256, (1, 120))
    from gape.hf.attention_probe import capture_attention

    with torch.no_grad(), capture_attention(model, rows=[119]) as rec:
        model(input_ids=ids)
    for i, entry in rec.items():
        lamv, pi = entry["lambda"], entry["pi"]
        assert (lamv >= 0).all() and (lamv <= lam + 1e-6).all()
        assert (pi >= 0).all() and (pi <= 1).all()
        # constant per head (no dependence on the token), as reported in the summary
        torch.testing.assert_close(lamv[0, :, 0], torch.tensor(summary[i]["lambda"]), atol=1e-4, rtol=0)
        assert all(0 <= r <= 1 for r in summary[i]["reach"])
        assert all(f < 0.2 for f in summary[i]["protected_fraction"])  # few keys protected
    assert all(p.requires_grad is False for _, g in hf.iter_gates(model) for p in g.parameters())


def test_training_free_with_zero_lambda_is_identity(tok):
    model = tiny_model()
    ids = torch.randint(0, 256, (1, 80))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    apply_training_free(model, tok, lam=0.0, length=100)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="lam"):
        apply_training_free(model, tok, lam=-1.0)


def test_the_budget_counts_the_time_before_training(tok, tmp_path, one_thread):
    """--minutes bounds the whole run: time already spent (loading, given as ``started``)
    counts, so a budget used up before training takes no step, and the final evaluation
    is not repeated on gates that did not move."""
    import time

    model = tiny_model()
    card = cal.calibrate(model, tok, out=str(tmp_path / "cal"), minutes=0.05, started=time.perf_counter() - 10,
                         min_len=400, max_len=460, eval_items=1, tasks=TASKS, log=lambda *a: None)
    assert card["steps"] == 0
    assert card["eval_loss_after"] == card["eval_loss_before"]
    assert card["seconds"] >= 10
