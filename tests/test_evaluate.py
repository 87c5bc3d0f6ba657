"""`haaqi-jax evaluate` and the report writer: files written, numbers vs scipy."""

import csv
import importlib.util
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import soundfile as sf

from figures import drawn, inside, overlap

from haaqi_jax import cli, evaluate

_spec = importlib.util.spec_from_file_location("_train_helpers", Path(__file__).with_name("test_train.py"))
_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_helpers)


def test_evaluate_subcommand_writes_its_files(tmp_path, capsys):
    from haaqi_jax import config as cfglib
    from haaqi_jax.model import HAAQINet
    from haaqi_jax.train import loop

    manifest = _helpers.write_tiny_dataset(tmp_path / "data")
    net = loop.build_model(cfglib.load_config_file(_helpers.TINY))
    net.save(tmp_path / "model")
    out = tmp_path / "eval"
    assert cli.main(["evaluate", "--model", str(tmp_path / "model"), "--manifest", str(manifest),
                     "--out", str(out), "--splits", "valid", "test_seen", "test_unseen",
                     "--color-by", "distortion", "--batch-size", "4"]) == 0
    for name in ("metrics.json", "table.md", "table.csv", "predictions.csv", "examples.json",
                 "scatter.png", "by_distortion.png", "by_hearing_loss.png"):
        assert (out / name).is_file(), name
    printed = capsys.readouterr().out.splitlines()       # one line per split, not only pooled
    assert [line.split()[:2] for line in printed[:4]] == [
        ["all", "8"], ["test_seen", "2"], ["test_unseen", "2"], ["valid", "4"]]
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 8 and {r["split"] for r in rows} == {"valid", "test_seen", "test_unseen"}
    # Without --splits every split is scored, train too: said, since "all" then pools them.
    assert cli.main(["evaluate", "--model", str(tmp_path / "model"), "--manifest", str(manifest),
                     "--out", str(tmp_path / "eval_all"), "--no-progress"]) == 0
    assert ("train included, so 'all' and the per-distortion table pool them"
            in capsys.readouterr().err)

    # Predictions are the model's on the audio files (read independently here).
    manifest_rows = {json.loads(l)["id"]: json.loads(l) for l in manifest.read_text().splitlines()}
    waves = [sf.read(tmp_path / "data" / manifest_rows[r["id"]]["file_path"], dtype="float32")[0]
             for r in rows]
    pred = HAAQINet.load(tmp_path / "model").predict(
        waves, 16000, [manifest_rows[r["id"]]["audiogram"] for r in rows], progress=False)
    np.testing.assert_allclose(pred, [float(r["prediction"]) for r in rows], atol=1e-5)
    for r in rows:
        assert float(r["label"]) == manifest_rows[r["id"]]["haaqi_score"]

    # Metrics vs scipy on the written predictions.
    metrics = json.loads((out / "metrics.json").read_text())
    p = np.array([float(r["prediction"]) for r in rows])
    t = np.array([float(r["label"]) for r in rows])
    assert metrics["overall"]["lcc"] == pytest.approx(scipy.stats.pearsonr(p, t)[0], abs=1e-9)
    assert metrics["overall"]["srcc"] == pytest.approx(scipy.stats.spearmanr(p, t)[0], abs=1e-9)
    assert metrics["overall"]["mse"] == pytest.approx(np.mean((p - t) ** 2), abs=1e-12)
    noise = np.array([r["distortion"] == "noise" for r in rows])
    assert metrics["by_distortion"]["noise"]["lcc"] == pytest.approx(
        scipy.stats.pearsonr(p[noise], t[noise])[0], abs=1e-9)
    assert metrics["by_split"]["valid"]["n"] == 4
    valid = np.array([r["split"] == "valid" for r in rows])
    for entry, mask in ((metrics["overall"], np.ones_like(valid)),
                        (metrics["by_split"]["valid"], valid),
                        (metrics["by_distortion"]["noise"], noise)):
        assert entry["label_mean"] == pytest.approx(t[mask].mean(), abs=1e-12)
        assert entry["prediction_mean"] == pytest.approx(p[mask].mean(), abs=1e-12)
    # Manifest rows' audiograms: every clip graded, as this test's own bounds grade it.
    pta = np.array([np.mean(np.asarray(manifest_rows[r["id"]]["audiogram"])[PTA_COLUMNS])
                    for r in rows])
    np.testing.assert_allclose([float(r["pta_db"]) for r in rows], pta, atol=1e-4)
    assert metrics["hearing_loss_left_out"] == 0
    assert sum(e["n"] for e in metrics["by_hearing_loss"].values()) == len(rows)
    for name, low, high in WHO_2021_GRADES:
        sel = (pta >= low) & (pta < high)
        assert metrics["by_hearing_loss"].get(name, {"n": 0})["n"] == sel.sum(), name
        assert all(r["hearing_loss"] == name for r, s in zip(rows, sel) if s)
        if sel.sum() >= 3:
            assert metrics["by_hearing_loss"][name]["lcc"] == pytest.approx(
                scipy.stats.pearsonr(p[sel], t[sel])[0], abs=1e-9)
    low, high = metrics["overall"]["ci95"]["lcc"]
    assert low <= metrics["overall"]["lcc"] <= high
    assert set(metrics["by_split"]["valid"]["ci95"]) == {"lcc", "srcc"}
    table = (out / "table.md").read_text()
    assert "| distortion=noise | 4 |" in table and "| split=valid | 4 |" in table
    assert "- all: LCC [" in table and "- split=valid: LCC [" in table
    import matplotlib.image
    assert matplotlib.image.imread(out / "scatter.png").ndim == 3
    assert matplotlib.image.imread(out / "by_distortion.png").ndim == 3
    csv_rows = {r["subset"]: r for r in csv.DictReader((out / "table.csv").open())}
    assert float(csv_rows["distortion=noise"]["prediction_mean"]) == pytest.approx(
        p[noise].mean(), abs=1e-12)

    # --dtype bfloat16: the model's bfloat16 predictions (near float32's, not equal to them);
    # a dtype it cannot run is refused before anything is written.
    half_out = tmp_path / "eval_half"
    assert cli.main(["evaluate", "--model", str(tmp_path / "model"), "--manifest", str(manifest),
                     "--out", str(half_out), "--splits", "valid", "test_seen", "test_unseen",
                     "--dtype", "bfloat16", "--no-progress"]) == 0
    half_rows = list(csv.DictReader((half_out / "predictions.csv").open()))
    assert [r["id"] for r in half_rows] == [r["id"] for r in rows]
    half = np.array([float(r["prediction"]) for r in half_rows])
    np.testing.assert_allclose(half, HAAQINet.load(tmp_path / "model", dtype="bfloat16").predict(
        waves, 16000, [manifest_rows[r["id"]]["audiogram"] for r in rows], progress=False),
        atol=1e-5)
    assert 0 < np.max(np.abs(half - p)) < 3e-2
    capsys.readouterr()
    assert cli.main(["evaluate", "--model", str(tmp_path / "model"), "--manifest", str(manifest),
                     "--out", str(tmp_path / "eval_f16"), "--dtype", "float16"]) == 2
    assert "--dtype must be one of 'float32', 'bfloat16', got 'float16'" in capsys.readouterr().err
    assert not (tmp_path / "eval_f16").exists()


