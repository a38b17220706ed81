"""Summary table and plots of a ``gape extrapolate`` folder, from ``rows.jsonl`` and ``runs/``
alone, so they can be regenerated at any time (``gape extrapolate --report --out DIR``)."""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict

from gape._io import save_figure_atomic, write_atomic
from .models import GAPE_FORMS, SCHEMES
from .runner import CONFIG, read_rows

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


def _table(groups: dict, task: str, base: str, metric: str, T: int) -> list[str]:
    keys = sorted((k for k in groups if k[0] == task and k[1] == base), key=_order)
    if not keys:
        return []
    lengths = sorted({L for k in keys for L in groups[k]})
    lines = ["| scheme | GAPE | start | seeds | " + " | ".join(f"{L // T}T ({L})" for L in lengths) + " |",
             "|---|---|---|---|" + "---|" * len(lengths)]
    for k in keys:
        g = groups[k]
        n = max(s[2] for s in g.values())
        cells = [(_fmt(g[L], metric) if L in g else "") for L in lengths]
        lines.append(f"| {k[2]} | {k[3]} | {k[4]} | {n} | " + " | ".join(cells) + " |")
    return lines


def claims(groups: dict, T: int, main_base: str | None = None) -> list[str]:
    """The issue's targets, checked per scheme and GAPE start against the same scheme without GAPE
    (NoPE and ALiBi, which have no base, only under ``main_base``)."""
    from .models import ROTARY

    lines = []
    for key in sorted(groups, key=_order):
        task, base, scheme, gape, start = key
        if gape == "none" or (main_base is not None and base != main_base and scheme not in ROTARY):
            continue
        ref = groups.get((task, base, scheme, "none", "none"))
        if not ref:
            continue
        g = groups[key]
        parts, ok = [], True
        if task == "lm":
            if T in g and T in ref:
                r = g[T][0] / ref[T][0]
                parts.append(f"1T ratio {r:.3f}")
                ok &= r <= 1.02  # "within 2%": not worse by more than 2% (better passes)
            for m in (2, 4):
                L = m * T
                if L in g and L in ref:
                    parts.append(f"{m}T {g[L][0]:.3f} vs {ref[L][0]:.3f}")
                    ok &= g[L][0] < ref[L][0]
        else:
            for m in (2, 4):
                L = m * T
                if L in g and L in ref:
                    parts.append(f"{m}T {g[L][0]:.2f} vs {ref[L][0]:.2f}")
                    ok &= g[L][0] >= ref[L][0]
        if parts:
            n = min(s[2] for s in g.values())
            lines.append(f"| {task} | {base} | {scheme} | {gape}/{start} | {n} | {'; '.join(parts)} | {'yes' if ok else 'no'} |")
    if not lines:
        return []
    return ["| task | base | scheme | GAPE | seeds | + GAPE vs none (means) | claim holds |", "|---|---|---|---|---|---|---|"] + lines


def moonshot(groups: dict, T: int) -> list[str]:
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
            below = all(L in alibi and g[L][0] <= alibi[L][0] for L in g) if alibi else None
            rope_r = rope[32 * T][0] / rope[T][0] if rope and T in rope and 32 * T in rope else None
            out.append(f"- lm, base {base}, rope + {gape}/{start}: 32T/1T perplexity {r32:.3f} (target <= 1.05); "
                       f"at or below ALiBi at every length: {'n/a' if below is None else below}; "
                       f"plain RoPE 32T/1T {'n/a' if rope_r is None else f'{rope_r:.2f}'} (target > 2)")
        if task == "retrieval" and 8 * T in g:
            out.append(f"- retrieval, base {base}, rope + {gape}/{start}: accuracy at 8T {g[8 * T][0]:.2f} (target >= 0.8)")
    return out


def summary(out: str) -> str:
    rows = read_rows(out)
    with open(os.path.join(out, CONFIG), encoding="utf-8") as f:
        config = json.load(f)
    runs = sorted({r["run"] for r in rows})
    a = config["arch"]
    r, m = config["retrieval"], config["lm"]
    lines = [f"# gape extrapolate: {out}", "",
             f"{a['layers']} layers, width {a['hidden']}, {a['heads']} heads, FFN {a['ffn']}; "
             f"retrieval: T = {r['train_length']}, {r['steps']} steps of batch {r['batch']}, lr {r['lr']}; "
             f"lm: T = {m['train_length']} bytes, {m['steps']} steps of batch {m['batch']}, lr {m['lr']}; "
             f"{len(runs)} run(s) finished.",
             "Cells: mean ± sample std over the finished seeds. Regenerate with "
             f"`gape extrapolate --report --out {out}`.", ""]
    for task in ("retrieval", "lm"):
        for metric, title in ((METRIC[task], METRIC[task]),) + ((("perplexity_last_t", "perplexity of the last T tokens only"),) if task == "lm" else ()):
            groups = group([r for r in rows if r["task"] == task], metric)
            for base in sorted({k[1] for k in groups}):
                t = _table(groups, task, base, metric, config[task]["train_length"])
                if t:
                    lines += [f"## {task}: {title}, RoPE base {base}", ""] + t + [""]
        eg = group([r for r in rows if r["task"] == task], "entropy_mean")
        for base in sorted({k[1] for k in eg}):
            t = _table(eg, task, base, "entropy", config[task]["train_length"])
            if t:
                lines += [f"## {task}: attention entropy (normalised, mean over layers), RoPE base {base}", ""] + t + [""]
    c, m = [], []
    for task in ("retrieval", "lm"):
        groups = group([r for r in rows if r["task"] == task], METRIC[task])
        T = config[task]["train_length"]
        main = f"{config['bases'][0]:.0e}".replace("e+0", "e")
        c += claims(groups, T, main)[2 if c else 0:]
        m += moonshot(groups, T)
    if c:
        lines += ["## The paper's claim per scheme (+GAPE perplexity below none at 2T and 4T, and at 1T at most 2% above it; retrieval at or above none at 2T and 4T)", ""] + c + [""]
    if m:
        lines += ["## Moonshot targets", ""] + m + [""]
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
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6)
        axes[0].set_ylabel(f"normalised entropy at {multiple}T")
        fig.tight_layout()
        paths.append(save_figure_atomic(fig, os.path.join(out, f"entropy_{task}.png"), dpi=100))
        plt.close(fig)
    return paths


def _records(out: str) -> list[dict]:
    folder = os.path.join(out, "runs")
    recs = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".json"):
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                recs.append(json.load(f))
    return recs


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
    rows = read_rows(out)
    path = os.path.join(out, "summary.md")
    write_atomic(path, summary(out) + "\n")
    if not rows:
        return [path]
    with open(os.path.join(out, CONFIG), encoding="utf-8") as f:
        config = json.load(f)
    return [path] + plot_metric(out, rows, config) + plot_entropy(out, rows) + plot_gates(out)
