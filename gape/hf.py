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

from . import api
from ._io import replace_atomic
from .config import GapeConfig
from .gates import GapeGate

logger = logging.getLogger("gape")

IMPLEMENTATION = "gape"
GATE_ATTR = "gape_gate"
_STATE_ATTR = "_gape_state"
_FORMAT = "gape-gates"


# --------------------------------------------------------------------------- registration


@functools.cache
def _register() -> None:
    """Make ``"gape"`` a valid ``attn_implementation`` (idempotent)."""
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, gape_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


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


@functools.cache
def _cache_layer_types():
    from transformers.cache_utils import DynamicLayer, StaticLayer

    return DynamicLayer, StaticLayer


# (backend, device, dtype, distance) -> backend function: a plain dict that torch.compile
# reads as a constant (it traces through lru_cache wrappers into the import machinery,
# a graph break per layer). Filled by _backend_fn's first call.
_RESOLVED: dict = {}


def _resolved_backend(backend: str, device: torch.device, dtype: torch.dtype, distance: str):
    key = (backend, device, dtype, distance)
    fn = _RESOLVED.get(key)
    if fn is None:
        fn = _RESOLVED[key] = _backend_fn(backend, device, dtype, distance)
    return fn


@functools.lru_cache(maxsize=64)
def _varlen_fn(backend: str, device: torch.device, dtype: torch.dtype, distance: str):
    """The packed-sequence entry point of the backend, or None (the mask path then runs)."""
    import importlib

    probe = torch.empty(0, device=device, dtype=dtype)
    name = api.resolve_backend(backend, probe, distance)
    if name not in api._VARLEN or api.unsupported_reason(name, probe, distance, None, varlen=True) is not None:
        return None
    module, fn = api._VARLEN[name]
    return getattr(importlib.import_module(module), fn)


