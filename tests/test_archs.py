"""Every architecture under patches/ on a tiny random config: identity gates equal the
unpatched model, cached decoding equals recomputing, a left-padded batch equals its rows,
and the gates (and the logits) do not change when every position is shifted (the gate
features are RoPE-invariant, including the unrotated channels of partial rotary)."""

import copy

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import gape
from gape import hf
from gape.patches.registry import get_spec, supported_model_types

from test_hf import SMALL
from test_paper import randomize as randomize_paper

BASE = dict(SMALL, pad_token_id=0, bos_token_id=1, eos_token_id=2)
HEAD16 = dict(BASE, head_dim=16)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
           num_local_experts=4, n_routed_experts=4)
MLA = dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8,
           head_dim=8, v_head_dim=12, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
           first_k_dense_replace=1, n_group=1, topk_group=1)
# model_type -> (config class, kwargs)
CONFIGS = {
    "llama": ("LlamaConfig", HEAD16),
    "mistral": ("MistralConfig", dict(HEAD16, sliding_window=8)),
    "qwen2": ("Qwen2Config", BASE),
    "qwen3": ("Qwen3Config", HEAD16),
    "gemma": ("GemmaConfig", HEAD16),
    # a cap of 1.0 bites on the tiny model's logits (the released 50.0 would hardly show)
    "gemma2": ("Gemma2Config", dict(HEAD16, sliding_window=8, query_pre_attn_scalar=16, attn_logit_softcapping=1.0)),
    "gemma3_text": (
        "Gemma3TextConfig",
        dict(HEAD16, sliding_window=8, query_pre_attn_scalar=16, layer_types=["sliding_attention", "full_attention"]),
    ),
    "phi3": ("Phi3Config", dict(BASE, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})),
    "olmo2": ("Olmo2Config", BASE),
    "granite": ("GraniteConfig", dict(BASE, attention_multiplier=0.2)),
    "cohere": ("CohereConfig", dict(BASE, use_qk_norm=False)),
    "stablelm": ("StableLmConfig", BASE),  # partial_rotary_factor 0.25: 4 of 16 channels rotated
    "gpt_neox": ("GPTNeoXConfig", dict(BASE, rotary_pct=0.25, num_key_value_heads=None)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(BASE, **MOE)),
    "mixtral": ("MixtralConfig", dict(HEAD16, sliding_window=8, num_local_experts=4, num_experts_per_tok=2)),
    # None: the config class transformers maps the model type to (AutoConfig.for_model)
    "smollm3": (None, dict(HEAD16, no_rope_layers=[1, 0])),  # layer 1 is NoPE
    "qwen3_moe": (None, dict(HEAD16, **MOE)),
    "llama4_text": (None, dict(HEAD16, **MOE, intermediate_size_mlp=96, no_rope_layers=[1, 0], attention_chunk_size=8)),
    "glm4": (None, HEAD16),
    "olmo3": (None, dict(HEAD16, sliding_window=8)),
    "phi": (None, dict(HEAD16, num_key_value_heads=4, qk_layernorm=True)),
    "starcoder2": (None, dict(HEAD16, sliding_window=8)),
    "granitemoe": (None, dict(HEAD16, **MOE, attention_multiplier=0.2)),
    "glm": (None, HEAD16),
    "exaone4": (None, dict(HEAD16, sliding_window=8, sliding_window_pattern=2)),
    "olmoe": (None, dict(HEAD16, **MOE)),
    "apertus": (None, HEAD16),
    "arcee": (None, HEAD16),
    "ministral": (None, dict(HEAD16, sliding_window=8)),
    "ministral3": (None, HEAD16),
    "phimoe": (None, dict(HEAD16, **MOE, sliding_window=8)),
    "minimax_m2": (None, dict(HEAD16, **MOE)),
    "flex_olmo": (None, dict(HEAD16, **MOE)),
    "glm4_moe": (None, dict(HEAD16, **MOE, first_k_dense_replace=1, n_group=1, topk_group=1, use_qk_norm=True)),
    "nemotron": (None, HEAD16),
    "persimmon": (None, dict(HEAD16, num_key_value_heads=4)),
    "helium": (None, HEAD16),
    "ernie4_5": (None, HEAD16),
    "ernie4_5_moe": (None, dict(HEAD16, **MOE, moe_num_experts=4, moe_k=2)),
    "cohere2": (None, dict(HEAD16, sliding_window=8)),
    "seed_oss": (None, HEAD16),
    "internlm3": (None, HEAD16),
    "bitnet": (None, HEAD16),
    "exaone_moe": (None, dict(HEAD16, **MOE)),
    "granitemoeshared": (None, dict(HEAD16, **MOE, shared_intermediate_size=32)),
    "afmoe": (None, dict(HEAD16, **MOE)),
    "solar_open": (None, dict(HEAD16, **MOE)),
    "falcon_h1": (None, HEAD16),
    "gpt_oss": (None, dict(HEAD16, **MOE, sliding_window=8)),
    # hybrid stacks: layer 0 is recurrent or convolutional (no gates), layer 1 attends
    "qwen3_next": (None, dict(HEAD16, **MOE, layer_types=["linear_attention", "full_attention"], linear_num_value_heads=4,
                              linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16)),
    "olmo_hybrid": (None, dict(HEAD16, layer_types=["linear_attention", "full_attention"])),
    "nemotron_h": (None, dict(HEAD16, layers_block_type=["mamba", "attention"], mamba_num_heads=4, mamba_head_dim=16,
                              ssm_state_size=16, n_groups=1)),
    "lfm2": (None, dict(HEAD16, layer_types=["conv", "full_attention"])),
    "lfm2_moe": (None, dict(HEAD16, **MOE, layer_types=["conv", "full_attention"])),
    "lfm3": (None, dict(HEAD16, layer_types=["conv", "sliding_attention"], sliding_window=8)),
    "jamba": (None, dict(HEAD16, **MOE, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                         expert_layer_offset=1, mamba_d_state=8, use_mamba_kernels=False)),
    "bamba": (None, dict(HEAD16, attn_layer_indices=[1], mamba_n_heads=4, mamba_d_head=32, mamba_d_state=8,
                         mamba_n_groups=1)),
    "granitemoehybrid": (None, dict(HEAD16, **MOE, layer_types=["mamba", "attention"], mamba_n_heads=4, mamba_d_head=32,
                                    mamba_d_state=8, mamba_n_groups=1, position_embedding_type="rope")),
    "minimax": (None, dict(HEAD16, **MOE, layer_types=["linear_attention", "full_attention"])),
    # multi-head latent attention: q/k heads of 16 nope + 8 rope channels, value heads of 12
    "deepseek_v2": (None, dict(BASE, **MLA)),
    "deepseek_v3": (None, dict(BASE, **dict(MLA, q_lora_rank=24))),
    "hunyuan_v1_dense": (None, HEAD16),
    "hunyuan_v1_moe": (None, dict(HEAD16, **MOE)),
    "glm4_moe_lite": (None, dict(BASE, **MLA)),
    "minicpm3": (None, dict(BASE, **MLA)),
    "youtu": (None, dict(BASE, **MLA)),
    "qwen3_5_text": (None, dict(HEAD16, layer_types=["linear_attention", "full_attention"], linear_num_value_heads=4,
                                linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16)),
    "qwen3_5_moe_text": (None, dict(HEAD16, **MOE, layer_types=["linear_attention", "full_attention"],
                                    linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
                                    linear_value_head_dim=16)),
    "cwm": (None, dict(HEAD16, sliding_window=8)),
    "hyperclovax": (None, HEAD16),
    "jais2": (None, HEAD16),
    "olmo": (None, dict(HEAD16, clip_qkv=0.5)),
    "nanochat": (None, HEAD16),
    "mellum": (None, dict(HEAD16, sliding_window=8)),
    "apertus1p5_text": (None, HEAD16),
    "hy_v3": (None, dict(HEAD16, **MOE)),
    "cohere2_moe": (None, dict(HEAD16, **MOE, sliding_window=8)),
    "granite_swa": (None, dict(HEAD16, sliding_window=8, attention_multiplier=0.2)),
    "granitemoe_swa": (None, dict(HEAD16, **MOE, sliding_window=8, attention_multiplier=0.2)),
    "vaultgemma": (None, dict(HEAD16, sliding_window=8, query_pre_attn_scalar=16, attn_logit_softcapping=1.0)),
    # hybrid stacks of linear attention and latent attention
    "kimi_linear": (None, dict(BASE, **MLA, layer_types=["linear_attention", "full_attention"], linear_head_dim=16,
                               linear_num_heads=4, mlp_layer_types=["dense", "sparse"])),
    "bailing_hybrid": (None, dict(BASE, **MLA, layer_types=["linear_attention", "full_attention"], linear_head_dim=16,
                                  linear_num_heads=4, mlp_layer_types=["dense", "sparse"])),
}
ARCHS = list(CONFIGS)
# The architectures people use most run in the default suite; the rest (same checks)
# behind -m slow, to keep the default suite fast.
COMMON = {
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2", "mixtral", "smollm3",
    "qwen3_moe", "llama4_text", "gpt_oss", "glm4", "olmo3", "phi", "starcoder2", "granitemoe",
}
SLOW = pytest.mark.slow


