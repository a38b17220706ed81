"""``gape eval ...``: lm-eval's own command line with the ``gape`` model registered and the
gape task folder on the include path (so ``--tasks gape_passkey`` needs no --include_path).

    gape eval --model gape --model_args method=gape --tasks gape_passkey --limit 2 --output_path DIR
    gape eval --model gape --model_args method=rope --tasks niah_single_1 \\
        --metadata '{"tokenizer": "TOKENIZER_DIR", "max_seq_lengths": [4096]}'

Every argument is lm-eval's (``lm-eval run --help``); ``run`` is implied when no lm-eval
subcommand (run, ls, validate) is given. One is gape's: ``--dtype auto|float32|bfloat16|float16``,
short for ``dtype=...`` in ``--model_args``.
"""

from __future__ import annotations

import contextlib
import os
import sys

from gape._io import relative_paths

from . import TASKS_DIR, register


def _one_line_errors(parser) -> None:
    """lm-eval's parse errors as one line naming the flag, like every gape command's."""

    def error(message: str):
        parser.exit(2, f"gape eval: error: {message} (see gape eval --help)\n")

    parser.error = error


def run(argv: list[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        print("gape eval: error: lm-evaluation-harness is not installed: pip install 'gape[eval]'", file=sys.stderr)
        return 2
    register()
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    try:
        argv = with_dtype(list(argv))
    except ValueError as err:
        print(f"gape eval: error: {err}")
        return 2
    cli = HarnessCLI()
    subcommands = cli._subparsers.choices
    for parser in (cli._parser, *subcommands.values()):
        _one_line_errors(parser)
    if not argv:
        cli._parser.print_help()
        print("\n(gape eval: the 'gape' model and the gape_* tasks are available; 'run' is implied)")
        return 0
    if argv[0] not in subcommands and argv[0] not in ("-h", "--help"):
        argv.insert(0, "run")
    args = cli._parser.parse_args(argv)
    if hasattr(args, "include_path"):
        # lm-eval takes one path on the command line but a list in TaskManager
        args.include_path = [TASKS_DIR] + ([args.include_path] if args.include_path else [])
    setup_logging()
    with _clean_results():
        cli.execute(args)
    return 0


def with_dtype(argv: list[str]) -> list[str]:
    """``argv`` with gape's ``--dtype X`` moved into ``--model_args`` as ``dtype=X``."""
    from gape._args import DTYPE_CHOICES

    out, dtype = [], None
    it = iter(argv)
    for a in it:
        if a == "--dtype" or a.startswith("--dtype="):
            dtype = a.split("=", 1)[1] if "=" in a else next(it, None)
            if dtype not in DTYPE_CHOICES:
                raise ValueError(f"--dtype must be one of {DTYPE_CHOICES}, got {dtype!r}")
        else:
            out.append(a)
    if dtype is None:
        return out
    for i, a in enumerate(out):
        if a in ("--model_args", "--model-args") and i + 1 < len(out):
            if out[i + 1].lstrip().startswith("{") or "dtype=" in out[i + 1]:
                raise ValueError("--dtype with --model_args that is JSON or names dtype itself: give dtype in one place")
            out[i + 1] = f"{out[i + 1]},dtype={dtype}" if out[i + 1] else f"dtype={dtype}"
            return out
    return out + ["--model_args", f"dtype={dtype}"]


def drop_unrun_lengths(results: dict) -> dict:
    """Remove the per-length metrics of lengths that were not run, in place.

    RULER's tasks (lm-eval's and gape's) score every sample under every length
    of a fixed list and put -1 under the lengths the sample does not have; a
    length no sample had aggregates to -1. Those are placeholders, not scores:
    they are dropped (with their stderr) from the results lm-eval prints and saves.
    """
    for metrics in results.get("results", {}).values():
        for name in [k for k, v in metrics.items() if v == -1 and k.split(",")[0].isdigit()]:
            del metrics[name]
            metrics.pop(name.replace(",", "_stderr,", 1), None)
    return results


@contextlib.contextmanager
def _clean_results():
    """lm-eval's run imports ``simple_evaluate`` from ``lm_eval`` when it executes:
    wrap it for the duration of the command so its results lose the placeholders
    (:func:`drop_unrun_lengths`) and record paths relative (``gape._io.relative_paths``)."""
    import lm_eval
    from lm_eval.loggers import EvaluationTracker

    had = "simple_evaluate" in vars(lm_eval)  # else a lazy module attribute
    original, save = lm_eval.simple_evaluate, EvaluationTracker.save_results_aggregated

    # lm-eval saves the absolute paths of the model's files (also as the model's name) and of
    # its own task configs; results are committed, and name no folder of this machine
    def evaluate(*args, **kwargs):
        results = original(*args, **kwargs)
        return relative_paths(drop_unrun_lengths(results)) if results is not None else results

    def save_results_aggregated(self, *args, **kwargs):
        config = self.general_config_tracker
        config.model_name = relative_paths(config.model_name)
        return save(self, *args, **kwargs)

    lm_eval.simple_evaluate = evaluate
    EvaluationTracker.save_results_aggregated = save_results_aggregated
    try:
        yield
    finally:
        EvaluationTracker.save_results_aggregated = save
        if had:
            lm_eval.simple_evaluate = original
        else:
            del lm_eval.simple_evaluate
