"""Summary tables and plots of a ``gape longctx`` folder, from ``results.jsonl`` alone (rewritten
after every run and by ``gape longctx --report``): retrieval accuracy with a Wilson 95%
interval per arm and length, lm-eval's score per arm, held-out perplexity per arm, length and position bucket, the
training loss, and every arm against the fine-tuned YaRN baseline on the same samples and plays (paired)."""

from __future__ import annotations

import math
import os
from collections import defaultdict

from ..._io import save_figure_atomic, write_atomic, write_csv_atomic
from .study import ARMS, read_rows

Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of ``k`` successes in ``n`` trials (``(0, 1)`` when ``n == 0``).

    The interval always holds ``k / n`` and ends exactly at 1 when ``k == n`` (at 0 when
    ``k == 0``); ``mid +- half`` alone misses both by an ulp for some ``n`` (10 of 10 gives
    0.9999999999999999), which would make the error bars' lengths negative."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else min(p, max(0.0, mid - half))
    hi = 1.0 if k == n else max(p, min(1.0, mid + half))
    return lo, hi


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


# The comparison that answers the study's question: each arm against the fine-tuned YaRN baseline,
# on the samples and plays both have, so a run cut short (or an arm behind the others) is still
# compared like for like.
BASE_ARM = "yarn-ft"


def newcombe_paired(both: int, first_only: int, second_only: int, neither: int, z: float = Z95) -> tuple[float, float]:
    """95% interval of ``p1 - p2`` for paired binary outcomes (Newcombe 1998, paired data, method
    10): the Wilson intervals of the two marginal proportions, combined with the correlation of
    the pairs (``phi``, continuity-corrected toward 0). ``(-1, 1)`` when there are no pairs."""
    n = both + first_only + second_only + neither
    if n == 0:
        return -1.0, 1.0
    p1, p2 = (both + first_only) / n, (both + second_only) / n
    l1, u1 = wilson(both + first_only, n, z)
    l2, u2 = wilson(both + second_only, n, z)
    margins = (both + first_only) * (second_only + neither) * (both + second_only) * (first_only + neither)
    phi = 0.0
    if margins > 0:
        cross = both * neither - first_only * second_only
        corrected = cross - n / 2 if cross > n / 2 else (cross if cross < 0 else 0.0)
        phi = corrected / math.sqrt(margins)
    d = p1 - p2
    down = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    up = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return max(-1.0, d - down), min(1.0, d + up)


def mcnemar_exact(first_only: int, second_only: int) -> float:
    """Two-sided exact McNemar p-value: the binomial test of the discordant pairs at 1/2."""
    m = first_only + second_only
    if m == 0:
        return 1.0
    k = min(first_only, second_only)
    tail = sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m
    return min(1.0, 2 * tail)


def niah_comparison(rows: list[dict], base: str = BASE_ARM) -> list[dict]:
    """Each arm against ``base`` per length, on the retrieval samples both have: the difference in
    accuracy with Newcombe's paired 95% interval and the exact McNemar p-value."""
    hits: dict = defaultdict(dict)
    for r in rows:
        if r["kind"] == "niah":
            hits[(r["arm"], r["length"])][r["sample"]] = bool(r["correct"])
    out = []
    for arm in _arm_order({a for a, _ in hits}):
        if arm == base:
            continue
        for length in sorted(n for a, n in hits if a == arm and (base, n) in hits):
            mine, theirs = hits[(arm, length)], hits[(base, length)]
            pairs = [(mine[s], theirs[s]) for s in sorted(set(mine) & set(theirs))]
            if not pairs:
                continue
            cells = {key: sum(p == key for p in pairs) for key in ((True, True), (True, False), (False, True), (False, False))}
            lo, hi = newcombe_paired(cells[(True, True)], cells[(True, False)], cells[(False, True)], cells[(False, False)])
            n = len(pairs)
            out.append({"arm": arm, "base": base, "length": length, "pairs": n,
                        "correct": sum(a for a, _ in pairs), "base_correct": sum(b for _, b in pairs),
                        "only_arm": cells[(True, False)], "only_base": cells[(False, True)],
                        "difference": (cells[(True, False)] - cells[(False, True)]) / n, "ci_low": lo, "ci_high": hi,
                        "mcnemar_p": mcnemar_exact(cells[(True, False)], cells[(False, True)])})
    return out


def _mean_nll(buckets) -> float:
    """Nats per token over ``[lo, hi, summed NLL, tokens]`` buckets."""
    return sum(b[2] for b in buckets) / sum(b[3] for b in buckets)


def _ppl_pairs(rows: list[dict], base: str):
    """``(per, [(arm, length, plays)])``: the held-out buckets per (arm, length, play), and for each
    arm other than ``base`` and each of its lengths the plays both it and ``base`` have."""
    per: dict = {}
    for r in rows:
        if r["kind"] == "ppl":
            per[(r["arm"], r["length"], r["play"])] = r["buckets"]
    pairs = []
    for arm in _arm_order({a for a, _, _ in per}):
        if arm == base:
            continue
        for length in sorted({n for a, n, _ in per if a == arm}):
            plays = sorted(p for a, n, p in per if a == arm and n == length and (base, length, p) in per)
            if plays:
                pairs.append((arm, length, plays))
    return per, pairs


