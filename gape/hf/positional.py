"""Positional schemes for models built from a config: RoPE, NoPE, p-RoPE and ALiBi.

``with_positional(model, scheme)`` switches a transformers Llama-style model (in place,
reversibly) to the positional encoding the GAPE paper compares against:

- ``"rope"``: the model's own rotary embedding (undoes an earlier call).
- ``"nope"``: no positional encoding: every rotary frequency is 0, so ``cos = 1``,
  ``sin = 0`` and the rotation is exactly the identity.
- ``"prope"``: p-RoPE (Barbero et al. 2024, arXiv:2410.06205), in their convention:
  ``p`` is the fraction of rotary frequencies **kept** (``1.0`` is RoPE, ``0.0`` is NoPE);
  the lowest ``D/2 - round(p * D/2)`` frequencies are set to 0 (those channel pairs are
  not rotated) and the others keep their values.
- ``"alibi"``: ALiBi (Press et al. 2022) with its standard per-head slopes, on NoPE. ALiBi
  is GAPE with a constant per-head ``lambda`` (the slope), ``pi = 0`` and linear distance
  (docs/maths.md), so it runs through GAPE's fused kernels (no bias is materialized). With GAPE
  gates on top (``gape.patch``, either gate form, ``distance="linear"``) the slope adds to
  the gate's forgetting rate: ``b = -(m_h + lambda) (1 - pi) delta`` -- the key gate
  protects a landmark from ALiBi's decay too. (The additive ``-m_h delta - lambda (1 - pi)
  delta`` is not of the kernels' ``lambda_m (1 - pi_n)`` form; with ``learned_pi=False`` the
  two coincide.)

The rotary module is replaced by a :class:`TruncatedRotary` holding its own ``inv_freq``
(transformers' weight init, which recomputes ``…RotaryEmbedding`` buffers, leaves it
alone); ALiBi adds an :class:`AlibiSlopes` submodule (``gape_alibi``) to every attention
layer and selects the ``"gape"`` attention implementation. Each call starts from the
model's original RoPE, so calls do not stack, and it composes with ``gape.patch`` in either
order. Apply ``gape.with_rope_scaling`` (if at all) before, not after.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from gape import hf

SCHEMES = ("rope", "nope", "prope", "alibi")
_STATE_ATTR = "_gape_positional"
# ROPE types whose frequencies transformers recomputes at run time (a fixed inv_freq would be stale)
_DYNAMIC_ROPE = ("dynamic", "longrope")


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi's standard head slopes: for ``n`` a power of two ``m_h = 2^(-8 h / n)``,
    ``h = 1..n``; otherwise the ``2^floor(log2 n)`` slopes followed by every other
    slope of the next power of two (Press et al.)."""
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"num_heads must be an int > 0, got {num_heads!r}")

    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    closest = 2 ** int(math.floor(math.log2(num_heads)))
    if closest == num_heads:
        return power_of_two(num_heads)
    return power_of_two(closest) + power_of_two(2 * closest)[0::2][: num_heads - closest]


class AlibiSlopes(nn.Module):
    """ALiBi's constant forgetting rate of one attention layer: ``lambda[h] = m_h``.

    No parameters or buffers (the slopes are recomputed per device in float32, so a
    ``model.to(torch.bfloat16)`` does not round them)."""

    def __init__(self, num_heads: int, backend: str = "auto") -> None:
        super().__init__()
        from gape.core.api import BACKENDS

        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.num_heads = num_heads
        self.backend = backend

    def slopes(self, device) -> torch.Tensor:
        return _slopes_on(self.num_heads, torch.device(device))

    def query_gate(self, query: torch.Tensor) -> torch.Tensor:
        """lambda ``[B, Hq, Lq]`` (float32) for ``query [B, Hq, Lq, D]``."""
        b, h, lq, _ = query.shape
        if h != self.num_heads:
            raise ValueError(f"ALiBi was set up for {self.num_heads} heads, the query has {h}")
        return self.slopes(query.device)[None, :, None].expand(b, h, lq)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, backend={self.backend}"


@functools.lru_cache(maxsize=32)
def _slopes_on(num_heads: int, device: torch.device) -> torch.Tensor:
    return torch.tensor(alibi_slopes(num_heads), dtype=torch.float32, device=device)


class TruncatedRotary(nn.Module):
    """A rotary embedding with some frequencies set to 0 (NoPE, p-RoPE).

    Computes ``cos``/``sin`` as transformers' default rotary forward does, from its own
    ``inv_freq`` (the original module's, with the removed entries 0) and the original's
    ``attention_scaling``. A zero frequency gives ``cos = scaling``, ``sin = 0``: with
    scaling 1 that channel pair is not rotated, exactly."""

    def __init__(self, original: nn.Module, keep: int) -> None:
        super().__init__()
        inv_freq = original.inv_freq.detach().clone().float()
        if keep < inv_freq.numel():
            # inv_freq decreases with the index: the lowest frequencies are the last ones
            inv_freq[keep:] = 0.0
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.attention_scaling = float(getattr(original, "attention_scaling", 1.0))
        self.keep, self.total = keep, inv_freq.numel()

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, *args, **kwargs):
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)

    def extra_repr(self) -> str:
        return f"rotated frequencies {self.keep}/{self.total}"


