"""benchmarks/bench_cpu_terms.py -- what learned sinks and the soft-cap cost the C++ CPU forward.

In one process, alternating: the forward built from another revision's kernel source (default
``main``, before sinks and the soft-cap; registered under the op namespace ``gape_base`` so both
builds load side by side) against this checkout's kernel without the terms (the plain path must
not slow down), and this checkout's kernel with sinks, with a soft-cap and with both (what the
terms cost). float32, one thread, causal, B=1, 9/3 heads, D=64, L=4096.

    python benchmarks/bench_cpu_terms.py [REPS] [REV]
"""

import datetime
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils import cpp_extension

from gape._io import write_results_json
from gape._machine import machine_record
from gape._threads import set_threads
from gape.core.torch_backend import _kernel_args
from gape.kernels import attention_cpu

REPS = int(sys.argv[1]) if len(sys.argv) > 1 else 7
REV = sys.argv[2] if len(sys.argv) > 2 else "main"
B, HQ, HKV, L, D = 1, 9, 3, 4096, 64
SCALE = D**-0.5


def load_base(rev: str) -> None:
    """Build ``rev``'s kernel with its ops under ``torch.ops.gape_base``."""
    root = Path(__file__).resolve().parents[1]
    src = subprocess.run(["git", "show", f"{rev}:kernels/attention_cpu.cpp"], cwd=root, check=True,
                         capture_output=True, text=True).stdout
    src = src.replace("TORCH_LIBRARY_FRAGMENT(gape, m)", "TORCH_LIBRARY_FRAGMENT(gape_base, m)")
    src = src.replace("TORCH_LIBRARY_IMPL(gape, CPU, m)", "TORCH_LIBRARY_IMPL(gape_base, CPU, m)")
    cap = attention_cpu.capability()
    name = f"gape_base_{cap.lower()}_{hashlib.sha256(src.encode()).hexdigest()[:10]}"
    build = Path(cpp_extension._get_build_directory(name, verbose=False))
    path = build / "attention_cpu_base.cpp"
    if not path.exists() or path.read_text() != src:
        path.write_text(src)
    attention_cpu._put_ninja_on_path()
    cpp_extension.load(name=name, sources=[str(path)], extra_cflags=attention_cpu._cflags(cap),
                       extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)


def alternate(fns: dict, reps: int) -> dict:
    """Median seconds of each callable, timed alternately (the order reversed every other
    round), so that load drifting over the run reaches every one alike."""
    times = {n: [] for n in fns}
    order = list(fns)
    for i in range(reps):
        for n in order if i % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


def record(rev: str, reps: int) -> dict:
    """The fields every row of these kernel benchmarks carries: date, machine, base revision."""
    short = subprocess.run(["git", "rev-parse", "--short", rev], capture_output=True, text=True,
                           cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                **machine_record(), cpu_capability=attention_cpu.capability(), reps=reps,
                base_rev=f"{rev} ({short})", loadavg=open("/proc/loadavg").read().split()[0])


def main():
    set_threads(1)
    assert attention_cpu.available(), attention_cpu.unavailable_reason()
    load_base(REV)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, L, HQ, D, generator=g).transpose(1, 2)  # as transformers hands it over
    k, v = (torch.randn(B, HKV, L, D, generator=g) for _ in range(2))
    lam, pi = torch.rand(B, HQ, L, generator=g) * 0.1, torch.rand(B, HKV, L, generator=g)
    sinks = torch.randn(HQ, generator=g)
    args, kw = _kernel_args(q, k, v, lam, pi, None, True, "log")
    prep = attention_cpu._prepare(*args, True, kw["segments"], kw["delta_lo"], kw["delta_hi"], kw["phi_zero"])
    query, key, value, qg, keep, phi, zero, mask, seg, dlo, dhi = prep
    qb = attention_cpu._q_block(L)

    def base():
        out = torch.empty(B, L, HQ, D).transpose(1, 2)
        torch.ops.gape_base.cpu_attention_fwd(query, key, value, qg, keep, phi, zero, mask, seg, dlo, dhi, out, None,
                                              SCALE, qb, attention_cpu.K_BLOCK, False)
        return out

    def run(**terms):
        def fn():
            out = torch.empty(B, L, HQ, D).transpose(1, 2)
            return attention_cpu.attention_forward(*args, True, SCALE, out=out, **kw, **terms)
        return fn

    fns = {"base": base, "plain": run(), "sinks": run(sinks=sinks), "softcap": run(softcap=20.0),
           "sinks+softcap": run(sinks=sinks, softcap=20.0)}
    torch.testing.assert_close(fns["plain"](), base(), rtol=0, atol=0)
    med = alternate(fns, REPS)
    row = dict(record(REV, REPS), shape=f"B{B}-H{HQ}/{HKV}-L{L}-D{D}-causal-f32",
               median_s={n: round(t, 4) for n, t in med.items()},
               ratio_to_base={n: round(med[n] / med["base"], 3) for n in fns})
    print(json.dumps(row, indent=1))
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_cpu_terms", "bench_cpu_terms.json")
    write_results_json(out, row)


if __name__ == "__main__":
    main()
