"""gape.load_model (embedded SmolLM2, HF folders, GGUF files) and gape.with_rope_scaling."""

from __future__ import annotations

import math

import pytest
import torch

import gape
from gape.hf.models import ROPE_TYPES, resolve_model_path
from tiny_models import save_tiny_hf, tiny_llama_config, write_tiny_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.Q4_1.gguf"
    expected = write_tiny_gguf(str(path))
    return path, expected


@pytest.fixture()
def tiny_llama():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(max_position_embeddings=32, attn_implementation="sdpa"))
    return model.eval()


def test_gguf_loads_with_dequantized_weights_and_tokenizer(tiny_gguf):
    path, expected = tiny_gguf
    model, tok = gape.load_model(str(path))
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 2
    assert model.config._attn_implementation == "sdpa" and not model.training
    state = model.state_dict()
    for name, weight in expected.items():
        torch.testing.assert_close(state[name], weight, rtol=0, atol=0, msg=name)
    # the logits are those of a Llama built from the dequantized weights we wrote
    from transformers import LlamaForCausalLM

    ref = LlamaForCausalLM(tiny_llama_config(attn_implementation="sdpa")).eval()
    missing, unexpected = ref.load_state_dict(expected, strict=False)
    assert not unexpected and all("rotary" in m for m in missing)
    ids = tok("the grass is green", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=1e-6)
    # the tokenizer came from the GGUF metadata: byte-level BPE with merges and a chat template
    assert tok.convert_ids_to_tokens(tok(" the").input_ids) == ["Ġthe"]
    assert tok.decode(ids[0]) == "the grass is green"
    assert "<|im_start|>assistant" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)


def test_folder_plus_gguf_file_and_hf_folder(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    assert resolve_model_path(str(path.parent), gguf_file=path.name) == (str(path.parent), path.name)
    assert resolve_model_path(str(path.parent)) == (str(path.parent), path.name)  # the only .gguf there
    folder = save_tiny_hf(str(tmp_path / "hf"))
    model, tok = gape.load_model(folder, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "sdpa"
    assert len(tok) == model.config.vocab_size


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"name_or_path": "/nonexistent/model"}, FileNotFoundError),
        ({"name_or_path": "__FILE__"}, ValueError),
        ({"name_or_path": "__DIR__", "gguf_file": "missing.gguf"}, FileNotFoundError),
        ({"name_or_path": 3}, TypeError),
    ],
    ids=["missing-path", "not-a-gguf-file", "missing-gguf-in-folder", "bad-type"],
)
def test_load_model_errors(tmp_path, kwargs, error):
    (tmp_path / "weights.bin").write_bytes(b"x")
    kwargs = {k: str(tmp_path / "weights.bin") if v == "__FILE__" else str(tmp_path) if v == "__DIR__" else v for k, v in kwargs.items()}
    with pytest.raises(error, match="name_or_path|gguf_file"):
        gape.load_model(**kwargs)


@pytest.mark.model
def test_embedded_smollm2():
    model, tok = gape.load_model()
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert cfg.hidden_size // cfg.num_attention_heads == 64
    assert cfg._attn_implementation == "sdpa" and not model.training and model.dtype == torch.float32
    assert tok.chat_template
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def _logits(model, ids, position_ids=None):
    with torch.no_grad():
        return model(ids, position_ids=position_ids).logits


def test_linear_factor_one_is_identity(tiny_llama):
    ids = torch.randint(0, 200, (1, 40))
    before = _logits(tiny_llama, ids)
    gape.with_rope_scaling(tiny_llama, "linear", 1.0)
    assert tiny_llama.config.rope_parameters["rope_type"] == "linear"
    torch.testing.assert_close(_logits(tiny_llama, ids), before, rtol=0, atol=0)


