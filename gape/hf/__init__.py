"""Patch Hugging Face Llama-style models to GAPE through transformers' own extension points.

``patch`` attaches a :class:`~gape.hf.gates.GapeGate` to each selected attention
module (as the submodule ``gape_gate``) and switches the model to the
attention implementation ``"gape"``, registered once with
``AttentionInterface`` and ``AttentionMaskInterface`` (the mask function is
transformers' own SDPA one: bool ``[B, 1, Q, K]``, or None for causal only).
No transformers class is modified; ``unpatch`` removes the gates and restores
the previous implementation.

Distances are in cache-slot space (query row ``i`` at slot ``K - Q + i``),
right for prefill, decoding with ``DynamicCache`` and left padding (pad slots
precede every real token). With a ``StaticCache`` the queries sit at the slots
the cache is writing (``query_offset`` = the layer's length before this step),
so the empty slots after the last token are future keys, masked by the causal
rule; a static sliding-window layer (a ring buffer) is refused. Packed sequences
(``DataCollatorWithFlattening``: ``cu_seq_lens_q/k`` kwargs, or ``position_ids``
restarting at each sequence with transformers' block-diagonal mask) run
:func:`gape.attention_varlen`; sliding-window layers pass their window to the
kernels (``window_size = (sliding_window - 1, -1)``).

At decode the key gate ``pi`` of the cached keys is recomputed from them
(nothing is added to the KV cache). To keep a decode step O(new tokens), the
gate also remembers the ``pi`` it computed for the keys tensor a
``DynamicLayer`` returned last step (one float per key and kv head, under 1%
of the KV cache) and reuses it when the cache object shows that this step's
keys are exactly those keys plus the new ones; anything else (a new cache,
beam reordering, cropping, sliding-window layers, gate parameters changed in
place) recomputes ``pi`` from all keys.

The paper's gate form (``GapeConfig(gate="paper")``, :class:`~gape.hf.gates.PaperGate`)
reads the pre-RoPE query and key: forward hooks on the modules that produce them
(the spec's ``query_pre_rope``/``key_pre_rope``) hand them to the gate, which
computes lambda and the new keys' pi there and remembers the pi of the keys a
``DynamicLayer`` (or ``DynamicSlidingWindowLayer``, or the slots a ``StaticLayer``
has written) holds, following them through beam-search reordering and cropping;
a cache whose keys it did not see is refused (see :func:`gape.hf.decode.paper_gates`).

ALiBi (``gape.with_positional(model, "alibi")``) reaches attention here too: a
``gape_alibi`` submodule of the attention layer adds its per-head slope to
lambda (see gape.hf.positional).
"""

from ._names import ALIBI_ATTR, GATE_ATTR, IMPLEMENTATION
from .attention import (
    _backend_fn,
    _register,
    _varlen_fn,
    cache_kwarg,
    gape_attention_forward,
    layer_gates,
    output_cache,
    register_implementation,
)
from .decode import _remember_cached_keys
from .gate_files import load_gates, read_gates, save_gates
from .patching import (
    GATE_CLASSES,
    _find_layers,
    _state,
    attention_layers,
    gape_config,
    gate_parameters,
    has_alibi,
    is_patched,
    iter_gates,
    model_shape,
    patch,
    record_gates,
    release_gape_attention,
    rotary_dim,
    train_gates_only,
    unpatch,
    use_gape_attention,
    value_head_dim,
)

# `import gape.hf` makes "gape" a valid attn_implementation (for from_pretrained too).
_register()
