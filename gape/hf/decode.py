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

from . import compat
from .gates import GapeGate, PaperGate
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
    # (paper, StaticCache) the version of prev_keys before this step's in-place update
    prev_version: int | None = None
    query_offset: torch.Tensor | None = None
    cache_layer: object = None
    # invariant gate: (weakref to the keys tensor, its _version, _snapshot of the key-gate
    # parameters, pi)
    pi_memo: tuple | None = None
    # paper gate: the gates of the tokens the capture hooks just saw
    lam: torch.Tensor | None = None
    pi_new: torch.Tensor | None = None
    # paper gate: cache layer -> (weakref to the keys it holds, their _version, _snapshot
    # of the key-gate parameters, pi of those keys, the keys' first components or None);
    # created at first use
    pi_cache: weakref.WeakKeyDictionary | None = None


def layer_state(holder: nn.Module) -> LayerState:
    """The :class:`LayerState` of a gate or ALiBi slopes module (created at first use;
    ``patch`` creates it, so a traced forward only reads it)."""
    state = getattr(holder, _LAYER_STATE_ATTR, None)
    if state is None:
        state = LayerState()
        setattr(holder, _LAYER_STATE_ATTR, state)
    return state


# The cache layer classes GAPE treats differently: (DynamicLayer, StaticLayer,
# DynamicSlidingWindowLayer, StaticSlidingWindowLayer). Filled once, eagerly (by
# _register): a functools.cache here would be traced through (with its import) by
# torch.compile at every layer.
_CACHE_LAYER_TYPES: list = []


def _cache_layer_types():
    if not _CACHE_LAYER_TYPES:
        from transformers.cache_utils import (
            DynamicLayer,
            DynamicSlidingWindowLayer,
            StaticLayer,
            StaticSlidingWindowLayer,
        )

        _CACHE_LAYER_TYPES[:] = [DynamicLayer, StaticLayer, DynamicSlidingWindowLayer, StaticSlidingWindowLayer]
    return tuple(_CACHE_LAYER_TYPES)


def _query_length(args, kwargs) -> int | None:
    """The number of new tokens of an attention forward (its hidden states' length)."""
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    return hidden.shape[1] if isinstance(hidden, torch.Tensor) and hidden.dim() == 3 else None


def _sliding_static_fills(layer, q_len) -> bool:
    """Whether this step's update of a StaticSlidingWindowLayer leaves its in-place buffer
    path (the window is reached): from then on it returns the last keys in order, ending at
    the newest, so slot distances are bottom-right as with a DynamicCache."""
    return q_len is None or layer.cumulative_length_int + q_len > layer.max_cache_len


def _remember_cached_keys(module, args, kwargs):
    """Forward pre-hook: note which keys tensor the layer's DynamicLayer holds
    before this step appends to it (see the module docstring)."""
    for capture in module.__dict__.get(_CAPTURES_ATTR, ()):
        capture.follow()
    layers, idx = _cache_layers(kwargs), getattr(module, "layer_idx", None)
    q_len = _query_length(args, kwargs)
    gate = compat.active_gate(module._modules.get(GATE_ATTR))
    if gate is None:
        alibi = module._modules.get(ALIBI_ATTR)
        if alibi is not None:
            layer_state(alibi).query_offset = _static_offset(layers, idx, q_len)
        return None
    state = layer_state(gate)
    state.prev_keys = state.prev_version = None
    state.cache_layer = None
    state.query_offset = _static_offset(layers, idx, q_len)
    if isinstance(gate, PaperGate) and _is_type(layers, idx, 3) and _sliding_static_fills(layers[idx], q_len):
        raise ValueError(
            f"gate='paper' (layer {gate.layer_idx}) with a static sliding-window cache is served while the window "
            f"({layers[idx].max_cache_len} tokens) is not reached; this step would roll it over, and the paper's "
            "key gates of the rolled keys are not kept. Use a DynamicCache (cache_implementation='dynamic'), or "
            "the invariant gate form, which reads the gates from the cached keys"
        )
    if isinstance(gate, PaperGate):
        # Traced, a prefill into an empty dynamic cache gates its keys in the graph and
        # remembers nothing; any step reading cached keys goes through the eager helpers.
        if layers is not None and isinstance(idx, int) and (
            not torch.compiler.is_compiling() or state.query_offset is not None or _holds_keys(layers, idx)
        ):
            _note_paper_cache(state, layers, idx)
        return None
    if layers is not None and isinstance(idx, int) and idx < len(layers):
        layer = layers[idx]
        # Exact type: only DynamicLayer.update is known to return cat(old keys, new keys).
        if type(layer) is _cache_layer_types()[0] and not torch.compiler.is_compiling():
            state.prev_keys = getattr(layer, "keys", None)
    return None


