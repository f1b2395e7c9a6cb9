"""Figures from saved results. The only module that imports matplotlib; it never trains anything.

Every function takes plain records (rows of ``metrics.csv``, arrays) and writes a PNG.
"""

from __future__ import annotations

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


# Galleries of heatmap overlays: lossy WebP (every current browser shows it) at q=70 is about half the
# JPEG's bytes at the same look and a tenth of the PNG's, on nearest-neighbour-enlarged thumbnails.
PHOTO_FORMAT = "webp"
JPEG_QUALITY = 70  # JPEG and WebP


def gallery_dpi(image_side: int) -> int:
    """Resolution of a gallery figure: enough to show each pixel of a small (28-32 px) image as a 3-4 px
    block, and detail of a large one; more only adds bytes. (Galleries scale their fonts to stay legible.)"""
    return 64 if image_side <= 48 else 100


def gallery_font(dpi: int, size: float = 8.0) -> float:
    """A font size that keeps ``size`` points at 100 dpi legible at ``dpi``."""
    return size * max(1.0, 100 / dpi)


def save_figure(fig: plt.Figure, path: str | os.PathLike, dpi: int = 110) -> Path:
    """PNG for line and bar charts (flat colours, exact); JPEG when ``path`` ends in .jpg/.jpeg, WebP in .webp
    (photographs and heatmaps, where PNG is many times larger)."""
    path = Path(path)
    for ax in fig.axes:
        if ax.get_xlabel().startswith("epoch"):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fmt = {".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}.get(path.suffix.lower(), "png")
    if fmt == "png":
        atomic_write(path, lambda f: f.write(_png_bytes(fig, dpi)))
    else:
        atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=dpi, bbox_inches="tight",
                                                 pil_kwargs={"quality": JPEG_QUALITY}))
    plt.close(fig)
    return path


def _png_bytes(fig: plt.Figure, dpi: int) -> bytes:
    """The figure as a 256-colour PNG: a chart has a few flat colours plus their anti-aliased edges, which
    256 colours hold without a visible change, at a quarter of the bytes of matplotlib's RGBA PNG."""
    import io

    from PIL import Image, PngImagePlugin

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    # Our own figure, decoded with the PNG plugin directly: Image.open's decompression-bomb limit guards user
    # images (and may be lowered for them), not the charts we just drew.
    img = PngImagePlugin.PngImageFile(io.BytesIO(buf.getvalue())).convert("RGB")
    out = io.BytesIO()
    img.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(out, format="PNG", optimize=True)
    return out.getvalue()


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

# One colour and marker per norm in every figure and table of a report (colour-blind-safe Okabe-Ito
# colours for the first seven, tab20 colours away from them for the catalogue; every norm has its own marker,
# so they stay apart in grey too). Never by position: position changes between figures.
VARIANT_STYLES: dict[str, tuple[str, str]] = {
    "torch_bn": ("#000000", "s"), "bn": ("#0072B2", "o"), "in": ("#E69F00", "^"), "bin": ("#009E73", "D"),
    "ln": ("#CC79A7", "v"), "gn": ("#D55E00", "P"), "nn": ("#56B4E9", "X"),
    "frn": ("#d62728", "p"), "evonorm_b0": ("#9467bd", "h"), "evonorm_s0": ("#c5b0d5", "H"), "sn": ("#8c564b", "*"),
    "brn": ("#17becf", "<"), "gbn": ("#98df8a", ">"), "rms": ("#7f7f7f", "d"), "ln2d": ("#bcbd22", "8"),
    "rms2d": ("#ff9896", "x"), "dyt": ("#1a1a6e", "+"), "mobn": ("#393b79", "1"),
}
MARKER_GLYPHS = {"o": "●", "s": "■", "^": "▲", "D": "◆", "v": "▼", "P": "✚", "X": "✖", "*": "★", "h": "⬢", "<": "◀",
                 "p": "⬟", "H": "⬣", ">": "▶", "d": "◊", "8": "✸", "x": "✕", "+": "✛",
                 "1": "⋎"}
# labels without a listed norm (a norm registered later, a compare group): tab20's light colours, none of the above
_EXTRA = (("#aec7e8", "*"), ("#ffbb78", "h"), ("#c49c94", "<"), ("#f7b6d2", "*"), ("#dbdb8d", "h"), ("#9edae5", "<"))
_LINES = ("-", "--", ":", "-.")


