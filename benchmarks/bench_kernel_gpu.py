"""GPU throughput of the fused GAPE kernel against its bias-free twin, SDPA
(flash), FlexAttention with a GAPE ``score_mod``, and flash-attn when installed.

Shapes follow the FlashAttention-2 benchmark: B*L = 16k tokens, H*D = 2048,
D in {64, 128}, L from 512 to 16k, causal and not, forward and forward+backward.
Throughput uses the standard FLOP count ``4*B*H*Lq*Lk*D`` (halved when causal;
x2.5 more for the backward, so forward+backward is x3.5). Times are
``triton.testing.do_bench`` medians with 20th/80th percentiles; ``first_call_s``
is the first call (compilation and autotuning), ``peak_mem_mb`` the peak of one
call.

    python benchmarks/bench_kernel_gpu.py --out benchmarks/results/kernel_gpu.csv

Rows are appended to the CSV as they are measured (atomic rewrite) and a
rerun skips rows already present. A plot is written next to the CSV.
Design targets (H100, bf16): forward >= 90% and forward+backward >= 85% of
``gape-nobias``; >= 1.1x ``flex``.

Without CUDA the script prints why and exits with status 2.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time

from gape._io import save_figure_atomic, write_csv_atomic

FIELDS = ["provider", "mode", "causal", "batch", "heads", "seqlen", "head_dim", "dtype", "device", "torch", "triton",
          "ms", "ms_p20", "ms_p80", "tflops", "peak_mem_mb", "first_call_s", "error"]
PROVIDERS = ["gape", "gape-nobias", "sdpa-flash", "flex", "flash-attn"]
CAUSAL_CHOICES = {"both": (True, False), "causal": (True,), "full": (False,)}


def flops(batch, heads, seqlen, head_dim, causal, mode) -> float:
    f = 4.0 * batch * heads * seqlen * seqlen * head_dim
    if causal:
        f /= 2
    return f * (3.5 if mode == "fwd+bwd" else 1.0)


def make_inputs(torch, batch, heads, seqlen, head_dim, dtype, grad):
    def t(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", dtype=dtype) * scale).requires_grad_(grad)

    q, k, v = (t(batch, heads, seqlen, head_dim) for _ in range(3))
    lam = (torch.rand(batch, heads, seqlen, device="cuda") * 0.1).requires_grad_(grad)
    pi = torch.rand(batch, heads, seqlen, device="cuda").requires_grad_(grad)
    return q, k, v, lam, pi


def setup_provider(name, torch, causal, inputs):
    """A zero-argument callable returning the attention output, or raise to skip."""
    q, k, v, lam, pi = inputs
    if name in ("gape", "gape-nobias"):
        from gape.kernels.attention import gape_attention_triton

        has_bias = name == "gape"
        return lambda: gape_attention_triton(q, k, v, lam, pi, is_causal=causal, distance="log", has_bias=has_bias)
    if name == "sdpa-flash":
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def run():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return run
    if name == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def score_mod(score, b, h, q_idx, kv_idx):
            delta = q_idx - kv_idx if causal else (q_idx - kv_idx).abs()
            phi = torch.log1p(delta.clamp_min(0).to(torch.float32))
            return score - lam[b, h, q_idx] * (1.0 - pi[b, h, kv_idx]) * phi

        # A fresh compile per row: dynamo's recompile limit (8) would otherwise
        # fall back to eager flex_attention part-way through the grid.
        torch._dynamo.reset()
        block_mask = None
        if causal:
            lq = q.shape[2]
            block_mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, lq, lq, device="cuda")
        compiled = torch.compile(flex_attention, dynamic=False)
        return lambda: compiled(q, k, v, score_mod=score_mod, block_mask=block_mask)
    if name == "flash-attn":
        from flash_attn import flash_attn_func  # optional dependency

        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # flash-attn wants [B, L, H, D]
        return lambda: flash_attn_func(qt, kt, vt, causal=causal)
    raise ValueError(f"unknown provider {name!r}")


def measure(torch, triton, fn, mode, inputs):
    if mode == "fwd":
        bench = fn
    else:
        out = fn()
        grad = torch.randn_like(out)
        leaves = [x for x in inputs if x.requires_grad]

        def bench():
            o = fn()
            torch.autograd.grad(o, leaves, grad, allow_unused=True)

    t0 = time.perf_counter()
    bench()  # compile / autotune outside the timing
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    # peak of one call, before do_bench allocates its L2-flushing buffer
    torch.cuda.reset_peak_memory_stats()
    bench()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**20
    ms, p20, p80 = triton.testing.do_bench(bench, quantiles=[0.5, 0.2, 0.8])
    return ms, p20, p80, peak, first


def read_done(path):
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path, rows):
    write_csv_atomic(path, FIELDS, rows)


def plot(path, rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good = [r for r in rows if not r["error"]]
    panels = sorted({(r["head_dim"], r["causal"], r["mode"]) for r in good})
    if not panels:
        return
    cols = 4
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    for ax, (d, causal, mode) in zip(axes.flat, panels):
        for prov in PROVIDERS:
            pts = sorted((int(r["seqlen"]), float(r["tflops"])) for r in good
                         if r["provider"] == prov and (r["head_dim"], r["causal"], r["mode"]) == (d, causal, mode))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=prov)
        ax.set_xscale("log", base=2)
        ax.set_title(f"D={d} causal={causal} {mode}", fontsize=9)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("TFLOP/s")
    axes.flat[0].legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    save_figure_atomic(fig, os.path.splitext(path)[0] + ".png", dpi=120)
    plt.close(fig)


def summarize(rows):
    """Ratios against the design targets, per shape."""
    by = {}
    for r in rows:
        if not r["error"]:
            by[(r["provider"], r["mode"], r["causal"], r["seqlen"], r["head_dim"])] = float(r["tflops"])
    for (prov, mode, causal, seqlen, d), tf in sorted(by.items()):
        if prov != "gape":
            continue
        parts = [f"{mode:7s} causal={causal:5s} L={seqlen:>5s} D={d:>3s}: {tf:6.1f} TFLOP/s"]
        for other, label in (("gape-nobias", "of no-bias"), ("flex", "x flex"), ("sdpa-flash", "of sdpa")):
            ref = by.get((other, mode, causal, seqlen, d))
            if ref:
                parts.append(f"{tf / ref:5.2f} {label}")
        print("  ".join(parts))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/kernel_gpu.csv")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--tokens", type=int, default=16384, help="batch * seqlen")
    parser.add_argument("--hidden", type=int, default=2048, help="heads * head_dim")
    parser.add_argument("--providers", nargs="+", default=PROVIDERS, choices=PROVIDERS)
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    parser.add_argument("--causal", default="both", choices=["both", "causal", "full"])
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("bench_kernel_gpu: no CUDA device visible; this benchmark times GPU kernels and cannot run here. "
              "Correctness is tested on the CPU in Triton's interpreter (pytest tests/test_kernels_attention.py) "
              "and compilation by `gape audit-kernels`.", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("bench_kernel_gpu: unset TRITON_INTERPRET to time compiled kernels", file=sys.stderr)
        return 2
    import triton

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    rows = read_done(args.out)
    done = {(r["provider"], r["mode"], r["causal"], r["seqlen"], r["head_dim"], r["dtype"]) for r in rows}
    device = torch.cuda.get_device_name()
    for d in args.head_dims:
        heads = args.hidden // d
        for seqlen in args.seqlens:
            batch = max(1, args.tokens // seqlen)
            for causal in CAUSAL_CHOICES[args.causal]:
                for mode in args.modes:
                    for prov in args.providers:
                        key = (prov, mode, str(causal), str(seqlen), str(d), args.dtype)
                        if key in done:
                            continue
                        row = dict(provider=prov, mode=mode, causal=causal, batch=batch, heads=heads, seqlen=seqlen,
                                   head_dim=d, dtype=args.dtype, device=device, torch=torch.__version__,
                                   triton=triton.__version__, ms="", ms_p20="", ms_p80="", tflops="", peak_mem_mb="",
                                   first_call_s="", error="")
                        try:
                            inputs = make_inputs(torch, batch, heads, seqlen, d, dtype, mode == "fwd+bwd")
                            fn = setup_provider(prov, torch, causal, inputs)
                            ms, p20, p80, peak, first = measure(torch, triton, fn, mode, inputs)
                            row.update(ms=f"{ms:.4f}", ms_p20=f"{p20:.4f}", ms_p80=f"{p80:.4f}",
                                       tflops=f"{flops(batch, heads, seqlen, d, causal, mode) / ms * 1e-9:.2f}",
                                       peak_mem_mb=f"{peak:.0f}", first_call_s=f"{first:.1f}")
                        except ImportError as exc:
                            row["error"] = f"not installed: {exc.name or exc}"
                        except Exception as exc:  # one failing provider must not stop the sweep
                            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                        finally:
                            inputs = fn = None
                            torch.cuda.empty_cache()
                        print(",".join(str(row[f]) for f in FIELDS), flush=True)
                        rows.append({k: str(v) for k, v in row.items()})
                        write_rows(args.out, rows)
    try:
        plot(args.out, rows)
    except ImportError as exc:  # a bare GPU machine may lack matplotlib; the CSV is the result
        print(f"bench_kernel_gpu: no plot ({exc.name or exc} is not installed)", file=sys.stderr)
    summarize(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
