"""The ``"gape"`` attention implementation: its registration with transformers'
``AttentionInterface`` / ``AttentionMaskInterface``, the attention function, the
gates of one call (:func:`layer_gates`), the backend lookup and the mask helpers
(bool / additive masks, packed sequences, sliding windows)."""

from __future__ import annotations

import functools
import inspect
import math

import torch
from torch import nn

from gape.core import api
from gape.kernels import attention_cpu

from . import compat
from .gates import PaperGate
from ._names import ALIBI_ATTR, GATE_ATTR, IMPLEMENTATION, check_gate_missing
from .decode import _cache_layer_types, _key_gate_at_decode, layer_state, paper_gates

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
        if compiling and fn.name == "torch" and not (device.type == "cpu" and attention_cpu.compiled_kernel_ready()):
            # The torch backend's tiles write into preallocated buffers, which inductor
            # cannot lower; without the C++ kernel (whose ops have fake implementations)
            # the reference formulation (plain tensor ops, scores materialised) traces.
            fn = api.Selection("reference", api._load("reference"))
        _BACKEND_FNS[key] = fn
    return fn


def _probe(device, dtype, *shape):
    return torch.empty(shape, device=device, dtype=dtype)


@functools.lru_cache(maxsize=64)
def _varlen_fn(backend: str, device: torch.device, dtype: torch.dtype, distance: str, d: int = 1, dv: int = 1,
               sinks: bool = False, softcap: bool = False):
    """The packed-sequence entry point of the backend that serves these logit terms (the
    call passes their values), or None (the mask path then runs)."""
    q, v = _probe(device, dtype, 1, 1, d), _probe(device, dtype, 1, 1, dv)
    terms = dict(sinks=_probe(device, torch.float32, 1) if sinks else None, softcap=1.0 if softcap else None)
    try:
        return api.select(backend, q, q, v, distance=distance, varlen=True, **terms)
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
            sequences, run as varlen), ``is_causal``, ``output_attentions``,
            ``s_aux``/``sinks`` (learned sinks, ``[Hq]``) and ``softcap`` (see
            :func:`gape.attention`; sent to a backend that implements them); and
            the bookkeeping keywords transformers hands every layer
            (:data:`PASSIVE_KWARGS`). Any other keyword is refused
            (:func:`_check_kwargs`): a term of the attention this function does
            not know would otherwise be dropped silently.

    Returns:
        ``([B, Q, Hq, D]`` contiguous, ``None)``, or with ``output_attentions=True``
        the attention probabilities ``[B, Hq, Q, K]`` instead of ``None``
        (recomputed by the reference path, see :mod:`gape.hf.compat`).
    """
    _check_kwargs(module, kwargs)
    gate = compat.active_gate(module._modules.get(GATE_ATTR))
    want_probs = _wants_probs(module, kwargs)
    terms = _logit_terms(kwargs)
    if gate is None and ALIBI_ATTR not in module._modules:
        check_gate_missing(module)
        attention_mask = _plain_packed_mask(module, query, key, attention_mask, kwargs)
        if terms:
            return _without_gates(module, query, key, value, attention_mask, dropout, scaling, kwargs, terms, "auto",
                                  want_probs)
        out, _ = _sdpa_forward()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        if want_probs:
            return compat.attention_with_probs(None, query, key, out, attention_mask, scaling, "log")
        return out, None
    if dropout:
        raise ValueError(
            f"GAPE attention does not implement attention dropout (got dropout={dropout}); "
            "set config.attention_dropout = 0 or call model.eval()"
        )
    # gape.hf.attention_probe computes the gates first and hands them over (the paper's
    # form consumes what its hooks captured, so it cannot compute them twice).
    gates = kwargs.pop("gape_gates", None) if "gape_gates" in kwargs else layer_gates(module, query, key)
    if gates is None:  # a packed row stays packed without the bias, as on the gated path
        attention_mask = _plain_packed_mask(module, query, key, attention_mask, kwargs)
    if gates is None and terms:  # identity gates and a term SDPA lacks: GAPE's kernels at lambda = 0
        return _without_gates(module, query, key, value, attention_mask, dropout, scaling, kwargs, terms,
                              gate.config.backend, want_probs)
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
    state = layer_state(holder)
    offset = state.query_offset
    state.query_offset = None
    packed = _packed_sequences(query, key, mask, kwargs, window, is_causal) if offset is None else None
    if packed is not None:
        varlen = _varlen_fn(backend, query.device, query.dtype, distance, query.shape[-1], value.shape[-1],
                            "sinks" in terms, "softcap" in terms)
        if varlen is not None:
            out = varlen(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), lam[0].t(),
                         pi[0].t(), *packed, is_causal, scale, distance, window, **terms)
            out = _poison(out.unsqueeze(0), lam, pi).contiguous()
            if want_probs:
                return out, compat.gape_probs(query, key, lam, pi, mask, is_causal, scale, distance, None, window,
                                              packed=packed)
            return out, None
        # No packed entry point serves this call: the mask path, told where the sequences are
        # (the mask given may be none, or one band over the whole row).
        mask = _same_sequence_mask(packed[0], packed[1], query.shape[2], key.shape[2],
                                   f"GapeConfig.backend={backend!r} has no packed-sequence entry point",
                                   "use backend 'torch', 'reference' or 'triton'")
    positions = {}
    if offset is not None:
        positions["query_offset"] = offset
    if window is not None:
        positions["window"] = window
        mask = _without_window(mask, query, key, is_causal, offset, window)
    if (mask is None or compiling) and not terms:
        fn = _backend_fn(backend, query.device, query.dtype, distance, compiling, query.shape[-1], value.shape[-1],
                         is_causal)
    elif compiling:
        fn = api.Selection("reference", api._load("reference"))  # traces (see _backend_fn)
        positions.update(terms)
    else:
        # The same selection as gape.attention, with this call's mask: on CUDA a mask
        # the Triton kernel cannot take (not key ranges) falls back to the torch backend.
        try:
            fn = api.select(backend, query, key, value, attn_mask=mask, is_causal=is_causal,
                            distance=distance, **positions, **terms)
        except ValueError as e:
            raise ValueError(f"GapeConfig.backend={backend!r} cannot serve this model: {e}") from None
        positions = {}  # bound into the selection
    out = _poison(fn(query, key, value, lam, pi, mask, is_causal, scale, distance, **positions).transpose(1, 2),
                  lam, pi).contiguous()
    if want_probs:
        return out, compat.gape_probs(query, key, lam, pi, mask, is_causal, scale, distance, offset, window, **terms)
    return out, None


def _logit_terms(kwargs: dict) -> dict:
    """The logit terms of the call GAPE's kernels implement besides the bias, as
    :func:`gape.attention` keywords: learned sinks (``s_aux``: gpt-oss; ``sinks``) and
    the soft-cap (``softcap``: Gemma 2)."""
    terms = {}
    sinks = kwargs.get("s_aux")
    if sinks is None:
        sinks = kwargs.get("sinks")
    if sinks is not None:
        terms["sinks"] = sinks
    if kwargs.get("softcap") is not None:
        terms["softcap"] = float(kwargs["softcap"])
    return terms


def _without_gates(module, query, key, value, attention_mask, dropout, scaling, kwargs, terms, backend, want_probs):
    """A layer without gates (or with identity gates) whose attention has sinks or a soft-cap,
    which transformers' SDPA function would drop: GAPE's backends at lambda = 0 (the bias is
    then exactly 0). The mask carries the causal rule, any window and a static cache's slots,
    so no positions are passed."""
    if dropout:
        raise ValueError(
            f"GAPE attention does not implement attention dropout (got dropout={dropout}); "
            "set config.attention_dropout = 0 or call model.eval()"
        )
    b, hq, lq, _ = query.shape
    lam = query.new_zeros((b, hq, lq), dtype=torch.float32)
    pi = key.new_zeros((b, key.shape[1], key.shape[2]), dtype=torch.float32)
    mask = _bool_mask(attention_mask)
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = bool(getattr(module, "is_causal", True))
    scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    if torch.compiler.is_compiling():
        fn = api.Selection("reference", api._load("reference"))
        out = fn(query, key, value, lam, pi, mask, is_causal, scale, "log", **terms)
    else:
        try:
            fn = api.select(backend, query, key, value, attn_mask=mask, is_causal=is_causal, distance="log", **terms)
        except ValueError as e:
            raise ValueError(f"GapeConfig.backend={backend!r} cannot serve this model: {e}") from None
        out = fn(query, key, value, lam, pi, mask, is_causal, scale, "log")
    out = out.transpose(1, 2).contiguous()
    if want_probs:
        return out, compat.gape_probs(query, key, lam, pi, mask, is_causal, scale, "log", **terms)
    return out, None


# Keywords the attention function reads (the rest of its contract).
HONOURED_KWARGS = frozenset({
    "sliding_window", "is_causal", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "position_ids",
    "output_attentions", "gape_gates", "softcap", "s_aux", "sinks",
})
# Keywords transformers passes attention calls that carry no term of the attention itself:
# loss, cache and output bookkeeping (the cache reaches the function as key/value), and
# seq_idx (the packed layout's sequence index, which the mask or position_ids express).
PASSIVE_KWARGS = frozenset({
    "num_items_in_batch", "output_hidden_states", "output_router_logits", "seq_idx", "use_cache", "cache_position",
    "return_dict",
})


def _check_kwargs(module: nn.Module, kwargs: dict) -> None:
    """Refuse any keyword the attention function would otherwise drop: a model that hands
    its attention a new term (learned sinks, a soft-cap, a position bias) must not run
    without it."""
    unknown = [k for k in kwargs if k not in HONOURED_KWARGS and k not in PASSIVE_KWARGS]
    if unknown:
        raise ValueError(
            f"GAPE attention got keyword argument(s) {', '.join(repr(k) for k in sorted(unknown))} from "
            f"{type(module).__name__}, which it does not implement; running without them would change the model. "
            f"It takes {', '.join(sorted(HONOURED_KWARGS - {'gape_gates'}))} (plus transformers' bookkeeping "
            f"keywords {', '.join(sorted(PASSIVE_KWARGS))}); unpatch the model (gape.unpatch) to run it as it is"
        )


def _wants_probs(module: nn.Module, kwargs: dict) -> bool:
    """Whether this call must return the attention probabilities: the ``output_attentions``
    keyword when given, else what transformers' output capture collects for this forward
    (it reads ``config.output_attentions`` when the keyword is absent), else the config."""
    flag = kwargs.get("output_attentions")
    if flag is not None:
        return bool(flag)
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # a transformers without output capture: its config decides
        _active_collector = None
    if _active_collector is not None:
        collected = _active_collector.get()  # compile-safe (a global while dynamo traces)
        if collected is not None:
            return "attentions" in collected
    return bool(getattr(getattr(module, "config", None), "output_attentions", False))


def _poison(out: torch.Tensor, lam: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
    """``out [B, Q, Hq, Dv]`` with NaN in the rows whose gates are not finite.

    This path skips the API's gate range check (a host sync per layer), and a
    kernel may treat a row whose logits are all NaN as a row without keys
    (zeros): a NaN lambda (a NaN gate parameter) must give NaN, never a finite
    output. ``0 * x`` is 0 for finite ``x`` and NaN otherwise: no sync, and
    nothing changes for finite gates."""
    b, q, hq, _ = out.shape
    rows = lam.float().mul(0.0)  # [B, Hq, Q]
    heads = pi.float().mul(0.0).sum(-1)  # [B, Hkv]: a non-finite pi reaches every query head of its group
    heads = heads.repeat_interleave(hq // heads.shape[1], dim=1)
    dirty = rows + heads[:, :, None]
    return out + dirty.transpose(1, 2)[..., None].to(out.dtype)


def layer_gates(module: nn.Module, query: torch.Tensor, key: torch.Tensor):
    """``(lambda [B, Hq, Q], pi [B, Hkv, K], distance, backend)`` of one attention call
    (post-RoPE ``query``/``key``, cache included), or None when the layer runs plain
    SDPA (no gates and no ALiBi, or identity gates under the identity shortcut)."""
    gate = compat.active_gate(module._modules.get(GATE_ATTR))  # a PEFT modules_to_save copy when active
    alibi = module._modules.get(ALIBI_ATTR)
    if gate is None and alibi is None:
        return None
    if gate is None:
        # ALiBi alone: lambda = the head's slope, pi = 0, linear distance (docs/maths.md).
        pi = key.new_zeros((key.shape[0], key.shape[1], key.shape[2]), dtype=torch.float32)
        return alibi.query_gate(query), pi, "linear", alibi.backend
    config = gate.config
    need_grad = gate.needs_grad()
    state = layer_state(gate)
    record = state.record
    if isinstance(gate, PaperGate):
        lam, pi = paper_gates(gate, query, key)
    else:
        compiling = torch.compiler.is_compiling()
        # is_identity reads the gate values on the host: not while torch.compile traces
        # (the GAPE kernel at lambda = 0 is the identity too, to kernel precision).
        if (config.identity_shortcut and record is None and not need_grad and alibi is None and not compiling
                and gate.is_identity()):
            state.prev_keys = None
            return None
        if gate.post_rope_norm is not None:
            # a norm after RoPE scales each channel: divided out, the pairs are rotated ones again
            q_norm, k_norm = (module._modules[name].weight for name in gate.post_rope_norm)
            query, key = query / q_norm.to(query.dtype), key / k_norm.to(key.dtype)
        lam = gate.query_gate(query)
        # The decode memo keeps Python state across steps, which torch.compile would guard
        # on (a recompile per step); compiled, pi comes from all keys (O(Lk) like attention).
        pi = gate.key_gate(key) if need_grad or compiling else _key_gate_at_decode(gate, key, query.shape[2])
        state.prev_keys = None
    if alibi is not None:
        if config.distance != "linear":
            raise ValueError(f"ALiBi needs GapeConfig.distance='linear' in the patched layers, got {config.distance!r}")
        # The slope adds to the forgetting rate; the key gate protects from both (gape.hf.positional).
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


def _packed_sequences(query, key, mask, kwargs, window, is_causal):
    """``(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)`` when one row holds packed
    sequences, else None.

    From the flash-attention kwargs transformers forwards (``DataCollatorWithFlattening``
    with ``return_flash_attn_kwargs=True``), or from ``position_ids`` that restart, when the
    mask is the block-diagonal one transformers builds from them, or says nothing beyond
    the causal rule and the layer's window (no mask, or one band over the whole row: what a
    sliding layer gets when the model does not hand transformers the position ids, as
    gpt-oss does not). So full and sliding layers pack alike, each sliding layer's window
    inside each sequence. A padding mask given with them means transformers did not pack,
    and neither do we.
    """
    if query.shape[0] != 1 or query.shape[2] != key.shape[2] or query.shape[2] < 2:
        return None
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    compiling = torch.compiler.is_compiling()
    if cu_q is not None and cu_k is not None:
        cu_q, cu_k = cu_q.to(torch.int32), cu_k.to(torch.int32)
        if compiling:
            # No data-dependent int() while tracing: the lengths come from the collator's
            # Python ints, and the totals are checked by a compiled assert.
            max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
            if not all(isinstance(m, int) and not isinstance(m, bool) for m in (max_q, max_k)):
                raise ValueError(
                    "packed sequences under torch.compile need max_length_q and max_length_k as Python ints "
                    f"beside cu_seq_lens_q/k (got {type(max_q).__name__} and {type(max_k).__name__}); "
                    "DataCollatorWithFlattening(return_flash_attn_kwargs=True) passes them"
                )
            torch._assert_async((cu_q[-1] == query.shape[2]) & (cu_k[-1] == key.shape[2]),
                                "cu_seq_lens_q/k must end at the row's query/key count under torch.compile")
            return cu_q, cu_k, max_q, max_k
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
    if compiling:
        # Finding the sequences needs their count on the host. Compiled, transformers does
        # not build the block-diagonal mask either, so attending over the whole row would
        # mix sequences: restarting position ids are refused by a compiled assert (no sync).
        torch._assert_async((pos[1:] - pos[:-1] == 1).all(),
                            "GAPE under torch.compile: position_ids restart inside a row (packed sequences); "
                            "pass cu_seq_lens_q/k and max_length_q/k (DataCollatorWithFlattening("
                            "return_flash_attn_kwargs=True)) or run the packed batch eagerly")
        return None
    starts = torch.nonzero(pos[1:] - pos[:-1] != 1).flatten() + 1
    if starts.numel() == 0:
        return None  # one sequence: the dense path
    t = query.shape[2]
    cu = torch.cat([starts.new_zeros(1), starts, starts.new_full((1,), t)]).to(torch.int32)
    if (mask is not None and not _is_block_diagonal(mask, cu, window)
            and _without_window(mask, query, key, is_causal, None, window) is not None):
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


def _same_sequence_mask(cu_q, cu_k, lq, lk, path, fix):
    """Bool ``[1, 1, Lq, Lk]``: query row and key in the same packed sequence. The causal
    rule and any window then apply within each sequence, as long as each sequence holds as
    many query rows as keys (``cu_q == cu_k``); a mask path cannot align other sequences,
    so they are refused (``path`` says which path, ``fix`` what to do). Tensor ops only,
    so it traces."""
    message = (f"{path}, and its mask path needs cu_seq_lens_q == cu_seq_lens_k (as many query rows as keys "
               f"per sequence) for packed sequences; {fix}")
    if cu_q.shape != cu_k.shape:
        raise ValueError(message)
    if torch.compiler.is_compiling():
        torch._assert_async((cu_q == cu_k).all(), message)
    elif not bool((cu_q == cu_k).all()):
        raise ValueError(message)
    seq_q = torch.searchsorted(cu_q[1:].contiguous(), torch.arange(lq, device=cu_q.device, dtype=cu_q.dtype),
                               right=True)
    seq_k = torch.searchsorted(cu_k[1:].contiguous(), torch.arange(lk, device=cu_k.device, dtype=cu_k.dtype),
                               right=True)
    return (seq_q[:, None] == seq_k[None, :])[None, None]


def _plain_packed_mask(module, query, key, attention_mask, kwargs):
    """The mask of a layer run without GAPE's bias (no gates, or identity gates under the
    identity shortcut): when the row holds packed sequences (:func:`_packed_sequences`),
    the bool mask keeping each to itself with the causal rule and the layer's window, so
    these layers pack exactly as the gated ones do; else ``attention_mask`` unchanged."""
    holder = module._modules.get(GATE_ATTR)
    if holder is None:
        holder = module._modules.get(ALIBI_ATTR)
    if holder is not None and layer_state(holder).query_offset is not None:
        return attention_mask  # a static cache's slots: never packed (as on the gated path)
    sliding = kwargs.get("sliding_window")
    window = (int(sliding) - 1, -1) if sliding else None
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = bool(getattr(module, "is_causal", True))
    packed = _packed_sequences(query, key, _bool_mask(attention_mask), kwargs, window, is_causal)
    if packed is None:
        return attention_mask
    from gape.core.reference import allowed_mask

    lq, lk = query.shape[2], key.shape[2]
    same = _same_sequence_mask(packed[0], packed[1], lq, lk, "a layer without GAPE's bias runs plain attention",
                               "pass equal cu_seq_lens_q and cu_seq_lens_k for one packed row")
    # lq == lk here, so the causal rule and the window read the same under either alignment
    return allowed_mask(lq, lk, is_causal, same.to(query.device), query.device, None, window)


def _without_window(mask, query, key, is_causal, offset, window):
    """The mask minus what the causal rule and the window (None: none) say: None when
    nothing else remains (the kernels then read no mask), else the mask."""
    if mask is None or torch.compiler.is_compiling():
        return mask
    from ..kernels.key_ranges import analyse_mask

    got = analyse_mask(mask, query.shape[2], key.shape[2], is_causal, offset, window)
    if isinstance(got, str) or not (bool((got.start == 0).all()) and bool((got.end == key.shape[2]).all())):
        return mask
    return None