def style_of(label: str, siblings: Sequence[str] = ()) -> dict[str, str]:
    """Matplotlib style of a variant: its norm's colour and marker (the norm is the label's first word,
    e.g. "gn · batch 8"); the rest of the label (batch size, augmentation) picks the line style by its
    order in ``siblings``. Labels without a norm get a colour by their order in ``siblings``."""
    norm, _, rest = str(label).partition(" · ")
    same = [s for s in siblings if str(s).partition(" · ")[0] == norm] or [label]
    line = _LINES[same.index(label) % len(_LINES)] if rest and label in same else "-"
    if norm in VARIANT_STYLES:
        color, marker = VARIANT_STYLES[norm]
    else:
        others = [s for s in siblings if str(s).partition(" · ")[0] not in VARIANT_STYLES] or [label]
        color, marker = _EXTRA[(others.index(label) if label in others else 0) % len(_EXTRA)]
        line = "-"
    return {"color": color, "marker": marker, "linestyle": line}


MANY_SERIES = 8  # more curves than this per figure: one legend below the panels instead of one in each
LEGEND_COLUMNS = 3  # legend columns per panel column


def plot_panels(panels: Sequence[tuple[str, str, Series]], path: str | os.PathLike, ncols: int = 2,
                xlabel: str = "epoch", title: str = "", logy: Sequence[bool] | None = None,
                styles: dict[str, str] | None = None, dpi: int = 110, sharey: bool = False,
                xticks: Sequence[float] | None = None) -> Path:
    """Several panels of overlaid curves: ``panels`` = [(panel title, y label, {label: (x, y)})]. ``sharey``: one
    y scale for every panel (when the panels are meant to be compared value for value); ``xticks``: ticks only
    at these x values (e.g. the severities evaluated)."""
    ncols = min(ncols, len(panels))
    nrows = -(-len(panels) // ncols)
    labels = list(dict.fromkeys(label for _, _, series in panels for label in series))
    many = len(labels) > MANY_SERIES
    extra = 0.22 * -(-len(labels) // (LEGEND_COLUMNS * ncols)) + 0.3 if many else 0.0  # the legend's rows
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.2 * ncols, 4.2 * nrows + extra), squeeze=False,
                             layout="constrained", sharey=sharey)
    for i, (ax, (name, ylabel, series)) in enumerate(zip(axes.flat, panels)):
        for label, (x, y) in series.items():
            style = style_of(label, list(series))
            if styles and label in styles:
                style["linestyle"] = styles[label]
            ax.plot(x, y, ms=3.5, lw=1.5, label=label, **style)
        ax.set(title=name, xlabel=xlabel, ylabel=ylabel)
        if xticks is not None:
            ax.set_xticks(list(xticks))
        if sharey:
            ax.yaxis.set_tick_params(labelleft=True)  # each panel keeps its numbers: read without looking across
        if logy and logy[i]:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if series and not many:
            ax.legend(fontsize=8, handlelength=3)  # long enough handles to show each line style
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    if many:  # one legend below the panels: inside them, a catalogue's 17+ entries covered the curves
        shown: dict[str, object] = {}
        for ax in axes.flat:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                shown.setdefault(label, handle)
        fig.legend(list(shown.values()), list(shown), loc="outside lower center", fontsize=8, handlelength=3,
                   ncol=min(len(shown), LEGEND_COLUMNS * ncols))
    if title:
        fig.suptitle(title)
    return save_figure(fig, path, dpi=dpi)


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
        if not epochs:  # e.g. a run that diverged before its first probe: say so rather than leave a blank panel
            ax.text(0.5, 0.5, "no quantiles recorded\n(the run diverged or failed)", ha="center", va="center",
                    transform=ax.transAxes, fontsize=9, color="gray")
        ax.set_title(label, color=style_of(label, list(variants))["color"])
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


