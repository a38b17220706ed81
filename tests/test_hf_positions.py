"""transformers with positions as an input: StaticCache decoding
(query offsets from the cache), packed sequences from DataCollatorWithFlattening
(the varlen path), sliding-window layers through the fused kernels, and a
compiled static-cache decode step on the CPU."""

from __future__ import annotations

import pytest
import torch

import gape
from gape import hf; from gape.core import torch_backend

from test_hf import make_model, randomize_gates, tokens

DEFAULT = gape.GapeConfig()  # backend auto: the C++ kernel / tiles on the CPU


def _assert_static_equals_dynamic(model, pad: int, new_tokens: int) -> None:
    """Greedy generate on a left-padded batch: a static cache gives the dynamic cache's
    tokens and scores."""
    ids = tokens(2, 12)
    am = torch.ones_like(ids)
    am[1, :pad] = 0  # left padding
    kw = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, attention_mask=am, output_scores=True,
              return_dict_in_generate=True)
    with torch.no_grad():
        dyn = model.generate(ids, **kw)
        st = model.generate(ids, cache_implementation="static", **kw)
    assert torch.equal(dyn.sequences, st.sequences)
    for a, b in zip(dyn.scores, st.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_static_cache_generate_equals_dynamic(arch):
    model = make_model(arch)
    gape.patch(model, DEFAULT)
    randomize_gates(model, scale=0.5)
    _assert_static_equals_dynamic(model, pad=4, new_tokens=10)


def test_static_cache_alibi_without_gates_equals_dynamic():
    """ALiBi alone (no gate module on the layers) with a static cache equals the dynamic
    cache, and going back to RoPE removes the offset hooks. (ALiBi alone is shift-invariant
    per row, so this guards the plumbing, not the offset itself: the gated tests do.)"""
    model = make_model("llama")
    gape.with_positional(model, "alibi")
    _assert_static_equals_dynamic(model, pad=3, new_tokens=8)
    gape.with_positional(model, "rope")
    assert not any(attn._forward_pre_hooks for attn in (layer.self_attn for layer in model.model.layers))


def test_static_cache_offsets_matter():
    # the static cache's keys hold empty slots after the last token: reading the queries
    # bottom-right (no offset) would put them at the end of the cache and change the bias
    model = make_model("llama")
    gape.patch(model, DEFAULT)
    randomize_gates(model, scale=0.5)
    ids = tokens(1, 10)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        dyn = model.generate(ids, **kw)
        orig = hf._remember_cached_keys

        def no_offset(module, args, kwargs):
            orig(module, args, kwargs)
            gate = module._modules.get(hf.GATE_ATTR)
            if gate is not None:
                hf.decode.layer_state(gate).query_offset = None

        handles = [attn.register_forward_pre_hook(no_offset, with_kwargs=True)
                   for attn in (layer.self_attn for layer in model.model.layers)]
        try:
            st = model.generate(ids, cache_implementation="static", **kw)
        finally:
            for h in handles:
                h.remove()
    assert max(float((a - b).abs().max()) for a, b in zip(dyn.scores, st.scores)) > 1e-3


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_static_cache_generate_equals_dynamic_paper_form(arch):
    """gate='paper': the key gates of the static cache's written slots are remembered
    across steps (the cache keeps post-RoPE keys only), so static == dynamic decoding."""
    from test_paper import paper_config, randomize

    model = make_model(arch)
    gape.patch(model, paper_config())
    randomize(model)
    _assert_static_equals_dynamic(model, pad=4, new_tokens=10)


def test_static_cache_paper_form_refuses_slots_it_did_not_gate():
    """A static cache filled before patching: the paper's key gates of its slots were never
    computed, so the next step is refused; after cache.reset() it decodes again."""
    from transformers import StaticCache

    from test_paper import paper_config, randomize

    model = make_model("llama")
    cache = StaticCache(config=model.config, max_cache_len=16)
    kw = {hf.attention.cache_kwarg(): cache, "use_cache": True}
    with torch.no_grad():
        model(tokens(1, 8), **kw)
        gape.patch(model, paper_config())
        randomize(model)
        with pytest.raises(ValueError, match="did not compute when they were cached"):
            model(tokens(1, 1), **kw)
        cache.reset()
        model(tokens(1, 8), **kw)
        step = model(tokens(1, 1, seed=3), **kw).logits
        full = model(torch.cat([tokens(1, 8), tokens(1, 1, seed=3)], dim=1)).logits[:, -1:]
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)


