"""The label overview plot (haaqi_jax.data.overview): what it draws, checked on hand-made rows."""

from __future__ import annotations

import numpy as np
import pytest

from figures import drawn, inside
from haaqi_jax.data import overview

# Bins are 0.05 wide: 0.91 -> bin 18, 0.81 -> 16, 0.96 -> 19, 1.0 -> 19 (the last bin is
# closed), 1.02 -> 19 (clipped), 0.11 -> 2, 0.21 -> 4, -0.01 -> 0 (clipped).
TRAIN = {"a": [0.91, 0.81, 0.96, 1.0, 1.02], "b": [0.11, 0.21, -0.01]}
UNSEEN = {"c": [0.51, 0.56, 0.61, 0.41]}
TRAIN_COUNTS = {0: 1, 2: 1, 4: 1, 16: 1, 18: 1, 19: 3}
UNSEEN_COUNTS = {8: 1, 10: 1, 11: 1, 12: 1}     # 0.41 -> 8, 0.51 -> 10, 0.56 -> 11, 0.61 -> 12


def _rows(with_types=True):
    rows = []
    for split, types in (("train", TRAIN), ("test_unseen", UNSEEN)):
        for name, labels in types.items():
            for label in labels:
                row = {"id": f"{name}{len(rows)}", "haaqi_score": label, "split": split}
                if with_types:
                    row["distortion"] = name
                rows.append(row)
    return rows


def _by_gid(fig, prefix):
    return {a.get_gid().split(":", 1)[1]: a for ax in fig.axes for a in ax.get_children()
            if (a.get_gid() or "").startswith(prefix)}


def _expected(counts):
    out = np.zeros(overview.BINS)
    for i, c in counts.items():
        out[i] = c
    return out


def test_histograms_count_each_split_in_its_bins(tmp_path):
    fig = drawn(overview.label_plot, _rows(), tmp_path / "labels.png")
    hists = _by_gid(fig, "hist:")
    assert set(hists) == {"train", "test_unseen"}
    for split, counts in (("train", TRAIN_COUNTS), ("test_unseen", UNSEEN_COUNTS)):
        data = hists[split].get_data()
        values, edges = data.values, data.edges
        np.testing.assert_array_equal(values, _expected(counts))
        np.testing.assert_allclose(edges, np.arange(overview.BINS + 1) / overview.BINS)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert sorted(legend) == ["test_unseen (4)", "train (8)"]
    assert (tmp_path / "labels.png").read_bytes().startswith(b"\x89PNG")


def test_types_sorted_by_median_with_their_labels_quartiles_and_split_colours(tmp_path):
    fig = drawn(overview.label_plot, _rows(), tmp_path / "labels.png")
    medians = _by_gid(fig, "median:")
    # medians: b 0.11, c 0.535, a 0.96 -> rows 0, 1, 2 from the bottom
    for name, (x, y) in {"b": (0.11, 0), "c": (0.535, 1), "a": (0.96, 2)}.items():
        xs, ys = medians[name].get_data()
        assert xs[0] == pytest.approx(x) and ys[0] == y, name
    ticks = [t.get_text() for t in fig.axes[1].get_yticklabels()]
    assert ticks == ["b (3)", "c (4)", "a (5)"]
    quartiles = _by_gid(fig, "quartiles:")
    np.testing.assert_allclose(quartiles["c"].get_data()[0], [0.485, 0.5725])
    dots = _by_gid(fig, "labels:")
    for name, labels in {**TRAIN, **UNSEEN}.items():
        offsets = dots[name].get_offsets()
        np.testing.assert_allclose(np.sort(offsets[:, 0]), np.sort(labels))
        assert np.ptp(offsets[:, 1]) <= 2 * overview.JITTER + 1e-9
    colour = {n: tuple(np.round(dots[n].get_facecolor()[0][:3], 6)) for n in dots}
    assert colour["a"] == colour["b"] != colour["c"]        # both train; c test_unseen alone
    legend = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert legend == ["test_unseen", "train"]


def test_every_text_is_inside_the_figure(tmp_path):
    rows = _rows()
    rows += [{"id": f"x{i}", "haaqi_score": 0.3, "split": "valid",
              "distortion": "spectral_subtraction+babble+tilt_down"} for i in range(3)]
    fig = drawn(overview.label_plot, rows, tmp_path / "labels.png")
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    texts = [t for ax in fig.axes for t in ax.findobj(lambda a: hasattr(a, "get_text"))
             if getattr(t, "get_text", lambda: "")() and t.get_visible()]
    assert texts
    for t in texts:
        assert inside(t.get_window_extent(renderer), box), t.get_text()


def test_at_most_max_types_rows_those_with_the_most_clips(tmp_path):
    # 70 one-clip names and two of 3 clips: the two, then the first 62 one-clip names by name.
    rows = [{"id": f"o{i}", "haaqi_score": 0.5, "split": "t", "distortion": f"one{i:02d}"}
            for i in range(70)]
    rows += [{"id": f"{name}{i}", "haaqi_score": 0.3, "split": "t", "distortion": name}
             for name in ("zz_big", "zz_bigger") for i in range(3)]
    fig = drawn(overview.label_plot, rows, tmp_path / "labels.png")
    shown = set(_by_gid(fig, "median:"))
    assert shown == {"zz_big", "zz_bigger"} | {f"one{i:02d}" for i in range(62)}
    assert "the 64 of 72 distortions with the most clips" in fig.axes[1].get_title()
    assert fig.get_size_inches()[1] < 20


def test_rows_without_types_get_the_histogram_alone(tmp_path):
    fig = drawn(overview.label_plot, _rows(with_types=False), tmp_path / "labels.png")
    assert len(fig.axes) == 1 and set(_by_gid(fig, "hist:")) == {"train", "test_unseen"}


@pytest.mark.parametrize("score", [float("nan"), None, "0.5", True])
def test_a_bad_label_is_named_by_row(tmp_path, score):
    rows = _rows()
    rows[3]["haaqi_score"] = score
    with pytest.raises(ValueError, match=r"row 3 \(a3\) has haaqi_score"):
        overview.label_plot(rows, tmp_path / "labels.png")
    assert not (tmp_path / "labels.png").exists()


def test_numpy_scores_are_numbers_too(tmp_path):
    rows = [dict(r, haaqi_score=np.float32(r["haaqi_score"])) for r in _rows()]
    fig = drawn(overview.label_plot, rows, tmp_path / "labels.png")
    assert sum(h.get_data().values.sum() for h in _by_gid(fig, "hist:").values()) == len(rows)


def test_no_rows_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no rows"):
        overview.label_plot([], tmp_path / "labels.png")
