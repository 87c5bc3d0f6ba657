"""Metrics vs scipy.stats (pearsonr, spearmanr) and numpy's weighted covariance."""

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings, strategies as st

from haaqi_jax.train import metrics


def _data(seed, n=40, ties=False):
    rng = np.random.default_rng(seed)
    true = rng.uniform(0, 1, n)
    pred = 0.7 * true + 0.3 * rng.uniform(0, 1, n)
    if ties:  # many ties in both
        true, pred = np.round(true, 1), np.round(pred, 1)
    return pred, true


@pytest.mark.parametrize("ties", [False, True])
def test_unweighted_matches_scipy(ties):
    pred, true = _data(0, ties=ties)
    assert metrics.pearson_lcc(pred, true) == pytest.approx(scipy.stats.pearsonr(pred, true)[0], abs=1e-12)
    assert metrics.spearman_srcc(pred, true) == pytest.approx(scipy.stats.spearmanr(pred, true)[0], abs=1e-12)
    assert metrics.mse(pred, true) == pytest.approx(np.mean((pred - true) ** 2), abs=1e-15)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.integers(3, 60), st.booleans())
def test_zero_weights_drop_items(seed, n, ties):
    pred, true = _data(seed, n, ties)
    keep = np.random.default_rng(seed + 1).uniform(size=n) < 0.7
    keep[:3] = True
    s = metrics.summarize(pred, true, keep.astype(float))
    p, t = pred[keep], true[keep]
    assert s["n"] == keep.sum()
    assert s["mse"] == pytest.approx(np.mean((p - t) ** 2))
    if np.ptp(p) > 0 and np.ptp(t) > 0:
        assert s["lcc"] == pytest.approx(scipy.stats.pearsonr(p, t)[0], abs=1e-9)
        assert s["srcc"] == pytest.approx(scipy.stats.spearmanr(p, t)[0], abs=1e-9)


def test_average_ranks_match_scipy_rankdata():
    x = np.array([3.0, 1.0, 3.0, 2.0, 3.0, 1.0, 7.0])
    np.testing.assert_array_equal(metrics.average_ranks(x), scipy.stats.rankdata(x))
    # row by row along the last axis (the bootstrap ranks all its resamples at once)
    rows = np.random.default_rng(0).integers(0, 5, size=(40, 9)).astype(float)
    np.testing.assert_array_equal(metrics.average_ranks(rows), scipy.stats.rankdata(rows, axis=1))


def test_weighted_pearson_matches_numpy_cov():
    pred, true = _data(3)
    w = np.random.default_rng(4).uniform(0.1, 2.0, pred.size)
    c = np.cov(pred, true, aweights=w)
    assert metrics.pearson_lcc(pred, true, w) == pytest.approx(c[0, 1] / np.sqrt(c[0, 0] * c[1, 1]), abs=1e-12)
    assert metrics.mse(pred, true, w) == pytest.approx(np.average((pred - true) ** 2, weights=w))
    summary = metrics.summarize(pred, true, w)   # what reports and the loop log
    assert summary["mse"] == pytest.approx(np.average((pred - true) ** 2, weights=w))
    assert summary["lcc"] == pytest.approx(c[0, 1] / np.sqrt(c[0, 0] * c[1, 1]), abs=1e-12)


def test_integer_weights_equal_repetition():
    pred, true = _data(5, n=12)
    w = np.arange(1, 13) % 3 + 1
    rep_p, rep_t = np.repeat(pred, w), np.repeat(true, w)
    assert metrics.pearson_lcc(pred, true, w) == pytest.approx(scipy.stats.pearsonr(rep_p, rep_t)[0], abs=1e-12)


def test_by_group():
    pred, true = _data(6, n=30)
    groups = ["a", "b", "c"] * 10
    out = metrics.summarize_by_group(pred, true, groups)
    assert sorted(out) == ["a", "b", "c"]
    sel = np.array(groups) == "b"
    assert out["b"]["lcc"] == pytest.approx(scipy.stats.pearsonr(pred[sel], true[sel])[0], abs=1e-12)


