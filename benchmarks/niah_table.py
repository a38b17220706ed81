"""The long-context comparison in one table: every ``gape niah`` folder and
every ``gape eval`` RULER run under ``benchmarks/results``, method x length.

A ``gape niah`` folder (``summary.csv`` + ``run.json``) contributes correct /
samples per (method, task, length); gape methods run with ``--gates`` are
labelled "calibrated"; a RoPE-scaling cell run with a factor other than 2 is
marked with it ("3/3 (x3)"). An lm-eval
output folder ``lmeval_ruler/<method>-<length>/`` contributes lm-eval's score
for ``niah_single_1`` at that length. Writes ``niah_comparison.csv`` and
``niah_comparison.png`` in ``niah/`` and prints a markdown table.

Example:
    python benchmarks/niah_table.py             # benchmarks/results
    python benchmarks/niah_table.py --results DIR
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

from gape._io import save_figure_atomic, write_csv_atomic

RESULTS = Path(__file__).resolve().parent / "results"
SCALED = ("linear", "dynamic", "yarn", "gape+yarn")
ORDER = ["rope", "linear", "dynamic", "yarn", "gape", "gape+yarn"]


def _label(method: str, run: dict) -> str:
    label = method
    if method.startswith("gape"):
        if run.get("gates"):
            label += " (calibrated)"
        else:
            linear = ", linear distance" if run.get("distance") == "linear" else ""
            label += f" (constant rate, lambda {run.get('gape_lambda')}{linear})"
    return label


def _factor(method: str, run: dict) -> float | None:
    return float(run.get("rope_factor", 2)) if method in SCALED else None


def _new_cells() -> dict:
    """(source, task, label) -> {length: [correct, samples, {rope factors}]}."""
    return defaultdict(lambda: defaultdict(lambda: [0.0, 0, set()]))


def _tally(cells: dict, key: tuple, length: int, correct: float, samples: int, factor: float | None) -> None:
    cell = cells[key][length]
    cell[0] += correct
    cell[1] += samples
    cell[2].add(factor)


def niah_cells(results: Path) -> dict:
    """Every gape niah folder's summary.csv, tallied (see :func:`_new_cells`)."""
    cells = _new_cells()
    for summary in sorted(results.glob("niah/*/summary.csv")):
        run_file = summary.parent / "run.json"
        run = json.loads(run_file.read_text()) if run_file.exists() else {}
        with summary.open(newline="") as f:
            for row in csv.DictReader(f):
                n = int(row["samples"])
                key = ("gape niah", row["task"], _label(row["method"], run))
                _tally(cells, key, int(row["length"]), float(row["correct"]) * n, n, _factor(row["method"], run))
    return cells


def lmeval_cells(results: Path) -> dict:
    """Every lm-eval RULER niah_single_1 run, tallied (score x samples correct)."""
    cells = _new_cells()
    for path in sorted(results.glob("lmeval_ruler/*/*/results_*.json")):
        data = json.loads(path.read_text())
        args = data.get("config", {}).get("model_args", "")
        args = dict(kv.split("=", 1) for kv in args.split(",") if "=" in kv) if isinstance(args, str) else args
        method = args.get("method", "rope")
        run = {"gates": args.get("gates"), "gape_lambda": args.get("gape_lambda", 0.05),
               "rope_factor": float(args.get("rope_factor", 2))}
        n = int(data.get("n-samples", {}).get("niah_single_1", {}).get("effective", 0))
        for key, value in data["results"].get("niah_single_1", {}).items():
            length = key.split(",")[0]
            # RULER's string_match_all is a fraction in [0, 1]; lengths not run read -1.
            if length.isdigit() and isinstance(value, (int, float)) and value >= 0:
                key = ("lm-eval", "niah_single_1", _label(method, run))
                _tally(cells, key, int(length), value * n, n, _factor(method, run))
    return cells


def _sort_key(key):
    source, task, label = key
    base = label.split(" ")[0]
    return source, task, ORDER.index(base) if base in ORDER else len(ORDER), label


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    cells = {**niah_cells(args.results), **lmeval_cells(args.results)}
    if not cells:
        print(f"no gape niah or lm-eval results under {args.results}", file=sys.stderr)
        return 1
    lengths = sorted({n for by_len in cells.values() for n in by_len})
    rows = []
    print("| source | task | method | " + " | ".join(f"{n // 1024}k" for n in lengths) + " |")
    print("|---|---|---|" + "---|" * len(lengths))
    for key in sorted(cells, key=_sort_key):
        by_len = cells[key]
        shown = []
        for n in lengths:
            if n in by_len:
                c, s, factors = by_len[n]
                odd = sorted(f for f in factors if f not in (None, 2.0))
                shown.append(f"{c:g}/{s}" + "".join(f" (x{f:g})" for f in odd))
                factor = "/".join(f"{f:g}" for f in sorted(f for f in factors if f is not None))
                rows.append({"source": key[0], "task": key[1], "method": key[2], "length": n, "rope_factor": factor,
                             "correct": c, "samples": s, "accuracy": round(c / s, 4) if s else ""})
            else:
                shown.append("")
        print(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(shown) + " |")
    out_csv = args.results / "niah" / "niah_comparison.csv"
    write_csv_atomic(out_csv, list(rows[0]), rows)
    _plot(cells, args.results / "niah" / "niah_comparison.png")
    print(f"wrote {out_csv} and niah_comparison.png")
    return 0


def _plot(cells: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    panels = sorted({(s, t) for s, t, _ in cells})
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    styles = ["-", "--", "-.", ":"]
    # One colour per method across panels.
    palette = plt.get_cmap("tab20").colors
    colour = {}
    for key in sorted(cells, key=_sort_key):
        colour.setdefault(key[2], palette[len(colour) % len(palette)])
    for ax, (source, task) in zip(axes[0], panels):
        keys = sorted((k for k in cells if k[:2] == (source, task)), key=_sort_key)
        lengths = sorted({n for k in keys for n in cells[k]})
        for i, key in enumerate(keys):
            # Methods often tie at 0 or 1: offset each line a little so none hides another.
            shift = (i - (len(keys) - 1) / 2) * 0.012
            pts = sorted((n, c / s) for n, (c, s, _) in cells[key].items() if s)
            ax.plot([n / 1024 for n, _ in pts], [a + shift for _, a in pts], marker="o", markersize=4,
                    linestyle=styles[i % len(styles)], color=colour[key[2]], label=key[2])
        ax.axvline(8, color="grey", linestyle=":", linewidth=1)  # SmolLM2's training length
        ax.set_xscale("log", base=2)
        ax.set_xticks([n / 1024 for n in lengths], [f"{n // 1024}k" for n in lengths])
        ax.set(title=f"{source}: {task} (lines offset by <= 0.05 to stay visible)", xlabel="context (tokens)",
               ylabel="accuracy", ylim=(-0.08, 1.08))
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure_atomic(fig, str(path), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