def test_report_errors(tmp_path):
    rows = [{"id": "a", "haaqi_score": 0.5, "distortion": "x"}, {"id": "b", "haaqi_score": None}]
    with pytest.raises(ValueError, match=r"row 1 \(b\): no HAAQI label"):
        evaluate.prediction_records(rows, np.array([0.1, 0.2]), "test")
    with pytest.raises(ValueError, match=r"row 0 \(a\): no finite prediction"):
        evaluate.prediction_records(rows[:1], np.array([np.nan]), "test")
    with pytest.raises(ValueError, match="2 predictions for 1 rows"):
        evaluate.prediction_records(rows[:1], np.array([0.1, 0.2]), "test")
    recs = evaluate.prediction_records(rows[:1], np.array([0.4]), "test")
    with pytest.raises(ValueError, match="color_by"):
        evaluate.write_report(recs, tmp_path, color_by="listener")
    # rows that name no distortion: no per-distortion plot (one "unknown" bar says nothing)
    unnamed = evaluate.prediction_records([{"id": "c", "haaqi_score": 0.3}], np.array([0.2]), "t")
    assert unnamed[0]["distortion"] == "unknown"
    evaluate.write_report(unnamed, tmp_path / "unnamed")
    assert (tmp_path / "unnamed" / "scatter.png").is_file()
    assert not (tmp_path / "unnamed" / "by_distortion.png").exists()
    # A rerun into a report folder that had distortions: the old plot goes with them.
    named = evaluate.prediction_records(rows[:1], np.array([0.4]), "test")
    evaluate.write_report(named, tmp_path / "rerun")
    assert (tmp_path / "rerun" / "by_distortion.png").is_file()
    evaluate.write_report(unnamed, tmp_path / "rerun")
    assert not (tmp_path / "rerun" / "by_distortion.png").exists()


@pytest.mark.parametrize("label", [float("nan"), float("inf"), "0.5", 1.5])
def test_a_bad_label_in_a_record_row_is_named(label):
    """Rows given as dicts (the API takes them) are not checked by read_manifest: a NaN,
    infinite, text or out-of-range label must be an error naming the row, not a report-wide
    "metrics: targets hold non-finite values (first at kept item 0)" or a MSE of NaN."""
    rows = [{"id": "a", "haaqi_score": 0.5}, {"id": "b", "haaqi_score": label}]
    with pytest.raises(ValueError, match=r"split 'test', row 1 \(b\): .*haaqi_score"):
        evaluate.prediction_records(rows, np.array([0.1, 0.2]), "test")


def test_by_distortion_colours_each_type_by_all_its_splits(tmp_path, monkeypatch):
    """A distortion whose clips sit in two splits is shown as in both, not in its larger one."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [{"id": f"r{i}", "haaqi_score": 0.1 * i, "distortion": "noise" if i < 3 else "tilt"}
            for i in range(6)]
    records = (evaluate.prediction_records(rows[:2], np.array([0.2, 0.3]), "valid")
               + evaluate.prediction_records(rows[2:3], np.array([0.3]), "test_seen")
               + evaluate.prediction_records(rows[3:], np.array([0.5, 0.4, 0.6]), "test_seen"))
    monkeypatch.setattr(plt, "close", lambda *a, **k: None)
    evaluate.write_report(records, tmp_path)
    legends = [t.get_text() for fig in map(plt.figure, plt.get_fignums())
               for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert "prediction (test_seen, valid)" in legends and "prediction (test_seen)" in legends
    plt.close("all")


def test_missing_split_is_named(tmp_path):
    manifest = _helpers.write_tiny_dataset(tmp_path / "data", n_train=2, n_valid=1, n_test=1)
    with pytest.raises(ValueError, match=r"no rows in split\(s\) \['test'\]"):
        evaluate.evaluate_manifest(tmp_path / "model", manifest, tmp_path / "o", splits=["test"])


def test_rows_of_one_channel_are_scored_on_that_channel(tmp_path):
    from haaqi_jax import config as cfglib
    from haaqi_jax.model import HAAQINet
    from haaqi_jax.train import loop

    rng = np.random.default_rng(5)
    stereo = np.stack([0.1 * rng.standard_normal(16000), 0.02 * rng.standard_normal(16000)], 1)
    sf.write(tmp_path / "s.wav", stereo, 16000, subtype="FLOAT")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(
        {"id": f"s/{ear}", "file_path": "s.wav", "audiogram": [20] * 8, "haaqi_score": score,
         "split": "test", "channel": ear, "group": "s"}) + "\n"
        for ear, score in (("left", 0.3), ("right", 0.7))))
    net = loop.build_model(cfglib.load_config_file(_helpers.TINY))
    net.save(tmp_path / "model")
    evaluate.evaluate_manifest(tmp_path / "model", manifest, tmp_path / "eval", splits=["test"])
    rows = {r["id"]: float(r["prediction"])
            for r in csv.DictReader((tmp_path / "eval" / "predictions.csv").open())}
    stored = sf.read(tmp_path / "s.wav", dtype="float32")[0]
    expected = HAAQINet.load(tmp_path / "model").predict(
        [stored[:, 0], stored[:, 1]], 16000, [[20] * 8] * 2, progress=False)
    np.testing.assert_allclose([rows["s/left"], rows["s/right"]], expected, atol=1e-5)
    assert abs(expected[0] - expected[1]) > 1e-3  # the channels do score differently


def test_evaluate_skips_bad_rows_and_scores_rows_without_a_split(tmp_path, capsys):
    from haaqi_jax import config as cfglib
    from haaqi_jax.train import loop

    manifest = _helpers.write_tiny_dataset(tmp_path / "data")
    loop.build_model(cfglib.load_config_file(_helpers.TINY)).save(tmp_path / "model")
    rows = [json.loads(line) for line in manifest.read_text().splitlines()][:4]
    for row in rows:
        row.pop("split", None)
    sf.write(tmp_path / "data" / "silent.wav", np.zeros(16000, np.float32), 16000)
    rows.append(dict(rows[0], id="silent", file_path="silent.wav"))
    edited = tmp_path / "data" / "edited.jsonl"
    edited.write_text("\n".join(json.dumps(r) for r in rows[:2]) + '\n{"id": "cut",\n'
                      + "\n".join(json.dumps(r) for r in rows[2:]) + "\n")
    out = tmp_path / "eval"
    code = cli.main(["evaluate", "--model", str(tmp_path / "model"), "--manifest", str(edited),
                     "--out", str(out), "--batch-size", "4"])
    assert code == 1                                         # done, but some rows failed
    err = capsys.readouterr().err
    assert "skipped line 3:" in err and "skipped id 'silent':" in err and "silent" in err
    skipped = json.loads((out / "skipped.json").read_text())
    assert [s.get("line", s.get("id")) for s in skipped] == [3, "silent"]
    assert skipped[0]["id"] == "3"              # bad JSON: the row's id is its line
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["overall"]["n"] == 4 and list(metrics["by_split"]) == ["unsplit"]
    assert metrics["by_split"]["unsplit"]["label_mean"] == pytest.approx(
        np.mean([r["haaqi_score"] for r in rows[:4]]))
    # A clean rerun into the same folder leaves no list of the earlier run's skips behind.
    clean = tmp_path / "data" / "clean.jsonl"
    clean.write_text("\n".join(json.dumps(r) for r in rows[:4]) + "\n")
    assert cli.main(["evaluate", "--model", str(tmp_path / "model"), "--manifest", str(clean),
                     "--out", str(out), "--batch-size", "4"]) == 0
    assert not (out / "skipped.json").exists()


def test_report_draws_the_rows_of_one_group_together(tmp_path):
    """Two ears per clip (rows sharing a group): the report's intervals resample clips."""
    from haaqi_jax.train import metrics as metrics_lib

    rng = np.random.default_rng(0)
    labels = np.repeat(rng.uniform(0, 1, 20), 2)
    preds = labels + 0.2 * rng.standard_normal(40)
    records = [{"id": f"c{i // 2}{'LR'[i % 2]}", "split": "test", "distortion": "noise",
                "label": float(t), "prediction": float(p), "group": f"c{i // 2}"}
               for i, (t, p) in enumerate(zip(labels, preds))]
    evaluate.write_report(records, tmp_path)
    report = json.loads((tmp_path / "metrics.json").read_text())
    groups = [r["group"] for r in records]
    assert report["overall"]["ci95"] == metrics_lib.bootstrap_intervals(preds, labels,
                                                                        groups=groups)
    assert report["overall"]["ci95"] != metrics_lib.bootstrap_intervals(preds, labels)
    assert "rows of one manifest group drawn together" in (tmp_path / "table.md").read_text()
    rows = list(csv.DictReader((tmp_path / "predictions.csv").open()))
    assert [r["group"] for r in rows] == groups


