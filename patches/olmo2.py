"""OLMo 2: RMSNorm over the whole q and k projections before RoPE (pair norms unaffected;
the paper's gates read the normed q and k)."""

from .spec import ArchSpec

SPEC = ArchSpec(model_types=("olmo2",), qk_norm=True, query_pre_rope="q_norm", key_pre_rope="k_norm")