def positional_scheme(model: nn.Module) -> dict:
    """``{"scheme": ..., "p": ...}`` of the model (``"rope"`` when never switched)."""
    state = model.__dict__.get(_STATE_ATTR)
    return {"scheme": "rope", "p": None} if state is None else {"scheme": state["scheme"], "p": state["p"]}


def with_positional(model: nn.Module, scheme: str, *, p: float | None = None, backend: str = "auto") -> nn.Module:
    """Switch a Llama-style transformers model to a positional scheme; returns the model
    (changed in place, reversibly: ``with_positional(model, "rope")`` restores it).

    Args:
        model: a transformers model with rotary embeddings whose architecture ``gape.patch``
            supports (llama, mistral, qwen2, qwen3). Meant for models trained from scratch:
            a pretrained RoPE model switched to another scheme is a different model.
        scheme: ``"rope"``, ``"nope"``, ``"prope"`` or ``"alibi"`` (module docstring).
        p: for ``"prope"`` only, the fraction of rotary frequencies kept, in ``[0, 1]``
            (Barbero et al.'s p: ``round(p * D/2)`` highest frequencies rotate).
        backend: for ``"alibi"`` only, the GAPE backend of layers without GAPE gates
            (patched layers use their ``GapeConfig.backend``).

    Example::

        model = LlamaForCausalLM(config)
        gape.with_positional(model, "prope", p=0.75)
        gape.patch(model, gape.GapeConfig(gate="paper", train_length=256))
    """
    from gape.patches.registry import get_spec

    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if scheme == "prope":
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be the fraction of RoPE frequencies kept, a float in [0, 1], for scheme='prope'; got {p!r}")
        p = float(p)
    elif p is not None:
        raise ValueError(f"p applies to scheme='prope' only, got p={p!r} with scheme={scheme!r}")
    if scheme != "alibi" and backend != "auto":
        raise ValueError(f"backend applies to scheme='alibi' only, got backend={backend!r} with scheme={scheme!r}")
    if not hasattr(model, "config") or not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    spec = get_spec(getattr(model.config, "model_type", None))
    if scheme == "alibi" and hf.is_patched(model) and hf.gape_config(model).distance != "linear":
        raise ValueError(
            "ALiBi is a linear-distance bias: the model is patched with GapeConfig.distance="
            f"{hf.gape_config(model).distance!r}; patch with distance='linear'"
        )

    _restore(model)
    if scheme == "rope":
        return model
    from .models import _rotary_modules

    rotaries = _rotary_modules(model)
    if not rotaries:
        raise ValueError(f"{type(model).__name__} has no rotary embedding module (…RotaryEmbedding with inv_freq)")
    for _, _, module in rotaries:
        rope_type = getattr(module, "rope_type", "default")
        if any(t in str(rope_type) for t in _DYNAMIC_ROPE):
            raise ValueError(
                f"rope_type={rope_type!r} recomputes its frequencies at run time; with_positional needs fixed ones "
                "(use with_rope_scaling(model, 'default') first)"
            )
    state = {"scheme": scheme, "p": p, "rotaries": [], "alibi": [], "hooks": []}
    model.__dict__[_STATE_ATTR] = state
    try:
        for parent, name, module in rotaries:
            total = module.inv_freq.numel()
            keep = round(p * total) if scheme == "prope" else 0
            setattr(parent, name, TruncatedRotary(module, keep).to(module.inv_freq.device))
            state["rotaries"].append((parent, name, module))
        if scheme == "alibi":
            shape = hf.model_shape(model)
            layers = hf._find_layers(model, spec)
            for i in hf.attention_layers(model, spec, layers):
                attn = getattr(layers[i], spec.attention)
                attn.add_module(hf.ALIBI_ATTR, AlibiSlopes(shape["num_heads"], backend))
                state["alibi"].append(attn)
                # a StaticCache's query offset (gape.hf reads it when the layer has no gate)
                state["hooks"].append(attn.register_forward_pre_hook(hf._remember_cached_keys, with_kwargs=True))
            hf.use_gape_attention(model)
    except Exception:
        _restore(model)
        raise
    return model


def _restore(model: nn.Module) -> None:
    state = model.__dict__.pop(_STATE_ATTR, None)
    if state is None:
        return
    for parent, name, module in state["rotaries"]:
        setattr(parent, name, module)
    for handle in state.get("hooks", ()):
        handle.remove()
    for attn in state["alibi"]:
        attn._modules.pop(hf.ALIBI_ATTR, None)
    hf.release_gape_attention(model)
