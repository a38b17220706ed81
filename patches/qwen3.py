"""Qwen3: Qwen2 plus per-head RMSNorm on q and k before RoPE (so the pre-RoPE query and
key are the norms' outputs, ``[B, L, H, D]``). The same attention: Qwen3-MoE, AFMoE, Mellum (sliding window on some layers)."""

from .spec import ArchSpec

SPEC = ArchSpec(model_types=("qwen3", "qwen3_moe", "afmoe", "mellum"), sliding_window="sliding_window", qk_norm=True,
                query_pre_rope="q_norm", key_pre_rope="k_norm")
