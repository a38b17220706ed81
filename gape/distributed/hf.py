"""Run a transformers model with its sequence split across a process group.

``with context_parallel(model, group, layout="zigzag"):`` switches the model
to the attention implementation ``"gape_context_parallel"`` (registered with
transformers' ``AttentionInterface``; its mask function builds no mask,
because the causal rule follows from global positions) and back on exit.
Inside, every rank calls the model on its shard of the sequence, with the
matching shard of ``position_ids`` (RoPE and GAPE's distances are global);
a forward pre-hook checks on every rank that the ``position_ids`` are this
rank's shard of ``0 .. L - 1`` in ``layout`` and refuses otherwise.

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

from .attention import agree, context_parallel_attention
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
    rule from global positions, so no mask is built; a padding mask is refused."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(
            "context parallelism does not support padding: pass attention_mask=None (or all ones) "
            "with unpadded sequences of a length divisible by 2 x world size"
        )
    return None


def context_parallel_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The ``"gape_context_parallel"`` attention implementation (transformers AttentionInterface contract)."""
    from ..hf import GATE_ATTR

    state = module.__dict__.get(_STATE_ATTR)
    if state is None:
        raise RuntimeError(
            f"attn_implementation={IMPLEMENTATION!r} is set by gape.distributed.context_parallel(model, ...); "
            "use that context manager instead of selecting it by hand"
        )
    if dropout:
        raise ValueError(f"context-parallel attention does not implement attention dropout (got {dropout}); call model.eval() or set attention_dropout=0")
    if key.shape[2] != query.shape[2]:
        raise ValueError(
            f"context parallelism runs self-attention over the shard (no KV cache): got {query.shape[2]} queries "
            f"and {key.shape[2]} keys; pass use_cache=False and do not generate under context_parallel"
        )
    group, layout = state
    gate = module._modules.get(GATE_ATTR)
    b, hq, n, d = query.shape
    if gate is None:
        lam = query.new_zeros((b, hq, n), dtype=torch.float32)
        pi = query.new_zeros((b, key.shape[1], n), dtype=torch.float32)
        distance, backend = "log", "auto"
    else:
        lam, pi = gate.query_gate(query), gate.key_gate(key)
        distance, backend = gate.config.distance, gate.config.backend
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = bool(getattr(module, "is_causal", True))
    scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(d)
    out = context_parallel_attention(
        query, key, value, lam, pi, group=group, is_causal=is_causal, scale=scale, distance=distance,
        layout=layout, backend=backend,
    )
    return out.transpose(1, 2).contiguous(), None


def _check_positions(group, layout, model, args, kwargs):
    """Forward pre-hook: ``position_ids`` must be this rank's shard (checked on every rank at once)."""
    rank, world = _group_rank_size(group)
    try:
        bound = inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments
    except TypeError:
        bound = kwargs
    pos = bound.get("position_ids")
    ids = bound.get("input_ids")
    if ids is None:
        ids = bound.get("inputs_embeds")
    error = None
    if pos is None:
        error = (
            "position_ids is required under context_parallel: pass position_ids=gape.distributed.shard("
            f"torch.arange(L)[None], 1, group, layout={layout!r}) with the shard of the input"
        )
    else:
        local = pos.shape[-1]
        ok_length = local_length_error(layout, local) is None
        want = global_positions(layout, world, rank, local, device=pos.device) if ok_length else None
        if want is None or not bool((pos == want).all()):
            shown = pos.reshape(-1, local)[0, :6].tolist()
            expect = want[:6].tolist() if want is not None else f"none: {local_length_error(layout, local)}"
            error = (
                f"position_ids on rank {rank} are not this rank's {layout!r} shard of a {world}-rank group "
                f"(first positions {shown}, expected {expect}); cut input_ids and position_ids with "
                f"gape.distributed.shard(x, 1, group, layout={layout!r})"
            )
        elif ids is not None and ids.shape[1] != local:
            error = f"position_ids hold {local} positions but the input holds {ids.shape[1]}"
    device = pos.device if pos is not None and dist.get_backend(group) == "nccl" else torch.device("cpu")
    agree(group, device, error, fields=(), what="context_parallel")
    kwargs = dict(kwargs)
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False
    return args, kwargs


@contextlib.contextmanager
def context_parallel(model, group=None, layout: str = "zigzag"):
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
    """
    from ..hf import _find_layers
    from ..patches.registry import get_spec

    check_layout(layout)
    _group_rank_size(group)
    spec = get_spec(getattr(model.config, "model_type", None))
    layers = _find_layers(model, spec)
    attns = [getattr(layer, spec.attention) for layer in layers]
    if any(_STATE_ATTR in a.__dict__ for a in attns):
        raise ValueError("model is already inside gape.distributed.context_parallel")
    _register()
    original = model.config._attn_implementation
    handle = model.register_forward_pre_hook(functools.partial(_check_positions, group, layout), with_kwargs=True)
    for a in attns:
        a.__dict__[_STATE_ATTR] = (group, layout)
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
