"""Multi-head latent attention (DeepSeek V2 and V3, GLM-4 MoE Lite, MiniCPM3, Youtu): each query and key head is
``[nope (qk_nope_head_dim) | rope (qk_rope_head_dim)]``, RoPE on the last channels only
(the rope part of a key is one rotated latent shared by every head), and values of their
own head dim (``v_head_dim``). The invariant gates read the nope channels' raw values and
the rope channels' pair norms (gape.hf.gates); the bias reads no head dim. No module
outputs the whole pre-RoPE key (a latent expansion beside a shared rotated part), so the
paper's gate form is refused. DeepSeek V2 rotates interleaved pairs (complex
multiplication); the others rotate the half-split pairs (V3 after permuting the
checkpoint's interleaved channels when ``rope_interleave``). Kimi Linear and Bailing hybrid
(Ling) are hybrid stacks whose attention layers are latent attention (Kimi's without RoPE:
its "rope" channels stay unrotated, and pair norms of them are features all the same)."""

from .spec import ArchSpec

_MLA = dict(head_dim=("qk_nope_head_dim", "qk_rope_head_dim"), value_head_dim="v_head_dim",
            rotary_dim="qk_rope_head_dim", rotary_last=True, query_pre_rope=(), key_pre_rope=())

SPECS = (
    ArchSpec(model_types=("deepseek_v2",), rope_layout="interleaved", **_MLA),
    ArchSpec(model_types=("deepseek_v3", "glm4_moe_lite", "minicpm3", "youtu"), **_MLA),
    ArchSpec(model_types=("kimi_linear", "bailing_hybrid"), layer_kinds="layer_types", **_MLA),
)
