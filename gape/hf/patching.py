"""Patching a model: ``patch`` / ``unpatch``, selecting and releasing the ``"gape"``
implementation, the patched model's state (config, layers, gates) and what the
gates expose (parameters to train, records of the gates, the model's shape)."""

from __future__ import annotations

import contextlib
import logging

from torch import nn

from . import compat, pretrained
from .config import GapeConfig
from .gates import GapeGate, PaperGate, set_trainable
from ._names import ALIBI_ATTR, GATE_ATTR, IMPLEMENTATION
from .attention import _backend_fn, _register
from .decode import _remember_cached_keys, add_captures, layer_state, remove_captures

logger = logging.getLogger("gape")

# the attention implementation from before "gape" was selected (by patch or ALiBi)
_ATTN_ORIGINAL_ATTR = "_gape_attn_original"
GATE_CLASSES = {"invariant": GapeGate, "paper": PaperGate}
_STATE_ATTR = "_gape_state"


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
    """The decoder layers: the spec's paths from the model, then from its decoder
    (``model.base_model``, wherever a head keeps it: ``.model`` for causal LM and
    classification heads, ``.transformer`` for question answering)."""
    roots = [("", model)]
    base = getattr(model, "base_model", None)
    if isinstance(base, nn.Module) and base is not model:
        roots.append((f"{getattr(model, 'base_model_prefix', 'base_model')}.", base))
    tried = []
    for prefix, root in roots:
        for path in spec.layers:
            tried.append(prefix + path)
            obj = root
            for part in path.split("."):
                obj = getattr(obj, part, None)
                if obj is None:
                    break
            if isinstance(obj, nn.ModuleList):
                return obj
    raise ValueError(
        f"cannot find the decoder layers of {type(model).__name__} (tried {', '.join(tried)}); "
        "the architecture spec under patches/ does not match this model"
    )


def attention_layers(model: nn.Module, spec, layers: nn.ModuleList | None = None) -> list[int]:
    """Indices of the decoder layers that carry attention (all of them, except in a hybrid
    stack, where the spec's ``layer_kinds`` says which ones do). An attention layer without
    the spec's attention module is an error: the spec does not match the model."""
    layers = _find_layers(model, spec) if layers is None else layers
    n = len(layers)
    if spec.layer_kinds is None:
        indices = list(range(n))
    else:
        kinds = getattr(model.config, spec.layer_kinds, None)
        if kinds is None or isinstance(kinds, str) or len(kinds) != n:
            raise ValueError(
                f"config.{spec.layer_kinds} of {type(model).__name__} should list the kind of each of its {n} layers, "
                f"got {kinds!r}; the architecture spec under patches/ does not match this model"
            )
        indices = [i for i, kind in enumerate(kinds) if kind in spec.attention_kinds]
    for i in indices:
        if not isinstance(getattr(layers[i], spec.attention, None), nn.Module):
            raise ValueError(
                f"layer {i} of {type(model).__name__} should be an attention layer but has no .{spec.attention} "
                "module; the architecture spec under patches/ does not match this model"
            )
    if not indices:
        raise ValueError(f"{type(model).__name__} has no attention layer (config.{spec.layer_kinds}), nothing to patch")
    return indices


def _select_layers(layers: list[int] | None, n: int, attending: list[int] | None = None) -> list[int]:
    """The layers ``GapeConfig.layers`` names, as indices; by default every attention layer
    (``attending``, all ``n`` when None). Naming a layer without attention is an error."""
    attending = list(range(n)) if attending is None else attending
    if layers is None:
        return list(attending)
    out = []
    for i in layers:
        if not -n <= i < n:
            raise ValueError(f"GapeConfig.layers has index {i} but the model has {n} layers (valid: {-n}..{n - 1})")
        out.append(i % n)
    if len(set(out)) != len(out):
        raise ValueError(f"GapeConfig.layers names a layer twice: {layers}")
    missing = sorted(set(out) - set(attending))
    if missing:
        raise ValueError(
            f"GapeConfig.layers names layer(s) {missing}, which have no attention (a hybrid stack's recurrent or "
            f"convolution layers); the attention layers are {attending}"
        )
    return sorted(out)


