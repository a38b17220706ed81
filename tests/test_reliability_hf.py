"""Nothing silently wrong on the transformers path: gate files are
validated and loaded all-or-nothing; float masks keep their meaning or are
refused; switching the attention implementation away is noticed; the decode
memo of pi follows every change of the key-gate parameters."""

from __future__ import annotations

import logging

import pytest
import torch

import gape
from gape import hf

from helpers import rewrite_safetensors
from test_hf import IDENTITY, make_model, randomize_gates, tokens


def _state_of(model) -> dict:
    return {f"{i}.{n}": t.detach().clone() for i, g in hf.iter_gates(model) for n, t in
            list(g.named_parameters()) + list(g.named_buffers())}


def _saved(tmp_path, arch="llama", config=IDENTITY):
    model = make_model(arch)
    gape.patch(model, config)
    if config.fixed_lambda is None:
        randomize_gates(model, seed=4)
    path = tmp_path / "gates.safetensors"
    gape.save_gates(model, path)
    return model, path


def test_nan_gate_weights_are_refused_and_the_model_is_untouched(tmp_path):
    _, path = _saved(tmp_path)
    bad = rewrite_safetensors(path, tmp_path / "nan.safetensors", tensors={"layers.1.u": torch.full((2, 8), float("nan"))})
    model = make_model("llama")
    with pytest.raises(ValueError, match=r"nan\.safetensors.*layers\.1\.u.*non-finite"):
        gape.load_gates(model, bad)
    assert not hf.is_patched(model) and not any("gape_gate" in n for n, _ in model.named_modules())


def test_negative_fixed_lambda_is_refused(tmp_path):
    _, path = _saved(tmp_path, config=gape.GapeConfig(backend="reference", fixed_lambda=0.2))
    bad = rewrite_safetensors(path, tmp_path / "neg.safetensors", tensors={"layers.0.fixed_lambda": torch.full((4,), -0.5)})
    with pytest.raises(ValueError, match=r"layers\.0\.fixed_lambda.*must lie in \[0\.0, inf\]"):
        gape.load_gates(make_model("llama"), bad)
    cfg = gape.GapeConfig(backend="reference", fixed_lambda=0.2).to_dict()
    cfg["fixed_lambda"] = -1.0
    import json

    bad_cfg = rewrite_safetensors(path, tmp_path / "negcfg.safetensors", metadata={"config": json.dumps(cfg)})
    with pytest.raises(ValueError, match=r"negcfg\.safetensors holds an invalid GapeConfig.*fixed_lambda"):
        gape.load_gates(make_model("llama"), bad_cfg)


def test_a_file_from_another_architecture_is_refused_unless_not_strict(tmp_path, caplog):
    _, path = _saved(tmp_path, arch="llama")
    model = make_model("mistral", sliding_window=None)  # same shapes, other model_type
    with pytest.raises(ValueError, match="saved from a llama model, this one is mistral"):
        gape.load_gates(model, path)
    assert not hf.is_patched(model)
    with caplog.at_level(logging.WARNING, logger="gape"):
        gape.load_gates(model, path, strict=False)
    assert hf.is_patched(model) and "saved from a llama model" in caplog.text


def test_a_load_that_fails_at_layer_one_leaves_layer_zero_as_it_was(tmp_path):
    _, path = _saved(tmp_path)
    bad = rewrite_safetensors(path, tmp_path / "short.safetensors", tensors={"layers.1.w": torch.zeros(4, 3)})
    model = make_model("llama")
    gape.patch(model, IDENTITY)
    randomize_gates(model, seed=9)
    before = _state_of(model)
    with pytest.raises(ValueError, match=r"short\.safetensors, layer 1: gate w has shape \(4, 3\)"):
        gape.load_gates(model, bad)
    after = _state_of(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    missing = rewrite_safetensors(path, tmp_path / "missing.safetensors", tensors={"layers.1.c": None})
    with pytest.raises(ValueError, match="layer 1: the file holds"):
        gape.load_gates(model, missing)
    after = _state_of(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_good_file_still_round_trips(tmp_path):
    saved_model, path = _saved(tmp_path)
    model = make_model("llama")
    gape.load_gates(model, path)
    want, got = _state_of(saved_model), _state_of(model)
    assert all(torch.equal(want[k], got[k]) for k in want)


# --------------------------------------------------------------------------- masks


def test_a_hard_float_mask_equals_the_bool_mask_and_a_soft_one_is_refused():
    model = make_model("llama")
    gape.patch(model, IDENTITY)
    randomize_gates(model)
    attn = model.model.layers[0].self_attn
    q, k, v = torch.randn(1, 4, 6, 16), torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16)
    allowed = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
    allowed[..., 0] = False
    allowed[..., 0, 0] = True
    for blocked in (float("-inf"), torch.finfo(torch.float32).min):
        additive = torch.zeros(1, 1, 6, 6).masked_fill(~allowed, blocked)
        a, _ = hf.gape_attention_forward(attn, q, k, v, additive)
        b, _ = hf.gape_attention_forward(attn, q, k, v, allowed)
        assert torch.equal(a, b)
    soft = torch.zeros(1, 1, 6, 6).masked_fill(~allowed, float("-inf"))
    soft[..., 3, 1] = -2.0
    with pytest.raises(ValueError, match="soft entries.*-2.0"):
        hf.gape_attention_forward(attn, q, k, v, soft)


# --------------------------------------------------------------------------- implementation switched away


def test_switching_the_attention_implementation_away_is_noticed(caplog):
    model = make_model("llama")
    gape.patch(model, IDENTITY)
    assert hf.is_patched(model)
    model.set_attn_implementation("sdpa")
    with caplog.at_level(logging.WARNING, logger="gape"):
        assert not hf.is_patched(model)
    assert "now 'sdpa', so GAPE is off" in caplog.text
    with pytest.raises(ValueError, match="now 'sdpa'"):
        gape.patch(model)
    model.set_attn_implementation("gape")
    assert hf.is_patched(model)
    gape.unpatch(model)
    assert model.config._attn_implementation == "sdpa" and not hf.is_patched(model)


# --------------------------------------------------------------------------- decode memo of pi


@pytest.mark.parametrize("change", ["replace-data", "in-place", "in-place-through-data"])
def test_decode_memo_follows_key_gate_changes(change):
    """After a change of u or c between decode steps, the step equals one that
    recomputes pi from every cached key (no memo)."""
    import copy

    model = make_model("llama")
    gape.patch(model, IDENTITY)
    randomize_gates(model)
    ids = tokens(1, 12)
    kw = {hf.cache_kwarg(): None, "use_cache": True}
    with torch.no_grad():
        cache = hf.output_cache(model(ids, use_cache=True))
        step = ids[:, -1:]
        model(step, **{**kw, hf.cache_kwarg(): cache})  # memo filled for the cached keys
        for _, g in hf.iter_gates(model):
            if change == "replace-data":
                g.u.data = torch.randn_like(g.u)
            elif change == "in-place":
                g.c.add_(2.0)
            else:
                g.u.data.mul_(-3.0)
        fresh = copy.deepcopy(cache)
        got = model(step, **{**kw, hf.cache_kwarg(): cache}).logits
        for _, g in hf.iter_gates(model):
            hf.decode.layer_state(g).pi_memo = None
        want = model(step, **{**kw, hf.cache_kwarg(): fresh}).logits
    assert torch.equal(got, want)