def test_undefined_and_bad_inputs():
    assert np.isnan(metrics.pearson_lcc([0.5, 0.5, 0.5], [0.1, 0.2, 0.3]))
    assert np.isnan(metrics.spearman_srcc([0.5], [0.1]))
    assert metrics.json_safe({"a": float("nan"), "b": [1.0, float("inf")]}) == {"a": None, "b": [1.0, None]}
    with pytest.raises(ValueError, match="non-finite"):
        metrics.mse([0.1, float("nan")], [0.1, 0.2])
    with pytest.raises(ValueError, match="3 predictions but 2 targets"):
        metrics.mse([0.1, 0.2, 0.3], [0.1, 0.2])
    with pytest.raises(ValueError, match="weights"):
        metrics.mse([0.1, 0.2], [0.1, 0.2], [1.0, -1.0])


def test_bootstrap_intervals_match_scipy_percentile_bootstrap():
    rng = np.random.default_rng(3)
    true = rng.uniform(0, 1, 160)
    pred = np.round(true + 0.2 * rng.standard_normal(160), 2)      # ties for the ranks
    ours = metrics.bootstrap_intervals(pred, true, n_resamples=4000, seed=1)

    def both(name):
        fn = scipy.stats.pearsonr if name == "lcc" else scipy.stats.spearmanr
        return scipy.stats.bootstrap((pred, true), lambda a, b: fn(a, b)[0], paired=True,
                                     vectorized=False, method="percentile", n_resamples=4000,
                                     random_state=2).confidence_interval

    for name in ("lcc", "srcc"):
        ref = both(name)
        assert ours[name][0] == pytest.approx(ref.low, abs=0.015), name       # Monte Carlo
        assert ours[name][1] == pytest.approx(ref.high, abs=0.015), name
        assert ours[name][0] < metrics.summarize(pred, true)[name] < ours[name][1]
    # Items with weight 0 are not drawn; too few clips give NaN bounds.
    weight = np.r_[np.ones(150), np.zeros(10)]
    noisy = pred.copy()
    noisy[150:] = 5.0
    assert metrics.bootstrap_intervals(noisy, true, weight) == metrics.bootstrap_intervals(
        pred[:150], true[:150])
    assert all(np.isnan(metrics.bootstrap_intervals([0.1, 0.2], [0.3, 0.1])["lcc"]))


def test_two_clips_have_no_correlation():
    """Two points always correlate by +-1: below three clips LCC and SRCC are NaN (n/a in the
    tables), the MSE still counts."""
    from haaqi_jax.train import metrics
    two = metrics.summarize([0.1, 0.7], [0.3, 0.2])
    assert np.isnan(two["lcc"]) and np.isnan(two["srcc"]) and two["n"] == 2
    assert two["mse"] == pytest.approx((0.2 ** 2 + 0.5 ** 2) / 2)
    three = metrics.summarize([0.1, 0.7, 0.4], [0.3, 0.2, 0.5])
    assert np.isfinite(three["lcc"]) and np.isfinite(three["srcc"])


