"""The paper's gate form (GapeConfig(gate="paper")) and the positional schemes
(gape.with_positional), each against the independent float64 forward in
tests/paper_reference.py: prefill, left padding, step-by-step decode with
DynamicCache, GQA, gradients; Qwen3 (pre-RoPE q/k after q_norm/k_norm) and
Mistral's sliding-window cache; save/load of both forms; bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, MistralConfig, Qwen3Config

import gape
from gape import hf
from gape._threads import set_threads
from gape.hf.positional import alibi_slopes
from paper_reference import alibi_reference_slopes, reference_logits, weights

set_threads(2)

T = 16  # the paper's training length in these tests: small, so the gates matter at 20-30 tokens
SMALL = dict(
    vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=256, initializer_range=0.1,
    tie_word_embeddings=False, attention_dropout=0.0,
)
TOL = dict(rtol=0, atol=1e-4)  # fp32 model vs fp64 reference, on logits


def make_model(cls=LlamaConfig, **overrides):
    config = copy.deepcopy(cls(**{**SMALL, **overrides}))
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def paper_config(**kw):
    return gape.GapeConfig(**{"gate": "paper", "train_length": T, **kw})


def randomize(model, seed: int = 1) -> None:
    """Gate parameters of order one: lambda ~ 0.05-0.5 per token at T = 16, pi over (0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, gate in hf.iter_gates(model):
            for name, p in gate.named_parameters():
                scale = 0.3 if name in ("w_g", "w_l", "w", "u") else 1.0
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
            if hasattr(gate, "alpha"):
                gate.alpha.abs_()


def tokens(batch: int, length: int, seed: int = 2) -> torch.Tensor:
    return torch.randint(3, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_padded(lengths=(22, 15, 9), seed=10):
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for r, n in enumerate(lengths):
        ids[r, width - n:] = tokens(1, n, seed=seed + r)[0]
        mask[r, width - n:] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp_min(0)


def assert_real_rows_close(out, ref, mask):
    keep = mask.bool()
    torch.testing.assert_close(out[keep].double(), ref[keep], **TOL)


# --------------------------------------------------------------------------- the paper's form vs fp64


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("length", [26, 80])  # 80 takes the prefill branch of the gates' head dot product
def test_paper_prefill_and_left_padding_equal_fp64_reference(backend, length):
    model = make_model()
    gape.patch(model, paper_config(backend=backend))
    randomize(model)
    ids = tokens(2, length)
    with torch.no_grad():
        out = model(ids).logits
        ids_p, mask, pos = left_padded()
        out_p = model(ids_p, attention_mask=mask, position_ids=pos).logits
    ref = reference_logits(model, ids, gate="paper", train_length=T)
    torch.testing.assert_close(out.double(), ref, **TOL)
    assert_real_rows_close(out_p, reference_logits(model, ids_p, mask, pos, gate="paper", train_length=T), mask)
    # the gates matter: RoPE alone is far from it
    rope = reference_logits(model, ids)
    assert (rope - ref).abs().max() > 0.05


def test_paper_decode_step_by_step_with_dynamic_cache_left_padded():
    model = make_model()
    gape.patch(model, paper_config())
    randomize(model, seed=3)
    ids, mask, pos = left_padded()
    ref = reference_logits(model, ids, mask, pos, gate="paper", train_length=T)
    start = 12
    with torch.no_grad():
        out = model(ids[:, :start], attention_mask=mask[:, :start], position_ids=pos[:, :start], use_cache=True)
        cache = hf.output_cache(out)
        steps = [out.logits]
        for t in range(start, ids.shape[1]):
            out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=pos[:, t:t + 1],
                        use_cache=True, **{hf.cache_kwarg(): cache})
            steps.append(out.logits)
    assert_real_rows_close(torch.cat(steps, dim=1), ref, mask)
    # pi is remembered per cached key: one float per key and kv head
    gate = next(g for _, g in hf.iter_gates(model))
    assert hf.decode.cached_pi_bytes(gate) == ids.shape[0] * 2 * ids.shape[1] * 4


def test_paper_generate_cached_equals_uncached():
    model = make_model()
    gape.patch(model, paper_config())
    randomize(model, seed=4)
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    ids, mask, _ = left_padded((12, 7), seed=20)
    with torch.no_grad():
        cached = model.generate(ids, attention_mask=mask, **kw)
        full = model.generate(ids, attention_mask=mask, use_cache=False, **kw)
    assert torch.equal(cached.sequences, full.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(full.logits), rtol=0, atol=1e-5)


def test_paper_gradients_equal_fp64_reference_into_projections():
    """Trained jointly from scratch: the loss gradient reaches every gate parameter and,
    through the gates, the q/k projections -- equal to the fp64 autograd gradient."""
    model = make_model()
    gape.patch(model, paper_config())
    randomize(model, seed=5)
    model.train()
    ids = tokens(2, 20, seed=7)
    loss = torch.nn.functional.cross_entropy(model(ids).logits[:, :-1].reshape(-1, 96), ids[:, 1:].reshape(-1))
    loss.backward()
    W = weights(model, requires_grad=True)
    ref_logits = reference_logits(model, ids, W=W, gate="paper", train_length=T)
    ref = torch.nn.functional.cross_entropy(ref_logits[:, :-1].reshape(-1, 96), ids[:, 1:].reshape(-1))
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=0, atol=1e-5)
    for name, p in model.named_parameters():
        want = W[name].grad
        assert want is not None and p.grad is not None, name
        if "gape_gate" in name or "q_proj" in name or "k_proj" in name:
            assert want.abs().max() > 0, name
        torch.testing.assert_close(p.grad.double(), want, rtol=1e-3, atol=1e-6, msg=name)