@functools.lru_cache(maxsize=64)
def _backend_fn(backend: str, device: torch.device, dtype: torch.dtype, distance: str):
    # resolve_backend and unsupported_reason read only the device and dtype.
    probe = torch.empty(0, device=device, dtype=dtype)
    name = api.resolve_backend(backend, probe, distance)
    reason = api.unsupported_reason(name, probe, distance, None)
    if reason is not None:
        raise ValueError(f"GapeConfig.backend={backend!r} cannot serve this model: {reason}")
    return api._load(name)


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
            and the config. A layer without one (not selected) runs plain SDPA.
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
        ``([B, Q, Hq, D]`` contiguous, ``None)``.
    """
    gate = module._modules.get(GATE_ATTR)
    if gate is None:
        return _sdpa_forward()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if dropout:
        raise ValueError(
            f"GAPE attention does not implement attention dropout (got dropout={dropout}); "
            "set config.attention_dropout = 0 or call model.eval()"
        )
    config = gate.config
    need_grad = gate.needs_grad()
    record = gate.record
    if config.identity_shortcut and record is None and not need_grad and gate.is_identity():
        gate._prev_keys = None
        return _sdpa_forward()(module, query, key, value, attention_mask, dropout=0.0, scaling=scaling, **kwargs)

    lam = gate.query_gate(query)
    pi = gate.key_gate(key) if need_grad else _key_gate_at_decode(gate, key, query.shape[2])
    gate._prev_keys = None
    if record is not None:
        record[gate.layer_idx] = {"lambda": lam.detach(), "pi": pi.detach()}

    mask = attention_mask
    if mask is not None and mask.dtype != torch.bool:
        mask = mask == 0
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = bool(getattr(module, "is_causal", True))
    scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    # The gates are in range by construction (softplus/sigmoid, alpha clamped at 0),
    # so the API's range check, a host sync per layer, is skipped here.
    sliding = kwargs.get("sliding_window")
    window = (int(sliding) - 1, -1) if sliding else None
    # set by the pre-hook for a StaticCache layer (the gate owns the step's scratch state)
    offset = getattr(gate, "_query_offset", None)
    gate._query_offset = None
    packed = _packed_sequences(query, key, mask, kwargs, window) if offset is None else None
    if packed is not None:
        varlen = _varlen_fn(config.backend, query.device, query.dtype, config.distance)
        if varlen is not None:
            out = varlen(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), lam[0].t(),
                         pi[0].t(), *packed, is_causal, scale, config.distance, window)
            return out.unsqueeze(0).contiguous(), None
    fn = _resolved_backend(config.backend, query.device, query.dtype, config.distance)
    positions = {}
    if offset is not None:
        positions["query_offset"] = offset
    if window is not None:
        positions["window"] = window
        mask = _without_window(mask, query, key, is_causal, offset, window)
    out = fn(query, key, value, lam, pi, mask, is_causal, scale, config.distance, **positions)
    return out.transpose(1, 2).contiguous(), None


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
    if pos is None or pos.numel() != query.shape[2]:
        return None
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
    from .kernels.key_ranges import _analyse

    got = _analyse(mask, query.shape[2], key.shape[2], is_causal, offset, window)
    if isinstance(got, str) or not (bool((got.start == 0).all()) and bool((got.end == key.shape[2]).all())):
        return mask
    return None


def _remember_cached_keys(module, args, kwargs):
    """Forward pre-hook: note which keys tensor the layer's DynamicLayer holds
    before this step appends to it (see the module docstring)."""
    gate = module._modules.get(GATE_ATTR)
    if gate is None:
        return None
    gate._prev_keys = None
    gate._query_offset = None
    # transformers renamed the argument from past_key_values to cache (5.2x); read either.
    cache = kwargs.get("cache")
    if cache is None:
        cache = kwargs.get("past_key_values")
    layers = getattr(cache, "layers", None)
    idx = getattr(module, "layer_idx", None)
    if layers is not None and isinstance(idx, int) and idx < len(layers):
        layer = layers[idx]
        dynamic, static = _cache_layer_types()
        if isinstance(layer, static):
            if type(layer) is not static:
                raise ValueError(
                    f"GAPE takes DynamicCache or StaticCache layers, got {type(layer).__name__}: GAPE's distances "
                    "are cache-slot distances, and a static sliding-window layer rolls over (use a DynamicCache)"
                )
            # the queries of this step are written at slots [length, length + Q): that is the offset
            gate._query_offset = layer.cumulative_length.clone()
        # Exact type: only DynamicLayer.update is known to return cat(old keys, new keys).
        if type(layer) is dynamic:
            gate._prev_keys = getattr(layer, "keys", None)
    return None


def _key_gate_at_decode(gate: GapeGate, key: torch.Tensor, q_len: int) -> torch.Tensor:
    if not gate.config.key_gate:
        return gate.key_gate(key)
    versions = (gate.u._version, gate.c._version)
    prev, memo, pi = gate._prev_keys, gate._pi_memo, None
    if prev is not None and memo is not None:
        ref, keys_version, params_version, old_pi = memo
        if (
            ref() is prev
            and prev._version == keys_version
            and params_version == versions
            and key.shape[0] == prev.shape[0]
            and key.shape[2] == prev.shape[2] + q_len
            and old_pi.shape[-1] == prev.shape[2]
        ):
            pi = torch.cat([old_pi, gate.key_gate(key[:, :, -q_len:])], dim=-1)
    if pi is None:
        pi = gate.key_gate(key)
    gate._pi_memo = (weakref.ref(key), key._version, versions, pi)
    return pi


# --------------------------------------------------------------------------- patching


def is_patched(model: nn.Module) -> bool:
    return _STATE_ATTR in model.__dict__


def _state(model: nn.Module) -> dict:
    state = model.__dict__.get(_STATE_ATTR)
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

    config = model.config
    spec = get_spec(getattr(config, "model_type", None))
    layers = _find_layers(model, spec)
    hq = int(getattr(config, spec.num_heads))
    hkv = int(getattr(config, spec.num_kv_heads, None) or hq)
    d = getattr(config, spec.head_dim, None) or config.hidden_size // hq
    return {"num_layers": len(layers), "num_heads": hq, "num_kv_heads": hkv, "head_dim": int(d)}


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

    if config is None:
        config = GapeConfig()
    elif isinstance(config, dict):
        config = GapeConfig.from_dict(config)
    elif not isinstance(config, GapeConfig):
        raise TypeError(f"config must be a GapeConfig, a dict or None, got {type(config).__name__}")
    if not hasattr(model, "config") or not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if is_patched(model):
        raise ValueError("model is already patched with GAPE; call gape.unpatch(model) first")
    spec = get_spec(getattr(model.config, "model_type", None))
    if config.rope_layout is None:
        config = config.replace(rope_layout=spec.rope_layout)
    shape = model_shape(model)
    layers = _find_layers(model, spec)
    indices = _select_layers(config.layers, len(layers))
    _register()

    original = model.config._attn_implementation
    handles = []
    try:
        for i in indices:
            attn = getattr(layers[i], spec.attention)
            ref = next(attn.parameters())
            gate = GapeGate(
                shape["num_heads"], shape["num_kv_heads"], shape["head_dim"], config,
                layer_idx=i, dtype=ref.dtype, device=ref.device,
            )
            attn.add_module(GATE_ATTR, gate)
            handles.append(attn.register_forward_pre_hook(_remember_cached_keys, with_kwargs=True))
        model.set_attn_implementation(IMPLEMENTATION)
        if model.config._attn_implementation != IMPLEMENTATION:
            raise ValueError(
                f"{type(model).__name__} refused attn_implementation={IMPLEMENTATION!r} "
                "(its attention does not go through transformers' AttentionInterface)"
            )
    except Exception:
        _remove_gates(layers, spec, handles)
        raise
    model.__dict__[_STATE_ATTR] = {
        "config": config, "spec": spec, "layers": indices, "handles": handles, "original": original,
    }
    window = getattr(model.config, spec.sliding_window, None) if spec.sliding_window else None
    logger.info(
        "gape: patched %s (%s): %d/%d layers, %d/%d heads, head dim %d, distance=%s, backend=%s%s; was attn_implementation=%r",
        type(model).__name__, model.config.model_type, len(indices), len(layers), shape["num_heads"],
        shape["num_kv_heads"], shape["head_dim"], config.distance, config.backend,
        f", sliding window {window}" if window else "", original,
    )
    return model


def _remove_gates(layers, spec, handles) -> None:
    for h in handles:
        h.remove()
    for layer in layers:
        attn = getattr(layer, spec.attention, None)
        if attn is not None and GATE_ATTR in attn._modules:
            del attn._modules[GATE_ATTR]


def unpatch(model: nn.Module) -> nn.Module:
    """Remove the gates and restore the attention implementation from before ``patch``."""
    state = _state(model)
    spec = state["spec"]
    _remove_gates(_find_layers(model, spec), spec, state["handles"])
    model.set_attn_implementation(state["original"])
    del model.__dict__[_STATE_ATTR]
    logger.info("gape: unpatched %s; attn_implementation=%r", type(model).__name__, state["original"])
    return model


def gape_config(model: nn.Module) -> GapeConfig:
    """The config a patched model was patched with."""
    return _state(model)["config"]


def iter_gates(model: nn.Module) -> list[tuple[int, GapeGate]]:
    """``[(layer index, gate), ...]`` of a patched model, in layer order."""
    state = _state(model)
    layers = _find_layers(model, state["spec"])
    return [(i, getattr(layers[i], state["spec"].attention)._modules[GATE_ATTR]) for i in state["layers"]]


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable gate parameters (for an optimizer that trains only the gates)."""
    return [p for _, g in iter_gates(model) for p in g.parameters() if p.requires_grad]