def _holds_keys(layers, idx: int) -> bool:
    return idx < len(layers) and bool(getattr(layers[idx], "is_initialized", False))


_EAGER_REASON = "gate='paper' remembers the key gates of cached keys between decode steps, outside the graph"


@torch.compiler.disable(reason=_EAGER_REASON)
def _note_paper_cache(state: LayerState, layers, idx: int) -> None:
    """The paper gate's part of the pre-hook: the keys the cache layer holds before this
    step (and, for the static buffer written in place, their version), and a function
    finding the cache layer after the update (a DynamicCache() may create it then)."""
    if idx < len(layers):
        layer = layers[idx]
        dynamic, static, sliding, sliding_static = _cache_layer_types()
        keys = getattr(layer, "keys", None)
        if type(layer) in (dynamic, sliding):
            # both return cat(old keys, new keys); the sliding one keeps the last window - 1
            state.prev_keys = keys
        elif type(layer) in (static, sliding_static) and isinstance(keys, torch.Tensor):
            # (the sliding one only before its window is reached: the pre-hook refuses the rest)
            state.prev_keys, state.prev_version = keys, keys._version
    if isinstance(layers, list):
        state.cache_layer = functools.partial(_paper_cache_layer, layers, idx)


def _cache_layers(kwargs):
    """The layers of the KV cache a layer forward was given, or None."""
    # transformers renamed the argument from past_key_values to cache (5.2x); read either.
    cache = kwargs.get("cache")
    if cache is None:
        cache = kwargs.get("past_key_values")
    return getattr(cache, "layers", None)


def _is_type(layers, idx, which: int) -> bool:
    return layers is not None and isinstance(idx, int) and idx < len(layers) and \
        type(layers[idx]) is _cache_layer_types()[which]


def _static_offset(layers, idx, q_len=None):
    """The queries' offset when layer ``idx`` of the cache ``layers`` (see
    :func:`_cache_layers`) returns its static buffer this step (the slots
    [length, length + Q) are written, the empty ones after are future keys), else None
    (bottom-right: the keys end at the newest token).

    A StaticSlidingWindowLayer returns its buffer until the window is reached; from the
    step that reaches it, it returns the last keys in order (rolled left, or the held
    keys and the new ones concatenated), so its slot distances are the true distances,
    bottom-right aligned. Any other StaticLayer subclass is refused."""
    if layers is None or not isinstance(idx, int) or idx >= len(layers):
        return None
    layer = layers[idx]
    _, static, _, sliding_static = _cache_layer_types()
    if not isinstance(layer, static):
        return None
    if type(layer) is sliding_static:
        if q_len is None:
            raise ValueError(
                f"GAPE: the attention layer {idx} got no hidden_states of shape [B, Q, C], so it cannot tell whether "
                "this step reaches the static sliding-window cache's window (use a DynamicCache)"
            )
        return None if _sliding_static_fills(layer, q_len) else layer.cumulative_length.clone()
    if type(layer) is not static:
        raise ValueError(
            f"GAPE takes DynamicCache, StaticCache and their sliding-window layers, got {type(layer).__name__}: "
            "GAPE's distances are cache-slot distances, which this layer's slot order may not keep (use a DynamicCache)"
        )
    return layer.cumulative_length.clone()


def _paper_cache_layer(layers: list, idx: int):
    """The cache layer whose keys the paper's gate may remember pi for: only the types
    known to return cat(held keys, new keys) and to hold a suffix of what they return,
    and the static layer (which returns its whole buffer, written in place)."""
    if idx >= len(layers):
        return None
    layer = layers[idx]
    return layer if type(layer) in _cache_layer_types() else None


def _snapshot(params) -> tuple:
    """What a memo of pi depends on (both gate forms): the key-gate parameters' storage,
    version counters and a copy of their values (a ``.data`` replaced, an in-place edit
    and an in-place edit through ``.data``, which bumps no version counter, all show)."""
    return tuple((p.data_ptr(), p._version, p.detach().clone()) for p in params)


