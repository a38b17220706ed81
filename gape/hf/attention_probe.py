"""Read attention probabilities (and GAPE gate values) out of a transformers model.

Fast attention backends never materialise the probabilities, so the probe
swaps in an attention implementation that receives the same post-RoPE
``query``/``key`` the real one gets, recomputes the probability rows asked
for (GAPE bias included when the layer carries a ``gape_gate``), and then
delegates to the implementation the model was using. Works for unpatched
(sdpa/eager) and GAPE-patched models alike.
"""

from __future__ import annotations

import contextlib
import math

import torch

from ._names import GATE_ATTR
from .attention import register_implementation
from gape.core.reference import gape_bias, signed_distance

PROBE = "gape_probe"

# The active capture: the implementation to delegate to, the rows to keep and the sink.
_ACTIVE: list[dict] = []


def attention_rows(query, key, attention_mask, scale, gate=None, rows=None, distance="log", gates=None):
    """Attention probabilities ``[B, Hq, R, K]`` (float32) of query rows ``rows``.

    ``query [B, Hq, Q, D]`` and ``key [B, Hkv, K, D]`` are post-RoPE; rows sit at
    cache slots ``K - Q + row``. ``gate`` is a :class:`gape.hf.gates.GapeGate` or None
    (plain RoPE); or ``gates = (lambda [B, Hq, Q], pi [B, Hkv, K])`` already computed
    (any gate form, ALiBi). Also returns ``(lambda [B, Hq, R], pi [B, Hkv, K])`` or
    ``(None, None)``.
    """
    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    rep = hq // hkv
    idx = torch.arange(lq, device=query.device) if rows is None else torch.as_tensor(rows, device=query.device).reshape(-1)
    q = query[:, :, idx].float()
    k = key.float().repeat_interleave(rep, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    allowed = (signed_distance(lq, lk, query.device, rows=idx) >= 0)[None, None]
    lam = pi = None
    if gate is not None and gates is None:
        gates = (gate.query_gate(query), gate.key_gate(key))
    if gates is not None:
        lam = gates[0][:, :, idx].float()
        pi = gates[1].float()
        scores = scores + gape_bias(lam, pi.repeat_interleave(rep, dim=1), lq, lk, True, distance, rows=idx)
    if attention_mask is not None:
        m = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        allowed = allowed & m[:, :, idx]
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return probs, (lam, pi)


def _probe_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from ._names import IMPLEMENTATION
    from .attention import gape_attention_forward, layer_gates

    from gape.hf.attention import _logit_terms

    terms = _logit_terms(kwargs)
    if terms:  # the recomputed maps below have no sink column and no cap: refused, not wrong
        raise ValueError(
            f"capture_attention does not recompute attention with {' and '.join(terms)} (this model's attention "
            "has them); use model(..., output_attentions=True), whose maps include them"
        )
    state = _ACTIVE[-1]
    gate = module._modules.get(GATE_ATTR)
    scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    # computed once, here, and handed to GAPE's attention below (the paper's gate form
    # and ALiBi included); None: the layer runs plain SDPA
    gates = layer_gates(module, query, key) if state["original"] == IMPLEMENTATION else None
    with torch.no_grad():
        rows = state["rows"]
        if callable(rows):
            rows = rows(query.shape[2])
        probs, (lam, pi) = attention_rows(
            query, key, attention_mask, scale, None, rows, gates[2] if gates else "log",
            gates=None if gates is None else (gates[0].detach(), gates[1].detach()),
        )
    entry = {"probs": probs}
    if state.get("keys"):
        from .gates import pair_features

        layout = gate.layout if gate is not None else "half"
        entry["key_features"] = pair_features(key.detach(), layout, getattr(gate, "rotary_dim", None),
                                              getattr(gate, "rotary_last", False))
    if lam is not None:
        entry["lambda"], entry["pi"] = lam, pi
    layer = getattr(module, "layer_idx", len(state["out"]))
    state["out"][layer] = entry if state["reduce"] is None else state["reduce"](layer, entry)
    original = state["original"]
    if original == IMPLEMENTATION:
        return gape_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      gape_gates=gates, **kwargs)
    if original == "eager" or original not in ALL_ATTENTION_FUNCTIONS:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward as fn
    else:
        fn = ALL_ATTENTION_FUNCTIONS[original]
    return fn(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


@contextlib.contextmanager
def capture_attention(model, rows=None, keys=False, reduce=None):
    """Record attention probabilities of every layer during the forward passes in the block.

    Args:
        model: a transformers model (patched with GAPE or not).
        rows: query rows to keep: None (all), an int/list, or a callable ``Q -> rows``.
        keys: also keep the rotation-invariant key features ``[B, Hkv, K, D/2]``
            (:func:`gape.hf.gates.pair_features`) as ``"key_features"``.
        reduce: ``(layer_idx, entry) -> value`` kept instead of the entry, called as each layer
            runs: one layer's rows are alive at a time (a long prompt's rows of every layer
            need not fit in memory at once).

    Yields ``{layer_idx: {"probs": [B, Hq, R, K], "lambda": [B, Hq, R], "pi": [B, Hkv, K]}}``
    (gates only for GAPE layers; the last forward pass wins).
    """
    register_implementation(PROBE, _probe_forward)
    original = model.config._attn_implementation
    out: dict = {}
    _ACTIVE.append({"rows": rows, "out": out, "original": original, "keys": keys, "reduce": reduce})
    model.set_attn_implementation(PROBE)
    try:
        yield out
    finally:
        _ACTIVE.pop()
        model.set_attn_implementation(original)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats over the last axis (0 log 0 = 0)."""
    p = probs.float()
    return -(p * torch.log(p.clamp_min(1e-30))).sum(-1)
