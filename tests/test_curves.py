"""Learning curves read from metrics.jsonl and drawn (haaqi_jax.train.curves)."""

import json

import numpy as np
import pytest

from figures import drawn, overlap

from haaqi_jax.train import curves


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_series_of_a_distillation_log(tmp_path):
    """Train terms sorted by layer (distill_10 after distill_2), validation per epoch, the last
    best step, a step logged twice read once, null (NaN) values left out."""
    records = []
    for step in range(1, 13):
        records.append({"kind": "train", "step": step, "loss": 1.0 / step, "haaqi_loss": 0.5,
                        "distill_2": 0.1 * step, "distill_10": 0.2, "distill_k/l1": 3.0,
                        "weight_0": 1.0})
    records[4]["loss"] = None                        # json_safe writes NaN as null
    records.append({"kind": "train", "step": 12, "loss": 0.01})       # a rerun's second log
    records += [{"kind": "valid", "step": 6, "epoch": 1, "loss": 0.3, "lcc": 0.5, "srcc": 0.4,
                 "best": True},
                {"kind": "valid", "step": 12, "epoch": 2, "loss": 0.2, "lcc": 0.6, "srcc": 0.7,
                 "best": False}]
    series = curves.read_series(_write(tmp_path / "metrics.jsonl", records))
    assert list(series["train"]) == ["loss", "haaqi_loss", "distill_2", "distill_10"]
    steps, loss = series["train"]["loss"]
    assert list(steps) == [1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12]
    assert loss[-1] == 0.01 and loss[0] == 1.0
    np.testing.assert_array_equal(series["valid"]["srcc"][1], [0.4, 0.7])
    assert series["best_step"] == 6
    out = curves.learning_curves(tmp_path / "metrics.jsonl", tmp_path / "c.png", title="x")
    assert out.stat().st_size > 10_000                           # three drawn panels


def test_a_corrupt_log_is_named(tmp_path):
    path = _write(tmp_path / "metrics.jsonl", [{"kind": "train", "step": 1, "loss": 1.0}])
    path.write_text(path.read_text() + "{broken\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not JSON"):
        curves.read_series(path)


def test_a_distillation_plots_like_against_like(tmp_path, monkeypatch):
    """Validation measures the HAAQI loss alone: the loss panel's train line is the HAAQI term
    (it was the total, ~50x larger on the demo), and the total joins the terms' panel."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [{"kind": "train", "step": s, "loss": 5.0, "haaqi_loss": 0.1, "distill_0": 4.9}
               for s in range(1, 9)]
    records.append({"kind": "valid", "step": 8, "epoch": 1, "loss": 0.1, "lcc": 0.5,
                    "srcc": 0.5, "best": True})
    monkeypatch.setattr(plt, "close", lambda *a, **k: None)           # keep it to look at
    curves.learning_curves(_write(tmp_path / "m.jsonl", records), tmp_path / "c.png")
    loss_ax, _, term_ax = plt.gcf().axes
    train_line = [l for l in loss_ax.get_lines() if l.get_label() == "train"][0]
    np.testing.assert_allclose(train_line.get_ydata(), 0.1)
    assert loss_ax.get_title() == "HAAQI loss"
    labels = [l.get_label() for l in term_ax.get_lines()]
    assert [k for k in labels if not k.startswith("_")] == ["total loss", "haaqi_loss",
                                                            "distill_0"]
    plt.close("all")


def test_smoothed_lines_start_at_the_first_log(tmp_path, monkeypatch):
    """The thick lines (train loss, distillation terms) are trailing means over up to 5 logs,
    drawn from the first log on: a short run's first 4 logs used to be missing from the terms'
    panel, which drew only the full-width means."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = [4.0, 2.0, 6.0, 1.0, 3.0, 8.0, 5.0]
    records = [{"kind": "train", "step": 10 * (i + 1), "loss": v + 1, "haaqi_loss": 1.0,
                "distill_0": v} for i, v in enumerate(values)]
    monkeypatch.setattr(plt, "close", lambda *a, **k: None)
    curves.learning_curves(_write(tmp_path / "m.jsonl", records), tmp_path / "c.png")
    term_ax = plt.gcf().axes[2]
    line = [l for l in term_ax.get_lines() if l.get_label() == "distill_0"][0]
    expected = [np.mean(values[max(0, i - 4):i + 1]) for i in range(len(values))]
    np.testing.assert_array_equal(line.get_xdata(), [10 * (i + 1) for i in range(len(values))])
    np.testing.assert_allclose(line.get_ydata(), expected)
    plt.close("all")


def _distill_log(tmp_path):
    """A short distillation's log: the HAAQI loss spans 0.07 to 0.17, best step 240."""
    rng = np.random.default_rng(0)
    records = [{"kind": "train", "step": s, "loss": 2.0 - s / 400, "haaqi_loss":
                0.16 - s / 5000 + 0.01 * rng.uniform(), "distill_0": 0.8, "distill_1": 0.7}
               for s in range(10, 430, 10)]
    records += [{"kind": "valid", "step": s, "epoch": s // 60, "loss": 0.09 - s / 20000,
                 "lcc": 0.75, "srcc": 0.74, "best": s == 240} for s in range(60, 430, 60)]
    return _write(tmp_path / "metrics.jsonl", records)


def _drawn_curves(path, out):
    return drawn(curves.learning_curves, path, out, title="distill")


def test_the_best_step_is_named_in_the_legend_not_under_it(tmp_path):
    """The "best step 240" note sat at the top of the loss panel, where the legend hid it."""
    fig = _drawn_curves(_distill_log(tmp_path), tmp_path / "c.png")
    loss_ax = fig.axes[0]
    labels = [t.get_text() for t in loss_ax.get_legend().get_texts()]
    assert "best step 240" in labels
    legend = loss_ax.get_legend().get_window_extent()
    for text in loss_ax.texts:                                     # no note left under it
        box = text.get_window_extent()
        assert not overlap(box, legend), text.get_text()


def test_a_log_loss_axis_under_a_decade_reads_off_values(tmp_path):
    """A loss between 0.07 and 0.17 on a log axis (the demo distillation's) had one labelled
    tick, 10^-1: no value could be read off it."""
    fig = _drawn_curves(_distill_log(tmp_path), tmp_path / "c.png")
    loss_ax = fig.axes[0]
    low, high = loss_ax.get_ylim()
    shown = [t for t in loss_ax.yaxis.get_majorticklabels() + loss_ax.yaxis.get_minorticklabels()
             if t.get_text() and low <= t.get_position()[1] <= high]
    assert len(shown) >= 3, [t.get_text() for t in shown]
