"""Hybrid stacks whose layers are not all attention: ``config.layer_types`` names each
layer's kind, and only the attention layers get gates (Mamba, linear-attention and
convolution layers are left as they are; gate files keep the decoder layer indices).
Here the attention layers have the Llama layout: Jamba (NoPE attention: Mamba carries the
order, GAPE's bias is then the attention's only distance term), Bamba (partial rotary),
Granite 4 hybrid (GraniteMoeHybrid; RoPE or NoPE by position_embedding_type) and MiniMax
(softmax layers among lightning-attention ones, sliding window when set)."""

from .spec import ArchSpec

SPEC = ArchSpec(model_types=("jamba", "bamba", "granitemoehybrid", "minimax"), layer_kinds="layer_types",
                partial_rotary=True, sliding_window="sliding_window")