def test_bootstrap_draws_whole_groups():
    """Each clip scored for both ears with the same numbers: drawing whole groups gives the
    interval of the clips themselves (Pearson and Spearman do not change when every point is
    doubled), while drawing the ears one by one would make it narrower."""
    rng = np.random.default_rng(3)
    true = rng.uniform(0, 1, 40)
    pred = true + 0.3 * rng.standard_normal(40)
    clips = metrics.bootstrap_intervals(pred, true, seed=5)
    ears_pred, ears_true = np.repeat(pred, 2), np.repeat(true, 2)
    groups = np.repeat([f"clip{i}" for i in range(40)], 2)
    grouped = metrics.bootstrap_intervals(ears_pred, ears_true, groups=groups, seed=5)
    for key in ("lcc", "srcc"):
        np.testing.assert_allclose(grouped[key], clips[key], rtol=1e-12)
    loose = metrics.bootstrap_intervals(ears_pred, ears_true, seed=5)
    assert np.diff(loose["lcc"])[0] < 0.85 * np.diff(clips["lcc"])[0]

    # Unequal groups and left-out items: the same draws by hand, correlations by scipy.
    sizes = rng.integers(1, 4, 30)
    groups = np.repeat(np.arange(30), sizes)
    true = rng.uniform(0, 1, groups.size)
    pred = true + 0.2 * rng.standard_normal(groups.size)
    weight = (rng.uniform(size=groups.size) > 0.1).astype(float)
    got = metrics.bootstrap_intervals(pred, true, weight, groups=list(groups), seed=1,
                                      n_resamples=200)
    kept = weight > 0
    members = [np.flatnonzero(groups[kept] == g) for g in dict.fromkeys(groups[kept])]
    drawn = np.random.default_rng(1).integers(0, len(members), (200, len(members)))
    for key, corr in (("lcc", scipy.stats.pearsonr), ("srcc", scipy.stats.spearmanr)):
        r = [corr(pred[kept][i], true[kept][i])[0]
             for i in (np.concatenate([members[c] for c in row]) for row in drawn)]
        np.testing.assert_allclose(got[key], np.percentile(r, [2.5, 97.5]), rtol=1e-9)
    with pytest.raises(ValueError, match="3 groups for 4 items"):
        metrics.bootstrap_intervals(np.ones(4), np.ones(4), groups=[1, 2, 3])


@pytest.mark.parametrize("value", [0.7, np.float32(0.7), 0.123456789])
def test_constant_predictions_have_no_correlation(value):
    """A model that gives every clip the same score (a saturated or dead head) has no LCC or
    SRCC: scipy says NaN. Rounding in the weighted means used to leave a residue of ~1e-17 and
    report a correlation of ~0 (SRCC always, LCC for some constants or weights), and bootstrap
    intervals of ~[-5e-16, 6e-16], shown as 0.0000 in the tables."""
    true = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.35])
    pred = np.full(7, value)
    with pytest.warns(scipy.stats.ConstantInputWarning):
        assert np.isnan(scipy.stats.pearsonr(pred.astype(np.float64), true)[0])
    with pytest.warns(scipy.stats.ConstantInputWarning):
        assert np.isnan(scipy.stats.spearmanr(pred, true)[0])
    weight = [1, 2, 3, 1, 1, 0, 1]
    for p, t in ((pred, true), (true, pred)):
        assert np.isnan(metrics.pearson_lcc(p, t)) and np.isnan(metrics.spearman_srcc(p, t))
        assert np.isnan(metrics.pearson_lcc(p, t, weight))
        assert np.isnan(metrics.spearman_srcc(p, t, weight))
        summary = metrics.summarize(p, t)
        assert np.isnan(summary["lcc"]) and np.isnan(summary["srcc"])
        intervals = metrics.bootstrap_intervals(p, t, n_resamples=200)
        assert all(np.isnan(intervals["lcc"])) and all(np.isnan(intervals["srcc"]))


def test_builtin_metrics_are_registered_and_equal_summarize():
    """lcc, srcc and mse are registered (what train.monitor may name besides "loss"), with
    their direction, and `metric_value` gives what `summarize` logs, filler items left out."""
    assert {"lcc", "srcc", "mse"} <= set(metrics.available_metrics())
    assert metrics.higher_is_better("lcc") and metrics.higher_is_better("srcc")
    assert not metrics.higher_is_better("mse") and not metrics.higher_is_better("loss")
    pred, true = _data(4, n=12, ties=True)
    weight = np.r_[np.ones(10), 0, 2.0]
    summary = metrics.summarize(pred, true, weight)
    for name in ("lcc", "srcc", "mse"):
        assert metrics.metric_value(name, pred, true, weight) == summary[name]
    # below three clips the correlations are NaN there too
    assert np.isnan(metrics.metric_value("lcc", [0.1, 0.7], [0.3, 0.2]))


