"""The two tasks of ``gape extrapolate``: training at ``T`` and evaluation at multiples of it.

- ``retrieval``: the pass-key task of :mod:`gape.experiments.synthetic` (``KEY d1..d4`` at a
  random depth in filler, ``QUERY`` at the end; loss on the 4 answer digits;
  accuracy = greedy exact match), trained on lengths drawn from ``[16, T]``.
- ``lm``: next-byte prediction on Shakespeare (:mod:`.corpus`), trained on
  windows of exactly ``T``. Evaluation windows are contiguous stretches of the
  held-out plays; the loss is reported two ways: over every token of the window
  (``perplexity``) and over its last ``T`` tokens only (``perplexity_last_t``,
  each of which sees at least ``L - T`` tokens of context), as the ALiBi paper
  discusses.

Attention entropy, per layer: the Shannon entropy of a query row's attention,
divided by ``log(number of keys that row may attend)``, so 0 is one key and 1
is uniform attention over the visible prefix whatever the length; averaged
over heads, rows and samples. Rows: the ``QUERY`` row (retrieval), the last 4
rows of each window (lm).

Gate magnitude (GAPE models): ``T * mean(lambda)`` per head and layer on a
training batch, which for the paper's form is ``Gamma_h * mean_i g_i`` exactly
(``lambda = Gamma_h g_i / T``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import synthetic as syn
from . import corpus as corpus_mod

TASKS = ("retrieval", "lm")
RETRIEVAL_VOCAB = 64
RETRIEVAL_MIN_LEN = 16
ENTROPY_ROWS = 4


# --------------------------------------------------------------------------- training


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    return syn.lr_at(step, steps, lr, warmup)


def gate_magnitude(record: dict, train_length: int) -> dict:
    """``{layer: [T * mean lambda per head]}`` from a :func:`gape.hf.record_gates` record."""
    return {str(i): [round(float(v), 5) for v in (train_length * rec["lambda"].float().mean(dim=(0, 2)))]
            for i, rec in sorted(record.items())}


def train(model, task: str, *, data, steps: int, train_length: int, batch: int, lr: float, warmup: int, seed: int,
          gate_every: int, track_gates: bool, min_length: int = RETRIEVAL_MIN_LEN, log_every: int = 50, log=print) -> dict:
    """Train in place; returns ``{"loss_curve": [[step, mean loss]], "gate_curve": [[step, {layer: [per head]}]]}``.

    The data stream depends only on ``seed`` (the same for every scheme and form).
    ``track_gates`` records :func:`gate_magnitude` every ``gate_every`` steps. Retrieval
    batches have one length each, drawn from ``[min_length, train_length]``.
    """
    from gape import hf

    gate_ids = {id(p) for _, g in _gates(model) for p in g.parameters()}
    base = [p for p in model.parameters() if p.requires_grad and id(p) not in gate_ids]
    gates = [p for p in model.parameters() if p.requires_grad and id(p) in gate_ids]
    groups = [{"params": base}] + ([{"params": gates, "weight_decay": 0.0}] if gates else [])
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed * 1000003 + (17 if task == "retrieval" else 29))
    model.train()
    gate_curve, losses = [], syn.LossLog(steps, log_every, log, indent="    ")
    for step in range(steps):
        if task == "retrieval":
            length = int(torch.randint(min(min_length, train_length), train_length + 1, (1,), generator=gen))
            tokens, _, _ = syn.make_batch(gen, batch, length)
        else:
            tokens = corpus_mod.train_batch(data, gen, batch, train_length)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup)
        record_now = track_gates and (step % gate_every == 0 or step + 1 == steps)
        if record_now:
            with hf.record_gates(model) as rec:
                loss = _loss(model, task, tokens)
            gate_curve.append([step, gate_magnitude(rec, train_length)])
        else:
            loss = _loss(model, task, tokens)
        losses.add(step, syn.optimizer_step(model, opt, loss))
    model.eval()
    return {"loss_curve": losses.curve, "gate_curve": gate_curve}


def _gates(model) -> list:
    from gape import hf

    return hf.iter_gates(model) if hf.is_patched(model) else []


def _loss(model, task: str, tokens: torch.Tensor) -> torch.Tensor:
    if task == "retrieval":
        return syn.answer_loss(model, tokens)
    logits = model(input_ids=tokens[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))


# --------------------------------------------------------------------------- evaluation


def _normalised_entropy(rec: dict, rows: list[int]) -> torch.Tensor:
    """Per layer: sum over samples of the mean over heads and rows of H / log(visible keys)."""
    from gape.hf.attention_probe import entropy

    visible = torch.tensor([r + 1 for r in rows], dtype=torch.float32)
    norm = torch.log(visible).clamp_min(1e-9)
    return torch.stack([(entropy(rec[i]["probs"]) / norm).mean(dim=(1, 2)).sum(0) for i in sorted(rec)])


@torch.no_grad()
def eval_retrieval(model, length: int, samples: int, *, batch_tokens: int, entropy_samples: int, seed: int = 10_000) -> dict:
    """Exact-match accuracy and normalised entropy per layer at ``length`` (same data for every model)."""
    from gape.hf.attention_probe import capture_attention

    gen = torch.Generator().manual_seed(seed * 7919 + length)
    depths = (torch.arange(samples, dtype=torch.float64) + torch.rand(samples, generator=gen, dtype=torch.float64)) / samples
    depths = depths[torch.randperm(samples, generator=gen)].float()
    bs = max(1, min(samples, batch_tokens // length))
    qrow = length - syn.ANSWER_LEN - 1
    correct, ent_sum, ent_n = 0.0, None, 0
    for start in range(0, samples, bs):
        d = depths[start : start + bs]
        tokens, digits, _ = syn.make_batch(gen, len(d), length, d)
        if ent_n < entropy_samples:
            with capture_attention(model, rows=[qrow]) as rec:
                logits = syn.answer_logits(model, tokens)
            ent = _normalised_entropy(rec, [qrow])
            ent_sum = ent if ent_sum is None else ent_sum + ent
            ent_n += len(d)
        else:
            logits = syn.answer_logits(model, tokens)
        correct += float(syn.exact_match(logits, digits).sum())
    return {"accuracy": correct / samples, "entropy": _rounded(ent_sum / ent_n)}


@torch.no_grad()
def eval_lm(model, windows: torch.Tensor, train_length: int, *, batch_tokens: int, entropy_windows: int) -> dict:
    """Perplexity over every token and over the last ``train_length`` tokens of each window,
    and normalised entropy per layer of the last rows."""
    from gape.hf.attention_probe import capture_attention

    n, length = windows.shape[0], windows.shape[1] - 1
    bs = max(1, min(n, batch_tokens // length))
    rows = list(range(length - min(ENTROPY_ROWS, length), length))
    nll_all = nll_last = 0.0
    count_all = count_last = 0
    ent_sum, ent_n = None, 0
    last = min(train_length, length)
    for start in range(0, n, bs):
        x = windows[start : start + bs]
        if ent_n < entropy_windows:
            with capture_attention(model, rows=rows) as rec:
                logits = model(input_ids=x[:, :-1], use_cache=False).logits
            ent = _normalised_entropy(rec, rows)
            ent_sum = ent if ent_sum is None else ent_sum + ent
            ent_n += len(x)
        else:
            logits = model(input_ids=x[:, :-1], use_cache=False).logits
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1), reduction="none").view(len(x), length)
        nll_all += float(nll.sum())
        count_all += nll.numel()
        nll_last += float(nll[:, -last:].sum())
        count_last += nll[:, -last:].numel()
    return {"perplexity": math.exp(nll_all / count_all), "perplexity_last_t": math.exp(nll_last / count_last),
            "windows": n, "entropy": _rounded(ent_sum / ent_n) if ent_n else []}


@torch.no_grad()
def mask_strength(model, tokens: torch.Tensor, stride: int = 1) -> dict:
    """GAPE's bias on the last query row against key position, per layer and head, mean over the batch:
    ``{layer: {"keys": [positions], "bias": [[per position] per head], "pi": [[...] per kv head]}}``.

    The bias is ``-lambda (1 - pi) phi(delta)``, the same quantity every backend adds to the logits.
    """
    from gape import hf
    from gape.core.reference import phi

    gates = dict(_gates(model))
    if not gates:
        return {}
    with hf.record_gates(model) as rec:
        model(input_ids=tokens, use_cache=False)
    out = {}
    length = tokens.shape[1]
    keys = torch.arange(0, length, stride)
    for i, r in sorted(rec.items()):
        lam = r["lambda"][:, :, -1].float()  # [B, Hq]
        pi = r["pi"].float()  # [B, Hkv, K]
        rep = lam.shape[1] // pi.shape[1]
        dist = phi((length - 1 - keys).clamp_min(0), gates[i].config.distance)
        keep = 1 - pi[:, :, keys].repeat_interleave(rep, dim=1)  # [B, Hq, K']
        bias = -(lam[:, :, None] * keep * dist[None, None]).mean(0)
        out[str(i)] = {"keys": keys.tolist(), "bias": _rounded(bias), "pi": _rounded(pi[:, :, keys].mean(0))}
    return out


def _rounded(t: torch.Tensor, digits: int = 5):
    return [_rounded(x, digits) for x in t] if t.dim() > 1 else [round(float(v), digits) for v in t]
