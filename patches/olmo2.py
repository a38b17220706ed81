"""OLMo 2: RMSNorm over the whole q and k projections before RoPE (pair norms unaffected)."""

from .spec import ArchSpec

SPEC = ArchSpec(model_types=("olmo2",), qk_norm=True)
