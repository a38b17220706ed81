"""torch.compile vs eager greedy decoding on the embedded SmolLM2 (CPU), unpatched
and GAPE-patched (non-trivial gates), with transformers' DynamicCache.

    python benchmarks/bench_compile.py                      # prompt 256, 64 new tokens
    python benchmarks/bench_compile.py --prompt 512 --new 32 --repeats 5

For each mode the model's forward is compiled with ``torch.compile(model.forward,
fullgraph=True)`` (any graph break is an error), one ``generate`` warms it up (its
time is the compile cost), then ``--repeats`` timed ``generate`` calls give the
decode rate: ``new tokens / (generate time - prefill time)`` with the prefill
timed alone in the same way. The number of graphs dynamo built is recorded
(prefill, first decode step, then one shape-dynamic decode graph: 3 means no
recompile per step). Compiled and eager outputs must give the same tokens.

Rows go to benchmarks/results/bench_compile/bench_compile.json as they are measured (atomic
writes); a rerun skips rows already there unless --fresh.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gape  # noqa: E402
from gape import hf  # noqa: E402
from gape._io import write_json_atomic  # noqa: E402
from gape._machine import machine_record  # noqa: E402
from gape._threads import set_threads  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_compile"
MODES = ("sdpa", "gape-gates")


def build(mode: str):
    from bench_model import load_smollm2, set_nontrivial_gates

    model = load_smollm2(torch.float32)
    if mode == "gape-gates":
        gape.patch(model, gape.GapeConfig())
        set_nontrivial_gates(model)
    return model


def timed_generate(model, ids, new: int):
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, **kw)
    return time.perf_counter() - start, out


def measure(mode: str, compiled: bool, prompt: int, new: int, repeats: int) -> dict:
    import torch._dynamo.utils as dynamo_utils

    torch._dynamo.reset()
    dynamo_utils.counters.clear()  # reset() keeps the counters: graphs would add up across modes
    model = build(mode)
    ids = torch.randint(100, 20000, (1, prompt), generator=torch.Generator().manual_seed(0))
    if compiled:
        model.forward = torch.compile(model.forward, fullgraph=True)
    warm, ref = timed_generate(model, ids, new)  # compiles when compiled
    timed_generate(model, ids, 1)
    gens, pres = [], []
    for _ in range(repeats):
        t, out = timed_generate(model, ids, new)
        assert torch.equal(out, ref), "generate is not deterministic"
        gens.append(t)
        pres.append(timed_generate(model, ids, 1)[0])
    gen, pre = statistics.median(gens), statistics.median(pres)
    return {
        "mode": mode,
        "compiled": compiled,
        "prompt": prompt,
        "new_tokens": new,
        "repeats": repeats,
        "warmup_s": round(warm, 3),
        "generate_s": round(gen, 4),
        "prefill_s": round(pre, 4),
        "decode_tokens_per_s": round((new - 1) / max(gen - pre, 1e-9), 2),
        "graphs": int(dynamo_utils.counters["stats"]["unique_graphs"]) if compiled else 0,
        "tokens": ref[0, prompt:].tolist(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "load_average": os.getloadavg()[0],
    }


def environment() -> dict:
    return {**machine_record(),
            "model": "SmolLM2-135M-Instruct Q4_1 GGUF (dequantized), float32, DynamicCache"}


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for mode in MODES:
        eager = next((r for r in rows if r["mode"] == mode and not r["compiled"]), None)
        comp = next((r for r in rows if r["mode"] == mode and r["compiled"]), None)
        if eager and comp:
            out.append({
                "mode": mode,
                "compiled_over_eager_decode_rate": round(comp["decode_tokens_per_s"] / eager["decode_tokens_per_s"], 3),
                "same_tokens": comp["tokens"] == eager["tokens"],
                "graphs": comp["graphs"],
            })
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--out", type=Path, default=RESULTS / "bench_compile.json")
    p.add_argument("--fresh", action="store_true")
    args = p.parse_args(argv)
    set_threads(args.threads)
    rows = [] if args.fresh or not args.out.exists() else json.loads(args.out.read_text())["rows"]
    env = environment()
    for mode in args.modes:
        for compiled in (False, True):
            key = (mode, compiled, args.prompt, args.new)
            if any((r["mode"], r["compiled"], r["prompt"], r["new_tokens"]) == key for r in rows):
                continue
            row = measure(mode, compiled, args.prompt, args.new, args.repeats)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "tokens"}), flush=True)
            write_json_atomic(args.out, {"environment": env, "rows": rows, "summary": summarize(rows)}, indent=1)
    print(json.dumps(summarize(rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