def test_static_sliding_window_cache_equals_dynamic_past_the_window():
    """A StaticSlidingWindowLayer (window 8) before and after the window is reached: the
    default backend generates what the dynamic cache does (test_archs covers more models)."""
    model = make_model("mistral")
    gape.patch(model, DEFAULT)
    randomize_gates(model)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        for n in (3, 10):
            dynamic = model.generate(tokens(1, n), **kw)
            static = model.generate(tokens(1, n), cache_implementation="static", **kw)
            assert torch.equal(static.sequences, dynamic.sequences)
            torch.testing.assert_close(torch.stack(static.logits), torch.stack(dynamic.logits), rtol=0, atol=2e-5)


def _packed_batches(seqs, flash_kwargs):
    from transformers import DataCollatorWithFlattening

    collate = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs, return_tensors="pt")
    packed = collate([{"input_ids": s.tolist()} for s in seqs])
    longest = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), longest, dtype=torch.long)
    am = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        am[i, : len(s)] = 1
    labels = ids.masked_fill(am == 0, -100)
    padded = {"input_ids": ids, "attention_mask": am, "labels": labels}
    return packed, padded


@pytest.mark.parametrize("form", ["invariant", "paper"])
@pytest.mark.parametrize("flash_kwargs", [True, False], ids=["cu_seq_lens", "position_ids"])
def test_packed_training_equals_unpacked(flash_kwargs, form, monkeypatch):
    """A tiny Llama trained 3 steps on packed batches: same losses and gradients
    (every weight and gate) as on the same sequences right-padded, and the packed
    steps run attention_varlen; both gate forms."""
    from test_paper import paper_config, randomize

    lens = [5, 13, 1, 9, 4]
    gen = torch.Generator().manual_seed(4)
    seqs = [torch.randint(3, 96, (n,), generator=gen) for n in lens]
    packed, padded = _packed_batches(seqs, flash_kwargs)
    calls = []
    varlen = torch_backend.torch_attention_varlen
    monkeypatch.setattr(torch_backend, "torch_attention_varlen",
                        lambda *a, **k: calls.append(a[5].tolist()) or varlen(*a, **k))
    hf._varlen_fn.cache_clear()
    runs = []
    for batch in (packed, padded):
        model = make_model("llama")
        gape.patch(model, paper_config() if form == "paper" else DEFAULT)
        randomize(model) if form == "paper" else randomize_gates(model, scale=0.5)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        losses, grads = [], None
        for _ in range(3):
            opt.zero_grad()
            loss = model(**batch).loss
            loss.backward()
            losses.append(loss.item())
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            opt.step()
        runs.append((losses, grads))
    hf._varlen_fn.cache_clear()
    (lp, gp), (lu, gu) = runs
    assert calls and calls[0] == [0, 5, 18, 19, 28, 32], calls[:1]
    assert abs(lp[0] - lu[0]) <= 1e-5 and lp[-1] < lp[0]
    for a, b in zip(lp, lu):
        assert abs(a - b) <= 1e-5, (lp, lu)
    assert set(gp) == set(gu)
    for name in gu:
        torch.testing.assert_close(gp[name], gu[name], rtol=1e-4, atol=1e-5, msg=name)


def test_concatenated_rows_without_packing_attend_across(monkeypatch):
    # position_ids that do not restart: one sequence, the dense path (no varlen call)
    calls = []
    monkeypatch.setattr(hf.attention, "_varlen_fn", lambda *a: calls.append(a) or None)
    model = make_model("llama")
    gape.patch(model, DEFAULT)
    with torch.no_grad():
        model(tokens(1, 10), position_ids=torch.arange(10)[None])
    assert not calls


