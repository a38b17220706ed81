"""Run a transformers model with its sequence split across a process group.

``with context_parallel(model, group, layout="zigzag"):`` switches the model
to the attention implementation ``"gape_context_parallel"`` (registered with
transformers' ``AttentionInterface``; its mask function builds no mask,
because the causal rule follows from global positions) and back on exit.
Inside, every rank calls the model on its shard of the sequence, with the
matching shard of ``position_ids`` (RoPE and GAPE's distances are global);
a forward pre-hook checks that the ``position_ids`` are this rank's shard of
``0 .. L - 1`` in ``layout``, and every other reason to refuse, and agrees on
the outcome on all ranks before any rank enters the ring.

Each attention layer's GAPE gates (``gape.patch``) are computed on the local
shard; the key gate travels around the ring with the keys. A layer without a
gate (an unpatched model, or layers left out by ``GapeConfig.layers``) runs
the same ring with zero gates, which is plain causal attention.

Not supported under context parallelism: padding masks (pass unpadded
sequences, ``attention_mask=None``), a KV cache / generation, packed sequences
in one row, attention dropout.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math

import torch
import torch.distributed as dist

from .attention import _context_parallel_attention, agree, as_timeout
from .layout import _group_rank_size, check_layout, global_positions, local_length_error

logger = logging.getLogger("gape")

IMPLEMENTATION = "gape_context_parallel"
_STATE_ATTR = "_gape_context_parallel"


@functools.cache
def _register() -> None:
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, context_parallel_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, _no_mask)


def _no_mask(batch_size=None, q_length=None, kv_length=None, q_offset=0, kv_offset=0, mask_function=None,
             attention_mask=None, **kwargs):
    """The mask function of ``"gape_context_parallel"``: the ring applies the causal
    rule from global positions, so no mask is built. A padding mask is handed on
    unchanged, and the attention layers refuse it through the all-ranks agreement
    (raising here, on the ranks that have padding only, would leave the others
    waiting in the ring)."""
    if attention_mask is not None and not bool(attention_mask.all()):
        return attention_mask
    return None


_PADDING = (
    "context parallelism does not support padding: pass attention_mask=None (or all ones) "
    "with unpadded sequences of a length divisible by 2 x world size"
)


def _layer_refusal(module, query, key, attention_mask, dropout) -> str | None:
    """Why this rank cannot run this attention layer context-parallel (None when it can)."""
    if attention_mask is not None:
        return _PADDING
    if dropout:
        return (f"context-parallel attention does not implement attention dropout (got {dropout}); "
                "call model.eval() or set attention_dropout=0")
    if key.shape[2] != query.shape[2]:
        return (
            f"context parallelism runs self-attention over the shard (no KV cache): got {query.shape[2]} queries "
            f"and {key.shape[2]} keys; pass use_cache=False and do not generate under context_parallel"
        )
    return None


def context_parallel_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The ``"gape_context_parallel"`` attention implementation (transformers AttentionInterface contract).

    Every reason to refuse (padding, dropout, a KV cache, a gate that cannot be
    computed) is a field of the all-ranks agreement that
    :func:`~gape.distributed.context_parallel_attention` runs before the ring,
    so it raises the same ValueError on every rank.
    """
    from ..hf import GATE_ATTR

    state = module.__dict__.get(_STATE_ATTR)
    if state is None:
        raise RuntimeError(
            f"attn_implementation={IMPLEMENTATION!r} is set by gape.distributed.context_parallel(model, ...); "
            "use that context manager instead of selecting it by hand"
        )
    group, layout, timeout = state
    refusal = _layer_refusal(module, query, key, attention_mask, dropout)
    gate = module._modules.get(GATE_ATTR)
    b, hq, n, d = query.shape
    distance, backend = "log", "auto"
    lam = query.new_zeros((b, hq, n), dtype=torch.float32)
    pi = key.new_zeros((b, key.shape[1], key.shape[2]), dtype=torch.float32)
    if gate is not None:
        distance, backend = gate.config.distance, gate.config.backend
        if refusal is None:
            try:
                lam, pi = gate.query_gate(query), gate.key_gate(key)
            except (TypeError, ValueError, RuntimeError) as exc:
                refusal = f"the GAPE gate failed on this rank: {type(exc).__name__}: {exc}"
    if refusal is not None:
        # the agreement reports the refusal itself, not a shape error the refusal explains
        key = value = query
        lam = pi = query.new_zeros((b, hq, n), dtype=torch.float32)
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = bool(getattr(module, "is_causal", True))
    scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(d)
    out = _context_parallel_attention(
        query, key, value, lam, pi, group=group, is_causal=is_causal, scale=scale, distance=distance,
        layout=layout, backend=backend, timeout=timeout, refusal=refusal,
    )
    return out.transpose(1, 2).contiguous(), None


