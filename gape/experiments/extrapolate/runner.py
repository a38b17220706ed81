"""The resumable queue of ``gape extrapolate``: one model per (task, scheme, GAPE form and
start, RoPE base, seed), trained, evaluated, and written before the next one starts.

Output folder (one writer):

- ``config.json``: the experiment (anything that changes a number); a resumed run must match it.
- ``rows.jsonl``: one JSON object per (run, evaluation length), rewritten atomically after
  each run, so a kill at any moment leaves every finished run and nothing partial.
- ``runs/<run id>.json``: a run's loss curve, gate magnitudes over training, mask strength
  at the end, timings (written before its rows, so a run is done exactly when its rows are).
- ``summary.md`` and ``*.png``: regenerated from the two above after each run (:mod:`.report`).

A run killed half-way is retrained from scratch; data, initialisation and evaluation depend
only on the seed, so the resumed folder holds the same numbers an uninterrupted run would.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass

import torch

from .. import synthetic as syn
from gape._args import UsageError
from gape._io import lock_folder, write_atomic, write_json_atomic
from . import corpus as corpus_mod
from . import tasks
from .models import GAPE_FORMS, ROTARY, SCHEMES, Arch, build, variant_label
from .rows import (  # noqa: F401 (read_rows, write_rows and the file names are runner's API too)
    CONFIG,
    METRIC_FIELD,
    QUEUE_KEYS,
    ROW_FIELDS,
    ROWS,
    _merge_queue,
    _same_experiment,
    _valid_row,
    read_config,
    read_record,
    read_rows,
    write_rows,
)


@dataclass(frozen=True)
class Job:
    task: str
    scheme: str
    gape: str
    start: str
    base: float
    seed: int

    @property
    def variant(self) -> str:
        return variant_label(self.gape, self.start, self.scheme, self.base)

    @property
    def run_id(self) -> str:
        base = f"base{self.base:.0e}".replace("e+0", "e") if self.scheme in ROTARY else "nobase"
        return f"{self.task}-{self.scheme}-{self.gape}-{self.start}-{base}-seed{self.seed}"


# seeds run in blocks of this many, so that whatever finishes holds whole rows with enough
# seeds for a paired verdict
SEED_BLOCK = 3


def queue(config: dict) -> list[Job]:
    """Every job, ordered so that a partial folder holds whole rows and the first verdict
    comes early: seeds in blocks of ``SEED_BLOCK``; within a block, first the lead pair
    (the first scheme without GAPE, then with the first GAPE form: RoPE without and with
    the paper's gates by default), then every other baseline (``none``), then the other GAPE
    rows in the order of ``forms``, each across ``schemes`` in their order; within a row,
    each task over the block's seeds. The main base first, then the further bases (rotary
    schemes only, as NoPE and ALiBi have no base)."""
    jobs = []
    seeds = list(config["seeds"])
    for bi, base in enumerate(config["bases"]):
        schemes = [s for s in config["schemes"] if bi == 0 or s in ROTARY]
        rows = [(scheme, tuple(form)) for form in config["forms"] for scheme in schemes]
        none = [r for r in rows if r[1][0] == "none"]
        gated = [r for r in rows if r[1][0] != "none"]
        lead = ([none[0]] if none else []) + [r for r in gated[:1] if not none or r[0] == none[0][0]]
        rows = lead + [r for r in none + gated if r not in lead]
        for b0 in range(0, len(seeds), SEED_BLOCK):
            block = seeds[b0 : b0 + SEED_BLOCK]
            for scheme, (gape, start) in rows:
                for task in config["tasks"]:
                    jobs += [Job(task, scheme, gape, start, base, seed) for seed in block]
    return jobs


# --------------------------------------------------------------------------- rows


def prepare(out: str, config: dict, force: bool = False) -> dict:
    """Create or reopen ``out`` for ``config``; returns the folder's (merged) config."""
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    path = os.path.join(out, CONFIG)
    if os.path.exists(path):
        old = read_config(out)
        diff = _same_experiment(_plain(old), _plain(config))
        if diff and not force:
            raise UsageError(f"{out} holds results of a different experiment (differs in {diff}); use another --out, or --force to discard them")
        if diff:
            write_rows(out, [])
            old = {}
        config = _merge_queue(_plain(old), _plain(config))
    write_json_atomic(path, _plain(config), indent=1, sort_keys=True)
    return config