def _same_snapshot(saved: tuple, now: tuple) -> bool:
    return len(saved) == len(now) and all(
        a[0] == b[0] and a[1] == b[1] and a[2].shape == b[2].shape and torch.equal(a[2], b[2])
        for a, b in zip(saved, now)
    )


def _key_gate_at_decode(gate: GapeGate, key: torch.Tensor, q_len: int) -> torch.Tensor:
    if not gate.config.learned_pi:
        return gate.key_gate(key)
    state = layer_state(gate)
    prev, memo, pi = state.prev_keys, state.pi_memo, None
    params = _snapshot((gate.u, gate.c))
    if prev is not None and memo is not None:
        ref, keys_version, saved, old_pi = memo
        if (
            ref() is prev
            and prev._version == keys_version
            and _same_snapshot(saved, params)
            and key.shape[0] == prev.shape[0]
            and key.shape[2] == prev.shape[2] + q_len
            and old_pi.shape[-1] == prev.shape[2]
        ):
            pi = torch.cat([old_pi, gate.key_gate(key[:, :, -q_len:])], dim=-1)
    if pi is None:
        pi = gate.key_gate(key)
    state.pi_memo = (weakref.ref(key), key._version, params, pi)
    return pi


# --------------------------------------------------------------------------- the paper's gate