def test_paper_very_negative_gamma_is_rope_default_start_is_not():
    model = make_model()
    ids = tokens(2, 24)
    with torch.no_grad():
        rope = model(ids).logits
        gape.patch(model, paper_config(gamma_init=-30.0))
        near = model(ids).logits
        gape.unpatch(model)
        gape.patch(model, paper_config())  # the paper's plain start: gamma = b = w = 0
        start = model(ids).logits
        gate = next(g for _, g in hf.iter_gates(model))
    torch.testing.assert_close(near, rope, rtol=0, atol=1e-5)
    assert (start - rope).abs().max() > 1e-3
    assert gate.gamma.abs().max() == 0 and gate.w_g.abs().max() == 0 and gate.b_l.abs().max() == 0


def test_paper_parameters_are_the_papers():
    model = make_model()
    gape.patch(model, paper_config(trainable=["query"]))
    gate = next(g for _, g in hf.iter_gates(model))
    shapes = {n: tuple(p.shape) for n, p in gate.named_parameters()}
    assert shapes == {"gamma": (4,), "w_g": (4, 16), "b_g": (4,), "w_l": (2, 16), "b_l": (2,)}
    assert [n for n, p in gate.named_parameters() if p.requires_grad] == ["w_g", "b_g"]
    gape.unpatch(model)
    gape.patch(model, paper_config(key_gate=False))
    assert {n for n, _ in next(g for _, g in hf.iter_gates(model)).named_parameters()} == {"gamma", "w_g", "b_g"}
    with torch.no_grad():
        ids = tokens(1, 18)
        torch.testing.assert_close(model(ids).logits.double(), reference_logits(model, ids, gate="paper", train_length=T), **TOL)
    attn = model.model.layers[0].self_attn
    assert len(attn.q_proj._forward_hooks) == 1 and len(attn.k_proj._forward_hooks) == 1
    gape.unpatch(model)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("arch", ["qwen3", "mistral"])
def test_paper_other_architectures_decode_equals_full(arch):
    """Qwen3: the pre-RoPE q/k are q_norm/k_norm outputs. Mistral: a sliding window of
    8, so decode runs on DynamicSlidingWindowLayer, which drops old keys."""
    cls = {"qwen3": Qwen3Config, "mistral": MistralConfig}[arch]
    model = make_model(cls, **({"sliding_window": 8} if arch == "mistral" else {}))
    gape.patch(model, paper_config())
    randomize(model, seed=6)
    ids = tokens(2, 24)
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :10], use_cache=True)
        cache = hf.output_cache(out)
        steps = [out.logits]
        for t in range(10, 24):
            out = model(ids[:, t:t + 1], use_cache=True, **{hf.cache_kwarg(): cache})
            steps.append(out.logits)
        gape.unpatch(model)
        rope = model(ids).logits
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)
    assert (full - rope).abs().max() > 1e-2
    if arch == "mistral":
        assert type(cache.layers[0]).__name__ == "DynamicSlidingWindowLayer"


