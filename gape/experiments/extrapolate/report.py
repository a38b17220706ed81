"""Summary table and plots of a ``gape extrapolate`` folder, from ``rows.jsonl`` and ``runs/``
alone, so they can be regenerated at any time (``gape extrapolate --report --out DIR``)."""

from __future__ import annotations

import math
import os
from collections import defaultdict

from gape._io import relative_path, save_figure_atomic, write_atomic
from .models import GAPE_FORMS, SCHEMES
from .rows import read_config, read_record, read_rows

METRIC = {"retrieval": "accuracy", "lm": "perplexity"}


def _stats(values: list[float]) -> tuple[float, float, int]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std, n


def _base_of(row: dict) -> str:
    return "main" if row["rope_base"] is None else f"{row['rope_base']:.0e}".replace("e+0", "e")


def group(rows: list[dict], metric: str, main: str = "1e4") -> dict:
    """``{(task, base label, scheme, gape, start): {length: (mean, std, n)}}``; NoPE and ALiBi rows
    appear under every base (they have none)."""
    bases = sorted({_base_of(r) for r in rows if r["rope_base"] is not None}) or [main]
    acc = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if metric not in r:
            continue
        for b in ([_base_of(r)] if r["rope_base"] is not None else bases):
            acc[(r["task"], b, r["scheme"], r["gape"], r["start"])][r["length"]].append(r[metric])
    return {k: {L: _stats(v) for L, v in sorted(d.items())} for k, d in acc.items()}


def _order(key):
    task, base, scheme, gape, start = key
    return (task, base, SCHEMES.index(scheme) if scheme in SCHEMES else 9, GAPE_FORMS.index(gape) if gape in GAPE_FORMS else 9, start)


def _fmt(stat, metric):
    mean, std, n = stat
    digits = 2 if metric == "accuracy" else 3
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def _table(groups: dict, task: str, base: str, metric: str, T: int, extra: dict | None = None, extra_head: str = "") -> list[str]:
    """``extra``: ``{key: [cells]}`` put before the lengths, under ``extra_head`` (``| a | b``)."""
    keys = sorted({k for k in list(groups) + list(extra or {}) if k[0] == task and k[1] == base}, key=_order)
    if not keys:
        return []
    lengths = sorted({L for k in keys for L in groups.get(k, {})})
    n_extra = extra_head.count("|")
    lines = ["| scheme | GAPE | start | seeds" + (" " + extra_head if extra_head else "") + " | " + " | ".join(f"{L // T}T ({L})" for L in lengths) + " |",
             "|---|---|---|---|" + "---|" * (n_extra + len(lengths))]
    for k in keys:  # a row whose runs all failed to learn is listed, with empty cells
        g = groups.get(k, {})
        n = max((s[2] for s in g.values()), default=0)
        cells = ((extra or {}).get(k) or [""] * n_extra) + [(_fmt(g[L], metric) if L in g else "") for L in lengths]
        lines.append(f"| {k[2]} | {k[3]} | {k[4]} | {n} | " + " | ".join(cells) + " |")
    return lines


# A retrieval run "learned" when its accuracy at T is at least this; runs below are reported
# and left out of every comparison (a model that fails in distribution says nothing about
# extrapolation).
LEARNED_ACCURACY = 0.9
# An LM run "learned" when its perplexity per byte at T is below this: about the unigram
# perplexity of English bytes (a model at or above it uses no context at all).
LEARNED_PERPLEXITY = 16.0
# The smallest difference a verdict may rest on, whatever the seeds' spread: one pass key
# in 50 (retrieval accuracy), 1% of perplexity (LM, compared as log-ratios).
RESOLUTION = {"retrieval": 0.02, "lm": 0.01}


def learned(row: dict) -> bool:
    """Whether the run of ``row`` (a row at 1T) learned its task in distribution."""
    if row["task"] == "retrieval":
        return row["accuracy"] >= LEARNED_ACCURACY
    return row["perplexity"] < LEARNED_PERPLEXITY


def learned_runs(rows: list[dict]) -> set[str]:
    return {r["run"] for r in rows if r["multiple"] == 1 and learned(r)}


