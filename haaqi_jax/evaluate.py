"""`haaqi-jax evaluate`: LCC, SRCC and MSE of a HAAQI-Net on a labelled manifest, with a report.

    haaqi-jax evaluate --model runs/demo/report/best_model --manifest data/manifest.jsonl \
        --out runs/demo/eval --splits test_seen test_unseen --color-by distortion

writes into --out:
  metrics.json      {"overall", "by_split", "by_distortion", "by_hearing_loss",
                    "hearing_loss_left_out", "by_listener_shape"}: lcc, srcc, mse, n each
                    (by_listener_shape: rows that name their audiogram's shape, as the
                    demo's do; empty when none does); overall and each split
                    also ci95: {"lcc", "srcc"} 95 % bootstrap intervals (rows sharing a
                    manifest group, e.g. two ears of a clip, drawn together)
  table.md/.csv     the same numbers as one table (rows: all, split=..., distortion=...,
                    hearing_loss=... mildest first, listener_shape=...); table.md then lists
                    the intervals
  predictions.csv   one line per clip: id, split, distortion, label, prediction, group (the
                    manifest's group, empty when none), pta_db, hearing_loss,
                    listener_shape
  examples.json     a few clips' predictions: the first --num-examples // (number of
                    splits) of each split, at least one, in manifest order
  scatter.png       predicted vs true HAAQI, coloured by split, distortion or hearing_loss
  by_distortion.png mean label and mean prediction of every distortion, sorted by their gap
                    (where a model rates a degradation too close to clean, or too harshly);
                    only when rows name their distortion
  by_hearing_loss.png  per hearing-loss grade, mildest first: boxes of true and predicted
                    HAAQI with their means, and the grade's LCC and SRCC; only when rows have
                    audiograms
Every metrics entry also has label_mean and prediction_mean, and each metric of your own that
--metric NAME names (registered by `haaqi_jax.train.metrics.register_metric` in a module loaded
with `haaqi-jax --import`): its value on the entry's clips, null where it fails or is undefined
(a note on stderr names the metric and the row; n/a in table.md), a column after MSE in the
tables, and a value after MSE on the lines it prints (`summary_lines`).

Hearing loss: each clip's listener is graded by the four-frequency pure-tone average (PTA:
0.5, 1, 2, 4 kHz, dB HL) of the row's audiogram, on the WHO's 2021 grades (normal < 20, mild
< 35, moderate < 50, moderately_severe < 65, severe < 80, profound < 95, complete; see
`haaqi_jax.audiogram.hearing_loss_grade`). by_hearing_loss lists the grades that occur, each
also with pta_db_range [low, high) (None: open); records without an audiogram are left out of
it, counted by hearing_loss_left_out and noted under table.md's table.

The training loop writes the same report for its best checkpoint (`write_report`).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from haaqi_jax.audiogram import (HEARING_LOSS_BOUNDS_DB_HL, HEARING_LOSS_GRADES, PTA_DECIMALS,
                                 hearing_loss_grade, pure_tone_average, standard_levels)
from haaqi_jax.data.manifest import check_label
from haaqi_jax.train import metrics as metrics_lib

RECORD_FIELDS = ("id", "split", "distortion", "label", "prediction", "group", "pta_db",
                 "hearing_loss", "listener_shape")
#: The split name of manifest rows that have none.
UNSPLIT = "unsplit"


def _row_field(row: Any, name: str) -> Any:
    if isinstance(row, Mapping):
        return row.get(name)
    value = getattr(row, name, None)
    if value is None and hasattr(row, "extra") and isinstance(row.extra, Mapping):
        value = row.extra.get(name)
    return value


def _row_id(row: Any, fallback: str) -> str:
    for name in ("id", "file_path", "path"):
        value = _row_field(row, name)
        if value is not None:
            return str(value)
    return fallback


def prediction_records(rows: Sequence[Any], predictions: np.ndarray, split: str
                       ) -> list[dict[str, Any]]:
    """One dict per row (id, split, distortion, label, prediction, group: the row's manifest
    group or None; pta_db, hearing_loss: see below; listener_shape: the row's audiogram shape
    or None); NaN predictions, labels that are not
    numbers in [0, 1] and malformed audiograms are errors naming the row.

    pta_db is the four-frequency pure-tone average (0.5, 1, 2, 4 kHz, dB HL, rounded to
    PTA_DECIMALS) of the row's audiogram and hearing_loss its WHO 2021 grade
    (`hearing_loss_grade`); both None for a row without an audiogram (a dict with none, or
    None), which the report leaves out of its per-grade rows. An audiogram may be 8 levels at
    the standard frequencies (a ManifestRow's) or an Audiogram (or pyclarity's) at any
    frequencies, read at the PTA frequencies linearly in log frequency, end values held
    (`standard_levels`).

    Args:
      rows: manifest rows of `split` (objects or dicts with id/label/distortion/audiogram
        fields).
      predictions: (len(rows),) predicted clip scores in row order.
    """
    predictions = np.asarray(predictions, np.float64)
    if predictions.shape != (len(rows),):
        raise ValueError(f"split {split!r}: {predictions.size} predictions for {len(rows)} rows")
    records = []
    levels, heard = [], []          # (8,) standard levels of the rows that have an audiogram
    for i, (row, pred) in enumerate(zip(rows, predictions)):
        rid = _row_id(row, f"{split}[{i}]")
        if not np.isfinite(pred):
            raise ValueError(f"split {split!r}, row {i} ({rid}): no finite prediction")
        key = "haaqi_score" if _row_field(row, "haaqi_score") is not None else "label"
        label = _row_field(row, key)
        if label is None:
            raise ValueError(f"split {split!r}, row {i} ({rid}): no HAAQI label to evaluate "
                             "against; label the manifest first (haaqi-jax label)")
        try:        # rows given as dicts were not checked by read_manifest
            label = check_label(label, key)
        except ValueError as err:
            raise ValueError(f"split {split!r}, row {i} ({rid}): {err}") from None
        audiogram = _row_field(row, "audiogram")
        if audiogram is not None:
            levels.append(standard_levels(
                audiogram, where=f"split {split!r}, row {i} ({rid}): key 'audiogram'"))
            heard.append(i)
        distortion, group = _row_field(row, "distortion"), _row_field(row, "group")
        shape = _row_field(row, "listener_shape")
        records.append({"id": rid, "split": split,
                        "distortion": "unknown" if distortion is None else str(distortion),
                        "label": float(label), "prediction": float(pred),
                        "group": None if group is None else str(group),
                        "pta_db": None, "hearing_loss": None,
                        "listener_shape": None if shape is None else str(shape)})
    if heard:
        pta_db = pure_tone_average(np.stack(levels))                       # (len(heard),)
        for i, pta, grade in zip(heard, pta_db, hearing_loss_grade(pta_db)):
            # Rounded as it is graded: float32-stored levels' noise (49.999999 for 50) goes.
            records[i].update(pta_db=round(float(pta), PTA_DECIMALS),
                              hearing_loss=HEARING_LOSS_GRADES[grade])
    return records


def hearing_loss_of_records(records: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """(len(records),) str: the WHO 2021 grade of each record's pta_db ("" where it has none).

    The grade is taken afresh from pta_db (`hearing_loss_grade`), so hand-made records need
    only that; a pta_db that is not a finite number is an error naming the record.
    """
    pta_db = np.array([np.nan if r.get("pta_db") is None else r["pta_db"] for r in records],
                      dtype=np.float64)
    heard = np.array([r.get("pta_db") is not None for r in records], dtype=bool)
    bad = np.flatnonzero(heard & ~np.isfinite(pta_db))
    if bad.size:
        raise ValueError(f"record {int(bad[0])} (id {records[bad[0]].get('id')!r}): pta_db "
                         f"{records[bad[0]]['pta_db']!r} is not a finite number")
    grade = np.full(len(records), len(HEARING_LOSS_GRADES))       # past the names: ""
    grade[heard] = hearing_loss_grade(pta_db[heard])
    return np.array(HEARING_LOSS_GRADES + ("",))[grade]


def _pta_range(grade: str) -> list[float | None]:
    """[lowest PTA of the grade, first PTA above it], dB HL; None for an open end."""
    bounds = (None,) + HEARING_LOSS_BOUNDS_DB_HL + (None,)
    k = HEARING_LOSS_GRADES.index(grade)
    return [bounds[k], bounds[k + 1]]


#: Keys of every report entry besides the metrics: a metric of your own may not take them.
ENTRY_KEYS = ("n", "label_mean", "prediction_mean", "ci95", "pta_db_range")


def check_report_metrics(metrics: Any, what: str = "metrics") -> tuple[str, ...]:
    """The metrics a report adds to lcc, srcc and mse: `metrics` (registered names, see
    `haaqi_jax.train.metrics.register_metric`) less the built-ins, which every report has, each
    once, in order. ValueError naming `what` for a name that is not registered (listing those
    that are) or one of ENTRY_KEYS, or for `metrics` that is not a list of names."""
    names = metrics_lib.own_metric_names(metrics, what)
    for name in names:
        if name in ENTRY_KEYS:
            raise ValueError(f"{what}: {name!r} is a key of every report entry; register your "
                             "metric under another name")
        if name not in metrics_lib.available_metrics():
            raise ValueError(f"{what}: {name!r} is not registered (registered: "
                             f"{', '.join(repr(n) for n in metrics_lib.available_metrics())}; "
                             "haaqi_jax.train.metrics.register_metric adds yours, from your "
                             "config file or a module loaded with --import)")
    return names


def _subset_metric(name: str, pred: np.ndarray, true: np.ndarray, subset: str) -> float:
    """`metric_value(name)` of one report subset's clips, (n,) each; NaN, with a note on stderr
    naming the metric and the subset, where it fails or is not finite: a metric undefined on a
    group of one clip must not cost the whole report."""
    where = f"note: metric {name!r} is n/a on {subset} ({_clips(pred.size)})"
    try:
        value = metrics_lib.metric_value(name, pred, true)
    except Exception as err:        # (a bug too: the note names it, the rest is reported)
        print(f"{where}: {type(err).__name__}: {err}", file=sys.stderr)
        return float("nan")
    if not np.isfinite(value):
        print(f"{where}: it returned {'NaN' if np.isnan(value) else value}", file=sys.stderr)
        return float("nan")
    return value


def compute_report_metrics(records: Sequence[Mapping[str, Any]], metrics: Sequence[str] = ()
                           ) -> dict[str, Any]:
    """{"overall": ..., "by_split": {...}, "by_distortion": {...}, "by_hearing_loss": {...},
    "by_listener_shape": {...}} of lcc, srcc, mse, n, label_mean, prediction_mean (and each of
    `metrics`), plus "hearing_loss_left_out".

    `metrics`: registered metrics (`check_report_metrics`) added to every entry under their
    names, computed by `metric_value` on the entry's clips; NaN (a note on stderr) where one
    fails or is not finite.

    by_hearing_loss holds the WHO grades of the records' pure-tone averages that occur, mildest
    first, each also with pta_db_range [low, high) in dB HL (None for an open end);
    hearing_loss_left_out counts the records without an audiogram (pta_db None), which it
    leaves out. by_listener_shape: the records that name their listener's audiogram shape
    (the demo's rows do), by shape; empty when none does.
    """
    metrics = check_report_metrics(metrics)
    if not records:
        raise ValueError("evaluate: no clips to evaluate")
    pred = np.array([r["prediction"] for r in records])
    true = np.array([r["label"] for r in records])
    splits = np.array([r["split"] for r in records])
    distortions = np.array([str(r["distortion"]) for r in records])
    grades = hearing_loss_of_records(records)
    heard = grades != ""
    by_grade = metrics_lib.summarize_by_group(pred[heard], true[heard], grades[heard])
    shapes = np.array([str(r.get("listener_shape") or "") for r in records])
    shaped = shapes != ""
    report = {
        "overall": metrics_lib.summarize(pred, true),
        "by_split": metrics_lib.summarize_by_group(pred, true, splits),
        "by_distortion": metrics_lib.summarize_by_group(pred, true, distortions),
        # Severity order (the table's; metrics.json sorts keys, pta_db_range orders them).
        "by_hearing_loss": {g: {**by_grade[g], "pta_db_range": _pta_range(g)}
                            for g in HEARING_LOSS_GRADES if g in by_grade},
        "hearing_loss_left_out": int((~heard).sum()),
        "by_listener_shape": metrics_lib.summarize_by_group(pred[shaped], true[shaped],
                                                            shapes[shaped]),
    }
    # Means show a bias that correlations hide (a type rated too close to clean as a whole).
    masks = {"split": splits, "distortion": distortions, "hearing_loss": grades,
             "listener_shape": shapes}
    for subset, entry in _table_rows(report):
        kind, _, key = subset.partition("=")          # "all", or e.g. "split=valid"
        mask = np.ones(len(records), bool) if subset == "all" else masks[kind] == key
        entry["label_mean"] = float(true[mask].mean())
        entry["prediction_mean"] = float(pred[mask].mean())
        for name in metrics:
            entry[name] = _subset_metric(name, pred[mask], true[mask], subset)
    # How much of a split's score is the luck of its clips: 95 % bootstrap intervals.
    groups = [r.get("group") for r in records]
    report["overall"]["ci95"] = metrics_lib.bootstrap_intervals(pred, true, groups=groups)
    for split, entry in report["by_split"].items():
        entry["ci95"] = metrics_lib.bootstrap_intervals(pred, true, splits == split,
                                                        groups=groups)
    return report


def _table_rows(report: Mapping[str, Any]) -> list[tuple[str, dict[str, float]]]:
    rows = [("all", report["overall"])]
    rows += [(f"split={k}", v) for k, v in report["by_split"].items()]
    rows += [(f"distortion={k}", v) for k, v in report["by_distortion"].items()]
    rows += [(f"hearing_loss={k}", v) for k, v in report["by_hearing_loss"].items()]
    rows += [(f"listener_shape={k}", v) for k, v in report["by_listener_shape"].items()]
    return rows


def _fmt(x: Any) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.4f}"


#: What the scatter plot can colour its points by.
COLOR_BY = ("split", "distortion", "hearing_loss")
#: The scatter's group of records without an audiogram, under color_by="hearing_loss".
NO_AUDIOGRAM = "no audiogram"


def check_color_by(color_by: str, what: str = "color_by") -> None:
    if color_by not in COLOR_BY:
        raise ValueError(f"{what} must be one of {COLOR_BY}, got {color_by!r}")


#: Marker per round of the palette's colours in `scatter_plot`.
SCATTER_MARKERS = "os^DvP"
#: Legend entries per column beside the scatter (more: another column, the figure widens).
SCATTER_LEGEND_ROWS = 24
#: The scatter's one group for the clips of every group past the most common ones.
OTHER_GROUPS = "(the other types)"
#: Both HAAQI axes of the report's plots: [0, 1] and a margin, so that a clip on 0 or 1 (a
#: clean reference) shows its whole marker.
HAAQI_LIMITS = (-0.025, 1.025)


def _scope(records: Sequence[Mapping[str, Any]], width: int = 80) -> str:
    """"320 clips: valid, test_seen, test_unseen": how many clips a plot pools, and from which
    splits (in the records' order), wrapped to lines of at most `width` characters."""
    import textwrap
    splits = ", ".join(dict.fromkeys(str(r["split"]) for r in records))
    return textwrap.fill(f"{_clips(len(records))}: {splits}", width)


def _group_colors(groups: Sequence[str], color_by: str, cmap: Any) -> list[Any]:
    """One colour per group: the WHO grades on a sequential scale, mildest lightest (they are
    ordered; a qualitative palette hid that), clips without an audiogram grey."""
    if color_by != "hearing_loss":
        return [cmap(i % cmap.N) for i in range(len(groups))]
    import matplotlib
    scale = matplotlib.colormaps["viridis_r"]
    last = len(HEARING_LOSS_GRADES) - 1
    return ["0.6" if g == NO_AUDIOGRAM else scale(0.12 + 0.88 * HEARING_LOSS_GRADES.index(g)
                                                    / last) for g in groups]


def _fit_legend_beside(fig: Any, legend: Any, height: float) -> None:
    """Widens `fig` by what its legend beside the axes takes, then fits the layout: a long or
    many-columned legend ran off the figure, or squeezed the axes to a sliver."""
    fig.canvas.draw()
    fig.set_size_inches(fig.get_size_inches()[0] + legend.get_window_extent().width / fig.dpi,
                        height)
    fig.tight_layout()
    for _ in range(4):          # an equal-aspect axes moves as the figure widens: settle it
        fig.canvas.draw()
        over = (legend.get_window_extent().x1 - fig.bbox.x1) / fig.dpi + 0.1  # inches
        if -0.1 <= over <= 0:
            break
        fig.set_size_inches(fig.get_size_inches()[0] + over, height)
        fig.tight_layout()


def scatter_plot(records: Sequence[Mapping[str, Any]], path: Path, color_by: str = "split"
                 ) -> Path:
    """Predicted vs true HAAQI, one point per clip, one colour per value of `color_by`
    ('split' | 'distortion' | 'hearing_loss': the WHO grades mildest first, then the clips
    without an audiogram); the title names the splits, the clip count, LCC and SRCC. The
    legend (every group, with its clip count) stands beside the axes, in columns of
    SCATTER_LEGEND_ROWS, the figure widened to hold it. Past `data.overview.MAX_TYPES`
    groups, those with the most clips keep their colours and the rest are `OTHER_GROUPS`."""
    import math

    from haaqi_jax.data.overview import MAX_TYPES, most_common

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    check_color_by(color_by)
    if color_by == "hearing_loss":
        grades = hearing_loss_of_records(records)
        records = [{**r, "hearing_loss": g or NO_AUDIOGRAM} for r, g in zip(records, grades)]
        present = {r["hearing_loss"] for r in records}
        groups = [g for g in HEARING_LOSS_GRADES + (NO_AUDIOGRAM,) if g in present]
    else:
        groups = sorted({r[color_by] for r in records})
        if len(groups) > MAX_TYPES:   # per-clip free-text names: a legend many inches wide
            from collections import Counter
            kept = set(most_common(Counter(r[color_by] for r in records), MAX_TYPES - 1))
            records = [r if r[color_by] in kept else {**r, color_by: OTHER_GROUPS}
                       for r in records]
            groups = sorted(kept) + [OTHER_GROUPS]
    many = len(groups) > 10                   # e.g. the demo's 26 distortions
    cmap = plt.get_cmap("tab20" if many else "tab10")
    colors = _group_colors(groups, color_by, cmap)
    fig, ax = plt.subplots(figsize=(5.6, 5.4), dpi=120)
    for i, group in enumerate(groups):
        # Past the palette's colours the marker changes, so no two groups look alike.
        sel = [r for r in records if r[color_by] == group]
        ax.scatter([r["label"] for r in sel], [r["prediction"] for r in sel], s=12, alpha=0.75,
                   color=colors[i],
                   marker=SCATTER_MARKERS[i // cmap.N % len(SCATTER_MARKERS)],
                   label=f"{group} ({len(sel)})")
    ax.plot([0, 1], [0, 1], color="0.5", lw=1, ls="--")         # prediction = label
    pred = np.array([r["prediction"] for r in records])
    true = np.array([r["label"] for r in records])
    summary = metrics_lib.summarize(pred, true)
    ax.set(xlim=HAAQI_LIMITS, ylim=HAAQI_LIMITS, aspect="equal", anchor="W",
           xlabel="true HAAQI (label)", ylabel="predicted HAAQI",
           xticks=np.linspace(0, 1, 6), yticks=np.linspace(0, 1, 6))
    ax.set_title(f"HAAQI-Net predictions, one point per clip\n{_scope(records)}\n"
                 f"LCC {_fmt(summary['lcc'])}, SRCC {_fmt(summary['srcc'])} "
                 "(dashed: prediction = label)", fontsize=9)
    ax.grid(color="0.93")
    # Beside the axes, never over the points (inside, it hid the over-predicted clips of
    # the top-left corner), in as many columns as it needs.
    legend = ax.legend(fontsize=7, title=color_by.replace("_", " "), title_fontsize=8,
                       loc="upper left", bbox_to_anchor=(1.03, 1.0), borderaxespad=0.0,
                       ncol=math.ceil(len(groups) / SCATTER_LEGEND_ROWS))
    _fit_legend_beside(fig, legend, 5.4)
    fig.savefig(path)
    plt.close(fig)
    return path


def distortion_plot(records: Sequence[Mapping[str, Any]], report: Mapping[str, Any], path: Path
                    ) -> Path:
    """Mean label (black ring) and mean prediction (dot coloured by the splits the type's clips
    are in, e.g. "valid, test_seen" or "test_unseen") of every distortion, one row each,
    sorted by prediction - label (rated too close to clean at the top). The title names the
    splits and clip count; the legend stands beside the rows, the figure as wide as the
    longest name needs. At most `data.overview.MAX_TYPES` rows: those with the most clips
    (metrics.json and the tables keep every type)."""
    import textwrap

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from haaqi_jax.data.overview import MAX_TYPES, most_common

    by_type = report["by_distortion"]
    names = most_common({k: entry["n"] for k, entry in by_type.items()})
    names.sort(key=lambda k: by_type[k]["prediction_mean"] - by_type[k]["label_mean"])
    counts: dict[str, dict[str, int]] = {}                  # distortion -> split -> clips
    for r in records:
        per_split = counts.setdefault(str(r["distortion"]), {})
        per_split[r["split"]] = per_split.get(r["split"], 0) + 1
    home = {name: ", ".join(sorted(counts[name])) for name in names}
    splits = sorted(set(home.values()))
    cmap = plt.get_cmap("tab10")
    # At least 3 in high: one or two rows in a 1.5 in figure cut off the title and x label.
    height = max(3.0, 1.6 + 0.28 * len(names))
    fig, ax = plt.subplots(figsize=(6.5, height), dpi=120)
    for y, name in enumerate(names):
        label, pred = by_type[name]["label_mean"], by_type[name]["prediction_mean"]
        color = cmap(splits.index(home[name]) % cmap.N)
        ax.plot([label, pred], [y, y], color=color, lw=2, alpha=0.6)
        ax.scatter([pred], [y], color=color, s=24, zorder=3)
        # A ring over the dot: a label equal to its prediction no longer hides under it.
        ax.scatter([label], [y], facecolors="none", edgecolors="black", s=34, lw=1.1, zorder=4)
    for i, split in enumerate(splits):
        # A type in many splits: its entry wrapped, not one line wider than the figure.
        ax.scatter([], [], color=cmap(i % cmap.N), s=24,
                   label=textwrap.fill(f"prediction ({split})", 34))
    ax.scatter([], [], facecolors="none", edgecolors="black", s=34, lw=1.1,
               label="label (true HAAQI)")
    ax.set_yticks(range(len(names)),
                  [f"{name} ({by_type[name]['n']})" for name in names], fontsize=7)
    ax.set(xlim=HAAQI_LIMITS, ylim=(-0.6, len(names) - 0.4), xlabel="mean HAAQI",
           ylabel="distortion (clips)")
    shown = (f" (the {MAX_TYPES} of {len(by_type)} with the most clips)"
             if len(by_type) > MAX_TYPES else "")
    ax.set_title(f"Mean label vs mean prediction per distortion{shown}\n{_scope(records, 60)}\n"
                 "top: rated too close to clean; bottom: rated too harshly", fontsize=9)
    ax.grid(axis="x", color="0.9")
    # Beside the rows, never over them (at "best" it sat on the top rows' points).
    legend = ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                       borderaxespad=0.0)
    fig.canvas.draw()
    # As wide as the names and the legend need, the data keeping 3.5 in.
    names_width = max(t.get_window_extent().width for t in ax.get_yticklabels()) / fig.dpi
    legend_box = legend.get_window_extent()
    title_box = ax.title.get_window_extent()
    # Wide enough for the title too, and high enough for a legend of many splits.
    fig.set_size_inches(max(3.5 + names_width + 0.8 + legend_box.width / fig.dpi,
                            title_box.width / fig.dpi + 0.4),
                        max(height, (legend_box.height + title_box.height) / fig.dpi + 1.0))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _grade_text(grade: str) -> str:
    return grade.replace("_", " ")


def hearing_loss_plot(records: Sequence[Mapping[str, Any]], report: Mapping[str, Any],
                      path: Path) -> Path:
    """Per WHO grade of hearing loss, mildest on the left: the spread of true and predicted
    HAAQI (boxes, means marked) and the LCC and SRCC of the grade's clips (bars, the pooled
    LCC of all clips as a line). Tick labels give each grade's PTA range and clip count; clips
    without an audiogram are left out, and a footnote counts them (and says what an n/a
    correlation means). The title names the splits and clip count; legends sit in headroom
    above 1, off the boxes and bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    by_grade = report["by_hearing_loss"]
    names = list(by_grade)                                   # severity order
    grades = hearing_loss_of_records(records)
    true = np.array([r["label"] for r in records])
    pred = np.array([r["prediction"] for r in records])
    x = np.arange(len(names))
    label_color, pred_color = "0.55", "tab:blue"

    def ends(k: int) -> str:
        low, high = by_grade[names[k]]["pta_db_range"]
        return f"< {high:g}" if low is None else f">= {low:g}" if high is None else \
            f"{low:g}-{high:g}"

    ticks = [f"{_grade_text(name)}\n{ends(k)} dB HL\nn = {by_grade[name]['n']}"
             for k, name in enumerate(names)]
    fig, (ax_score, ax_corr) = plt.subplots(
        1, 2, figsize=(max(8.0, 3.0 + 1.5 * len(names)), 4.6), dpi=120,
        gridspec_kw={"width_ratios": [3, 2]})
    for values, offset, color in ((true, -0.18, label_color), (pred, 0.18, pred_color)):
        per_grade = [values[grades == name] for name in names]
        boxes = ax_score.boxplot(per_grade, positions=x + offset, widths=0.32,
                                 patch_artist=True, manage_ticks=False,
                                 medianprops={"color": "black"},
                                 flierprops={"markersize": 3, "markeredgecolor": color})
        for box in boxes["boxes"]:
            box.set(facecolor=color, alpha=0.55)
        ax_score.scatter(x + offset, [v.mean() for v in per_grade], marker="D", s=22,
                         color="white", edgecolor="black", zorder=4)
    ax_score.set_xticks(x, ticks, fontsize=7)
    # Headroom above 1 for the legend: at "best" it sat on a box or whisker.
    ax_score.set(ylim=(-0.02, 1.2), yticks=np.linspace(0, 1, 6),
                 ylabel="HAAQI (0 = worst, 1 = best)",
                 xlabel="hearing-loss grade (WHO 2021, PTA of 0.5, 1, 2, 4 kHz)",
                 title="True and predicted HAAQI per grade")
    ax_score.grid(axis="y", color="0.9")
    ax_score.legend(handles=[Patch(facecolor=label_color, alpha=0.55, label="true HAAQI"),
                             Patch(facecolor=pred_color, alpha=0.55, label="predicted"),
                             plt.Line2D([], [], marker="D", ls="", color="white",
                                        markeredgecolor="black", label="mean")],
                    fontsize=7, loc="upper center", ncol=3, framealpha=0.85)

    corr = {name: np.array([by_grade[g][name] for g in names], dtype=np.float64)
            for name in ("lcc", "srcc")}
    for (name, values), offset, color in zip(corr.items(), (-0.18, 0.18),
                                             ("tab:blue", "tab:orange")):
        ax_corr.bar(x + offset, np.nan_to_num(values), width=0.34, color=color,
                    label={"lcc": "LCC (Pearson)", "srcc": "SRCC (Spearman)"}[name])
        for k in np.flatnonzero(~np.isfinite(values)):      # fewer than 3 clips, or constant
            ax_corr.text(x[k] + offset, 0.02, "n/a", ha="center", va="bottom", fontsize=7)
    overall = report["overall"]["lcc"]
    if np.isfinite(overall):
        ax_corr.axhline(overall, color="0.3", lw=1, ls="--",
                        label=f"LCC, all clips ({overall:.2f})")
    finite = np.concatenate(list(corr.values()))
    finite = finite[np.isfinite(finite)]
    ax_corr.axhline(0.0, color="black", lw=0.8)
    ax_corr.set_xticks(x, [_grade_text(n) for n in names], fontsize=7, rotation=30, ha="right")
    low = min(0.0, finite.min() - 0.1) if finite.size else 0.0
    # Headroom above 1 for the legend: in the lower left it covered the first grades' bars.
    ax_corr.set(ylim=(low, 1.0 + 0.3 * (1.0 - low)),
                yticks=[t for t in np.arange(-1.0, 1.01, 0.2) if t >= low - 1e-9],
                ylabel="correlation with true HAAQI", title="Agreement per grade")
    ax_corr.grid(axis="y", color="0.9")
    ax_corr.legend(fontsize=7, loc="upper center", ncol=2, framealpha=0.85)
    fig.suptitle(f"HAAQI-Net per hearing-loss grade; {_scope(records)}", fontsize=9)
    notes = []
    if not all(np.isfinite(v).all() for v in corr.values()):
        notes.append("n/a: fewer than 3 clips, or constant values")
    left_out = report["hearing_loss_left_out"]
    if left_out:
        notes.append(f"{_clips(left_out)} without an audiogram left out")
    if notes:
        fig.text(0.01, 0.01, "; ".join(notes), fontsize=7, color="0.3")
    fig.tight_layout(rect=(0, 0.03 if notes else 0, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path


def _clips(n: int) -> str:
    return f"{n} clip" + ("" if n == 1 else "s")


def write_report(records: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike, *,
                 color_by: str = "split", num_examples: int = 8,
                 metrics: Sequence[str] = ()) -> Path:
    """Writes metrics.json, table.md, table.csv, predictions.csv, examples.json, scatter.png,
    by_distortion.png when rows name their distortion and by_hearing_loss.png when they have
    audiograms.

    Args:
      metrics: registered metrics of your own for every entry of metrics.json and a column
        each in the tables, after MSE (`compute_report_metrics`); an unknown name is an error
        before anything is written.
    Returns:
      out_dir.
    """
    metrics = check_report_metrics(metrics)
    return _write_report(records, compute_report_metrics(records, metrics), out_dir,
                         color_by=color_by, num_examples=num_examples, metrics=metrics)


def _write_report(records: Sequence[Mapping[str, Any]], report: Mapping[str, Any],
                  out_dir: str | os.PathLike, *, color_by: str, num_examples: int,
                  metrics: Sequence[str]) -> Path:
    """`write_report` of the records' `compute_report_metrics(records, metrics)`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The files name each clip's grade as the report counts it: from pta_db, so a hand-made
    # record with only pta_db (or a stale grade) reads as its hearing_loss row does.
    records = [{**r, "hearing_loss": grade or None}
               for r, grade in zip(records, hearing_loss_of_records(records))]
    (out_dir / "metrics.json").write_text(
        json.dumps(metrics_lib.json_safe(report), indent=2, sort_keys=True) + "\n")

    table = _table_rows(report)
    md = ["| subset | n | LCC | SRCC | MSE | "
          + "".join(f"{k} | " for k in metrics) + "mean label | mean prediction |",
          "|---|---|---|---|---|---|---|" + "---|" * len(metrics)]
    md += [f"| {name} | {m['n']} | {_fmt(m['lcc'])} | {_fmt(m['srcc'])} | {_fmt(m['mse'])} | "
           + "".join(f"{_fmt(m[k])} | " for k in metrics)
           + f"{_fmt(m['label_mean'])} | {_fmt(m['prediction_mean'])} |" for name, m in table]
    left_out = report["hearing_loss_left_out"]
    if left_out:
        md += ["", f"{_clips(left_out)} without an audiogram "
               f"{'is' if left_out == 1 else 'are'} left out of the hearing_loss rows."]
    grouped = any(r.get("group") is not None for r in records)
    md += ["", "95 % bootstrap intervals (1000 resamples of the clips"
           + ("; rows of one manifest group drawn together" if grouped else "") + "):", ""]
    md += [f"- {name}: LCC [{_fmt(m['ci95']['lcc'][0])}, {_fmt(m['ci95']['lcc'][1])}], SRCC "
           f"[{_fmt(m['ci95']['srcc'][0])}, {_fmt(m['ci95']['srcc'][1])}]"
           for name, m in table if "ci95" in m]
    (out_dir / "table.md").write_text("\n".join(md) + "\n")
    with (out_dir / "table.csv").open("w", newline="") as f:
        w = csv.writer(f)
        columns = ["lcc", "srcc", "mse", *metrics, "label_mean", "prediction_mean"]
        w.writerow(["subset", "n", *columns])
        for name, m in table:
            w.writerow([name, m["n"], *metrics_lib.json_safe([m[k] for k in columns])])
    with (out_dir / "predictions.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RECORD_FIELDS)
        w.writeheader()
        for r in records:
            w.writerow({k: r.get(k) for k in RECORD_FIELDS})
    # A few clips from every split, in manifest order.
    per_split = max(1, num_examples // max(1, len(report["by_split"])))
    examples, seen = [], {}
    for r in records:
        if seen.get(r["split"], 0) < per_split:
            seen[r["split"]] = seen.get(r["split"], 0) + 1
            examples.append({k: r.get(k) for k in RECORD_FIELDS})
    (out_dir / "examples.json").write_text(json.dumps(examples, indent=2) + "\n")
    scatter_plot(records, out_dir / "scatter.png", color_by=color_by)
    if {r["distortion"] for r in records} - {None, "unknown"}:  # rows that name none: no plot
        distortion_plot(records, report, out_dir / "by_distortion.png")
    else:   # nor an earlier run's into the same folder, read as this one's
        (out_dir / "by_distortion.png").unlink(missing_ok=True)
    if report["by_hearing_loss"]:
        hearing_loss_plot(records, report, out_dir / "by_hearing_loss.png")
    else:
        (out_dir / "by_hearing_loss.png").unlink(missing_ok=True)
    return out_dir


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from haaqi_jax.cli import add_dtype_argument, positive_int
    parser.add_argument("--model", required=True,
                        help="HAAQI-Net directory (e.g. a run's report/best_model)")
    parser.add_argument("--manifest", required=True, help="labelled manifest.jsonl")
    parser.add_argument("--out", required=True, help="folder for the report")
    parser.add_argument("--splits", nargs="*", default=None,
                        help="splits to evaluate (default: every split in the manifest)")
    parser.add_argument("--batch-size", type=positive_int, default=8,
                        help="clips per forward pass (default 8)")
    parser.add_argument("--color-by", choices=COLOR_BY, default="split",
                        help="what colours the scatter plot's points (default split)")
    parser.add_argument("--num-examples", type=positive_int, default=8,
                        help="clips listed in examples.json, at most: the first N // "
                             "(number of splits) of each split (default 8)")
    parser.add_argument("--metric", dest="metrics", action="append", default=[],
                        metavar="NAME", help="a metric of your own (register_metric, in a "
                        "module loaded with haaqi-jax --import) for every row of the report "
                        "(repeatable)")
    add_dtype_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


#: `evaluate_manifest` reads and scores this many batches of clips at a time.
EVAL_CHUNK_BATCHES = 16
#: In the report folder while `evaluate_manifest` scores: each scored clip, for a rerun to
#: resume from (`predict.ScoreJournal`).
SCORES_JOURNAL = "scores.partial.jsonl"


def evaluate_manifest(model_dir: str | os.PathLike, manifest: str | os.PathLike,
                      out_dir: str | os.PathLike, *, splits: Sequence[str] | None = None,
                      batch_size: int = 8, color_by: str = "split", num_examples: int = 8,
                      progress: bool = True, metrics: Sequence[str] = (),
                      dtype: str = "float32") -> dict[str, Any]:
    """Predicts every (selected) row of a labelled manifest and writes the report (with your
    registered `metrics` too, see `write_report`); `dtype` is the compute dtype of the model
    ("float32" or "bfloat16", `HAAQINet.load`).

    Bad rows (malformed, a missing, corrupt, NaN, silent or too short file) are reported and
    skipped, as `haaqi-jax predict` skips bad files: metrics["skipped"] lists them
    ({"line" or "id", "reason"}), and the report covers the others. Rows without a split are
    scored as split "unsplit". While it scores, out_dir/`SCORES_JOURNAL` records each scored
    clip (`predict.ScoreJournal`): run again after an interruption or a kill, it scores only
    the rest; the journal is deleted once the report is written.

    Returns:
      the metrics dict written to metrics.json, plus "skipped".
    """
    from haaqi_jax.data.manifest import read_manifest
    from haaqi_jax.model import HAAQINet, compute_dtype
    from haaqi_jax.predict import Job, ScoreJournal, model_id, score_jobs

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    compute_dtype(dtype, "evaluate_manifest: dtype")           # before the manifest is read
    metrics = check_report_metrics(metrics)
    rows = read_manifest(manifest, require_label=True, check_files=True, on_error="skip",
                         progress=progress)
    skipped = [{"line": line, "id": row_id, "reason": reason}
               for (line, reason), row_id in zip(rows.skipped, rows.skipped_ids)]
    split_of = {id(r): UNSPLIT if r.split is None else r.split for r in rows}
    available = sorted(set(split_of.values()))
    if not splits and "train" in available and len(available) > 1:
        print(f"note: scoring every split of {manifest}, train included, so 'all' and the "
              f"per-distortion table pool them; --splits names the ones to score (a run's "
              f"report/manifest.jsonl: --splits {' '.join(s for s in available if s != 'train')})",
              file=sys.stderr)
    splits = available if not splits else list(splits)
    missing = [s for s in splits if s not in available]
    if missing:
        raise ValueError(f"{manifest}: no rows in split(s) {missing} (have {available})")
    net = HAAQINet.load(model_dir, dtype=dtype)
    # A killed or interrupted evaluation resumes: the same command scores only the rest.
    journal = ScoreJournal(Path(out_dir) / SCORES_JOURNAL, model_id(net, dtype))
    records = []
    # Clips are read and scored EVAL_CHUNK_BATCHES batches at a time, shortest first
    # (`haaqi-jax predict`'s loader and checks): host memory stays bounded on a large set, and
    # each chunk's length buckets fill whole batches.
    for split in splits:
        split_rows = [r for r in rows if split_of[id(r)] == split]
        jobs = [Job(Path(r.file_path), str(r.file_path), np.asarray(r.audiogram, np.float64),
                    channel=r.channel) for r in split_rows]
        score_jobs(net, jobs, batch_size=batch_size, progress=progress,
                   chunk_size=EVAL_CHUNK_BATCHES * batch_size, desc=f"HAAQI-Net {split}",
                   print_errors=False, journal=journal)
        skipped += [{"id": r.id, "reason": job.error} for r, job in zip(split_rows, jobs)
                    if job.score is None]
        scored = [(r, job.score) for r, job in zip(split_rows, jobs) if job.score is not None]
        if scored:
            records += prediction_records([r for r, _ in scored],
                                          np.asarray([score for _, score in scored]), split)
    for item in skipped:
        where = f"line {item['line']}" if "line" in item else f"id {item['id']!r}"
        print(f"skipped {where}: {item['reason']}", file=sys.stderr)
    if not records:
        raise ValueError(f"{manifest}: no row could be evaluated ({len(skipped)} skipped)")
    report = compute_report_metrics(records, metrics)     # (once: its notes printed once)
    _write_report(records, report, out_dir, color_by=color_by, num_examples=num_examples,
                  metrics=metrics)
    if skipped:
        (Path(out_dir) / "skipped.json").write_text(json.dumps(skipped, indent=1) + "\n")
    else:   # an earlier run's list would read as this run's
        (Path(out_dir) / "skipped.json").unlink(missing_ok=True)
    journal.path.unlink(missing_ok=True)              # the report holds every score now
    return {**report, "skipped": skipped}


def summary_lines(report: Mapping[str, Any], metrics: Sequence[str] = ()) -> list[str]:
    """The console summary of a `compute_report_metrics` report: "all", then each split
    (sorted; none when there is one, it would repeat "all"), with n, LCC, SRCC, MSE and then
    each of `metrics` (names of entry keys) by name; n/a where a value is null or NaN."""
    # One line per split: a pooled figure would mix, e.g., a run's train rows with its tests.
    entries = [("all", report["overall"])] + sorted(report["by_split"].items())
    if len(entries) == 2:
        entries = entries[:1]
    return [f"{name:<14}{entry['n']:>6} clips: LCC {_fmt(entry['lcc'])}  SRCC "
            f"{_fmt(entry['srcc'])}  MSE {_fmt(entry['mse'])}"
            + "".join(f"  {k} {_fmt(entry[k])}" for k in metrics) for name, entry in entries]


def run(args: argparse.Namespace) -> int:
    from haaqi_jax.cli import writable_folder
    from haaqi_jax.model import compute_dtype
    metrics = check_report_metrics(args.metrics, "--metric")    # (after --import)
    compute_dtype(args.dtype, "--dtype")                      # before anything is written
    writable_folder(args.out, "--out")                       # before the model runs
    report = evaluate_manifest(args.model, args.manifest, args.out, splits=args.splits,
                               batch_size=args.batch_size, color_by=args.color_by,
                               num_examples=args.num_examples, progress=not args.no_progress,
                               metrics=metrics, dtype=args.dtype)
    for line in summary_lines(report, metrics):
        print(line)
    print(f"report in {args.out}"
          + (f" ({len(report['skipped'])} rows skipped: skipped.json)" if report["skipped"]
             else ""))
    return 1 if report["skipped"] else 0
