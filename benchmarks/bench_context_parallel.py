"""Context-parallel GAPE attention on the CPU: time, per-rank memory and ring traffic
at a fixed total length for 1, 2, 4 ... processes (gloo on localhost).

    python benchmarks/bench_context_parallel.py --length 16384 --worlds 1 2 4

Each world size runs in its own group of spawned processes. Per rank: this
rank's shards of q, k, v and the gates (fp32, B=1, 8 query / 2 kv heads,
D=64, causal, log distance, zigzag by default), then one warm-up and
``--repeats`` timed forward and forward+backward calls of
``gape.distributed.context_parallel_attention`` (the fused C++ block
kernels), each timed between barriers (the slowest rank's time counts).

Memory: the peak resident set of a forward+backward step above the rank's
resident set just before it (Linux ``VmHWM``, reset through
``/proc/self/clear_refs``), i.e. what the step allocates beyond its inputs,
plus the bytes of the input shards themselves. Traffic: bytes this rank sent
through the ring (``gape.distributed.ring.traffic``) in one forward and one
forward+backward.

Threads: the machine's cores are split between the ranks (at least one each),
so a world size above the core count oversubscribes; the rows say so.
Rows go to ``benchmarks/results/bench_context_parallel/bench_context_parallel_<date>.json`` and ``.csv``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "bench_context_parallel"


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _rank_main(rank, world, port, args, threads, queue):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    from datetime import timedelta

    from gape import distributed as gd
    from gape.distributed.ring import traffic

    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(minutes=30))
        g = torch.Generator().manual_seed(0)
        n, hq, hkv, d = args.length, args.hq, args.hkv, args.d
        full = [torch.randn(1, hq, n, d, generator=g), torch.randn(1, hkv, n, d, generator=g),
                torch.randn(1, hkv, n, d, generator=g), torch.rand(1, hq, n, generator=g) * 0.1,
                torch.rand(1, hkv, n, generator=g)]
        xs = [gd.shard(t, 2, layout=args.layout).contiguous() for t in full]
        grad = gd.shard(torch.randn(1, hq, n, d, generator=g), 2, layout=args.layout).contiguous()
        del full
        input_bytes = sum(t.numel() * t.element_size() for t in xs) + grad.numel() * grad.element_size()
        kw = dict(is_causal=not args.non_causal, distance=args.distance, layout=args.layout)

        def step(backward):
            ins = [t.detach().requires_grad_(backward) for t in xs]
            with torch.set_grad_enabled(backward):
                out = gd.context_parallel_attention(*ins, **kw)
                if backward:
                    out.backward(grad)
            return out

        def timed(backward):
            dist.barrier()
            t0 = time.perf_counter()
            step(backward)
            dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            return float(dt)

        step(True)  # warm-up: kernel load, allocator
        traffic.reset()
        step(False)
        fwd_bytes = traffic.bytes_sent
        traffic.reset()
        step(True)
        step_bytes = traffic.bytes_sent
        import ctypes
        import gc

        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap pages back, so the peak counts this step only
        except OSError:
            pass
        rss_before = _status_kb("VmRSS")
        exact = _reset_peak()
        step(True)
        peak = _status_kb("VmHWM")
        fwd = [timed(False) for _ in range(args.repeats)]
        both = [timed(True) for _ in range(args.repeats)]
        result = {
            "rank": rank, "fwd_s": fwd, "fwd_bwd_s": both, "input_mb": input_bytes / 2**20,
            "step_peak_above_inputs_mb": (peak - rss_before) / 1024, "peak_exact": exact,
            "fwd_sent_mb": fwd_bytes / 2**20, "fwd_bwd_sent_mb": step_bytes / 2**20,
        }
    except BaseException as exc:  # reported to the parent
        result = {"rank": rank, "error": f"{type(exc).__name__}: {exc}"}
    queue.put(result)
    if dist.is_initialized():
        dist.destroy_process_group()


def run_world(world: int, args) -> list[dict]:
    import torch.multiprocessing as mp

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from dist_helpers import free_port

    # big buffers always mmapped (no dynamic threshold): freed memory leaves the RSS at once
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    cores = os.cpu_count() or 1
    threads = max(1, cores // world)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, args, threads, queue)) for r in range(world)]
    for p in procs:
        p.start()
    rows = [queue.get(timeout=args.timeout) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    rows.sort(key=lambda r: r["rank"])
    for r in rows:
        r.update(world=world, threads_per_rank=threads, oversubscribed=world * threads > cores)
    return rows


def main(argv=None) -> int:
    import torch

    import gape
    from gape._io import write_csv_atomic, write_json_atomic
    from gape._machine import cpu_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=16384, help="total sequence length (all ranks together)")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--hq", type=int, default=8)
    p.add_argument("--hkv", type=int, default=2)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--layout", choices=("zigzag", "contiguous"), default="zigzag")
    p.add_argument("--distance", choices=("log", "linear"), default="log")
    p.add_argument("--non-causal", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    date = _dt.datetime.now(_dt.timezone.utc)
    out = args.out or RESULTS / f"bench_context_parallel_{date:%Y-%m-%d}"
    meta = {
        "benchmark": "bench_context_parallel", "date": date.isoformat(timespec="seconds"), "cpu_model": cpu_model(),
        "cores": os.cpu_count(), "torch_version": torch.__version__, "gape_version": getattr(gape, "__version__", "?"),
        "python": platform.python_version(), "shape": {"B": 1, "Hq": args.hq, "Hkv": args.hkv, "D": args.d, "L": args.length},
        "dtype": "float32", "causal": not args.non_causal, "distance": args.distance, "layout": args.layout,
        "load_average_at_start": os.getloadavg()[0],
    }
    rows = []
    for world in args.worlds:
        got = run_world(world, args)
        errors = [r["error"] for r in got if "error" in r]
        if errors:
            print(f"W={world}: {errors}", file=sys.stderr)
            return 1
        for r in got:
            r["load_average_after"] = os.getloadavg()[0]  # other jobs on the machine skew the times
        rows.extend(got)
        worst = lambda key: max(statistics.median(r[key]) for r in got)  # noqa: E731
        print(f"W={world} (threads/rank {got[0]['threads_per_rank']}{', oversubscribed' if got[0]['oversubscribed'] else ''}): "
              f"fwd {worst('fwd_s'):.2f} s, fwd+bwd {worst('fwd_bwd_s'):.2f} s, per rank: inputs "
              f"{got[0]['input_mb']:.1f} MB, step peak above inputs {max(r['step_peak_above_inputs_mb'] for r in got):.1f} MB, "
              f"sent fwd {got[0]['fwd_sent_mb']:.1f} MB / fwd+bwd {got[0]['fwd_bwd_sent_mb']:.1f} MB", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(str(out.with_suffix(".json")), {"meta": meta, "rows": rows}, indent=1)
    fields = ["world", "rank", "threads_per_rank", "oversubscribed", "fwd_median_s", "fwd_bwd_median_s", "input_mb",
              "step_peak_above_inputs_mb", "fwd_sent_mb", "fwd_bwd_sent_mb", "cpu_model", "torch_version", "date",
              "length", "layout"]
    csv_rows = [{
        "world": r["world"], "rank": r["rank"], "threads_per_rank": r["threads_per_rank"], "oversubscribed": r["oversubscribed"],
        "fwd_median_s": f"{statistics.median(r['fwd_s']):.4f}", "fwd_bwd_median_s": f"{statistics.median(r['fwd_bwd_s']):.4f}",
        "input_mb": f"{r['input_mb']:.2f}", "step_peak_above_inputs_mb": f"{r['step_peak_above_inputs_mb']:.2f}",
        "fwd_sent_mb": f"{r['fwd_sent_mb']:.2f}", "fwd_bwd_sent_mb": f"{r['fwd_bwd_sent_mb']:.2f}",
        "cpu_model": meta["cpu_model"], "torch_version": meta["torch_version"], "date": meta["date"],
        "length": args.length, "layout": args.layout,
    } for r in rows]
    write_csv_atomic(str(out.with_suffix(".csv")), fields, csv_rows, lineterminator="\n")
    print(f"rows in {out.with_suffix('.json')} and .csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
