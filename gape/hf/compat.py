"""Where GAPE meets the rest of the transformers ecosystem: PEFT wrappers,
``output_attentions`` and a switched-away attention implementation.

- PEFT: ``get_peft_model`` wraps the model (``PeftModel`` -> ``LoraModel`` ->
  the transformers model) and, with ``modules_to_save=["gape_gate"]``, each
  gate (``ModulesToSaveWrapper`` holding the original and one trainable copy
  per adapter). :func:`unwrap` and :func:`active_gate` see through both, so
  ``gape.patch``, ``save_gates``, ``load_gates`` and the attention function
  act on the transformers model and on the gate of the active adapter.
- ``output_attentions=True``: the fast backends never form the attention
  probabilities, so :func:`attention_with_probs` recomputes them in float32
  through the reference path (:func:`gape.hf.attention_probe.attention_rows`,
  GAPE bias included), only when asked.
- ``model.set_attn_implementation("eager")`` on a patched model leaves the
  gates attached but unused; :func:`warn_if_bypassed` (a forward pre-hook on
  each gated layer) says so once per model instead of letting GAPE vanish.
"""

from __future__ import annotations

import logging

from torch import nn

logger = logging.getLogger("gape")

# attention implementations that run the gates (the probe recomputes them itself)
_GATED_IMPLEMENTATIONS = ("gape", "gape_probe")
# ids of the model configs already warned about (a config is unhashable, and an
# attribute on it would end up in config.json)
_WARNED: set[int] = set()


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT ``PeftModel`` (or the model itself)."""
    seen = 0
    while type(model).__module__.startswith("peft.") and hasattr(model, "get_base_model") and seen < 4:
        model = model.get_base_model()
        seen += 1
    # LoraModel and the other tuners keep the transformers model in .model
    while type(model).__module__.startswith("peft.") and isinstance(getattr(model, "model", None), nn.Module) and seen < 8:
        model = model.model
        seen += 1
    return model


def active_gate(obj):
    """The :class:`~gape.hf.gates.GapeGate` in use: the gate itself, or for a PEFT
    ``ModulesToSaveWrapper`` the copy of the active adapter (the original when
    adapters are disabled)."""
    original = getattr(obj, "original_module", None) if obj is not None else None
    if original is None or not type(obj).__module__.startswith("peft."):
        return obj
    if obj.disable_adapters or not obj.active_adapters:
        return original
    return obj.modules_to_save[obj.active_adapters[0]]


def attention_with_probs(gate, query, key, out, attention_mask, scaling, distance):
    """``(out, probs)`` with ``probs [B, Hq, Q, K]`` in the query dtype, recomputed
    by the reference path (causal, bottom-right aligned; the GAPE bias when
    ``gate`` is a gate, plain RoPE attention when it is None)."""
    import math

    import torch

    from .attention_probe import attention_rows

    scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    with torch.no_grad():
        probs, _ = attention_rows(query, key, attention_mask, scale, gate, None, distance)
    return out, probs.to(query.dtype)


def gape_probs(query, key, lam, pi, mask, is_causal, scale, distance, query_offset=None, window=None, packed=None,
               sinks=None, softcap=None):
    """GAPE's attention probabilities ``[B, Hq, Q, K]`` (query dtype) for the gates
    ``lam [B, Hq, Q]``, ``pi [B, Hkv, K]`` the kernels just used, with the same
    positions (``query_offset``, ``window``; ``packed`` = the varlen
    ``(cu_seqlens_q, cu_seqlens_k, ...)`` of a packed row: no attention across
    sequences; ``sinks``, ``softcap`` as :func:`gape.attention`: the sink's share is
    not a key's, so a row may sum to less than 1). Recomputed in float32 by the
    reference formulas, without gradient."""
    import torch

    from gape.core.reference import allowed_mask, gape_bias

    with torch.no_grad():
        b, hq, lq, _ = query.shape
        hkv, lk = key.shape[1], key.shape[2]
        rep = hq // hkv
        q, k = query.float(), key.float().repeat_interleave(rep, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        scores = scores + gape_bias(lam, pi.repeat_interleave(rep, dim=1), lq, lk, is_causal, distance,
                                    torch.float32, query_offset)
        allowed = allowed_mask(lq, lk, is_causal, mask, query.device, query_offset, window)
        if packed is not None:
            cu_q, cu_k = packed[0].long(), packed[1].long()
            seq_q = torch.bucketize(torch.arange(lq, device=query.device), cu_q[1:], right=True)
            seq_k = torch.bucketize(torch.arange(lk, device=query.device), cu_k[1:], right=True)
            same = seq_q[:, None] == seq_k[None, :]
            allowed = same if allowed is None else allowed & same
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        if sinks is not None:
            sink = sinks.float().reshape(1, hq, 1, 1).expand(b, hq, lq, 1)
            probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :lk]
        else:
            probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return probs.to(query.dtype)


def warn_if_bypassed(module, args, kwargs):
    """Forward pre-hook of a gated layer: warn once when the model no longer
    runs the ``"gape"`` implementation, so the gates are silently unused."""
    config = getattr(module, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl in _GATED_IMPLEMENTATIONS or config is None or id(config) in _WARNED:
        return None
    _WARNED.add(id(config))
    logger.warning(
        "gape: the model is patched with GAPE but runs attn_implementation=%r, so its gates are ignored "
        "(GAPE is off). Call model.set_attn_implementation('gape') to turn it back on, gape.unpatch(model) to remove "
        "it, or use gape.hf.attention_probe.capture_attention / output_attentions=True for attention maps with GAPE",
        impl,
    )
    return None
