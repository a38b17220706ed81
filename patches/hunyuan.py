"""HunYuan dense and MoE (v1): per-head q/k RMSNorm applied *after* RoPE, whose per-channel
weights the invariant gates divide out (post_rope_norm); the paper's gates read the
projections, which are the pre-RoPE query and key."""

from .spec import ArchSpec

SPEC = ArchSpec(model_types=("hunyuan_v1_dense", "hunyuan_v1_moe"), post_rope_norm=("query_layernorm", "key_layernorm"))