def arch_params(archs):
    return [a if a in COMMON else pytest.param(a, marks=SLOW) for a in archs]
# transformers gives Gemma 2, VaultGemma (soft-capping) and the Granite SWA models no SDPA path; eager is their baseline
BASELINE = {"gemma2": "eager", "gpt_oss": "eager", "vaultgemma": "eager", "granite_swa": "eager", "granitemoe_swa": "eager"}
REFERENCE = gape.GapeConfig(backend="reference", identity_shortcut=False)


def make(arch: str, **overrides):
    cls, kwargs = CONFIGS[arch]
    kwargs = {**kwargs, **overrides}
    config = transformers.AutoConfig.for_model(arch, **kwargs) if cls is None else getattr(transformers, cls)(**kwargs)
    config = copy.deepcopy(config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=BASELINE.get(arch, "sdpa")).eval()
    with torch.no_grad():  # sinks of the order of the logits, so that dropping them would show
        for name, p in model.named_parameters():
            if name.endswith("self_attn.sinks"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(4)) * 2)
    return model


def randomize(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, gate in hf.iter_gates(model):
            for p in gate.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
            gate.alpha.abs_()


def ids(batch, length, seed=2):
    return torch.randint(3, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_at_least_eighty_architectures_each_tested():
    assert set(supported_model_types()) == set(ARCHS) and len(ARCHS) >= 80


@pytest.mark.parametrize("arch", arch_params(ARCHS))
def test_identity_cache_padding_and_shift(arch):
    model = make(arch)
    x = ids(2, 20)
    with torch.no_grad():
        ref = model(x).logits
        gape.patch(model, REFERENCE)
        torch.testing.assert_close(model(x).logits, ref, rtol=0, atol=2e-5)

        randomize(model)
        gated = model(x).logits
        assert (gated - ref).abs().max() > 1e-2, "gates too weak: the checks below prove nothing"

        # cached decoding == full recomputation
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
        cached = model.generate(x[:1, :10], **kw)
        full = model.generate(x[:1, :10], use_cache=False, **kw)
        assert torch.equal(cached.sequences, full.sequences)
        torch.testing.assert_close(torch.stack(cached.logits), torch.stack(full.logits), rtol=0, atol=2e-5)

        # left padding: each padded row equals the row alone
        lengths = (14, 9)
        rows = [ids(1, n, seed=10 + n) for n in lengths]
        batch = torch.zeros(2, 14, dtype=torch.long)
        mask = torch.zeros(2, 14, dtype=torch.long)
        for r, row in enumerate(rows):
            batch[r, 14 - row.shape[1]:] = row[0]
            mask[r, 14 - row.shape[1]:] = 1
        out = model(batch, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits
        for r, row in enumerate(rows):
            torch.testing.assert_close(out[r, 14 - row.shape[1]:], model(row).logits[0], rtol=0, atol=2e-5)

        # shifting every position: RoPE-invariant gate features give the same gates
        pos = torch.arange(20)[None].expand(2, 20)
        with hf.record_gates(model) as a:
            at0 = model(x, position_ids=pos).logits
        a = {i: {k: v.clone() for k, v in g.items()} for i, g in a.items()}
        with hf.record_gates(model) as b:
            at37 = model(x, position_ids=pos + 37).logits
    for i in a:
        torch.testing.assert_close(b[i]["lambda"], a[i]["lambda"], rtol=0, atol=1e-5)
        torch.testing.assert_close(b[i]["pi"], a[i]["pi"], rtol=0, atol=1e-5)
        assert a[i]["lambda"].std() > 1e-3 and a[i]["pi"].std() > 1e-3  # the gates read the content
    torch.testing.assert_close(at37, at0, rtol=0, atol=1e-4)


@pytest.mark.parametrize("arch", ["stablelm", "gpt_neox", "phi3"])
def test_partial_rotary_gates_read_both_channel_kinds(arch):
    model = make(arch)
    gape.patch(model, REFERENCE)
    (_, gate), *_ = hf.iter_gates(model)
    d = gate.head_dim
    assert gate.rotary_dim is not None and gate.rotary_dim < d
    assert gate.w.shape[-1] == gate.rotary_dim // 2 + d - gate.rotary_dim
    # Rotating the rotated channels' pairs changes nothing; changing an unrotated channel does.
    x = torch.randn(1, 1, 3, d)
    r, half = gate.rotary_dim, gate.rotary_dim // 2
    a, b = x[..., :half].clone(), x[..., half:r].clone()
    turned = x.clone()
    turned[..., :half], turned[..., half:r] = a * 0.6 - b * 0.8, a * 0.8 + b * 0.6
    from gape.hf.gates import pair_features

    torch.testing.assert_close(pair_features(turned, "half", r), pair_features(x, "half", r), rtol=0, atol=1e-6)
    moved = x.clone()
    moved[..., -1] += 1.0
    assert (pair_features(moved, "half", r) - pair_features(x, "half", r)).abs().max() > 0.1


CPU_KERNEL = gape.GapeConfig(backend="torch", identity_shortcut=False)


@pytest.mark.parametrize("arch,term", [("gpt_oss", "sinks"), ("gemma2", "softcap")])
def test_packed_sequences_keep_sinks_and_softcap(arch, term, monkeypatch):
    """Packed rows (position_ids restarting per sequence) run the varlen entry point with the
    model's sinks or soft-cap: the logits equal each sequence run alone, with gates on."""
    from gape.core import torch_backend
    from gape.hf import attention as hf_attention

    seen = []
    varlen = torch_backend.torch_attention_varlen
    monkeypatch.setattr(torch_backend, "torch_attention_varlen",
                        lambda *a, **k: seen.append(k.get(term) is not None) or varlen(*a, **k))
    hf_attention._varlen_fn.cache_clear()
    try:
        model = make(arch)  # window 8 < the row: the sliding layers pack too, the window inside each sequence
        gape.patch(model, gape.GapeConfig(backend="torch"))
        randomize(model)
        lens = [7, 12, 5]
        seqs = [ids(1, n, seed=10 + i)[0] for i, n in enumerate(lens)]
        position_ids = torch.cat([torch.arange(n) for n in lens])[None]
        with torch.no_grad():
            packed = model(torch.cat(seqs)[None], position_ids=position_ids, use_cache=False).logits[0]
            alone = torch.cat([model(s[None], use_cache=False).logits[0] for s in seqs])
    finally:
        hf_attention._varlen_fn.cache_clear()
    assert seen and all(seen), f"the packed path ran without the {term}"
    torch.testing.assert_close(packed, alone, rtol=0, atol=2e-5)


# Full and sliding layers mixed (window 8 < the packed row), with transformers building the
# packed mask itself (gemma3, mistral: position_ids reach its mask functions) or not (gpt-oss,
# afmoe: the sliding layers then get one band over the whole row, the full ones no mask).
HYBRID_SLIDING = {
    "gpt_oss": {},
    "gemma3_text": {},
    "afmoe": dict(layer_types=["sliding_attention", "full_attention"], sliding_window=8),
    "mistral": {},
}
PACKED_INPUTS = ("no-mask", "all-ones-mask", "cache")
# "sdpa" has no packed entry point (the mask path runs) and no sinks (gpt-oss is refused)
PACKED_BACKENDS = {"reference": dict(backend="reference"), "torch": dict(backend="torch"),
                   "sdpa": dict(backend="sdpa", distance="linear")}
PACKED_DEFAULT = {("gpt_oss", given, backend) for given in PACKED_INPUTS for backend in ("reference", "torch")} | {
    ("gemma3_text", "all-ones-mask", "torch"), ("afmoe", "no-mask", "sdpa"), ("mistral", "all-ones-mask", "sdpa")}
PACKED_CASES = [pytest.param(*case, marks=() if case in PACKED_DEFAULT else SLOW)
                for case in ((a, g, b) for a in HYBRID_SLIDING for g in PACKED_INPUTS for b in PACKED_BACKENDS)
                if case[::2] != ("gpt_oss", "sdpa")]


@pytest.mark.parametrize("arch,given,backend", PACKED_CASES)
def test_packed_sequences_pack_full_and_sliding_layers_alike(arch, given, backend, monkeypatch):
    """One row holding three documents, marked only by restarting position_ids: every layer,
    full or sliding (window 8, shorter than the row), runs each document alone (the window
    inside each document), so each document's logits equal it run by itself through the same
    patched model: in float64 on the reference backend (float32 gates), in float32 on the
    fused CPU kernel and on the "sdpa" backend (the mask path, no packed entry point);
    without a mask, with an all-ones 2D mask, and filling a DynamicCache."""
    from gape.hf import attention as hf_attention

    windows = []
    varlen_fn = hf_attention._varlen_fn

    def spy(*args):
        fn = varlen_fn(*args)
        return None if fn is None else (lambda *a, **k: windows.append(a[12]) or fn(*a, **k))

    monkeypatch.setattr(hf_attention, "_varlen_fn", spy)
    model = make(arch, **HYBRID_SLIDING[arch])
    gape.patch(model, gape.GapeConfig(**PACKED_BACKENDS[backend], identity_shortcut=False))
    randomize(model)
    if backend == "reference":
        model.double()
        if hasattr(model, "set_experts_implementation"):
            model.set_experts_implementation("eager")  # the grouped GEMM takes no float64
    kinds = {model.config.sliding_window - 1 if t == "sliding_attention" else None
             for t in getattr(model.config, "layer_types", None) or ["sliding_attention"]}
    lens = [11, 4, 13]
    seqs = [ids(1, n, seed=20 + i) for i, n in enumerate(lens)]
    row = torch.cat(seqs, dim=1)
    kw = dict(position_ids=torch.cat([torch.arange(n) for n in lens])[None], use_cache=given == "cache")
    if given == "all-ones-mask":
        kw["attention_mask"] = torch.ones_like(row)
    with torch.no_grad():
        packed = model(row, **kw).logits[0]
        if backend != "sdpa":
            assert {w if w is None else w[0] for w in windows} == kinds, "a layer kind did not run packed"
        alone = torch.cat([model(s, use_cache=False).logits[0] for s in seqs])
        # the documents differ from the row attended as one sequence, so packing is what is checked
        whole = model(row, position_ids=torch.arange(row.shape[1])[None], use_cache=False).logits[0]
    assert (whole[lens[0]:] - alone[lens[0]:]).abs().max() > 1e-2
    tol = 1e-6 if backend == "reference" else 3e-5  # the gates are float32 even in a float64 model
    torch.testing.assert_close(packed, alone, rtol=0, atol=tol)
    if given != "no-mask":
        return
    # packed training: every gradient (weights and gates) equals the documents' run alone
    weight = torch.randn(packed.shape, generator=torch.Generator().manual_seed(5)).to(packed.dtype)
    grads = []
    for run in (lambda: model(row, **kw).logits[0], lambda: torch.cat([model(s, use_cache=False).logits[0]
                                                                         for s in seqs])):
        model.zero_grad()
        (run() * weight).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1]) and any(".gape_gate." in n for n in grads[0])
    for name, want in grads[1].items():
        torch.testing.assert_close(grads[0][name], want, rtol=10 * tol, atol=tol * max(1.0, float(want.abs().max())),
                                   msg=name)


@pytest.mark.parametrize("layers", [None, [0]], ids=["identity-shortcut", "layer-0-gated"])
@pytest.mark.parametrize("arch", ["gpt_oss", pytest.param("afmoe", marks=SLOW)])
def test_packed_sequences_pack_layers_without_the_bias_alike(arch, layers):
    """Layers that run without GAPE's bias, identity gates under the identity shortcut (plain
    SDPA, or the kernels at lambda = 0 for gpt-oss's sinks) or a layer left unpatched by
    ``layers=``, pack a row of documents as the gated layers do: each document equals it run
    alone, sliding window inside it, so the identity shortcut stays a shortcut."""
    model = make(arch, **HYBRID_SLIDING[arch])
    gape.patch(model, gape.GapeConfig() if layers is None else gape.GapeConfig(layers=layers))
    if layers is not None:
        randomize(model)
    lens = [11, 4, 13]
    seqs = [ids(1, n, seed=20 + i) for i, n in enumerate(lens)]
    row = torch.cat(seqs, dim=1)
    with torch.no_grad():
        packed = model(row, position_ids=torch.cat([torch.arange(n) for n in lens])[None], use_cache=False).logits[0]
        alone = torch.cat([model(s, use_cache=False).logits[0] for s in seqs])
        whole = model(row, use_cache=False).logits[0]
    assert (whole[lens[0]:] - alone[lens[0]:]).abs().max() > 1e-2
    torch.testing.assert_close(packed, alone, rtol=0, atol=3e-5)


@pytest.mark.parametrize("config", [REFERENCE, gape.GapeConfig(), CPU_KERNEL],
                         ids=["reference", "default", "cpu-kernel"])
@pytest.mark.parametrize("arch,term", [("gpt_oss", "sinks"), ("gemma2", "softcap")])
def test_sinks_and_softcap_models_equal_unpatched(arch, term, config, monkeypatch):
    """gpt-oss's learned sinks and Gemma's soft-cap reach GAPE's kernels: identity gates equal
    the unpatched eager model to 1e-5 in float32 (with the identity shortcut too, whose
    plain-SDPA path would drop them; and on the fused C++ CPU kernel, which is seen to run);
    the term is big enough that dropping it would show."""
    from gape.kernels import attention_cpu

    calls = []
    if config is CPU_KERNEL:
        if not attention_cpu.available():
            pytest.skip("the fused CPU kernel is not built here")
        forward = attention_cpu.attention_forward

        def spy(*args, **kwargs):
            calls.append(kwargs.get("sinks") is not None or kwargs.get("softcap") is not None)
            return forward(*args, **kwargs)

        monkeypatch.setattr(attention_cpu, "attention_forward", spy)
    model = make(arch)
    model.set_attn_implementation("eager")
    x = ids(2, 20)
    with torch.no_grad():
        ref = model(x).logits
        if term == "sinks":
            for m in model.modules():
                if hasattr(m, "sinks"):
                    m.sinks.fill_(-1e4)
        else:
            model.config.attn_logit_softcapping = None
            for m in model.modules():
                if hasattr(m, "attn_logit_softcapping"):
                    m.attn_logit_softcapping = None
        without = model(x).logits
        model = make(arch)
        model.set_attn_implementation("eager")
        assert (without - ref).abs().max() > 1e-3, f"the {term} do not matter in this model: the check proves nothing"
        gape.patch(model, config)
        torch.testing.assert_close(model(x).logits, ref, rtol=0, atol=1e-5)
        if config is CPU_KERNEL:
            assert calls and all(calls), f"the kernel did not run with the {term}"
        # decoding with the cache honours them too
        kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
        randomize(model)
        cached = model.generate(x[:1, :9], **kw)
        full = model.generate(x[:1, :9], use_cache=False, **kw)
        torch.testing.assert_close(torch.stack(cached.logits), torch.stack(full.logits), rtol=0, atol=2e-5)



def test_cohere_uses_the_interleaved_layout():
    model = make("cohere")
    gape.patch(model, REFERENCE)
    assert all(g.layout == "interleaved" for _, g in hf.iter_gates(model))


# the RoPE function the modeling file calls, and whether it takes [B, H, L, D] (else [B, L, H, D])
ROPE_FUNCTION = {"llama4_text": ("apply_rotary_emb", False)}
# layers without RoPE in the tiny configs
NOPE_LAYERS = {"smollm3": {1}, "llama4_text": {1}, "exaone4": {1}, "jamba": {1}, "nemotron_h": {1}}

# fused q/k/v projection, or MLA's key assembled from two parts: no module outputs the
# pre-RoPE query or key alone
PAPER_REFUSED = {"phi3", "gpt_neox", "persimmon", "deepseek_v2", "deepseek_v3", "glm4_moe_lite", "minicpm3", "youtu",
                 "kimi_linear", "bailing_hybrid"}


@pytest.mark.parametrize("arch", arch_params(ARCHS))
def test_paper_gates_read_the_query_and_key_rope_rotates(arch, monkeypatch):
    """gate='paper' reads the un-rotated query and key (after any q/k norm, docs/maths.md): its
    lambda and pi equal the paper's formulas on the tensors the model itself hands to
    apply_rotary_pos_emb. Cohere and StableLM run with their optional q/k norms on."""
    import sys

    import torch.nn.functional as F

    # OLMo's clip_qkv clamps q and k after the projections the paper's gates read (docs/patching.md)
    model = make(arch, **{"cohere": {"use_qk_norm": True}, "stablelm": {"qk_layernorm": True},
                          "olmo": {"clip_qkv": None}}.get(arch, {}))
    cfg = gape.GapeConfig(gate="paper", train_length=16, backend="reference")
    if arch in PAPER_REFUSED:
        with pytest.raises(ValueError, match="pre-RoPE query and key"):
            gape.patch(model, cfg)
        return
    gape.patch(model, cfg)
    randomize_paper(model, seed=3)
    head_dim = hf.iter_gates(model)[0][1].head_dim
    modeling = sys.modules[type(model).__module__]
    name, heads_first = ROPE_FUNCTION.get(arch, ("apply_rotary_pos_emb", True))
    rotate, seen, current = getattr(modeling, name), {}, []

    def whole(t):  # partial rotary passes the rotated channels, a view of [B, H, L, D]
        t = torch.as_strided(t, (*t.shape[:-1], head_dim), t.stride(), t.storage_offset())
        return t if heads_first else t.transpose(1, 2)

    def spy(q, k, *args, **kwargs):
        seen[current[-1]] = (whole(q).detach().double(), whole(k).detach().double())  # [B, H, L, D]
        return rotate(q, k, *args, **kwargs)

    monkeypatch.setattr(modeling, name, spy)
    gates = hf.iter_gates(model)
    spec = hf._state(model)["spec"]
    layers = hf._find_layers(model, spec)
    projected = {}  # the projections' outputs, which a NoPE layer hands on un-rotated

    def keep(i, which, heads):
        def hook(module, args, out):
            out = out.detach().double()
            if out.dim() == 3:
                out = out.unflatten(-1, (heads, -1))
            projected.setdefault(i, {})[which] = out if out.dim() == 4 and spec.pre_rope_heads_first else out.transpose(1, 2)
        return hook

    for i, gate in gates:  # which layer calls RoPE (NoPE layers do not)
        attn = getattr(layers[i], spec.attention)
        attn.register_forward_pre_hook(lambda m, a, i=i: current.append(i))
        for which, heads in (("query_pre_rope", gate.num_heads), ("key_pre_rope", gate.num_kv_heads)):
            module = getattr(attn, hf.patching._pre_rope_module(attn, spec, which))
            module.register_forward_hook(keep(i, which[0], heads))
    with torch.no_grad(), hf.record_gates(model) as rec:
        model(ids(2, 12))
    assert set(seen) <= {i for i, _ in gates}
    assert seen or set(NOPE_LAYERS.get(arch, ())) >= {i for i, _ in gates}
    for i, gate in gates:
        if i in seen:
            q, k = seen[i]
        else:  # a NoPE layer: the query and key the attention gets are the projections'
            assert arch in NOPE_LAYERS and i in NOPE_LAYERS[arch]
            q, k = projected[i]["q"], projected[i]["k"]
        g = {n: p.detach().double() for n, p in gate.named_parameters()}
        lam = F.softplus(g["gamma"])[:, None] * F.softplus(torch.einsum("bhld,hd->bhl", q, g["w_g"]) + g["b_g"][:, None]) / 16
        pi = torch.sigmoid(torch.einsum("bhld,hd->bhl", k, g["w_l"]) + g["b_l"][:, None])
        torch.testing.assert_close(rec[i]["lambda"].double(), lam, rtol=1e-4, atol=1e-6, msg=f"{arch} layer {i} lambda")
        torch.testing.assert_close(rec[i]["pi"].double(), pi, rtol=1e-4, atol=1e-6, msg=f"{arch} layer {i} pi")


# Step-by-step forwards with a cache but without generate's bookkeeping do not reproduce the
# full forward even unpatched (Bamba's Mamba-2 layers, MiniMax's lightning attention).
GENERATE_ONLY = {"bamba", "minimax"}


@pytest.mark.parametrize("arch", arch_params([a for a in ARCHS if a not in PAPER_REFUSED]))
def test_paper_decode_equals_full(arch):
    """gate='paper' on every architecture that has it: prefill then step-by-step decoding
    of a left-padded batch gives the full forward's logits on the real tokens (through
    ``generate`` where the unpatched model's own layers need its bookkeeping to decode)."""
    model = make(arch)
    gape.patch(model, gape.GapeConfig(gate="paper", train_length=16))
    randomize_paper(model, seed=5)
    if arch in GENERATE_ONLY:
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
        x = ids(1, 10)
        with torch.no_grad():
            cached, full = model.generate(x, **kw), model.generate(x, use_cache=False, **kw)
        assert torch.equal(cached.sequences, full.sequences)
        torch.testing.assert_close(torch.stack(cached.logits), torch.stack(full.logits), rtol=1e-4, atol=2e-5)
        return
    x = ids(2, 14)
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    with torch.no_grad():
        full = model(x, attention_mask=mask).logits
        out = model(x[:, :6], attention_mask=mask[:, :6], use_cache=True)
        cache, steps = hf.output_cache(out), [out.logits]
        for t in range(6, 14):
            out = model(x[:, t:t + 1], attention_mask=mask[:, :t + 1], use_cache=True, **{hf.cache_kwarg(): cache})
            steps.append(out.logits)
    got = torch.cat(steps, dim=1)
    real = mask.bool()
    torch.testing.assert_close(got[real], full[real], rtol=1e-4, atol=2e-5)


HEADS = ["AutoModelForSequenceClassification", "AutoModelForQuestionAnswering", "AutoModelForTokenClassification"]


@pytest.mark.parametrize("head", HEADS, ids=lambda h: h.removeprefix("AutoModelFor"))
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt_neox"])
def test_heads_beyond_causal_lm_patch_where_the_decoder_lives(arch, head):
    """Classification and question-answering heads keep the decoder under .model or
    .transformer (its base_model): patched there, identity gates equal the head unpatched,
    and gates on change its outputs."""
    cls, kwargs = CONFIGS[arch]
    config = transformers.AutoConfig.for_model(arch, **kwargs) if cls is None else getattr(transformers, cls)(**kwargs)
    torch.manual_seed(0)
    model = getattr(transformers, head).from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    x = ids(2, 12)
    with torch.no_grad():
        ref = model(x)
        gape.patch(model, REFERENCE)
        assert len(hf.iter_gates(model)) == config.num_hidden_layers
        same = model(x)
        randomize(model)
        gated = model(x)
    keys = [k for k in ref.keys() if k.endswith("logits")]
    assert keys
    for k in keys:
        torch.testing.assert_close(same[k], ref[k], rtol=0, atol=2e-5)
    assert max(float((gated[k] - ref[k]).abs().max()) for k in keys) > 1e-3


@pytest.mark.parametrize("gate", ["invariant", "paper"])
@pytest.mark.parametrize("arch", ["mistral", "qwen2", "gemma3_text"])
def test_static_sliding_window_cache_equals_dynamic(arch, gate):
    """generate(cache_implementation="static") on sliding-window models builds
    StaticSlidingWindowLayers: before the window is reached they are written in place
    (queries at the written slots), from then on they hold the last keys in order. Greedy
    generation equals the dynamic cache's, past the window too (window 8, 10 + 6 tokens).
    The paper's form keeps the key gates of the keys it saw, which a rolled buffer drops:
    served until the window is reached, refused after."""
    over = {"qwen2": dict(use_sliding_window=True, max_window_layers=0, layer_types=["sliding_attention"] * 2,
                          sliding_window=8)}.get(arch, {})
    model = make(arch, **over)
    if gate == "paper":
        gape.patch(model, gape.GapeConfig(gate="paper", train_length=16, backend="reference"))
        randomize_paper(model, seed=5)
    else:
        gape.patch(model, REFERENCE)
        randomize(model)
    kw = dict(do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    x = ids(1, 10)
    with torch.no_grad():
        short = dict(kw, max_new_tokens=3)
        dynamic = model.generate(x[:, :4], **short)
        static = model.generate(x[:, :4], cache_implementation="static", **short)
        assert torch.equal(static.sequences, dynamic.sequences)
        torch.testing.assert_close(torch.stack(static.logits), torch.stack(dynamic.logits), rtol=0, atol=2e-5)
        long = dict(kw, max_new_tokens=6)
        if gate == "paper":
            with pytest.raises(ValueError, match="static sliding-window cache is served while the window"):
                model.generate(x, cache_implementation="static", **long)
            return
        dynamic = model.generate(x, **long)
        static = model.generate(x, cache_implementation="static", **long)
    from transformers.cache_utils import StaticSlidingWindowLayer

    assert any(isinstance(layer, StaticSlidingWindowLayer) for layer in hf.output_cache(static).layers)
    assert torch.equal(static.sequences, dynamic.sequences)
    torch.testing.assert_close(torch.stack(static.logits), torch.stack(dynamic.logits), rtol=0, atol=2e-5)


def test_sink_models_attention_maps():
    """output_attentions on gpt-oss gives the eager model's maps (rows sum to less than 1:
    the sink's share); capture_attention, which recomputes maps without sinks, refuses."""
    from gape.hf.attention_probe import capture_attention

    model = make("gpt_oss")
    model.set_attn_implementation("eager")
    x = ids(1, 10)
    with torch.no_grad():
        ref = model(x, output_attentions=True).attentions
        gape.patch(model, REFERENCE)
        got = model(x, output_attentions=True).attentions
        assert float(ref[0].sum(-1).min()) < 0.9
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        with pytest.raises(ValueError, match="capture_attention does not recompute attention with sinks"):
            with capture_attention(model):
                model(x)


def test_hybrid_stack_gates_only_attention_layers_and_files_keep_their_indices(tmp_path):
    """LFM2 (layer 0 a short convolution, layer 1 attention): only layer 1 gets a gate, a
    convolution layer named in GapeConfig.layers is refused, and a gate file written from
    it names layer 1 and loads back into a fresh model with the same logits."""
    from gape.hf._names import GATE_ATTR

    model = make("lfm2")
    layers = hf._find_layers(model, get_spec("lfm2"))
    with pytest.raises(ValueError, match=r"layer\(s\) \[0\], which have no attention.*attention layers are \[1\]"):
        gape.patch(make("lfm2"), gape.GapeConfig(layers=[0]))
    gape.patch(model, REFERENCE)
    assert [i for i, _ in hf.iter_gates(model)] == [1]
    assert not any(GATE_ATTR in m._modules for m in layers[0].modules())
    randomize(model)
    x = ids(2, 12)
    with torch.no_grad():
        want = model(x).logits
    path = tmp_path / "gates.safetensors"
    gape.save_gates(model, path)
    _, _, tensors = gape.hf.read_gates(path)
    assert tensors and {k.split(".")[1] for k in tensors} == {"1"}
    fresh = make("lfm2")
    gape.load_gates(fresh, path)
    assert [i for i, _ in hf.iter_gates(fresh)] == [1]
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["deepseek_v3", pytest.param("deepseek_v2", marks=SLOW)])
def test_latent_attention_gates_read_nope_values_and_rope_pair_norms(arch):
    """MLA heads are [16 nope | 8 rope] with values of 12: the gates have 16 + 4 features,
    turning a rope pair (of the model's layout) changes none, changing a nope channel
    does; the torch and sdpa backends serve Dv != D and equal the reference."""
    from gape.hf.gates import pair_features

    model = make(arch)
    gape.patch(model, REFERENCE)
    (_, gate), *_ = hf.iter_gates(model)
    assert (gate.head_dim, gate.rotary_dim, gate.rotary_last) == (24, 8, True)
    assert gate.w.shape[-1] == 16 + 4
    x = torch.randn(1, 1, 3, 24)
    turned = x.clone()
    if gate.layout == "half":
        a, b = x[..., 16:20], x[..., 20:24]
        turned[..., 16:20], turned[..., 20:24] = a * 0.6 - b * 0.8, a * 0.8 + b * 0.6
    else:
        a, b = x[..., 16::2], x[..., 17::2]
        turned[..., 16::2], turned[..., 17::2] = a * 0.6 - b * 0.8, a * 0.8 + b * 0.6
    assert gate.layout == {"deepseek_v2": "interleaved", "deepseek_v3": "half"}[arch]
    feats = pair_features(x, gate.layout, 8, rotary_last=True)
    torch.testing.assert_close(pair_features(turned, gate.layout, 8, rotary_last=True), feats, rtol=0, atol=1e-6)
    moved = x.clone()
    moved[..., 0] += 1.0
    assert (pair_features(moved, gate.layout, 8, rotary_last=True) - feats).abs().max() > 0.1
    randomize(model)
    x = ids(2, 16)
    with torch.no_grad():
        want = model(x).logits

        def run(backend, distance):
            other = make(arch)
            gape.patch(other, gape.GapeConfig(backend=backend, distance=distance))
            for (_, g), (_, src) in zip(hf.iter_gates(other), hf.iter_gates(model), strict=True):
                g.load_state_dict(src.state_dict())
            return other(x).logits

        torch.testing.assert_close(run("torch", "log"), want, rtol=0, atol=2e-5)
        torch.testing.assert_close(run("sdpa", "linear"), run("reference", "linear"), rtol=0, atol=1e-4)


def test_hunyuan_gates_divide_out_the_post_rope_norm():
    """HunYuan normalises q and k after RoPE with per-channel weights: with random weights
    the first layer's gates (whose inputs do not depend on the positions; the model's later
    layers do, through those weights) do not change when every position is shifted, and
    they would without the weights divided out (so the check bites)."""
    model = make("hunyuan_v1_dense")
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("query_layernorm.weight", "key_layernorm.weight")):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
    gape.patch(model, REFERENCE)
    randomize(model)
    x = ids(2, 16)
    pos = torch.arange(16)[None].expand(2, 16)

    def first_gates(shift):
        with torch.no_grad(), hf.record_gates(model) as rec:
            model(x, position_ids=pos + shift)
        return rec[0]["lambda"].clone(), rec[0]["pi"].clone()

    (lam0, pi0), (lam37, pi37) = first_gates(0), first_gates(37)
    torch.testing.assert_close(lam37, lam0, rtol=0, atol=1e-5)
    torch.testing.assert_close(pi37, pi0, rtol=0, atol=1e-5)
    for _, gate in hf.iter_gates(model):
        gate.post_rope_norm = None
    (lam0, pi0), (lam37, pi37) = first_gates(0), first_gates(37)
    assert float((lam37 - lam0).abs().max()) > 1e-3 and float((pi37 - pi0).abs().max()) > 1e-3