def train_gates_only(model: nn.Module) -> list[nn.Parameter]:
    """Freeze every model weight, make the gate parts named by
    ``GapeConfig.trainable`` trainable, and return those parameters."""
    gate_ids = {id(p) for _, g in iter_gates(model) for p in g.parameters()}
    for p in model.parameters():
        if id(p) not in gate_ids:
            p.requires_grad_(False)
    parts = gape_config(model).trainable_parts()
    for _, gate in iter_gates(model):
        for name, p in gate.named_parameters():
            p.requires_grad_(GapeGate.part_of(name) in parts)
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


def save_gates(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the gates of a patched model to ``path`` (safetensors; config and
    model shape in the metadata). The write is atomic."""
    from safetensors.torch import save_file

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
    replace_atomic(os.fspath(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_gates(path: str | os.PathLike) -> tuple[GapeConfig, dict, dict[str, torch.Tensor]]:
    """``(config, metadata, tensors)`` of a gate file."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != _FORMAT:
            raise ValueError(f"{os.fspath(path)} is not a GAPE gate file (metadata format {metadata.get('format')!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return GapeConfig.from_json(metadata["config"]), metadata, tensors


def load_gates(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load gates saved by :func:`save_gates` into ``model``.

    An unpatched model is patched first with the saved config. A patched model
    keeps its own config (backend, distance) and must have the same patched
    layers and gate layout. Raises ValueError when
    the layer count, head counts or head dim differ from the saved model's.
    """
    config, metadata, tensors = read_gates(path)
    shape = model_shape(model)
    saved = {k: int(metadata[k]) for k in shape}
    diffs = [f"{k} {saved[k]} (file) vs {shape[k]} (model)" for k in shape if saved[k] != shape[k]]
    if diffs:
        raise ValueError(
            f"gates in {os.fspath(path)} were saved for a {metadata.get('model_type')} model that does not match this "
            f"{model.config.model_type} model: " + "; ".join(diffs)
        )
    if not is_patched(model):
        patch(model, config)
    current = gape_config(model)
    if current.distance != config.distance:
        logger.warning(
            "gape: gates in %s were trained with distance=%r but the model is patched with distance=%r",
            os.fspath(path), config.distance, current.distance,
        )
    for i, gate in iter_gates(model):
        own = dict(list(gate.named_parameters()) + list(gate.named_buffers()))
        prefix = f"layers.{i}."
        theirs = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if set(theirs) != set(own):
            raise ValueError(
                f"layer {i}: gate file holds {sorted(theirs) or 'nothing'} but the patched model's gate has {sorted(own)} "
                f"(file config: layers={config.layers}, key_gate={config.key_gate}, fixed_lambda={config.fixed_lambda}; "
                f"model: layers={current.layers}, key_gate={current.key_gate}, fixed_lambda={current.fixed_lambda})"
            )
        with torch.no_grad():
            for name, t in theirs.items():
                if own[name].shape != t.shape:
                    raise ValueError(f"layer {i}: gate {name} has shape {tuple(t.shape)} in the file, {tuple(own[name].shape)} in the model")
                own[name].copy_(t.to(own[name].dtype))
    extra = sorted({int(k.split(".")[1]) for k in tensors} - {i for i, _ in iter_gates(model)})
    if extra:
        raise ValueError(f"gate file has gates for layers {extra} that the model does not patch (patched: {_state(model)['layers']})")
    return model