def test_a_splits_interval_is_scipys_bootstrap_of_that_split(tmp_path):
    """Each split's 95 % interval resamples that split's clips only (scipy's percentile
    bootstrap on them, within Monte-Carlo error); the splits differ in noise, so an interval
    drawn from all rows would sit elsewhere."""
    import scipy.stats

    rng = np.random.default_rng(2)
    records = []
    for split, noise in (("valid", 0.08), ("test_unseen", 0.4)):
        labels = rng.uniform(0, 1, 120)
        preds = labels + noise * rng.standard_normal(120)
        records += [{"id": f"{split}{i}", "split": split, "distortion": "noise",
                     "label": float(t), "prediction": float(p)}
                    for i, (t, p) in enumerate(zip(labels, preds))]
    evaluate.write_report(records, tmp_path)
    report = json.loads((tmp_path / "metrics.json").read_text())
    for split in ("valid", "test_unseen"):
        p = np.array([r["prediction"] for r in records if r["split"] == split])
        t = np.array([r["label"] for r in records if r["split"] == split])
        ref = scipy.stats.bootstrap((p, t), lambda a, b: scipy.stats.pearsonr(a, b)[0],
                                    paired=True, vectorized=False, method="percentile",
                                    n_resamples=2000, random_state=0).confidence_interval
        low, high = report["by_split"][split]["ci95"]["lcc"]
        assert low == pytest.approx(ref.low, abs=0.02) and high == pytest.approx(ref.high,
                                                                                abs=0.02)


def test_a_scatter_of_many_distortions_tells_each_apart(tmp_path, monkeypatch):
    """26 distortions on a 20-colour palette: six pairs shared a colour, and the legend sat on
    the points. Now each has its own colour and marker, and the legend is beside the axes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    records = [{"id": f"{d}{k}", "split": "test", "distortion": f"type{d:02d}",
                "label": float(rng.uniform()), "prediction": float(rng.uniform())}
               for d in range(26) for k in range(3)]
    monkeypatch.setattr(plt, "close", lambda *a, **k: None)
    evaluate.scatter_plot(records, tmp_path / "s.png", color_by="distortion")
    (ax,) = plt.gcf().axes
    looks = {(tuple(np.round(c.get_facecolor()[0], 3)), c.get_paths()[0].vertices.tobytes())
             for c in ax.collections}
    assert len(ax.collections) == len(looks) == 26
    legend = ax.get_legend()
    plt.gcf().canvas.draw()
    assert legend.get_window_extent().x0 > ax.get_window_extent().x1   # beside, not over
    plt.close("all")


def test_a_large_split_is_read_and_scored_a_chunk_at_a_time(tmp_path, monkeypatch):
    """Host memory stays bounded on a large set: no predict call holds more than
    EVAL_CHUNK_BATCHES * batch_size clips, and the scores are those of one call over all."""
    from haaqi_jax import config as cfglib
    from haaqi_jax.model import HAAQINet
    from haaqi_jax.train import loop

    rng = np.random.default_rng(7)
    rows = []
    for i in range(7):
        sf.write(tmp_path / f"c{i}.wav", 0.1 * rng.standard_normal(13000 - 1500 * i), 16000,
                 subtype="FLOAT")                               # longest first
        rows.append({"id": f"c{i}", "file_path": f"c{i}.wav", "audiogram": [20] * 8,
                     "haaqi_score": float(rng.uniform()), "split": "test"})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loop.build_model(cfglib.load_config_file(_helpers.TINY)).save(tmp_path / "model")
    monkeypatch.setattr(evaluate, "EVAL_CHUNK_BATCHES", 1, raising=False)
    calls, predict = [], HAAQINet.predict

    def spy(self, waveforms, *args, **kwargs):
        calls.append([len(w) for w in waveforms])
        return predict(self, waveforms, *args, **kwargs)

    monkeypatch.setattr(HAAQINet, "predict", spy)
    evaluate.evaluate_manifest(tmp_path / "model", manifest, tmp_path / "eval", batch_size=3,
                               progress=False)
    # shortest first, so that each chunk's batches hold clips of like length
    assert calls == [[4000, 5500, 7000], [8500, 10000, 11500], [13000]]
    written = list(csv.DictReader((tmp_path / "eval" / "predictions.csv").open()))
    assert [r["id"] for r in written] == [f"c{i}" for i in range(7)]      # manifest order
    got = {r["id"]: float(r["prediction"]) for r in written}
    waves = [sf.read(tmp_path / f"c{i}.wav", dtype="float32")[0] for i in range(7)]
    expected = predict(HAAQINet.load(tmp_path / "model"), waves, 16000, [[20] * 8] * 7,
                       progress=False)
    np.testing.assert_allclose([got[f"c{i}"] for i in range(7)], expected, atol=1e-5)


def test_an_interrupted_evaluation_resumes_scoring_only_the_rest(tmp_path, monkeypatch):
    """A kill or Ctrl-C mid-way keeps the scored chunks in the report folder's journal; the
    same call again scores only the clips not scored yet, and the report equals an
    uninterrupted run's."""
    from haaqi_jax import config as cfglib
    from haaqi_jax.model import HAAQINet
    from haaqi_jax.train import loop

    rng = np.random.default_rng(8)
    rows = []
    for i in range(6):
        sf.write(tmp_path / f"c{i}.wav", 0.1 * rng.standard_normal(6000 + 1000 * i), 16000,
                 subtype="FLOAT")
        rows.append({"id": f"c{i}", "file_path": f"c{i}.wav", "audiogram": [20] * 8,
                     "haaqi_score": float(rng.uniform()), "split": ("a", "b")[i % 2]})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loop.build_model(cfglib.load_config_file(_helpers.TINY)).save(tmp_path / "model")
    monkeypatch.setattr(evaluate, "EVAL_CHUNK_BATCHES", 1, raising=False)
    run = lambda out: evaluate.evaluate_manifest(tmp_path / "model", manifest, tmp_path / out,
                                                 batch_size=2, progress=False)
    run("whole")
    assert not (tmp_path / "whole" / evaluate.SCORES_JOURNAL).exists()
    scored, predict = [], HAAQINet.predict

    def counting(self, waveforms, *args, **kwargs):
        if interrupt and len(scored) == 2:
            raise KeyboardInterrupt
        scored.append(len(waveforms))
        return predict(self, waveforms, *args, **kwargs)

    monkeypatch.setattr(HAAQINet, "predict", counting)
    interrupt = True
    with pytest.raises(KeyboardInterrupt):     # split a's 3 clips in chunks of 2, then b's
        run("resumed")
    assert scored == [2, 1]
    scored.clear()
    interrupt = False
    run("resumed")
    assert sum(scored) == 3                                  # split b's clips alone
    assert not (tmp_path / "resumed" / evaluate.SCORES_JOURNAL).exists()
    read = lambda out: list(csv.DictReader((tmp_path / out / "predictions.csv").open()))
    assert read("resumed") == read("whole")


#: WHO 2021 grades (World report on hearing, Table 1.3), written out here apart from the
#: library's: (name, lowest PTA in the grade, first PTA above it), dB HL.
WHO_2021_GRADES = [("normal", -np.inf, 20.0), ("mild", 20.0, 35.0), ("moderate", 35.0, 50.0),
                   ("moderately_severe", 50.0, 65.0), ("severe", 65.0, 80.0),
                   ("profound", 80.0, 95.0), ("complete", 95.0, np.inf)]
