"""GAPE attention providers side by side: time and peak memory, ratio to the floor.

Providers (B=1, 9 query / 3 kv heads, D=64, causal by default):

- ``floor``        ``F.scaled_dot_product_attention`` without any bias (the floor)
- ``torch``        gape's torch backend, distance="log" (its fused C++ CPU kernel
                   when built, as ``auto`` runs it)
- ``torch-tiles``  the same backend with the C++ kernel switched off: its
                   pure-PyTorch tiles (what runs without a compiler)
- ``torch-half-dot`` / ``torch-float-dot``  bfloat16/float16 only: the C++ kernel
                   with its products forced onto half-precision operands (MKL's
                   ``gemm_bf16bf16f32``) or onto operands widened to float32
                   (``torch`` takes whichever the CPU's arithmetic favours)
- ``sdpa``         gape's sdpa backend (augmented channels), distance="linear"
- ``materialized`` SDPA with a materialized float GAPE bias (built every call)
- ``flex``         ``torch.compile(flex_attention)`` with a GAPE ``score_mod`` and a
                   causal block mask

``ratio_to_floor`` divides a provider's median by the median of floor calls
timed alternately with it in the same subprocess (``--no-interleave``: by the
floor's own row), so a shared machine's load drifting between runs cancels.
``gflops`` counts the causal matrix products (backward = 2.5x forward), and
``gemm_peak_gflops`` is the best of ``torch.matmul`` on 1024^3 matrices of the
row's dtype timed in the same subprocess before and after the provider;
``fraction_of_gemm_peak`` is their ratio. ``kernel_products`` says which form the
C++ kernel's products took (``float32``, ``half`` operands, or ``-``).

Every (provider, pass, L) runs in its own subprocess, so peak memory is honest:
the subprocess resets the kernel's peak-RSS counter (``/proc/self/clear_refs``)
just before the first measured call and reports ``VmHWM - VmRSS`` (extra
resident memory at the peak) on the CPU, or ``torch.cuda.max_memory_allocated``
growth on CUDA. Eager providers are measured on their first call; ``flex`` after
its compile warm-up. Rows are appended to
``benchmarks/results/bench_attention/<date>.csv`` one at a time (rewrite to a
temporary file + ``os.replace``), so an interrupted run loses nothing, and a
rerun skips rows already there unless ``--force``.

Example:
    python benchmarks/bench_attention.py --lengths 1024 4096
    python benchmarks/bench_attention.py --lengths 32768 --providers torch --passes fwd --repeats 1
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from gape._io import write_csv_atomic
from gape._machine import cpu_model

PROVIDERS = ("floor", "torch", "torch-tiles", "torch-half-dot", "torch-float-dot", "sdpa", "materialized", "flex")
PASSES = ("fwd", "fwd+bwd")
FIELDS = (
    "provider", "pass", "L", "dtype", "device", "threads", "median_s", "p20_s", "p80_s", "repeats",
    "peak_mem_mb", "ratio_to_floor", "floor_median_same_process_s", "tflops", "gflops", "gemm_peak_gflops",
    "fraction_of_gemm_peak", "kernel_products", "distance", "omp_wait_policy", "load_avg_1m",
    "torch_version", "cpu_model", "date", "error",
)  # fmt: skip
RESULTS = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------- worker


def _mem_probe(device: str):
    """(reset, read) for peak extra memory in MB."""
    import torch

    if device == "cuda":
        def reset():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()

        def read(base):
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - base) / 2**20

        return reset, read

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"{key} not in /proc/self/status")

    def reset():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return status("VmRSS:")

    def read(base):
        return (status("VmHWM:") - base) / 2**20

    return reset, read


def _setup(provider: str, L: int, dtype, device: str, need_grad: bool):
    """Inputs and a zero-argument callable returning the output."""
    import torch
    import torch.nn.functional as F

    import gape

    b, hq, hkv, d = 1, 9, 3, 64
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_(need_grad)

    q, k, v = rnd(b, hq, L, d), rnd(b, hkv, L, d), rnd(b, hkv, L, d)
    lam = (torch.rand(b, hq, L, generator=g) * 0.1).to(device=device, dtype=dtype).requires_grad_(need_grad)
    pi = torch.rand(b, hkv, L, generator=g).to(device=device, dtype=dtype).requires_grad_(need_grad)
    leaves = [q, k, v, lam, pi]

    if provider == "floor":
        leaves = [q, k, v]
        return leaves, lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    if provider == "torch":
        return leaves, lambda: gape.attention(q, k, v, lam, pi, distance="log", backend="torch")
    if provider in ("torch-half-dot", "torch-float-dot"):
        from gape.kernels import attention_cpu

        os.environ[attention_cpu.ENV_DOT] = provider.split("-")[1]  # this worker process only
        return leaves, lambda: gape.attention(q, k, v, lam, pi, distance="log", backend="torch")
    if provider == "torch-tiles":
        from gape.kernels import attention_cpu

        attention_cpu.available = lambda: False  # this worker process only
        return leaves, lambda: gape.attention(q, k, v, lam, pi, distance="log", backend="torch")
    if provider == "sdpa":
        return leaves, lambda: gape.attention(q, k, v, lam, pi, distance="linear", backend="sdpa")
    if provider == "materialized":
        from gape.core.reference import gape_bias

        causal = torch.ones(L, L, dtype=torch.bool, device=device).tril_()

        def run():
            bias = gape_bias(lam, pi.repeat_interleave(hq // hkv, dim=1), L, L, True, "log").to(dtype)
            bias = bias.masked_fill(~causal, float("-inf"))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)

        return leaves, run
    if provider == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        rep = hq // hkv

        def score_mod(score, bi, h, qi, ki):
            delta = (qi - ki).clamp(min=0).to(torch.float32)
            return score - lam[bi, h, qi] * (1 - pi[bi, h // rep, ki]) * torch.log1p(delta)

        def causal_mask(bi, h, qi, ki):
            return qi >= ki

        block_mask = create_block_mask(causal_mask, None, None, L, L, device=device)
        flex = torch.compile(flex_attention, dynamic=False)
        return leaves, lambda: flex(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=True)
    raise ValueError(f"unknown provider {provider!r}; choose from {PROVIDERS}")


def gemm_peak_gflops(dtype, n: int = 1024, repeats: int = 3) -> float:
    """The best GFLOP/s of ``torch.matmul`` on ``n x n`` matrices of ``dtype`` (CPU)."""
    import torch

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def _kernel_products(provider: str, dtype) -> str:
    if provider not in ("torch", "torch-half-dot", "torch-float-dot"):
        return "-"
    from gape.kernels import attention_cpu

    if not attention_cpu.available():
        return "-"
    return "half" if attention_cpu.half_dot(dtype) else "float32"


def worker(spec: dict) -> dict:
    import torch

    from gape._threads import set_threads

    set_threads(spec["threads"])
    dtype = getattr(torch, spec["dtype"])
    device = spec["device"]
    need_grad = spec["pass"] == "fwd+bwd"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    leaves, fn = _setup(spec["provider"], spec["L"], dtype, device, need_grad)
    grad_out = torch.randn(1, 9, spec["L"], 64, device=device, dtype=dtype) if need_grad else None

    def timed(f, leaves):
        t0 = time.perf_counter()
        if need_grad:
            for t in leaves:
                t.grad = None
            f().backward(grad_out)
        else:
            with torch.no_grad():
                f()
        sync()
        return time.perf_counter() - t0

    peaks = [gemm_peak_gflops(dtype)] if device == "cpu" else []
    if spec["provider"] == "flex":
        timed(fn, leaves)  # compile outside the measurement
    reset, read = _mem_probe(device)
    base = reset()
    times = [timed(fn, leaves)]
    peak = read(base)
    # The floor is timed in the same process, alternating with the provider, so
    # the ratio survives the load of a shared machine drifting between runs.
    floor = _setup("floor", spec["L"], dtype, device, need_grad) if spec.get("interleave_floor") else None
    floor_times = []
    # The first call of each paid for first-touch page faults: it is a warm-up,
    # and `repeats` timed calls follow it.
    for _ in range(spec["repeats"]):
        if floor is not None:
            floor_times.append(timed(floor[1], floor[0]))
        times.append(timed(fn, leaves))
    if floor is not None:
        floor_times.append(timed(floor[1], floor[0]))
        floor_times = floor_times[1:]
    times = times[1:]
    if device == "cpu":
        peaks.append(gemm_peak_gflops(dtype))
    return {"times": times, "peak_mem_mb": peak, "floor_times": floor_times, "gemm_peak_gflops": max(peaks, default=None),
            "kernel_products": _kernel_products(spec["provider"], dtype)}


# --------------------------------------------------------------------------- driver


def _quantile(xs, q):
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _flops(L: int, passes: str) -> float:
    f = 4 * 1 * 9 * L * L * 64 / 2  # 4*B*H*Lq*Lk*D, halved for causal
    return f * (3.5 if passes == "fwd+bwd" else 1.0)  # backward = 2.5x forward


def _append_row(path: Path, row: dict) -> None:
    rows = []
    if path.exists():
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    rows.append({k: row.get(k, "") for k in FIELDS})
    write_csv_atomic(path, FIELDS, rows)


def _done(path: Path) -> dict:
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        return {(r["provider"], r["pass"], r["L"], r["threads"], r["dtype"]): r for r in csv.DictReader(f)}


def run_one(spec: dict, timeout: float, omp_policy: str) -> dict:
    env = dict(os.environ)
    # the worker then only calls torch.set_num_threads if this did not take (see gape._threads)
    env["OMP_NUM_THREADS"] = str(spec["threads"])
    if omp_policy != "default":
        env["OMP_WAIT_POLICY"] = omp_policy.upper()
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        msg = next((ln for ln in reversed(tail) if ln.strip()), f"exit {proc.returncode}")
        return {"error": msg[:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    p.add_argument("--passes", nargs="+", default=list(PASSES), choices=PASSES)
    p.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (median of these)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--omp-wait-policy",
        default="default",
        choices=["passive", "active", "default"],
        help="OMP_WAIT_POLICY for every provider's subprocess. On a shared, loaded machine "
        "spinning OpenMP workers starve each other and multi-op providers slow down by "
        "10x or more; 'default' leaves the environment alone",
    )
    p.add_argument(
        "--no-interleave",
        action="store_true",
        help="take ratio_to_floor from the floor's own row instead of timing the floor "
        "alternately with each provider in its subprocess (halves the run time)",
    )
    p.add_argument("--timeout", type=float, default=900, help="seconds per measurement subprocess")
    p.add_argument("--out", type=Path, default=None, help="CSV path (default results/bench_attention_<date>.csv)")
    p.add_argument("--force", action="store_true", help="re-measure rows already in the CSV")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    import torch

    date = _dt.date.today().isoformat()
    out = args.out or RESULTS / "bench_attention" / f"{date}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {} if args.force else _done(out)
    common = dict(
        dtype=args.dtype, device=args.device, threads=args.threads, torch_version=torch.__version__,
        cpu_model=cpu_model() if args.device == "cpu" else torch.cuda.get_device_name(), omp_wait_policy=args.omp_wait_policy,
    )  # fmt: skip
    table = []
    for L in args.lengths:
        for passes in args.passes:
            prior = done.get(("floor", passes, str(L), str(args.threads), args.dtype))
            floor_median = float(prior["median_s"]) if prior and prior.get("median_s") else None
            providers = ["floor"] + [x for x in args.providers if x != "floor"] if "floor" in args.providers else args.providers
            for provider in providers:
                key = (provider, passes, str(L), str(args.threads), args.dtype)
                if key in done:
                    row = done[key]
                    if provider == "floor" and row["median_s"]:
                        floor_median = float(row["median_s"])
                    table.append(row)
                    print(f"[skip] {provider} {passes} L={L}: already in {out.name}", flush=True)
                    continue
                spec = dict(provider=provider, L=L, dtype=args.dtype, device=args.device, threads=args.threads, repeats=args.repeats)
                spec["pass"] = passes
                spec["interleave_floor"] = provider != "floor" and not args.no_interleave
                print(f"[run ] {provider:12s} {passes:8s} L={L} ...", end=" ", flush=True)
                res = run_one(spec, args.timeout, args.omp_wait_policy)
                row = dict(common, provider=provider, L=L, date=_dt.datetime.now().isoformat(timespec="seconds"))
                row["pass"] = passes
                row["distance"] = {"floor": "none", "sdpa": "linear"}.get(provider, "log")
                row["load_avg_1m"] = f"{os.getloadavg()[0]:.2f}"
                if "error" in res:
                    row["error"] = res["error"]
                    print("ERROR", res["error"], flush=True)
                else:
                    ts = res["times"]
                    med = statistics.median(ts)
                    row.update(
                        median_s=f"{med:.4f}", p20_s=f"{_quantile(ts, 0.2):.4f}", p80_s=f"{_quantile(ts, 0.8):.4f}",
                        repeats=len(ts), peak_mem_mb=f"{res['peak_mem_mb']:.1f}", tflops=f"{_flops(L, passes) / med / 1e12:.4f}",
                        gflops=f"{_flops(L, passes) / med / 1e9:.1f}", kernel_products=res.get("kernel_products", "-"),
                    )  # fmt: skip
                    if res.get("gemm_peak_gflops"):
                        row["gemm_peak_gflops"] = f"{res['gemm_peak_gflops']:.1f}"
                        row["fraction_of_gemm_peak"] = f"{_flops(L, passes) / med / 1e9 / res['gemm_peak_gflops']:.3f}"
                    if provider == "floor":
                        floor_median = med
                    if res.get("floor_times"):
                        same = statistics.median(res["floor_times"])
                        row["floor_median_same_process_s"] = f"{same:.4f}"
                        row["ratio_to_floor"] = f"{med / same:.2f}"
                    elif floor_median:
                        row["ratio_to_floor"] = f"{med / floor_median:.2f}"
                    print(f"median {med:.4f} s  peak +{res['peak_mem_mb']:.0f} MB  x{row.get('ratio_to_floor', '?')}", flush=True)
                _append_row(out, row)
                table.append({k: str(v) for k, v in row.items()})
    _print_table(table)
    print(f"\nrows in {out}")
    return 0


def _print_table(rows) -> None:
    print(f"\n{'provider':15s} {'pass':8s} {'L':>6s} {'dtype':>8s} {'median s':>9s} {'x floor':>8s} {'GFLOP/s':>8s} "
          f"{'of GEMM':>8s} {'peak MB':>8s}  error")
    for r in rows:
        print(
            f"{r['provider']:15s} {r['pass']:8s} {r['L']:>6s} {r.get('dtype', ''):>8s} {r.get('median_s', ''):>9s} "
            f"{r.get('ratio_to_floor', ''):>8s} {r.get('gflops', ''):>8s} {r.get('fraction_of_gemm_peak', ''):>8s} "
            f"{r.get('peak_mem_mb', ''):>8s}  {r.get('error', '')[:60]}"
        )


if __name__ == "__main__":
    sys.exit(main())
