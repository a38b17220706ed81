"""An independent float64 Llama forward for the paper-form and positional-scheme tests.

Written from docs/maths.md and the papers, not from gape's code: embeddings, RMSNorm, the
q/k/v projections (the pre-RoPE query and key are read straight from them), RoPE from
its own frequencies, explicit logits plus a materialized bias, explicit softmax, SiLU
MLP. The paper's gates add its **un-shifted** mask

    M_ij = Gamma_h g_i ( j (1 - l_j) / T + i l_j / T )

at absolute positions ``i, j`` (the tokens' ``position_ids``), exactly as the paper
writes it. Differentiable: build the weights with ``requires_grad`` to compare gradients.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def alibi_reference_slopes(n: int) -> list[float]:
    # Press et al.'s get_slopes, restated
    def pow2(k):
        start = 2 ** (-(2 ** -(math.log2(k) - 3)))
        return [start * start**i for i in range(k)]

    if math.log2(n).is_integer():
        return pow2(n)
    c = 2 ** math.floor(math.log2(n))
    return pow2(c) + alibi_reference_slopes(2 * c)[0::2][: n - c]


def rope_inv_freq(config, scheme: str = "rope", p: float | None = None) -> torch.Tensor:
    d = config.head_dim
    theta = config.rope_parameters["rope_theta"]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    if scheme in ("nope", "alibi"):
        return torch.zeros_like(inv)
    if scheme == "prope":
        keep = round(p * inv.numel())
        inv = inv.clone()
        inv[keep:] = 0.0  # the lowest frequencies (largest index) are removed
    return inv


def weights(model, requires_grad: bool = False) -> dict[str, torch.Tensor]:
    return {n: p.detach().double().requires_grad_(requires_grad) for n, p in model.named_parameters()}


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rot * sin


def reference_logits(
    model,
    ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    *,
    W: dict | None = None,
    gate: str | None = None,
    train_length: int | None = None,
    distance: str = "log",
    scheme: str = "rope",
    p: float | None = None,
) -> torch.Tensor:
    """float64 logits ``[B, L, V]`` of a (patched) tiny Llama.

    ``gate``: None (no GAPE), ``"paper"`` or ``"invariant"`` (parameters read from the
    model's ``gape_gate`` submodules). ``scheme``: ``"rope"``, ``"nope"``, ``"prope"``
    (``p`` = fraction of frequencies kept) or ``"alibi"`` (slope bias on NoPE; with gates
    the slope joins lambda and the key gate protects from it: ``-(m + lambda)(1 - pi) delta``).
    """
    cfg = model.config
    W = weights(model) if W is None else W
    b, n = ids.shape
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    group = hq // hkv
    if attention_mask is None:
        attention_mask = torch.ones(b, n, dtype=torch.long)
    if position_ids is None:
        position_ids = torch.arange(n)[None].expand(b, n)
    pos = position_ids.double()
    ang = pos[..., None] * rope_inv_freq(cfg, scheme, p)
    emb = torch.cat([ang, ang], dim=-1)[:, None]  # [B, 1, L, D]
    cos, sin = emb.cos(), emb.sin()
    slot = torch.arange(n)
    allowed = (slot[None, :] <= slot[:, None])[None, None] & attention_mask.bool()[:, None, None, :]
    dpos = pos[:, None, :, None] - pos[:, None, None, :]  # i - j, [B, 1, L, L]
    slopes = torch.tensor(alibi_reference_slopes(hq), dtype=torch.float64)[None, :, None, None]

    x = W["model.embed_tokens.weight"][ids]
    for layer in range(cfg.num_hidden_layers):
        pre = f"model.layers.{layer}."
        h = _rms(x, W[pre + "input_layernorm.weight"], cfg.rms_norm_eps)
        q = (h @ W[pre + "self_attn.q_proj.weight"].T).view(b, n, hq, d).transpose(1, 2)
        k = (h @ W[pre + "self_attn.k_proj.weight"].T).view(b, n, hkv, d).transpose(1, 2)
        v = (h @ W[pre + "self_attn.v_proj.weight"].T).view(b, n, hkv, d).transpose(1, 2)
        qr, kr = _rotate(q, cos, sin), _rotate(k, cos, sin)
        krep, vrep = kr.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        s = qr @ krep.transpose(-1, -2) / math.sqrt(d)
        g = pre + "self_attn.gape_gate."
        lam = pi = None
        if gate == "paper":
            gi = F.softplus(torch.einsum("bhld,hd->bhl", q, W[g + "w_g"]) + W[g + "b_g"][:, None])
            amp = F.softplus(W[g + "gamma"])[None, :, None, None]
            if g + "w_l" in W:
                lj = torch.sigmoid(torch.einsum("bhld,hd->bhl", k, W[g + "w_l"]) + W[g + "b_l"][:, None])
                lj = lj.repeat_interleave(group, 1)[:, :, None, :]
            else:
                lj = torch.zeros(b, hq, 1, n, dtype=torch.float64)
            i_pos, j_pos = pos[:, None, :, None], pos[:, None, None, :]
            mask_m = amp * gi[..., None] * (j_pos * (1 - lj) + i_pos * lj) / train_length
            if scheme == "alibi":
                mask_m = mask_m - slopes * (1 - lj) * dpos
            s = s + mask_m
        elif gate == "invariant":
            def feats(t):
                return torch.sqrt(t[..., : d // 2] ** 2 + t[..., d // 2 :] ** 2) / math.sqrt(d)

            lam = W[g + "alpha"].clamp_min(0)[None, :, None] * F.softplus(
                torch.einsum("bhlp,hp->bhl", feats(qr), W[g + "w"]) + W[g + "b"][:, None]
            )
            pi = torch.sigmoid(torch.einsum("bhlp,hp->bhl", feats(kr), W[g + "u"]) + W[g + "c"][:, None])
            pi = pi.repeat_interleave(group, 1)[:, :, None, :]
            phi = dpos.clamp_min(0) if distance == "linear" else torch.log1p(dpos.clamp_min(0))
            total = lam[..., None] + (slopes if scheme == "alibi" else 0.0)
            s = s - total * (1 - pi) * phi
        elif scheme == "alibi":
            s = s - slopes * dpos
        s = s.masked_fill(~allowed, float("-inf"))
        attn = torch.softmax(s, dim=-1).nan_to_num(0.0)
        o = (attn @ vrep).transpose(1, 2).reshape(b, n, hq * d)
        x = x + o @ W[pre + "self_attn.o_proj.weight"].T
        h = _rms(x, W[pre + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        up = F.silu(h @ W[pre + "mlp.gate_proj.weight"].T) * (h @ W[pre + "mlp.up_proj.weight"].T)
        x = x + up @ W[pre + "mlp.down_proj.weight"].T
    x = _rms(x, W["model.norm.weight"], cfg.rms_norm_eps)
    return x @ W["lm_head.weight"].T
