"""Result files of a benchmark run: ``results.jsonl`` (one row per sample, appended and
fsynced as produced, so an interrupted run loses nothing), ``summary.csv`` and the printed
table (both rewritten atomically from all rows)."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterable

from gape._io import read_jsonl_rows, write_csv_atomic

RESULTS = "results.jsonl"
SUMMARY = "summary.csv"
# a finished sample is identified by these fields
KEY_FIELDS = ("method", "task", "haystack", "length", "depth", "sample", "seed")


def row_key(row: dict) -> tuple:
    return tuple(round(row[k], 6) if k == "depth" else row[k] for k in KEY_FIELDS)


# the type each field of a row must have for the row to count
_ROW_TYPES = {"method": str, "task": str, "haystack": str, "length": int, "depth": (int, float), "sample": int,
              "seed": int, "score": (int, float), "correct": (bool, int), "seconds": (int, float)}


def _valid_row(row) -> bool:
    return isinstance(row, dict) and all(
        k in row and isinstance(row[k], t) and not (t is int and isinstance(row[k], bool)) for k, t in _ROW_TYPES.items()
    )


def rank_results(rank: int, world_size: int) -> str:
    """The file a rank appends to: ``results.jsonl`` alone, ``results.rank<r>.jsonl`` under torchrun
    (one writer per file; :func:`read_rows` reads them all)."""
    return RESULTS if world_size == 1 else f"results.rank{rank}.jsonl"


def result_files(out_dir: str) -> list[str]:
    """``results.jsonl`` first, then every rank's file in rank order."""
    names = [RESULTS] if os.path.exists(os.path.join(out_dir, RESULTS)) else []
    ranked = []
    if os.path.isdir(out_dir):
        for name in os.listdir(out_dir):
            mid = name[len("results.rank") : -len(".jsonl")]
            if name.startswith("results.rank") and name.endswith(".jsonl") and mid.isdigit():
                ranked.append((int(mid), name))
    return [os.path.join(out_dir, n) for n in names + [n for _, n in sorted(ranked)]]


def read_rows(out_dir: str, warn=None) -> list[dict]:
    """The valid rows of ``results.jsonl`` and of the per-rank files, each (method, task,
    haystack, length, depth, sample, seed) once.

    A line that is not JSON (a half-written last line after a kill, a corrupted
    file) or lacks a field is skipped; ``warn`` (a callable, e.g. ``print``) gets
    one message per file counting them, and their samples are simply redone. Within
    a file the last row of a key wins; a sample found in two files (a rerun with
    another world size) counts once."""
    rows: dict[tuple, dict] = {}
    for path in result_files(out_dir):
        for row in read_rows_file(path, warn):
            rows.setdefault(row_key(row), row)
    return list(rows.values())


def read_rows_file(path: str, warn=None) -> list[dict]:
    """The valid rows of one JSONL file (see :func:`read_rows`)."""
    rows, bad, duplicates = read_jsonl_rows(path, _valid_row, row_key)
    if warn is not None and (bad or duplicates):
        parts = [f"skipped {bad} corrupted or incomplete row(s)"] if bad else []
        parts += [f"counted {duplicates} duplicated row(s) once"] if duplicates else []
        warn(f"warning: {path}: " + " and ".join(parts) + (" (their samples are redone)" if bad else ""))
    return rows


def append_row(out_dir: str, row: dict, filename: str = RESULTS) -> None:
    path = os.path.join(out_dir, filename)
    # a previous run killed mid-line leaves no newline; start on a fresh line
    needs_newline = False
    if os.path.exists(path) and os.path.getsize(path):
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            needs_newline = f.read(1) != b"\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(("\n" if needs_newline else "") + json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def summarize(rows: Iterable[dict]) -> list[dict]:
    """One line per (method, task, haystack, length, depth): samples, accuracy (mean RULER
    string_match_all score), fully correct fraction, mean seconds per sample."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    rows = {row_key(r): r for r in rows}.values()  # each sample once, whatever the input
    for r in rows:
        groups[(r["method"], r["task"], r["haystack"], r["length"], round(r["depth"], 6))].append(r)
    out = []
    for (method, task, haystack, length, depth), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0], kv[0][3], kv[0][4])):
        out.append(
            {
                "method": method,
                "task": task,
                "haystack": haystack,
                "length": length,
                "depth": depth,
                "samples": len(rs),
                "accuracy": sum(r["score"] for r in rs) / len(rs),
                "correct": sum(bool(r["correct"]) for r in rs) / len(rs),
                "seconds": sum(r["seconds"] for r in rs) / len(rs),
            }
        )
    return out


def write_summary(out_dir: str, summary: list[dict]) -> str:
    path = os.path.join(out_dir, SUMMARY)
    fields = ["method", "task", "haystack", "length", "depth", "samples", "accuracy", "correct", "seconds"]
    rows = [{k: (f"{v:.4f}" if isinstance(v, float) and k != "depth" else v) for k, v in line.items()} for line in summary]
    write_csv_atomic(path, fields, rows, lineterminator="\n")
    return path


def by_length(summary: list[dict]) -> dict[tuple[str, str], dict[str, dict[int, tuple[float, int]]]]:
    """{(task, haystack): {method: {length: (accuracy over depths and samples, samples)}}}."""
    acc: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(lambda: [0.0, 0])))
    for s in summary:
        cell = acc[(s["task"], s["haystack"])][s["method"]][s["length"]]
        cell[0] += s["accuracy"] * s["samples"]
        cell[1] += s["samples"]
    return {
        group: {m: {length: (c[0] / c[1], c[1]) for length, c in sorted(per.items())} for m, per in methods.items()}
        for group, methods in acc.items()
    }


def format_table(summary: list[dict], methods_order: list[str] | None = None) -> str:
    """Accuracy per method (rows) and length (columns), averaged over depths and samples."""
    lines = []
    for (task, haystack), methods in sorted(by_length(summary).items()):
        lengths = sorted({length for per in methods.values() for length in per})
        order = [m for m in (methods_order or []) if m in methods] + sorted(m for m in methods if m not in (methods_order or []))
        width = max(10, *(len(m) + 2 for m in order))
        lines.append(f"task={task} haystack={haystack}  (accuracy, RULER string_match_all; mean over depths and samples)")
        lines.append("method".ljust(width) + "".join(f"{length:>9}" for length in lengths) + "      all")
        for m in order:
            per = methods[m]
            cells = "".join(f"{per[length][0]:>9.2f}" if length in per else f"{'-':>9}" for length in lengths)
            total = sum(a * n for a, n in per.values()) / max(1, sum(n for _, n in per.values()))
            lines.append(m.ljust(width) + cells + f"{total:>9.2f}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
