"""EXAONE 4 and EXAONE-MoE (NoPE global layers when a sliding window is set), Apertus, Apertus 1.5
(text) and HY v3:
per-head q/k RMSNorm before RoPE, run on ``[B, H, L, D]``."""

from .spec import ArchSpec

SPEC = ArchSpec(model_types=("exaone4", "exaone_moe", "apertus", "apertus1p5_text", "hy_v3"), sliding_window="sliding_window", qk_norm=True,
                query_pre_rope="q_norm", key_pre_rope="k_norm", pre_rope_heads_first=True)
