"""Patch Hugging Face Llama-style models to GAPE through transformers' own extension points.

``patch`` attaches a :class:`~gape.gates.GapeGate` to each selected attention
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

The paper's gate form (``GapeConfig(gate="paper")``, :class:`~gape.gates.PaperGate`)
reads the pre-RoPE query and key: forward hooks on the modules that produce them
(the spec's ``query_pre_rope``/``key_pre_rope``) hand them to the gate, which
computes lambda and the new keys' pi there and remembers the pi of the keys a
``DynamicLayer`` (or ``DynamicSlidingWindowLayer``) holds; a cache whose keys it
did not see is refused (see ``PaperGate.gates_for``).

ALiBi (``gape.with_positional(model, "alibi")``) reaches attention here too: a
``gape_alibi`` submodule of the attention layer adds its per-head slope to
lambda (see gape.positional).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
import os
import weakref

import torch
from torch import nn

from . import api, compat, pretrained
from ._io import replace_atomic
from .config import GapeConfig
from .gates import GapeGate, PaperGate

logger = logging.getLogger("gape")

IMPLEMENTATION = "gape"
GATE_ATTR = "gape_gate"
ALIBI_ATTR = "gape_alibi"
# the attention implementation from before "gape" was selected (by patch or ALiBi)
_ATTN_ORIGINAL_ATTR = "_gape_attn_original"
GATE_CLASSES = {"invariant": GapeGate, "paper": PaperGate}
_STATE_ATTR = "_gape_state"
_FORMAT = "gape-gates"


# --------------------------------------------------------------------------- registration


@functools.cache
def register_implementation(name: str, forward) -> None:
    """Make ``name`` a valid ``attn_implementation`` running ``forward`` with
    transformers' own SDPA mask (bool ``[B, 1, Q, K]`` or None); idempotent."""
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, sdpa_mask)


def _register() -> None:
    """Make ``"gape"`` a valid ``attn_implementation`` (idempotent)."""
    register_implementation(IMPLEMENTATION, gape_attention_forward)
    _cache_layer_types()


@functools.cache
def _sdpa_forward():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


@functools.cache
def cache_kwarg() -> str:
    """The keyword the installed transformers gives the KV cache in model and layer
    forwards: ``"cache"`` in recent 5.x, ``"past_key_values"`` before (now deprecated)."""
    from transformers.models.llama.modeling_llama import LlamaModel

    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def output_cache(outputs):
    """The KV cache a model forward or ``generate`` returned, under either name."""
    cache = getattr(outputs, "cache", None)
    return outputs.past_key_values if cache is None else cache


# Filled once, eagerly (by _register): a functools.cache here would be traced
# through (with its import) by torch.compile at every layer.
_CACHE_LAYER_TYPES: list = []


def _cache_layer_types():
    if not _CACHE_LAYER_TYPES:
        from transformers.cache_utils import DynamicLayer, StaticLayer

        _CACHE_LAYER_TYPES[:] = [DynamicLayer, StaticLayer]
    return _CACHE_LAYER_TYPES[0], _CACHE_LAYER_TYPES[1]


# (backend, device, dtype, distance, compiling, D, Dv, is_causal) -> the backend function
# for calls without a mask (api.select on probe tensors: only mask-independent facts).
# A plain dict, filled eagerly (at patch time and on a miss), so that under
# torch.compile the lookup is a guarded constant and no importlib call lands in the
# traced graph. Calls with a mask go through api.select each time (the mask decides,
# e.g. a padding pattern the Triton kernel takes or one it does not).
_BACKEND_FNS: dict = {}


def _backend_fn(backend: str, device: torch.device, dtype: torch.dtype, distance: str, compiling: bool = False,
                d: int = 64, dv: int = 64, is_causal: bool = True):
    key = (backend, device, dtype, distance, compiling, d, dv, is_causal)
    fn = _BACKEND_FNS.get(key)
    if fn is None:
        q, v = _probe(device, dtype, 1, 1, 1, d), _probe(device, dtype, 1, 1, 1, dv)
        try:
            fn = api.select(backend, q, q, v, is_causal=is_causal, distance=distance)
        except ValueError as e:
            raise ValueError(f"GapeConfig.backend={backend!r} cannot serve this model: {e}") from None
        if compiling and fn.name == "torch":
            # The torch backend's C++ op has no fake kernel and its tiles write into
            # preallocated buffers, which inductor cannot lower; the reference
            # formulation (plain tensor ops, scores materialised) traces and fuses.
            fn = api.Selection("reference", api._load("reference"))
        _BACKEND_FNS[key] = fn
    return fn


def _probe(device, dtype, *shape):
    return torch.empty(shape, device=device, dtype=dtype)


@functools.lru_cache(maxsize=64)
def _varlen_fn(backend: str, device: torch.device, dtype: torch.dtype, distance: str, d: int = 1, dv: int = 1):
    """The packed-sequence entry point of the backend, or None (the mask path then runs)."""
    q, v = _probe(device, dtype, 1, 1, d), _probe(device, dtype, 1, 1, dv)
    try:
        return api.select(backend, q, q, v, distance=distance, varlen=True)
    except ValueError:
        return None


# --------------------------------------------------------------------------- attention function