class PreRopeCapture:
    """The forward hook that hands the pre-RoPE query (or key) of one attention module to
    the paper's gate in use there: the gate itself or PEFT's active copy of it
    (``modules_to_save``), resolved at each call. It follows the module computing that
    projection: when a wrapper replaces it after patching (a LoRA layer on ``q_proj``),
    :meth:`follow` (run by the attention pre-hook) moves the hook onto the wrapper, whose
    output is the query the attention really uses; the wrapped module's own output lacks
    the adapter's delta. ``remove()`` like a hook handle."""

    def __init__(self, attn: nn.Module, name: str, kind: str, heads_first: bool = False):
        self.attn, self.name, self.kind, self.heads_first = attn, name, kind, heads_first
        self.module = None
        self._attach()

    def _attach(self) -> None:
        source = getattr(self.attn, self.name, None)
        if not isinstance(source, nn.Module):
            raise ValueError(
                f"gate='paper' reads the pre-RoPE {self.kind} from {type(self.attn).__name__}.{self.name}, which "
                f"this model does not have (any more); fix query_pre_rope/key_pre_rope in the architecture spec"
            )
        self.remove()
        source.register_forward_hook(self)
        self.module = source

    def follow(self) -> None:
        if self.attn._modules.get(self.name) is self.module:
            return
        if torch.compiler.is_compiling():
            raise RuntimeError(
                f"gate='paper': {type(self.attn).__name__}.{self.name} was replaced after patching (e.g. by a PEFT "
                "adapter); run the model once eagerly before torch.compile, so the gate reads the new module's output"
            )
        self._attach()

    def remove(self) -> None:
        # by identity, not by a handle: a deep-copied model's handles point into the
        # original's hook dicts
        if self.module is not None:
            hooks = self.module._forward_hooks
            for key in [k for k, hook in hooks.items() if hook is self]:
                del hooks[key]
        self.module = None

    def __call__(self, module, args, output) -> None:
        gate = compat.active_gate(self.attn._modules.get(GATE_ATTR))
        if not isinstance(gate, PaperGate):
            return
        heads = gate.num_heads if self.kind == "query" else gate.num_kv_heads
        x = self._blhd(output, heads, gate.head_dim)
        if self.kind == "query":
            layer_state(gate).lam = gate._lambda_blhd(x)
        else:
            layer_state(gate).pi_new = gate._pi_blhd(x)

    def _blhd(self, x: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
        """``[B, L, H, D]`` from the module's ``[B, L, H*D]``, ``[B, L, H, D]`` or (declared
        by the spec) ``[B, H, L, D]`` output; any other shape is refused, not reshaped."""
        if x.dim() == 4 and self.heads_first and x.shape[1] == heads and x.shape[3] == head_dim:
            return x.transpose(1, 2)
        if x.dim() == 4 and not self.heads_first and x.shape[2] == heads and x.shape[3] == head_dim:
            return x
        if x.dim() == 3 and x.shape[2] == heads * head_dim:
            return x.unflatten(2, (heads, head_dim))
        layout = "[B, H, L, D]" if self.heads_first else "[B, L, H, D] or [B, L, H*D]"
        raise ValueError(
            f"gate='paper': {type(self.attn).__name__}.{self.name} gave the pre-RoPE {self.kind} of shape "
            f"{tuple(x.shape)}, expected {layout} with H = {heads}, D = {head_dim}; fix query_pre_rope/key_pre_rope "
            "or pre_rope_heads_first in the architecture spec"
        )


_CAPTURES_ATTR = "_gape_pre_rope_captures"


def add_captures(attn: nn.Module, query_name: str, key_name: str, heads_first: bool = False) -> None:
    """Hook the paper's gate of ``attn`` onto the modules computing its pre-RoPE query and
    key (undone by :func:`remove_captures`)."""
    attn.__dict__[_CAPTURES_ATTR] = (
        PreRopeCapture(attn, query_name, "query", heads_first), PreRopeCapture(attn, key_name, "key", heads_first)
    )


def remove_captures(attn: nn.Module) -> None:
    for capture in attn.__dict__.pop(_CAPTURES_ATTR, ()):
        capture.remove()


def paper_gates(gate: PaperGate, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lambda [B, Hq, Lq], pi [B, Hkv, Lk])`` of the paper's gate for this attention call,
    from what the capture hooks saw; ``query``/``key`` are the post-RoPE tensors (cache
    included). The key gates of cached keys are the ones remembered when they were cached;
    a cache whose keys this gate did not see is refused."""
    state = layer_state(gate)
    lam, pi_new, prev, find_layer = state.lam, state.pi_new, state.prev_keys, state.cache_layer
    prev_version = state.prev_version
    state.lam = state.pi_new = state.prev_keys = state.prev_version = state.cache_layer = None
    b, hq, lq, _ = query.shape
    lk = key.shape[2]
    if lam is None or pi_new is None or tuple(lam.shape) != (b, hq, lq) or pi_new.shape[:2] != (b, gate.num_kv_heads):
        raise RuntimeError(
            f"gate='paper' (layer {gate.layer_idx}): the pre-RoPE query/key of this call were not captured "
            "(the attention module must compute them with the modules named by the architecture spec's "
            "query_pre_rope/key_pre_rope in the same forward)"
        )
    if find_layer is None and state.query_offset is None:  # no cache (or a traced prefill): every key is new
        if lk != pi_new.shape[2]:
            raise _unseen_keys(gate, lk - pi_new.shape[2])
        return lam, pi_new
    return lam, _paper_pi_with_cache(gate, state, find_layer, (prev, prev_version), pi_new, key)


@torch.compiler.disable(reason=_EAGER_REASON)
def _paper_pi_with_cache(gate: PaperGate, state: LayerState, find_layer, prev: tuple, pi_new, key) -> torch.Tensor:
    """pi of every key of a call with a KV cache: the remembered pi of the cached keys
    and this step's; remembered in turn for the next step. ``find_layer``: returns the
    cache layer (or None); ``prev``: the keys tensor that layer held before this step's
    update and (static buffer) its version then."""
    layer = find_layer() if find_layer is not None else None
    versions = _snapshot((gate.w_l, gate.b_l) if gate.config.learned_pi else ())
    if state.pi_cache is None:
        state.pi_cache = weakref.WeakKeyDictionary()
    if state.query_offset is not None:
        return _static_paper_pi(gate, state, layer, prev, pi_new, key, versions)
    b, lk, new = key.shape[0], key.shape[2], pi_new.shape[2]
    if lk == new:
        pi = pi_new
    else:
        memo = state.pi_cache.get(layer) if layer is not None else None
        held = _held_pi(memo, prev[0], versions)
        if held is None or held.shape[0] != b or held.shape[2] != lk - new:
            raise _unseen_keys(gate, lk - new)
        pi = torch.cat([held, pi_new], dim=-1)
    _remember_paper_pi(state.pi_cache, layer, pi, lk, versions)
    return pi


# Head-dim components of each cached key that the memo keeps (as a view of the cache's own
# keys, so at no cost) to recognise the keys in tensors transformers' cache ops make from them.
_FINGERPRINT = 4


def _held_pi(memo, held, versions: tuple, held_version: int | None = None):
    """pi of ``held`` (the keys the cache layer holds before this step; ``held_version``:
    its version then, if this step has written into it since) from the memo of the keys
    it held after the last step, or None. Either the same tensor, unchanged; or
    a new one that transformers' cache ops made from it bit for bit: rows reordered or
    selected (beam search: ``reorder_cache``; contrastive search), a prefix kept (``crop``:
    assisted decoding), recognised row by row from each key's first components."""
    if memo is None or held is None or not _same_snapshot(memo[2], versions):
        return None
    ref, version, _, pi, fingerprint = memo
    if ref() is held:
        return pi if (held._version if held_version is None else held_version) == version else None
    n = held.shape[2]
    if fingerprint is None or held.dim() != 4 or held.shape[1] != fingerprint.shape[1] or n > fingerprint.shape[2]:
        return None
    now = held[..., : fingerprint.shape[-1]]
    # match[i, j]: row i now holds the first n keys of remembered row j
    match = (now[:, None] == fingerprint[None, :, :, :n]).flatten(2).all(-1)
    if not bool(match.any(1).all()):
        return None
    return pi[match.int().argmax(1), :, :n]


def _unseen_keys(gate: PaperGate, count: int) -> ValueError:
    return ValueError(
        f"gate='paper' (layer {gate.layer_idx}): the KV cache holds {count} keys whose key gates this "
        "model did not compute when they were cached (the cache was filled before patching, by another "
        "model or by a forward under torch.compile, its keys were edited, or the key-gate parameters "
        "changed since). The paper's key gate reads the pre-RoPE key, which a cache does not keep: start from "
        "an empty cache, and prefill eagerly when decoding under torch.compile"
    )


def _static_paper_pi(gate: PaperGate, state: LayerState, layer, prev: tuple, pi_new, key, versions) -> torch.Tensor:
    """pi over a StaticCache layer's slots: the remembered pi of the slots before the query
    offset, this step's pi at [offset, offset + new), zeros for the empty slots after
    (future keys, masked by the offset). ``prev``: the slots' keys buffer and its version
    before this step's update."""
    b, _, lk, _ = key.shape
    new = pi_new.shape[2]
    offset = int(state.query_offset)
    if offset == 0:
        held = pi_new.new_zeros(b, gate.num_kv_heads, lk)
    else:
        memo = state.pi_cache.get(layer) if layer is not None else None
        held = _held_pi(memo, prev[0], versions, held_version=prev[1])
        if held is None or tuple(held.shape) != (b, gate.num_kv_heads, lk):
            raise _unseen_keys(gate, offset)
        held = held.to(pi_new.dtype)
    pi = torch.cat([held[..., :offset], pi_new, held[..., offset + new:]], dim=-1)
    if layer is not None and isinstance(getattr(layer, "keys", None), torch.Tensor):
        state.pi_cache[layer] = (weakref.ref(layer.keys), layer.keys._version, versions, pi.detach(), None)
    return pi


def _remember_paper_pi(pi_cache, layer, pi: torch.Tensor, lk: int, versions: tuple) -> None:
    if layer is None:
        return
    stored = getattr(layer, "keys", None)
    # _paper_cache_layer passes only a DynamicLayer (which holds exactly the keys it returned)
    # or a DynamicSlidingWindowLayer (which holds the last of them).
    if isinstance(stored, torch.Tensor) and stored.dim() == 4 and stored.shape[2] <= lk:
        pi_cache[layer] = (weakref.ref(stored), stored._version, versions, pi[..., lk - stored.shape[2]:].detach(),
                           stored.detach()[..., :_FINGERPRINT])
    else:
        pi_cache.pop(layer, None)


def cached_pi_bytes(gate: nn.Module) -> int:
    """Memory of the key gates remembered for cached keys (the decode-time state, for
    benchmarks); the paper form's key fingerprints are views of the cache's keys and cost none."""
    state = layer_state(gate)
    if isinstance(gate, PaperGate):
        memos = state.pi_cache.values() if state.pi_cache is not None else ()
        return sum(m[3].numel() * m[3].element_size() for m in memos)
    pi = state.pi_memo[3] if state.pi_memo is not None else None
    return 0 if pi is None else pi.numel() * pi.element_size()
