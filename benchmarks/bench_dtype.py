"""bfloat16 against float32 on the embedded SmolLM2-135M: the same NIAH samples and
held-out perplexity in both dtypes, unpatched (``rope``) and GAPE-patched (``gape``).

What it answers: does ``--dtype bfloat16`` give the answers float32 gives? Speed is not
measured here (benchmarks/bench_attention.py and bench_model.py do that); each row
records its wall time only so the cost of a rerun is known.

- NIAH: ``gape niah``'s runner (task ``single``, noise haystack, the chat template, the
  constant-rate GAPE of ``gape niah``'s default ``--gape-lambda``), at ``--lengths`` x
  ``--depths``, one folder per dtype (``niah-<dtype>/``): the prompts depend only on the
  seed, length, depth and sample index, so both dtypes see the same ones.
- Perplexity: the first ``--ppl-length + 1`` tokens of each of ``--ppl-plays`` held-out
  plays of the Shakespeare corpus the long-context study uses (its test plays), mean
  next-token NLL in float64 over float32 logits, rows in ``ppl.jsonl``.

Everything is resumable: NIAH rows go to each folder's ``results.jsonl`` as they finish,
perplexity rows to ``ppl.jsonl`` (rewritten atomically); a rerun skips what is there.
``summary.md`` and ``machine.json`` are rewritten at the end.

    python benchmarks/bench_dtype.py                         # 1k/2k/4k x 3 depths, ppl at 2k on hamlet, tempest
    python benchmarks/bench_dtype.py --ppl-plays 4           # resumes, adding two more plays
    python benchmarks/bench_dtype.py --dtypes float32        # one dtype only
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "bench_dtype"
DTYPES = ("float32", "bfloat16")
METHODS = ("rope", "gape")
PPL_FILE = "ppl.jsonl"


def niah_folder(out: Path, dtype: str) -> Path:
    return out / f"niah-{dtype}"


def run_niah(model, tokenizer, dtype: str, args) -> None:
    from gape.tasks.niah.runner import BenchmarkConfig, run_benchmark

    cfg = BenchmarkConfig(methods=list(args.methods), lengths=list(args.lengths), depths=list(args.depths),
                          samples=args.samples, task="single", haystack="noise", out=str(niah_folder(args.out, dtype)),
                          seed=0, max_new_tokens=args.max_new_tokens, dtype=dtype)
    run_benchmark(cfg, model, tokenizer, progress=False, echo=lambda msg: print(f"[{dtype}] {msg}", flush=True))


def read_ppl(out: Path) -> list[dict]:
    path = out / PPL_FILE
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line of an interrupted write
        if isinstance(row, dict) and {"dtype", "method", "play", "length", "nll"} <= row.keys():
            rows.append(row)
    return rows


def ppl_key(row: dict) -> tuple:
    return row["dtype"], row["method"], row["play"], int(row["length"])


def run_ppl(model, tokenizer, dtype: str, args) -> None:
    from gape._io import write_atomic
    from gape.experiments.longctx.study import held_out, token_nll, tokenize_plays
    from gape.tasks.methods import apply_method

    rows = read_ppl(args.out)
    done = {ppl_key(r) for r in rows}
    plays = [p for p in held_out()][: args.ppl_plays]
    todo = [(m, p) for m in args.methods for p in plays if (dtype, m, p, args.ppl_length) not in done]
    if not todo:
        return
    ids = tokenize_plays(tokenizer)
    for method in args.methods:
        mine = [p for m, p in todo if m == method]
        if not mine:
            continue
        restore = apply_method(model, method)
        try:
            for play in mine:
                window = ids[play][: args.ppl_length + 1]
                if len(window) <= args.ppl_length:
                    raise ValueError(f"--ppl-length {args.ppl_length}: the play {play} has only {len(window)} tokens")
                t0 = time.perf_counter()
                with torch.no_grad():
                    nll = token_nll(model, torch.tensor([window]))
                row = {"dtype": dtype, "method": method, "play": play, "length": args.ppl_length,
                       "nll": float(nll.double().mean()), "seconds": round(time.perf_counter() - t0, 2),
                       "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                       "load_avg_1m": round(os.getloadavg()[0], 2)}
                rows.append(row)
                write_atomic(args.out / PPL_FILE, "".join(json.dumps(r) + "\n" for r in rows))
                print(f"[{dtype}] ppl {method} {play} {args.ppl_length}: nll {row['nll']:.4f} ({row['seconds']} s)", flush=True)
        finally:
            restore()


# --------------------------------------------------------------------------- summary


def _niah_rows(out: Path, dtype: str) -> dict:
    from gape.tasks.niah import results as res

    folder = niah_folder(out, dtype)
    if not folder.is_dir():
        return {}
    return {(r["method"], r["length"], r["depth"], r["sample"]): r for r in res.read_rows(str(folder))}


def summary_markdown(out: Path, machine: dict) -> str:
    import math

    by = {d: _niah_rows(out, d) for d in DTYPES}
    lines = [f"# bfloat16 vs float32 on SmolLM2-135M ({machine['date']})", "",
             f"Machine: {machine['processor']}, {machine['cpu_count']} cores, {machine['threads']} torch thread; "
             f"bfloat16 matrix arithmetic native: {machine['native_bf16']}; load average at the end "
             f"{machine['load_avg_1m']}.", "",
             "## NIAH (task single, noise haystack): correct / samples, and answers that differ between dtypes", "",
             "| method | length | float32 | bfloat16 | same response | bfloat16 s/sample (float32) |",
             "|---|---:|---:|---:|---:|---:|"]
    keys = sorted(set(by["float32"]) & set(by["bfloat16"]))
    for method in METHODS:
        for length in sorted({k[1] for k in keys}):
            ks = [k for k in keys if k[0] == method and k[1] == length]
            if not ks:
                continue
            f32 = sum(by["float32"][k]["correct"] for k in ks)
            b16 = sum(by["bfloat16"][k]["correct"] for k in ks)
            same = sum(by["float32"][k]["response"].strip() == by["bfloat16"][k]["response"].strip() for k in ks)
            secs = [sum(by[d][k]["seconds"] for k in ks) / len(ks) for d in ("bfloat16", "float32")]
            lines.append(f"| {method} | {length} | {f32}/{len(ks)} | {b16}/{len(ks)} | {same}/{len(ks)} | "
                         f"{secs[0]:.1f} ({secs[1]:.1f}) |")
    differing = [(k, by["float32"][k]["response"], by["bfloat16"][k]["response"]) for k in keys
                 if by["float32"][k]["response"].strip() != by["bfloat16"][k]["response"].strip()]
    if differing:
        lines += ["", "Responses that differ (method, length, depth, sample: float32 | bfloat16):", ""]
        lines += [f"- {k[0]}, {k[1]}, {k[2]}, {k[3]}: `{a.strip()}` | `{b.strip()}`" for k, a, b in differing]
    ppl = {ppl_key(r): r for r in read_ppl(out)}
    lines += ["", "## Held-out perplexity (first tokens of each play)", "",
              "| method | play | length | float32 ppl | bfloat16 ppl | bfloat16 / float32 |", "|---|---|---:|---:|---:|---:|"]
    for (dtype, method, play, length), r in sorted(ppl.items(), key=lambda kv: (METHODS.index(kv[0][1]), kv[0][2])):
        if dtype != "float32":
            continue
        b = ppl.get(("bfloat16", method, play, length))
        f_ppl = math.exp(r["nll"])
        b_ppl = math.exp(b["nll"]) if b else float("nan")
        lines.append(f"| {method} | {play} | {length} | {f_ppl:.3f} | {b_ppl:.3f} | {b_ppl / f_ppl:.4f} |")
    return "\n".join(lines) + "\n"


def machine_info(threads: int) -> dict:
    from gape._machine import machine_record
    from gape.kernels.attention_cpu import native_half

    return {**machine_record(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "native_bf16": native_half(torch.bfloat16), "load_avg_1m": round(os.getloadavg()[0], 2),
            "model": "SmolLM2-135M-Instruct Q4_1 GGUF (dequantized), gape.load_model()", "threads": threads}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096], help="NIAH prompt lengths")
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9], help="NIAH needle depths")
    p.add_argument("--samples", type=int, default=1, help="NIAH samples per (length, depth)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--ppl-length", type=int, default=2048, help="tokens per perplexity window (inside the 8k window)")
    p.add_argument("--ppl-plays", type=int, default=2, help="held-out plays, one window each (test plays first: hamlet, tempest, ...)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gape._threads import set_threads
    from gape.hf.models import load_model

    set_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    # Both models stay loaded (135M parameters each) and the work goes length by length,
    # both dtypes at each, so an interrupted run leaves pairs that compare.
    models = {d: load_model(dtype=getattr(torch, d)) for d in args.dtypes}
    for dtype, (model, tokenizer) in models.items():
        run_ppl(model, tokenizer, dtype, args)
    lengths = sorted(set(args.lengths))
    for length in lengths:
        args.lengths = [length]
        for dtype, (model, tokenizer) in models.items():
            run_niah(model, tokenizer, dtype, args)
    args.lengths = lengths
    from gape._io import write_atomic, write_json_atomic

    machine = machine_info(args.threads)
    write_json_atomic(str(args.out / "machine.json"), machine, indent=1)
    text = summary_markdown(args.out, machine)
    write_atomic(args.out / "summary.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
