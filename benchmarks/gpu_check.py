"""One prepared GPU check: every GPU question about gape in one command, inside a time budget.

    bash benchmarks/gpu_check.sh OUTDIR             # on one CUDA GPU, <= 8 minutes
    bash benchmarks/gpu_check.sh OUTDIR --dry-run   # the same stages at tiny sizes on the CPU

Stages run one after the other, each in its own process group with its own time
budget; a stage that runs long is stopped and reported as "timeout", and a
failing stage never stops the next one:

    env     install gape from this checkout without network (pip --no-index -e,
            else an import hook that maps gape.kernels -> kernels/ and
            gape.patches -> patches/ as pyproject.toml does); versions, GPU
    kernel  the fused Triton kernel, forward and all five gradients against the
            float64 reference with the interpreter tests' tolerance rule
            (tests/helpers.py); fp16/bf16/fp32, head dims 64/128/80/256, causal
            and not, GQA, decode, key ranges, Lk = 2**20 with Lq = 1; learned
            sinks and the soft-cap (their gradient included) dense, windowed,
            at decode offsets and packed. One subprocess per case, so a CUDA
            fault poisons one case only.
    model   a patched tiny Llama at identity equals the unpatched model; greedy
            generation with gates: KV-cache decoding equals full recomputation
    bench   benchmarks/bench_kernel_gpu.py on a reduced grid (bf16, D = 128,
            L in 1k/4k/16k, causal, fwd and fwd+bwd), autotuning included

OUTDIR receives summary.json, checks.csv, bench.csv, bench.png and log.txt;
the summary printed at the end fits one screen. Exit status 0 when every stage
that ran passed. ``--dry-run`` hides CUDA, sets TRITON_INTERPRET=1 and skips the
benchmark, so the default test suite keeps this script working.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import importlib.abc
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, as_completed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THIS = os.path.abspath(__file__)
MARK = "@gpu_check "  # a stage's machine-readable lines start with this
STAGES = ("env", "kernel", "model", "bench")
# relative weights of the total budget (seconds at the default 480 s budget)
WEIGHTS = {"env": 40, "kernel": 195, "model": 40, "bench": 195}
RESERVE_S = 10  # kept for the summary after the last stage
CASE_TIMEOUT_S = {"full": 150, "tiny": 240}
TARGETS = {"fwd": 0.90, "fwd+bwd": 0.85}  # gape >= this fraction of gape-nobias
FLEX_TARGET = 1.10  # gape >= this multiple of flex
BENCH_PROVIDERS = ["gape", "gape-nobias", "sdpa-flash", "flex"]
BENCH_SEQLENS = [1024, 4096, 16384]
CHECK_FIELDS = ["stage", "name", "status", "seconds", "message", "errors"]


# ---------------------------------------------------------------------------
# Importing gape from the checkout without installing it
# ---------------------------------------------------------------------------

# gape and the folders pyproject.toml's package-dir installs under it
PACKAGE_DIRS = {"gape": "gape", "gape.kernels": "kernels", "gape.patches": "patches"}


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    """Finds ``gape`` in the checkout ahead of any installed copy; ``gape`` itself
    then maps gape.kernels and gape.patches to the folders beside it (gape/_checkout.py)."""

    def __init__(self, root: str):
        self.root = root

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "gape":
            return None  # sub-modules are found through the package's __path__
        where = os.path.join(self.root, "gape")
        return importlib.util.spec_from_file_location(fullname, os.path.join(where, "__init__.py"),
                                                      submodule_search_locations=[where])


def use_checkout(root: str = ROOT) -> None:
    """Import gape (and its mapped sub-packages) from ``root``, ahead of any installed copy."""
    if not any(isinstance(f, _CheckoutFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _CheckoutFinder(root))


def probe_import(root: str = ROOT) -> dict:
    """Where gape and its mapped packages import from, and whether that is ``root``."""
    found = {}
    for name, rel in PACKAGE_DIRS.items():
        mod = importlib.import_module(name)
        # kernels/ and patches/ are namespace packages (no __init__.py): their folder is __path__
        found[name] = os.path.realpath(mod.__file__ if getattr(mod, "__file__", None) else list(mod.__path__)[0])
        want = os.path.realpath(os.path.join(root, rel))
        if not (found[name] == want or found[name].startswith(want + os.sep)):
            raise ImportError(f"{name} imports from {found[name]}, not from this checkout ({want})")
    return found


# ---------------------------------------------------------------------------
# Stage side: everything below runs inside a stage's own process
# ---------------------------------------------------------------------------

_print_lock = threading.Lock()


def emit(kind: str, **data) -> None:
    with _print_lock:
        print(MARK + json.dumps({"type": kind, **data}, default=str), flush=True)


def say(text: str) -> None:
    with _print_lock:
        print(text, flush=True)


def _prepare_imports(mode: str) -> None:
    if mode == "path":
        use_checkout()
    tests = os.path.join(ROOT, "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)  # the interpreter tests' helpers, reused as they are


def _maybe_inject(stage: str) -> None:
    for item in filter(None, os.environ.get("GAPE_GPU_CHECK_INJECT", "").split(",")):
        name, _, how = item.partition(":")
        if name == stage:
            if how == "hang":
                say(f"{stage}: injected hang")
                time.sleep(10**6)
            raise RuntimeError(f"injected failure in stage {stage!r} (GAPE_GPU_CHECK_INJECT)")


def _import_probe_subprocess(mode: str) -> tuple[bool, str]:
    cmd = [sys.executable, THIS, "--probe-import", "--install-mode", mode]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    return res.returncode == 0, (res.stdout.strip() or res.stderr.strip()[-1500:])


def stage_env(args) -> dict:
    mode = args.install_mode
    tried = []
    if mode == "auto":
        ok, detail = _import_probe_subprocess("none")
        if ok:
            mode = "existing"
            say(f"gape already imports from this checkout: {detail}")
        else:
            tried.append(f"existing: {detail.splitlines()[-1] if detail else '?'}")
            mode = "pip"
    if mode == "pip":
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-e", ROOT]
        say("$ " + " ".join(cmd))
        env = dict(os.environ, PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=45, env=env)
            say((res.stdout + res.stderr).strip())
            ok, detail = (res.returncode == 0), f"pip exit status {res.returncode}"
        except subprocess.TimeoutExpired:
            ok, detail = False, "pip timed out"
        if ok:
            ok, detail = _import_probe_subprocess("none")
        if ok:
            say(f"installed with pip: {detail}")
        elif args.install_mode == "pip":
            raise RuntimeError(f"pip install -e failed: {detail}")
        else:
            tried.append(f"pip: {detail}")
            mode = "path"
    if mode == "path":
        ok, detail = _import_probe_subprocess("path")
        if not ok:
            raise RuntimeError(f"the checkout import hook failed too: {detail}")
        say(f"importing through the checkout hook (package-dir mapping of pyproject.toml): {detail}")
    _prepare_imports("path" if mode == "path" else "none")

    import numpy
    import torch
    import transformers
    import triton

    import gape

    info = dict(import_mode=mode, install_fallbacks=tried, python=sys.version.split()[0], torch=torch.__version__,
                torch_cuda=torch.version.cuda, triton=triton.__version__, transformers=transformers.__version__,
                numpy=numpy.__version__, gape=gape.__version__, gape_file=gape.__file__,
                cpu_count=os.cpu_count(), triton_interpret=os.environ.get("TRITON_INTERPRET", ""))
    try:
        import pytest

        info["pytest"] = pytest.__version__
    except ImportError:
        info["pytest"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        cap = torch.cuda.get_device_capability(0)
        info.update(gpu=torch.cuda.get_device_name(0), capability=f"{cap[0]}.{cap[1]}", gpu_count=torch.cuda.device_count(),
                    gpu_mem_gib=round(props.total_memory / 2**30, 1), sm_count=props.multi_processor_count)
    else:
        info.update(gpu=None, capability=None)
    for key, value in info.items():
        say(f"  {key:18s} {value}")
    emit("info", **info)
    if not args.dry_run and info["gpu"] is None:
        _need_cuda(args)
    return dict(status="passed", message=f"import: {mode}; " + (f"{info['gpu']} (sm {info['capability']})"
                                                                 if info["gpu"] else "CPU (dry run)"))


def kernel_cases(size: str) -> list[tuple[str, object]]:
    """(kind, Case) pairs; kind is "grid", "ranges:<layout>", "tmask" (a transformers padding mask) or
    "terms[-window|-decode|-varlen]:<sinks|softcap|sinks+softcap>" (tests/test_kernels_sinks_softcap.py)."""
    import torch
    from test_kernels_attention import Case

    f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32
    if size == "tiny":
        # the interpreter runs numpy per block and has no bf16 arithmetic: a sample of the kinds
        # (the default suite tests the kernel itself; this keeps the stage's machinery working)
        cases = [("grid", Case(1, 4, 2, 19, 29, 24, True, "log", f32)),
                 ("grid", Case(2, 2, 1, 17, 23, 16, False, "linear", f16)),
                 ("ranges:left-pad-causal", Case(3, 2, 1, 21, 21, 16, True, "log", f32)),
                 ("grid", Case(1, 2, 1, 1, 2**10, 16, True, "log", f32)),  # decode at long positions, scaled down
                 ("terms-varlen:sinks+softcap", Case(1, 4, 2, 13, 20, 16, True, "log", f32))]
        return cases
    cases = []
    for dt in (f16, bf16, f32):
        for d in (64, 128, 80, 256):
            for causal in (True, False):
                distance = "log" if causal == (d in (64, 80)) else "linear"
                cases.append(("grid", Case(2, 4, 2, 259, 387, d, causal, distance, dt)))  # GQA, ragged tails
        cases.append(("grid", Case(2, 8, 2, 1, 1500, 128, True, "log", dt)))  # decode
        cases.append(("grid", Case(1, 4, 4, 300, 100, 64, True, "linear", dt)))  # Lq > Lk: rows without keys
    cases.append(("grid", Case(1, 4, 2, 200, 300, 128, False, "log", bf16, dv=64)))  # value head dim differs
    cases.append(("grid", Case(1, 4, 2, 257, 257, 128, True, "log", bf16, gate_dtype=f16)))
    for dt in (bf16, f16):
        for layout, causal in (("left-pad-causal", True), ("right-pad-full", False), ("empty-batch", False)):
            cases.append((f"ranges:{layout}", Case(3, 4, 2, 300, 300, 128, causal, "log", dt)))
        cases.append(("tmask", Case(2, 4, 2, 180, 420, 128, True, "log", dt)))
    # long positions: integer distances up to 2**20 in the bias, one decode query
    cases.append(("grid", Case(1, 4, 1, 1, 2**20, 128, True, "log", bf16)))
    cases.append(("grid", Case(1, 2, 1, 1, 2**20, 64, False, "linear", f32)))
    # learned sinks and the soft-cap (constexpr variants of every kernel): dense, window, decode, varlen
    for terms in ("sinks", "softcap", "sinks+softcap"):
        cases.append((f"terms:{terms}", Case(2, 4, 2, 259, 387, 128, True, "log", bf16)))
    cases.append(("terms:sinks+softcap", Case(2, 4, 2, 200, 300, 64, False, "linear", f16)))
    cases.append(("terms:sinks+softcap", Case(1, 4, 2, 150, 150, 80, True, "log", f32)))
    cases.append(("terms-window:sinks+softcap", Case(2, 4, 2, 300, 300, 128, False, "log", bf16)))
    cases.append(("terms-window:sinks+softcap", Case(2, 4, 2, 300, 300, 64, True, "linear", f16)))
    cases.append(("terms-decode:sinks+softcap", Case(3, 8, 2, 1, 1500, 128, True, "log", bf16)))
    cases.append(("terms-varlen:sinks", Case(1, 4, 2, 200, 330, 128, True, "log", bf16)))
    cases.append(("terms-varlen:sinks+softcap", Case(1, 4, 2, 200, 330, 64, True, "linear", f16)))
    return cases


def case_name(kind: str, case) -> str:
    return case.id if kind == "grid" else f"{kind}-{case.id}"


def key_range_layout(layout: str, b: int, lk: int):
    """Per-batch key ranges [start, end) of the interpreter test's layouts, scaled to ``lk``."""
    import torch

    assert b == 3, "the layouts are written for three batch rows"
    if layout == "left-pad-causal":
        start, end = [0, lk // 4, lk * 4 // 5], [lk] * 3
    elif layout == "right-pad-full":
        start, end = [0, 0, 0], [lk, lk * 3 // 7, lk * 3 // 4]
    elif layout == "empty-batch":
        start, end = [0, lk // 5, 0], [lk, lk // 5, 0]
    else:
        raise ValueError(f"unknown key-range layout {layout!r}")
    return torch.tensor(start), torch.tensor(end)


def run_kernel_case(kind: str, case, device: str) -> dict:
    """Output and five gradients vs float64 (helpers.assert_matches_reference); raises AssertionError on a miss."""
    import torch

    import helpers
    from gape.kernels import attention as kattn
    from test_kernels_attention import _inputs, _transformers_mask

    # every kernel output starts as NaN, so an unwritten tile fails (as in the interpreter tests)
    kattn._new_output = lambda shape, dtype, dev: torch.full(shape, float("nan"), dtype=dtype, device=dev)
    if kind.startswith("terms"):
        import test_kernels_sinks_softcap

        return test_kernels_sinks_softcap.check_on_device(kind, case, device)
    inputs = tuple(t.to(device) for t in _inputs(case))
    fn, mask = kattn.triton_attention, None
    if kind.startswith("ranges:"):
        start, end = key_range_layout(kind.split(":", 1)[1], case.b, case.lk)
        j = torch.arange(case.lk)
        mask = ((j >= start[:, None]) & (j < end[:, None]))[:, None, None, :].to(device)
        start, end = start.to(device), end.to(device)

        def fn(q, k, v, lam, pi, attn_mask, is_causal, scale, distance):
            return kattn.gape_attention_triton(q, k, v, lam, pi, start, end, is_causal, scale, distance)
    elif kind == "tmask":
        mask = _transformers_mask(torch.tensor([0, case.lk * 2 // 5]), case.lq, case.lk).to(device)
    errors = helpers.assert_matches_reference(fn, inputs, dtype=case.dtype, gate_dtype=case.gate_dtype,
                                              attn_mask=mask, is_causal=case.causal, distance=case.distance)
    return {name: f"{err:.2e}/{ref:.2e}" for name, (err, ref) in errors.items()}


def case_record(kind: str, case) -> dict:
    """Run one kernel case here; its result as a checks.csv row."""
    t0 = time.time()
    rec = dict(stage="kernel", name=case_name(kind, case), errors="")
    try:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        rec.update(status="passed", message="", errors=json.dumps(run_kernel_case(kind, case, device)))
    except AssertionError as exc:
        rec.update(status="failed", message=(str(exc).splitlines() or ["assertion failed"])[0][:300])
    except Exception as exc:  # a crash of the kernel is a result, not a script error
        rec.update(status="error", message=f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}")
        traceback.print_exc()
    rec["seconds"] = round(time.time() - t0, 1)
    return rec


def case_main(args) -> int:
    """One kernel case in this process; prints one "case" record."""
    _prepare_imports(args.install_mode)
    emit("case", **case_record(*kernel_cases(args.size)[args.case]))
    return 0


def _run_case_process(args, index: int, name: str, timeout: float) -> dict:
    cmd = [sys.executable, THIS, "--case", str(index), "--size", args.size, "--install-mode", args.install_mode]
    t0 = time.time()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return dict(stage="kernel", name=name, status="timeout", seconds=round(time.time() - t0, 1),
                    message=f"case stopped after {timeout:.0f} s", errors="")
    for line in res.stdout.splitlines():
        if line.startswith(MARK):
            rec = json.loads(line[len(MARK):])
            rec.pop("type", None)
            if rec["status"] != "passed":
                say(res.stderr.strip()[-2000:])
            return rec
    return dict(stage="kernel", name=name, status="error", seconds=round(time.time() - t0, 1),
                message=f"case process exited with status {res.returncode} without a result: "
                        + (res.stderr.strip().splitlines() or ["no output"])[-1][:300], errors="")


def _need_cuda(args) -> None:
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device visible: run on a GPU machine, or pass --dry-run to check the script "
                           "on the CPU")


def stage_kernel(args) -> dict:
    _prepare_imports(args.install_mode)
    _need_cuda(args)
    cases = kernel_cases(args.size)
    names = [case_name(kind, case) for kind, case in cases]
    emit("info", cases_total=len(cases), jobs=args.jobs)
    say(f"{len(cases)} kernel cases, {args.jobs or 'in-process'} at a time")
    counts = {"passed": 0, "failed": 0, "error": 0, "timeout": 0}

    def record(rec):
        counts[rec["status"]] = counts.get(rec["status"], 0) + 1
        emit("case", **rec)
        say(f"  {rec['status'].upper():7s} {rec['name']:48s} {rec['seconds']:6.1f}s  {rec['message']}")

    if args.jobs == 0:
        for kind, case in cases:
            record(case_record(kind, case))
    else:
        # the biggest cases first, so they do not finish last
        order = sorted(range(len(cases)), key=lambda i: -cases[i][1].lk * cases[i][1].d)
        timeout = CASE_TIMEOUT_S[args.size]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(_run_case_process, args, i, names[i], timeout) for i in order]
            for fut in as_completed(futures):
                record(fut.result())
    status = "passed" if counts["passed"] == len(cases) else "failed"
    return dict(status=status, message=f"{counts['passed']} of {len(cases)} cases passed")


def model_checks(device: str, tiny: bool):
    """(name, check) pairs; a check returns a short message or raises AssertionError."""
    import copy

    import torch

    import gape
    import test_hf as th

    dtype_low = torch.float16 if tiny else torch.bfloat16  # the interpreter has no bf16 arithmetic
    length = 24 if tiny else 200
    new_tokens = 4 if tiny else 16
    cfg = gape.GapeConfig(backend="triton", identity_shortcut=False)  # run the kernel even at identity
    ids = th.tokens(2, length).to(device)

    def identity_fp32():
        model = th.make_model("llama").to(device)
        with torch.no_grad():
            ref = model(ids).logits
            gape.patch(model, cfg)
            out = model(ids).logits
        err = float((out - ref).abs().max())
        assert model.config._attn_implementation == "gape", "the model was not patched"
        assert err <= 1e-4, f"patched at identity differs from unpatched by {err:.2e} (> 1e-4) in fp32"
        return f"max |patched - unpatched| {err:.1e}"

    def identity_low():
        model = th.make_model("llama").to(device)
        with torch.no_grad():
            truth = model(ids).logits.double()
            low = copy.deepcopy(model).to(dtype_low)
            plain_err = float((low(ids).logits.double() - truth).abs().max())
            gape.patch(low, cfg)
            err = float((low(ids).logits.double() - truth).abs().max())
        bound = 2 * plain_err + 1e-3 * float(truth.abs().max())
        assert err <= bound, (f"patched {dtype_low} at identity is {err:.2e} from fp32, more than 2 x the unpatched "
                              f"model's {plain_err:.2e} (+ slack) = {bound:.2e}")
        return f"{str(dtype_low).removeprefix('torch.')}: patched {err:.1e} vs unpatched {plain_err:.1e} from fp32"

    def generate_with_gates():
        model = th.make_model("llama").to(device)
        prompt = th.tokens(1, 12).to(device)
        kw = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                  output_logits=True)
        with torch.no_grad():
            ref = model.generate(prompt, **kw)
            gape.patch(model, cfg)
            same = model.generate(prompt, **kw)
            assert torch.equal(same.sequences, ref.sequences), "greedy tokens at identity differ from unpatched"
            th.randomize_gates(model)
            cached = model.generate(prompt, **kw)
            full = model.generate(prompt, use_cache=False, **kw)
        assert torch.equal(cached.sequences, full.sequences), "KV-cache decoding with gates differs from recomputation"
        err = float((torch.stack(cached.logits) - torch.stack(full.logits)).abs().max())
        assert err <= 1e-4, f"cached vs recomputed logits with gates differ by {err:.2e} (> 1e-4)"
        gap = float((cached.logits[0] - ref.logits[0]).abs().max())
        assert gap > 1e-2, f"gates changed the logits by only {gap:.1e}: the check proves nothing"
        return f"{new_tokens} tokens; cache vs recompute {err:.1e}; gates move logits by {gap:.2f}"

    return [("identity-fp32", identity_fp32), (f"identity-{str(dtype_low).removeprefix('torch.')}", identity_low),
            ("generate-with-gates", generate_with_gates)]


def stage_model(args) -> dict:
    _prepare_imports(args.install_mode)
    _need_cuda(args)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    checks = model_checks(device, args.dry_run)
    emit("info", cases_total=len(checks), device=device)
    passed = 0
    for name, check in checks:
        t0 = time.time()
        try:
            status, message = "passed", check()
            passed += 1
        except AssertionError as exc:
            status, message = "failed", str(exc)[:300]
        except Exception as exc:
            status, message = "error", f"{type(exc).__name__}: {exc}"[:300]
            traceback.print_exc()
        rec = dict(stage="model", name=name, status=status, seconds=round(time.time() - t0, 1), message=message,
                   errors="")
        emit("case", **rec)
        say(f"  {status.upper():7s} {name:24s} {rec['seconds']:6.1f}s  {message}")
    return dict(status="passed" if passed == len(checks) else "failed",
                message=f"{passed} of {len(checks)} checks passed")


def stage_bench(args) -> dict:
    if args.dry_run:
        return dict(status="skipped", message="dry run: kernel timings need CUDA")
    _prepare_imports(args.install_mode)
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench_kernel_gpu

    out = os.path.join(args.outdir, "bench.csv")
    argv = ["--out", out, "--dtype", "bf16", "--head-dims", "128", "--causal", "causal",
            "--seqlens", *map(str, BENCH_SEQLENS), "--providers", *BENCH_PROVIDERS, "--modes", "fwd", "fwd+bwd"]
    say("bench_kernel_gpu.py " + " ".join(argv))
    rc = bench_kernel_gpu.main(argv)
    rows = []
    if os.path.exists(out):
        with open(out, newline="") as f:
            rows = list(csv.DictReader(f))
    bad = [f"{r['provider']} {r['mode']} L={r['seqlen']}: {r['error']}" for r in rows if r["error"]]
    if rc != 0:
        return dict(status="failed", message=f"bench_kernel_gpu.py exited with status {rc} (its reason is in log.txt)")
    if bad:
        return dict(status="failed", message=f"{len(bad)} of {len(rows)} rows failed: " + "; ".join(bad)[:400])
    return dict(status="passed", message=f"{len(rows)} rows measured")


STAGE_FUNCS = {"env": stage_env, "kernel": stage_kernel, "model": stage_model, "bench": stage_bench}


def stage_main(args) -> int:
    try:
        _maybe_inject(args.stage)
        result = STAGE_FUNCS[args.stage](args)
    except Exception as exc:
        traceback.print_exc()
        result = dict(status="failed", message=f"{type(exc).__name__}: {exc}"[:500])
    emit("result", **result)
    return 0


# ---------------------------------------------------------------------------
# Orchestrator: no torch here, so a broken install cannot take the report down
# ---------------------------------------------------------------------------


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Log:
    def __init__(self, path: str, verbose: bool):
        self.f = open(path, "a", encoding="utf-8")
        self.verbose = verbose
        self.lock = threading.Lock()

    def line(self, text: str, console: bool = False) -> None:
        with self.lock:
            self.f.write(text + "\n")
            self.f.flush()
            if console or self.verbose:
                print(text, flush=True)


def _stage_env(args, stage: str) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("TRITON_CACHE_DIR", os.path.join("/tmp", f"gape_gpu_check_triton_{os.getuid()}"))
    if args.dry_run:
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
        env.setdefault("OMP_NUM_THREADS", "1")
    else:
        env.pop("TRITON_INTERPRET", None)  # the benchmark and the checks need compiled kernels
    if args.inject:
        env["GAPE_GPU_CHECK_INJECT"] = ",".join(args.inject)
    return env


def run_stage(args, stage: str, timeout: float, log: Log, install_mode: str) -> dict:
    """Run one stage in its own process group; stop the whole group at ``timeout``."""
    cmd = [sys.executable, THIS, args.outdir, "--stage", stage, "--install-mode", install_mode,
           "--jobs", str(args.jobs), "--size", args.size] + (["--dry-run"] if args.dry_run else [])
    log.line(f"==> {stage}: budget {timeout:.0f} s", console=True)
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env=_stage_env(args, stage), start_new_session=True)
    records = {"info": {}, "case": [], "result": None, "tail": []}

    def read():
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            log.line(f"[{stage}] {line}")
            if not line.startswith(MARK):
                records["tail"] = (records["tail"] + [line])[-3:]
            else:
                try:
                    rec = json.loads(line[len(MARK):])
                except json.JSONDecodeError:
                    continue
                kind = rec.pop("type", "")
                if kind == "info":
                    records["info"].update(rec)
                elif kind == "case":
                    records["case"].append(rec)
                    if rec.get("status") != "passed":
                        log.line(f"    {rec.get('status', '?').upper()} {rec.get('name')}: {rec.get('message')}",
                                 console=True)
                elif kind == "result":
                    records["result"] = rec

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
    reader.join(timeout=10)
    seconds = round(time.time() - t0, 1)
    res = records["result"] or {}
    if timed_out:
        status, message = "timeout", f"stopped after {timeout:.0f} s (its budget); " + res.get("message", "partial")
    elif res:
        status, message = res["status"], res.get("message", "")
    else:
        status, message = "failed", (f"stage process exited with status {proc.returncode} without a result: "
                                     + " | ".join(records["tail"]))
    counts = {}
    for rec in records["case"]:
        counts[rec["status"]] = counts.get(rec["status"], 0) + 1
    total = records["info"].get("cases_total")
    if total is not None:
        counts["total"] = total
        counts["not_run"] = total - len(records["case"])
    out = dict(status=status, seconds=seconds, budget_s=round(timeout), returncode=proc.returncode, message=message,
               counts=counts, info=records["info"], checks=records["case"])
    log.line(f"<== {stage}: {status} in {seconds:.0f} s: {message}", console=True)
    return out


def gpu_slug(name: str | None) -> str:
    return re.sub(r"[^a-z0-9]+", "-", (name or "cpu").lower()).strip("-")


def bench_table(path: str) -> tuple[list[str], list[dict]]:
    """Text lines of the TFLOP/s table and target ratios, and the ratio rows for the JSON summary."""
    if not os.path.exists(path):
        return [], []
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["dtype"] == "bf16" and r["head_dim"] == "128" and r["causal"] == "True"]
    tf = {(r["provider"], r["mode"], int(r["seqlen"])): (float(r["tflops"]) if r["tflops"] else None) for r in rows}
    errors = {(r["provider"], r["mode"], int(r["seqlen"])): r["error"] for r in rows if r["error"]}
    shapes = sorted({(m, L) for _, m, L in tf}, key=lambda s: (s[0] != "fwd", s[1]))
    lines = ["TFLOP/s, bf16, D=128, causal (B*L = 16k tokens, H*D = 2048)",
             f"{'mode':8s}{'L':>6s}" + "".join(f"{p:>12s}" for p in BENCH_PROVIDERS)
             + f"{'/nobias':>9s}{'need':>6s}{'/flex':>7s}{'need':>6s}"]
    ratios = []

    def cell(v):
        return f"{v:12.1f}" if v is not None else f"{'-':>12s}"

    for mode, L in shapes:
        vals = {p: tf.get((p, mode, L)) for p in BENCH_PROVIDERS}
        g, nb, fx = vals["gape"], vals["gape-nobias"], vals["flex"]
        r_nb = g / nb if g and nb else None
        r_fx = g / fx if g and fx else None
        ok_nb = None if r_nb is None else r_nb >= TARGETS[mode]
        ok_fx = None if r_fx is None else r_fx >= FLEX_TARGET

        def rat(r, ok):
            return f"{'-':>7s}" if r is None else f"{r:6.2f}{'' if ok else '!'}"

        lines.append(f"{mode:8s}{L:6d}" + "".join(cell(vals[p]) for p in BENCH_PROVIDERS)
                     + f"  {rat(r_nb, ok_nb)}{TARGETS[mode]:6.2f}{rat(r_fx, ok_fx)}{FLEX_TARGET:6.2f}")
        ratios.append(dict(mode=mode, seqlen=L, tflops=vals, gape_over_nobias=r_nb, nobias_target=TARGETS[mode],
                           nobias_ok=ok_nb, gape_over_flex=r_fx, flex_target=FLEX_TARGET, flex_ok=ok_fx))
    for (p, m, L), e in sorted(errors.items()):
        lines.append(f"  error {p} {m} L={L}: {e[:100]}")
    lines.append("'!' marks a missed target: fwd >= 0.90 and fwd+bwd >= 0.85 of gape-nobias; >= 1.1 x flex")
    return lines, ratios


def write_checks(path: str, stages: dict) -> None:
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, CHECK_FIELDS, extrasaction="ignore")
    w.writeheader()
    for st in stages.values():
        for rec in st.get("checks", []):
            w.writerow(rec)
    _write_atomic(path, buf.getvalue())


