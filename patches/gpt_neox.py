"""GPT-NeoX (Pythia): layers under gpt_neox, attention under .attention, fused qkv,
partial rotary (rotary_pct, kept as rope_parameters["partial_rotary_factor"]), multi-head
attention only (a stray num_key_value_heads in a config is not read)."""

from .spec import ArchSpec

SPEC = ArchSpec(
    model_types=("gpt_neox",), layers=("gpt_neox.layers", "layers"), attention="attention",
    num_kv_heads="num_attention_heads", partial_rotary=True,
)
