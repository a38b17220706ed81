"""GAPE gate modules: one per patched attention layer.

The transformers attention interface hands over post-RoPE queries and keys,
so the gates read features RoPE leaves unchanged: the norms of the channel
pairs RoPE rotates together. For head dim ``D`` and ``P = D/2`` pairs,

    f(x)_i   = ||pair_i(x)|| / sqrt(D)          i = 0 .. P-1
    lambda_m = max(alpha_h, 0) * softplus(<w_h, f(q_m)> + b_h)     (query head h)
    pi_n     = sigmoid(<u_g, f(k_n)> + c_g)                         (kv head g)

``pair_i`` is ``(x_i, x_{i+P})`` in the half-split layout transformers uses,
``(x_2i, x_2i+1)`` in the interleaved one.

Partial rotary (GPT-NeoX, StableLM, Phi-3 with ``partial_rotary_factor < 1``):
RoPE rotates only the first ``R`` channels of each head and leaves the other
``D - R`` as they are. The features are then the ``R/2`` pair norms of the
rotated channels followed by the ``D - R`` unrotated channels' raw values
(position-invariant as they are, and signed), all divided by ``sqrt(D)``:
``P = R/2 + D - R`` features. The ``1/sqrt(D)`` makes
``||f(x)||_2`` the root-mean-square of ``x``'s channels, so weights of order
one give logits of the order of the activations' scale whatever ``D`` is.

Multi-head latent attention (DeepSeek V2/V3) puts the rotated channels *last*:
each query and key head is ``[nope (D - R) | rope (R)]``, where the ``R`` rope
channels of a key are shared by all heads (one rotated latent key, broadcast)
and the ``D - R`` nope ones come from the latent per head. The features are then
the same two kinds in channel order: the ``D - R`` raw unrotated values, then
the ``R/2`` pair norms of the rotated channels. The key gate therefore reads
every channel of the key the attention function receives, the per-head nope
part and the shared rope part alike; the value head dim plays no part.

Parameters (plain ``nn.Parameter``s, in the model's dtype, settable directly):

    alpha [Hq]      scale of lambda per query head; 0 at init (identity)
    w     [Hq, P]   query-gate weights; 0 at init
    b     [Hq]      query-gate bias
    u     [Hkv, P]  key-gate weights; 0 at init     (absent if learned_pi=False)
    c     [Hkv]     key-gate bias                   (absent if learned_pi=False)

With ``fixed_lambda`` set there is no ``alpha, w, b``: the buffer
``fixed_lambda [Hq]`` is lambda itself. A constant lambda per head with a
learned-gate layout is ``w = 0, alpha = 1, b = inverse_softplus(lambda)``.

``alpha`` is clamped at 0 in the forward pass with a straight-through
gradient, so ``lambda >= 0`` always holds, the gradient reaches ``alpha`` at
its initial 0, and an ``alpha`` pushed below 0 can come back.

Gates are computed in float32 whatever the model dtype.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .config import GapeConfig

# Added under the square root on the autograd path: a zero pair gets a finite
# (zero) gradient; 1e-24 shifts a feature by at most 1e-12.
_NORM_FLOOR = 1e-24

def inverse_softplus(y: float | torch.Tensor) -> float | torch.Tensor:
    """``x`` with ``softplus(x) == y`` (``y > 0``), to set ``b`` for a target lambda."""
    if isinstance(y, torch.Tensor):
        return y + torch.log(-torch.expm1(-y))
    if not y > 0:
        raise ValueError(f"inverse_softplus needs y > 0, got {y}")
    return y + math.log(-math.expm1(-y))


def feature_count(head_dim: int, rotary_dim: int | None = None) -> int:
    """Number of gate features ``P`` for a head of ``head_dim`` channels, ``rotary_dim`` of them rotated."""
    r = head_dim if rotary_dim is None else rotary_dim
    return r // 2 + head_dim - r


def set_trainable(gate: nn.Module, parts) -> None:
    """Make the parameters of ``gate`` (a :class:`GapeGate` or :class:`PaperGate`) that
    belong to the ``GapeConfig.trainable`` ``parts`` trainable and freeze the others
    (``gate.part_of`` names a parameter's part)."""
    for name, param in gate.named_parameters():
        param.requires_grad_(gate.part_of(name) in parts)


def pair_features(x: torch.Tensor, layout: str = "half", rotary_dim: int | None = None,
                  rotary_last: bool = False) -> torch.Tensor:
    """Rotation-invariant features ``[..., P]`` (float32) of ``x [..., D]``: the
    pair norms of the first ``rotary_dim`` channels (all by default), then the
    raw values of the unrotated rest (see :func:`feature_count`); with
    ``rotary_last`` the rotated channels are the last ``rotary_dim`` (MLA), and the
    features are the unrotated values first, then those pair norms."""
    d = x.shape[-1]
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    if rotary_dim is not None and rotary_dim != d:
        if rotary_last:
            rot = pair_features(x[..., d - rotary_dim:], layout) * math.sqrt(rotary_dim / d)
            return torch.cat([x[..., : d - rotary_dim].float() * (1.0 / math.sqrt(d)), rot], dim=-1)
        rot = pair_features(x[..., :rotary_dim], layout) * math.sqrt(rotary_dim / d)
        return torch.cat([rot, x[..., rotary_dim:].float() * (1.0 / math.sqrt(d))], dim=-1)
    if layout == "half":
        a, b = x[..., : d // 2], x[..., d // 2 :]
    elif layout == "interleaved":
        a, b = x[..., 0::2], x[..., 1::2]
    else:
        raise ValueError(f"layout must be 'half' or 'interleaved', got {layout!r}")
    if x.requires_grad and torch.is_grad_enabled():
        # hypot's gradient is NaN at an all-zero pair; the tiny floor keeps it 0.
        r = torch.sqrt(torch.addcmul(a * a, b, b) + _NORM_FLOOR)
    else:
        # One fused op (torch.linalg.vector_norm over the pair axis is ~50x slower on CPU).
        r = torch.hypot(a, b)
    return r.float() * (1.0 / math.sqrt(d))


class GapeGate(nn.Module):
    """The query and key gates of one attention layer.

    Args:
        num_heads: query heads ``Hq``.
        num_kv_heads: key/value heads ``Hkv``.
        head_dim: ``D`` (even).
        config: the :class:`GapeConfig` (init values, key gate on/off, fixed lambda).
        layer_idx: index of the decoder layer (for records and error messages).
        dtype, device: of the parameters (the model's).
        rotary_dim: channels of each head that RoPE rotates (even; None: all ``D``).
        rotary_last: those channels are the last ``rotary_dim`` of the head (MLA), not the first.
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        config: GapeConfig,
        layer_idx: int = 0,
        dtype: torch.dtype = torch.float32,
        device=None,
        rotary_dim: int | None = None,
        rotary_last: bool = False,
    ) -> None:
        super().__init__()
        if rotary_dim == head_dim:
            rotary_dim = None  # RoPE on every channel: the plain pair norms
        if rotary_dim is not None and (rotary_dim % 2 or not 0 < rotary_dim < head_dim):
            raise ValueError(f"rotary_dim must be even and in (0, head_dim={head_dim}], got {rotary_dim}")
        if rotary_dim is None and head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE pair features, got {head_dim}")
        if num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.layer_idx = layer_idx
        self.config = config
        self.layout = config.rope_layout or "half"
        self.rotary_dim = rotary_dim
        self.rotary_last = bool(rotary_last) and rotary_dim is not None
        # names of the attention module's post-RoPE q/k norms whose weights the features divide out
        self.post_rope_norm: tuple[str, str] | None = None
        pairs = feature_count(head_dim, rotary_dim)
        kw = dict(dtype=dtype, device=device)

        if config.fixed_lambda is None:
            self.alpha = nn.Parameter(torch.full((num_heads,), config.alpha_init, **kw))
            self.w = nn.Parameter(torch.zeros(num_heads, pairs, **kw))
            self.b = nn.Parameter(torch.full((num_heads,), config.query_bias_init, **kw))
        else:
            fixed = config.fixed_lambda
            fixed = [fixed] * num_heads if isinstance(fixed, float) else fixed
            if len(fixed) != num_heads:
                raise ValueError(
                    f"fixed_lambda has {len(fixed)} values but layer {layer_idx} has {num_heads} query heads"
                )
            self.register_buffer("fixed_lambda", torch.tensor(fixed, dtype=torch.float32, device=device))
        if config.learned_pi:
            self.u = nn.Parameter(torch.zeros(num_kv_heads, pairs, **kw))
            self.c = nn.Parameter(torch.full((num_kv_heads,), config.key_bias_init, **kw))

        set_trainable(self, config.trainable_parts())

    @staticmethod
    def part_of(name: str) -> str:
        """The ``GapeConfig.trainable`` part a parameter belongs to."""
        return {"alpha": "alpha", "w": "query", "b": "query", "u": "key", "c": "key"}[name]

    def extra_repr(self) -> str:
        mode = "fixed lambda" if self.config.fixed_lambda is not None else "learned lambda"
        key = "learned pi" if self.config.learned_pi else "pi = 0"
        return (
            f"layer={self.layer_idx}, heads={self.num_heads}/{self.num_kv_heads}, head_dim={self.head_dim}, "
            f"{mode}, {key}, layout={self.layout}"
            + (f", rotary_dim={self.rotary_dim}" if self.rotary_dim is not None else "")
            + (" (last channels)" if self.rotary_last else "")
        )

    def is_identity(self) -> bool:
        """True when lambda is exactly 0 for every input (alpha <= 0 or fixed 0).

        A non-finite parameter makes lambda NaN (``0 * softplus(nan)``), not 0: such
        a gate is never the identity, so the NaN reaches the output instead of the
        shortcut hiding it."""
        if self.config.fixed_lambda is not None:
            return not bool(self.fixed_lambda.any())
        finite = all(bool(torch.isfinite(p).all()) for p in (self.w, self.b, self.alpha))
        return finite and bool((self.alpha <= 0).all())

    def needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())

    def query_gate(self, query: torch.Tensor) -> torch.Tensor:
        """lambda ``[B, Hq, Lq]`` (float32, >= 0) from post-RoPE ``query [B, Hq, Lq, D]``."""
        b, h, lq, _ = query.shape
        if self.config.fixed_lambda is not None:
            return self.fixed_lambda[None, :, None].expand(b, h, lq).contiguous()
        feats = pair_features(query, self.layout, self.rotary_dim, self.rotary_last)
        w = self.w.float()
        z = torch.matmul(feats, w[:, :, None]).squeeze(-1) + self.b.float()[:, None]
        alpha = self.alpha.float()
        if alpha.requires_grad:
            # Straight-through clamp: forward max(alpha, 0), gradient as if identity.
            alpha = alpha + (alpha.clamp_min(0) - alpha).detach()
        else:
            alpha = alpha.clamp_min(0)
        return alpha[:, None] * F.softplus(z)

    def key_gate(self, key: torch.Tensor) -> torch.Tensor:
        """pi ``[B, Hkv, Lk]`` (float32, in [0, 1]) from post-RoPE ``key [B, Hkv, Lk, D]``."""
        b, h, lk, _ = key.shape
        if not self.config.learned_pi:
            return key.new_zeros((b, h, lk), dtype=torch.float32)
        feats = pair_features(key, self.layout, self.rotary_dim, self.rotary_last)
        z = torch.matmul(feats, self.u.float()[:, :, None]).squeeze(-1) + self.c.float()[:, None]
        return torch.sigmoid(z)

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query_gate(query), self.key_gate(key)


def _head_dot(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``<x[b, l, h], w[h]>`` as ``[B, H, L]`` for ``x [B, L, H, D]``, ``w [H, D]``."""
    if x.shape[1] <= 64:
        # a decode step: einsum's contraction planning costs ~6x the fused multiply-sum
        return (x * w).sum(-1).transpose(1, 2)
    return torch.einsum("blhd,hd->bhl", x, w)


class PaperGate(nn.Module):
    """The paper's gates of one attention layer (docs/maths.md, "The paper's form").

    From the **pre-RoPE** query ``q`` (query head ``h``) and key ``k`` (kv head ``g``),
    head dim ``D`` and training context length ``T``:

        lambda = softplus(gamma_h) * softplus(<w_g[h], q> + b_g[h]) / T
        pi     = sigmoid(<w_l[g], k> + b_l[g])

    which is the paper's mask ``M_ij = Gamma_h g_i (j (1 - l_j) + i l_j) / T`` up to a
    row constant, with linear distance. Parameters (named as the paper names them):

        gamma [Hq]      head amplitude (``Gamma_h = softplus(gamma_h)``); ``gamma_init``
        w_g   [Hq, D]   query-gate weights; 0 at init
        b_g   [Hq]      query-gate bias; ``query_bias_init``
        w_l   [Hkv, D]  landmark (key) gate weights; 0 at init   (absent if learned_pi=False)
        b_l   [Hkv]     landmark gate bias; ``key_bias_init``    (absent if learned_pi=False)

    The attention interface of transformers sees post-RoPE tensors only, so ``gape.hf``
    captures the pre-RoPE ones with forward hooks on the modules that produce them (the
    architecture spec's ``query_pre_rope`` / ``key_pre_rope``: ``q_proj`` / ``k_proj``,
    or the q/k norm applied before RoPE on Qwen3, OLMo 2, Gemma 3, and Cohere and StableLM
    when theirs is on): exact, whatever the positions, and
    differentiable into the projections. The key gate of a key is computed once, when the
    key enters the KV cache, and remembered per cache layer (one float per key and kv
    head) -- it cannot be recomputed from the cached rotated keys.

    Gates are computed in float32 whatever the model dtype.
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        config: GapeConfig,
        layer_idx: int = 0,
        dtype: torch.dtype = torch.float32,
        device=None,
        rotary_dim: int | None = None,  # unused: the paper's gates read pre-RoPE q/k, all channels alike
        rotary_last: bool = False,  # unused, as rotary_dim
    ) -> None:
        super().__init__()
        if config.gate != "paper":
            raise ValueError(f"PaperGate needs GapeConfig(gate='paper'), got gate={config.gate!r}")
        if num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.layer_idx = layer_idx
        self.config = config
        self.train_length = config.train_length
        kw = dict(dtype=dtype, device=device)
        self.gamma = nn.Parameter(torch.full((num_heads,), config.gamma_init, **kw))
        self.w_g = nn.Parameter(torch.zeros(num_heads, head_dim, **kw))
        self.b_g = nn.Parameter(torch.full((num_heads,), config.query_bias_init, **kw))
        if config.learned_pi:
            self.w_l = nn.Parameter(torch.zeros(num_kv_heads, head_dim, **kw))
            self.b_l = nn.Parameter(torch.full((num_kv_heads,), config.key_bias_init, **kw))
        set_trainable(self, config.trainable_parts())

    @staticmethod
    def part_of(name: str) -> str:
        """The ``GapeConfig.trainable`` part a parameter belongs to."""
        return {"gamma": "alpha", "w_g": "query", "b_g": "query", "w_l": "key", "b_l": "key"}[name]

    def extra_repr(self) -> str:
        key = "learned pi" if self.config.learned_pi else "pi = 0"
        return (
            f"layer={self.layer_idx}, heads={self.num_heads}/{self.num_kv_heads}, head_dim={self.head_dim}, "
            f"T={self.train_length}, {key}, pre-RoPE"
        )

    def is_identity(self) -> bool:
        """Never: ``softplus(gamma) > 0`` (a very negative ``gamma`` is RoPE only up to rounding)."""
        return False

    def needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())

    # ---- the gates, on [B, L, H, D] (the projections' layout) or [B, H, L, D]

    def _lambda_blhd(self, q: torch.Tensor) -> torch.Tensor:
        z = _head_dot(q.float(), self.w_g.float()) + self.b_g.float()[:, None]
        amp = F.softplus(self.gamma.float()) * (1.0 / self.train_length)
        return (amp[:, None] * F.softplus(z)).contiguous()

    def _pi_blhd(self, k: torch.Tensor) -> torch.Tensor:
        if not self.config.learned_pi:
            return k.new_zeros((k.shape[0], k.shape[2], k.shape[1]), dtype=torch.float32)
        z = _head_dot(k.float(), self.w_l.float()) + self.b_l.float()[:, None]
        return torch.sigmoid(z).contiguous()

    def query_gate(self, query: torch.Tensor) -> torch.Tensor:
        """lambda ``[B, Hq, Lq]`` (float32, > 0) from **pre-RoPE** ``query [B, Hq, Lq, D]``."""
        return self._lambda_blhd(query.transpose(1, 2))

    def key_gate(self, key: torch.Tensor) -> torch.Tensor:
        """pi ``[B, Hkv, Lk]`` (float32, in [0, 1]) from **pre-RoPE** ``key [B, Hkv, Lk, D]``."""
        return self._pi_blhd(key.transpose(1, 2))

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query_gate(query), self.key_gate(key)