def model_shape(model: nn.Module) -> dict:
    """Layer count, head counts and head dim as the spec reads them."""
    from ..patches.registry import get_spec

    model = compat.unwrap(model)
    config = model.config
    spec = get_spec(getattr(config, "model_type", None))
    layers = _find_layers(model, spec)
    hq = int(getattr(config, spec.num_heads))
    hkv = int(getattr(config, spec.num_kv_heads, None) or hq)
    return {"num_layers": len(layers), "num_heads": hq, "num_kv_heads": hkv, "head_dim": _dim(config, spec.head_dim, hq)}


def _dim(config, attrs: str | tuple[str, ...], num_heads: int) -> int:
    """A head dim from the config: one attribute, or the sum of several (MLA's nope + rope
    channels); ``hidden_size // num_heads`` when absent or None."""
    names = (attrs,) if isinstance(attrs, str) else attrs
    values = [getattr(config, name, None) for name in names]
    if any(v is None for v in values):
        return int(config.hidden_size // num_heads)
    return int(sum(values))


def value_head_dim(model: nn.Module, spec, head_dim: int) -> int:
    """The value head dim (``head_dim`` unless the spec names another, as MLA does)."""
    if spec.value_head_dim is None:
        return head_dim
    return int(getattr(model.config, spec.value_head_dim, None) or head_dim)


def rotary_dim(model: nn.Module, spec, head_dim: int) -> int | None:
    """Channels per head that RoPE rotates, for a partial-rotary spec (None: all)."""
    if spec.rotary_dim is not None:
        dim = int(getattr(model.config, spec.rotary_dim))
        return None if dim == head_dim else dim
    if not spec.partial_rotary:
        return None
    params = getattr(model.config, "rope_parameters", None) or {}
    factor = params.get("partial_rotary_factor", getattr(model.config, "partial_rotary_factor", 1.0))
    dim = int(head_dim * float(factor))
    return None if dim == head_dim else dim


def patch(model: nn.Module, config: GapeConfig | dict | None = None) -> nn.Module:
    """Turn a Llama-style transformers model into a GAPE model, in place.

    Attaches a ``gape_gate`` (:class:`~gape.hf.gates.GapeGate`, in the model's
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
    from ..patches.registry import get_spec

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
    if config.rope_layout is None:
        config = config.replace(rope_layout=spec.rope_layout)
    shape = model_shape(model)
    layers = _find_layers(model, spec)
    indices = _select_layers(config.layers, len(layers), attention_layers(model, spec, layers))
    if has_alibi(model) and config.distance != "linear":
        raise ValueError(
            f"GapeConfig.distance must be 'linear' on an ALiBi model (ALiBi is a linear-distance bias that the gates "
            f"add to), got {config.distance!r}"
        )
    rotated = rotary_dim(model, spec, shape["head_dim"])
    dv = value_head_dim(model, spec, shape["head_dim"])
    _register()

    original = model.config._attn_implementation
    handles = []
    try:
        for i in indices:
            attn = getattr(layers[i], spec.attention)
            ref = next(attn.parameters())
            gate = GATE_CLASSES[config.gate](
                shape["num_heads"], shape["num_kv_heads"], shape["head_dim"], config,
                layer_idx=i, dtype=ref.dtype, device=ref.device, rotary_dim=rotated, rotary_last=spec.rotary_last,
            )
            if isinstance(gate, GapeGate) and spec.post_rope_norm is not None:
                gate.post_rope_norm = _post_rope_norm(attn, spec)
            attn.add_module(GATE_ATTR, gate)
            layer_state(gate)  # created now, so a traced forward only reads it
            handles.append(attn.register_forward_pre_hook(_remember_cached_keys, with_kwargs=True))
            if isinstance(gate, PaperGate):
                names = [_pre_rope_module(attn, spec, which) for which in ("query_pre_rope", "key_pre_rope")]
                add_captures(attn, *names, heads_first=spec.pre_rope_heads_first)  # removed by _remove_gates
            handles.append(attn.register_forward_pre_hook(compat.warn_if_bypassed, with_kwargs=True))
            for compiling in (False, True):  # filled now, so a traced forward only looks them up
                _backend_fn(config.backend, ref.device, ref.dtype, config.distance, compiling, shape["head_dim"], dv)
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
        "gape: patched %s (%s): %d/%d layers, %d/%d heads, head dim %d%s, gate=%s, distance=%s, backend=%s%s; "
        "was attn_implementation=%r",
        type(model).__name__, model.config.model_type, len(indices), len(layers), shape["num_heads"],
        shape["num_kv_heads"], shape["head_dim"], f" (values {dv})" if dv != shape["head_dim"] else "", config.gate, config.distance, config.backend,
        f", sliding window {window}" if window else "", original,
    )
    return model


def _pre_rope_module(attn: nn.Module, spec, which: str) -> str:
    """The name of the module of ``attn`` whose output is the un-rotated query or key
    (``which``: the spec field): the first of the spec's candidates ``attn`` has."""
    candidates = getattr(spec, which)
    candidates = (candidates,) if isinstance(candidates, str) else tuple(candidates)
    for name in candidates:
        if isinstance(getattr(attn, name, None), nn.Module):
            return name
    if not candidates:
        raise ValueError(
            f"gate='paper' reads the pre-RoPE query and key, but no module of {type(attn).__name__} outputs the "
            f"{which.split('_')[0]} whole (multi-head latent attention assembles each key from a latent expansion and "
            f"a shared rotated part); use the invariant form (gate='invariant') on {spec.model_types[0]}"
        )
    raise ValueError(
        f"gate='paper' reads the pre-RoPE query and key from {type(attn).__name__}.{' or .'.join(candidates)}, "
        f"which this model does not have (a fused q/k/v projection has no module for the query alone); "
        f"fix {which} in the {spec.model_types[0]} spec, or use the invariant form (gate='invariant')"
    )


def _post_rope_norm(attn: nn.Module, spec) -> tuple[str, str]:
    """The spec's post-RoPE q/k norm names, checked: per-channel weights of the head dim,
    none zero (the gate features divide by them)."""
    for name in spec.post_rope_norm:
        weight = getattr(getattr(attn, name, None), "weight", None)
        if not isinstance(weight, nn.Parameter) or weight.dim() != 1:
            raise ValueError(
                f"{type(attn).__name__}.{name} should be a norm with a per-channel weight (post_rope_norm of the "
                f"{spec.model_types[0]} spec); the architecture spec under patches/ does not match this model"
            )
        if not bool((weight != 0).all()):
            raise ValueError(
                f"{type(attn).__name__}.{name}.weight has zero entries: the invariant gates divide the post-RoPE norm's "
                "weight out of the query and key, which a zero weight makes impossible; use gate='paper'"
            )
    return tuple(spec.post_rope_norm)


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
        if attn is None:
            continue
        remove_captures(attn)
        attn._modules.pop(GATE_ATTR, None)


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
        set_trainable(gate, parts)
    return gate_parameters(model)


@contextlib.contextmanager
def record_gates(model: nn.Module):
    """Record every patched layer's gates during the forward passes in the block.

    Yields a dict filled as ``{layer index: {"lambda": [B, Hq, Q], "pi": [B, Hkv, K]}}``
    (float32, detached; the last forward pass wins). While recording, the
    identity shortcut is off so the gates are always computed.

    Examples:
        >>> with gape.hf.record_gates(model) as rec:
        ...     model(**batch)
        >>> rec[0]["lambda"].shape
    """
    gates = iter_gates(model)
    out: dict = {}
    for _, g in gates:
        layer_state(g).record = out
    try:
        yield out
    finally:
        for _, g in gates:
            layer_state(g).record = None
