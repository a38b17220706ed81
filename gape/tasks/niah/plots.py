"""The classic needle-in-a-haystack figures: a depth x length heatmap per method
(red-yellow-green) and accuracy against context length with every method. Files are written
atomically (rendered to a temporary name, then renamed)."""

from __future__ import annotations

import os
from collections import defaultdict

from gape._io import save_figure_atomic
from .results import by_length


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in name)


def _save(fig, path: str) -> str:
    return save_figure_atomic(fig, path, dpi=120, bbox_inches="tight")


def plot_all(out_dir: str, summary: list[dict], methods_order: list[str] | None = None) -> list[str]:
    """Write every figure for the rows in ``summary``; returns the paths."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    paths = []
    cells: dict = defaultdict(dict)
    for s in summary:
        cells[(s["task"], s["haystack"], s["method"])][(s["depth"], s["length"])] = s["accuracy"]
    for (task, haystack, method), grid in sorted(cells.items()):
        depths = sorted({d for d, _ in grid})
        lengths = sorted({n for _, n in grid})
        data = [[grid.get((d, n), float("nan")) for n in lengths] for d in depths]
        fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(lengths), 1.0 + 0.55 * len(depths)))
        image = ax.imshow(data, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{method}: {task} / {haystack}")
        for i, row in enumerate(data):
            for j, value in enumerate(row):
                if value == value:  # not NaN
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
        fig.colorbar(image, ax=ax, label="accuracy")
        paths.append(_save(fig, os.path.join(out_dir, f"heatmap_{_safe(method)}_{_safe(task)}_{_safe(haystack)}.png")))
        plt.close(fig)

    for (task, haystack), methods in sorted(by_length(summary).items()):
        fig, ax = plt.subplots(figsize=(6, 4))
        order = [m for m in (methods_order or []) if m in methods] + sorted(m for m in methods if m not in (methods_order or []))
        styles = ["-", "--", ":", "-."]
        markers = ["o", "s", "^", "D", "v", "P"]
        for k, m in enumerate(order):
            per = methods[m]
            # distinct dashes and markers keep methods with equal accuracy visible
            ax.plot(list(per), [a for a, _ in per.values()], linestyle=styles[k % 4], marker=markers[k % 6],
                    markersize=max(3, 9 - k), alpha=0.85, label=m)
        ax.set_xscale("log", base=2)
        lengths = sorted({n for per in methods.values() for n in per})
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{task} / {haystack}")
        ax.grid(alpha=0.3)
        ax.legend()
        paths.append(_save(fig, os.path.join(out_dir, f"accuracy_vs_length_{_safe(task)}_{_safe(haystack)}.png")))
        plt.close(fig)
    return paths
