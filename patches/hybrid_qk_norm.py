"""Hybrid stacks whose attention layers normalise q and k before RoPE: Qwen3-Next and
Qwen3.5 (text, dense and MoE; Gated DeltaNet layers, partial rotary, per-head q/k RMSNorm,
a sigmoid output gate),
OLMo hybrid (Gated DeltaNet layers; OLMo 2's RMSNorm over the whole q and k projections),
LFM2, LFM2-MoE and LFM3 (short-convolution layers; per-head q/k norms, LFM3's sliding
window). Only the layers ``config.layer_types`` marks as attention get gates."""

from .spec import ArchSpec

SPEC = ArchSpec(
    model_types=("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text", "olmo_hybrid", "lfm2", "lfm2_moe", "lfm3"), layer_kinds="layer_types",
    partial_rotary=True, sliding_window="sliding_window", qk_norm=True,
    query_pre_rope=("q_norm", "q_layernorm"), key_pre_rope=("k_norm", "k_layernorm"),
)
