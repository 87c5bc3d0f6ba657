"""A labelled manifest at a glance: `labels.png`.

`haaqi-jax demo-data` (and the demo build of `python train.py`) writes it beside the manifest:
how the HAAQI labels spread over [0, 1] in each split, and, per distortion type, every clip's
label with the median and quartiles, so that a type whose labels all sit at one end, or an
unseen type far from the seen ones, shows before any training. Works on any manifest rows with
`haaqi_score`; `split` and `distortion` are used when the rows have them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from haaqi_jax.config import is_number

#: File name of the plot in a dataset folder.
PLOT_FILE = "labels.png"
#: Histogram bins over [0, 1].
BINS = 20
#: Vertical spread of one type's dots (fraction of a row), so that equal labels stay visible.
JITTER = 0.28
#: Most distortion rows drawn: a manifest of free-text, per-clip distortion names keeps those
#: with the most clips (a row per name made a figure hundreds of inches high).
MAX_TYPES = 64


def most_common(counts: Mapping[str, int], limit: int = MAX_TYPES) -> list[str]:
    """The `limit` names with the most clips (`counts`: name -> clips), ties by name, in that
    order: which distortion types a plot of at most `limit` of them keeps."""
    return sorted(counts, key=lambda name: (-counts[name], name))[:limit]


def _groups(rows: Sequence[Mapping[str, Any]], key: str) -> dict[str, np.ndarray]:
    """key value (str; "(none)" where a row lacks it) -> (n,) labels, in first-seen order."""
    out: dict[str, list[float]] = {}
    for row in rows:
        out.setdefault(str(row.get(key, "(none)")), []).append(float(row["haaqi_score"]))
    return {k: np.asarray(v, np.float64) for k, v in out.items()}


def label_plot(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, *,
               title: str = "HAAQI labels") -> Path:
    """Draws the label overview of `rows` into `path` (PNG) and returns the path.

    Left: a histogram of the labels over [0, 1] (`BINS` bins, labels outside clipped to the
    end bins) per split, as steps, each split's clip count in the legend. Right, when any row
    names a distortion: one row per distortion type (at most `MAX_TYPES`, those with the most
    clips), sorted by median label (highest at the top), with every clip's label as a dot
    (spread a little in height), a black tick at the median and a bar over the quartiles; a
    type's colour says which splits its clips are in (the demo's unseen types: test_unseen
    alone).

    Raises:
      ValueError: no rows, or a row whose haaqi_score is missing or not finite (named by index).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("label_plot: no rows to plot")
    for i, row in enumerate(rows):
        score = row.get("haaqi_score")
        if not (is_number(score) or isinstance(score, np.floating)) or not np.isfinite(score):
            raise ValueError(f"label_plot: row {i} ({row.get('id', 'no id')}) has haaqi_score "
                             f"{score!r}; expected a finite number")
    by_split = _groups(rows, "split")
    with_types = any("distortion" in row for row in rows)
    by_type = _groups(rows, "distortion") if with_types else {}
    n_types = len(by_type)
    if n_types > MAX_TYPES:
        kept = most_common({k: v.size for k, v in by_type.items()})
        by_type = {k: by_type[k] for k in kept}
    names = sorted(by_type, key=lambda k: (np.median(by_type[k]), k))
    homes: dict[str, set[str]] = {}
    for row in rows:
        homes.setdefault(str(row.get("distortion", "(none)")), set()).add(
            str(row.get("split", "(none)")))
    home = {name: ", ".join(sorted(homes[name])) for name in names}
    home_order = sorted(set(home.values()))
    cmap = plt.get_cmap("tab10")

    height = max(3.5, 1.4 + 0.26 * len(names))
    ncols = 2 if with_types else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5.0 * ncols + 1.5 * with_types, height),
                             dpi=120, squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1.4][:ncols]})
    hist_ax = axes[0, 0]
    edges = np.linspace(0.0, 1.0, BINS + 1)
    for i, (split, labels) in enumerate(sorted(by_split.items())):
        counts, _ = np.histogram(np.clip(labels, 0.0, 1.0), bins=edges)
        hist_ax.stairs(counts, edges, color=cmap(i % cmap.N), lw=1.6,
                       label=f"{split} ({labels.size})", gid=f"hist:{split}")
    hist_ax.set(xlim=(0.0, 1.0), xlabel="HAAQI label", ylabel="clips")
    hist_ax.set_title(f"{title}: {len(rows)} clips, by split", fontsize=9)
    hist_ax.legend(fontsize=7, loc="best")
    hist_ax.grid(axis="y", color="0.9")

    if with_types:
        ax = axes[0, 1]
        for y, name in enumerate(names):
            labels = by_type[name]
            color = cmap(home_order.index(home[name]) % cmap.N)
            # A fixed, even spread (no randomness): the same manifest draws the same figure.
            offsets = (np.linspace(-JITTER, JITTER, labels.size) if labels.size > 1
                       else np.zeros(1))
            ax.scatter(labels, y + offsets, s=9, color=color, alpha=0.55, lw=0,
                       gid=f"labels:{name}")
            q1, median, q3 = np.percentile(labels, [25, 50, 75])
            ax.plot([q1, q3], [y, y], color="0.25", lw=3, alpha=0.5, solid_capstyle="butt",
                    gid=f"quartiles:{name}")
            ax.plot([median], [y], marker="|", markersize=11, mew=2, color="black",
                    gid=f"median:{name}")
        for i, where in enumerate(home_order):
            ax.scatter([], [], s=12, color=cmap(i % cmap.N), label=where)
        ax.set_yticks(range(len(names)), [f"{n} ({by_type[n].size})" for n in names],
                      fontsize=7)
        ax.set(xlim=(-0.02, 1.02), ylim=(-0.6, len(names) - 0.4), xlabel="HAAQI label")
        shown = (f"the {MAX_TYPES} of {n_types} distortions with the most clips"
                 if n_types > MAX_TYPES else "by distortion (clips)")
        ax.set_title(f"{shown}, highest median at the top;\n"
                     "tick: median, bar: quartiles; colour: the splits", fontsize=9)
        ax.grid(axis="x", color="0.9")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
        fig.canvas.draw()
        # Wide enough for the longest type name and the legend beside the rows.
        names_width = max(t.get_window_extent().width for t in ax.get_yticklabels()) / fig.dpi
        legend_width = ax.get_legend().get_window_extent().width / fig.dpi
        fig.set_size_inches(5.0 + 4.5 + names_width + legend_width + 0.6, height)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