def print_summary(summary: dict, bench_lines: list[str], log: Log) -> None:
    env = summary["stages"].get("env", {}).get("info", {})
    head = (f"gape GPU check{' (dry run, CPU)' if summary['dry_run'] else ''}: {env.get('gpu') or 'no GPU'}"
            f"{' sm ' + env['capability'] if env.get('capability') else ''} | torch {env.get('torch', '?')} | "
            f"triton {env.get('triton', '?')} | {summary['started']} | {summary['elapsed_s']:.0f} s of "
            f"{summary['budget_s']:.0f} s")
    lines = ["", "=" * min(100, len(head)), head, f"{'stage':8s}{'status':9s}{'time':>6s}{'budget':>8s}  result"]
    for name, st in summary["stages"].items():
        c = st.get("counts", {})
        extra = ""
        if "total" in c:
            extra = (f" [{c.get('passed', 0)} passed, {c.get('failed', 0)} failed, {c.get('error', 0)} errors, "
                     f"{c.get('timeout', 0)} timeouts, {c.get('not_run', 0)} not run]")
        lines.append(f"{name:8s}{st['status']:9s}{st['seconds']:5.0f}s{st['budget_s']:7.0f}s  "
                     f"{st['message'][:150]}{extra}")
    bad = [r for st in summary["stages"].values() for r in st.get("checks", []) if r["status"] != "passed"]
    for r in bad[:8]:
        lines.append(f"  {r['status']} {r['stage']} {r['name']}: {r['message'][:140]}")
    if len(bad) > 8:
        lines.append(f"  ... {len(bad) - 8} more in checks.csv")
    lines += [""] + bench_lines if bench_lines else []
    lines.append(f"\n{'ALL PASSED' if summary['ok'] else 'NOT ALL PASSED'}; files in {summary['outdir']}: "
                 + ", ".join(summary["files"]))
    lines.append(f"commit them with: cp -r {summary['outdir']} benchmarks/results/gpu/{summary['result_name']}")
    for line in lines:
        log.line(line, console=True)