def gape_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The ``"gape"`` attention implementation (transformers AttentionInterface contract).

    Args:
        module: the attention layer; its ``gape_gate`` submodule holds the gates
            and the config, its ``gape_alibi`` one ALiBi's slopes (see
            :func:`layer_gates`). A layer with neither runs plain SDPA.
        query: ``[B, Hq, Q, D]`` post-RoPE. key, value: ``[B, Hkv, K, D]``
            (cache included, not repeated for GQA).
        attention_mask: bool ``[B, 1, Q, K]`` (True = attend), a float additive
            mask (0 = attend), or None (causal only).
        dropout: must be 0 (attention dropout is not implemented).
        scaling: logit scale (default ``1/sqrt(D)``).
        kwargs: ``sliding_window`` (the layer's window, passed to the kernels),
            ``cu_seq_lens_q/k``, ``max_length_q/k`` and ``position_ids`` (packed
            sequences, run as varlen); the rest are ignored.

    Returns:
        ``([B, Q, Hq, D]`` contiguous, ``None)``, or with ``output_attentions=True``
        the attention probabilities ``[B, Hq, Q, K]`` instead of ``None``
        (recomputed by the reference path, see :mod:`gape.compat`).
    """
    gate = compat.active_gate(module._modules.get(GATE_ATTR))
    want_probs = bool(kwargs.get("output_attentions", False))
    if gate is None and ALIBI_ATTR not in module._modules:
        pretrained.check_gate_missing(module)
        out, _ = _sdpa_forward()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        if want_probs:
            return compat.attention_with_probs(None, query, key, out, attention_mask, scaling, "log")
        return out, None
    if kwargs.get("softcap") is not None:
        raise ValueError(
            f"GAPE attention does not implement attention logit soft-capping (softcap={kwargs['softcap']}); "
            "set the model's attn_logit_softcapping to None or unpatch"
        )
    if dropout:
        raise ValueError(
            f"GAPE attention does not implement attention dropout (got dropout={dropout}); "
            "set config.attention_dropout = 0 or call model.eval()"
        )
    # gape.attention_probe computes the gates first and hands them over (the paper's
    # form consumes what its hooks captured, so it cannot compute them twice).
    gates = kwargs.pop("gape_gates", None) if "gape_gates" in kwargs else layer_gates(module, query, key)
    if gates is None:  # identity gates under the identity shortcut: exactly the unpatched layer
        out, _ = _sdpa_forward()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        if want_probs:
            return compat.attention_with_probs(None, query, key, out, attention_mask, scaling, "log")
        return out, None
    lam, pi, distance, backend = gates
    compiling = torch.compiler.is_compiling()

    mask = _bool_mask(attention_mask)
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = bool(getattr(module, "is_causal", True))
    scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    # The gates are in range by construction (softplus/sigmoid, alpha clamped at 0),
    # so the API's range check, a host sync per layer, is skipped here.
    sliding = kwargs.get("sliding_window")
    window = (int(sliding) - 1, -1) if sliding else None
    # set by the pre-hook for a StaticCache layer (on the gate, or ALiBi's slopes without one)
    holder = module._modules.get(GATE_ATTR)
    if holder is None:
        holder = module._modules.get(ALIBI_ATTR)
    offset = getattr(holder, "_query_offset", None)
    holder._query_offset = None
    packed = _packed_sequences(query, key, mask, kwargs, window) if offset is None else None
    if packed is not None:
        varlen = _varlen_fn(backend, query.device, query.dtype, distance, query.shape[-1], value.shape[-1])
        if varlen is not None:
            out = varlen(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), lam[0].t(),
                         pi[0].t(), *packed, is_causal, scale, distance, window)
            out = out.unsqueeze(0).contiguous()
            if want_probs:
                return out, compat.gape_probs(query, key, lam, pi, mask, is_causal, scale, distance, None, window,
                                              packed=packed)
            return out, None
    positions = {}
    if offset is not None:
        positions["query_offset"] = offset
    if window is not None:
        positions["window"] = window
        mask = _without_window(mask, query, key, is_causal, offset, window)
    if mask is None or compiling:
        fn = _backend_fn(backend, query.device, query.dtype, distance, compiling, query.shape[-1], value.shape[-1],
                         is_causal)
    else:
        # The same selection as gape.attention, with this call's mask: on CUDA a mask
        # the Triton kernel cannot take (not key ranges) falls back to the torch backend.
        try:
            fn = api.select(backend, query, key, value, attn_mask=mask, is_causal=is_causal,
                            distance=distance, **positions)
        except ValueError as e:
            raise ValueError(f"GapeConfig.backend={backend!r} cannot serve this model: {e}") from None
        positions = {}  # bound into the selection
    out = fn(query, key, value, lam, pi, mask, is_causal, scale, distance, **positions).transpose(1, 2).contiguous()
    if want_probs:
        return out, compat.gape_probs(query, key, lam, pi, mask, is_causal, scale, distance, offset, window)
    return out, None


def layer_gates(module: nn.Module, query: torch.Tensor, key: torch.Tensor):
    """``(lambda [B, Hq, Q], pi [B, Hkv, K], distance, backend)`` of one attention call
    (post-RoPE ``query``/``key``, cache included), or None when the layer runs plain
    SDPA (no gates and no ALiBi, or identity gates under the identity shortcut)."""
    gate = compat.active_gate(module._modules.get(GATE_ATTR))  # a PEFT modules_to_save copy when active
    alibi = module._modules.get(ALIBI_ATTR)
    if gate is None and alibi is None:
        return None
    if gate is None:
        # ALiBi alone: lambda = the head's slope, pi = 0, linear distance (GAPE.md).
        pi = key.new_zeros((key.shape[0], key.shape[1], key.shape[2]), dtype=torch.float32)
        return alibi.query_gate(query), pi, "linear", alibi.backend
    config = gate.config
    need_grad = gate.needs_grad()
    record = gate.record
    if isinstance(gate, PaperGate):
        lam, pi = gate.gates_for(query, key)
    else:
        compiling = torch.compiler.is_compiling()
        # is_identity reads the gate values on the host: not while torch.compile traces
        # (the GAPE kernel at lambda = 0 is the identity too, to kernel precision).
        if (config.identity_shortcut and record is None and not need_grad and alibi is None and not compiling
                and gate.is_identity()):
            gate._prev_keys = None
            return None
        lam = gate.query_gate(query)
        # The decode memo keeps Python state across steps, which torch.compile would guard
        # on (a recompile per step); compiled, pi comes from all keys (O(Lk) like attention).
        pi = gate.key_gate(key) if need_grad or compiling else _key_gate_at_decode(gate, key, query.shape[2])
        gate._prev_keys = None
    if alibi is not None:
        if config.distance != "linear":
            raise ValueError(f"ALiBi needs GapeConfig.distance='linear' in the patched layers, got {config.distance!r}")
        # The slope adds to the forgetting rate; the key gate protects from both (gape.positional).
        lam = lam + alibi.query_gate(query)
    if record is not None:
        record[gate.layer_idx] = {"lambda": lam.detach(), "pi": pi.detach()}
    return lam, pi, config.distance, config.backend


def _bool_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """transformers' mask as GAPE's bool mask (True = attend).

    An additive float mask is honoured when every entry is 0 (attend) or a
    block (``-inf``, or at most half the dtype's lowest value, as transformers
    writes it). A soft entry (finite, non-zero) would need adding to the logits,
    which GAPE's kernels do not take: refused rather than turned into a block."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise TypeError(f"attention_mask must be bool or an additive float mask, got {mask.dtype}")
    allowed = mask == 0
    blocked = mask <= torch.finfo(mask.dtype).min / 2
    if torch.compiler.is_compiling():
        # no host sync in a traced graph: the same check as a compiled assert
        torch._assert_async((allowed | blocked).all(), "GAPE attention got a soft (finite, non-zero) float mask entry")
        return allowed
    if not bool((allowed | blocked).all()):
        soft = mask[~(allowed | blocked)]
        raise ValueError(
            f"GAPE attention got an additive float attention_mask with {soft.numel()} soft entries (e.g. "
            f"{float(soft.flatten()[0])}): only 0 (attend) and -inf / the dtype's minimum (block) can be honoured. "
            "Pass a bool mask, or run this model unpatched (gape.unpatch) for a soft mask"
        )
    return allowed


def _packed_sequences(query, key, mask, kwargs, window):
    """``(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)`` when one row holds packed
    sequences, else None.

    From the flash-attention kwargs transformers forwards (``DataCollatorWithFlattening``
    with ``return_flash_attn_kwargs=True``), or from ``position_ids`` that restart, when the
    mask is the block-diagonal one transformers builds from them (a padding mask given
    with them means transformers did not pack, and neither do we).
    """
    if query.shape[0] != 1 or query.shape[2] != key.shape[2] or query.shape[2] < 2:
        return None
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None:
        cu_q, cu_k = cu_q.to(torch.int32), cu_k.to(torch.int32)
        if int(cu_q[-1]) != query.shape[2] or int(cu_k[-1]) != key.shape[2]:
            return None  # not this layer's tokens (e.g. padded for a flash-attention kernel)
        max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
        max_q = int(max_q) if max_q is not None else int((cu_q[1:] - cu_q[:-1]).max())
        max_k = int(max_k) if max_k is not None else int((cu_k[1:] - cu_k[:-1]).max())
        return cu_q, cu_k, max_q, max_k
    pos = kwargs.get("position_ids")
    if pos is None or pos.numel() != query.shape[2] or torch.compiler.is_compiling():
        return None  # compiled: restarting position ids keep their block-diagonal mask (exact, no host sync)
    pos = pos.reshape(-1)
    starts = torch.nonzero(pos[1:] - pos[:-1] != 1).flatten() + 1
    if starts.numel() == 0:
        return None  # one sequence: the dense path
    t = query.shape[2]
    cu = torch.cat([starts.new_zeros(1), starts, starts.new_full((1,), t)]).to(torch.int32)
    if mask is not None and not _is_block_diagonal(mask, cu, window):
        return None
    longest = int((cu[1:] - cu[:-1]).max())
    return cu, cu, longest, longest


def _is_block_diagonal(mask, cu, window) -> bool:
    """Whether the bool mask ``[1, 1 or H, T, T]`` lets the first and last token of each
    sequence see exactly its own earlier tokens (in the window): transformers' packed mask,
    not a causal mask over the whole row or one with padding."""
    m = mask[0, 0]
    cu = cu.to(device=m.device, dtype=torch.int64)
    idx = torch.arange(m.shape[-1], device=m.device)
    start, last = cu[:-1], cu[1:] - 1
    want_last = (idx >= start[:, None]) & (idx <= last[:, None])
    if window is not None:
        want_last &= last[:, None] - idx <= window[0]
    want_first = idx == start[:, None]
    return bool((m[last] == want_last).all()) and bool((m[start] == want_first).all())


def _without_window(mask, query, key, is_causal, offset, window):
    """A sliding layer's mask minus what the window says: None when only the causal
    rule and the window remain (the kernels then read no mask), else the mask."""
    if mask is None or torch.compiler.is_compiling():
        return mask
    from .kernels.key_ranges import analyse_mask

    got = analyse_mask(mask, query.shape[2], key.shape[2], is_causal, offset, window)
    if isinstance(got, str) or not (bool((got.start == 0).all()) and bool((got.end == key.shape[2]).all())):
        return mask
    return None


def _remember_cached_keys(module, args, kwargs):
    """Forward pre-hook: note which keys tensor the layer's DynamicLayer holds
    before this step appends to it (see the module docstring)."""
    gate = compat.active_gate(module._modules.get(GATE_ATTR))
    if gate is None:
        alibi = module._modules.get(ALIBI_ATTR)
        if alibi is not None:
            alibi._query_offset = _static_offset(module, kwargs)
        return None
    gate._prev_keys = None
    gate._cache_layer = None
    gate._query_offset = _static_offset(module, kwargs)
    layers, idx = _cache_layers(kwargs), getattr(module, "layer_idx", None)
    if layers is not None and isinstance(idx, int) and idx < len(layers):
        layer = layers[idx]
        dynamic = _cache_layer_types()[0]
        # Exact type: only DynamicLayer.update is known to return cat(old keys, new keys).
        if type(layer) is dynamic and not torch.compiler.is_compiling():
            gate._prev_keys = getattr(layer, "keys", None)
        elif isinstance(gate, PaperGate) and type(layer) is _sliding_layer_type():
            # returns cat(old keys, new keys) too, and keeps the last window - 1 of them
            gate._prev_keys = getattr(layer, "keys", None)
    if isinstance(gate, PaperGate) and isinstance(layers, list) and isinstance(idx, int):
        # resolved after this step's cache update (a DynamicCache() may create its layer then)
        gate._cache_layer = functools.partial(_paper_cache_layer, layers, idx)
    return None


def _cache_layers(kwargs):
    """The layers of the KV cache a layer forward was given, or None."""
    # transformers renamed the argument from past_key_values to cache (5.2x); read either.
    cache = kwargs.get("cache")
    if cache is None:
        cache = kwargs.get("past_key_values")
    return getattr(cache, "layers", None)


def _static_offset(module, kwargs):
    """The queries' offset when this layer's cache is a StaticCache layer (the slots
    [length, length + Q) are written this step), else None."""
    layers, idx = _cache_layers(kwargs), getattr(module, "layer_idx", None)
    if layers is None or not isinstance(idx, int) or idx >= len(layers):
        return None
    layer = layers[idx]
    static = _cache_layer_types()[1]
    if not isinstance(layer, static):
        return None
    if type(layer) is not static:
        raise ValueError(
            f"GAPE takes DynamicCache or StaticCache layers, got {type(layer).__name__}: GAPE's distances "
            "are cache-slot distances, and a static sliding-window layer rolls over (use a DynamicCache)"
        )
    return layer.cumulative_length.clone()


def _paper_cache_layer(layers: list, idx: int):
    """The cache layer whose keys the paper's gate may remember pi for: only the types
    known to return cat(held keys, new keys) and to hold a suffix of what they return."""
    if idx >= len(layers):
        return None
    layer = layers[idx]
    return layer if type(layer) in (_cache_layer_types()[0], _sliding_layer_type()) else None


@functools.cache
def _sliding_layer_type():
    from transformers.cache_utils import DynamicSlidingWindowLayer

    return DynamicSlidingWindowLayer


def _key_gate_params(gate: GapeGate) -> tuple:
    """What the memo of pi depends on: the key-gate parameters' storage, version
    counters and a copy of their values (a ``.data`` replaced, an in-place edit and
    an in-place edit through ``.data``, which bumps no version counter, all show)."""
    params = (gate.u, gate.c)
    return tuple((p.data_ptr(), p._version, p.detach().clone()) for p in params)


def _same_key_gate_params(saved: tuple, gate: GapeGate) -> bool:
    for (ptr, version, values), p in zip(saved, (gate.u, gate.c)):
        if p.data_ptr() != ptr or p._version != version or p.shape != values.shape or not torch.equal(p.detach(), values):
            return False
    return True


def _key_gate_at_decode(gate: GapeGate, key: torch.Tensor, q_len: int) -> torch.Tensor:
    if not gate.config.learned_pi:
        return gate.key_gate(key)
    prev, memo, pi = gate._prev_keys, gate._pi_memo, None
    if prev is not None and memo is not None:
        ref, keys_version, params, old_pi = memo
        if (
            ref() is prev
            and prev._version == keys_version
            and _same_key_gate_params(params, gate)
            and key.shape[0] == prev.shape[0]
            and key.shape[2] == prev.shape[2] + q_len
            and old_pi.shape[-1] == prev.shape[2]
        ):
            pi = torch.cat([old_pi, gate.key_gate(key[:, :, -q_len:])], dim=-1)
    if pi is None:
        pi = gate.key_gate(key)
    gate._pi_memo = (weakref.ref(key), key._version, _key_gate_params(gate), pi)
    return pi


# --------------------------------------------------------------------------- patching


def is_patched(model: nn.Module) -> bool:
    """True when ``model`` is patched and still runs GAPE attention.

    After ``model.set_attn_implementation("sdpa")`` (or any other) the gates are
    still attached but unused: this says False, with a warning, until
    ``set_attn_implementation("gape")`` or :func:`unpatch`."""
    model = compat.unwrap(model)
    if _STATE_ATTR not in model.__dict__:
        return False
    switched = _switched_away(model)
    if switched is not None:
        logger.warning("gape: %s", switched)
        return False
    return True


def _switched_away(model: nn.Module) -> str | None:
    """Why a patched model no longer runs GAPE (None when it does)."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", IMPLEMENTATION)
    if impl == IMPLEMENTATION:
        return None
    return (
        f"{type(model).__name__} was patched with GAPE but its attention implementation is now {impl!r}, so GAPE "
        f"is off; call model.set_attn_implementation({IMPLEMENTATION!r}) to turn it back on, or gape.unpatch(model)"
    )


def _state(model: nn.Module) -> dict:
    state = compat.unwrap(model).__dict__.get(_STATE_ATTR)
    if state is None:
        raise ValueError("model is not patched with GAPE (call gape.patch(model) first)")
    return state


def _find_layers(model: nn.Module, spec) -> nn.ModuleList:
    for path in spec.layers:
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ValueError(
        f"cannot find the decoder layers of {type(model).__name__} (tried {', '.join(spec.layers)}); "
        "the architecture spec under patches/ does not match this model"
    )


def _select_layers(layers: list[int] | None, n: int) -> list[int]:
    if layers is None:
        return list(range(n))
    out = []
    for i in layers:
        if not -n <= i < n:
            raise ValueError(f"GapeConfig.layers has index {i} but the model has {n} layers (valid: {-n}..{n - 1})")
        out.append(i % n)
    if len(set(out)) != len(out):
        raise ValueError(f"GapeConfig.layers names a layer twice: {layers}")
    return sorted(out)


def model_shape(model: nn.Module) -> dict:
    """Layer count, head counts and head dim as the spec reads them."""
    from .patches import get_spec

    model = compat.unwrap(model)
    config = model.config
    spec = get_spec(getattr(config, "model_type", None))
    layers = _find_layers(model, spec)
    hq = int(getattr(config, spec.num_heads))
    hkv = int(getattr(config, spec.num_kv_heads, None) or hq)
    d = getattr(config, spec.head_dim, None) or config.hidden_size // hq
    return {"num_layers": len(layers), "num_heads": hq, "num_kv_heads": hkv, "head_dim": int(d)}


def rotary_dim(model: nn.Module, spec, head_dim: int) -> int | None:
    """Channels per head that RoPE rotates, for a partial-rotary spec (None: all)."""
    if not spec.partial_rotary:
        return None
    params = getattr(model.config, "rope_parameters", None) or {}
    factor = params.get("partial_rotary_factor", getattr(model.config, "partial_rotary_factor", 1.0))
    dim = int(head_dim * float(factor))
    return None if dim == head_dim else dim


def _refuse_unsupported(model: nn.Module, spec) -> None:
    cap = getattr(model.config, spec.softcap, None) if spec.softcap else None
    if cap is not None:
        raise ValueError(
            f"{model.config.model_type} uses attention logit soft-capping ({spec.softcap}={cap}), which GAPE's "
            f"kernels do not implement; running without it would change the model. Set "
            f"model.config.{spec.softcap} = None only if the model was trained without it"
        )


def patch(model: nn.Module, config: GapeConfig | dict | None = None) -> nn.Module:
    """Turn a Llama-style transformers model into a GAPE model, in place.

    Attaches a ``gape_gate`` (:class:`~gape.gates.GapeGate`, in the model's
    dtype and device) to the attention module of each layer in
    ``config.layers`` and selects ``attn_implementation="gape"``. With the
    default config (``alpha_init=0``) the model's outputs do not change.

    Args:
        model: a loaded ``PreTrainedModel`` whose ``config.model_type`` has a
            spec under ``patches/`` (llama, mistral, qwen2, qwen3).
        config: a :class:`GapeConfig`, its dict, or None for the defaults.

    Returns:
        The same model (patched).

    Example:
        >>> model, tok = gape.load_model()
        >>> gape.patch(model, gape.GapeConfig(alpha_init=1.0))
        >>> out = model.generate(**tok("Hello", return_tensors="pt"), max_new_tokens=8)
        >>> gape.unpatch(model)
    """
    from .patches import get_spec

    model = compat.unwrap(model)  # a PEFT model: patch the transformers model inside
    if config is None:
        config = GapeConfig()
    elif isinstance(config, dict):
        config = GapeConfig.from_dict(config)
    elif not isinstance(config, GapeConfig):
        raise TypeError(f"config must be a GapeConfig, a dict or None, got {type(config).__name__}")
    else:
        config.validate()  # fields may have been set after construction
    if not hasattr(model, "config") or not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if _STATE_ATTR in model.__dict__:
        switched = _switched_away(model)
        raise ValueError(switched or "model is already patched with GAPE; call gape.unpatch(model) first")
    spec = get_spec(getattr(model.config, "model_type", None))
    _refuse_unsupported(model, spec)
    if config.rope_layout is None:
        config = config.replace(rope_layout=spec.rope_layout)
    shape = model_shape(model)
    layers = _find_layers(model, spec)
    indices = _select_layers(config.layers, len(layers))
    if has_alibi(model) and config.distance != "linear":
        raise ValueError(
            f"GapeConfig.distance must be 'linear' on an ALiBi model (ALiBi is a linear-distance bias that the gates "
            f"add to), got {config.distance!r}"
        )
    rotated = rotary_dim(model, spec, shape["head_dim"])
    _register()

    original = model.config._attn_implementation
    handles = []
    try:
        for i in indices:
            attn = getattr(layers[i], spec.attention)
            ref = next(attn.parameters())
            gate = GATE_CLASSES[config.gate](
                shape["num_heads"], shape["num_kv_heads"], shape["head_dim"], config,
                layer_idx=i, dtype=ref.dtype, device=ref.device, rotary_dim=rotated,
            )
            attn.add_module(GATE_ATTR, gate)
            handles.append(attn.register_forward_pre_hook(_remember_cached_keys, with_kwargs=True))
            if isinstance(gate, PaperGate):
                for name, capture in ((spec.query_pre_rope, gate.capture_query), (spec.key_pre_rope, gate.capture_key)):
                    source = getattr(attn, name, None)
                    if not isinstance(source, nn.Module):
                        raise ValueError(
                            f"gate='paper' reads the pre-RoPE query and key from {type(attn).__name__}.{name}, which "
                            f"this model does not have; fix query_pre_rope/key_pre_rope in the {spec.model_types[0]} spec"
                        )
                    handles.append(source.register_forward_hook(capture))
            handles.append(attn.register_forward_pre_hook(compat.warn_if_bypassed, with_kwargs=True))
            for compiling in (False, True):  # filled now, so a traced forward only looks them up
                _backend_fn(config.backend, ref.device, ref.dtype, config.distance, compiling, shape["head_dim"],
                            shape["head_dim"])
        use_gape_attention(model)
    except Exception:
        _remove_gates(layers, spec, handles)
        release_gape_attention(model)
        raise
    model.__dict__[_STATE_ATTR] = {
        "config": config, "spec": spec, "layers": indices, "handles": handles, "original": original,
    }
    pretrained.mark(model, config, indices)
    window = getattr(model.config, spec.sliding_window, None) if spec.sliding_window else None
    logger.info(
        "gape: patched %s (%s): %d/%d layers, %d/%d heads, head dim %d, gate=%s, distance=%s, backend=%s%s; "
        "was attn_implementation=%r",
        type(model).__name__, model.config.model_type, len(indices), len(layers), shape["num_heads"],
        shape["num_kv_heads"], shape["head_dim"], config.gate, config.distance, config.backend,
        f", sliding window {window}" if window else "", original,
    )
    return model


def has_alibi(model: nn.Module) -> bool:
    """True when ``gape.with_positional(model, "alibi")`` is in effect."""
    return any(ALIBI_ATTR in m._modules for m in model.modules())


def use_gape_attention(model: nn.Module) -> None:
    """Select ``attn_implementation="gape"``, remembering the one it replaces (once)."""
    _register()
    current = model.config._attn_implementation
    if current == IMPLEMENTATION:
        return
    model.set_attn_implementation(IMPLEMENTATION)
    if model.config._attn_implementation != IMPLEMENTATION:
        raise ValueError(
            f"{type(model).__name__} refused attn_implementation={IMPLEMENTATION!r} "
            "(its attention does not go through transformers' AttentionInterface)"
        )
    model.__dict__[_ATTN_ORIGINAL_ATTR] = current


def release_gape_attention(model: nn.Module) -> None:
    """Restore the implementation from before ``"gape"`` once neither gates nor ALiBi need it."""
    if is_patched(model) or has_alibi(model):
        return
    original = model.__dict__.pop(_ATTN_ORIGINAL_ATTR, None)
    if original is not None:
        model.set_attn_implementation(original)


def _remove_gates(layers, spec, handles) -> None:
    for h in handles:
        h.remove()
    for layer in layers:
        attn = getattr(layer, spec.attention, None)
        if attn is not None and GATE_ATTR in attn._modules:
            del attn._modules[GATE_ATTR]


def unpatch(model: nn.Module) -> nn.Module:
    """Remove the gates and restore the attention implementation from before ``patch``."""
    model = compat.unwrap(model)
    state = _state(model)
    spec = state["spec"]
    _remove_gates(_find_layers(model, spec), spec, state["handles"])
    del model.__dict__[_STATE_ATTR]
    pretrained.unmark(model)
    release_gape_attention(model)  # keeps "gape" while ALiBi needs it
    logger.info("gape: unpatched %s; attn_implementation=%r", type(model).__name__, model.config._attn_implementation)
    return model


def gape_config(model: nn.Module) -> GapeConfig:
    """The config a patched model was patched with."""
    return _state(model)["config"]


def iter_gates(model: nn.Module) -> list[tuple[int, GapeGate]]:
    """``[(layer index, gate), ...]`` of a patched model, in layer order."""
    model = compat.unwrap(model)
    state = _state(model)
    layers = _find_layers(model, state["spec"])
    return [
        (i, compat.active_gate(getattr(layers[i], state["spec"].attention)._modules[GATE_ATTR])) for i in state["layers"]
    ]


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable gate parameters (for an optimizer that trains only the gates)."""
    return [p for _, g in iter_gates(model) for p in g.parameters() if p.requires_grad]


def train_gates_only(model: nn.Module) -> list[nn.Parameter]:
    """Freeze every model weight, make the gate parts named by
    ``GapeConfig.trainable`` trainable, and return those parameters."""
    model = compat.unwrap(model)
    gate_ids = {id(p) for _, g in iter_gates(model) for p in g.parameters()}
    for p in model.parameters():
        if id(p) not in gate_ids:
            p.requires_grad_(False)
    parts = gape_config(model).trainable_parts()
    for _, gate in iter_gates(model):
        for name, p in gate.named_parameters():
            p.requires_grad_(gate.part_of(name) in parts)
    return gate_parameters(model)


@contextlib.contextmanager
def record_gates(model: nn.Module):
    """Record every patched layer's gates during the forward passes in the block.

    Yields a dict filled as ``{layer index: {"lambda": [B, Hq, Q], "pi": [B, Hkv, K]}}``
    (float32, detached; the last forward pass wins). While recording, the
    identity shortcut is off so the gates are always computed.

    Example:
        >>> with gape.hf.record_gates(model) as rec:
        ...     model(**batch)
        >>> rec[0]["lambda"].shape
    """
    gates = iter_gates(model)
    out: dict = {}
    for _, g in gates:
        g.record = out
    try:
        yield out
    finally:
        for _, g in gates:
            g.record = None


# --------------------------------------------------------------------------- save / load


def _check_gate_path(path, *, for_writing: bool) -> str:
    """``path`` as a string, or an error that names it and says what is wrong."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike (a .safetensors file), got {type(path).__name__}")
    path = os.fspath(path)
    if os.path.isdir(path):
        inside = os.path.join(path, "gates.safetensors")
        hint = f"; pass the file inside it, {inside}" if os.path.isfile(inside) else ""
        raise IsADirectoryError(f"gate file path {path} is a folder, not a .safetensors file{hint}")
    if for_writing:
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"cannot save gates to {path}: folder {folder} does not exist (create it first)")
    elif not os.path.exists(path):
        raise FileNotFoundError(f"gate file {path} does not exist")
    return path


def save_gates(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the gates of a patched model to ``path`` (safetensors; config and
    model shape in the metadata). The write is atomic."""
    from safetensors.torch import save_file

    model = compat.unwrap(model)
    path = _check_gate_path(path, for_writing=True)
    state = _state(model)
    tensors = {}
    for i, gate in iter_gates(model):
        for name, t in list(gate.named_parameters()) + list(gate.named_buffers()):
            tensors[f"layers.{i}.{name}"] = t.detach().to("cpu").contiguous()
    shape = model_shape(model)
    metadata = {
        "format": _FORMAT,
        "format_version": "1",
        "config": state["config"].to_json(),
        "model_type": str(model.config.model_type),
        **{k: str(v) for k, v in shape.items()},
    }
    replace_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


# Metadata every gate file carries (save_gates writes them all).
_REQUIRED_METADATA = ("config", "model_type", "num_layers", "num_heads", "num_kv_heads", "head_dim")
# Value ranges the config implies for saved gate tensors (others: any finite value;
# alpha may be negative, it is clamped at 0 in the forward pass).
_GATE_RANGES = {"fixed_lambda": (0.0, math.inf)}


def _validate_gate_file(path: str, metadata: dict, tensors: dict) -> GapeConfig:
    """Everything a gate file must satisfy on its own; returns its config.

    Raises ValueError naming ``path`` and the first thing wrong: format, missing
    or malformed metadata, an invalid config, a tensor name that is not
    ``layers.<i>.<name>``, a non-float or non-finite tensor, a value outside
    the range the config implies."""
    if metadata.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a GAPE gate file (metadata format {metadata.get('format')!r}, want {_FORMAT!r})")
    missing = [k for k in _REQUIRED_METADATA if k not in metadata]
    if missing:
        raise ValueError(f"gate file {path} lacks metadata {missing} (written by gape.save_gates, which stores them all)")
    for k in _REQUIRED_METADATA[2:]:
        if not metadata[k].isdigit() or int(metadata[k]) < 1:
            raise ValueError(f"gate file {path}: metadata {k}={metadata[k]!r} is not a positive integer")
    try:
        config = GapeConfig.from_json(metadata["config"])
    except (ValueError, TypeError) as err:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"gate file {path} holds an invalid GapeConfig: {err}") from None
    for key, t in tensors.items():
        parts = key.split(".")
        if len(parts) != 3 or parts[0] != "layers" or not parts[1].isdigit():
            raise ValueError(f"gate file {path}: tensor {key!r} is not named layers.<index>.<name>")
        if not t.is_floating_point():
            raise ValueError(f"gate file {path}: tensor {key} has dtype {t.dtype}, want a float dtype")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"gate file {path}: tensor {key} has non-finite values (NaN or inf)")
        lo, hi = _GATE_RANGES.get(parts[2], (-math.inf, math.inf))
        if t.numel() and not (float(t.min()) >= lo and float(t.max()) <= hi):
            raise ValueError(
                f"gate file {path}: tensor {key} has values in [{float(t.min())}, {float(t.max())}], must lie in [{lo}, {hi}]"
            )
    return config