def test_train_gates_only_with_the_paper_form():
    model = make_model()
    gape.patch(model, paper_config(trainable=["alpha", "key"]))
    params = hf.train_gates_only(model)
    assert len(params) == 2 * 3  # gamma, w_l, b_l per layer
    assert not any(p.requires_grad for n, p in model.named_parameters() if "gape_gate" not in n)


def test_paper_refuses_a_cache_it_did_not_fill():
    model = make_model()
    ids = tokens(1, 12)
    with torch.no_grad():
        cache = hf.output_cache(model(ids[:, :8], use_cache=True))  # filled unpatched
        gape.patch(model, paper_config())
        with pytest.raises(ValueError, match="KV cache holds 8 keys"):
            model(ids[:, 8:9], use_cache=True, **{hf.cache_kwarg(): cache})


def test_paper_follows_a_reordered_or_cropped_cache_and_refuses_edited_keys():
    """The cache's own reorder_cache (beam search) and crop (assisted decoding) make new
    key tensors: the remembered pi follows them, so the next step equals the full forward
    of the reordered / cropped rows; keys edited into a new tensor are refused."""
    model = make_model()
    gape.patch(model, paper_config())
    randomize(model)
    ids, nxt = tokens(2, 10), tokens(2, 1, seed=5)
    with torch.no_grad():
        def step(cache):
            return model(nxt, use_cache=True, **{hf.cache_kwarg(): cache}).logits

        cache = hf.output_cache(model(ids, use_cache=True))
        cache.reorder_cache(torch.tensor([1, 0]))
        want = model(torch.cat([ids.flip(0), nxt], dim=1)).logits[:, -1:]
        torch.testing.assert_close(step(cache), want, rtol=1e-5, atol=1e-5)

        cache = hf.output_cache(model(ids, use_cache=True))
        cache.crop(-4)  # keeps the first 6
        want = model(torch.cat([ids[:, :6], nxt], dim=1)).logits[:, -1:]
        torch.testing.assert_close(step(cache), want, rtol=1e-5, atol=1e-5)

        cache = hf.output_cache(model(ids, use_cache=True))
        cache.layers[0].keys = cache.layers[0].keys + 1
        with pytest.raises(ValueError, match="KV cache holds 10 keys"):
            step(cache)


# --------------------------------------------------------------------------- save / load


def test_save_load_both_forms_and_form_mismatch(tmp_path):
    ids = tokens(1, 14)
    files = {}
    for form, cfg in (("paper", paper_config()), ("invariant", gape.GapeConfig(distance="linear"))):
        model = make_model()
        gape.patch(model, cfg)
        randomize(model, seed=8)
        with torch.no_grad():
            want = model(ids).logits
        files[form] = tmp_path / f"{form}.safetensors"
        gape.save_gates(model, files[form])
        fresh = make_model()
        gape.load_gates(fresh, files[form])
        assert hf.gape_config(fresh) == hf.gape_config(model)
        with torch.no_grad():
            assert torch.equal(fresh(ids).logits, want)
    into_invariant = make_model()
    gape.patch(into_invariant, gape.GapeConfig(distance="linear"))
    with pytest.raises(ValueError, match="gate='paper'.*patched with gate='invariant'"):
        gape.load_gates(into_invariant, files["paper"])
    into_paper = make_model()
    gape.patch(into_paper, paper_config())
    with pytest.raises(ValueError, match="gate='invariant'.*patched with gate='paper'"):
        gape.load_gates(into_paper, files["invariant"])
    other_t = make_model()
    gape.patch(other_t, paper_config(train_length=2 * T))
    with pytest.raises(ValueError, match="train_length=16"):
        gape.load_gates(other_t, files["paper"])


# --------------------------------------------------------------------------- positional schemes


def test_alibi_slopes_are_the_standard_ones():
    for n in (1, 2, 4, 6, 8, 9, 12, 16, 24):
        torch.testing.assert_close(torch.tensor(alibi_slopes(n)), torch.tensor(alibi_reference_slopes(n)), rtol=1e-12, atol=0)
    assert alibi_slopes(8) == [2.0 ** -i for i in range(1, 9)]