#: Columns of 500, 1000, 2000 and 4000 Hz in an audiogram of the 8 standard frequencies.
PTA_COLUMNS = [1, 2, 3, 5]


def _listener_rows(rng, n_random=60):
    """Dict rows of random listeners: every grade, a PTA exactly on each bound, and three rows
    without an audiogram. Returns (rows, pta of each row or NaN where it has no audiogram)."""
    levels = []
    for bound in [20.0, 35.0, 50.0, 65.0, 80.0, 95.0] * 2:           # PTA on the bound itself
        row = rng.uniform(0, 100, 8).round()
        row[PTA_COLUMNS] = bound + np.array([-5.0, 5.0, -3.0, 3.0])
        levels.append(row)
    offsets = rng.uniform(-10, 110, n_random)                      # then every degree of loss
    levels += list(np.clip(offsets[:, None] + rng.uniform(-8, 8, (n_random, 8)), -20, 130))
    levels = np.array(levels)
    pta = levels[:, PTA_COLUMNS].mean(axis=1)
    label = np.clip(0.95 - 0.008 * pta + 0.1 * rng.standard_normal(len(pta)), 0, 1)
    rows = [{"id": f"l{i}", "haaqi_score": float(t), "distortion": "noise",
             "audiogram": [float(v) for v in a]} for i, (t, a) in enumerate(zip(label, levels))]
    rows += [{"id": "none", "haaqi_score": 0.5, "audiogram": None},
             {"id": "absent", "haaqi_score": 0.4},
             {"id": "absent2", "haaqi_score": 0.6}]
    return rows, np.concatenate([pta, [np.nan] * 3])


