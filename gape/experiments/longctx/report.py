"""Summary tables and plots of a ``gape longctx`` folder, from ``results.jsonl`` alone (rewritten
after every run and by ``gape longctx --report``): retrieval accuracy with a Wilson 95%
interval per arm and length, lm-eval's score per arm, held-out perplexity per arm, length and position bucket, and
the training loss."""

from __future__ import annotations

import math
import os
from collections import defaultdict

from ..._io import save_figure_atomic, write_atomic, write_csv_atomic
from .study import ARMS, read_rows

Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of ``k`` successes in ``n`` trials (``(0, 1)`` when ``n == 0``)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, mid - half), min(1.0, mid + half)


def _arm_order(arms) -> list[str]:
    return [a for a in ARMS if a in arms] + sorted(a for a in arms if a not in ARMS)


def niah_table(rows: list[dict]) -> list[dict]:
    cells: dict = defaultdict(list)
    for r in rows:
        if r["kind"] == "niah":
            cells[(r["arm"], r["length"])].append(bool(r["correct"]))
    out = []
    for (arm, length) in sorted(cells, key=lambda c: (_arm_order({a for a, _ in cells}).index(c[0]), c[1])):
        hits = cells[(arm, length)]
        lo, hi = wilson(sum(hits), len(hits))
        out.append({"arm": arm, "length": length, "samples": len(hits), "correct": sum(hits),
                    "accuracy": sum(hits) / len(hits), "ci_low": lo, "ci_high": hi})
    return out


def ppl_table(rows: list[dict]) -> list[dict]:
    """Perplexity per (arm, length, bucket), pooled over the held-out windows."""
    cells: dict = defaultdict(lambda: [0.0, 0, 0])
    for r in rows:
        if r["kind"] != "ppl":
            continue
        for lo, hi, nll, count in r["buckets"]:
            c = cells[(r["arm"], r["length"], lo, hi)]
            c[0] += nll
            c[1] += count
            c[2] += 1
    order = _arm_order({k[0] for k in cells})
    return [{"arm": a, "length": n, "lo": lo, "hi": hi, "windows": w, "tokens": t, "ppl": math.exp(s / t)}
            for (a, n, lo, hi), (s, t, w) in sorted(cells.items(), key=lambda kv: (order.index(kv[0][0]), *kv[0][1:]))]


def train_table(rows: list[dict]) -> list[dict]:
    per: dict = defaultdict(list)
    for r in rows:
        if r["kind"] == "train":
            per[r["arm"]].append((r["step"], r["loss"]))
    out = []
    for arm in _arm_order(per):
        steps = sorted(per[arm])
        last = [v for _, v in steps[-10:]]
        out.append({"arm": arm, "steps": len(steps), "first_loss": steps[0][1], "last10_loss": sum(last) / len(last)})
    return out


def lmeval_table(rows: list[dict]) -> list[dict]:
    keys = ("arm", "task", "length", "samples", "score", "stderr", "lm_eval")
    cells = [{k: r.get(k) for k in keys} for r in rows if r["kind"] == "lmeval"]
    order = _arm_order({c["arm"] for c in cells})
    return sorted(cells, key=lambda c: (order.index(c["arm"]), c["task"], c["length"]))