def verdict(task: str, gape: dict[int, float], none: dict[int, float], learned_gape: set[int], learned_none: set[int]) -> dict:
    """Paired per-seed verdict of "the GAPE row is better than the row without GAPE".

    ``gape`` and ``none``: ``{seed: metric}`` at one length (accuracy for retrieval, higher
    is better; perplexity for LM, lower is better, compared as ``log(none / gape)``).
    Only seeds where both runs learned are paired. The spread is the larger sample std of
    the two rows' values over those seeds, floored at ``RESOLUTION``; on a seed the claim
    holds when the difference in GAPE's favour exceeds the spread, and it is reversed when
    it exceeds it the other way. The verdict is "holds" (or "reversed") only when that is so
    on every paired seed, of at least 2; otherwise "not decided", with the reason.

    Returns ``{"verdict", "seeds_for", "seeds_against", "paired", "mean_diff", "spread", "reason"}``.
    """
    seeds = sorted(s for s in set(gape) & set(none) if s in learned_gape and s in learned_none)
    out = {"paired": len(seeds), "seeds_for": 0, "seeds_against": 0, "mean_diff": None, "spread": None}
    if len(seeds) < 2:
        unlearned = len(set(gape) & set(none)) - len(seeds)
        reason = (f"fewer than 2 seeds where both rows learned ({len(seeds)} paired, {unlearned} left out: did not learn)")
        return dict(out, verdict="not decided", reason=reason)
    if task == "lm":
        diffs = [math.log(none[s] / gape[s]) for s in seeds]
        values = ([math.log(gape[s]) for s in seeds], [math.log(none[s]) for s in seeds])
    else:
        diffs = [gape[s] - none[s] for s in seeds]
        values = ([gape[s] for s in seeds], [none[s] for s in seeds])
    spread = max(_stats(values[0])[1], _stats(values[1])[1], RESOLUTION[task])
    out.update(seeds_for=sum(d > spread for d in diffs), seeds_against=sum(d < -spread for d in diffs),
               mean_diff=sum(diffs) / len(diffs), spread=spread)
    n = len(seeds)
    if out["seeds_for"] == n:
        return dict(out, verdict="holds", reason=f"better by more than the spread on {n} of {n} seeds")
    if out["seeds_against"] == n:
        return dict(out, verdict="reversed", reason=f"worse by more than the spread on {n} of {n} seeds")
    inside = n - out["seeds_for"] - out["seeds_against"]
    return dict(out, verdict="not decided",
                reason=f"better on {out['seeds_for']}, worse on {out['seeds_against']}, within the spread on {inside} of {n} seeds")


def per_seed(rows: list[dict], metric: str) -> dict:
    """``{(task, base label, scheme, gape, start): {length: {seed: value}}}`` (NoPE and ALiBi under every base)."""
    bases = sorted({_base_of(r) for r in rows if r["rope_base"] is not None}) or ["1e4"]
    acc = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        if metric in r:
            for b in ([_base_of(r)] if r["rope_base"] is not None else bases):
                acc[(r["task"], b, r["scheme"], r["gape"], r["start"])][r["length"]][r["seed"]] = r[metric]
    return acc


def _short(v: dict) -> str:
    if v["verdict"] == "holds":
        return f"holds {v['seeds_for']}/{v['paired']}"
    if v["verdict"] == "reversed":
        return f"reversed {v['seeds_against']}/{v['paired']}"
    if v["paired"] < 2:
        return f"n.d. ({v['paired']} paired)"
    return f"n.d. ({v['seeds_for']}+/{v['seeds_against']}-/{v['paired']})"


def verdicts(rows: list[dict], task: str, T: int, main_base: str | None = None) -> list[str]:
    """One line per (base, scheme, GAPE row): the paired verdict at each length against the same
    scheme without GAPE (NoPE and ALiBi, which have no base, only under ``main_base``)."""
    from .models import ROTARY

    sel = [r for r in rows if r["task"] == task]
    if not sel:
        return []
    ok = learned_runs(sel)
    seeds_ok = defaultdict(set)
    for r in sel:
        if r["run"] in ok:
            for b in ([_base_of(r)] if r["rope_base"] is not None else sorted({_base_of(x) for x in sel if x["rope_base"] is not None}) or ["1e4"]):
                seeds_ok[(b, r["scheme"], r["gape"], r["start"])].add(r["seed"])
    data = per_seed(sel, METRIC[task])
    lengths = sorted({r["length"] for r in sel})
    lines = []
    for key in sorted(data, key=_order):
        _, base, scheme, gape, start = key
        if gape == "none" or (main_base is not None and base != main_base and scheme not in ROTARY):
            continue
        ref = data.get((task, base, scheme, "none", "none"))
        if not ref:
            continue
        cells = []
        for L in lengths:
            if L in data[key] and L in ref:
                v = verdict(task, data[key][L], ref[L], seeds_ok[(base, scheme, gape, start)], seeds_ok[(base, scheme, "none", "none")])
                cells.append(_short(v))
            else:
                cells.append("")
        lines.append(f"| {base} | {scheme} | {gape}/{start} | " + " | ".join(cells) + " |")
    if not lines:
        return []
    head = "| base | scheme | + GAPE vs none | " + " | ".join(f"{L // T}T" for L in lengths) + " |"
    return [head, "|---|---|---|" + "---|" * len(lengths)] + lines


