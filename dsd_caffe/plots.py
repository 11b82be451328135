"""Every PNG the toolkit writes. Figures are made with ``matplotlib.figure.Figure`` and written by its own Agg
canvas, so neither pyplot nor the global matplotlib backend is touched (a notebook keeps its backend), and each file
is written atomically.

- :func:`weight_histograms`: weights before and after pruning (prune), or per phase (the demo).
- :func:`accuracy_curves`: validation accuracy over cumulative iterations, one line per arm (DSD and its control),
  phase boundaries and the pruning dip marked; a second panel zooms on the phases after the dense one.
- :func:`sensitivity_heatmap`: a heat map of accuracy per (layer, density), readable with SqueezeNet's 26 layers;
  the cells that keep the unpruned accuracy outlined, those above a layer's current density hatched.
- :func:`confusion`: a confusion matrix with class names.
"""
import os

import numpy as np

from . import fileio

#: line colours and styles of the arms and phases in accuracy_curves
STYLES = {"dense": ("black", "-"), "sparse": ("tab:orange", "-"), "redense": ("tab:green", "-"),
          "control": ("tab:blue", "--")}


def _figure(**kw):
    from matplotlib.figure import Figure  # deferred: heavy, needed only to draw

    return Figure(**kw)


def save(fig, path, dpi=80):
    """Lay out ``fig`` and write it as a PNG atomically."""
    fig.tight_layout()
    with fileio.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return os.fspath(path)


def weight_histograms(path, arrays, title, zeros="drawn"):
    """One panel per {label: weight ndarray} (log counts); with ``zeros="hidden"`` exact zeros are left out and
    each panel says how many weights are non-zero."""
    fig = _figure(figsize=(3.4 * len(arrays), 3.2))
    axes = np.atleast_1d(fig.subplots(1, len(arrays), sharex=True, sharey=True))
    lim = max(float(np.abs(a).max()) for a in arrays.values()) or 1.0
    bins = np.linspace(-lim, lim, 161)
    for ax, (label, a) in zip(axes, arrays.items()):
        a = np.ravel(a)
        nz = a[a != 0]
        shown = nz if zeros == "hidden" else a
        ax.stairs(np.histogram(shown, bins)[0], bins, fill=True)
        ax.set_title(f"{label}\n{nz.size:,}/{a.size:,} non-zero ({nz.size / a.size:.3f})", fontsize=9)
        ax.set_yscale("log")
        ax.set_xlabel("weight")
    fig.suptitle(title + (" (zeros not drawn)" if zeros == "hidden" else ""), fontsize=10)
    return save(fig, path)