# The fields of the model-level agreement: every rank must call the model the same way.
_CALL_FIELDS = ("batch size", "local length", "grad enabled", "training mode")


def _call_refusal(model, layout, rank, world, bound) -> tuple[str | None, tuple]:
    """(why this rank's model call cannot run context-parallel or None, the agreed fields)."""
    pos = bound.get("position_ids")
    ids = bound.get("input_ids")
    if ids is None:
        ids = bound.get("inputs_embeds")
    local = pos.shape[-1] if pos is not None else -1
    values = (-1 if ids is None else int(ids.shape[0]), local, int(torch.is_grad_enabled()), int(model.training))
    if pos is None:
        return (
            "position_ids is required under context_parallel: pass position_ids=gape.distributed.shard("
            f"torch.arange(L)[None], 1, group, layout={layout!r}) with the shard of the input"
        ), values
    ok_length = local_length_error(layout, local) is None
    want = global_positions(layout, world, rank, local, device=pos.device) if ok_length else None
    if want is None or not bool((pos == want).all()):
        shown = pos.reshape(-1, local)[0, :6].tolist()
        expect = want[:6].tolist() if want is not None else f"none: {local_length_error(layout, local)}"
        return (
            f"position_ids on rank {rank} are not this rank's {layout!r} shard of a {world}-rank group "
            f"(first positions {shown}, expected {expect}); cut input_ids and position_ids with "
            f"gape.distributed.shard(x, 1, group, layout={layout!r})"
        ), values
    if ids is not None and ids.shape[1] != local:
        return f"position_ids hold {local} positions but the input holds {ids.shape[1]}", values
    mask = bound.get("attention_mask")
    if mask is not None and (not isinstance(mask, torch.Tensor) or not bool(mask.all())):
        return _PADDING, values
    extra = bound.get("kwargs") if isinstance(bound.get("kwargs"), dict) else {}
    if any(x is not None for x in (bound.get("cache"), bound.get("past_key_values"), extra.get("past_key_values"),
                                    extra.get("cache"))):
        return ("context parallelism runs without a KV cache: pass past_key_values=None "
                "(generation under context_parallel is not supported)"), values
    if bound.get("labels") is not None or extra.get("labels") is not None:
        return ("labels=... makes the model shift the labels inside this rank's shard, which is wrong "
                "for a sharded sequence: call the model without labels and use "
                "gape.distributed.causal_lm_loss(logits, shard(shift_labels(full_ids), 1))"), values
    dropout = float(getattr(model.config, "attention_dropout", 0.0) or 0.0)
    if model.training and dropout:
        return (f"context-parallel attention does not implement attention dropout (attention_dropout={dropout}); "
                "call model.eval() or set attention_dropout=0"), values
    return None, values


def _check_call(group, layout, timeout, model, args, kwargs):
    """Forward pre-hook: every model-level reason to refuse (positions, padding, a
    cache, labels, dropout) and the call's shape are agreed on all ranks at once,
    before any rank reaches the ring, so a refusal is the same ValueError
    everywhere and never a hang."""
    rank, world = _group_rank_size(group)
    try:
        bound = inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments
    except TypeError:
        bound = kwargs
    try:
        error, values = _call_refusal(model, layout, rank, world, bound)
    except Exception as exc:  # noqa: BLE001 - any failure of the checks is this rank's refusal
        error, values = f"{type(exc).__name__}: {exc}", (0,) * len(_CALL_FIELDS)
    pos = bound.get("position_ids")
    device = pos.device if pos is not None and dist.get_backend(group) == "nccl" else torch.device("cpu")
    agree(group, device, error, values, fields=_CALL_FIELDS, what="context_parallel",
          timeout=timeout)
    kwargs = dict(kwargs)
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False
    return args, kwargs