SCHEMES = [("rope", None), ("nope", None), ("prope", 0.75), ("prope", 0.25), ("alibi", None)]


@pytest.mark.parametrize("gate", [None, "paper", "invariant"], ids=["no-gape", "paper", "invariant"])
@pytest.mark.parametrize("scheme, p", SCHEMES, ids=[f"{s}{'' if p is None else p}" for s, p in SCHEMES])
def test_positional_scheme_equals_fp64_reference(scheme, p, gate):
    model = make_model()
    gape.with_positional(model, scheme, p=p)
    distance = "log" if gate == "invariant" and scheme != "alibi" else "linear"
    if gate == "paper":
        gape.patch(model, paper_config())
    elif gate == "invariant":
        gape.patch(model, gape.GapeConfig(distance=distance))
    if gate:
        randomize(model, seed=9)
    ids, mask, pos = left_padded((20, 13))
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=pos).logits
    ref = reference_logits(model, ids, mask, pos, gate=gate, train_length=T, distance=distance, scheme=scheme, p=p)
    assert_real_rows_close(out, ref, mask)
    if scheme != "rope":  # the scheme is in effect: it differs from RoPE
        rope = reference_logits(model, ids, mask, pos, gate=gate, train_length=T, distance=distance)
        assert (rope - ref)[mask.bool()].abs().max() > 1e-3


def test_alibi_runs_through_the_fused_kernel(monkeypatch):
    """ALiBi alone and with paper gates: the torch backend (fused C++ forward on the
    CPU), never the materializing reference backend."""
    import gape.core.reference
    import gape.core.torch_backend

    calls = []
    real = gape.core.torch_backend.torch_attention

    def spy(query, key, value, lam, pi, *args):
        calls.append((tuple(lam.shape), float(pi.abs().max())))
        return real(query, key, value, lam, pi, *args)

    def forbidden(*args, **kwargs):
        raise AssertionError("the reference backend materializes the bias")

    monkeypatch.setattr(gape.core.torch_backend, "torch_attention", spy)
    monkeypatch.setattr(gape.core.reference, "reference_attention", forbidden)
    # the backend table caches loaded functions (a dict lookup torch.compile traces)
    monkeypatch.setattr(gape.core.api, "_LOADED", {})
    monkeypatch.setattr(hf.attention, "_BACKEND_FNS", {})
    model = make_model()
    gape.with_positional(model, "alibi")
    assert model.config._attn_implementation == "gape"
    ids = tokens(1, 10)
    with torch.no_grad():
        model(ids)
    assert calls == [((1, 4, 10), 0.0)] * 2  # both layers, pi = 0
    gape.patch(model, paper_config())
    with torch.no_grad():
        model(ids)
    assert len(calls) == 4 and calls[-1][1] > 0


def test_alibi_decode_with_cache_equals_full():
    model = make_model()
    gape.with_positional(model, "alibi")
    ids = tokens(2, 20)
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :12], use_cache=True)
        cache, steps = hf.output_cache(out), [out.logits]
        for t in range(12, 20):
            out = model(ids[:, t:t + 1], use_cache=True, **{hf.cache_kwarg(): cache})
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)
    torch.testing.assert_close(full.double(), reference_logits(model, ids, scheme="alibi"), **TOL)


def test_with_positional_is_reversible_and_composes_with_patch_either_order():
    model = make_model()
    ids = tokens(1, 16)
    with torch.no_grad():
        rope = model(ids).logits
        gape.with_positional(model, "alibi")
        gape.patch(model, paper_config())
        a = model(ids).logits
        gape.unpatch(model)
        assert model.config._attn_implementation == "gape"  # ALiBi still needs it
        gape.with_positional(model, "rope")
        assert model.config._attn_implementation == "sdpa"
        assert torch.equal(model(ids).logits, rope)
        gape.patch(model, paper_config())
        gape.with_positional(model, "alibi")
        assert torch.equal(model(ids).logits, a)
        gape.with_positional(model, "nope")  # calls do not stack: ALiBi's slopes go
        assert not hf.has_alibi(model)
        gape.unpatch(model)
        gape.with_positional(model, "rope")
        assert torch.equal(model(ids).logits, rope)
    assert gape.hf.positional.positional_scheme(model) == {"scheme": "rope", "p": None}
    assert model.config._attn_implementation == "sdpa"