def test_report_breaks_down_by_hearing_loss_grade(tmp_path):
    """Each WHO grade's numbers are scipy's on the clips whose PTA falls in it (bounds written
    out in this test); rows without an audiogram are left out, counted and noted."""
    rng = np.random.default_rng(11)
    rows, pta = _listener_rows(rng)
    pred = np.clip(np.array([r["haaqi_score"] for r in rows])
                   + 0.15 * rng.standard_normal(len(rows)), 0, 1)
    records = evaluate.prediction_records(rows, pred, "test")
    evaluate.write_report(records, tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    by_grade = metrics["by_hearing_loss"]
    t = np.array([r["haaqi_score"] for r in rows])
    present = []
    for name, low, high in WHO_2021_GRADES:
        sel = (pta >= low) & (pta < high)                       # NaN: in no grade
        if not sel.any():
            assert name not in by_grade
            continue
        present.append(name)
        entry = by_grade[name]
        assert entry["n"] == sel.sum() >= 3, name
        assert entry["lcc"] == pytest.approx(scipy.stats.pearsonr(pred[sel], t[sel])[0],
                                             abs=1e-9), name
        assert entry["srcc"] == pytest.approx(scipy.stats.spearmanr(pred[sel], t[sel])[0],
                                              abs=1e-9), name
        assert entry["mse"] == pytest.approx(np.mean((pred[sel] - t[sel]) ** 2), abs=1e-12)
        assert entry["label_mean"] == pytest.approx(t[sel].mean(), abs=1e-12)
        assert entry["prediction_mean"] == pytest.approx(pred[sel].mean(), abs=1e-12)
        assert entry["pta_db_range"] == [None if np.isinf(low) else low,
                                         None if np.isinf(high) else high]
    assert len(present) == 7 and set(by_grade) == set(present)
    assert metrics["hearing_loss_left_out"] == 3
    # Tables: one row per grade, mildest first (alphabetical would put "complete" first).
    table = list(csv.DictReader((tmp_path / "table.csv").open()))
    graded = [r for r in table if r["subset"].startswith("hearing_loss=")]
    assert [r["subset"] for r in graded] == [f"hearing_loss={g}" for g in present]
    for r in graded:
        entry = by_grade[r["subset"].split("=", 1)[1]]
        assert int(r["n"]) == entry["n"] and float(r["lcc"]) == pytest.approx(entry["lcc"])
    md = (tmp_path / "table.md").read_text()
    assert [line.split("|")[1].strip() for line in md.splitlines()
            if line.startswith("| hearing_loss=")] == [r["subset"] for r in graded]
    assert "3 clips without an audiogram are left out of the hearing_loss rows" in md
    # predictions.csv: each clip's PTA and grade; empty for the rows without an audiogram
    written = list(csv.DictReader((tmp_path / "predictions.csv").open()))
    heard = ~np.isnan(pta)
    np.testing.assert_allclose([float(r["pta_db"]) for r in written[:heard.sum()]], pta[heard],
                               atol=1e-4)                       # levels are stored as float32
    assert [(r["pta_db"], r["hearing_loss"]) for r in written[heard.sum():]] == [("", "")] * 3
    import matplotlib.image
    assert matplotlib.image.imread(tmp_path / "by_hearing_loss.png").ndim == 3


def test_a_report_without_audiograms_has_no_hearing_loss_breakdown(tmp_path):
    """Hand-made records (no pta_db) or rows without audiograms: no rows, no plot (an earlier
    run's plot in the folder goes), and no crash."""
    rng = np.random.default_rng(3)
    rows, _ = _listener_rows(rng, n_random=10)
    evaluate.write_report(evaluate.prediction_records(rows, np.full(len(rows), 0.5), "t"),
                          tmp_path)
    assert (tmp_path / "by_hearing_loss.png").is_file()
    bare = [{"id": f"b{i}", "split": "t", "distortion": "x", "label": 0.1 * i,
             "prediction": 0.1 * i + 0.05} for i in range(5)]
    evaluate.write_report(bare, tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["by_hearing_loss"] == {} and metrics["hearing_loss_left_out"] == 5
    assert not (tmp_path / "by_hearing_loss.png").exists()
    assert "5 clips without an audiogram" in (tmp_path / "table.md").read_text()
    # A hand-made record's NaN PTA is not a missing audiogram: named, not left out.
    with pytest.raises(ValueError, match=r"record 1 \(id 'b1'\): pta_db nan is not a finite"):
        evaluate.write_report([bare[0], {**bare[1], "pta_db": float("nan")}], tmp_path)


def test_a_rows_audiogram_object_is_graded_and_a_bad_one_is_named():
    """An Audiogram at other frequencies is read at 0.5/1/2/4 kHz in log frequency; a malformed
    audiogram in a dict row is an error naming the row and the key, not a missing one."""
    from haaqi_jax.audiogram import Audiogram

    odd = Audiogram([30.0, 40.0, 60.0], [1000.0, 2000.0, 4000.0])     # 500 Hz held at 30
    rows = [{"id": "odd", "haaqi_score": 0.5, "audiogram": odd}]
    (record,) = evaluate.prediction_records(rows, np.array([0.4]), "test")
    assert record["pta_db"] == pytest.approx(40.0) and record["hearing_loss"] == "moderate"
    for bad in ([10.0] * 7, [10.0] * 7 + [float("nan")]):
        with pytest.raises(ValueError, match=r"split 'test', row 1 \(b\): key 'audiogram'"):
            evaluate.prediction_records(
                rows + [{"id": "b", "haaqi_score": 0.5, "audiogram": bad}], np.array([0.4, 0.5]),
                "test")


def test_report_breaks_down_by_listener_shape_when_rows_name_it(tmp_path):
    """The demo's rows name their listener's audiogram shape: one more breakdown, scipy's
    numbers on the rows of each shape; rows that name none are left out of it."""
    from haaqi_jax.data.manifest import ManifestRow

    rng = np.random.default_rng(4)
    shapes = np.array(["flat", "normal", "cookie_bite"])[rng.integers(0, 3, 30)]
    labels = rng.uniform(0, 1, 30)
    rows = [ManifestRow(id=f"s{i}", file_path=f"s{i}.wav", audiogram=[30.0] * 8,
                        haaqi_score=float(t), listener_shape=str(shape))
            for i, (t, shape) in enumerate(zip(labels, shapes))]
    rows.append(ManifestRow(id="plain", file_path="p.wav", audiogram=[30.0] * 8,
                            haaqi_score=0.5))
    pred = np.clip(np.append(labels, 0.5) + 0.2 * rng.standard_normal(31), 0, 1)
    evaluate.write_report(evaluate.prediction_records(rows, pred, "test"), tmp_path)
    by_shape = json.loads((tmp_path / "metrics.json").read_text())["by_listener_shape"]
    assert sorted(by_shape) == ["cookie_bite", "flat", "normal"]
    for shape, entry in by_shape.items():
        sel = np.append(shapes == shape, False)
        assert entry["n"] == sel.sum()
        assert entry["lcc"] == pytest.approx(scipy.stats.pearsonr(pred[sel], np.append(
            labels, 0.5)[sel])[0], abs=1e-9)
        assert entry["label_mean"] == pytest.approx(labels[sel[:-1]].mean(), abs=1e-12)
    table = [r["subset"] for r in csv.DictReader((tmp_path / "table.csv").open())]
    assert [s for s in table if s.startswith("listener_shape=")] == [
        "listener_shape=cookie_bite", "listener_shape=flat", "listener_shape=normal"]
    written = list(csv.DictReader((tmp_path / "predictions.csv").open()))
    assert [r["listener_shape"] for r in written] == list(shapes) + [""]
    # Without shapes: an empty breakdown, no table rows.
    bare = [{"id": f"b{i}", "split": "t", "distortion": "x", "label": 0.1 * i,
             "prediction": 0.1 * i} for i in range(4)]
    evaluate.write_report(bare, tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text())["by_listener_shape"] == {}


def test_a_scatter_coloured_by_hearing_loss_lists_the_grades_mildest_first(tmp_path,
                                                                            monkeypatch):
    """`color_by="hearing_loss"` (report.color_by, --color-by): one colour per WHO grade in
    the legend, mildest first (not alphabetical: "complete" would lead), each with its count,
    and the clips without an audiogram as a group of their own, last."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(11)
    rows, pta = _listener_rows(rng)
    records = evaluate.prediction_records(rows, rng.uniform(size=len(rows)), "test")
    monkeypatch.setattr(plt, "close", lambda *a, **k: None)
    evaluate.scatter_plot(records, tmp_path / "s.png", color_by="hearing_loss")
    (ax,) = plt.gcf().axes
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    counts = [((pta >= low) & (pta < high)).sum() for _, low, high in WHO_2021_GRADES]
    assert legend == [f"{name} ({n})" for (name, _, _), n in zip(WHO_2021_GRADES, counts)
                      if n] + [f"no audiogram ({np.isnan(pta).sum()})"]
    plt.close("all")
    evaluate.check_color_by("hearing_loss")


def test_a_pure_tone_average_on_a_bound_in_tenths_of_a_db_is_graded_above_it():
    """Audiograms in 0.1 dB steps are stored as float32: a row whose exact PTA is 50 dB HL is
    moderately_severe, and its pta_db reads 50, not 49.999999."""
    rows = [{"id": "a", "haaqi_score": 0.5,
             "audiogram": [10.0, 49.4, 34.6, 69.2, 30.0, 46.8, 40.0, 50.0]},
            {"id": "b", "haaqi_score": 0.5,
             "audiogram": [10.0, 27.3, 30.3, 31.4, 30.0, -9.0, 40.0, 50.0]}]
    records = evaluate.prediction_records(rows, np.array([0.4, 0.6]), "test")
    assert [(r["pta_db"], r["hearing_loss"]) for r in records] == [
        (50.0, "moderately_severe"), (20.0, "mild")]
    assert list(evaluate.hearing_loss_of_records(records)) == ["moderately_severe", "mild"]


def test_predictions_csv_grades_hand_made_records_as_the_report_does(tmp_path):
    """A record with only pta_db (or a stale hearing_loss) gets, in predictions.csv and
    examples.json, the grade its row of the report counts it under (WHO 2021, bounds here)."""
    pta = [5.0, 20.0, 34.9, 50.0, 65.0, 96.0]
    expected = ["normal", "mild", "mild", "moderately_severe", "severe", "complete"]
    records = [{"id": f"r{i}", "split": "t", "distortion": "x", "label": 0.1 + 0.1 * i,
                "prediction": 0.12 + 0.1 * i, "pta_db": p} for i, p in enumerate(pta)]
    records[2]["hearing_loss"] = "severe"              # stale: the report grades by pta_db
    records.append({"id": "bare", "split": "t", "distortion": "x", "label": 0.5,
                    "prediction": 0.5})
    evaluate.write_report(records, tmp_path, num_examples=10)
    written = list(csv.DictReader((tmp_path / "predictions.csv").open()))
    assert [r["hearing_loss"] for r in written] == expected + [""]
    examples = json.loads((tmp_path / "examples.json").read_text())
    assert [e["hearing_loss"] for e in examples] == expected + [None]
    by_grade = json.loads((tmp_path / "metrics.json").read_text())["by_hearing_loss"]
    assert {g: e["n"] for g, e in by_grade.items()} == {
        g: expected.count(g) for g in expected}
    assert records[0].get("hearing_loss") is None          # the caller's records untouched


# ------------------------------------------------------------------ how the plots read


def _texts(fig):
    return "\n".join([fig._suptitle.get_text() if fig._suptitle else ""]
                     + [ax.get_title(loc) for ax in fig.axes for loc in ("left", "center")])


def _demo_records(rng, names, splits=("valid", "test_seen", "test_unseen"), per=3):
    return [{"id": f"{i}-{k}", "split": splits[(i + k) % len(splits)], "distortion": name,
             "label": float(rng.uniform()), "prediction": float(rng.uniform()),
             "pta_db": float(rng.uniform(0, 90))}
            for i, name in enumerate(names) for k in range(per)]


#: 64 distortion names, many of them combinations, as a large manifest has.
_BASE = ["babble", "tilt_down", "multi_resonance", "spectral_subtraction", "highpass",
         "lowpass", "compression", "resonance"]
_MANY = ["+".join(c) for k in (2, 3) for c in itertools.combinations(_BASE, k)][:64]


@pytest.mark.parametrize("which", ["scatter", "distortion", "hearing_loss"])
def test_every_report_plot_names_its_splits_and_clip_count(which):
    """A report plot pools splits: it says which, and over how many clips (a PNG copied out of
    its folder said neither)."""
    records = _demo_records(np.random.default_rng(1), _BASE[:5])
    report = evaluate.compute_report_metrics(records)
    fig = {"scatter": lambda: drawn(evaluate.scatter_plot, records, Path("/dev/null")),
           "distortion": lambda: drawn(evaluate.distortion_plot, records, report,
                                        Path("/dev/null")),
           "hearing_loss": lambda: drawn(evaluate.hearing_loss_plot, records, report,
                                          Path("/dev/null"))}[which]()
    text = _texts(fig)
    assert "valid, test_seen, test_unseen" in text and "15 clips" in text, text


@pytest.mark.parametrize("color_by, names", [("split", _BASE[:1]), ("hearing_loss", _BASE[:1]),
                                              ("distortion", _MANY)])
def test_a_scatter_legend_is_whole_and_off_the_points(tmp_path, color_by, names):
    """Beside the axes for any number of groups (inside, it hid the over-predicted clips in the
    top-left corner), and whole: 64 distortions ran off the bottom and right of the figure."""
    records = _demo_records(np.random.default_rng(2), names)
    fig = drawn(evaluate.scatter_plot, records, tmp_path / "s.png", color_by=color_by)
    (ax,) = fig.axes
    legend = ax.get_legend().get_window_extent()
    assert inside(legend, fig.bbox)
    assert not any(overlap(legend, a.get_window_extent())     # nor over a tick label
                   for a in [ax] + ax.get_xticklabels() + ax.get_yticklabels())
    assert len(ax.get_legend().get_texts()) == len({r[color_by] for r in records}
                                                   if color_by != "hearing_loss" else
                                                   set(evaluate.hearing_loss_of_records(records)))


def test_a_scatter_of_more_types_than_max_types_pools_the_rarest(tmp_path):
    from haaqi_jax.data.overview import MAX_TYPES
    rng = np.random.default_rng(6)
    names = [f"t{i:03d}" for i in range(MAX_TYPES + 10)]
    records = _demo_records(rng, names, per=1) + _demo_records(rng, ["zz_common"], per=5)
    fig = drawn(evaluate.scatter_plot, records, tmp_path / "s.png", color_by="distortion")
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    # The common type and the first MAX_TYPES - 2 one-clip names by name, then the rest pooled.
    assert len(texts) == MAX_TYPES and "zz_common (5)" in texts
    assert texts[-1] == f"{evaluate.OTHER_GROUPS} (12)"
    assert sum(len(c.get_offsets()) for c in fig.axes[0].collections) == len(records)
    assert inside(fig.axes[0].get_legend().get_window_extent(), fig.bbox)


def test_a_scatter_shows_clips_on_the_edges_whole():
    """Labels and predictions of exactly 0 or 1 (clean references) sat on the axes' edges,
    three quarters of each marker cut off."""
    records = [{"id": str(i), "split": "t", "distortion": "x", "label": float(i % 2),
                "prediction": float(i % 2)} for i in range(4)]
    (ax,) = drawn(evaluate.scatter_plot, records, Path("/dev/null")).axes
    for low, high in (ax.get_xlim(), ax.get_ylim()):
        assert low < 0 < 1 < high <= 1.05


@pytest.mark.parametrize("names, splits", [
    (["noise"], tuple(f"split_with_a_long_name_{i}" for i in range(8))),
    (_MANY, ("valid", "test_seen", "test_unseen"))])
def test_the_distortion_plot_fits_its_text_and_keeps_its_legend_off_the_rows(names, splits):
    """One distortion: a 1.5 in high figure cut off its title and x label; a type in many
    splits wrote one legend line wider than the figure; and the legend sat on the top rows."""
    records = _demo_records(np.random.default_rng(3), names, splits)
    report = evaluate.compute_report_metrics(records)
    fig = drawn(evaluate.distortion_plot, records, report, Path("/dev/null"))
    (ax,) = fig.axes
    legend = ax.get_legend().get_window_extent()
    assert inside(legend, fig.bbox) and inside(ax.get_tightbbox(), fig.bbox)
    assert not overlap(legend, ax.get_window_extent())
    assert ax.get_window_extent().width > 0.4 * fig.bbox.width      # long names leave room


def test_the_distortion_plot_draws_at_most_max_types_rows_with_the_most_clips():
    """A manifest of per-clip free-text distortion names made a row per name: a figure
    hundreds of inches high. The rows kept are the types with the most clips."""
    from haaqi_jax.data.overview import MAX_TYPES
    rng = np.random.default_rng(5)
    records = _demo_records(rng, [f"one{i:02d}" for i in range(MAX_TYPES + 6)], per=1)
    records += _demo_records(rng, ["zz_big", "zz_bigger"], per=4)
    report = evaluate.compute_report_metrics(records)
    assert len(report["by_distortion"]) == MAX_TYPES + 8          # the metrics keep them all
    fig = drawn(evaluate.distortion_plot, records, report, Path("/dev/null"))
    (ax,) = fig.axes
    shown = {t.get_text().rsplit(" (", 1)[0] for t in ax.get_yticklabels()}
    assert shown == {"zz_big", "zz_bigger"} | {f"one{i:02d}" for i in range(MAX_TYPES - 2)}
    assert f"(the {MAX_TYPES} of {MAX_TYPES + 8} with the most clips)" in ax.get_title()
    assert inside(ax.get_tightbbox(), fig.bbox) and fig.get_size_inches()[1] < 25


def test_the_hearing_loss_plot_keeps_its_legends_off_the_boxes_and_bars():
    records = _demo_records(np.random.default_rng(4), _BASE, per=6)
    for r in records[:20]:
        r["label"], r["prediction"] = 0.05, 0.97                   # boxes reach both ends
    report = evaluate.compute_report_metrics(records)
    fig = drawn(evaluate.hearing_loss_plot, records, report, Path("/dev/null"))
    for ax in fig.axes:
        legend = ax.get_legend().get_window_extent()
        assert inside(legend, fig.bbox)
        data = (list(ax.patches) + list(ax.collections)
                + [l for l in ax.lines if len(l.get_xdata()) and l.get_linestyle() != "--"])
        hits = [a for a in data if overlap(legend, a.get_window_extent())]
        assert not hits, (ax.get_title(), hits[:3])


# ----------------------------------------------------------------------------- your own metrics

#: table.csv's header before registered metrics could join the report (a report without them
#: must stay byte for byte as it was: scripts read these files).
OLD_CSV_HEADER = "subset,n,lcc,srcc,mse,label_mean,prediction_mean"
OLD_MD_HEADER = ["| subset | n | LCC | SRCC | MSE | mean label | mean prediction |",
                 "|---|---|---|---|---|---|---|"]


def _report_records(n=40, seed=7):
    """Records filling every kind of report entry: three splits, four distortions and one of a
    single clip, groups, audiograms (some missing) and listener shapes (some missing)."""
    rng = np.random.default_rng(seed)
    return [{"id": f"c{i}", "split": ("valid", "test_seen", "test_unseen")[i % 3],
             "distortion": ("noise", "tilt", "clip", "solo")[i % 4] if i < n - 1 else "single",
             "label": float(rng.uniform()), "prediction": float(rng.uniform()),
             "group": f"g{i // 2}", "pta_db": float(rng.uniform(0, 100)) if i % 7 else None,
             "listener_shape": ("flat", "sloping")[i % 2] if i % 5 else None}
            for i in range(n)]


def _subset_masks(records):
    """{(section, key): (len(records),) bool} of every report entry, worked out here."""
    pta = np.array([np.nan if r["pta_db"] is None else r["pta_db"] for r in records])
    masks = {("overall", None): np.ones(len(records), bool)}
    for section, field in (("by_split", "split"), ("by_distortion", "distortion"),
                           ("by_listener_shape", "listener_shape")):
        for key in {r[field] for r in records} - {None}:
            masks[section, key] = np.array([r[field] == key for r in records])
    for name, low, high in WHO_2021_GRADES:
        sel = (pta >= low) & (pta < high)
        if sel.any():
            masks["by_hearing_loss", name] = sel
    return masks


def _without_column(text, column, sep):
    """`text` (table.csv or table.md's table lines) with column number `column` removed."""
    out = []
    for line in text.splitlines():
        cells = line.split(sep)
        if sep == "|" and line.startswith("|"):
            column_at = column + 1                   # a md line starts with an empty cell
        elif sep == ",":
            column_at = column
        else:
            out.append(line)
            continue
        out.append(sep.join(cells[:column_at] + cells[column_at + 1:]))
    return "\n".join(out) + "\n"


def test_a_registered_metric_is_in_every_report_entry_and_table(tmp_path, max_error):
    """report.metrics / --metric: the metric's value on each entry's clips (every section, down
    to a one-clip distortion), a table column after MSE; the rest of the report unchanged."""
    records = _report_records()
    evaluate.write_report(records, tmp_path / "plain")
    evaluate.write_report(records, tmp_path / "m", metrics=[max_error])
    report = json.loads((tmp_path / "m" / "metrics.json").read_text())
    pred = np.array([r["prediction"] for r in records])
    true = np.array([r["label"] for r in records])
    masks = _subset_masks(records)
    assert len(masks) == 1 + 3 + 5 + len(report["by_hearing_loss"]) + 2
    for (section, key), mask in masks.items():
        entry = report[section] if key is None else report[section][key]
        assert entry["n"] == mask.sum(), (section, key)
        assert entry[max_error] == pytest.approx(np.max(np.abs(pred[mask] - true[mask])),
                                                 abs=1e-12), (section, key)
    # Nothing else changed: without its key and column, the files are the plain report's.
    plain = json.loads((tmp_path / "plain" / "metrics.json").read_text())

    def drop(tree):
        return ({k: drop(v) for k, v in tree.items() if k != max_error}
                if isinstance(tree, dict) else tree)
    assert drop(report) == plain
    csv_text = (tmp_path / "m" / "table.csv").read_text()
    assert csv_text.splitlines()[0] == OLD_CSV_HEADER.replace("mse,", f"mse,{max_error},")
    assert _without_column(csv_text, 5, ",") == (tmp_path / "plain" / "table.csv").read_text()
    md = (tmp_path / "m" / "table.md").read_text()
    assert md.splitlines()[:2] == [
        f"| subset | n | LCC | SRCC | MSE | {max_error} | mean label | mean prediction |",
        "|---|---|---|---|---|---|---|---|"]
    assert _without_column(md, 5, "|") == (tmp_path / "plain" / "table.md").read_text()
    for name in ("predictions.csv", "examples.json"):
        assert (tmp_path / "m" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()
    rows = {r["subset"]: r for r in csv.DictReader(csv_text.splitlines())}
    assert float(rows["distortion=single"][max_error]) == report["by_distortion"]["single"][
        max_error]
    assert f"| all | 40 | " in md and f"| {report['overall'][max_error]:.4f} |" in md
    # The returned report is metrics.json's, the built-ins asked for are there once.
    again = evaluate.compute_report_metrics(records, metrics=(max_error, "lcc", max_error))
    assert again["overall"][max_error] == report["overall"][max_error]
    assert sorted(k for k in again["overall"] if k in ("lcc", max_error)) == ["lcc", max_error]


def test_a_report_without_metrics_of_your_own_is_as_before(tmp_path, max_error):
    """No extra metric (none, metrics=(), or only built-ins): every file byte for byte the
    same, and the tables' headers the old ones."""
    records = _report_records()
    evaluate.write_report(records, tmp_path / "a", color_by="hearing_loss")
    evaluate.write_report(records, tmp_path / "b", color_by="hearing_loss", metrics=())
    evaluate.write_report(records, tmp_path / "c", color_by="hearing_loss",
                          metrics=["lcc", "srcc", "mse"])
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["by_distortion.png", "by_hearing_loss.png", "examples.json",
                     "metrics.json", "predictions.csv", "scatter.png", "table.csv", "table.md"]
    for other in ("b", "c"):
        assert sorted(p.name for p in (tmp_path / other).iterdir()) == names
        for name in names:
            assert ((tmp_path / other / name).read_bytes()
                    == (tmp_path / "a" / name).read_bytes()), (other, name)
    assert (tmp_path / "a" / "table.csv").read_text().splitlines()[0] == OLD_CSV_HEADER
    assert (tmp_path / "a" / "table.md").read_text().splitlines()[:2] == OLD_MD_HEADER
    entry_keys = {"lcc", "srcc", "mse", "n", "label_mean", "prediction_mean"}
    report = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert set(report["overall"]) == entry_keys | {"ci95"}
    assert set(report["by_distortion"]["noise"]) == entry_keys


def test_an_unknown_report_metric_is_refused_before_anything_is_written(tmp_path, max_error):
    records = _report_records(n=8)
    for call in (lambda: evaluate.write_report(records, tmp_path / "out", metrics=["nope"]),
                 lambda: evaluate.compute_report_metrics(records, metrics=[max_error, "nope"])):
        with pytest.raises(ValueError, match=r"'nope'.*registered.*'lcc'.*'test_max_error'"):
            call()
    assert not (tmp_path / "out").exists()
    for bad in ("test_max_error", [3], None):       # a bare name would be read letter by letter
        with pytest.raises(ValueError, match=r"metrics must be a list of metric names"):
            evaluate.write_report(records, tmp_path / "out", metrics=bad)
    assert not (tmp_path / "out").exists()


def test_a_metric_that_fails_or_is_undefined_on_a_small_group_leaves_the_report_whole(
        tmp_path, capsys):
    """A metric that raises on one clip and is NaN on two: those entries read null in
    metrics.json and n/a in table.md (empty in table.csv, as an undefined LCC), a note on stderr
    names the metric, the subset and why; the other entries keep their values."""
    from haaqi_jax.train import metrics as metrics_lib

    def picky(pred, true, weight):
        if pred.size < 2:
            raise ZeroDivisionError("needs 2 clips")
        return float("nan") if pred.size == 2 else float(np.median(np.abs(pred - true)))

    records = _report_records(n=12)
    records[5]["distortion"] = "pair"
    records[6]["distortion"] = "pair"
    metrics_lib.register_metric("test_picky", picky, higher_is_better=False)
    try:
        evaluate.write_report(records, tmp_path, metrics=["test_picky"])
    finally:
        metrics_lib.unregister_metric("test_picky")
    err = capsys.readouterr().err
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["by_distortion"]["single"]["n"] == 1 and report["by_distortion"]["pair"]["n"] == 2
    assert report["by_distortion"]["single"]["test_picky"] is None
    assert report["by_distortion"]["pair"]["test_picky"] is None
    pred = np.array([r["prediction"] for r in records])
    true = np.array([r["label"] for r in records])
    assert report["overall"]["test_picky"] == pytest.approx(np.median(np.abs(pred - true)))
    assert all(e["test_picky"] is not None for e in report["by_split"].values())
    # One note per n/a entry (small hearing-loss grades and shapes have theirs too).
    lines = {l.split(" on ")[1].split(" (")[0]: l for l in err.splitlines() if "test_picky" in l}
    n_a = [f"{section[3:]}={key}" for section in ("by_split", "by_distortion", "by_hearing_loss",
                                                 "by_listener_shape")
           for key, entry in report[section].items() if entry["test_picky"] is None]
    assert sorted(lines) == sorted(n_a), err
    assert "(1 clip)" in lines["distortion=single"], err
    assert "ZeroDivisionError: needs 2 clips" in lines["distortion=single"], err
    assert "(2 clips)" in lines["distortion=pair"] and "NaN" in lines["distortion=pair"], err
    md = {l.split(" | ")[0]: l for l in (tmp_path / "table.md").read_text().splitlines()}
    assert md["| distortion=single"].split(" | ")[5] == "n/a"
    assert md["| distortion=pair"].split(" | ")[5] == "n/a"
    rows = {r["subset"]: r for r in csv.DictReader((tmp_path / "table.csv").open())}
    assert rows["distortion=single"]["test_picky"] == "" == rows["distortion=single"]["lcc"]
    assert float(rows["all"]["test_picky"]) == report["overall"]["test_picky"]


def test_evaluate_metric_option_adds_a_metric_from_an_imported_module(tmp_path, capsys):
    """`haaqi-jax --import my_metric.py evaluate --metric NAME`: the module registers it, the
    report has it; an unknown --metric is a one-line error before the model is read."""
    import sys
    from haaqi_jax import config as cfglib
    from haaqi_jax.train import loop
    from haaqi_jax.train import metrics as metrics_lib

    manifest = _helpers.write_tiny_dataset(tmp_path / "data", n_train=2, n_valid=2, n_test=2)
    loop.build_model(cfglib.load_config_file(_helpers.TINY)).save(tmp_path / "model")
    (tmp_path / "haaqi_test_cli_metric.py").write_text(
        "import numpy as np\n"
        "from haaqi_jax.train.metrics import register_metric\n\n"
        "@register_metric('test_cli_max_error', higher_is_better=False)\n"
        "def max_error(pred, true, weight):\n"
        "    return float(np.max(np.abs(pred - true)))\n")
    common = ["--import", str(tmp_path / "haaqi_test_cli_metric.py"), "evaluate",
              "--manifest", str(manifest), "--no-progress", "--splits", "valid", "test_seen"]
    try:
        assert cli.main(common + ["--model", str(tmp_path / "model"), "--out",
                                  str(tmp_path / "eval"), "--metric", "test_cli_max_error",
                                  "--metric", "mse"]) == 0
        assert cli.main(common + ["--model", str(tmp_path / "no_model"), "--out",
                                  str(tmp_path / "eval2"), "--metric", "nope"]) == 2
    finally:
        metrics_lib.unregister_metric("test_cli_max_error")
        sys.modules.pop("haaqi_test_cli_metric", None)
    captured = capsys.readouterr()
    err = captured.err
    assert "--metric: 'nope' is not registered" in err and "test_cli_max_error" in err, err
    assert not (tmp_path / "eval2").exists()
    rows = list(csv.DictReader((tmp_path / "eval" / "predictions.csv").open()))
    p = np.array([float(r["prediction"]) for r in rows])
    t = np.array([float(r["label"]) for r in rows])
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["overall"]["test_cli_max_error"] == pytest.approx(np.max(np.abs(p - t)),
                                                                    abs=1e-12)
    for split, entry in report["by_split"].items():
        sel = np.array([r["split"] == split for r in rows])
        assert entry["test_cli_max_error"] == pytest.approx(np.max(np.abs(p[sel] - t[sel])),
                                                            abs=1e-12)
    header = (tmp_path / "eval" / "table.csv").read_text().splitlines()[0]
    assert header == "subset,n,lcc,srcc,mse,test_cli_max_error,label_mean,prediction_mean"
    # The console lines name it too (mse, a built-in, once), with the value worked out here.
    printed = {line.split()[0]: line for line in captured.out.splitlines()[:3]}
    assert sorted(printed) == ["all", "test_seen", "valid"], captured.out
    for name, line in printed.items():
        sel = np.array([name == "all" or r["split"] == name for r in rows])
        assert line.endswith(f"  test_cli_max_error {np.max(np.abs(p[sel] - t[sel])):.4f}"), line
        assert line.count("MSE") == 1 and "mse" not in line, line


def test_console_summary_lines_add_the_requested_metrics():
    """`haaqi-jax evaluate` prints one line per split; --metric NAME adds NAME's value to each
    (n/a where null or NaN); without --metric the lines are as they always were."""
    nan = float("nan")
    report = {"overall": {"n": 8, "lcc": 0.5, "srcc": -0.25, "mse": 0.1, "max_error": 0.41234,
                          "other": 2.0},
              "by_split": {"valid": {"n": 4, "lcc": nan, "srcc": None, "mse": 0.2,
                                     "max_error": None, "other": nan},
                           "test": {"n": 4, "lcc": 0.75, "srcc": 0.5, "mse": 0.05,
                                    "max_error": 0.3, "other": 1.0}}}
    old = ["all                8 clips: LCC 0.5000  SRCC -0.2500  MSE 0.1000",
           "test               4 clips: LCC 0.7500  SRCC 0.5000  MSE 0.0500",
           "valid              4 clips: LCC n/a  SRCC n/a  MSE 0.2000"]
    assert evaluate.summary_lines(report) == old
    assert evaluate.summary_lines(report, ()) == old
    assert evaluate.summary_lines(report, ["max_error", "other"]) == [
        old[0] + "  max_error 0.4123  other 2.0000",
        old[1] + "  max_error 0.3000  other 1.0000",
        old[2] + "  max_error n/a  other n/a"]
    # One split: its line would repeat "all"'s.
    one = {"overall": report["overall"], "by_split": {"test": report["by_split"]["test"]}}
    assert evaluate.summary_lines(one, ["max_error"]) == [old[0] + "  max_error 0.4123"]


def test_a_metric_gets_the_predictions_first_and_the_labels_second(tmp_path):
    """A metric that is not symmetric (a bias: mean prediction minus mean label) is called as
    fn(pred, true, weight), on every entry's clips; worked out here with numpy."""
    from haaqi_jax.train import metrics as metrics_lib
    metrics_lib.register_metric("test_bias", lambda p, t, w: float(np.mean(p - t)),
                                higher_is_better=False)
    records = _report_records(n=12)
    try:
        report = evaluate.compute_report_metrics(records, ["test_bias"])
    finally:
        metrics_lib.unregister_metric("test_bias")
    pred = np.array([r["prediction"] for r in records])
    true = np.array([r["label"] for r in records])
    for (section, key), mask in _subset_masks(records).items():
        entry = report[section] if key is None else report[section][key]
        assert entry["test_bias"] == pytest.approx(np.mean(pred[mask]) - np.mean(true[mask]),
                                                   abs=1e-12), (section, key)
    assert report["overall"]["test_bias"] != pytest.approx(0.0, abs=1e-3)   # the premise


def test_an_infinite_metric_value_is_n_a_with_a_note_naming_it(tmp_path, capsys):
    """inf is no value either: null in metrics.json, NaN in the returned report (as a failure
    or a NaN), and the note says what came back."""
    from haaqi_jax.train import metrics as metrics_lib
    metrics_lib.register_metric(
        "test_inf", lambda p, t, w: float("inf") if p.size == 1 else float(p.size),
        higher_is_better=False)
    records = _report_records(n=12)
    try:
        report = evaluate.compute_report_metrics(records, ["test_inf"])
        evaluate.write_report(records, tmp_path, metrics=["test_inf"])
    finally:
        metrics_lib.unregister_metric("test_inf")
    assert report["by_distortion"]["single"]["n"] == 1
    assert np.isnan(report["by_distortion"]["single"]["test_inf"])
    assert report["overall"]["test_inf"] == 12.0
    err = capsys.readouterr().err
    assert ("note: metric 'test_inf' is n/a on distortion=single (1 clip): it returned inf"
            in err), err
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["by_distortion"]["single"]["test_inf"] is None


def test_a_metric_named_twice_is_one_column(tmp_path, max_error):
    """--metric NAME --metric NAME (or report.metrics naming the monitored metric again): one
    column, as the built-ins asked for are none."""
    records = _report_records(n=12)
    evaluate.write_report(records, tmp_path / "twice", metrics=[max_error, "lcc", max_error])
    evaluate.write_report(records, tmp_path / "once", metrics=[max_error])
    for name in ("table.csv", "table.md", "metrics.json"):
        assert ((tmp_path / "twice" / name).read_bytes()
                == (tmp_path / "once" / name).read_bytes()), name
    header = (tmp_path / "twice" / "table.csv").read_text().splitlines()[0]
    assert header == OLD_CSV_HEADER.replace("mse,", f"mse,{max_error},")


@pytest.mark.parametrize("key", ["label_mean", "prediction_mean", "ci95", "pta_db_range"])
def test_a_metric_named_like_an_entry_key_is_refused(key):
    """A metric registered as label_mean (it may be: the registry reserves the validation rows'
    keys only) would overwrite every report entry's own label_mean."""
    from haaqi_jax.train import metrics as metrics_lib
    metrics_lib.register_metric(key, lambda pred, true, weight: float(np.max(np.abs(pred - true))),
                                higher_is_better=False)
    try:
        with pytest.raises(ValueError, match=rf"report.metrics: {key!r} is a key of every "
                                             r"report entry"):
            evaluate.check_report_metrics([key], "report.metrics")
        with pytest.raises(ValueError, match=rf"{key!r} is a key of every report entry"):
            evaluate.compute_report_metrics(_report_records(n=6), [key])
    finally:
        metrics_lib.unregister_metric(key)