def accuracy_curves(path, curves, boundaries=(), marks=(), title="validation accuracy", ylabel="top-1 (%)",
                    zoom_from=None, density=()):
    """``curves``: {label: [(iteration, accuracy in 0..1)]}, labels styled by STYLES (by their first word);
    ``boundaries``: iterations where a phase starts; ``marks``: [(iteration, accuracy, text)] annotated points
    (the pruning dip); ``density``: [(iteration, density)] drawn as a step line on a right-hand axis (gradual
    pruning's curve). One panel shows everything; with ``zoom_from`` a second one shows the iterations from there
    on (the phases after a long dense one)."""
    fig = _figure(figsize=(11, 4) if zoom_from is not None else (7.5, 4))
    axes = np.atleast_1d(fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.3]}) if zoom_from is not None
                         else fig.subplots())
    start = zoom_from
    for k, ax in enumerate(axes):
        ys = []  # what sets the y range: on the zoomed panel, not the marked dips (they are drawn on the other)
        dips = {(i, v) for i, v, _ in marks} if k else set()
        for label, pts in curves.items():
            pts = [(i, v) for i, v in pts if v is not None and (k == 0 or i >= start)]
            if not pts:
                continue
            x, y = zip(*pts)
            colour, ls = STYLES.get(label.split()[0], (None, "-"))
            ax.plot(x, [100 * v for v in y], color=colour, ls=ls, marker=".", ms=4, label=label)
            ys += [100 * v for i, v in pts if (i, v) not in dips]
        for b in boundaries:
            ax.axvline(b, color="grey", lw=0.8, ls=":")
        for i, v, text in (m for m in marks if k == 0):
            ax.annotate(f"{text}\n{100 * v:.2f}%", (i, 100 * v), textcoords="offset points", xytext=(12, -18),
                        fontsize=8, arrowprops={"arrowstyle": "->", "lw": 0.6})
        if ys:
            low, high = min(ys), max(ys)
            pad = max(0.5, 0.08 * (high - low))
            ax.set_ylim(low - 3 * pad, high + pad)
        pts = [(i, d) for i, d in density if k == 0 or i >= start]
        if pts:
            twin = ax.twinx()
            twin.step(*zip(*pts), where="post", color="tab:purple", lw=1, alpha=0.7)
            twin.set_ylim(0, 1.05)
            twin.set_ylabel("density (DSD arm)", color="tab:purple", fontsize=8)
        ax.set_xlabel("iteration (cumulative)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(axes) > 1:
            ax.set_title("the whole run" if k == 0 else "after the dense phase", fontsize=9)
    axes[-1].legend(loc="lower right", fontsize=8)
    fig.suptitle(title, fontsize=10)
    return save(fig, path, dpi=90)


#: the sensitivity heat map's marks: (label, what the cell's rectangle looks like)
KEEPS = ("top-1 at or above the unpruned net's: this density keeps its accuracy",
         dict(fill=False, edgecolor="tab:green", linewidth=2))
ABOVE = ("density above the layer's current one: nothing pruned, the layer as it is",
         dict(fill=False, edgecolor="gray", linewidth=0, hatch="//"))


def sensitivity_heatmap(path, layers, densities, accuracy, base, above_current=None):
    """Heat map: rows are layers, columns densities, colour the accuracy drop from ``base`` (points), each cell
    labelled with its accuracy; ``accuracy[i][j]`` is layer i pruned to densities[j]. Cells at or above ``base``
    are outlined (:data:`KEEPS`), cells flagged in ``above_current`` (same layout) hatched (:data:`ABOVE`), each
    with a legend line. See :func:`sensitivity_figure`."""
    return save(sensitivity_figure(layers, densities, accuracy, base, above_current), path, dpi=90)


def sensitivity_marks(accuracy, base, above_current=None):
    """{label: boolean grid} of the cells the heat map marks: :data:`KEEPS` (top-1 >= ``base``) and
    :data:`ABOVE` (the ``above_current`` flags; none when not given)."""
    acc = np.asarray(accuracy, float)
    above = np.zeros(acc.shape, bool) if above_current is None else np.asarray(above_current, bool)
    return {KEEPS[0]: acc >= base, ABOVE[0]: above}


def sensitivity_figure(layers, densities, accuracy, base, above_current=None):
    """The Figure of :func:`sensitivity_heatmap` (not written)."""
    from matplotlib.patches import Rectangle  # deferred: heavy, needed only to draw

    acc = 100 * np.asarray(accuracy, float)
    drop = 100 * base - acc
    fig = _figure(figsize=(1.1 * len(densities) + 3.5, 0.32 * len(layers) + 2.4))
    ax = fig.subplots()
    im = ax.imshow(drop, cmap="Reds", aspect="auto", vmin=0, vmax=max(1.0, float(np.nanmax(drop))))
    fig.colorbar(im, ax=ax, label=f"top-1 drop from {100 * base:.2f}% (points)")
    ax.set_xticks(range(len(densities)), [f"{d:g}" for d in densities])
    ax.set_yticks(range(len(layers)), layers, fontsize=8)
    for i in range(len(layers)):
        for j in range(len(densities)):
            ax.text(j, i, f"{acc[i, j]:.1f}", ha="center", va="center", fontsize=7,
                    color="white" if drop[i, j] > 0.6 * im.get_clim()[1] else "black")
    handles = []
    for (label, style), cells in zip((KEEPS, ABOVE), sensitivity_marks(accuracy, base, above_current).values()):
        for i, j in zip(*np.nonzero(cells)):
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, label=label, **style))
        if cells.any():
            handles.append(Rectangle((0, 0), 1, 1, label=label, **style))
    if handles:
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.5 / (0.32 * len(layers) + 1)),
                  fontsize=7, frameon=False)
    ax.set_xlabel("density kept in the one pruned layer")
    ax.set_title("pruning sensitivity: top-1 (%) with one layer pruned", fontsize=10)
    return fig


def confusion(path, cm, names):
    """A row-normalised confusion matrix [true, predicted] with counts in the cells (up to 30 classes)."""
    k = cm.shape[0]
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, float), where=rows > 0)
    size = min(4 + 0.4 * k, 20)
    fig = _figure(figsize=(size, size))
    ax = fig.subplots()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    if k <= 30:
        ax.set_xticks(range(k), names, rotation=90)
        ax.set_yticks(range(k), names)
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    total = cm.sum()
    ax.set_title(f"accuracy {np.trace(cm) / total:.4f} on {total} images" if total else "no images")
    return save(fig, path, dpi=100)
