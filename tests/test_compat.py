"""GAPE with the rest of the ecosystem: output_attentions returns GAPE's probabilities,
switching the attention implementation away warns, and PEFT-wrapped models work with
patch, save_gates, load_gates and save/load (LoRA adapter on top of a GAPE model)."""

import pytest
import torch
from test_hf import IDENTITY, make_model, randomize_gates, tokens

import gape
from gape import hf
from gape.hf.attention_probe import capture_attention


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_output_attentions_returns_gape_probabilities(arch):
    model = make_model(arch)
    ids = tokens(2, 20)  # mistral: window 8 < 20, so the mask matters
    with torch.no_grad():
        model.set_attn_implementation("eager")
        plain = model(ids, output_attentions=True).attentions
        model.set_attn_implementation("sdpa")
        gape.patch(model, gape.GapeConfig(backend="reference"))
        # Identity gates: the probabilities of the unpatched eager model.
        same = model(ids, output_attentions=True)
        assert len(same.attentions) == 2
        for a, b in zip(same.attentions, plain, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        randomize_gates(model)
        out = model(ids, output_attentions=True)
        with capture_attention(model) as cap:
            probe_logits = model(ids).logits
    torch.testing.assert_close(out.logits, probe_logits, rtol=0, atol=1e-6)
    for i, probs in enumerate(out.attentions):
        assert probs.shape == (2, 4, 20, 20)
        torch.testing.assert_close(probs, cap[i]["probs"], rtol=0, atol=1e-6)
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 20), rtol=0, atol=1e-5)
    assert (out.attentions[0] - plain[0]).abs().max() > 1e-2  # the gates changed the maps


def test_output_attentions_covers_unpatched_layers_and_decode():
    model = make_model("llama")
    gape.patch(model, gape.GapeConfig(backend="reference", layers=[1]))
    randomize_gates(model)
    ids = tokens(1, 9)
    with torch.no_grad():
        full = model(ids, output_attentions=True).attentions
        out = model(ids[:, :8], use_cache=True)
        step = model(ids[:, 8:], use_cache=True, output_attentions=True, **{hf.cache_kwarg(): hf.output_cache(out)})
    assert [a.shape for a in step.attentions] == [(1, 4, 1, 9)] * 2
    for a, b in zip(step.attentions, full, strict=True):
        torch.testing.assert_close(a[:, :, 0], b[:, :, -1], rtol=0, atol=1e-6)


def test_switching_the_implementation_away_warns(caplog):
    model = make_model("qwen2")
    gape.patch(model, IDENTITY)
    model.set_attn_implementation("eager")
    with caplog.at_level("WARNING", logger="gape"), torch.no_grad():
        model(tokens(1, 6))
        model(tokens(1, 6))
    assert caplog.text.count("gates are ignored") == 1 and "'eager'" in caplog.text
    caplog.clear()
    model.set_attn_implementation("gape")
    with caplog.at_level("WARNING", logger="gape"), torch.no_grad(), capture_attention(model):
        model(tokens(1, 6))
    assert "ignored" not in caplog.text


peft = pytest.importorskip("peft")


def _lora(model, **kw):
    return peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **kw))


