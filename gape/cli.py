"""The ``gape`` command line. Each subcommand lives in its own module, which
defines ``add_arguments(parser)`` and ``run(args) -> int``; it is imported only
when that subcommand runs, so ``gape --help`` stays fast."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, help)
SUBCOMMANDS = {
    "niah": ("gape.niah.cli", "needle-in-a-haystack benchmark (GAPE vs RoPE and RoPE scaling)"),
    "eval": ("gape.lmeval.cli", "lm-evaluation-harness with the 'gape' model registered (args pass through)"),
    "audit-kernels": ("gape.kernels.audit", "compile every Triton kernel variant for sm_80/sm_90 and report registers, spills, shared memory"),
    "synthetic": ("gape.synthetic", "train tiny models from scratch on synthetic retrieval; length extrapolation"),
    "extrapolate": ("gape.extrapolate", "the paper's experiment at CPU scale: NoPE/RoPE/p-RoPE/ALiBi with and without GAPE, retrieval and LM"),
    "calibrate": ("gape.calibrate", "train only the gates of a pretrained model"),
    "inspect": ("gape.inspect", "plot attention mass against distance and the gate values"),
}
# subcommands whose remaining arguments belong to another program
PASSTHROUGH = {"eval"}


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
        parser.error(f"unknown command {name!r}; choose from {', '.join(SUBCOMMANDS)}")
    module = importlib.import_module(SUBCOMMANDS[name][0])
    if name in PASSTHROUGH:
        return int(module.run(argv[1:]) or 0)
    cmd = argparse.ArgumentParser(prog=f"gape {name}", description=SUBCOMMANDS[name][1])
    module.add_arguments(cmd)
    return int(module.run(cmd.parse_args(argv[1:])) or 0)


if __name__ == "__main__":
    sys.exit(main())