def read_gates(path: str | os.PathLike) -> tuple[GapeConfig, dict, dict[str, torch.Tensor]]:
    """``(config, metadata, tensors)`` of a gate file, validated (see :func:`load_gates`)."""
    from safetensors import SafetensorError, safe_open

    path = _check_gate_path(path, for_writing=False)
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"gate file {path} is not a readable safetensors file: {err}") from None
    config = _validate_gate_file(path, metadata, tensors)
    return config, metadata, tensors


def load_gates(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> nn.Module:
    """Load gates saved by :func:`save_gates` into ``model``.

    An unpatched model is patched first with the saved config. A patched model
    keeps its own config (backend, distance) and must have the same patched
    layers and gate layout. The file is validated before anything changes
    (finite float tensors, ranges the config implies, its config, metadata);
    ValueError names the file and what is wrong when the layer count, head
    counts, head dim or architecture (``model_type``; a warning with
    ``strict=False``) differ from the saved model's. Loading is all-or-nothing:
    after an error the model is exactly as before (not patched, or patched with
    its old gate values).
    """
    model = compat.unwrap(model)
    config, metadata, tensors = read_gates(path)
    path = os.fspath(path)
    shape = model_shape(model)
    saved = {k: int(metadata[k]) for k in shape}
    diffs = [f"{k} {saved[k]} (file) vs {shape[k]} (model)" for k in shape if saved[k] != shape[k]]
    if diffs:
        raise ValueError(
            f"gates in {path} were saved for a {metadata.get('model_type')} model that does not match this "
            f"{model.config.model_type} model: " + "; ".join(diffs)
        )
    if metadata["model_type"] != str(model.config.model_type):
        msg = (
            f"gates in {path} were saved from a {metadata['model_type']} model, this one is "
            f"{model.config.model_type} (same shapes; pass strict=False to load them anyway)"
        )
        if strict:
            raise ValueError(msg)
        logger.warning("gape: %s", msg)
    patched_here = not is_patched(model)
    if patched_here:
        patch(model, config)
    try:
        _copy_gates(model, path, config, tensors)
    except BaseException:
        if patched_here:
            unpatch(model)
        raise
    return model


def _copy_gates(model: nn.Module, path: str, config: GapeConfig, tensors: dict) -> None:
    """Check every layer's tensors against the patched gates, then copy them all
    (restoring the old values if a copy fails): all or nothing."""
    current = gape_config(model)
    for name in ("gate", "train_length"):
        if getattr(current, name) != getattr(config, name):
            raise ValueError(
                f"gates in {os.fspath(path)} have {name}={getattr(config, name)!r} but the model is patched with "
                f"{name}={getattr(current, name)!r}; the two gate forms (and the paper's T) are not interchangeable: "
                "unpatch the model and load the file into it unpatched, or patch with the file's config"
            )
    if current.distance != config.distance:
        logger.warning(
            "gape: gates in %s were trained with distance=%r but the model is patched with distance=%r",
            path, config.distance, current.distance,
        )
    gates = iter_gates(model)
    extra = sorted({int(k.split(".")[1]) for k in tensors} - {i for i, _ in gates})
    if extra:
        raise ValueError(
            f"gate file {path} has gates for layers {extra} that the model does not patch (patched: {_state(model)['layers']})"
        )
    pairs = []
    for i, gate in gates:
        own = dict(list(gate.named_parameters()) + list(gate.named_buffers()))
        prefix = f"layers.{i}."
        theirs = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if set(theirs) != set(own):
            raise ValueError(
                f"gate file {path}, layer {i}: the file holds {sorted(theirs) or 'nothing'} but the patched model's gate "
                f"has {sorted(own)} (file config: layers={config.layers}, learned_pi={config.learned_pi}, "
                f"fixed_lambda={config.fixed_lambda}; model: layers={current.layers}, learned_pi={current.learned_pi}, "
                f"fixed_lambda={current.fixed_lambda})"
            )
        for name, t in theirs.items():
            if own[name].shape != t.shape:
                raise ValueError(
                    f"gate file {path}, layer {i}: gate {name} has shape {tuple(t.shape)} in the file, "
                    f"{tuple(own[name].shape)} in the model"
                )
            pairs.append((own[name], t))
    backup = [dst.detach().clone() for dst, _ in pairs]
    with torch.no_grad():
        try:
            for dst, src in pairs:
                dst.copy_(src.to(dst.dtype))
        except BaseException:
            for (dst, _), old in zip(pairs, backup):
                dst.copy_(old)
            raise


# `import gape.hf` makes "gape" a valid attn_implementation (for from_pretrained too).
_register()
