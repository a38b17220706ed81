"""Tiny offline models for tests: a byte-level BPE tokenizer with a ChatML template, a tiny
random Llama saved as a Hugging Face folder, and the same kind of Llama written as a Q4_1
GGUF with the tokenizer in its metadata (so ``AutoTokenizer`` loads it from the file)."""

from __future__ import annotations

import os

import numpy as np
import torch

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# a few merges so the vocabulary is a real BPE (most text stays one byte per token)
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_vocab() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = [bytes_to_unicode()[b] for b in range(256)]
    return alphabet + ["".join(m) for m in MERGES] + SPECIALS


def tiny_tokenizer(chat_template: bool = True):
    """A ``PreTrainedTokenizerFast`` over ``byte_vocab()`` (262 tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(byte_vocab())}
    bpe = Tokenizer(models.BPE(vocab={t: i for t, i in vocab.items() if t not in SPECIALS}, merges=MERGES))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    assert len(tok) == len(vocab) and tok.convert_tokens_to_ids("<|im_end|>") == vocab["<|im_end|>"]
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=len(byte_vocab()),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        eos_token_id=0 + 256 + len(MERGES),
        pad_token_id=256 + len(MERGES),
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def save_tiny_hf(folder: str, seed: int = 0, **overrides) -> str:
    """A tiny random LlamaForCausalLM + tokenizer saved (safetensors) under ``folder``."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides))
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp stores q/k rows interleaved per head; transformers undoes this on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write a 2-layer Llama as a Q4_1 GGUF (norms in F32) with the tokenizer in its metadata.

    Returns the weights the file holds, dequantized, under transformers' parameter names.
    """
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    cfg = tiny_llama_config()
    rng = np.random.default_rng(seed)
    hidden, inter, heads, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = hidden // heads
    vocab = byte_vocab()

    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(hidden)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(inter)
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab)
    token_types = [gguf.TokenType.NORMAL] * (len(vocab) - len(SPECIALS)) + [gguf.TokenType.CONTROL] * len(SPECIALS)
    writer.add_token_types(token_types)
    writer.add_token_merges([" ".join(m) for m in MERGES])
    writer.add_eos_token_id(vocab.index("<|endoftext|>"))
    writer.add_bos_token_id(vocab.index("<|endoftext|>"))
    writer.add_pad_token_id(vocab.index("<|endoftext|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    expected: dict[str, torch.Tensor] = {}

    def add(gguf_name: str, hf_name: str, w: np.ndarray, quantize: bool, permute_heads: int | None = None):
        w = w.astype(np.float32)
        if quantize:
            # quantization blocks run along rows, so the row permutation commutes with it
            expected[hf_name] = torch.from_numpy(quants.dequantize(quants.quantize(w, Q.Q4_1), Q.Q4_1).copy())
            stored = _llama_cpp_permute(w, permute_heads) if permute_heads else w
            writer.add_tensor(gguf_name, quants.quantize(stored, Q.Q4_1), raw_dtype=Q.Q4_1)
        else:
            expected[hf_name] = torch.from_numpy(w.copy())
            writer.add_tensor(gguf_name, w)

    def rand(*shape, scale=0.2):
        return rng.standard_normal(shape).astype(np.float32) * scale

    add("token_embd.weight", "model.embed_tokens.weight", rand(len(vocab), hidden, scale=1.0), True)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", p + "input_layernorm.weight", 1 + rand(hidden, scale=0.1), False)
        add(f"blk.{i}.attn_q.weight", p + "self_attn.q_proj.weight", rand(heads * head_dim, hidden), True, heads)
        add(f"blk.{i}.attn_k.weight", p + "self_attn.k_proj.weight", rand(kv * head_dim, hidden), True, kv)
        add(f"blk.{i}.attn_v.weight", p + "self_attn.v_proj.weight", rand(kv * head_dim, hidden), True)
        add(f"blk.{i}.attn_output.weight", p + "self_attn.o_proj.weight", rand(hidden, heads * head_dim), True)
        add(f"blk.{i}.ffn_norm.weight", p + "post_attention_layernorm.weight", 1 + rand(hidden, scale=0.1), False)
        add(f"blk.{i}.ffn_gate.weight", p + "mlp.gate_proj.weight", rand(inter, hidden), True)
        add(f"blk.{i}.ffn_up.weight", p + "mlp.up_proj.weight", rand(inter, hidden), True)
        add(f"blk.{i}.ffn_down.weight", p + "mlp.down_proj.weight", rand(hidden, inter), True)
    add("output_norm.weight", "model.norm.weight", 1 + rand(hidden, scale=0.1), False)
    add("output.weight", "lm_head.weight", rand(len(vocab), hidden), True)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert os.path.getsize(path) > 0
    return expected