def test_prope_edges_are_rope_and_nope():
    model = make_model()
    ids = tokens(1, 16)
    with torch.no_grad():
        rope = model(ids).logits
        gape.with_positional(model, "prope", p=1.0)
        assert torch.equal(model(ids).logits, rope)
        gape.with_positional(model, "prope", p=0.0)
        zero = model(ids).logits
        gape.with_positional(model, "nope")
        assert torch.equal(model(ids).logits, zero)
    assert model.model.rotary_emb.keep == 0


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: gape.with_positional(m, "yarn"), "scheme must be one of"),
        (lambda m: gape.with_positional(m, "prope"), "p must be the fraction"),
        (lambda m: gape.with_positional(m, "prope", p=1.5), "p must be the fraction"),
        (lambda m: gape.with_positional(m, "nope", p=0.5), "p applies to scheme='prope' only"),
        (lambda m: gape.with_positional(m, "nope", backend="torch"), "backend applies to scheme='alibi' only"),
        (lambda m: gape.with_positional(m, "alibi", backend="cuda"), "backend must be one of"),
        (lambda m: (gape.with_positional(m, "nope"), gape.with_rope_scaling(m, "yarn", 2.0)), "call with_rope_scaling before"),
        (lambda m: (gape.with_positional(m, "alibi"), gape.patch(m, gape.GapeConfig())), "distance must be 'linear'"),
        (lambda m: (gape.patch(m, gape.GapeConfig()), gape.with_positional(m, "alibi")), "linear-distance bias"),
    ],
    ids=["scheme", "p-missing", "p-range", "p-nope", "backend-nope", "backend-name", "rope-scaling", "alibi-log", "log-alibi"],
)
def test_positional_bad_input_is_named(call, match):
    with pytest.raises(ValueError, match=match):
        call(make_model())


@pytest.mark.parametrize("setup", ["paper", "alibi", "alibi+paper"])
def test_attention_probe_sees_the_paper_gates_and_alibi(setup):
    """gape.hf.attention_probe (attention entropy, gate magnitudes) with the paper's form
    and ALiBi: the gates are computed once and handed to GAPE's attention, so the
    model's outputs under the probe are unchanged and the recorded lambda is right."""
    from gape.hf.attention_probe import capture_attention

    model = make_model()
    if "alibi" in setup:
        gape.with_positional(model, "alibi")
    if "paper" in setup:
        gape.patch(model, paper_config())
        randomize(model, seed=11)
    ids = tokens(2, 18)
    with torch.no_grad():
        want = model(ids).logits
        with capture_attention(model) as rec:
            got = model(ids).logits
        q_pre = model.model.layers[0].self_attn.q_proj(
            model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))).view(2, 18, 4, 16).transpose(1, 2)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    lam = torch.zeros(2, 4, 18)
    if "paper" in setup:
        lam = lam + next(g for _, g in hf.iter_gates(model)).query_gate(q_pre)
    if "alibi" in setup:
        lam = lam + torch.tensor(alibi_slopes(4))[None, :, None]
    torch.testing.assert_close(rec[0]["lambda"], lam, rtol=1e-6, atol=1e-7)
    probs = rec[0]["probs"]
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 18), rtol=0, atol=1e-5)


def test_paper_decode_refuses_after_key_gate_data_replaced():
    """A key-gate parameter replaced through .data between decode steps: the stored pi of
    the cached keys is stale, and the paper form cannot recompute it (no pre-RoPE keys)."""
    from gape.hf.gates import PaperGate

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    m = AutoModelForCausalLM.from_config(cfg).eval()
    gape.patch(m, gape.GapeConfig(gate="paper", train_length=16))
    ids = torch.randint(0, 50, (1, 8))
    cache = DynamicCache()
    with torch.no_grad():
        m(ids, past_key_values=cache, use_cache=True)
        m(ids[:, :1], past_key_values=cache, use_cache=True)  # fine
        gate = next(mod for mod in m.modules() if isinstance(mod, PaperGate))
        gate.w_l.data = torch.randn_like(gate.w_l)
        with pytest.raises(ValueError, match="key-gate parameters changed"):
            m(ids[:, :1], past_key_values=cache, use_cache=True)
