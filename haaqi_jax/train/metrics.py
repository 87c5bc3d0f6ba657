"""Evaluation metrics of HAAQI-Net: Pearson LCC, Spearman SRCC and MSE of clip scores.

Pure numpy functions on host arrays (jax arrays are accepted and copied to host). Every function
takes optional per-item weights: items with weight 0 (filler items of a padded last batch) are
ignored, other weights scale each item's contribution. With 0/1 weights the results equal
scipy.stats.pearsonr / spearmanr / a plain MSE on the kept items.

A correlation is undefined for fewer than 2 items or a constant input; it is then NaN (the JSON
writers turn NaN into null). Non-finite inputs are an error.

Validation metrics by name: a small registry (`register_metric`) with "lcc", "srcc" (higher is
better) and "mse" (lower is better) built in. `train.monitor` names one of them, or "loss", as
the quantity that early stopping and the best checkpoint follow. Your own, registered from
your own code (a config file, or a module beside it that the config imports, as for a loss:
README "Register your own loss"), then chosen with `--set train.monitor=max_error`; its value
is logged in the validation rows of metrics.jsonl under its name:

    import numpy as np
    from haaqi_jax.train.metrics import register_metric

    @register_metric("max_error", higher_is_better=False)
    def max_error(pred, true, weight):
        return float(np.max(np.abs(pred - true)))
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np


def _prepare(pred: Any, true: Any, weight: Any | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pred = np.asarray(pred, dtype=np.float64).reshape(-1)
    true = np.asarray(true, dtype=np.float64).reshape(-1)
    if pred.shape != true.shape:
        raise ValueError(f"metrics: {pred.size} predictions but {true.size} targets")
    if weight is None:
        weight = np.ones_like(pred)
    weight = np.asarray(weight, dtype=np.float64).reshape(-1)
    if weight.shape != pred.shape:
        raise ValueError(f"metrics: {weight.size} weights for {pred.size} items")
    if np.any(weight < 0) or not np.all(np.isfinite(weight)):
        raise ValueError("metrics: weights must be finite and >= 0")
    keep = weight > 0
    pred, true, weight = pred[keep], true[keep], weight[keep]
    for name, x in (("predictions", pred), ("targets", true)):
        bad = np.flatnonzero(~np.isfinite(x))
        if bad.size:
            raise ValueError(f"metrics: {name} hold non-finite values (first at kept item "
                             f"{int(bad[0])})")
    return pred, true, weight


def _weighted_pearson(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    # A constant input is tested exactly: its deviations from a rounded weighted mean are
    # ~1e-17, not 0, and would give a meaningless correlation of about 0.
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    w = w / w.sum()
    dx = x - np.sum(w * x)
    dy = y - np.sum(w * y)
    sxx, syy = np.sum(w * dx * dx), np.sum(w * dy * dy)
    if sxx <= 0 or syy <= 0:
        return float("nan")
    r = np.sum(w * dx * dy) / np.sqrt(sxx * syy)
    return float(np.clip(r, -1.0, 1.0))


def average_ranks(x: Any) -> np.ndarray:
    """Ranks 1..n along the last axis with ties given their average rank (scipy.stats.rankdata's
    'average', axis=-1); a scalar or 1-D input is ranked as one flat vector."""
    x = np.asarray(x)
    if x.ndim <= 1:
        x = x.reshape(-1)
    order = np.argsort(x, axis=-1, kind="mergesort")
    sorted_x = np.take_along_axis(x, order, axis=-1)
    n = x.shape[-1]
    pos = np.broadcast_to(np.arange(n), x.shape)
    # Each sorted position's run of equal values: its first and last position.
    tie = sorted_x[..., 1:] == sorted_x[..., :-1]
    first = np.concatenate([np.ones(x.shape[:-1] + (1,), bool), ~tie], axis=-1)
    last = np.concatenate([~tie, np.ones(x.shape[:-1] + (1,), bool)], axis=-1)
    start = np.maximum.accumulate(np.where(first, pos, 0), axis=-1)
    end = np.flip(np.minimum.accumulate(np.flip(np.where(last, pos, n), -1), axis=-1), -1)
    ranks = np.empty(x.shape, dtype=np.float64)
    np.put_along_axis(ranks, order, (start + end) / 2.0 + 1, axis=-1)
    return ranks


def _srcc(pred: np.ndarray, true: np.ndarray, weight: np.ndarray) -> float:
    return _weighted_pearson(average_ranks(pred), average_ranks(true), weight)


def _mse(pred: np.ndarray, true: np.ndarray, weight: np.ndarray) -> float:
    return float(np.sum(weight * (pred - true) ** 2) / np.sum(weight)) if pred.size \
        else float("nan")


def pearson_lcc(pred: Any, true: Any, weight: Any | None = None) -> float:
    """(Weighted) Pearson linear correlation coefficient of predictions and targets."""
    return _weighted_pearson(*_prepare(pred, true, weight))


def spearman_srcc(pred: Any, true: Any, weight: Any | None = None) -> float:
    """(Weighted) Spearman rank correlation: Pearson of the average ranks of the kept items."""
    return _srcc(*_prepare(pred, true, weight))


def mse(pred: Any, true: Any, weight: Any | None = None) -> float:
    """(Weighted) mean squared error; NaN when no item is kept."""
    return _mse(*_prepare(pred, true, weight))


#: Fewest clips whose correlation is reported.
MIN_CORRELATION_ITEMS = 3


def summarize(pred: Any, true: Any, weight: Any | None = None) -> dict[str, float]:
    """{"lcc", "srcc", "mse", "n"} of one set of clips; unlike `pearson_lcc` and
    `spearman_srcc`, the correlations are NaN below MIN_CORRELATION_ITEMS clips (two points
    always correlate by +-1)."""
    kept = _prepare(pred, true, weight)
    return {"lcc": _reported_lcc(*kept), "srcc": _reported_srcc(*kept), "mse": _mse(*kept),
            "n": int(kept[0].size)}


def _reported_lcc(pred: np.ndarray, true: np.ndarray, weight: np.ndarray) -> float:
    return float("nan") if pred.size < MIN_CORRELATION_ITEMS else _weighted_pearson(pred, true,
                                                                                    weight)


def _reported_srcc(pred: np.ndarray, true: np.ndarray, weight: np.ndarray) -> float:
    return float("nan") if pred.size < MIN_CORRELATION_ITEMS else _srcc(pred, true, weight)


# ----------------------------------------------------------------------------- registry

#: fn(pred, true, weight) -> float, on the kept items: (n,) float64 arrays, weights > 0,
#: predictions and targets finite. NaN when the metric is undefined (e.g. a constant input).
#: Deterministic: every process of a multi-host run computes it on the same clips, and their
#: early-stopping decisions must agree.
MetricFn = Callable[[np.ndarray, np.ndarray, np.ndarray], float]

_METRICS: dict[str, tuple[MetricFn, bool]] = {}
#: What train.monitor may name besides the registered metrics: the validation loss.
LOSS = "loss"
#: Keys of metrics.jsonl's validation rows that a metric may not take as its name.
RESERVED_NAMES = (LOSS, "step", "epoch", "kind", "best", "n")
#: The metrics every validation row logs (from `summarize`, whatever train.monitor names):
#: registered below, never over.
BUILTIN_METRICS = ("lcc", "srcc", "mse")


def own_metric_names(metrics: Any, what: str = "metrics") -> tuple[str, ...]:
    """The metrics of your own among `metrics`, a list of names: each once, in order, the
    built-ins left out (every report and comparison has them). Not checked against the
    registry (`compare` reads reports without it). ValueError naming `what` when `metrics` is
    not a list of names (a bare string would be read letter by letter)."""
    if isinstance(metrics, (str, bytes)) or not isinstance(metrics, Sequence) or not all(
            isinstance(m, str) for m in metrics):
        raise ValueError(f"{what} must be a list of metric names, got {metrics!r}")
    return tuple(m for m in dict.fromkeys(metrics) if m not in BUILTIN_METRICS)


def register_metric(name: str, fn: MetricFn | None = None, higher_is_better: bool | None = None,
                    *, overwrite: bool = False) -> Any:
    """Adds a validation metric under `name` (an existing name needs overwrite; the built-in
    lcc, srcc and mse cannot be replaced): called with fn, `register_metric("max_error", fn,
    higher_is_better=False)`, or as a decorator, `@register_metric("max_error",
    higher_is_better=False)`.

    Args:
      fn: (pred, true, weight) -> float, see `MetricFn`.
      higher_is_better: True for a score (as LCC), False for an error (as MSE); required.
    Returns:
      fn, or the decorator that registers and returns it.
    """
    if not isinstance(name, str):       # bare @register_metric hands over the function
        raise TypeError(f"register_metric takes the metric's name first: write "
                        f"register_metric(\"my_metric\", fn, higher_is_better=...), got "
                        f"{name!r}")
    if not name:
        raise ValueError("register_metric needs a non-empty name")
    if name in RESERVED_NAMES:
        raise ValueError(f"register_metric: {name!r} is a name of the validation rows "
                         f"({', '.join(RESERVED_NAMES)}); pick another")
    if name in BUILTIN_METRICS and name in _METRICS:
        raise ValueError(f"register_metric: {name!r} is built in (every validation row logs "
                         f"it, as summarize computes it); register yours under another name")
    if not isinstance(higher_is_better, bool):
        raise TypeError(f"register_metric({name!r}): say whether a larger value is better, "
                        f"higher_is_better=True or False (got {higher_is_better!r})")

    def decorator(fn: MetricFn) -> MetricFn:
        from haaqi_jax.config import definition_site
        if not callable(fn):
            raise TypeError(f"register_metric({name!r}): {fn!r} is not callable")
        old = _METRICS.get(name)
        # As register_loss: the same definition run again (a config file loaded twice)
        # replaces itself; another function under a taken name needs overwrite.
        if old is not None and not overwrite and definition_site(old[0]) != definition_site(fn):
            raise ValueError(f"metric {name!r} is already registered by "
                             f"{old[0].__module__}.{getattr(old[0], '__qualname__', old[0])} "
                             f"(pass overwrite=True)")
        _METRICS[name] = (fn, higher_is_better)
        return fn
    return decorator if fn is None else decorator(fn)


def unregister_metric(name: str) -> None:
    """Removes metric `name` from the registry (no error when it is not there)."""
    _METRICS.pop(name, None)


def available_metrics() -> list[str]:
    """Names of the registered metrics."""
    return sorted(_METRICS)


def _known(name: str) -> tuple[MetricFn, bool]:
    if name not in _METRICS:
        raise ValueError(f"unknown metric {name!r}; registered: {available_metrics()}")
    return _METRICS[name]


def higher_is_better(name: str) -> bool:
    """Whether a larger value of `name` (a registered metric, or "loss") is better."""
    return False if name == LOSS else _known(name)[1]


def check_monitor(name: Any, where: str = "train.monitor") -> str:
    """`name` when it is "loss" or a registered metric; else ValueError naming `where` and the
    choices."""
    if not isinstance(name, str) or (name != LOSS and name not in _METRICS):
        raise ValueError(f"{where} must be {LOSS!r} or a registered metric "
                         f"({', '.join(repr(n) for n in available_metrics())}; "
                         "haaqi_jax.train.metrics.register_metric adds yours, from your config "
                         f"file or a module loaded with --import), got {name!r}")
    return name


def metric_value(name: str, pred: Any, true: Any, weight: Any | None = None) -> float:
    """The registered metric `name` of one set of clips (items with weight 0 left out)."""
    fn, _ = _known(name)
    kept = _prepare(pred, true, weight)
    where = f"metric {name!r} ({getattr(fn, '__module__', None)}.{getattr(fn, '__qualname__', fn)})"
    try:
        value = fn(*kept)
    except ValueError as err:       # train.py prints a ValueError as one line: name the metric
        raise ValueError(f"{where} failed on {kept[0].size} clips: {err}") from err
    except Exception as err:        # a bug in it: its own type and traceback, and a note
        err.add_note(f"in {where}, on {kept[0].size} clips")
        raise
    try:
        # A numpy comparison's np.bool_ is no Python bool, and float() takes both.
        if isinstance(value, (bool, np.bool_)) or np.ndim(value) != 0:
            raise TypeError
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"metric {name!r} returned {value!r}; it must return a number"
                         ) from None


register_metric("lcc", _reported_lcc, higher_is_better=True)
register_metric("srcc", _reported_srcc, higher_is_better=True)
register_metric("mse", _mse, higher_is_better=False)


def try_metrics(names: Sequence[str], labels: Any, where: str, split: str = "valid") -> None:
    """Calls each registered metric once on `labels` (n,) and a trial prediction of them (the
    labels moved by up to 0.1, clipped to [0, 1]), before a run trains: a metric that fails
    on any input then stops the run at once, not after its first epoch (train.monitor) or
    the whole training (report.metrics, where it would only read n/a). A NaN is allowed.

    Raises:
      ValueError naming `where`, the metric, and what it raised (the error is its cause).
    """
    labels = np.asarray(labels, np.float64)
    trial = np.clip(labels + 0.1 * np.sin(1.0 + np.arange(labels.size)), 0.0, 1.0)
    for name in names:
        try:
            metric_value(name, trial, labels)
        except Exception as err:     # noqa: BLE001 (a metric of the user's may raise anything)
            # metric_value re-raises a metric's own ValueError wrapped: name the original.
            cause = err.__cause__ if isinstance(err, ValueError) and err.__cause__ else err
            raise ValueError(f"{where}: metric {name!r} fails on the {labels.size} {split} "
                             f"labels and a trial prediction of them, before training: "
                             f"{type(cause).__name__}: {cause}") from cause


def bootstrap_intervals(pred: Any, true: Any, weight: Any | None = None, *,
                        groups: Sequence[Any] | None = None, n_resamples: int = 1000,
                        level: float = 0.95, seed: int = 0) -> dict[str, list[float]]:
    """Percentile bootstrap intervals of LCC and SRCC over clips (pairs resampled together).

    How far a split's correlation could move with another draw of clips of the same kinds:
    with 160 clips an LCC of 0.8 is uncertain by several hundredths. Items that share a group
    (e.g. the two ears of one clip, or one clip heard by several listeners) are not
    independent draws, so with `groups` whole groups are drawn (a cluster bootstrap); resampling
    their items one by one would make the intervals too narrow.

    Args:
      pred, true: (n,) scores; weight: optional (n,), items with weight 0 are left out (other
        weights are ignored here: each kept clip is one draw).
      groups: optional (n,) group of each item (any values; None = the item is its own group).
      n_resamples: bootstrap resamples (all at once: an (n_resamples, draws) index array).
      level: coverage of the central interval.
      seed: of the numpy generator that draws the resamples. Without groups, or with groups of
        one item each, the same seed draws the same resamples.
    Returns:
      {"lcc": [low, high], "srcc": [low, high]}; NaN bounds for fewer than 3 clips.
    """
    n_items = np.asarray(pred).size
    if groups is None:
        groups = [None] * n_items
    if len(groups) != n_items:
        raise ValueError(f"metrics: {len(groups)} groups for {n_items} items")
    keep = (np.ones(n_items, bool) if weight is None
            else np.asarray(weight, np.float64).reshape(-1) > 0)
    p, t, _ = _prepare(pred, true, weight)
    if p.size < MIN_CORRELATION_ITEMS:
        return {"lcc": [float("nan")] * 2, "srcc": [float("nan")] * 2}
    members: dict[Any, list[int]] = {}
    for i, g in enumerate(g for g, k in zip(groups, keep) if k):
        members.setdefault(("item", i) if g is None else ("group", str(g)), []).append(i)
    clusters = list(members.values())
    drawn = np.random.default_rng(seed).integers(0, len(clusters),
                                                 size=(n_resamples, len(clusters)))
    sizes = {len(c) for c in clusters}
    if len(sizes) == 1:      # equal groups (single items included): one rectangular index
        idx = np.asarray(clusters)[drawn].reshape(n_resamples, -1)
        resamples = [(p[idx], t[idx])]
    else:                    # resamples of unequal lengths: one at a time
        resamples = [(p[i], t[i]) for i in
                     (np.concatenate([clusters[c] for c in row])[None] for row in drawn)]

    def rowwise_pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:   # (R, m) -> (R,)
        dx = x - x.mean(axis=1, keepdims=True)
        dy = y - y.mean(axis=1, keepdims=True)
        den = np.sqrt((dx * dx).sum(axis=1) * (dy * dy).sum(axis=1))
        varies = (np.ptp(x, axis=1) > 0) & (np.ptp(y, axis=1) > 0)   # exactly, as above
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(varies & (den > 0), (dx * dy).sum(axis=1) / den, np.nan)

    tails = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    out = {}
    for name, ranked in (("lcc", False), ("srcc", True)):
        r = np.concatenate([rowwise_pearson(*((average_ranks(x), average_ranks(y)) if ranked
                                              else (x, y))) for x, y in resamples])
        r = r[np.isfinite(r)]       # a resample of one repeated clip has no correlation
        out[name] = ([float(v) for v in np.percentile(r, tails)] if r.size
                     else [float("nan")] * 2)
    return out


def summarize_by_group(pred: Any, true: Any, groups: Sequence[Any],
                       weight: Any | None = None) -> dict[str, dict[str, float]]:
    """`summarize` for each distinct value of `groups` (e.g. split or distortion), keyed by str."""
    pred = np.asarray(pred).reshape(-1)
    true = np.asarray(true).reshape(-1)
    groups = np.asarray([str(g) for g in groups])
    if groups.shape != pred.shape:
        raise ValueError(f"metrics: {groups.size} group labels for {pred.size} items")
    weight = np.ones(pred.shape) if weight is None else np.asarray(weight, np.float64).reshape(-1)
    return {str(g): summarize(pred, true, weight * (groups == g)) for g in sorted(set(groups))}


def json_safe(tree: Mapping[str, Any] | Any) -> Any:
    """Replaces NaN/inf floats by None (strict JSON has no NaN), recursively."""
    if isinstance(tree, Mapping):
        return {k: json_safe(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [json_safe(v) for v in tree]
    if isinstance(tree, (float, np.floating)):
        return float(tree) if np.isfinite(tree) else None
    if isinstance(tree, np.integer):
        return int(tree)
    return tree
