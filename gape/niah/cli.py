"""``gape niah``: needle-in-a-haystack retrieval across lengths and depths, GAPE vs RoPE and
RoPE scaling, offline, resumable. ``--quick`` is the few-minute run on 2 CPU cores."""

from __future__ import annotations

import argparse
import os
import time

from .generator import HAYSTACKS, TASKS
from .methods import DEFAULT_GAPE_LAMBDA, METHODS, MethodOptions, parse_methods

# --quick: embedded SmolLM2, RoPE vs GAPE, 2 lengths x 3 depths x 1 sample
QUICK = {"methods": "rope,gape", "lengths": "1024,2048", "depths": "0,0.5,1", "samples": 1, "max_new_tokens": 16, "task": "single"}
DEFAULTS = {"methods": "rope,gape,yarn", "lengths": "1024,4096,8192", "depths": "0,0.25,0.5,0.75,1", "samples": 3, "max_new_tokens": 32, "task": "single"}


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"depths must be in [0, 1], got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--methods", help=f"comma-separated, from {','.join(METHODS)} (default {DEFAULTS['methods']})")
    parser.add_argument("--lengths", help=f"context lengths in tokens (default {DEFAULTS['lengths']})")
    parser.add_argument("--depths", help=f"needle depths in [0,1] (default {DEFAULTS['depths']})")
    parser.add_argument("--samples", type=int, help=f"samples per cell (default {DEFAULTS['samples']})")
    parser.add_argument("--task", choices=TASKS, help="a RULER needle task (default single: one key -> 7-digit number) or passkey (LongLoRA style)")
    parser.add_argument("--haystack", choices=HAYSTACKS, default="noise", help="repeated noise lines or the bundled essay")
    parser.add_argument("--model", default=None, help="HF model folder or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--gguf-file", default=None, help="GGUF file name inside --model")
    parser.add_argument("--gates", default=None, help="trained gate file (safetensors from gape calibrate) for the gape methods")
    parser.add_argument(
        "--gape-lambda",
        type=float,
        default=DEFAULT_GAPE_LAMBDA,
        help=f"training-free gape without --gates: constant forgetting rate lambda on every head (default {DEFAULT_GAPE_LAMBDA})",
    )
    parser.add_argument("--distance", choices=("log", "linear"), default="log", help="GAPE distance transform (training-free gape)")
    parser.add_argument("--rope-factor", type=float, default=2.0, help="factor for yarn/dynamic/linear and gape+yarn (default 2)")
    parser.add_argument("--out", default=None, help="output folder (default niah_results, or niah_quick with --quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, help=f"greedy tokens per answer (default {DEFAULTS['max_new_tokens']})")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-chat-template", action="store_true", help="plain prompt even when the model has a chat template")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a few-minute run on the embedded model: task single, rope,gape at 1024,2048 tokens, depths 0,0.5,1, 1 sample "
        "(flags given explicitly still win)",
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
    )


def run(args: argparse.Namespace) -> int:
    from .._threads import set_threads
    from .runner import RunMismatchError, run_benchmark

    try:
        cfg = config_from_args(args)
        cfg.validate()
    except (ValueError, argparse.ArgumentTypeError) as err:
        print(f"gape niah: error: {err}")
        return 2
    set_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    try:
        run_benchmark(cfg, progress=not args.no_progress)
    except RunMismatchError as err:
        print(f"gape niah: error: {err}")
        return 2
    print(f"results in {os.path.abspath(cfg.out)} ({time.perf_counter() - start:.0f} s)")
    return 0
