"""Peak memory of GAPE attention forward + backward on the CPU, eager vs torch.compile.

    python benchmarks/bench_compile_memory.py                 # L=16384, 4 heads, D=64, fp32
    python benchmarks/bench_compile_memory.py --length 4096 --modes eager compiled compiled-reference

Each mode runs in its own process (so one's allocations never hide another's peak):
the inputs are built, the resident set size is read, then one forward + backward
runs (a first call warms up and, compiled, compiles; a second is measured) while a thread
samples the resident set size every 2 ms; the largest sample less the size before
the measured call is the row's ``peak_mib``. ``compiled-reference`` compiles the reference formulation
(the ``[L, L]`` scores materialised: what a compiled patched model ran before the
kernel's ops had fake implementations). Rows go to
``benchmarks/results/bench_compile_memory/`` with the machine and versions.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "bench_compile_memory"
MODES = ("eager", "compiled", "compiled-reference")


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(mode: str, length: int, heads: int, d: int) -> dict:
    import torch

    import gape

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, length, d, generator=g).requires_grad_() for _ in range(3))
    lam = (torch.rand(1, heads, length, generator=g) * 0.5).requires_grad_()
    pi = torch.rand(1, heads, length, generator=g).requires_grad_()
    backend = "reference" if mode == "compiled-reference" else "torch"

    def step(q, k, v, lam, pi):
        out = gape.attention(q, k, v, lam, pi, backend=backend)
        out.sum().backward()

    fn = step if mode == "eager" else torch.compile(step)
    start = time.perf_counter()
    fn(q, k, v, lam, pi)  # warm-up: compiles, loads the kernel, grows the allocator's pools (not measured)
    first_s = time.perf_counter() - start
    for t in (q, k, v, lam, pi):
        t.grad = None
    before = rss_mib()
    samples, done = [before], threading.Event()

    def sample():
        while not done.is_set():
            samples.append(rss_mib())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    fn(q, k, v, lam, pi)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    return {"mode": mode, "length": length, "heads": heads, "d": d, "dtype": "float32", "rss_before_mib": round(before),
            "peak_mib": round(max(samples) - before), "seconds": round(seconds, 3), "first_call_seconds": round(first_s, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=MODES)
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.length, args.heads, args.d)))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from gape._io import write_json_atomic
    from gape._machine import machine_record

    rows = []
    for mode in args.modes:
        res = subprocess.run([sys.executable, __file__, "--child", mode, "--length", str(args.length), "--heads",
                              str(args.heads), "--d", str(args.d)], capture_output=True, text=True, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    by = {r["mode"]: r for r in rows}
    if "eager" in by and "compiled" in by:
        print(f"compiled / eager peak: {by['compiled']['peak_mib'] / max(1, by['eager']['peak_mib']):.2f}x")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc)
    out = RESULTS / f"L{args.length}_H{args.heads}_{stamp:%Y-%m-%d}.json"
    write_json_atomic(out, {**machine_record(), "date": stamp.isoformat(timespec="seconds"),
                            "note": "peak resident set growth during one fwd+bwd, each mode in its own process",
                            "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
