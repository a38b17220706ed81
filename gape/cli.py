"""The ``gape`` command line. Each subcommand lives in its own module, which
defines ``add_arguments(parser)`` and ``run(args) -> int``; it is imported only
when that subcommand runs, so ``gape --help`` stays fast."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, help)
SUBCOMMANDS = {
    "niah": ("gape.tasks.niah.cli", "needle-in-a-haystack benchmark (GAPE vs RoPE and RoPE scaling)"),
    "eval": ("gape.tasks.lmeval.cli", "lm-evaluation-harness with the 'gape' model registered (args pass through)"),
    "audit-kernels": ("gape.kernels.audit", "compile every Triton kernel variant for sm_80/sm_90 and report registers, spills, shared memory"),
    "synthetic": ("gape.experiments.synthetic", "train tiny models from scratch on synthetic retrieval; length extrapolation"),
    "extrapolate": ("gape.experiments.extrapolate", "the paper's experiment at CPU scale: NoPE/RoPE/p-RoPE/ALiBi with and without GAPE, retrieval and LM"),
    "calibrate": ("gape.experiments.calibrate", "train only the gates of a pretrained model"),
    "inspect": ("gape.experiments.inspect", "plot attention mass against distance and the gate values"),
    "longctx": ("gape.experiments.longctx", "long-context fine-tuning study: YaRN with and without GAPE gates, resumable"),
}
# subcommands whose remaining arguments belong to another program
PASSTHROUGH = {"eval"}


class Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error: ``gape NAME: error: argument --flag: why``
    (and where to read the flags), exit status 2, no usage block, no traceback."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="gape", description="GAPE: gated adaptive positional encoding")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    name = argv[0]
    if name not in SUBCOMMANDS:
        print(f"gape: error: unknown command {name!r}; choose from {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    if name in PASSTHROUGH:
        try:
            return int(module.run(argv[1:]) or 0)
        except SystemExit as exit_:  # the other program's argparse error (2)
            return int(exit_.code or 0) if isinstance(exit_.code, (int, type(None))) else 2
    cmd = Parser(prog=f"gape {name}", description=SUBCOMMANDS[name][1])
    module.add_arguments(cmd)
    try:
        args = cmd.parse_args(argv[1:])  # a bad flag value stops here, its flag named on stderr
        check = getattr(module, "check_arguments", None)
        if check is not None:
            check(cmd, args)  # constraints between flags (cmd.error names them)
    except SystemExit as exit_:  # argparse's error (2) or --help (0), as a return code for main(argv) callers
        return int(exit_.code or 0)
    from ._args import UsageError
    from ._io import FolderLockedError

    try:
        return int(module.run(args) or 0)
    except (UsageError, FolderLockedError, OSError) as err:  # what the user can fix: no traceback
        print(f"gape {name}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
