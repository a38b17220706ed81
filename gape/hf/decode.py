"""Decode-time state of the patched layers, one :class:`LayerState` per gate (or per
ALiBi slopes module): the forward pre-hook that notes, before each step, the keys a
layer's cache holds, the static-cache query offset and the cache layer the paper's
gate remembers pi for; the paper's capture hooks; the memos that keep a decode step's
key gate O(new tokens) (see the package docstring); record_gates' record. The gate
modules hold parameters and compute gates only; nothing here is in a state_dict."""

from __future__ import annotations

import dataclasses
import functools
import weakref

import torch
from torch import nn

from .. import compat
from ..gates import GapeGate, PaperGate
from ._names import ALIBI_ATTR, GATE_ATTR

_LAYER_STATE_ATTR = "_gape_layer_state"


@dataclasses.dataclass(eq=False)
class LayerState:
    """The scratch state of one gate (or ALiBi slopes module): not parameters, never saved."""

    # record_gates' dict, filled by the attention call with {layer_idx: {"lambda", "pi"}}
    record: dict | None = None
    # set by the pre-hook for this step's attention call: the keys tensor the cache layer
    # held before this step, the StaticCache query offset, and (paper) a function
    # returning this layer's cache layer after the update
    prev_keys: torch.Tensor | None = None
    query_offset: torch.Tensor | None = None
    cache_layer: object = None
    # invariant gate: (weakref to the keys tensor, its _version, key-gate parameters, pi)
    pi_memo: tuple | None = None
    # paper gate: the gates of the tokens the capture hooks just saw
    lam: torch.Tensor | None = None
    pi_new: torch.Tensor | None = None
    # paper gate: cache layer -> (weakref to the keys it holds, their _version,
    # key-gate parameter versions, pi of those keys); created at first use
    pi_cache: weakref.WeakKeyDictionary | None = None


def layer_state(holder: nn.Module) -> LayerState:
    """The :class:`LayerState` of a gate or ALiBi slopes module (created at first use;
    ``patch`` creates it, so a traced forward only reads it)."""
    state = getattr(holder, _LAYER_STATE_ATTR, None)
    if state is None:
        state = LayerState()
        setattr(holder, _LAYER_STATE_ATTR, state)
    return state

# Filled once, eagerly (by _register): a functools.cache here would be traced
# through (with its import) by torch.compile at every layer.
_CACHE_LAYER_TYPES: list = []


def _cache_layer_types():
    if not _CACHE_LAYER_TYPES:
        from transformers.cache_utils import DynamicLayer, StaticLayer

        _CACHE_LAYER_TYPES[:] = [DynamicLayer, StaticLayer]
    return _CACHE_LAYER_TYPES[0], _CACHE_LAYER_TYPES[1]


def _remember_cached_keys(module, args, kwargs):
    """Forward pre-hook: note which keys tensor the layer's DynamicLayer holds
    before this step appends to it (see the module docstring)."""
    gate = compat.active_gate(module._modules.get(GATE_ATTR))
    if gate is None:
        alibi = module._modules.get(ALIBI_ATTR)
        if alibi is not None:
            layer_state(alibi).query_offset = _static_offset(module, kwargs)
        return None
    state = layer_state(gate)
    state.prev_keys = None
    state.cache_layer = None
    state.query_offset = _static_offset(module, kwargs)
    layers, idx = _cache_layers(kwargs), getattr(module, "layer_idx", None)
    if layers is not None and isinstance(idx, int) and idx < len(layers):
        layer = layers[idx]
        dynamic = _cache_layer_types()[0]
        # Exact type: only DynamicLayer.update is known to return cat(old keys, new keys).
        if type(layer) is dynamic and not torch.compiler.is_compiling():
            state.prev_keys = getattr(layer, "keys", None)
        elif isinstance(gate, PaperGate) and type(layer) is _sliding_layer_type():
            # returns cat(old keys, new keys) too, and keeps the last window - 1 of them
            state.prev_keys = getattr(layer, "keys", None)
    if isinstance(gate, PaperGate) and isinstance(layers, list) and isinstance(idx, int):
        # resolved after this step's cache update (a DynamicCache() may create its layer then)
        state.cache_layer = functools.partial(_paper_cache_layer, layers, idx)
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
    state = layer_state(gate)
    prev, memo, pi = state.prev_keys, state.pi_memo, None
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
    state.pi_memo = (weakref.ref(key), key._version, _key_gate_params(gate), pi)
    return pi


# --------------------------------------------------------------------------- the paper's gate


