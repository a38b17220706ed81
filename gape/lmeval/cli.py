"""``gape eval ...``: lm-eval's own command line with the ``gape`` model registered and the
gape task folder on the include path (so ``--tasks gape_passkey`` needs no --include_path).

    gape eval --model gape --model_args method=gape --tasks gape_passkey --limit 2 --output_path DIR
    gape eval --model gape --model_args method=rope --tasks niah_single_1 \\
        --metadata '{"tokenizer": "TOKENIZER_DIR", "max_seq_lengths": [4096]}'

Every argument is lm-eval's (``lm-eval run --help``); ``run`` is implied when no lm-eval
subcommand (run, ls, validate) is given.
"""

from __future__ import annotations

import os

from . import TASKS_DIR, register


def run(argv: list[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        print("gape eval needs lm-evaluation-harness: pip install 'gape[eval]'")
        return 2
    register()
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    argv = list(argv)
    cli = HarnessCLI()
    subcommands = cli._subparsers.choices
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
    cli.execute(args)
    return 0