def test_patch_save_load_gates_accept_a_peft_model(tmp_path):
    ids = tokens(1, 12)
    wrapped = _lora(make_model("llama"))
    gape.patch(wrapped, gape.GapeConfig(backend="reference"))
    assert hf.is_patched(wrapped) and hf.is_patched(wrapped.get_base_model())
    randomize_gates(wrapped)
    with torch.no_grad():
        want = wrapped(input_ids=ids).logits
    gape.save_gates(wrapped, tmp_path / "g.safetensors")
    other = _lora(make_model("llama"))
    gape.load_gates(other, tmp_path / "g.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(other(input_ids=ids).logits, want, rtol=0, atol=1e-6)
    gape.unpatch(other)
    assert not hf.is_patched(other)


def test_lora_with_trained_gates_round_trip(tmp_path):
    """LoRA + gates trained together (modules_to_save=["gape_gate"]); the adapter on top of
    a GAPE folder loaded with gape.from_pretrained reproduces the trained model."""
    base = make_model("llama")
    gape.patch(base, gape.GapeConfig(backend="reference", alpha_init=0.5))
    gape.save_pretrained(base, tmp_path / "base")
    model = _lora(base, modules_to_save=["gape_gate"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("gape_gate.modules_to_save" in n for n in trainable) and any("lora_A" in n for n in trainable)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    ids = tokens(2, 16)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < losses[0]
    (_, gate), *_ = hf.iter_gates(model)  # the trained copy, not the frozen original
    original = model.get_base_model().model.layers[0].self_attn.gape_gate.original_module
    assert (gate.alpha - original.alpha).abs().max() > 1e-3
    with torch.no_grad():
        want = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")

    reloaded = peft.PeftModel.from_pretrained(gape.from_pretrained(tmp_path / "base"), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, want, rtol=0, atol=1e-6)
        with reloaded.disable_adapter():  # adapters off: the base GAPE model's gates again
            plain = reloaded(input_ids=ids).logits
    with torch.no_grad():
        assert (plain - want).abs().max() > 1e-3


@pytest.mark.parametrize("form", ["invariant", "paper"])
def test_lora_trained_gates_decode_with_a_static_cache(form):
    """A LoRA model whose gates are trained copies (modules_to_save): static-cache decoding
    reads the copy's gates and the static query offset, so it gives the dynamic cache's
    tokens and scores, and those differ from the adapter-disabled (original-gate) ones."""
    from test_hf_positions import _assert_static_equals_dynamic
    from test_paper import paper_config, randomize

    base = make_model("llama")
    gape.patch(base, paper_config() if form == "paper" else gape.GapeConfig())
    model = _lora(base, modules_to_save=["gape_gate"]).eval()
    # the active copies only: the originals keep their start
    randomize(model) if form == "paper" else randomize_gates(model, scale=0.5)
    _assert_static_equals_dynamic(model, pad=3, new_tokens=6)
    ids = tokens(1, 12)
    with torch.no_grad():
        on = model(input_ids=ids).logits
        with model.disable_adapter():
            off = model(input_ids=ids).logits
    assert (on - off).abs().max() > 1e-3


@pytest.mark.parametrize("wrap_first", [False, True])
def test_paper_gates_read_the_lora_adapted_query_and_key(wrap_first):
    """gate='paper' with LoRA on q_proj and k_proj, wrapped before or after patching: the
    gates read the adapted projections (the query and key attention uses), so the model
    equals the same model with the adapter merged into plain Linear layers."""
    from test_paper import paper_config, randomize

    ids = tokens(2, 14)
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "k_proj"])
    base = make_model("llama")
    if wrap_first:
        model = peft.get_peft_model(base, lora)
        gape.patch(model, paper_config())
    else:
        gape.patch(base, paper_config())
        model = peft.get_peft_model(base, lora)
    randomize(model)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with model.disable_adapter():
            assert (model(input_ids=ids).logits - want).abs().max() > 1e-2  # the adapter matters
        merged = model.merge_and_unload()
        assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
    gape.unpatch(merged)
    assert not any(m._forward_hooks for layer in merged.model.layers for m in layer.self_attn.children())


# --------------------------------------------------------------------------- generate modes, training features


def _gated(arch="llama", form="invariant"):
    """A model with non-trivial gates of either form."""
    from test_paper import paper_config, randomize

    model = make_model(arch)
    if form == "paper":
        gape.patch(model, paper_config())
        randomize(model)
    else:
        gape.patch(model, gape.GapeConfig(backend="reference"))
        randomize_gates(model)
    return model


@pytest.mark.parametrize("form", ["invariant", "paper"])
def test_beam_search_sampling_and_prompt_lookup_match_uncached(form):
    """Beam search reorders the cache, prompt lookup (assisted decoding) crops it, sampling
    draws from the logits: each equals the same generation without a cache (the paper's
    form carries the key gates it remembered through the reorder and the crop)."""
    model = _gated(form=form)
    prompt = torch.cat([tokens(1, 8), tokens(1, 8)], dim=1)  # a repeat, so prompt lookup proposes
    base = dict(max_new_tokens=10, pad_token_id=0)
    modes = {
        "beams": dict(num_beams=3, do_sample=False),
        "sample": dict(do_sample=True, top_k=20),
    }
    with torch.no_grad():
        greedy = model.generate(prompt, do_sample=False, use_cache=False, **base)
        for name, kw in modes.items():
            torch.manual_seed(0)
            cached = model.generate(prompt, **base, **kw)
            torch.manual_seed(0)
            plain = model.generate(prompt, use_cache=False, **base, **kw)
            assert torch.equal(cached, plain), name
        # assisted decoding needs the cache: greedy with prompt lookup equals plain greedy
        assert torch.equal(model.generate(prompt, do_sample=False, prompt_lookup_num_tokens=3, **base), greedy)


def test_packed_sequences_equal_separate_ones():
    """Two sequences packed in one row (position_ids restart, no padding, no cache: the
    training set-up in which transformers detects packing and blocks attention across
    sequences); GAPE's slot distances inside a sequence equal its own distances."""
    model = _gated()
    a, b = tokens(1, 9, seed=3), tokens(1, 7, seed=4)
    packed = torch.cat([a, b], dim=1)
    position_ids = torch.cat([torch.arange(9), torch.arange(7)])[None]
    with torch.no_grad():
        out = model(packed, position_ids=position_ids, use_cache=False).logits
        torch.testing.assert_close(out[:, :9], model(a).logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(out[:, 9:], model(b).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("form", ["invariant", "paper"])
def test_gradient_checkpointing_gives_the_same_gate_gradients(form):
    """Checkpointed layers recompute their forward in backward (the paper's capture hooks
    fire again there): the gate gradients equal the plain backward's."""
    ids = tokens(2, 16)
    grads = []
    for checkpointing in (False, True):
        model = _gated(form=form)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        hf.train_gates_only(model)
        model(ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in hf.gate_parameters(model)]))
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_trainer_trains_the_gates_and_checkpoints_are_gape_models(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = _gated()
    hf.train_gates_only(model)
    before = torch.cat([p.detach().flatten().clone() for p in hf.gate_parameters(model)])
    data = [{"input_ids": row, "labels": row} for row in tokens(8, 16)]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=0.05,
        use_cpu=True, report_to=[], save_strategy="steps", save_steps=2, logging_steps=1, disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=data).train()
    after = torch.cat([p.detach().flatten() for p in hf.gate_parameters(model)])
    assert (after - before).abs().max() > 1e-4
    model.eval()
    reloaded = gape.from_pretrained(tmp_path / "checkpoint-2")
    ids = tokens(1, 12)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=1e-6)


