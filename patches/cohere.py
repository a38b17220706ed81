"""Cohere (Command R), Cohere 2 (sliding window on some layers) and Cohere 2 MoE: RoPE on interleaved
channel pairs (x_2i, x_2i+1); Cohere's optional per-head q/k LayerNorm before RoPE
(use_qk_norm), which the paper's gates read when present."""

from .spec import ArchSpec

SPEC = ArchSpec(model_types=("cohere", "cohere2", "cohere2_moe"), rope_layout="interleaved", sliding_window="sliding_window",
                query_pre_rope=("q_norm", "q_proj"), key_pre_rope=("k_norm", "k_proj"))
