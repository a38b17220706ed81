"""``ArchSpec``: what the generic patcher (gape.hf) needs to know about an architecture."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchSpec:
    """Declarative description of a Llama-style architecture.

    Attributes:
        model_types: ``config.model_type`` values this spec serves.
        layers: dotted paths tried in order, from the loaded model, to the
            ``nn.ModuleList`` of decoder layers (``ForCausalLM`` and bare model).
        attention: attribute of a decoder layer holding the attention module.
        num_heads, num_kv_heads: config attributes with the head counts
            (``num_kv_heads`` falls back to ``num_heads`` when absent).
        head_dim: config attribute of the query/key head dim (falls back to
            ``hidden_size // num_heads`` when absent or None), or a tuple of
            attributes whose sum it is (MLA: ``qk_nope_head_dim + qk_rope_head_dim``).
        value_head_dim: config attribute of the value head dim when it differs
            from the query/key one (MLA's ``v_head_dim``); None: the same. The
            GAPE bias never reads a head dim; the attention backends take any
            ``Dv`` (docs/kernels.md).
        rope_layout: ``"half"`` (transformers' rotate_half: pair ``(x_i, x_{i+D/2})``)
            or ``"interleaved"`` (pair ``(x_2i, x_2i+1)``).
        sliding_window: config attribute of the window size (None: no window).
            The window reaches GAPE through the attention mask, so this is for
            logging and the tests.
        qk_norm: the model normalises q and k per head before RoPE (Qwen3).
            Pair norms stay rotation-invariant, so nothing changes for GAPE.
        query_pre_rope, key_pre_rope: attribute of the attention module whose
            output is the un-rotated query / key that RoPE is applied to (after
            any q/k norm), read by the paper's gate form (``gate="paper"``); or a
            tuple of candidates, the first one the module has (an optional norm,
            then the projection). Outputs ``[B, L, H*D]`` or ``[B, L, H, D]``.
        pre_rope_heads_first: the 4-d outputs of those modules are ``[B, H, L, D]``
            (the norm runs after the heads are moved forward: Gemma 3, StableLM).
        partial_rotary: RoPE rotates only the first ``partial_rotary_factor``
            of each head's channels (``config.rope_parameters``); the gates then
            read pair norms of those and raw values of the rest (gape.hf.gates).
        rotary_dim: config attribute with the number of channels per head RoPE
            rotates (MLA's ``qk_rope_head_dim``), for heads whose rotated channels
            are not a ``partial_rotary_factor`` of the head; None: see ``partial_rotary``.
        rotary_last: the rotated channels are the *last* ``rotary_dim`` of each
            head, after the unrotated ones (MLA: ``[nope | rope]``); else the first.
        post_rope_norm: attributes of the attention module holding per-head norms
            (``weight * x / rms(x)``) that the model applies to the query and the
            key *after* RoPE (HunYuan). Their per-channel weights would make the
            pair norms depend on the position; the invariant gates read
            ``x / weight`` instead, an exact rotation of the normalised vector.
        layer_kinds: config attribute listing each decoder layer's kind (hybrid
            stacks: ``layer_types``, ``layers_block_type``); None: every layer
            is an attention layer. Only layers whose kind is in
            ``attention_kinds`` get gates; the others (Mamba, linear attention,
            short convolutions) are left as they are.
        attention_kinds: the kinds in ``layer_kinds`` that are softmax attention
            layers run through transformers' attention interface.
        softcap: config attribute of an attention logit soft-cap
            (``cap * tanh(s / cap)``, Gemma 2), for the log and the tests: the
            model hands the cap to the attention function (``softcap=``), which
            passes it to a backend that implements it.
    """

    model_types: tuple[str, ...]
    layers: tuple[str, ...] = ("model.layers", "layers")
    attention: str = "self_attn"
    num_heads: str = "num_attention_heads"
    num_kv_heads: str = "num_key_value_heads"
    head_dim: str | tuple[str, ...] = "head_dim"
    value_head_dim: str | None = None
    rope_layout: str = "half"
    sliding_window: str | None = None
    qk_norm: bool = False
    query_pre_rope: str | tuple[str, ...] = "q_proj"
    key_pre_rope: str | tuple[str, ...] = "k_proj"
    pre_rope_heads_first: bool = False
    partial_rotary: bool = False
    rotary_dim: str | None = None
    rotary_last: bool = False
    post_rope_norm: tuple[str, str] | None = None
    layer_kinds: str | None = None
    attention_kinds: tuple[str, ...] = ("full_attention", "sliding_attention", "attention")
    softcap: str | None = None