def plot_confusion_grid(mats: dict[str, Sequence[Sequence[float]]], classes: Sequence[str], path: str | os.PathLike,
                        title: str = "") -> Path:
    """Row-normalised confusion matrices of several variants side by side on one colour scale (counts
    written in the cells up to 10 classes); each panel titled in its variant's colour."""
    import numpy as np

    n, k = len(mats), len(classes)
    ncols = min(4, n) or 1
    nrows = max(1, -(-n // ncols))
    side = 2.6 if k <= 10 else 3.4
    fig, axes = plt.subplots(nrows, ncols, figsize=(side * ncols + 0.8, side * nrows + 0.6), squeeze=False,
                             constrained_layout=True)
    for ax in axes.flat:
        ax.set_visible(False)
    names = [str(c)[:12] for c in classes]
    for ax, (label, cm) in zip(axes.flat, mats.items()):
        ax.set_visible(True)
        cm = np.asarray(cm, dtype=float)
        rows = cm.sum(axis=1, keepdims=True)
        shown = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
        ax.imshow(shown, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
        if k <= 10:
            for i in range(k):
                for j in range(k):
                    ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=5,
                            color="white" if shown[i, j] > 0.5 else "black")
        ticks = range(k) if k <= 30 else range(0, k, max(1, k // 10))
        ax.set_xticks(list(ticks), [names[t] for t in ticks] if k <= 30 else list(ticks), rotation=90, fontsize=5,
                      parse_math=False)
        ax.set_yticks(list(ticks), [names[t] for t in ticks] if k <= 30 else list(ticks), fontsize=5, parse_math=False)
        acc = np.trace(cm) / cm.sum() if cm.sum() else float("nan")
        ax.set_title(f"{label} (acc {acc:.3f})", fontsize=9, color=style_of(label, list(mats))["color"],
                     parse_math=False)
    if title:
        fig.suptitle(title, fontsize=10, parse_math=False)
    return save_figure(fig, path, dpi=100)


def plot_bars(values: dict[str, float], path: str | os.PathLike, title: str, ylabel: str,
              errors: dict[str, float] | None = None) -> Path:
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(values) + 2), 3.8), constrained_layout=True)
    labels = list(values)
    ax.bar(labels, [values[k] for k in labels], yerr=[(errors or {}).get(k, 0.0) for k in labels], capsize=3,
           color=[style_of(k, labels)["color"] for k in labels])
    ax.set(title=title, ylabel=ylabel)
    ax.grid(alpha=0.3, axis="y")
    ax.tick_params(axis="x", rotation=30)
    return save_figure(fig, path)


def plot_reliability(variants: dict[str, dict[str, Sequence[float]]], path: str | os.PathLike, title: str = "",
                     ncols: int = 4) -> Path:
    """Reliability diagrams, one panel per variant: accuracy against mean confidence per confidence bin
    (``{"confidence", "accuracy", "count"}``), bars shaded by how many images the bin holds, the diagonal
    = perfect calibration."""
    n = max(1, len(variants))
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.3 * ncols, 3.3 * nrows), squeeze=False, sharex=True,
                             sharey=True, constrained_layout=True)
    for ax in axes.flat:
        ax.set_visible(False)
    for idx, (ax, (label, bins)) in enumerate(zip(axes.flat, variants.items())):
        ax.set_visible(True)
        k = len(bins["count"])
        edges = [i / k for i in range(k + 1)]
        total = max(1, sum(bins["count"]))
        color = style_of(label, list(variants))["color"]
        for i, (acc, cnt) in enumerate(zip(bins["accuracy"], bins["count"])):
            if cnt:
                ax.bar(edges[i], acc, width=1 / k, align="edge", color=color,
                       alpha=0.25 + 0.75 * min(1.0, 5 * cnt / total), edgecolor="white", lw=0.5)
        ax.plot([0, 1], [0, 1], ":", color="gray", lw=1)
        # shared axes: numbers and labels at the bottom panel of each column (also above an empty slot of the
        # last row) and on the left column only
        bottom = idx + ncols >= n
        ax.xaxis.set_tick_params(labelbottom=bottom)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence" if bottom else "",
               ylabel="accuracy" if idx % ncols == 0 else "")
        ax.set_title(label, color=color, fontsize=9, parse_math=False)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10, parse_math=False)
    return save_figure(fig, path, dpi=100)


def plot_heatmap(values: Sequence[Sequence[float]], rows: Sequence[str], cols: Sequence[str], path: str | os.PathLike,
                 title: str = "", label: str = "", fmt: str = "{:.2f}") -> Path:
    """A rows × columns heat map with every cell written in it (NaN cells blank), e.g. corruption × variant.
    The longer of the two lists runs down the side: a column takes 1.1 in, a row 0.34 in, so 16 variants as
    columns made a figure so wide that a page scaled its numbers below reading size."""
    import numpy as np

    a = np.asarray(values, dtype=float)
    if len(cols) > len(rows):
        a, rows, cols = a.T, cols, rows
    fig, ax = plt.subplots(figsize=(1.1 * len(cols) + 2.8, 0.34 * len(rows) + 1.6), constrained_layout=True)
    finite = a[np.isfinite(a)]
    im = ax.imshow(np.ma.masked_invalid(a), cmap="viridis", aspect="auto", interpolation="nearest",
                   vmin=finite.min() if finite.size else 0, vmax=finite.max() if finite.size else 1)
    fig.colorbar(im, ax=ax, label=label)
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            if np.isfinite(a[i, j]):
                ax.text(j, i, fmt.format(a[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if a[i, j] < mid else "black")
    ax.set_xticks(range(len(cols)), [str(c) for c in cols], rotation=30, ha="right", fontsize=8, parse_math=False)
    ax.set_yticks(range(len(rows)), [str(r) for r in rows], fontsize=8, parse_math=False)
    if title:
        ax.set_title(title, fontsize=10, parse_math=False)
    return save_figure(fig, path, dpi=100)
