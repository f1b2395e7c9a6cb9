"""Figures from saved results. The only module that imports matplotlib; it never trains anything.

Every function takes plain records (rows of ``metrics.csv``, arrays) and writes a PNG.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no screen on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from normlab.io import atomic_write  # noqa: E402

# (column suffix, panel title, y label) for the per-run curves figure
CURVE_PANELS = (
    ("loss", "Cross-entropy loss", "loss"),
    ("error", "Top-1 error", "error"),
    ("acc", "Accuracy", "accuracy"),
    ("micro_f1", "Micro-F1", "micro-F1"),
    ("macro_f1", "Macro-F1", "macro-F1"),
)


def read_metrics(path: str | os.PathLike) -> list[dict[str, float]]:
    """Rows of a run's ``metrics.csv`` as dicts of floats (empty cells -> NaN)."""
    with open(path, newline="") as f:
        return [{k: float(v) if v not in ("", None) else float("nan") for k, v in row.items()}
                for row in csv.DictReader(f)]


def save_figure(fig: plt.Figure, path: str | os.PathLike, dpi: int = 110) -> Path:
    path = Path(path)
    for ax in fig.axes:
        if ax.get_xlabel().startswith("epoch"):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight"))
    plt.close(fig)
    return path


def plot_curves(rows: Sequence[dict[str, float]], path: str | os.PathLike, title: str = "") -> Path:
    """Loss, error, accuracy, micro-F1, macro-F1 (train vs val) and the learning rate, per epoch."""
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), constrained_layout=True)
    for ax, (key, name, ylabel) in zip(axes.flat, CURVE_PANELS):
        for split, style in (("train", "-"), ("val", "--")):
            col = f"{split}_{key}"
            if rows and col in rows[0]:
                ax.plot(epochs, [r[col] for r in rows], style, marker="o", ms=3, label=split)
        ax.set(title=name, xlabel="epoch", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    ax = axes.flat[5]
    if rows and "lr" in rows[0]:
        ax.plot(epochs, [r["lr"] for r in rows], color="gray")
    ax.set(title="Learning rate (end of epoch)", xlabel="epoch", ylabel="lr")
    ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


Series = dict[str, tuple[Sequence[float], Sequence[float]]]  # label -> (x, y)


def plot_panels(panels: Sequence[tuple[str, str, Series]], path: str | os.PathLike, ncols: int = 2,
                xlabel: str = "epoch", title: str = "", logy: Sequence[bool] | None = None,
                styles: dict[str, str] | None = None) -> Path:
    """Several panels of overlaid curves: ``panels`` = [(panel title, y label, {label: (x, y)})]."""
    ncols = min(ncols, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.2 * ncols, 4.2 * nrows), squeeze=False, constrained_layout=True)
    for i, (ax, (name, ylabel, series)) in enumerate(zip(axes.flat, panels)):
        for label, (x, y) in series.items():
            ax.plot(x, y, (styles or {}).get(label, "-"), marker="o", ms=2.5, lw=1.5, label=label)
        ax.set(title=name, xlabel=xlabel, ylabel=ylabel)
        if logy and logy[i]:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_quantile_panels(variants: dict[str, tuple[Sequence[float], Sequence[Sequence[float]]]],
                         qs: Sequence[float], path: str | os.PathLike, layer: str) -> Path:
    """Feature-quantile evolution: one panel per variant (same axes), one line per quantile."""
    n = len(variants)
    ncols = min(4, n) or 1
    nrows = max(1, -(-n // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.0 * ncols, 3.3 * nrows), squeeze=False, sharex=True,
                             sharey=True, constrained_layout=True)
    colors = plt.cm.viridis([i / max(1, len(qs) - 1) for i in range(len(qs))])
    for ax, (label, (epochs, values)) in zip(axes.flat, variants.items()):
        for j, q in enumerate(qs):
            ax.plot(epochs, [v[j] for v in values], marker="o", ms=2.5, color=colors[j], label=f"{q * 100:g}th pct")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("epoch (0 = at initialisation)")
    for ax in axes[:, 0]:
        ax.set_ylabel(f"activation of {layer}")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"Feature quantiles after `{layer}` on a fixed val probe batch")
    return save_figure(fig, path)


def plot_bars(values: dict[str, float], path: str | os.PathLike, title: str, ylabel: str,
              errors: dict[str, float] | None = None) -> Path:
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(values) + 2), 3.8), constrained_layout=True)
    labels = list(values)
    ax.bar(labels, [values[k] for k in labels], yerr=[(errors or {}).get(k, 0.0) for k in labels], capsize=3,
           color="#4c72b0")
    ax.set(title=title, ylabel=ylabel)
    ax.grid(alpha=0.3, axis="y")
    ax.tick_params(axis="x", rotation=30)
    return save_figure(fig, path)
