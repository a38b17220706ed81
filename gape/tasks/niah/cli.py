"""``gape niah``: needle-in-a-haystack retrieval across lengths and depths, GAPE vs RoPE and
RoPE scaling, offline, resumable. ``--quick`` is the few-minute run on 2 CPU cores.
Under ``torchrun --nproc-per-node N`` the samples are split across N processes (one model each)."""

from __future__ import annotations

import argparse
import os
import sys
import time

from gape import _args as A
from ..prompts import HAYSTACKS, TASKS
from ..methods import DEFAULT_GAPE_LAMBDA, METHODS, MethodOptions, parse_methods

# --quick: embedded SmolLM2, RoPE vs GAPE, 2 lengths x 3 depths x 1 sample
QUICK = {"methods": "rope,gape", "lengths": "1024,2048", "depths": "0,0.5,1", "samples": 1, "max_new_tokens": 16, "task": "single"}
DEFAULTS = {"methods": "rope,gape,yarn", "lengths": "1024,4096,8192", "depths": "0,0.25,0.5,0.75,1", "samples": 3, "max_new_tokens": 32, "task": "single"}


# parse-time types: a bad value is reported under its flag (gape._args)
_lengths = A.int_list(1, A.MAX_TOKENS)
_depths = A.float_list(0.0, 1.0)
_methods = A.choice_list(METHODS)


def _ints(text: str) -> list[int]:
    return _lengths(text)


def _floats(text: str) -> list[float]:
    return _depths(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--methods", type=_methods, help=f"comma-separated, from {','.join(METHODS)} (default {DEFAULTS['methods']})")
    parser.add_argument("--lengths", type=_lengths,
                        help=f"context lengths in tokens, at most {A.MAX_TOKENS} (default {DEFAULTS['lengths']})")
    parser.add_argument("--depths", type=_depths, help=f"needle depths in [0,1] (default {DEFAULTS['depths']})")
    parser.add_argument("--samples", type=A.integer(1, 10_000), help=f"samples per cell (default {DEFAULTS['samples']})")
    parser.add_argument("--task", choices=TASKS, help="a RULER needle task (single: one key -> 7-digit number; multikey; multivalue) or passkey "
                        "(LongLoRA style) (default single)")
    parser.add_argument("--haystack", choices=HAYSTACKS, default="noise", help="repeated noise lines or the bundled essay (default noise)")
    parser.add_argument("--model", type=A.model_path, default=None, help="HF model folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--gguf-file", default=None, help="GGUF file name inside --model (default: the folder's only .gguf)")
    parser.add_argument("--gates", type=A.in_file, default=None, help="trained gate file (safetensors from gape calibrate) for the gape methods (default: none, "
                        "the constant-rate gape of --gape-lambda)")
    parser.add_argument(
        "--gape-lambda",
        type=A.number(0.0, 100.0),
        default=DEFAULT_GAPE_LAMBDA,
        help=f"constant-rate gape (no --gates): the forgetting rate lambda of every head, pi = 0 "
        f"(default {DEFAULT_GAPE_LAMBDA})",
    )
    parser.add_argument("--distance", choices=("log", "linear"), default="log", help="distance of the constant-rate gape: log(1 + d) or d (default log)")
    parser.add_argument("--rope-factor", type=A.number(1.0, 1024.0), default=2.0, help="factor for yarn/dynamic/linear and gape+yarn (default 2)")
    parser.add_argument("--out", type=A.out_folder, default=None, help="output folder (default niah_results, or niah_quick with --quick)")
    parser.add_argument("--seed", type=A.seed, default=0, help="seed of the needles and haystacks (default 0)")
    parser.add_argument("--max-new-tokens", type=A.integer(1, 4096), help=f"greedy tokens per answer (default {DEFAULTS['max_new_tokens']})")
    parser.add_argument("--threads", type=A.threads, default=None, help="torch CPU threads (default: torch's choice)")
    A.add_dtype(parser)
    parser.add_argument("--no-chat-template", action="store_true", help="plain prompt even when the model has a chat template (default: the template when there is one)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (default: a bar with an ETA)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a few-minute run on the embedded model: task single, rope,gape at 1024,2048 tokens, depths 0,0.5,1, 1 sample "
        "(flags given explicitly still win) (default: off)",
    )


def config_from_args(args: argparse.Namespace):
    from .runner import BenchmarkConfig

    preset = QUICK if args.quick else DEFAULTS
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else preset[name]  # noqa: E731
    lengths = pick("lengths")
    depths = pick("depths")
    return BenchmarkConfig(
        methods=parse_methods(pick("methods")),
        lengths=_ints(lengths) if isinstance(lengths, str) else lengths,
        depths=_floats(depths) if isinstance(depths, str) else depths,
        samples=pick("samples"),
        task=pick("task"),
        haystack=args.haystack,
        out=args.out or ("niah_quick" if args.quick else "niah_results"),
        seed=args.seed,
        max_new_tokens=pick("max_new_tokens"),
        options=MethodOptions(rope_factor=args.rope_factor, gates=args.gates, gape_lambda=args.gape_lambda, distance=args.distance),
        model=args.model,
        gguf_file=args.gguf_file,
        chat_template=False if args.no_chat_template else None,
        dtype=getattr(args, "dtype", A.DEFAULT_DTYPE),
    )


def run(args: argparse.Namespace) -> int:
    from gape._threads import set_threads
    from gape._io import FolderLockedError
    from .runner import RunMismatchError, run_benchmark

    try:
        cfg = config_from_args(args)
        cfg.validate()
    except (ValueError, argparse.ArgumentTypeError) as err:
        print(f"gape niah: error: {err}", file=sys.stderr)
        return 2
    set_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    try:
        run_benchmark(cfg, progress=not args.no_progress)
    except (RunMismatchError, A.UsageError, FolderLockedError) as err:
        print(f"gape niah: error: {err}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        print(f"results in {os.path.abspath(cfg.out)} ({time.perf_counter() - start:.0f} s)")
    return 0
