"""Markdown report + PNG plots from demo/eval metrics."""

from __future__ import annotations

import math
from pathlib import Path


def fmt(x, pct: bool = True) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{100 * x:.1f}" if pct else f"{x:.3g}"


def _ok(x) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def markdown_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def bar_plot(path: Path, title: str, labels: list[str], series: dict[str, list[float]], ylabel: str,
             errors: dict[str, list] | None = None) -> Path:
    """Grouped bars: one group per label, one bar per series (e.g. per seed); ``errors``
    (same shape, each ``[lo, hi]`` or None) draws each bar's 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(labels), 3.4), dpi=110)
    n = max(len(series), 1)
    width = 0.8 / n
    for k, (name, vals) in enumerate(series.items()):
        xs = [i + (k - (n - 1) / 2) * width for i in range(len(labels))]
        ys = [0 if (v is None or (isinstance(v, float) and math.isnan(v))) else 100 * v for v in vals]
        ci = (errors or {}).get(name) or [None] * len(vals)
        if any(c for c in ci):
            lo = [max(y - 100 * c[0], 0) if c and _ok(c[0]) else 0 for y, c in zip(ys, ci)]
            hi = [max(100 * c[1] - y, 0) if c and _ok(c[1]) else 0 for y, c in zip(ys, ci)]
            bars = ax.bar(xs, ys, width, label=name, yerr=[lo, hi], capsize=2, error_kw={"elinewidth": 0.8})
        else:
            bars = ax.bar(xs, ys, width, label=name)
        for b, y in zip(bars, ys):
            ax.annotate(f"{y:.0f}", (b.get_x() + b.get_width() / 2, y), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 105)
    ax.set_title(title, fontsize=10)
    if len(series) > 1:
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def line_plot(path: Path, title: str, xs: list, panels: dict[str, dict[str, tuple[list, list]]],
              xlabel: str) -> Path:
    """One panel per metric (``panels[metric][series] = (values, cis)``, rates in [0, 1]):
    value against ``xs`` with 95% interval bars, one line per series (e.g. per seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(panels), 1)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.2), dpi=110, squeeze=False)
    pos = list(range(len(xs)))  # evenly spaced: sweeps are usually geometric
    for ax, (metric, series) in zip(axes[0], panels.items()):
        for k, (name, (vals, cis)) in enumerate(series.items()):
            shift = (k - (len(series) - 1) / 2) * 0.06
            ys = [100 * v if _ok(v) else float("nan") for v in vals]
            lo = [max(y - 100 * c[0], 0) if c and _ok(c[0]) and _ok(y) else 0 for y, c in zip(ys, cis)]
            hi = [max(100 * c[1] - y, 0) if c and _ok(c[1]) and _ok(y) else 0 for y, c in zip(ys, cis)]
            ax.errorbar([p + shift for p in pos], ys, yerr=[lo, hi], marker="o", ms=3, capsize=2, lw=1, label=name)
        ax.set_xticks(pos, [str(x) for x in xs])
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylim(-3, 103)
        ax.set_title(f"{metric} (%)", fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def xy_plot(path: Path, title: str, series: dict[str, list], xlabel: str, ylabel: str) -> Path:
    """Points ``[x, y, label]`` joined in order, one line per series (e.g. per seed); each
    point annotated with its label (e.g. the threshold that produced it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 3.6), dpi=110)
    for name, pts in series.items():
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, marker="o", ms=3, lw=1, label=name)
        for x, y, *lab in pts:
            if lab:
                ax.annotate(str(lab[0]), (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
