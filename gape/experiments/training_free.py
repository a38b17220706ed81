"""A training-free GAPE setting: gates set from statistics of the model itself.

No parameter is learned. One forward pass over a calibration text (the essay
that ships with ``gape.tasks.niah``) gives two statistics per attention layer:

- **Reach of each query head**: ``r_h = mean over rows m of E_p[log(1 + delta)] / log(1 + m)``,
  in [0, 1]: near 1 for a head that attends across the whole context, near 0
  for a local head. The head's constant forgetting rate is
  ``lambda_h = lam * (1 - r_h)``: local heads get a mild contraction, heads
  that retrieve from far keep (almost) plain RoPE.
- **Key salience per key/value head**: the projection of a key's rotation-invariant
  pair features on their mean direction, standardised over the text. Keys more than
  ``protect_z`` standard deviations above the mean (attention sinks, salient
  tokens) get ``pi -> 1`` and are exempt from the contraction.

Both are written straight into the gate parameters of a GAPE-patched model:
``w = 0, b = 0, alpha_h = lambda_h / ln 2`` (so ``lambda = alpha * softplus(0)``),
``u_g = t * m_g / sd_g``, ``c_g = -t * (mu_g / sd_g + protect_z)`` (so
``pi = sigmoid(t * (z - protect_z))`` with ``z`` the standardised projection).
"""

from __future__ import annotations

import math

import torch

DEFAULT_LAMBDA = 0.1
DEFAULT_PROTECT_Z = 3.0
SHARPNESS = 4.0


def calibration_ids(tokenizer, length: int = 512) -> list[int]:
    """``length`` tokens of the package's essay text (BOS first when the tokenizer has one)."""
    from gape.tasks.prompts import haystack_sentences

    text = " ".join(haystack_sentences("essay"))
    ids = tokenizer(text, add_special_tokens=False).input_ids
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    while len(ids) < length:
        ids = ids + ids
    return (bos + ids)[:length]


@torch.no_grad()
def head_statistics(model, input_ids: torch.Tensor, skip: int = 16) -> dict[int, dict]:
    """Per patched layer: ``reach [Hq]`` and key-feature statistics (``mean_dir [Hkv, P]``,
    ``mu [Hkv]``, ``sd [Hkv]``) from one forward pass over ``input_ids [1, L]``."""
    from gape.hf.attention_probe import capture_attention

    with capture_attention(model, rows=None, keys=True) as rec:
        model(input_ids=input_ids, use_cache=False)
    stats = {}
    for layer, entry in rec.items():
        probs = entry["probs"][0]  # [Hq, L, L]
        L = probs.shape[-1]
        pos = torch.arange(L, dtype=torch.float32)
        delta = (pos[:, None] - pos[None, :]).clamp_min(0)
        mean_log = (probs * torch.log1p(delta)).sum(-1)  # [Hq, L]
        rows = slice(min(skip, L - 1), L)
        reach = (mean_log[:, rows] / torch.log1p(pos[rows])).mean(-1).clamp(0, 1)
        feats = entry["key_features"][0]  # [Hkv, L, P]
        direction = feats.mean(1)
        direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        z = torch.einsum("glp,gp->gl", feats, direction)
        stats[layer] = {"reach": reach, "mean_dir": direction, "mu": z.mean(1), "sd": z.std(1).clamp_min(1e-6), "z": z}
    return stats


def training_free_config(distance: str = "log", backend: str = "auto"):
    from gape.hf.config import GapeConfig

    return GapeConfig(distance=distance, backend=backend, learned_pi=True, trainable=False, identity_shortcut=False)


@torch.no_grad()
def apply_training_free(model, tokenizer=None, *, lam: float = DEFAULT_LAMBDA, protect_z: float = DEFAULT_PROTECT_Z,
                        input_ids: torch.Tensor | None = None, length: int = 512, distance: str = "log",
                        backend: str = "auto") -> dict:
    """Patch ``model`` (if it is not already) and set its gates training-free.

    Args:
        model: a transformers model with a spec under patches/ (or already GAPE-patched
            with a learned-lambda, key-gated config).
        tokenizer: used to build the calibration text when ``input_ids`` is None.
        lam: the largest forgetting rate (that of a purely local head), >= 0.
        protect_z: keys more than this many standard deviations above the mean
            salience are protected.
        input_ids: ``[1, L]`` calibration tokens (default: ``length`` tokens of the essay).

    Returns a summary ``{layer: {"lambda": [...], "protected_fraction": [...]}}``.
    """
    from gape import hf

    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite float >= 0, got {lam!r}")
    if input_ids is None:
        if tokenizer is None:
            raise ValueError("apply_training_free needs a tokenizer or input_ids")
        input_ids = torch.tensor([calibration_ids(tokenizer, length)])
    input_ids = input_ids.to(next(model.parameters()).device)
    if not hf.is_patched(model):
        hf.patch(model, training_free_config(distance, backend))
    gates = hf.iter_gates(model)
    for _, gate in gates:
        if gate.config.fixed_lambda is not None or not gate.config.learned_pi:
            raise ValueError("apply_training_free needs a model patched with a learned-lambda, key-gated GapeConfig")
        gate.alpha.zero_()  # identity while measuring: statistics of the model as it was
    was_training = model.training
    model.eval()
    stats = head_statistics(model, input_ids)
    model.train(was_training)
    summary = {}
    for i, gate in gates:
        s = stats[i]
        lam_h = lam * (1 - s["reach"])
        gate.w.zero_()
        gate.b.zero_()
        gate.alpha.copy_((lam_h / math.log(2.0)).to(gate.alpha.dtype))
        gate.u.copy_((SHARPNESS * s["mean_dir"] / s["sd"][:, None]).to(gate.u.dtype))
        gate.c.copy_((-SHARPNESS * (s["mu"] / s["sd"] + protect_z)).to(gate.c.dtype))
        zs = (s["z"] - s["mu"][:, None]) / s["sd"][:, None]
        protected = torch.sigmoid(SHARPNESS * (zs - protect_z)).mean(1)
        summary[i] = {
            "lambda": [round(float(v), 5) for v in lam_h],
            "reach": [round(float(v), 4) for v in s["reach"]],
            "protected_fraction": [round(float(v), 4) for v in protected],
        }
    return summary
