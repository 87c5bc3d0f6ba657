"""Early stopping and the best step: the record the training loop keeps, checkpoints and
resumes, following `train.monitor` (the validation loss by default, LCC, SRCC, MSE or a
registered metric).

    early = new_record("lcc")
    improved = update(early, valid_loss, step, value=lcc, min_delta=0.0, patience=5)
    early["stopped"], early["best_step"], early["best_value"]
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from haaqi_jax.train import metrics


def new_record(monitor: str = metrics.LOSS) -> dict[str, Any]:
    """A fresh early-stopping record following `monitor` (train.monitor), as the loop keeps
    and checkpoints it: {"monitor", "best_value": the monitored value of the best step (None
    before the first epoch, and while it is undefined), "best_valid_loss": that step's valid
    loss, "best_step", "bad_epochs", "stopped"}."""
    return {"monitor": monitor, "best_value": None, "best_valid_loss": None, "best_step": None,
            "bad_epochs": 0, "stopped": False}


def with_monitor(record: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of an early-stopping record; one written before train.monitor existed (no
    "monitor", no "best_value") followed the valid loss, and says so."""
    return {"monitor": metrics.LOSS, "best_value": record["best_valid_loss"], **record}


def resumed_record(record: Mapping[str, Any], monitor: str) -> dict[str, Any]:
    """The early-stopping record of a checkpoint, to go on with under train.monitor=`monitor`.

    A record written before train.monitor existed has no "monitor" and "best_value": it
    followed the valid loss. A run whose checkpoints followed another quantity is not resumed
    under this one (their best step and patience count were chosen by the other).

    Raises:
      ValueError naming both monitors.
    """
    early = with_monitor(record)
    if early["monitor"] != monitor:
        raise ValueError(f"its checkpoints followed train.monitor={early['monitor']!r} (their "
                         f"best step and patience count), this config has train.monitor="
                         f"{monitor!r}: set it back to {early['monitor']!r}, or pass another "
                         f"--workdir to start over")
    return early


def update(early: dict[str, Any], valid_loss: float, step: int, *, min_delta: float,
           patience: int, value: float | None = None) -> bool:
    """Records one epoch's validation in `early` (in place) and says whether it improved.

    The quantity followed is `early["monitor"]` (train.monitor; "loss" for a record without
    one): `value`, or the valid loss for "loss". An epoch improves when its value beats the
    best so far by more than `min_delta` (in that quantity's units: below it for "loss",
    "mse" and other lower-is-better metrics, above it for "lcc", "srcc" and other
    higher-is-better ones); the first epoch always does, so that a best step exists. A value
    that is not finite (NaN: an LCC or SRCC of constant predictions) never improves on an
    earlier epoch; when the best so far is not finite (a first epoch of NaN, recorded as
    best_value None) any finite value improves on it, whatever `min_delta`. The best step is
    that epoch's last step. After `patience` epochs in a row without improvement
    (patience > 0) `early["stopped"]` turns True.

    Args:
      early: `new_record(monitor)`, as the loop keeps (and checkpoints) it.
    """
    early.update(with_monitor(early))
    monitor = early["monitor"]
    if value is None:
        if monitor != metrics.LOSS:
            raise ValueError(f"early_stopping.update: the value of the monitored {monitor!r} "
                             "is missing (value=...)")
        value = valid_loss
    value = float(value)
    finite = bool(np.isfinite(value))
    best = early["best_value"]
    if early["best_step"] is None:
        improved = True
    elif not finite:
        improved = False
    elif best is None or not np.isfinite(best):
        improved = True
    elif metrics.higher_is_better(monitor):
        improved = value > best + min_delta
    else:
        improved = value < best - min_delta
    if improved:
        early.update(best_value=value if finite else None, best_valid_loss=valid_loss,
                     best_step=step, bad_epochs=0)
    else:
        early["bad_epochs"] += 1
    if patience > 0 and early["bad_epochs"] >= patience:
        early["stopped"] = True
    return improved
