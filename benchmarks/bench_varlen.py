"""Packed (varlen) vs right-padded GAPE attention on the CPU: forward + backward
tokens per second for a batch of sequences of random lengths.

    python benchmarks/bench_varlen.py                  # 8 sequences, lengths in 128..2048
    python benchmarks/bench_varlen.py --seeds 0 1 2    # several draws of lengths

Packed: ``gape.attention_varlen`` (one C++ kernel call over every sequence, no
padding). Padded: ``gape.attention`` on ``[8, H, max_len, D]`` with a key-padding
mask, the layout a batch has without packing. Both causal, log distance,
SmolLM2's attention shape (9 query / 3 kv heads, D = 64), float32, the
``"torch"`` backend. Tokens/s counts real tokens only. Target: packed
>= 1.5x padded. Rows go to ``benchmarks/results/bench_varlen/bench_varlen.json`` (atomic
writes, one row per seed, rerun skips rows already there).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch

import gape
from gape._io import write_json_atomic
from gape._machine import cpu_model
from gape._threads import set_threads

RESULTS = Path(__file__).resolve().parent / "results" / "bench_varlen"


def _time(fn, reps: int) -> list[float]:
    fn()  # warm-up (kernel build, allocator)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def measure(lengths, hq, hkv, d, reps, seed):
    g = torch.Generator().manual_seed(seed)
    total, longest, b = sum(lengths), max(lengths), len(lengths)
    q = torch.randn(total, hq, d, generator=g)
    k = torch.randn(total, hkv, d, generator=g)
    v = torch.randn(total, hkv, d, generator=g)
    lam = torch.rand(total, hq, generator=g) * 0.1
    pi = torch.rand(total, hkv, generator=g)
    dout = torch.randn(total, hq, d, generator=g)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)

    packed = [t.clone().requires_grad_() for t in (q, k, v, lam, pi)]

    def run_packed():
        out = gape.attention_varlen(*packed, cu, cu, longest, longest, backend="torch")
        out.backward(dout)

    # the same tokens right-padded to [B, H, max_len, D]
    def pad(x):
        heads = x.shape[1:]
        y = x.new_zeros(b, longest, *heads)
        for i in range(b):
            y[i, : lengths[i]] = x[int(cu[i]) : int(cu[i + 1])]
        return y.movedim(1, 2).contiguous()  # [B, H, L, ...]

    padded = [pad(t).requires_grad_() for t in (q, k, v, lam, pi)]
    dout_pad = pad(dout)
    mask = torch.zeros(b, 1, 1, longest, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, ..., :n] = True

    def run_padded():
        out = gape.attention(*padded, attn_mask=mask, backend="torch")
        out.backward(dout_pad)  # gradients of pad rows are zero in dout_pad

    t_packed = _time(run_packed, reps)
    t_padded = _time(run_padded, reps)
    med_p, med_d = statistics.median(t_packed), statistics.median(t_padded)
    return {
        "lengths": lengths, "real_tokens": total, "padded_tokens": b * longest,
        "packed_s": t_packed, "padded_s": t_padded,
        "packed_tokens_per_s": total / med_p, "padded_tokens_per_s": total / med_d,
        "speedup": med_d / med_p,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sequences", type=int, default=8)
    p.add_argument("--min-len", type=int, default=128)
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--heads", type=int, nargs=2, default=[9, 3], metavar=("HQ", "HKV"))
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--out", default=str(RESULTS / "bench_varlen.json"))
    p.add_argument("--fresh", action="store_true", help="ignore rows already in --out")
    args = p.parse_args(argv)
    set_threads(args.threads)
    out = Path(args.out)
    rows = [] if args.fresh or not out.exists() else json.loads(out.read_text())
    machine = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "python": platform.python_version(),
               "torch": torch.__version__, "gape": gape.__version__}
    for seed in args.seeds:
        rnd = random.Random(seed)
        lengths = [rnd.randint(args.min_len, args.max_len) for _ in range(args.sequences)]
        setting = {"seed": seed, "heads": args.heads, "head_dim": args.head_dim, "threads": machine["threads"],
                   "cpu": machine["cpu"]}
        if any(all(r.get(k) == v for k, v in setting.items()) for r in rows):
            print(f"seed {seed}: already measured, skipped")
            continue
        res = measure(lengths, *args.heads, args.head_dim, args.reps, seed)
        row = {**setting, **machine, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **res}
        rows.append(row)
        write_json_atomic(str(out), rows, indent=1)
        print(f"seed {seed}: lengths {lengths}: packed {res['packed_tokens_per_s']:.0f} tok/s, padded "
              f"{res['padded_tokens_per_s']:.0f} tok/s, packed {res['speedup']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