@contextlib.contextmanager
def context_parallel(model, group=None, layout: str = "zigzag", timeout=None):
    """Run ``model`` (a Llama-style transformers model, GAPE-patched or not) with
    its sequence split across ``group``.

    Every rank enters the context with the same model and calls it on its
    shard, passing the shard of ``position_ids``::

        with gape.distributed.context_parallel(model, layout="zigzag"):
            ids = shard(full_ids, 1)                                   # [B, L / W]
            pos = shard(torch.arange(full_ids.shape[1])[None], 1)
            logits = model(input_ids=ids, position_ids=pos).logits       # this rank's rows
            loss = causal_lm_loss(logits, shard(shifted_labels, 1))
            loss.backward()
            all_reduce_grads(model)                                      # each rank saw a part of the sequence

    On exit the previous attention implementation is restored.

    Before any rank enters the ring, the ranks agree in one all-gather on the
    call (batch size, local length, grad mode, train mode) and on every reason
    to refuse it (position_ids that are not this rank's shard, padding, a KV
    cache, ``labels``, attention dropout); each attention layer agrees again on
    its shapes, gates and settings. A refusal on any rank is the same
    ValueError on every rank. ``timeout`` (seconds or a ``timedelta``, default
    10 minutes) bounds every wait for a peer: a rank that died is a
    RuntimeError on the others, not a hang.
    """
    from ..hf import _find_layers, attention_layers
    from ..patches.registry import get_spec

    check_layout(layout)
    _group_rank_size(group)
    timeout = as_timeout(timeout)
    spec = get_spec(getattr(model.config, "model_type", None))
    layers = _find_layers(model, spec)
    attns = [getattr(layers[i], spec.attention) for i in attention_layers(model, spec, layers)]
    if any(_STATE_ATTR in a.__dict__ for a in attns):
        raise ValueError("model is already inside gape.distributed.context_parallel")
    _register()
    original = model.config._attn_implementation
    handle = model.register_forward_pre_hook(functools.partial(_check_call, group, layout, timeout), with_kwargs=True)
    for a in attns:
        a.__dict__[_STATE_ATTR] = (group, layout, timeout)
    try:
        model.set_attn_implementation(IMPLEMENTATION)
        logger.info("gape: %s runs context-parallel (layout %s, %d ranks)", type(model).__name__, layout,
                    dist.get_world_size(group))
        yield model
    finally:
        handle.remove()
        for a in attns:
            a.__dict__.pop(_STATE_ATTR, None)
        model.set_attn_implementation(original)


def shift_labels(input_ids: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token labels of the *full* sequence (shift before sharding: the label of a
    shard's last token is the first token of another rank's shard)."""
    labels = torch.full_like(input_ids, ignore_index)
    labels[:, :-1] = input_ids[:, 1:]
    return labels


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, group=None, ignore_index: int = -100) -> torch.Tensor:
    """This rank's share of the mean next-token loss over the whole sequence.

    ``labels`` is this rank's shard of :func:`shift_labels`. The losses of all
    ranks add up to the single-process mean (the token count is all-reduced),
    so after ``backward`` the summed gradients (:func:`all_reduce_grads`) are
    the single-process ones.
    """
    total = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=ignore_index, reduction="sum"
    )
    count = (labels != ignore_index).sum().to(torch.float64)
    dist.all_reduce(count, group=group)
    return total / count.to(total.dtype).clamp_min(1)


def all_reduce_grads(model: torch.nn.Module, group=None) -> None:
    """Sum every parameter gradient over ``group`` (each rank saw a part of the sequence).
    Parameters are visited in a fixed order, so every rank reduces the same tensors."""
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)
