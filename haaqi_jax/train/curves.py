"""Learning curves of a run from its metrics.jsonl: what a person checks first after training
(did the loss fall, when did validation peak, did a distillation term stall).

`learning_curves(metrics_file, out_png)` draws, against the step:
  loss          the training loss (thin: every log; thick: a trailing mean over up to 5
                logs) and the validation loss (dots), log scale, the early-stopping best
                step marked; in a distillation both are the HAAQI loss (what its validation
                measures);
  validation    LCC and SRCC on the validation split per epoch;
  distillation  (distillation runs only) the total loss, the HAAQI term and each layer's
                distillation term (`loss`, `haaqi_loss`, `distill_0`, ... of the train
                records).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

#: Train-record keys of a distillation run drawn in the third panel: the HAAQI term, then
#: "distill_<k>" per target layer.
HAAQI_TERM = "haaqi_loss"
DISTILL_PREFIX = "distill_"


def read_series(metrics_file: str | os.PathLike) -> dict[str, Any]:
    """The curves of a metrics.jsonl.

    Returns:
      {"train": {key: (steps (n,), values (n,))} for "loss" and the distillation terms,
       "valid": {key: (steps, values)} for "loss", "lcc", "srcc",
       "best_step": the last validation marked best, or None}. A step logged twice (a rerun
      that appended) counts once, its last record; null values (NaN) are left out.
    Raises:
      ValueError naming the file and line of a record that is not JSON.
    """
    path = Path(metrics_file)
    records: dict[tuple[str, int], dict] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number}: not JSON ({err.msg})") from None
        if record.get("kind") in ("train", "valid") and "step" in record:
            records[(record["kind"], int(record["step"]))] = record
    ordered = sorted(records.items(), key=lambda item: item[0][1])

    def series(kind: str, key: str) -> tuple[np.ndarray, np.ndarray]:
        points = [(step, float(r[key])) for (k, step), r in ordered
                  if k == kind and isinstance(r.get(key), (int, float))
                  and math.isfinite(r[key])]
        steps, values = zip(*points) if points else ((), ())
        return np.asarray(steps, np.int64), np.asarray(values, np.float64)

    train_keys = {key for (kind, _), r in ordered if kind == "train" for key in r}
    terms = sorted((k for k in train_keys if k.startswith(DISTILL_PREFIX)
                    and k[len(DISTILL_PREFIX):].isdigit()), key=lambda k: int(k.split("_")[1]))
    if terms and HAAQI_TERM in train_keys:
        terms = [HAAQI_TERM] + terms
    best = [step for (kind, step), r in ordered if kind == "valid" and r.get("best")]
    return {"train": {key: series("train", key) for key in ["loss"] + terms},
            "valid": {key: series("valid", key) for key in ("loss", "lcc", "srcc")},
            "best_step": best[-1] if best else None}


def _running_mean(values: np.ndarray, width: int = 5) -> np.ndarray:
    """Trailing mean over up to `width` logs, one per log: (N,) -> (N,) (the first width - 1
    average the logs so far)."""
    sums = np.cumsum(np.concatenate([[0.0], values]))
    ends = np.arange(1, values.size + 1)
    counts = np.minimum(ends, width)
    return (sums[ends] - sums[ends - counts]) / counts


def _label_short_log_axis(ax: Any, values: np.ndarray) -> None:
    """Plain numbers on every tick of a log axis spanning under a decade, where matplotlib
    labels a power of ten or two at most (0.07 to 0.17: "10^-1" alone)."""
    from matplotlib import ticker

    values = values[np.isfinite(values) & (values > 0)]
    if values.size and values.max() / values.min() < 10:
        plain = ticker.FuncFormatter(lambda v, _: f"{v:.3g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)


def learning_curves(metrics_file: str | os.PathLike, out_png: str | os.PathLike,
                    title: str | None = None) -> Path:
    """Draws the curves of `read_series` into `out_png` (see the module docstring)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = read_series(metrics_file)
    train, valid, best = data["train"], data["valid"], data["best_step"]
    terms = [k for k in train if k != "loss"]
    # A distillation validates on the HAAQI loss alone: the loss panel sets the train HAAQI
    # term beside it, and the total (HAAQI + distillation terms) joins the terms' panel.
    distilling = HAAQI_TERM in train
    shown = HAAQI_TERM if distilling else "loss"
    if distilling:
        terms = ["loss"] + terms
    fig, axes = plt.subplots(1, 3 if terms else 2, figsize=(12 if terms else 8.5, 3.6), dpi=120,
                             sharex=True)        # one step range: the best-step lines align
    loss_ax, corr_ax = axes[0], axes[1]
    steps, values = train[shown]
    if steps.size:
        loss_ax.plot(steps, values, color="tab:blue", lw=0.6, alpha=0.4)
        loss_ax.plot(steps, _running_mean(values), color="tab:blue", lw=1.6, label="train")
    steps, values = valid["loss"]
    if steps.size:
        loss_ax.plot(steps, values, "o-", color="tab:orange", ms=3, lw=1, label="validation")
    if (train[shown][1] > 0).all() and (valid["loss"][1] > 0).all():
        loss_ax.set_yscale("log")
        _label_short_log_axis(loss_ax, np.concatenate([train[shown][1], valid["loss"][1]]))
    loss_ax.set(xlabel="step", ylabel="loss", title="HAAQI loss" if distilling else "loss")
    for key, color in (("lcc", "tab:green"), ("srcc", "tab:purple")):
        steps, values = valid[key]
        if steps.size:
            corr_ax.plot(steps, values, "o-", color=color, ms=3, lw=1, label=key.upper())
    corr_ax.set(xlabel="step", ylabel="correlation", title="validation")
    if terms:
        term_ax = axes[2]
        cmap = plt.get_cmap("tab10")
        for i, key in enumerate(terms):
            steps, values = train[key]
            if steps.size:
                term_ax.plot(steps, _running_mean(values), color=cmap(i % cmap.N), lw=1.4,
                             label="total loss" if key == "loss" else key)
        term_ax.set(xlabel="step", ylabel="term (running mean)", title="distillation terms")
    for ax in axes:
        if best is not None:
            # Named in the loss panel's legend: a note on the line sat under the legend.
            ax.axvline(best, color="0.5", ls="--", lw=1,
                       label=f"best step {best}" if ax is loss_ax else None)
        ax.grid(color="0.92")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(f"{title}: learning curves", fontsize=10)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