def orchestrate(args) -> int:
    os.makedirs(args.outdir, exist_ok=True)
    lock = os.path.join(args.outdir, ".lock")
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        print(f"gpu_check: {lock} exists: another check writes to {args.outdir} (delete the file if none does)",
              file=sys.stderr)
        return 2
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    try:
        return _orchestrate(args)
    finally:
        os.unlink(lock)


def _orchestrate(args) -> int:
    t_start = time.time()
    started = _dt.datetime.now(_dt.timezone.utc)
    log = Log(os.path.join(args.outdir, "log.txt"), args.verbose)
    log.line(f"gpu_check {' '.join(sys.argv[1:])} at {started.isoformat(timespec='seconds')} in {ROOT}", console=True)
    summary = dict(started=started.strftime("%Y-%m-%d %H:%M UTC"), dry_run=args.dry_run, budget_s=args.budget,
                   outdir=args.outdir, stages={}, files=[], ok=False, result_name="", elapsed_s=0.0, bench=[])
    summary_path = os.path.join(args.outdir, "summary.json")
    install_mode = args.install_mode
    stages = [s for s in STAGES if s in args.stages]
    deadline = t_start + args.budget - RESERVE_S
    for i, stage in enumerate(stages):
        left = deadline - time.time()
        rest = sum(WEIGHTS[s] for s in stages[i:])
        timeout = args.timeouts.get(stage, max(5.0, left * WEIGHTS[stage] / rest))
        result = run_stage(args, stage, timeout, log, install_mode)
        summary["stages"][stage] = result
        if stage == "env":
            # later stages import gape the way this stage found to work (the hook if it failed)
            mode = result["info"].get("import_mode", "path")
            install_mode = "path" if mode == "path" else "none"
            summary["machine"] = {k: result["info"].get(k) for k in ("gpu", "capability", "gpu_mem_gib", "sm_count",
                                                                     "cpu_count")}
            summary["versions"] = {k: result["info"].get(k) for k in ("python", "torch", "torch_cuda", "triton",
                                                                      "transformers", "numpy", "pytest", "gape")}
        summary["elapsed_s"] = round(time.time() - t_start, 1)
        _write_atomic(summary_path, json.dumps(summary, indent=1, default=str))
    write_checks(os.path.join(args.outdir, "checks.csv"), summary["stages"])
    bench_lines, summary["bench"] = bench_table(os.path.join(args.outdir, "bench.csv"))
    gpu = summary.get("machine", {}).get("gpu")
    summary["result_name"] = f"{gpu_slug(gpu)}_{started.strftime('%Y-%m-%d')}"
    summary["ok"] = bool(summary["stages"]) and all(st["status"] in ("passed", "skipped")
                                                    for st in summary["stages"].values())
    summary["elapsed_s"] = round(time.time() - t_start, 1)
    _write_atomic(summary_path, json.dumps(summary, indent=1, default=str))
    summary["files"] = sorted(f for f in os.listdir(args.outdir) if not f.startswith("."))
    _write_atomic(summary_path, json.dumps(summary, indent=1, default=str))
    print_summary(summary, bench_lines, log)
    return 0 if summary["ok"] else 1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("outdir", nargs="?", help="folder for summary.json, checks.csv, bench.csv/png, log.txt")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (TRITON_INTERPRET=1), no benchmark")
    p.add_argument("--budget", type=float, default=480.0, help="total seconds; split over the stages (default 480)")
    p.add_argument("--jobs", type=int, default=None,
                   help="kernel cases run at once, one process each (0: all in the stage's process); "
                        "default: CPU count - 4, at most 12 (Triton compiles on the CPU); 1 in a dry run")
    p.add_argument("--install-mode", default="auto", choices=["auto", "pip", "path", "none"],
                   help="auto: already installed from this checkout, else pip -e, else the import hook")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--timeout", action="append", default=[], metavar="STAGE=SECONDS",
                   help="override one stage's budget (repeatable)")
    p.add_argument("--inject", action="append", default=[], metavar="STAGE[:hang]",
                   help="make a stage fail (or hang) on purpose, to test the report (repeatable)")
    p.add_argument("--verbose", action="store_true", help="echo every stage's output, not only the log")
    # internal: one stage, one kernel case, or an import probe in this process
    p.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    p.add_argument("--case", type=int, help=argparse.SUPPRESS)
    p.add_argument("--size", choices=["full", "tiny"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--probe-import", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.size = args.size or ("tiny" if args.dry_run else "full")
    if args.jobs is None:
        args.jobs = 1 if args.dry_run else max(1, min(12, (os.cpu_count() or 4) - 4))
    args.timeouts = {}
    for item in args.timeout:
        stage, _, sec = item.partition("=")
        if stage not in STAGES or not sec:
            p.error(f"--timeout takes STAGE=SECONDS with STAGE in {STAGES}, got {item!r}")
        args.timeouts[stage] = float(sec)
    for item in args.inject:
        if item.partition(":")[0] not in STAGES or item.partition(":")[2] not in ("", "hang"):
            p.error(f"--inject takes STAGE or STAGE:hang with STAGE in {STAGES}, got {item!r}")
    if args.stage is None and args.case is None and not args.probe_import and not args.outdir:
        p.error("give OUTDIR")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.probe_import:
        if args.install_mode == "path":
            use_checkout()
        print(json.dumps(probe_import()))
        return 0
    if args.case is not None:
        return case_main(args)
    if args.stage:
        return stage_main(args)
    args.outdir = os.path.abspath(args.outdir)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