def ppl_bucket_comparison(rows: list[dict], base: str = BASE_ARM) -> list[dict]:
    """Each arm against ``base`` per length and position bucket, on the plays both have: nats per
    token pooled over those plays, and the relative difference in percent."""
    per, pairs = _ppl_pairs(rows, base)
    out = []
    for arm, length, plays in pairs:
        def pooled(who, lo):
            return _mean_nll([b for p in plays for b in per[(who, length, p)] if b[0] == lo])

        for lo, hi, *_ in per[(base, length, plays[0])]:
            loss, base_loss = pooled(arm, lo), pooled(base, lo)
            out.append({"arm": arm, "base": base, "length": length, "lo": lo, "hi": hi, "plays": len(plays),
                        "loss": loss, "base_loss": base_loss, "relative_pct": 100 * (loss / base_loss - 1)})
    return out


def ppl_comparison(rows: list[dict], base: str = BASE_ARM) -> list[dict]:
    """Each arm against ``base`` per length, on the held-out plays both have: the loss (nats per
    token) over all positions ``[0, L)`` and over the last position bucket (``[L/2, L)`` for a
    power of two: the positions new at this length), the relative difference in percent, and on
    how many plays the arm's loss over ``[0, L)`` is the lower."""
    per, pairs = _ppl_pairs(rows, base)
    out = []
    for arm, length, plays in pairs:
        tail_lo = max(b[0] for b in per[(base, length, plays[0])])

        def pooled(who, last_only):
            return _mean_nll([b for p in plays for b in per[(who, length, p)] if not last_only or b[0] >= tail_lo])

        def play_loss(who, p):
            return _mean_nll(per[(who, length, p)])

        loss, base_loss = pooled(arm, False), pooled(base, False)
        tail, base_tail = pooled(arm, True), pooled(base, True)
        out.append({"arm": arm, "base": base, "length": length, "plays": len(plays), "loss": loss, "base_loss": base_loss,
                    "relative_pct": 100 * (loss / base_loss - 1), "tail_lo": tail_lo, "tail_loss": tail,
                    "base_tail_loss": base_tail, "tail_relative_pct": 100 * (tail / base_tail - 1),
                    "plays_lower": sum(play_loss(arm, p) < play_loss(base, p) for p in plays)})
    return out


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
    cmp_niah = niah_comparison(rows)
    if cmp_niah:
        lines.append(f"retrieval against {BASE_ARM}, same samples: arm length: correct vs {BASE_ARM}'s, difference in points "
                     "[Newcombe paired 95%], exact McNemar p")
        for c in cmp_niah:
            lines.append(f"  {c['arm']:<14} {c['length']:>6}: {c['correct']:>2} vs {c['base_correct']:>2} of {c['pairs']:<2} "
                         f"{100 * c['difference']:+6.1f} [{100 * c['ci_low']:+6.1f}, {100 * c['ci_high']:+6.1f}]  p={c['mcnemar_p']:.3f}")
    cmp_ppl = ppl_comparison(rows)
    if cmp_ppl:
        lines.append(f"held-out loss against {BASE_ARM}, same plays: arm length: nats/token over [0, L) vs {BASE_ARM}'s "
                     "(relative), over the last bucket (relative), plays where the arm is lower")
        for c in cmp_ppl:
            lines.append(f"  {c['arm']:<14} {c['length']:>6}: {c['loss']:.4f} vs {c['base_loss']:.4f} ({c['relative_pct']:+.2f}%)  "
                         f"[{c['tail_lo']}, {c['length']}): {c['tail_loss']:.4f} vs {c['base_tail_loss']:.4f} "
                         f"({c['tail_relative_pct']:+.2f}%)  lower on {c['plays_lower']}/{c['plays']}")
    return "\n".join(lines) + "\n" if lines else "no results yet\n"


