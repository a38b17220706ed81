"""Can any distance attenuation rescue RoPE beyond its window? An oracle check.

GAPE only ever *lowers* logits as a function of distance; the strongest thing it
can do to a key is remove it. This script runs the RULER single-needle prompt of
``gape niah`` on the embedded SmolLM2 with a hard mask in place of any gate: every
key farther than ``--window`` tokens from the query is dropped, except the first
``--sinks`` tokens of the prompt (the attention sink, chat header and
instruction). Every distance the model then sees inside the window was seen in
training; only the sink tokens sit at their true, possibly unseen, distance.

- If this retrieves a needle that is inside the window at 12k while plain RoPE
  fails, far keys are the culprit and a gate setting could in principle help.
- If it fails at 12k but works at 8k with the same window, the model needs its
  sink at a distance it was trained on: only moving positions (RoPE scaling,
  StreamingLLM/LM-Infinite-style position capping) can help, not attenuation.

    python benchmarks/niah_window_oracle.py                     # the committed grid
    python benchmarks/niah_window_oracle.py --window 7000 --sinks 64 0 --lengths 8192 12288

Rows are appended to ``benchmarks/results/niah_window_oracle/results.jsonl`` as
they finish (fsynced); a rerun skips rows already there.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import os
import time

import torch
import torch.nn.functional as F

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "niah_window_oracle")
ATTENTION = "gape_window_oracle"


def window_attention(window: int, sinks: int):
    """An attention function for transformers' AttentionInterface: causal, keys within
    ``window`` of the query or among the first ``sinks`` positions (bottom-right aligned)."""

    from gape.core.reference import signed_distance

    @functools.lru_cache(maxsize=1)  # every layer of one forward shares the shape, hence the mask
    def mask(lq: int, lk: int, device: torch.device) -> torch.Tensor:
        delta = signed_distance(lq, lk, device)
        return (delta >= 0) & ((delta < window) | (torch.arange(lk, device=device) < sinks))

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        keep = mask(query.shape[2], key.shape[2], query.device)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=keep, scale=scaling,
                                             enable_gqa=query.shape[1] != key.shape[1])
        return out.transpose(1, 2).contiguous(), None

    return attend


def main(argv=None) -> int:
    from transformers import AttentionInterface

    from gape._machine import cpu_model
    from gape._threads import set_threads
    from gape.hf.models import load_model
    from gape.tasks.niah import results as res
    from gape.tasks.prompts import build_sample
    from gape.tasks.niah.runner import _generate
    from gape.tasks.niah.scoring import string_match_all

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--window", type=int, nargs="+", default=[7000], help="keys farther than this are masked")
    p.add_argument("--sinks", type=int, nargs="+", default=[64, 0], help="first positions kept at any distance")
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 12288])
    p.add_argument("--depths", type=float, nargs="+", default=[0.5, 0.75])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args(argv)
    for name in ("window", "sinks", "lengths"):
        if any(v < 0 for v in getattr(args, name)):
            raise SystemExit(f"--{name} must be >= 0, got {getattr(args, name)}")
    set_threads(args.threads or None)
    os.makedirs(args.out, exist_ok=True)
    done = {(r["window"], r["sinks"], r["length"], r["depth"]) for r in res.read_rows(args.out)}
    plan = [(w, s, n, d) for w in args.window for s in args.sinks for n in args.lengths for d in args.depths
            if (w, s, n, d) not in done]
    if not plan:
        print(f"nothing left to run in {args.out}")
        return 0
    model, tok = load_model(None)
    import transformers

    for w, s, n, d in plan:
        AttentionInterface.register(ATTENTION, window_attention(w, s))
        model.set_attn_implementation(ATTENTION)
        sample = build_sample(tok, task="single", length=n, depth=d, haystack="noise")
        start = time.perf_counter()
        response, _ = _generate(model, tok, sample.input_ids, 32)
        row = {"window": w, "sinks": s, "length": n, "depth": d, "task": "single", "haystack": "noise",
               "needle_position": sample.needle_position, "needle_distance": n - sample.needle_position,
               "correct": string_match_all(response, sample.answers) == 1.0, "response": response,
               "seconds": round(time.perf_counter() - start, 1), "date": dt.date.today().isoformat(),
               "machine": cpu_model(), "torch": torch.__version__,
               "transformers": transformers.__version__, "threads": torch.get_num_threads()}
        res.append_row(args.out, row)
        print(f"window {w} sinks {s} length {n} depth {d}: {'correct' if row['correct'] else 'wrong'}  {response[:60]!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