def test_sliding_window_layers_run_without_a_mask(monkeypatch):
    """Mistral's window (8 < 30 tokens) reaches the kernel as window_size; the band
    mask is dropped; identity gates equal the unpatched model."""
    model = make_model("mistral")
    ids = tokens(1, 30)
    seen = []
    fn = torch_backend.torch_attention

    def spy(*args, **kw):
        seen.append((args[5] is None, kw.get("window")))
        return fn(*args, **kw)

    monkeypatch.setattr(torch_backend, "torch_attention", spy)
    monkeypatch.setattr(hf.attention, "_BACKEND_FNS", {})
    monkeypatch.setattr(gape.core.api, "_LOADED", {})  # loaded backend functions are cached too
    with torch.no_grad():
        ref = model(ids).logits
        gape.patch(model, gape.GapeConfig(backend="torch", identity_shortcut=False))
        out = model(ids).logits
        randomize_gates(model, scale=0.5)
        gated = model(ids).logits
        gape.unpatch(model)
        gape.patch(model, gape.GapeConfig(backend="reference"))
        randomize_gates(model, scale=0.5)
        gated_ref = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(gated, gated_ref, rtol=1e-5, atol=1e-5)
    assert seen and all(s == (True, (7, -1)) for s in seen), seen


def test_compiled_static_cache_decode_step_on_cpu():
    """torch.compile (aot_eager) of the decode step of a static-cache model: same
    logits as eager, step after step."""
    from transformers import StaticCache

    model = make_model("llama")
    gape.patch(model, DEFAULT)
    randomize_gates(model, scale=0.5)
    ids = tokens(1, 8)
    step = torch.compile(model.forward, backend="aot_eager", fullgraph=False, dynamic=False)
    results = []
    for fwd in (model.forward, step):
        cache = StaticCache(config=model.config, max_cache_len=24)
        with torch.no_grad():
            out = model(ids, **{hf.cache_kwarg(): cache}, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            logits = []
            for _ in range(4):
                out = fwd(tok, **{hf.cache_kwarg(): cache}, use_cache=True)
                logits.append(out.logits[:, -1])
                tok = out.logits[:, -1:].argmax(-1)
        results.append(torch.stack(logits))
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)


def test_packed_flash_kwargs_on_a_backend_without_a_packed_entry_point():
    """The "sdpa" backend has no varlen entry point: packed rows (cu_seq_lens_q/k) run its
    mask path with a same-sequence mask (each sequence == run alone, the sliding window
    inside it), and per-sequence query and key counts that differ, which that path cannot
    align, are refused naming the argument."""
    model = make_model("mistral")  # window 8 < the row
    gape.patch(model, gape.GapeConfig(backend="sdpa", distance="linear", identity_shortcut=False))
    randomize_gates(model, scale=0.5)
    lens = [11, 4, 13]
    seqs = [tokens(1, n, seed=30 + i) for i, n in enumerate(lens)]
    row = torch.cat(seqs, dim=1)
    cu = torch.tensor([0, 11, 15, 28], dtype=torch.int32)
    flash = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=13, max_length_k=13)
    with torch.no_grad():
        packed = model(row, position_ids=torch.arange(28)[None], use_cache=False, **flash).logits[0]
        alone = torch.cat([model(s, use_cache=False).logits[0] for s in seqs])
        whole = model(row, use_cache=False).logits[0]
        assert (whole[11:] - alone[11:]).abs().max() > 1e-2  # packing is what is checked
        torch.testing.assert_close(packed, alone, rtol=0, atol=3e-5)
        other = dict(flash, cu_seq_lens_k=torch.tensor([0, 12, 15, 28], dtype=torch.int32))
        with pytest.raises(ValueError, match="cu_seq_lens_q == cu_seq_lens_k"):
            model(row, position_ids=torch.arange(28)[None], use_cache=False, **other)
