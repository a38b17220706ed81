"""Phi (-1, -2): partial rotary, an optional per-head q/k LayerNorm before RoPE
(qk_layernorm, on ``[B, H, L, D]``), which the paper's gates read when present."""

from .spec import ArchSpec

SPEC = ArchSpec(model_types=("phi",), partial_rotary=True, query_pre_rope=("q_layernorm", "q_proj"),
                key_pre_rope=("k_layernorm", "k_proj"), pre_rope_heads_first=True)
