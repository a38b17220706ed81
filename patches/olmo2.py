"""OLMo 2: RMSNorm over the whole q and k projections before RoPE (pair norms unaffected;
the paper's gates read the normed q and k). OLMo 3 (sliding window on some layers), OLMoE,
FlexOlmo and MiniMax-M2 (MoE) normalise the same way."""

from .spec import ArchSpec

SPEC = ArchSpec(model_types=("olmo2", "olmo3", "olmoe", "flex_olmo", "minimax_m2"), sliding_window="sliding_window",
                qk_norm=True, query_pre_rope="q_norm", key_pre_rope="k_norm")