def _plain(config: dict) -> dict:
    return json.loads(json.dumps(config))


# --------------------------------------------------------------------------- one run


def run_job(job: Job, config: dict, data, log=print) -> tuple[list[dict], dict]:
    """Train and evaluate one model; returns ``(rows, record)``."""
    t = config[job.task]
    T = t["train_length"]
    lengths = [m * T for m in t["multiples"]]
    arch = Arch(**task_arch(config, job.task))
    vocab = tasks.RETRIEVAL_VOCAB if job.task == "retrieval" else corpus_mod.VOCAB
    model = build(arch, vocab, job.scheme, job.gape, job.start, job.base, T, max(lengths), job.seed)
    t0 = time.perf_counter()
    trained = tasks.train(model, job.task, data=data, steps=t["steps"], train_length=T, batch=t["batch"], lr=t["lr"],
                          min_length=t.get("min_length", tasks.RETRIEVAL_MIN_LEN),
                          warmup=config["warmup"], seed=job.seed, gate_every=config["gate_every"],
                          track_gates=job.gape != "none",
                          log_every=max(1, t["steps"] // 10), log=log)
    t1 = time.perf_counter()
    results, valid = {}, None
    ev = config["eval"]
    if job.task == "retrieval":
        for L in lengths:
            results[L] = tasks.eval_retrieval(model, L, ev["samples"], batch_tokens=ev["batch_tokens"], entropy_samples=ev["entropy_samples"])
    else:
        for L in lengths:
            windows = corpus_mod.eval_windows(data.test, L, max(ev["min_windows"], ev["tokens"] // L))
            results[L] = tasks.eval_lm(model, windows, T, batch_tokens=ev["batch_tokens"], entropy_windows=ev["entropy_samples"])
        vw = corpus_mod.eval_windows(data.valid, T, max(ev["min_windows"], ev["tokens"] // T))
        valid = tasks.eval_lm(model, vw, T, batch_tokens=ev["batch_tokens"], entropy_windows=0)["perplexity"]
    mask = {}
    if job.gape != "none":
        L = config["mask_multiple"] * T
        probe = (corpus_mod.eval_windows(data.test, L, 8)[:, :L] if job.task == "lm"
                 else syn.make_batch(torch.Generator().manual_seed(5), 8, L)[0])
        mask = tasks.mask_strength(model, probe, stride=max(1, L // 256))
    t2 = time.perf_counter()
    rows = []
    for L, r in results.items():
        row = {"run": job.run_id, "task": job.task, "scheme": job.scheme, "gape": job.gape, "start": job.start,
               "variant": job.variant, "rope_base": job.base if job.scheme in ROTARY else None, "seed": job.seed,
               "train_length": T, "length": L, "multiple": L // T, "entropy": r["entropy"],
               "entropy_mean": round(sum(r["entropy"]) / len(r["entropy"]), 5)}
        if job.task == "retrieval":
            row["accuracy"] = r["accuracy"]
        else:
            row.update(perplexity=round(r["perplexity"], 5), perplexity_last_t=round(r["perplexity_last_t"], 5),
                       windows=r["windows"], valid_perplexity=round(valid, 5))
        rows.append(row)
    record = {"run": job.run_id, "job": job.__dict__, "variant": job.variant, **trained, "mask_strength": mask,
              "train_s": round(t1 - t0, 2), "eval_s": round(t2 - t1, 2), "valid_perplexity": valid,
              "parameters": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads()}
    return rows, record


def task_arch(config: dict, task: str) -> dict:
    """The model of ``task``: its own ``arch``, else the experiment's (folders of the first setting)."""
    return config[task].get("arch") or config["arch"]


def _show(row: dict) -> str:
    metric = f"acc {row['accuracy']:.3f}" if "accuracy" in row else f"ppl {row['perplexity']:.3f} (last T {row['perplexity_last_t']:.3f})"
    return f"  L={row['length']:6d} ({row['multiple']:2d}T): {metric}  entropy {row['entropy_mean']:.3f}"


def merge(out: str, sources: list[str], warn=None) -> list[dict]:
    """Add to ``out`` the finished runs of other folders of the same experiment (for example
    other seeds run by a second process, each folder with its own single writer); runs
    ``out`` already has are kept as they are. ``out`` is locked meanwhile, as for a run, so
    a merge never races a writer. Returns every row of ``out``."""
    with lock_folder(out, "gape extrapolate"):
        config = read_config(out)
        rows = read_rows(out, warn, config)
        have = {r["run"] for r in rows}
        for src in sources:
            other = read_config(src)
            diff = _same_experiment(config, other)
            if diff:
                raise UsageError(f"{src} is a different experiment from {out} (differs in {diff}); cannot merge")
            new = [r for r in read_rows(src, warn, other) if r["run"] not in have]
            for run_id in sorted({r["run"] for r in new}):
                write_json_atomic(os.path.join(out, "runs", run_id + ".json"), read_record(src, run_id), sort_keys=True)
            rows += new
            have |= {r["run"] for r in new}
            config = _merge_queue(config, other)
        write_json_atomic(os.path.join(out, CONFIG), config, indent=1, sort_keys=True)
        write_rows(out, rows)
    return rows


REPORT_EVERY_S = 300.0


def run(out: str, config: dict, *, corpus: str | None = None, check_corpus: bool = True, force: bool = False,
        max_runs: int | None = None, report: bool = True, log=print) -> list[dict]:
    """Work through the queue, skipping finished runs; returns every row in the folder.

    ``report``: regenerate summary.md and the plots at the end and at most every
    ``REPORT_EVERY_S`` seconds in between (they cost a few seconds of CPU each time)."""
    with lock_folder(out, "gape extrapolate"):
        return _run_locked(out, config, corpus=corpus, check_corpus=check_corpus, force=force, max_runs=max_runs,
                           report=report, log=log)


def _run_locked(out: str, config: dict, *, corpus, check_corpus, force, max_runs, report, log) -> list[dict]:
    config = prepare(out, config, force)
    rows = read_rows(out, log, config)
    done = {r["run"] for r in rows}
    jobs = [j for j in queue(config) if j.run_id not in done]
    log(f"{out}: {len(done)} run(s) done, {len(jobs)} to go")
    data = None
    if any(j.task == "lm" for j in jobs):
        import tarfile

        need = max(config["lm"]["multiples"]) * config["lm"]["train_length"] + 1
        try:
            data = corpus_mod.load(corpus, check=check_corpus, min_doc_tokens=need)
        except (ValueError, tarfile.TarError) as err:  # the user's --corpus or --train-len, not a bug: no traceback
            raise UsageError(f"--corpus / --train-len: {err} (the LM needs held-out documents of {need} bytes)") from None
    if max_runs is not None:
        jobs = jobs[:max_runs]
    last_report = time.monotonic()
    for n, job in enumerate(jobs):
        log(f"[{len(done) + n + 1}/{len(done) + len(jobs)}] {job.run_id}")
        new, record = run_job(job, config, data, log=log)
        for r in new:
            log(_show(r))
        write_json_atomic(os.path.join(out, "runs", job.run_id + ".json"), record, sort_keys=True)
        rows = rows + new
        write_rows(out, rows)
        log(f"  train {record['train_s']:.1f} s, eval {record['eval_s']:.1f} s")
        if report and (n + 1 == len(jobs) or time.monotonic() - last_report > REPORT_EVERY_S):
            from . import report as report_mod

            report_mod.write(out)
            last_report = time.monotonic()
    return rows
