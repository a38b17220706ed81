"""GAPE-patched SmolLM2 decoding on the CPU: DynamicCache vs StaticCache, eager
and with ``torch.compile`` of the decode step.

    python benchmarks/bench_static_cache.py                         # prompt 256, 32 new tokens
    python benchmarks/bench_static_cache.py --modes dynamic static static-inductor

Modes:
    dynamic            DynamicCache, eager (the generate default)
    static             StaticCache (``cache_implementation="static"``), eager
    static-inductor    StaticCache, decode step ``torch.compile(backend="inductor")``
    static-aot_eager   StaticCache, decode step ``torch.compile(backend="aot_eager")``

Each mode prefills the same prompt eagerly, then runs greedy decode steps;
tokens/s is one over the median step time after ``--warmup`` steps (compile
time is reported apart, as the first step's time). Every mode must produce the
same tokens as ``dynamic`` (recorded as ``same_tokens``). Gates are non-trivial
(bench_model's ``set_nontrivial_gates``), identity shortcut off. Rows go to
``benchmarks/results/bench_static_cache/bench_static_cache.json`` (atomic, one row per mode).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import gape
from gape import hf
from gape._io import write_json_atomic
from gape._machine import cpu_model
from gape._threads import set_threads

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import set_nontrivial_gates  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_static_cache"
MODES = ("dynamic", "static", "static-inductor", "static-aot_eager")


def decode(model, ids, mode: str, new_tokens: int, warmup: int):
    from transformers import DynamicCache, StaticCache

    if mode == "dynamic":
        cache = DynamicCache(config=model.config)
    else:
        cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + new_tokens + 8)
    step = model.forward
    if mode.startswith("static-"):
        step = torch.compile(model.forward, backend=mode.split("-", 1)[1], dynamic=False)
    kw = {hf.cache_kwarg(): cache, "use_cache": True}
    times, toks = [], []
    with torch.no_grad():
        out = model(ids, logits_to_keep=1, **kw)
        tok = out.logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            toks.append(int(tok))
            t0 = time.perf_counter()
            out = step(tok, **kw)
            times.append(time.perf_counter() - t0)
            tok = out.logits[:, -1:].argmax(-1)
    steady = times[warmup:]
    return {"first_step_s": times[0], "median_step_s": statistics.median(steady),
            "tokens_per_s": 1.0 / statistics.median(steady), "step_s": times, "tokens": toks}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(RESULTS / "bench_static_cache.json"))
    args = p.parse_args(argv)
    set_threads(args.threads)
    import transformers

    model, _ = gape.load_model()
    gape.patch(model, gape.GapeConfig(identity_shortcut=False))
    set_nontrivial_gates(model)
    ids = torch.randint(100, 40000, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    machine = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "python": platform.python_version(),
               "torch": torch.__version__, "transformers": transformers.__version__, "gape": gape.__version__}
    out = Path(args.out)
    rows = json.loads(out.read_text()) if out.exists() else []
    rows = [r for r in rows if not (r["mode"] in args.modes and r.get("cpu") == machine["cpu"])]
    reference = None
    for mode in args.modes:
        try:
            res = decode(model, ids, mode, args.new_tokens, args.warmup)
        except Exception as exc:  # a mode that fails is a row saying why
            res = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
        if mode == "dynamic" and "tokens" in res:
            reference = res["tokens"]
        if reference is not None and "tokens" in res:
            res["same_tokens"] = res["tokens"] == reference
        row = {"mode": mode, "prompt": args.prompt, "new_tokens": args.new_tokens, **machine,
               "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **res}
        rows.append(row)
        write_json_atomic(str(out), rows, indent=1)
        if "error" in res:
            print(f"{mode}: {res['error']}")
        else:
            print(f"{mode}: {res['tokens_per_s']:.2f} tok/s (first step {res['first_step_s']:.2f} s), "
                  f"same tokens as dynamic: {res.get('same_tokens')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