def test_a_user_metric_is_registered_called_with_the_kept_items_and_checked():
    seen = []

    @metrics.register_metric("test_max_error", higher_is_better=False)
    def max_error(pred, true, weight):
        seen.append((pred, true, weight))
        return np.max(np.abs(pred - true))

    try:
        assert "test_max_error" in metrics.available_metrics()
        assert not metrics.higher_is_better("test_max_error")
        value = metrics.metric_value("test_max_error", [0.1, 0.5, 9.0], [0.2, 0.1, 0.0],
                                     [1, 1, 0])
        assert value == pytest.approx(0.4) and type(value) is float
        np.testing.assert_array_equal(seen[-1][0], [0.1, 0.5])      # weight 0 left out
        # the same definition again (a config file loaded twice) replaces itself
        metrics.register_metric("test_max_error", max_error, higher_is_better=False)
        with pytest.raises(ValueError, match=r"metric 'test_max_error' is already registered "
                                             r"by .*max_error \(pass overwrite=True\)"):
            metrics.register_metric("test_max_error", lambda p, t, w: 0.0,
                                    higher_is_better=True)
        metrics.register_metric("test_max_error", lambda p, t, w: 1.5, True, overwrite=True)
        assert metrics.metric_value("test_max_error", [0.1], [0.2]) == 1.5
        assert metrics.higher_is_better("test_max_error")
        metrics.register_metric("test_max_error", lambda p, t, w: np.ones(2), True,
                                overwrite=True)
        with pytest.raises(ValueError, match=r"metric 'test_max_error' returned .*a number"):
            metrics.metric_value("test_max_error", [0.1], [0.2])
    finally:
        metrics.unregister_metric("test_max_error")
    assert "test_max_error" not in metrics.available_metrics()
    with pytest.raises(ValueError, match=r"unknown metric 'test_max_error'; registered: "
                                         r"\[.*'lcc', 'mse', 'srcc'.*\]"):
        metrics.metric_value("test_max_error", [0.1], [0.2])
    with pytest.raises(ValueError, match=r"train.monitor must be 'loss' or a registered "
                                         r"metric \(.*'lcc', 'mse', 'srcc'.*\), got 'lccc'"):
        metrics.check_monitor("lccc")
    metrics.check_monitor("loss")
    metrics.check_monitor("srcc")