def test_linear_interpolates_positions(tiny_llama):
    """Linear scaling by f at positions f*p is plain RoPE at positions p."""
    ids = torch.randint(0, 200, (1, 24))
    pos = torch.arange(24)[None]
    plain = _logits(tiny_llama, ids, pos)
    inv = tiny_llama.model.rotary_emb.inv_freq.clone()
    gape.with_rope_scaling(tiny_llama, "linear", 4.0)
    torch.testing.assert_close(tiny_llama.model.rotary_emb.inv_freq, inv / 4)
    torch.testing.assert_close(_logits(tiny_llama, ids, 4 * pos), plain, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(_logits(tiny_llama, ids, pos), plain, atol=1e-3)


def test_calls_do_not_stack_and_default_restores(tiny_llama):
    ids = torch.randint(0, 200, (1, 40))
    before = _logits(tiny_llama, ids)
    inv = tiny_llama.model.rotary_emb.inv_freq.clone()
    gape.with_rope_scaling(tiny_llama, "linear", 2.0)
    gape.with_rope_scaling(tiny_llama, "linear", 2.0)
    torch.testing.assert_close(tiny_llama.model.rotary_emb.inv_freq, inv / 2)
    gape.with_rope_scaling(tiny_llama, "default")
    assert tiny_llama.config.rope_parameters["rope_type"] == "default"
    torch.testing.assert_close(_logits(tiny_llama, ids), before, rtol=0, atol=0)


def test_dynamic_only_changes_beyond_the_window(tiny_llama):
    window = tiny_llama.config.max_position_embeddings  # 32
    short, long = torch.randint(0, 200, (1, window)), torch.randint(0, 200, (1, 2 * window))
    plain_short, plain_long = _logits(tiny_llama, short), _logits(tiny_llama, long)
    inv = tiny_llama.model.rotary_emb.inv_freq.clone()
    gape.with_rope_scaling(tiny_llama, "dynamic", 2.0)
    torch.testing.assert_close(_logits(tiny_llama, short), plain_short, rtol=0, atol=0)
    scaled_long = _logits(tiny_llama, long)
    assert not torch.allclose(scaled_long, plain_long, atol=1e-3)
    # NTK: base * (f * L / window - (f - 1)) ** (d / (d - 2)) at run time, for L = 2 * window
    d = inv.numel() * 2
    base = tiny_llama.config.rope_parameters["rope_theta"] * (2.0 * 2 - 1) ** (d / (d - 2))
    expected = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float) / d)
    torch.testing.assert_close(tiny_llama.model.rotary_emb.inv_freq, expected)


def test_yarn_keeps_high_frequencies_and_scales_low_ones(tiny_llama):
    ids = torch.randint(0, 200, (1, 40))
    before = _logits(tiny_llama, ids)
    inv = tiny_llama.model.rotary_emb.inv_freq.clone()
    gape.with_rope_scaling(tiny_llama, "yarn", 8.0, beta_fast=32, beta_slow=1)
    rot = tiny_llama.model.rotary_emb
    assert rot.rope_type == "yarn" and rot.inv_freq.device == inv.device
    torch.testing.assert_close(rot.inv_freq[0], inv[0])  # fastest pair: extrapolated
    torch.testing.assert_close(rot.inv_freq[-1], inv[-1] / 8)  # slowest pair: interpolated
    assert rot.attention_scaling == pytest.approx(0.1 * math.log(8.0) + 1.0)
    assert not torch.allclose(_logits(tiny_llama, ids), before, atol=1e-3)


@pytest.mark.parametrize(
    "args, kwargs",
    [(("ntk", 2.0), {}), (("longrope", 2.0), {}), (("linear", 0.5), {}), (("linear", float("nan")), {}), (("linear", 2.0), {"beta_fast": 3})],
    ids=["unknown-ntk", "unsupported-longrope", "factor-below-1", "factor-nan", "param-not-for-type"],
)
def test_rope_scaling_errors(tiny_llama, args, kwargs):
    with pytest.raises(ValueError, match="rope_type|factor"):
        gape.with_rope_scaling(tiny_llama, *args, **kwargs)
    assert "default" in ROPE_TYPES


def test_rope_scaling_needs_rotary_module():
    with pytest.raises(ValueError, match="rotary"):
        gape.with_rope_scaling(torch.nn.Linear(2, 2), "linear", 2.0)
