"""``gape audit-kernels``: compile every shipped kernel variant ahead of time for
sm_80 (A100) and sm_90 (H100) and report what the hardware would run.

No GPU is needed: ``triton.compile`` with an explicit ``GPUTarget`` produces
PTX and a cubin. Registers and spills come from ``ptxas -v`` (Triton runs
ptxas with ``-v``; its log is captured), shared memory from the compiled
kernel's metadata, tensor-core use from the PTX (``mma.sync`` on sm_80,
``wgmma`` on sm_90).

"Shipped variants" are the autotune configs that survive the pruning filter of
:mod:`gape.kernels.attention` for a long sequence on that architecture, for
each kernel x causal x distance x head dim x dtype x positions x logit terms
(learned sinks, soft-cap).

The kernels must be real ``JITFunction`` objects, so when ``TRITON_INTERPRET``
is set (or the kernels were already decorated for the interpreter) the audit
re-runs itself in a subprocess without it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
import warnings

from .._io import write_json_atomic

ARCHS = {80: 163 * 1024, 90: 227 * 1024}  # opt-in shared memory per block: A100, H100
ARCH_NAMES = {80: "sm_80", 90: "sm_90"}
KERNELS = ("fwd", "bwd_preprocess", "bwd_kv", "bwd_q")
AUDIT_LEN = 4096  # sequence length the pruning filter sees (a long-context launch)
# position variant -> (HAS_WINDOW, IS_VARLEN)
POSITIONS = {"dense": (False, False), "window": (True, False), "varlen": (True, True)}
# logit terms -> (HAS_SINKS, HAS_SOFTCAP)
TERMS = {"none": (False, False), "sinks": (True, False), "softcap": (False, True), "sinks+softcap": (True, True)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from gape import _args as A

    parser.add_argument("--out", type=A.out_file, required=True, help="JSON file for the rows, written atomically (required)")
    parser.add_argument("--arch", type=int, nargs="+", default=sorted(ARCHS), choices=sorted(ARCHS),
                        help="compute capabilities to compile for (default: 80 90)")
    parser.add_argument("--head-dim", type=A.integer(16, 256), nargs="+", default=[64, 128],
                        help="head dims, 16..256 (default: 64 128)")
    parser.add_argument("--dtype", nargs="+", default=["fp16", "bf16"], choices=["fp16", "bf16", "fp32"],
                        help="input dtypes (default: fp16 bf16)")
    parser.add_argument("--kernel", nargs="+", default=list(KERNELS), choices=KERNELS,
                        help=f"kernels to compile (default: all, {' '.join(KERNELS)})")
    parser.add_argument("--causal", nargs="+", default=["1", "0"], choices=["1", "0"],
                        help="1 = causal, 0 = not (default: 1 0)")
    parser.add_argument("--distance", nargs="+", default=["log", "linear"], choices=["log", "linear"],
                        help="distance transforms (default: log linear)")
    parser.add_argument("--positions", nargs="+", default=list(POSITIONS), choices=POSITIONS,
                        help="position variants: dense (query offsets), window (local window), varlen (packed "
                             "sequences with a window); default all")
    parser.add_argument("--terms", nargs="+", default=list(TERMS), choices=TERMS,
                        help="logit terms: none, learned sinks, the tanh soft-cap, or both (default all); the "
                             "preprocess kernel only varies with the sinks")
    parser.add_argument("--first-config-only", action="store_true",
                        help="compile only the first surviving autotune config per variant, a quick check (default: every config)")
    parser.add_argument("--quiet", action="store_true", help="do not print the table (default: print it)")


def _argv(args) -> list[str]:
    argv = ["--out", args.out, "--arch", *map(str, args.arch), "--head-dim", *map(str, args.head_dim),
            "--dtype", *args.dtype, "--kernel", *args.kernel, "--causal", *args.causal, "--distance", *args.distance,
            "--positions", *args.positions, "--terms", *args.terms]
    if args.first_config_only:
        argv.append("--first-config-only")
    if args.quiet:
        argv.append("--quiet")
    return argv


def _needs_subprocess() -> bool:
    if os.environ.get("TRITON_INTERPRET"):
        return True
    mod = sys.modules.get("gape.kernels.attention")
    return mod is not None and mod._is_interpreted()


def run(args) -> int:
    if _needs_subprocess():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", "gape.kernels.audit", *_argv(args)], env=env)
    rows = audit(args)
    if not args.quiet:
        print_table(rows)
    bad = [r for r in rows if not r["meets_requirements"]]
    print(f"{len(rows)} variants compiled, {len(bad)} failing requirements; rows in {args.out}")
    return 1 if bad else 0


def _write(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_json_atomic(path, rows, indent=1)


_KEY = ("kernel", "arch", "head_dim", "dtype", "causal", "distance", "positions", "terms", "block_m", "block_n",
        "num_warps", "num_stages", "source")


def _previous(path: str) -> dict:
    """Rows of an earlier run with the same Triton version and kernel source, by variant, to resume."""
    import triton

    try:
        with open(path) as f:
            rows = json.load(f)
    except (OSError, ValueError):
        return {}
    return {tuple(r.get(k) for k in _KEY): r for r in rows if r.get("triton") == triton.__version__}


_TT_DTYPES = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}
_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
}


def _signature(fn, dtype: str, constexprs: dict) -> tuple[dict, dict]:
    """Argument types as a real launch specializes them: data pointers in the
    input dtype, gates/LSE/delta/gate grads fp32, key ranges int32, sizes and
    strides int32; pointers and row strides 16-divisible (head dims 64/128)."""
    data = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
    f32 = {"QG", "KG", "LSE", "DELTA", "DKG", "DQG", "SINKS", "DSINK"}
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in data:
            sig[name] = _TT_DTYPES[dtype]
        elif name in f32:
            sig[name] = "*fp32"
        elif name in ("KSTART", "KEND", "QOFF", "CU_Q", "CU_K"):
            sig[name] = "*i32"
        elif name in ("qk_scale", "sm_scale", "softcap2"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
        if sig[name].startswith("*") or name.startswith("stride_") or name in ("head_dim", "head_dim_v"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def _compile_one(fn, sig, attrs, constexprs, cc, num_warps, num_stages) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    from triton import knobs

    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    log = io.StringIO()
    old = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    knobs.nvidia.dump_ptxas_log = True  # Triton prints the `ptxas -v` log it already produces
    knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its log
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kernel = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                                    options={"num_warps": num_warps, "num_stages": num_stages})
    except Exception as exc:  # a failed variant is a row, not a crash
        return {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = old
    text = log.getvalue()
    found = {k: [int(x) for x in r.findall(text)] for k, r in _PTXAS_RE.items()}
    ptx = kernel.asm["ptx"]
    return {
        "ok": True,
        "compile_s": round(time.perf_counter() - t0, 2),
        "regs": max(found["regs"], default=None),
        "spills": sum(found["spill_stores"]) + sum(found["spill_loads"]),
        "spill_stores": sum(found["spill_stores"]),
        "spill_loads": sum(found["spill_loads"]),
        "stack_bytes": max(found["stack"], default=0),
        "shared_bytes": int(kernel.metadata.shared),
        "uses_mma": bool(re.search(r"\bmma\.sync", ptx)),
        "uses_wgmma": "wgmma.mma_async" in ptx,
    }


def _source_hash(fn) -> str:
    """Hash of the source of every jit function in the kernel's module (a
    resumed audit must not reuse rows of an edited kernel)."""
    import hashlib
    import triton

    module = sys.modules[fn.fn.__module__]
    srcs = sorted((name, obj.src) for name, obj in vars(module).items()
                  if isinstance(obj, triton.runtime.JITFunction))
    srcs += [(name, obj.fn.src) for name, obj in vars(module).items() if isinstance(obj, triton.runtime.Autotuner)]
    return hashlib.sha256(repr(sorted(srcs)).encode()).hexdigest()[:16]


def audit(args) -> list[dict]:
    import triton
    from tqdm.auto import tqdm

    from . import attention as A

    jit = {"fwd": A._gape_fwd_kernel, "bwd_kv": A._gape_bwd_kv_kernel, "bwd_q": A._gape_bwd_q_kernel,
           "bwd_preprocess": A._gape_bwd_preprocess}
    elt = {"fp16": 2, "bf16": 2, "fp32": 4}
    jobs = []  # every variant first, so the bar knows the total
    for kernel in args.kernel:
        tuned = jit[kernel]
        fn = tuned.fn if isinstance(tuned, triton.runtime.Autotuner) else tuned
        for cc in args.arch:
            for d in args.head_dim:
                block_d = max(16, triton.next_power_of_2(d))
                for dtype in args.dtype:
                    if kernel == "bwd_preprocess":
                        # only the sinks change this kernel: "none" and "sinks" stand for the rest
                        terms = [t for t in ("none", "sinks")
                                 if any(TERMS[u][0] == TERMS[t][0] for u in args.terms)]
                        variants = [(None, None, None, t) for t in terms]
                        configs = [triton.Config({"BLOCK_M": A.PREPROCESS_BLOCK_M}, num_warps=4, num_stages=1)]
                    else:
                        variants = [(c, dist, pos, t) for t in args.terms for c in args.causal
                                    for dist in args.distance for pos in args.positions]
                        configs = None  # chosen per variant: the filter of a real launch sees HAS_WINDOW
                    for causal, dist, pos, terms in variants:
                        kept = configs
                        if kept is None:
                            kept = [c for c in tuned.configs
                                    if A.config_fits(kernel, c, block_d, block_d, elt[dtype], AUDIT_LEN, AUDIT_LEN,
                                                     ARCHS[cc], cc, windowed=POSITIONS[pos][0],
                                                     softcap=TERMS[terms][1])]
                            if args.first_config_only:
                                kept = kept[:1]
                        jobs += [(kernel, fn, cc, d, block_d, dtype, causal, dist, pos, terms, cfg) for cfg in kept]
    rows = []
    previous = _previous(args.out)
    bar = tqdm(jobs, desc="audit-kernels", unit="variant", dynamic_ncols=True, file=sys.stderr)
    for kernel, fn, cc, d, block_d, dtype, causal, dist, pos, terms, cfg in bar:
        const = dict(cfg.kwargs)
        if kernel == "bwd_preprocess":
            const.update(BLOCK_DV=block_d, HAS_SINKS=TERMS[terms][0])
        else:
            const.update(BLOCK_D=block_d, BLOCK_DV=block_d, IS_CAUSAL=causal == "1",
                         DISTANCE=A.DISTANCE_CODES[dist], HAS_KEY_RANGE=False, HAS_BIAS=True,
                         HAS_WINDOW=POSITIONS[pos][0], IS_VARLEN=POSITIONS[pos][1],
                         HAS_SINKS=TERMS[terms][0], HAS_SOFTCAP=TERMS[terms][1],
                         DOT_PRECISION="ieee" if dtype == "fp32" else "tf32")
        sig, attrs = _signature(fn, dtype, const)
        row = {
            "kernel": kernel, "source": _source_hash(fn), "arch": ARCH_NAMES[cc], "head_dim": d,
            "dtype": dtype,
            "causal": None if causal is None else causal == "1", "distance": dist,
            "positions": pos, "terms": terms,
            "block_m": cfg.kwargs.get("BLOCK_M"), "block_n": cfg.kwargs.get("BLOCK_N"),
            "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
        }
        old = previous.get(tuple(row.get(k) for k in _KEY))
        if old is not None and old.get("ok"):
            rows.append(old)
            continue
        row.update(_compile_one(fn, sig, attrs, const, cc, cfg.num_warps, cfg.num_stages))
        row["triton"] = triton.__version__
        row["meets_requirements"] = _meets(row, cc)
        rows.append(row)
        _write(args.out, rows)
        if not args.quiet:
            bar.write(f"[{len(rows)}] {kernel} {ARCH_NAMES[cc]} D{d} {dtype} causal={causal} "
                      f"{dist} {pos} {terms} {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}: regs {row.get('regs')} "
                      f"spills {row.get('spills')} smem {row.get('shared_bytes')}", file=sys.stderr)
    _write(args.out, rows)
    return rows


def _meets(row: dict, cc: int) -> bool:
    if not row["ok"]:
        return False
    if row["head_dim"] <= 128 and row["spills"] != 0:
        return False
    if row["shared_bytes"] > ARCHS[cc]:
        return False
    if row["kernel"] == "bwd_preprocess":  # a row reduction, no matmul to put on tensor cores
        return True
    # wgmma works on 64-row warpgroup tiles; the rows of the main products are
    # the resident block (queries, or keys in the dK/dV kernel). Smaller
    # tiles (decode) use mma.sync on Hopper too.
    rows = row["block_n"] if row["kernel"] == "bwd_kv" else row["block_m"]
    if cc == 90 and rows >= 64:
        return row["uses_wgmma"]
    return row["uses_mma"] or row["uses_wgmma"]


def print_table(rows: list[dict]) -> None:
    cols = ["kernel", "arch", "head_dim", "dtype", "causal", "distance", "positions", "terms", "block_m", "block_n", "num_warps",
            "num_stages", "regs", "spills", "shared_bytes", "uses_mma", "uses_wgmma", "ok", "meets_requirements"]
    head = ["kernel", "arch", "D", "dtype", "causal", "dist", "pos", "terms", "BM", "BN", "warps", "stages", "regs", "spills",
            "smem", "mma", "wgmma", "ok", "meets"]
    table = [[("" if r.get(c) is None else str(r.get(c))) for c in cols] for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) if table else len(h) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for t in table:
        print("  ".join(x.ljust(w) for x, w in zip(t, widths)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gape audit-kernels", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
