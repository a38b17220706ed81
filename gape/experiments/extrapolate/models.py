"""The tiny decoders of ``gape extrapolate``: one Llama-style model per
(scheme, GAPE form, start, RoPE base), built from a config with the package's
own positional schemes and GAPE patch. Each choice lives in ``SCHEMES`` and
``STARTS``; nothing here is a second implementation of either."""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCHEMES = ("nope", "rope", "prope", "alibi")
GAPE_FORMS = ("none", "paper", "invariant")
# schemes that rotate, hence depend on the RoPE base
ROTARY = ("rope", "prope")


@dataclass(frozen=True)
class Arch:
    layers: int = 6
    hidden: int = 64
    heads: int = 2
    ffn: int = 256

    def to_dict(self) -> dict:
        return {"layers": self.layers, "hidden": self.hidden, "heads": self.heads, "ffn": self.ffn}


# Gate starts, fixed before any extrapolation result was seen (README):
#   paper/plain:  the paper's parameters at zero (gamma = b_g = b_l = 0, w = 0):
#                 Gamma*g = ln(2)^2 ~ 0.48, l = 0.5.
#   paper/strong: gamma = 4 (Gamma ~ 4.02, Gamma*g ~ 2.8: a key T tokens back is
#                 pushed down by ~2.8 nats unless protected), b_l = -2 (l ~ 0.12).
#   invariant/default: the invariant form as `gape synthetic` trains it from
#                 scratch (alpha = 1, key bias -3, log distance; linear on ALiBi, which
#                 the package requires: the gates add to ALiBi's linear slope there).
STARTS = {
    "none": {"none": {}},
    "paper": {"plain": {"gamma_init": 0.0}, "strong": {"gamma_init": 4.0, "key_bias_init": -2.0}},
    "invariant": {"default": {"alpha_init": 1.0, "key_bias_init": -3.0}},
}


def variant_label(gape: str, start: str, scheme: str, base: float) -> str:
    """The ``variant`` field of a row: the gate start, plus the RoPE base for rotary schemes."""
    label = start
    if gape == "invariant" and scheme == "alibi":
        label += ",linear"
    if scheme in ROTARY:
        label += f",base{base:.0e}".replace("e+0", "e")
    return label


def llama_config(arch: Arch, vocab: int, scheme: str, base: float, max_len: int):
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=arch.hidden, intermediate_size=arch.ffn, num_hidden_layers=arch.layers,
        num_attention_heads=arch.heads, num_key_value_heads=arch.heads, max_position_embeddings=max(max_len, 256),
        rope_parameters={"rope_type": "default", "rope_theta": float(base)}, tie_word_embeddings=True,
        attention_dropout=0.0, pad_token_id=0, bos_token_id=None, eos_token_id=None,
    )
    return cfg


def gape_config(gape: str, start: str, train_length: int, scheme: str = "rope"):
    """The GapeConfig of a (form, start), None for ``gape="none"``."""
    from gape.hf.config import GapeConfig

    if gape == "none":
        return None
    if gape not in STARTS or start not in STARTS[gape]:
        raise ValueError(f"unknown GAPE form/start {gape}/{start}; known: {[(g, s) for g in STARTS for s in STARTS[g]]}")
    kw = dict(STARTS[gape][start])
    if gape == "paper":
        kw.update(gate="paper", train_length=train_length, distance="linear")
    elif scheme == "alibi":
        kw.update(distance="linear")
    return GapeConfig(backend="torch", identity_shortcut=False, **kw)


def build(arch: Arch, vocab: int, scheme: str, gape: str, start: str, base: float, train_length: int, max_len: int, seed: int):
    """A randomly initialised model; the base weights depend only on ``seed`` and the architecture."""
    from transformers import LlamaForCausalLM

    from . import schemes

    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if gape not in GAPE_FORMS:
        raise ValueError(f"gape must be one of {GAPE_FORMS}, got {gape!r}")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(arch, vocab, scheme, base, max_len))
    model.set_attn_implementation("sdpa")
    model = schemes.apply(model, scheme, gape_config(gape, start, train_length, scheme))
    return model