def test_config_output_attentions_returns_the_maps():
    """config.output_attentions=True without the keyword: the maps of the eager model, not ()."""
    model = make_model("llama")
    ids = tokens(1, 9)
    with torch.no_grad():
        model.set_attn_implementation("eager")
        model.config.output_attentions = True
        plain = model(ids).attentions
        model.set_attn_implementation("sdpa")
        gape.patch(model, gape.GapeConfig(backend="reference", layers=[1]))
        got = model(ids).attentions
        assert len(got) == len(plain) == 2
        for a, b in zip(got, plain, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        model.config.output_attentions = False
        assert not model(ids).attentions
        assert len(model(ids, output_attentions=True).attentions) == 2


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("kwarg", ["position_bias", "some_future_term"])
def test_unknown_attention_keyword_is_refused(kwarg, gated):
    """A keyword the attention function does not implement is an error naming it, on gated
    layers and on layers left unpatched (which would otherwise drop it in SDPA)."""
    model = make_model("llama")
    gape.patch(model, gape.GapeConfig(backend="reference", layers=[0]))
    attn = model.model.layers[0 if gated else 1].self_attn
    q = torch.randn(1, 4, 5, 16)
    k = v = torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match=f"'{kwarg}'"):
        hf.gape_attention_forward(attn, q, k, v, None, **{kwarg: torch.zeros(1)})
    out, _ = hf.gape_attention_forward(attn, q, k, v, None, use_cache=True, num_items_in_batch=3)
    assert out.shape == (1, 5, 4, 16)