def headline(rows: list[dict], groups: dict, T: int) -> list[str]:
    """RoPE + GAPE against its own 1T value and against ALiBi (LM), and its retrieval at 8T,
    over the runs that learned."""
    out = []
    for key in sorted(groups, key=_order):
        task, base, scheme, gape, start = key
        if scheme != "rope" or gape == "none":
            continue
        g = groups[key]
        if task == "lm" and T in g and 32 * T in g:
            alibi = groups.get((task, base, "alibi", "none", "none"), {})
            rope = groups.get((task, base, "rope", "none", "none"), {})
            r32 = g[32 * T][0] / g[T][0]
            below = [L // T for L in g if L in alibi and g[L][0] > alibi[L][0]] if alibi else None
            rope_r = rope[32 * T][0] / rope[T][0] if rope and T in rope and 32 * T in rope else None
            out.append(f"- lm, base {base}, rope + {gape}/{start}: 32T/1T perplexity {r32:.3f} (flat would be <= 1.05); "
                       f"above ALiBi at: {'n/a' if below is None else (', '.join(f'{m}T' for m in below) or 'no length')}; "
                       f"plain RoPE 32T/1T {'n/a' if rope_r is None else f'{rope_r:.2f}'}")
        if task == "retrieval" and 8 * T in g:
            out.append(f"- retrieval, base {base}, rope + {gape}/{start}: accuracy at 8T {g[8 * T][0]:.2f} over the runs that learned")
    return out


def _arch(config: dict, task: str) -> dict:
    return config[task].get("arch") or config["arch"]


def _count_learned(rows: list[dict], task: str, ok: set[str]) -> dict:
    marked = [dict(r, _learned=float(r["run"] in ok)) for r in rows if r["task"] == task and r["multiple"] == 1]
    out = {}
    for key, by_len in group(marked, "_learned").items():
        (mean, _, n), = by_len.values()
        out[key] = [f"{round(mean * n)}/{n}"]
    return out


def summary(out: str) -> str:
    config = read_config(out)
    rows = read_rows(out, None, config)
    runs = sorted({r["run"] for r in rows})
    ok = learned_runs(rows)
    desc = []
    for task in ("retrieval", "lm"):
        a, t = _arch(config, task), config[task]
        unit = " bytes" if task == "lm" else ""
        desc.append(f"{task}: {a['layers']} layers, width {a['hidden']}, {a['heads']} heads, FFN {a['ffn']}, T = {t['train_length']}{unit}, "
                    f"{t['steps']} steps of batch {t['batch']} ({t['steps'] * t['batch'] * t['train_length']:,} training tokens), lr {t['lr']}")
    out = relative_path(out)  # the summary is committed: no folder of this machine in it
    lines = [f"# gape extrapolate: {out}", "", "; ".join(desc) + f"; {len(runs)} run(s) finished, {len(ok)} learned.",
             f"A run learned when at T its retrieval accuracy is >= {LEARNED_ACCURACY} or its perplexity per byte < {LEARNED_PERPLEXITY}; "
             "the others are counted in the `learned` column and left out of every mean and comparison below.",
             "Cells: mean ± sample std over the seeds that learned. Regenerate with "
             f"`gape extrapolate --report --out {out}`.", ""]
    for task in ("retrieval", "lm"):
        sel = [r for r in rows if r["task"] == task]
        kept = [r for r in sel if r["run"] in ok]
        T = config[task]["train_length"]
        learned_col = _count_learned(rows, task, ok)
        extra, head = learned_col, "| learned"
        if task == "lm":
            vg = group([dict(r, valid=r["valid_perplexity"]) for r in kept if r["multiple"] == 1 and r.get("valid_perplexity")], "valid")
            extra = {k: learned_col.get(k, [""]) + ([_fmt(next(iter(vg[k].values())), "perplexity")] if k in vg else [""]) for k in learned_col}
            head = "| learned | in-distribution ppl (validation plays, T)"
        metrics = ((METRIC[task], METRIC[task]),) + ((("perplexity_last_t", "perplexity of the last T tokens only"),) if task == "lm" else ())
        for metric, title in metrics:
            groups = group(kept, metric)
            for base in sorted({k[1] for k in list(groups) + list(extra)}):
                t = _table(groups, task, base, metric, T, extra, head)
                if t:
                    lines += [f"## {task}: {title}, RoPE base {base}", ""] + t + [""]
        eg = group(kept, "entropy_mean")
        for base in sorted({k[1] for k in eg}):
            t = _table(eg, task, base, "entropy", T)
            if t:
                lines += [f"## {task}: attention entropy (normalised, mean over layers), RoPE base {base}", ""] + t + [""]
    main = f"{config['bases'][0]:.0e}".replace("e+0", "e")
    for task in ("retrieval", "lm"):
        v = verdicts(rows, task, config[task]["train_length"], main)
        if v:
            better = "higher accuracy" if task == "retrieval" else "lower perplexity"
            lines += [f"## Verdicts, {task}: is + GAPE better ({better}) than the same scheme without it?", "",
                      "Paired by seed, over the seeds where both runs learned. `holds k/n`: better by more than the seed-to-seed "
                      "spread (the larger sample std of the two rows, at least "
                      f"{RESOLUTION[task]}{' in log perplexity' if task == 'lm' else ''}) on every one of the n paired seeds; "
                      "`reversed`: worse by more than it on every seed; `n.d.` (not decided): otherwise, with the count of seeds "
                      "better (+), worse (-) and paired, or fewer than 2 seeds paired.", ""] + v + [""]
    h = []
    for task in ("retrieval", "lm"):
        h += headline(rows, group([r for r in rows if r["task"] == task and r["run"] in ok], METRIC[task]), config[task]["train_length"])
    if h:
        lines += ["## Headline numbers (runs that learned)", ""] + h + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(k):
    return "none" if k[3] == "none" else f"{k[3]}/{k[4]}"


def plot_metric(out: str, rows: list[dict], config: dict) -> list[str]:
    plt = _plt()
    paths = []
    for task in ("retrieval", "lm"):
        T = config[task]["train_length"]
        groups = group([r for r in rows if r["task"] == task], METRIC[task])
        for base in sorted({k[1] for k in groups}):
            keys = [k for k in groups if k[1] == base]
            fig, axes = plt.subplots(1, len(SCHEMES), figsize=(4 * len(SCHEMES), 3.6), sharey=True)
            for ax, scheme in zip(axes, SCHEMES):
                for k in sorted((k for k in keys if k[2] == scheme), key=_order):
                    Ls = sorted(groups[k])
                    ax.errorbar([L // T for L in Ls], [groups[k][L][0] for L in Ls], yerr=[groups[k][L][1] for L in Ls],
                                marker="o", ms=3, capsize=2, label=_label(k), ls="--" if k[3] == "none" else "-")
                ax.set_xscale("log", base=2)
                ax.set_title(scheme)
                ax.set_xlabel("evaluation length / T")
                if task == "lm":
                    ax.set_yscale("log")
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=7)
            axes[0].set_ylabel("pass-key accuracy" if task == "retrieval" else "perplexity (bytes, every token)")
            fig.suptitle(f"{task}, T={T}, RoPE base {base}")
            fig.tight_layout()
            paths.append(save_figure_atomic(fig, os.path.join(out, f"{task}_base{base}.png"), dpi=100))
            plt.close(fig)
    return paths


def plot_entropy(out: str, rows: list[dict], multiple: int = 4) -> list[str]:
    plt = _plt()
    paths = []
    for task in ("retrieval", "lm"):
        sel = [r for r in rows if r["task"] == task and r["multiple"] == multiple]
        if not sel:
            continue
        acc = defaultdict(list)
        for r in sel:
            acc[(task, r["variant"], r["scheme"], r["gape"], r["start"])].append(r["entropy"])
        fig, axes = plt.subplots(1, len(SCHEMES), figsize=(4 * len(SCHEMES), 3.4), sharey=True)
        for ax, scheme in zip(axes, SCHEMES):
            for k, ents in sorted(acc.items(), key=lambda kv: _order((kv[0][0], kv[0][1], kv[0][2], kv[0][3], kv[0][4]))):
                if k[2] != scheme:
                    continue
                layers = len(ents[0])
                mean = [sum(e[i] for e in ents) / len(ents) for i in range(layers)]
                ax.plot(range(layers), mean, marker="o", ms=3, label=f"{k[3]}/{k[4]} {k[1]}", ls="--" if k[3] == "none" else "-")
            ax.set_title(scheme)
            ax.set_xlabel("layer")
            ax.set_ylim(0, 1)
            ax.xaxis.get_major_locator().set_params(integer=True)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6)
        axes[0].set_ylabel(f"normalised entropy at {multiple}T")
        fig.tight_layout()
        paths.append(save_figure_atomic(fig, os.path.join(out, f"entropy_{task}.png"), dpi=100))
        plt.close(fig)
    return paths


