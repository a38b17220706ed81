"""Llama layout with partial rotary (``partial_rotary_factor`` of each head): Nemotron,
GLM-4 MoE (optional per-head q/k RMSNorm before RoPE, on ``[B, L, H, D]``) and Persimmon
(fused qkv: no module outputs the query alone, so the paper's gates are refused)."""

from .spec import ArchSpec

SPEC = ArchSpec(model_types=("nemotron", "glm4_moe", "persimmon"), partial_rotary=True,
                query_pre_rope=("q_norm", "q_proj"), key_pre_rope=("k_norm", "k_proj"))