def capture_query(gate: PaperGate, module, args, output) -> None:
    """Forward hook on the module producing the pre-RoPE query (``functools.partial(capture_query, gate)``)."""
    layer_state(gate).lam = gate._lambda_blhd(gate._heads(output, gate.num_heads))


def capture_key(gate: PaperGate, module, args, output) -> None:
    """Forward hook on the module producing the pre-RoPE key."""
    layer_state(gate).pi_new = gate._pi_blhd(gate._heads(output, gate.num_kv_heads))


def _paper_key_versions(gate: PaperGate) -> tuple:
    # Storage, version counter and a copy of the values: a replaced ``.data`` and an
    # in-place edit through ``.data`` (which bumps no version counter) both show.
    if not gate.config.learned_pi:
        return ()
    return tuple((p.data_ptr(), p._version, p.detach().clone()) for p in (gate.w_l, gate.b_l))


def _same_versions(saved: tuple, now: tuple) -> bool:
    return len(saved) == len(now) and all(
        a[0] == b[0] and a[1] == b[1] and a[2].shape == b[2].shape and torch.equal(a[2], b[2])
        for a, b in zip(saved, now)
    )


def paper_gates(gate: PaperGate, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lambda [B, Hq, Lq], pi [B, Hkv, Lk])`` of the paper's gate for this attention call,
    from what the capture hooks saw; ``query``/``key`` are the post-RoPE tensors (cache
    included). The key gates of cached keys are the ones remembered when they were cached;
    a cache whose keys this gate did not see is refused."""
    state = layer_state(gate)
    lam, pi_new, prev, find_layer = state.lam, state.pi_new, state.prev_keys, state.cache_layer
    state.lam = state.pi_new = state.prev_keys = state.cache_layer = None
    layer = find_layer() if find_layer is not None else None
    b, hq, lq, _ = query.shape
    lk = key.shape[2]
    if lam is None or pi_new is None or tuple(lam.shape) != (b, hq, lq) or pi_new.shape[:2] != (b, gate.num_kv_heads):
        raise RuntimeError(
            f"gate='paper' (layer {gate.layer_idx}): the pre-RoPE query/key of this call were not captured "
            "(the attention module must compute them with the modules named by the architecture spec's "
            "query_pre_rope/key_pre_rope in the same forward)"
        )
    new = pi_new.shape[2]
    versions = _paper_key_versions(gate)
    if state.pi_cache is None:
        state.pi_cache = weakref.WeakKeyDictionary()
    if lk == new:
        pi = pi_new
    else:
        memo = state.pi_cache.get(layer) if layer is not None else None
        if (
            memo is None or prev is None or memo[0]() is not prev or prev._version != memo[1]
            or not _same_versions(memo[2], versions) or memo[3].shape[0] != b or memo[3].shape[2] != lk - new
        ):
            raise ValueError(
                f"gate='paper' (layer {gate.layer_idx}): the KV cache holds {lk - new} keys whose key gates this "
                "model did not compute when they were cached (the cache was filled before patching or by another "
                "model, reordered (beam search), cropped, or the key-gate parameters changed since). The paper's "
                "key gate reads the pre-RoPE key, which a cache does not keep: start from an empty DynamicCache"
            )
        pi = torch.cat([memo[3], pi_new], dim=-1)
    _remember_paper_pi(state.pi_cache, layer, pi, lk, versions)
    return lam, pi


def _remember_paper_pi(pi_cache, layer, pi: torch.Tensor, lk: int, versions: tuple) -> None:
    if layer is None:
        return
    stored = getattr(layer, "keys", None)
    # _paper_cache_layer passes only a DynamicLayer (which holds exactly the keys it returned)
    # or a DynamicSlidingWindowLayer (which holds the last of them).
    if isinstance(stored, torch.Tensor) and stored.dim() == 4 and stored.shape[2] <= lk:
        pi_cache[layer] = (weakref.ref(stored), stored._version, versions, pi[..., lk - stored.shape[2]:].detach())
    else:
        pi_cache.pop(layer, None)


def cached_pi_bytes(gate: nn.Module) -> int:
    """Memory of the key gates remembered for cached keys (the decode-time state, for benchmarks)."""
    state = layer_state(gate)
    if isinstance(gate, PaperGate):
        memos = state.pi_cache.values() if state.pi_cache is not None else ()
        return sum(m[3].numel() * m[3].element_size() for m in memos)
    pi = state.pi_memo[3] if state.pi_memo is not None else None
    return 0 if pi is None else pi.numel() * pi.element_size()
