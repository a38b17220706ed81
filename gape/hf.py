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
precede every real token). A static cache (empty slots after the last token)
is refused with an error.

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

from . import api
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
            and the config, its ``gape_alibi`` one ALiBi's slopes (see
            :func:`layer_gates`). A layer with neither runs plain SDPA.
        query: ``[B, Hq, Q, D]`` post-RoPE. key, value: ``[B, Hkv, K, D]``
            (cache included, not repeated for GQA).
        attention_mask: bool ``[B, 1, Q, K]`` (True = attend), a float additive
            mask (0 = attend), or None (causal only).
        dropout: must be 0 (attention dropout is not implemented).
        scaling: logit scale (default ``1/sqrt(D)``).
        kwargs: ``sliding_window`` and the rest are ignored: the window and the
            padding reach GAPE through the mask.

    Returns:
        ``([B, Q, Hq, D]`` contiguous, ``None)``.
    """
    if dropout and (GATE_ATTR in module._modules or ALIBI_ATTR in module._modules):
        raise ValueError(
            f"GAPE attention does not implement attention dropout (got dropout={dropout}); "
            "set config.attention_dropout = 0 or call model.eval()"
        )
    # gape.attention_probe computes the gates first and hands them over (the paper's
    # form consumes what its hooks captured, so it cannot compute them twice).
    gates = kwargs.pop("gape_gates", None) if "gape_gates" in kwargs else layer_gates(module, query, key)
    if gates is None:
        return _sdpa_forward()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    lam, pi, distance, backend = gates

    mask = attention_mask
    if mask is not None and mask.dtype != torch.bool:
        mask = mask == 0
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = bool(getattr(module, "is_causal", True))
    scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    # The gates are in range by construction (softplus/sigmoid, alpha clamped at 0),
    # so the API's range check, a host sync per layer, is skipped here.
    fn = _backend_fn(backend, query.device, query.dtype, distance)
    out = fn(query, key, value, lam, pi, mask, is_causal, scale, distance)
    return out.transpose(1, 2).contiguous(), None


def layer_gates(module: nn.Module, query: torch.Tensor, key: torch.Tensor):
    """``(lambda [B, Hq, Q], pi [B, Hkv, K], distance, backend)`` of one attention call
    (post-RoPE ``query``/``key``, cache included), or None when the layer runs plain
    SDPA (no gates and no ALiBi, or identity gates under the identity shortcut)."""
    gate = module._modules.get(GATE_ATTR)
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
        if config.identity_shortcut and record is None and not need_grad and alibi is None and gate.is_identity():
            gate._prev_keys = None
            return None
        lam = gate.query_gate(query)
        pi = gate.key_gate(key) if need_grad else _key_gate_at_decode(gate, key, query.shape[2])
        gate._prev_keys = None
    if alibi is not None:
        if config.distance != "linear":
            raise ValueError(f"ALiBi needs GapeConfig.distance='linear' in the patched layers, got {config.distance!r}")
        # The slope adds to the forgetting rate; the key gate protects from both (gape.positional).
        lam = lam + alibi.query_gate(query)
    if record is not None:
        record[gate.layer_idx] = {"lambda": lam.detach(), "pi": pi.detach()}
    return lam, pi, config.distance, config.backend


def _remember_cached_keys(module, args, kwargs):
    """Forward pre-hook: note which keys tensor the layer's DynamicLayer holds
    before this step appends to it (see the module docstring)."""
    gate = module._modules.get(GATE_ATTR)
    if gate is None:
        return None
    gate._prev_keys = None
    gate._cache_layer = None
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
            raise ValueError(
                f"GAPE needs a dynamic KV cache (DynamicCache, the generate default), got {type(layer).__name__}: "
                "GAPE's distances are cache-slot distances, and a static cache holds empty slots after the last "
                "token (or rolls over, for sliding windows)"
            )
        # Exact type: only DynamicLayer.update is known to return cat(old keys, new keys).
        if type(layer) is dynamic:
            gate._prev_keys = getattr(layer, "keys", None)
        elif isinstance(gate, PaperGate) and type(layer) is _sliding_layer_type():
            # returns cat(old keys, new keys) too, and keeps the last window - 1 of them
            gate._prev_keys = getattr(layer, "keys", None)
    if isinstance(gate, PaperGate) and isinstance(layers, list) and isinstance(idx, int):
        # resolved after this step's cache update (a DynamicCache() may create its layer then)
        gate._cache_layer = functools.partial(_paper_cache_layer, layers, idx)
    return None


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
    if has_alibi(model) and config.distance != "linear":
        raise ValueError(
            f"GapeConfig.distance must be 'linear' on an ALiBi model (ALiBi is a linear-distance bias that the gates "
            f"add to), got {config.distance!r}"
        )

    original = model.config._attn_implementation
    handles = []
    try:
        for i in indices:
            attn = getattr(layers[i], spec.attention)
            ref = next(attn.parameters())
            gate = GATE_CLASSES[config.gate](
                shape["num_heads"], shape["num_kv_heads"], shape["head_dim"], config,
                layer_idx=i, dtype=ref.dtype, device=ref.device,
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
        use_gape_attention(model)
    except Exception:
        _remove_gates(layers, spec, handles)
        release_gape_attention(model)
        raise
    model.__dict__[_STATE_ATTR] = {
        "config": config, "spec": spec, "layers": indices, "handles": handles, "original": original,
    }
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
    state = _state(model)
    spec = state["spec"]
    _remove_gates(_find_layers(model, spec), spec, state["handles"])
    del model.__dict__[_STATE_ATTR]
    release_gape_attention(model)  # keeps "gape" while ALiBi needs it
    logger.info("gape: unpatched %s; attn_implementation=%r", type(model).__name__, model.config._attn_implementation)
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
