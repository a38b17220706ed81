"""Argument types of the ``gape`` subcommands: every flag is checked at parse
time, so argparse reports a bad value under the flag's own name
(``gape niah: error: argument --lengths: ...``) before anything is loaded.

Also :class:`UsageError`, the run-time error of a command that the user can
fix (busy or mismatched output folder, a length the machine cannot hold):
``gape.cli.main`` prints it without a traceback and returns 2.
"""

from __future__ import annotations

import argparse
import math
import os

# The longest prompt any command accepts (tokens); the memory check of the run
# itself (gape.tasks.niah.runner) usually refuses far less.
MAX_TOKENS = 1 << 20


class UsageError(ValueError):
    """A command-line run refused for a reason the user can fix."""


def _bad(msg: str):
    return argparse.ArgumentTypeError(msg)


def integer(lo: int | None = None, hi: int | None = None):
    """An int in ``[lo, hi]`` (either bound optional)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise _bad(f"expected an integer, got {text!r}") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise _bad(f"must be {_range(lo, hi)}, got {value}")
        return value

    return parse


def number(lo: float | None = None, hi: float | None = None, *, above: bool = False):
    """A finite float in ``[lo, hi]`` (``(lo, hi]`` with ``above``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise _bad(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise _bad(f"must be a finite number, got {text!r}")
        low_bad = lo is not None and (value <= lo if above else value < lo)
        if low_bad or (hi is not None and value > hi):
            raise _bad(f"must be {_range(lo, hi, above)}, got {value}")
        return value

    return parse


def _range(lo, hi, above: bool = False) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if above else '['}{lo}, {hi}]"
    if lo is not None:
        return f"{'>' if above else '>='} {lo}"
    return f"<= {hi}"


def int_list(lo: int | None = None, hi: int | None = None):
    """Comma-separated ints in ``[lo, hi]``; repeats dropped (order kept)."""
    one = integer(lo, hi)

    def parse(text: str) -> list[int]:
        values = [one(v.strip()) for v in text.split(",") if v.strip()]
        if not values:
            raise _bad(f"expected comma-separated integers, got {text!r}")
        return list(dict.fromkeys(values))

    return parse


def float_list(lo: float | None = None, hi: float | None = None):
    """Comma-separated finite floats in ``[lo, hi]``; repeats dropped (order kept)."""
    one = number(lo, hi)

    def parse(text: str) -> list[float]:
        values = [one(v.strip()) for v in text.split(",") if v.strip()]
        if not values:
            raise _bad(f"expected comma-separated numbers, got {text!r}")
        return list(dict.fromkeys(values))

    return parse


def choice_list(choices):
    """Comma-separated names from ``choices``; repeats dropped (order kept)."""

    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in choices]
        if bad or not values:
            raise _bad(f"expected a comma-separated list from {', '.join(choices)}, got {text!r}")
        return list(dict.fromkeys(values))

    return parse


def text(value: str) -> str:
    """Non-empty text (a prompt)."""
    if not value.strip():
        raise _bad(f"must be non-empty text, got {value!r}")
    return value


def out_folder(text: str) -> str:
    """An output folder: new, or an existing folder (never an existing file)."""
    if not text:
        raise _bad("must be a folder path, got ''")
    if os.path.exists(text) and not os.path.isdir(text):
        raise _bad(f"{text} is a file, not a folder; pass a folder (it is created if missing)")
    return text


def out_file(text: str) -> str:
    """An output file whose folder exists (it is written atomically)."""
    if not text:
        raise _bad("must be a file path, got ''")
    if os.path.isdir(text):
        raise _bad(f"{text} is a folder; pass a file path")
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise _bad(f"folder {folder} does not exist")
    return text


def in_file(text: str) -> str:
    """An existing file."""
    if not os.path.isfile(text):
        raise _bad(f"{text} is not an existing file")
    return text


def model_path(text: str) -> str:
    """A local model folder or .gguf file (nothing is downloaded)."""
    if not os.path.exists(text):
        raise _bad(f"{text} does not exist; pass a local model folder or .gguf file (nothing is downloaded)")
    return text


def in_folder_with(name: str):
    """An existing folder holding ``name``."""

    def parse(text: str) -> str:
        if not os.path.isfile(os.path.join(text, name)):
            raise _bad(f"{text} is not a folder holding {name}")
        return text

    return parse


threads = integer(1, 4096)
seed = integer(0, 2**63 - 1)


# The model dtypes the commands take (``--dtype``). ``auto`` is resolved in one place,
# gape.hf.models.auto_dtype: bfloat16 where the hardware multiplies bfloat16 matrices
# natively (AVX512-BF16 / AMX on the CPU, a CUDA device that supports it), else float32,
# since where bfloat16 is emulated the embedded model runs 2-3x slower in it than in
# float32 (docs/benchmarks.md).
# The inference commands default to auto: bfloat16 gave the float32 answers on the
# embedded model (benchmarks/bench_dtype.py). Training (gape calibrate) stays float32
# by default: bfloat16 autocast of the gate training was not compared.
DTYPES = ("float32", "bfloat16", "float16")
DTYPE_CHOICES = ("auto", *DTYPES)
DEFAULT_DTYPE = "auto"  # of the inference commands: gape niah, inspect, eval


def add_dtype(parser, what: str = "model parameters and activations", default: str = DEFAULT_DTYPE) -> None:
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=default,
                        help=f"dtype of the {what}; auto: bfloat16 where the CPU has AVX512-BF16 or AMX "
                             f"(or the CUDA device supports it), else float32 (default {default}; without "
                             "AVX512-BF16/AMX bfloat16 is emulated and 2-3x slower than float32)")


def torch_dtype(name: str):
    """The torch dtype of a concrete name (``auto`` is resolved by gape.hf.models.resolve_dtype)."""
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {name!r}")
    return getattr(torch, name)
