"""Gemma 3 (text): per-head q/k RMSNorm, local/global layers with their own RoPE base,
sliding window on local layers; soft-capping when set (off by default)."""

from .spec import ArchSpec

SPEC = ArchSpec(
    model_types=("gemma3_text",), sliding_window="sliding_window", qk_norm=True, softcap="attn_logit_softcapping",
    query_pre_rope="q_norm", key_pre_rope="k_norm", pre_rope_heads_first=True,
)