def format_tables(rows: list[dict]) -> str:
    lines = []
    niah = niah_table(rows)
    if niah:
        lines.append("retrieval (single needle): correct / samples, accuracy [Wilson 95%]")
        for c in niah:
            lines.append(f"  {c['arm']:<14} {c['length']:>6}: {c['correct']:>2}/{c['samples']:<2} "
                         f"{c['accuracy']:.2f} [{c['ci_low']:.2f}, {c['ci_high']:.2f}]")
    ppl = ppl_table(rows)
    if ppl:
        lines.append("held-out perplexity per position bucket (tokens lo-hi): arm length: ppl per bucket")
        groups: dict = defaultdict(list)
        for c in ppl:
            groups[(c["arm"], c["length"])].append(c)
        for (arm, n), cs in groups.items():
            lines.append(f"  {arm:<14} {n:>6}: " + "  ".join(f"{c['lo']}-{c['hi']}:{c['ppl']:.2f}" for c in cs)
                         + f"  (windows {cs[0]['windows']})")
    lmeval = lmeval_table(rows)
    if lmeval:
        lines.append("lm-eval (its own prompt, generation and scoring) inside the window: arm task length: score +- stderr (samples)")
        for c in lmeval:
            err = "n/a" if c["stderr"] is None else f"{c['stderr']:.2f}"
            lines.append(f"  {c['arm']:<14} {c['task']} {c['length']:>6}: {c['score']:.2f} +- {err} ({c['samples']} samples)")
    for t in train_table(rows):
        lines.append(f"training {t['arm']}: {t['steps']} steps, loss {t['first_loss']:.3f} -> {t['last10_loss']:.3f} (mean of last 10)")
    return "\n".join(lines) + "\n" if lines else "no results yet\n"


def write(out: str, echo=print) -> None:
    """``summary_niah.csv``, ``summary_ppl.csv``, ``summary_lmeval.csv``, ``summary.txt`` and the
    plots, from the rows."""
    rows = read_rows(out)
    niah, ppl = niah_table(rows), ppl_table(rows)
    write_csv_atomic(os.path.join(out, "summary_niah.csv"), ["arm", "length", "samples", "correct", "accuracy", "ci_low", "ci_high"],
                     [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in c.items()} for c in niah], lineterminator="\n")
    write_csv_atomic(os.path.join(out, "summary_ppl.csv"), ["arm", "length", "lo", "hi", "windows", "tokens", "ppl"],
                     [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in c.items()} for c in ppl], lineterminator="\n")
    write_csv_atomic(os.path.join(out, "summary_lmeval.csv"), ["arm", "task", "length", "samples", "score", "stderr", "lm_eval"],
                     [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in c.items()} for c in lmeval_table(rows)],
                     lineterminator="\n")
    text = format_tables(rows)
    write_atomic(os.path.join(out, "summary.txt"), text)
    if niah or ppl:
        plot(out, niah, ppl)
    echo(text.rstrip())


def plot(out: str, niah: list[dict], ppl: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if niah:
        fig, ax = plt.subplots(figsize=(6, 4))
        for arm in _arm_order({c["arm"] for c in niah}):
            cs = [c for c in niah if c["arm"] == arm]
            x = [c["length"] for c in cs]
            y = [c["accuracy"] for c in cs]
            err = [[c["accuracy"] - c["ci_low"] for c in cs], [c["ci_high"] - c["accuracy"] for c in cs]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=arm)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("single-needle accuracy (Wilson 95%)")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=8)
        ax.set_title("retrieval vs length per arm")
        fig.tight_layout()
        save_figure_atomic(fig, os.path.join(out, "accuracy_vs_length.png"), dpi=100)
        plt.close(fig)
    if ppl:
        lengths = sorted({c["length"] for c in ppl})
        fig, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 3.8), squeeze=False)
        for ax, n in zip(axes[0], lengths):
            for arm in _arm_order({c["arm"] for c in ppl}):
                cs = [c for c in ppl if c["arm"] == arm and c["length"] == n]
                if cs:
                    ax.plot([(c["lo"] + c["hi"]) / 2 for c in cs], [math.log(c["ppl"]) for c in cs], marker="o", label=arm)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("position (bucket middle, tokens)")
            ax.set_ylabel("held-out loss (nats/token)")
            ax.set_title(f"windows of {n} tokens")
            ax.legend(fontsize=7)
        fig.tight_layout()
        save_figure_atomic(fig, os.path.join(out, "loss_vs_position.png"), dpi=100)
        plt.close(fig)