def write(out: str, echo=print) -> None:
    """``summary_niah.csv``, ``summary_ppl.csv``, ``summary_lmeval.csv``, the comparisons against
    the baseline arm (``summary_compare_niah.csv``, ``summary_compare_ppl.csv``,
    ``summary_compare_ppl_buckets.csv``), ``summary.txt`` and the plots, from the rows."""
    rows = read_rows(out)
    niah, ppl, buckets = niah_table(rows), ppl_table(rows), ppl_bucket_comparison(rows)
    tables = {
        "summary_niah.csv": (["arm", "length", "samples", "correct", "accuracy", "ci_low", "ci_high"], niah),
        "summary_ppl.csv": (["arm", "length", "lo", "hi", "windows", "tokens", "ppl"], ppl),
        "summary_lmeval.csv": (["arm", "task", "length", "samples", "score", "stderr", "lm_eval"], lmeval_table(rows)),
        "summary_compare_niah.csv": (["arm", "base", "length", "pairs", "correct", "base_correct", "only_arm", "only_base",
                                      "difference", "ci_low", "ci_high", "mcnemar_p"], niah_comparison(rows)),
        "summary_compare_ppl.csv": (["arm", "base", "length", "plays", "loss", "base_loss", "relative_pct", "tail_lo",
                                     "tail_loss", "base_tail_loss", "tail_relative_pct", "plays_lower"], ppl_comparison(rows)),
        "summary_compare_ppl_buckets.csv": (["arm", "base", "length", "lo", "hi", "plays", "loss", "base_loss", "relative_pct"],
                                            buckets),
    }
    for name, (fields, table) in tables.items():
        write_csv_atomic(os.path.join(out, name), fields,
                         [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in c.items()} for c in table], lineterminator="\n")
    text = format_tables(rows)
    write_atomic(os.path.join(out, "summary.txt"), text)
    if niah or ppl:
        plot(out, niah, ppl, buckets)
    echo(text.rstrip())


def plot(out: str, niah: list[dict], ppl: list[dict], ppl_buckets: list[dict] = ()) -> None:
    """``accuracy_vs_length.png``; ``loss_vs_position.png``, with a second row of the fine-tuned
    arms' loss relative to the baseline arm's per bucket (``ppl_bucket_comparison``) when there is
    one: they differ by fractions of a percent and lie on each other in the first row, while the
    untrained arm's gap (several percent) shows there. One colour per arm in every plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colour = {arm: f"C{i}" for i, arm in enumerate(_arm_order({c["arm"] for c in [*niah, *ppl, *ppl_buckets]}))}
    if niah:
        fig, ax = plt.subplots(figsize=(6, 4))
        arms = _arm_order({c["arm"] for c in niah})
        for i, arm in enumerate(arms):
            cs = [c for c in niah if c["arm"] == arm]
            # Arms often score alike (20/20 each): a small offset per arm along the log2 axis
            # keeps every arm's point and interval visible instead of drawn over each other.
            dodge = 2.0 ** (0.06 * (i - (len(arms) - 1) / 2))
            x = [c["length"] * dodge for c in cs]
            y = [c["accuracy"] for c in cs]
            err = [[c["accuracy"] - c["ci_low"] for c in cs], [c["ci_high"] - c["accuracy"] for c in cs]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=arm, color=colour[arm])
        ax.set_xscale("log", base=2)
        lengths = sorted({c["length"] for c in niah})
        ax.set_xticks(lengths, [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths])
        ax.minorticks_off()
        ax.set_xlabel("context length (tokens; arms offset slightly to stay visible)")
        ax.set_ylabel("single-needle accuracy (Wilson 95%)")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=8)
        ax.set_title("retrieval vs length per arm")
        fig.tight_layout()
        save_figure_atomic(fig, os.path.join(out, "accuracy_vs_length.png"), dpi=100)
        plt.close(fig)
    if ppl:
        lengths = sorted({c["length"] for c in ppl})
        finetuned = [c for c in ppl_buckets if c["arm"] not in ARMS or ARMS[c["arm"]].finetune]
        nrows = 2 if finetuned else 1
        fig, axes = plt.subplots(nrows, len(lengths), figsize=(4.2 * len(lengths), 3.8 * nrows), squeeze=False)
        for ax, n in zip(axes[0], lengths):
            for arm in _arm_order({c["arm"] for c in ppl}):
                cs = [c for c in ppl if c["arm"] == arm and c["length"] == n]
                if cs:
                    ax.plot([(c["lo"] + c["hi"]) / 2 for c in cs], [math.log(c["ppl"]) for c in cs], marker="o", label=arm,
                            color=colour[arm])
            ax.set_xscale("log", base=2)
            ax.set_xlabel("position (bucket middle, tokens)")
            ax.set_ylabel("held-out loss (nats/token)")
            ax.set_title(f"windows of {n} tokens")
            ax.legend(fontsize=7)
        if finetuned:
            base = finetuned[0]["base"]
            for ax, n in zip(axes[1], lengths):
                for arm in _arm_order({c["arm"] for c in finetuned}):
                    cs = [c for c in finetuned if c["arm"] == arm and c["length"] == n]
                    if cs:
                        ax.plot([(c["lo"] + c["hi"]) / 2 for c in cs], [c["relative_pct"] for c in cs], marker="o", label=arm,
                                color=colour[arm])
                ax.axhline(0.0, color="grey", linewidth=0.8)
                ax.set_xscale("log", base=2)
                ax.set_xlabel("position (bucket middle, tokens)")
                ax.set_ylabel(f"loss relative to {base} (%)")
                ax.set_title(f"fine-tuned arms against {base}, {n} tokens", fontsize=10)
                ax.legend(fontsize=7)
        fig.tight_layout()
        save_figure_atomic(fig, os.path.join(out, "loss_vs_position.png"), dpi=100)
        plt.close(fig)
