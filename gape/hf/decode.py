"""Decode-time state of the patched layers: the forward pre-hook that notes, before
each step, the keys a layer's cache holds, the static-cache query offset and the
cache layer the paper's gate remembers pi for; and the memo that keeps a decode
step's key gate O(new tokens) (see the package docstring)."""

from __future__ import annotations

import functools
import weakref

import torch

from .. import compat
from ..gates import GapeGate, PaperGate
from ._names import ALIBI_ATTR, GATE_ATTR

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