@pytest.mark.parametrize("args, kwargs, error, message", [
    (("loss", lambda p, t, w: 0.0), {"higher_is_better": False}, ValueError,
     r"'loss' is a name of the validation rows"),
    (("best", lambda p, t, w: 0.0), {"higher_is_better": False}, ValueError,
     r"'best' is a name of the validation rows"),
    (("", lambda p, t, w: 0.0), {"higher_is_better": False}, ValueError, r"a non-empty name"),
    (("m", lambda p, t, w: 0.0), {}, TypeError, r"higher_is_better=True or False"),
    (("m", lambda p, t, w: 0.0), {"higher_is_better": 1}, TypeError,
     r"higher_is_better=True or False"),
    ((lambda p, t, w: 0.0,), {"higher_is_better": True}, TypeError,
     r"register_metric takes the metric's name"),
    (("m", "not callable"), {"higher_is_better": True}, TypeError, r"not callable"),
])
def test_register_metric_refuses_bad_registrations(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        metrics.register_metric(*args, **kwargs)
    assert "m" not in metrics.available_metrics()


@pytest.mark.parametrize("name", ["lcc", "srcc", "mse"])
def test_a_builtin_metric_cannot_be_overwritten(name):
    """The validation rows log summarize's lcc, srcc and mse, and train.monitor took those
    values: a metric registered over one (overwrite=True) was never called, while its
    higher_is_better flipped the direction early stopping compared them in."""
    with pytest.raises(ValueError, match=rf"{name!r} is built in .*another name"):
        metrics.register_metric(name, lambda p, t, w: 0.0, higher_is_better=False,
                                overwrite=True)
    assert metrics.higher_is_better(name) == (name != "mse")
    assert metrics.metric_value(name, [0.1, 0.5, 0.9], [0.2, 0.4, 0.8]) == metrics.summarize(
        [0.1, 0.5, 0.9], [0.2, 0.4, 0.8])[name]


def test_a_metric_that_raises_is_named_in_the_error():
    """A registered metric failing at an epoch's end: the error said what numpy said, not
    which metric (train.py prints a ValueError as one line)."""
    def bad_value(pred, true, weight):
        raise ValueError("operands could not be broadcast together")

    def bad_code(pred, true, weight):
        return pred[10]

    try:
        metrics.register_metric("test_bad_value", bad_value, higher_is_better=False)
        metrics.register_metric("test_bad_code", bad_code, higher_is_better=False)
        with pytest.raises(ValueError, match=r"^metric 'test_bad_value' \(.*bad_value\) failed "
                                             r"on 2 clips: operands could not be broadcast"):
            metrics.metric_value("test_bad_value", [0.1, 0.2], [0.3, 0.4])
        with pytest.raises(IndexError) as caught:              # a bug: its type and traceback
            metrics.metric_value("test_bad_code", [0.1, 0.2], [0.3, 0.4])
        assert any("metric 'test_bad_code'" in note for note in caught.value.__notes__)
    finally:
        metrics.unregister_metric("test_bad_value")
        metrics.unregister_metric("test_bad_code")


@pytest.mark.parametrize("name", ["loss", "step", "epoch", "kind", "best", "n"])
def test_every_key_of_a_validation_row_is_refused_as_a_metric_name(name):
    """A validation row of metrics.jsonl holds step, epoch, kind, loss, lcc, srcc, mse, best
    (and n is every report entry's clip count): a metric under one of those names would
    overwrite it in the row."""
    with pytest.raises(ValueError, match=rf"{name!r} is a name of the validation rows"):
        metrics.register_metric(name, lambda p, t, w: 0.0, higher_is_better=False)
    assert metrics.higher_is_better("loss") is False
    assert name == "loss" or name not in metrics.available_metrics()


def _max_error_factory():
    def max_error(pred, true, weight):
        return float(np.max(np.abs(pred - true)))
    return max_error


def test_a_definition_run_again_replaces_itself_without_overwrite():
    """A config file loaded twice runs its `@register_metric` again: a new function object of
    the same definition, which replaces the first (another definition needs overwrite)."""
    first, again = _max_error_factory(), _max_error_factory()
    assert first is not again                       # the premise: two function objects
    try:
        metrics.register_metric("test_again", first, higher_is_better=False)
        metrics.register_metric("test_again", again, higher_is_better=False)
        assert metrics.metric_value("test_again", [0.5, 0.25], [0.0, 0.0]) == 0.5
    finally:
        metrics.unregister_metric("test_again")


def test_unregistering_a_name_that_is_not_registered_does_nothing():
    before = metrics.available_metrics()
    metrics.unregister_metric("test_never_registered")
    assert metrics.available_metrics() == before


@pytest.mark.parametrize("bad", [["lcc"], {"lcc": 1}, None, 3])
def test_a_monitor_that_is_not_a_name_is_refused_by_key(bad):
    """`--set train.monitor=[lcc]` or a config's dict: one ValueError naming the key (a list
    is unhashable: a registry look-up would raise a TypeError with a traceback)."""
    with pytest.raises(ValueError, match=r"train.monitor must be 'loss' or a registered metric"):
        metrics.check_monitor(bad)


@pytest.mark.parametrize("returned", [True, False, np.True_, np.False_])
def test_a_metric_that_returns_a_truth_value_is_refused(returned):
    """A comparison (True / False) is no score: float(True) would read as a value of 1. A
    comparison of numpy values (`np.mean(pred) > 0.5`) gives a numpy bool, no Python bool."""
    metrics.register_metric("test_truth", lambda p, t, w: returned, higher_is_better=True)
    try:
        with pytest.raises(ValueError, match=r"metric 'test_truth' returned .*a number"):
            metrics.metric_value("test_truth", [0.1, 0.2], [0.2, 0.1])
    finally:
        metrics.unregister_metric("test_truth")