def _records(out: str) -> list[dict]:
    """The records of the runs ``out``'s rows hold (a record without rows is of a run in flight)."""
    return [read_record(out, run_id) for run_id in sorted({r["run"] for r in read_rows(out, None, read_config(out))})]


def plot_gates(out: str, scheme: str = "rope", seed: int = 0) -> list[str]:
    """Gate magnitude per head over training (one row per GAPE start, one column per layer),
    and the mask strength against key position of the last layer's heads at the end
    (for ``scheme``, or the first scheme with GAPE runs while it has none)."""
    plt = _plt()
    paths = []
    gated = [r for r in _records(out) if r["job"]["seed"] == seed and r["job"]["gape"] != "none"]
    present = [s for s in SCHEMES if any(r["job"]["scheme"] == s for r in gated)]
    if present and scheme not in present:
        scheme = present[0]
    recs = [r for r in gated if r["job"]["scheme"] == scheme]
    for task in ("retrieval", "lm"):
        sel = [r for r in recs if r["job"]["task"] == task and r["gate_curve"]]
        if not sel:
            continue
        layers = sorted(sel[0]["gate_curve"][0][1], key=int)
        fig, axes = plt.subplots(len(sel), len(layers), figsize=(2.6 * len(layers), 2.2 * len(sel)), squeeze=False)
        for row, rec in zip(axes, sel):
            steps = [s for s, _ in rec["gate_curve"]]
            for ax, layer in zip(row, layers):
                heads = len(rec["gate_curve"][0][1][layer])
                for h in range(heads):
                    ax.plot(steps, [g[layer][h] for _, g in rec["gate_curve"]], lw=1)
                ax.set_title(f"{rec['variant']} L{layer}", fontsize=7)
                ax.tick_params(labelsize=6)
            row[0].set_ylabel("T * mean lambda\n(paper: Gamma_h mean g)", fontsize=7)
        fig.suptitle(f"gate magnitude per head over training ({task}, {scheme}, seed {seed})", fontsize=9)
        fig.tight_layout()
        paths.append(save_figure_atomic(fig, os.path.join(out, f"gates_{task}.png"), dpi=90))
        plt.close(fig)

        fig, axes = plt.subplots(1, len(sel), figsize=(4 * len(sel), 3.2), squeeze=False)
        for ax, rec in zip(axes[0], sel):
            ms = rec["mask_strength"]
            if not ms:
                continue
            layer = max(ms, key=int)
            for h, b in enumerate(ms[layer]["bias"]):
                ax.plot(ms[layer]["keys"], b, lw=1, label=f"head {h}")
            ax.set_title(f"{rec['variant']}, layer {layer}", fontsize=8)
            ax.set_xlabel("key position (last query at the right end)")
            ax.legend(fontsize=6)
        axes[0][0].set_ylabel("GAPE bias on the logit")
        fig.tight_layout()
        paths.append(save_figure_atomic(fig, os.path.join(out, f"mask_{task}.png"), dpi=90))
        plt.close(fig)
    return paths


def write(out: str) -> list[str]:
    """Write ``summary.md`` and every plot; returns their paths."""
    config = read_config(out)
    rows = read_rows(out, None, config)
    path = os.path.join(out, "summary.md")
    write_atomic(path, summary(out) + "\n")
    if not rows:
        return [path]
    # the plots, like the tables, show only the runs that learned
    ok = learned_runs(rows)
    kept = [r for r in rows if r["run"] in ok]
    return [path] + plot_metric(out, kept, config) + plot_entropy(out, kept) + plot_gates(out)
