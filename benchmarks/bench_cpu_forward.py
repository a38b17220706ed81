"""benchmarks/bench_cpu_forward.py -- the C++ CPU forward (float32) against PyTorch's SDPA.

In one process, alternating (the order reversed every other round): PyTorch's
``F.scaled_dot_product_attention`` (causal, no bias: the floor), the forward built from another
revision's kernel source (default ``main``; ops registered as ``gape_base``, see
bench_cpu_terms.py) and this checkout's forward, at this kernel's block sizes. float32, one
thread, causal, B=1, 9/3 heads, D=64, distance "log", both gates. Medians, and each one's ratio
to SDPA and to the base revision; one row per length appended to
results/bench_cpu_forward/bench_cpu_forward.json.

    python benchmarks/bench_cpu_forward.py [REPS] [REV] [L ...]
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_cpu_terms import alternate, load_base, record
from gape._io import write_results_json
from gape._threads import set_threads
from gape.core.torch_backend import _kernel_args
from gape.kernels import attention_cpu

REPS = int(sys.argv[1]) if len(sys.argv) > 1 else 7
REV = sys.argv[2] if len(sys.argv) > 2 else "main"
LENGTHS = [int(x) for x in sys.argv[3:]] or [4096]
B, HQ, HKV, D = 1, 9, 3, 64
SCALE = D**-0.5
OUT = Path(__file__).resolve().parent / "results" / "bench_cpu_forward" / "bench_cpu_forward.json"


def measure(L: int) -> dict:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, HQ, L, D, generator=g)
    k, v = (torch.randn(B, HKV, L, D, generator=g) for _ in range(2))
    lam, pi = torch.rand(B, HQ, L, generator=g) * 0.1, torch.rand(B, HKV, L, generator=g)
    args, kw = _kernel_args(q, k, v, lam, pi, None, True, "log")
    prep = attention_cpu._prepare(*args, True, kw["segments"], kw["delta_lo"], kw["delta_hi"], kw["phi_zero"])
    query, key, value, qg, keep, phi, zero, mask, seg, dlo, dhi = prep
    qb, kb = attention_cpu._q_block(L), attention_cpu.K_BLOCK

    def kernel(ns):
        def fn():
            out = torch.empty(B, HQ, L, D)
            getattr(torch.ops, ns).cpu_attention_fwd(query, key, value, qg, keep, phi, zero, mask, seg, dlo, dhi, out,
                                                     None, SCALE, qb, kb, False)
            return out
        return fn

    fns = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
           "base": kernel("gape_base"), "this": kernel("gape")}
    # float32 rounding differs between the two (the scale moved into the GEMM); both match the
    # float64 reference in tests/test_kernels_attention_cpu.py
    torch.testing.assert_close(fns["this"](), fns["base"](), rtol=1e-4, atol=1e-5)
    med = alternate(fns, REPS)
    return dict(record(REV, REPS), shape=f"B{B}-H{HQ}/{HKV}-L{L}-D{D}-causal-log-f32", blocks=f"{qb}x{kb}",
                median_s={n: round(t, 4) for n, t in med.items()},
                ratio_to_sdpa={n: round(med[n] / med["sdpa"], 3) for n in fns},
                ratio_to_base={n: round(med[n] / med["base"], 3) for n in fns})


def main():
    set_threads(1)
    assert attention_cpu.available(), attention_cpu.unavailable_reason()
    load_base(REV)
    rows = json.loads(OUT.read_text()) if OUT.exists() else []
    for L in LENGTHS:
        row = measure(L)
        print(json.dumps(row, indent=1), flush=True)
        rows.append(row)
        write_results_json(str(OUT), rows)


if __name__ == "__main__":
    os.makedirs(OUT.parent, exist_ok=True)
    main()
