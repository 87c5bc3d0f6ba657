"""`haaqi-jax compare`: several reports side by side, numbers vs scipy / numpy."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import scipy.stats

from haaqi_jax import cli, compare, evaluate


def _records(seed: int, noise: float) -> list[dict]:
    rng = np.random.default_rng(seed)
    records = []
    for split, n in (("valid", 30), ("test_unseen", 40)):
        labels = rng.uniform(0.1, 0.9, n)
        preds = np.clip(labels + noise * rng.standard_normal(n), 0, 1)
        records += [{"id": f"{split}{i}", "split": split, "distortion": "noise",
                     "label": float(t), "prediction": float(p)}
                    for i, (t, p) in enumerate(zip(labels, preds))]
    return records


@pytest.fixture()
def reports(tmp_path):
    """Three runs, given three ways: a workdir, a report folder, a metrics.json file."""
    records = [_records(s, 0.05 + 0.05 * s) for s in range(3)]
    evaluate.write_report(records[0], tmp_path / "seed0" / "report")
    evaluate.write_report(records[1], tmp_path / "seed1")
    evaluate.write_report(records[2], tmp_path / "seed2")
    return [tmp_path / "seed0", tmp_path / "seed1", tmp_path / "seed2" / "metrics.json"], records


def _truth(records, split):
    sel = [r for r in records if split == "all" or r["split"] == split]
    p = np.array([r["prediction"] for r in sel])
    t = np.array([r["label"] for r in sel])
    return {"lcc": scipy.stats.pearsonr(p, t)[0], "srcc": scipy.stats.spearmanr(p, t)[0],
            "mse": np.mean((p - t) ** 2), "n": len(sel)}


def test_rows_per_run_and_summaries_match_scipy_and_numpy(reports):
    paths, records = reports
    runs = {f"r{i}": compare.read_scores(p) for i, p in enumerate(paths)}
    rows = compare.compare(runs)
    assert [r["split"] for r in rows][::6] == ["all", "test_unseen", "valid"]  # 'all' first
    for split in ("all", "valid", "test_unseen"):
        mine = {r["run"]: r for r in rows if r["split"] == split}
        truth = [_truth(rec, split) for rec in records]
        for i, want in enumerate(truth):
            for key in ("lcc", "srcc", "mse"):
                assert mine[f"r{i}"][key] == pytest.approx(want[key], abs=1e-9)
            assert mine[f"r{i}"]["n"] == want["n"]
        for key in ("lcc", "srcc", "mse"):
            values = np.array([t[key] for t in truth])
            assert mine["mean"][key] == pytest.approx(values.mean(), abs=1e-9)
            assert mine["sd"][key] == pytest.approx(values.std(ddof=1), abs=1e-9)
            assert mine["range"][key] == pytest.approx((values.min(), values.max()), abs=1e-9)
        assert mine["mean"]["n"] == 3
    only = compare.compare(runs, ["test_unseen"])
    assert {r["split"] for r in only} == {"test_unseen"} and len(only) == 6
    with pytest.raises(ValueError, match="no run has split 'test'"):
        compare.compare(runs, ["test"])
    single = compare.compare({"a": runs["r0"]}, ["valid"])
    assert np.isnan(single[2]["lcc"])  # no spread from one run


def test_cli_skips_unreadable_runs_and_writes_tables(reports, tmp_path, capsys):
    paths, records = reports
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.json").write_text("{not json")
    out = tmp_path / "cmp" / "table.md"
    code = cli.main(["compare", *map(str, paths), str(tmp_path / "missing"),
                     str(tmp_path / "broken"), str(paths[0] / "report"), "--splits",
                     "test_unseen", "--out", str(out)])
    assert code == 1         # done, but two runs could not be read (named below)
    captured = capsys.readouterr()
    assert "missing: no report found" in captured.err and "broken/metrics.json is damaged: not JSON" in \
        captured.err
    assert f"{paths[0] / 'report'} is the same report as {paths[0]}" in captured.err  # not a 4th
    assert "| test_unseen | seed0 | 40 |" in captured.out
    assert "| test_unseen | **mean** | 3 runs |" in captured.out
    assert out.read_text() == captured.out
    table = list(csv.DictReader(out.with_suffix(".csv").open()))
    assert [r["run"] for r in table] == ["seed0", "seed1", "seed2", "mean", "sd", "range"]
    want = np.mean([_truth(r, "test_unseen")["lcc"] for r in records])
    assert float(table[3]["lcc"]) == pytest.approx(want, abs=1e-9)
    assert cli.main(["compare", str(tmp_path / "missing")]) == 1
    assert cli.main(["compare", *map(str, paths), "--splits", "test"]) == 2
    assert "no run has split 'test'" in capsys.readouterr().err


def test_read_scores_names_the_file_at_fault(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"by_split": {}}))
    with pytest.raises(ValueError, match=r"metrics.json: no 'overall' entry"):
        compare.read_scores(tmp_path)
    (tmp_path / "metrics.json").write_text(json.dumps({"overall": {"lcc": 0.5, "n": 3}}))
    with pytest.raises(ValueError, match=r"entry 'all' has no 'srcc'"):
        compare.read_scores(tmp_path / "metrics.json")
    (tmp_path / "metrics.json").write_text(json.dumps(
        {"overall": {"lcc": 0.5, "srcc": 0.4, "mse": 0.1, "n": None}}))
    with pytest.raises(ValueError, match=r"entry 'all' has n = None; expected the number"):
        compare.read_scores(tmp_path / "metrics.json")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config.json: a list, not a run's config"):
        compare.read_config(tmp_path)


def test_a_run_folder_named_like_a_summary_row_keeps_its_path(reports, tmp_path, capsys):
    paths, records = reports
    (tmp_path / "mean").mkdir()
    evaluate.write_report(records[0], tmp_path / "mean")
    assert cli.main(["compare", str(paths[1]), str(tmp_path / "mean"), "--splits", "valid"]) == 0
    out = capsys.readouterr().out
    assert f"| valid | {tmp_path / 'mean'} | 30 |" in out
    assert out.count("| valid | **mean** |") == 1 and "| valid | mean |" not in out


def test_undefined_scores_stay_out_of_the_summary():
    defined = {"n": 40.0, "lcc": 0.8, "srcc": 0.7, "mse": 0.02}
    runs = {"a": {"valid": defined},
            "b": {"valid": dict(defined, lcc=0.6)},
            # constant predictions: no correlation
            "c": {"valid": {"n": 40.0, "lcc": float("nan"), "srcc": float("nan"), "mse": 0.05}}}
    rows = {r["run"]: r for r in compare.compare(runs, ["valid"])}
    assert rows["mean"]["lcc"] == pytest.approx(0.7)            # was NaN: c has no LCC
    assert rows["mean"]["mse"] == pytest.approx(np.mean([0.02, 0.02, 0.05]))
    assert rows["sd"]["lcc"] == pytest.approx(np.std([0.8, 0.6], ddof=1))
    assert rows["range"]["lcc"] == (0.6, 0.8)
    text = compare.markdown(compare.compare(runs, ["valid"]))
    assert "| valid | c | 40 | n/a | n/a | 0.0500 |" in text and "nan" not in text
    assert "| **sd** | 1 run |" in compare.markdown(compare.compare({"a": runs["a"]}, ["valid"]))
    # A range that starts below zero stays readable.
    runs["b"]["valid"]["lcc"] = -0.0381
    assert "-0.0381 to 0.8000" in compare.markdown(compare.compare(runs, ["valid"]))


def test_a_summary_that_leaves_a_run_out_says_which(tmp_path, capsys):
    """A seed whose predictions were constant has no LCC; the mean over the others would
    flatter its setting under a header of "3 runs". The command names the run left out."""
    for name, lcc in [("s0", 0.8), ("s1", 0.6), ("s2", None)]:
        folder = tmp_path / name / "report"
        folder.mkdir(parents=True)
        entry = {"n": 40, "lcc": lcc, "srcc": lcc, "mse": 0.05}
        (folder / "metrics.json").write_text(json.dumps(
            {"overall": entry, "by_split": {"valid": entry}}))
    assert cli.main(["compare", *(str(tmp_path / n) for n in ("s0", "s1", "s2")),
                     "--splits", "valid"]) == 0
    err = capsys.readouterr().err
    assert "split 'valid': LCC and SRCC are undefined for s2; their mean, sd and range cover " \
           "the other 2 runs" in err, err
    # A setting of one run whose score is undefined: its summary says n/a, no note.
    assert cli.main(["compare", str(tmp_path / "s2"), "--splits", "valid"]) == 0
    assert "undefined" not in capsys.readouterr().err


def _workdir(path, records, **settings):
    """A training workdir as train.py leaves it: config.json and report/metrics.json."""
    config = {"seed": 0, "loss": {"name": "haaqi_mse", "kwargs": {"frame_weight": 1.0}},
              "train": {"progress": True, "batch_size": 8}}
    for dotted, value in settings.items():
        *parents, leaf = dotted.split("__")
        node = config
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    evaluate.write_report(records, path / "report")
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_runs_are_summarised_per_setting(tmp_path, capsys):
    """Two losses x two seeds: one mean per loss, not one over four runs; seeds and loop-only
    keys (train.progress) do not make settings."""
    records = {name: _records(i, 0.05 + 0.1 * i) for i, name in enumerate(("a0", "a1", "b0", "b1"))}
    paths = [_workdir(tmp_path / "a0", records["a0"]),
             _workdir(tmp_path / "a1", records["a1"], seed=1, train__progress=False),
             _workdir(tmp_path / "b0", records["b0"], loss__name="l1"),
             _workdir(tmp_path / "b1", records["b1"], loss__name="l1", seed=1)]
    configs = {p.name: compare.read_config(p) for p in paths}
    settings, legend, note = compare.group_settings(configs)
    assert settings == {"A": ["a0", "a1"], "B": ["b0", "b1"]} and note is None
    assert legend == {"A": 'loss.name="haaqi_mse"', "B": 'loss.name="l1"'}

    out = tmp_path / "cmp.md"
    assert cli.main(["compare", *map(str, paths), "--splits", "valid", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert '- **B**: loss.name="l1"' in text
    assert out.with_suffix(".png").stat().st_size > 5_000
    table = list(csv.DictReader(out.with_suffix(".csv").open()))
    assert [(r["setting"], r["run"]) for r in table] == [
        ("A", "a0"), ("A", "a1"), ("A", "mean"), ("A", "sd"), ("A", "range"),
        ("B", "b0"), ("B", "b1"), ("B", "mean"), ("B", "sd"), ("B", "range")]
    for row, names in ((table[2], ("a0", "a1")), (table[7], ("b0", "b1"))):
        want = np.mean([_truth(records[n], "valid")["lcc"] for n in names])
        assert float(row["lcc"]) == pytest.approx(want, abs=1e-9)

    # Runs without config.json (evaluate reports) are summarised apart from the training runs,
    # whose settings stay apart too (they were all pooled into one mean).
    evaluate.write_report(records["a0"], tmp_path / "eval")
    evaluate.write_report(records["b1"], tmp_path / "eval2")
    assert cli.main(["compare", *map(str, paths), str(tmp_path / "eval"), str(tmp_path / "eval2"),
                     "--splits", "valid"]) == 0
    captured = capsys.readouterr()
    assert "eval, eval2 have no config.json" in captured.err
    assert "- **C**: no config.json (evaluate reports)" in captured.out
    for setting in "ABC":
        assert f"| valid | {setting} | **mean** | 2 runs |" in captured.out
    # A corrupt config.json: its setting is unknown, so the run is skipped (named, exit 1).
    (paths[3] / "config.json").write_text("{")
    assert cli.main(["compare", *map(str, paths), str(tmp_path / "eval"), "--splits",
                     "valid"]) == 1
    captured = capsys.readouterr()
    assert "skipped: " in captured.err and "config.json is damaged: not JSON" in captured.err
    assert "| valid | A | **mean** | 2 runs |" in captured.out
    assert "| valid | B | **mean** | 1 run |" in captured.out   # b0 alone
    assert "| valid | C | **mean** | 1 run |" in captured.out   # the evaluate report alone
    # --out never overwrites a file of a run it reads.
    assert cli.main(["compare", *map(str, paths[:2]), "--out",
                     str(paths[0] / "report" / "metrics.json")]) == 2
    assert "--out would overwrite" in capsys.readouterr().err
    assert compare.read_scores(paths[0])


def test_distillation_reports_get_their_own_table(tmp_path, capsys):
    records = _records(0, 0.1)
    run = _workdir(tmp_path / "kd", records, loss__name="distill_weighted")
    report = {"splits": {"valid": {"teacher": {"lcc": 0.9, "srcc": 0.85, "mse": 0.01},
                                   "student": {"lcc": 0.87, "srcc": 0.8, "mse": 0.02},
                                   "lcc_gap": 0.03, "n": 30}},
              "params": {"encoder_reduction": 0.7586},
              "seconds_per_clip": {"ratio_model": 0.251, "ratio_encoder": 0.243}}
    (run / "distill_report.json").write_text(json.dumps(report))
    assert cli.main(["compare", str(run), str(tmp_path / "kd" / "report"), "--out",
                     str(tmp_path / "t.md")]) == 0
    text = capsys.readouterr().out
    assert ("| valid | kd | 0.9000 | 0.8700 | 0.0300 | 0.8500 | 0.8000 | 0.2510 (0.2430) | "
            "75.86 % fewer |") in text
    (row,) = list(csv.DictReader((tmp_path / "t.distill.csv").open()))
    assert float(row["lcc_gap"]) == 0.03 and float(row["time_ratio"]) == 0.251
    (run / "distill_report.json").write_text("{broken")
    assert cli.main(["compare", str(run)]) == 1              # named; the scores still count
    captured = capsys.readouterr()
    assert "| all | kd |" in captured.out
    assert "distill_report.json is damaged: not JSON" in captured.err and "Distillation" not in captured.out


def test_file_names_agree_with_the_writers():
    from haaqi_jax import distill
    from haaqi_jax.train import loop
    assert compare.CONFIG_FILE == loop.CONFIG_FILE
    assert compare.DISTILL_REPORT_FILE == distill.REPORT_FILE


def test_epoch_count_and_patience_make_settings_logging_does_not():
    base = {"seed": 0, "train.num_epochs": 2, "train.patience": 5, "train.progress": True,
            "report.color_by": "split", "distill.teacher.train.log_every_steps": 10}
    configs = {"a": base, "b": {**base, "seed": 1, "train.progress": False,
                                "report.color_by": "distortion",
                                "distill.teacher.train.log_every_steps": 1},
               "c": {**base, "train.num_epochs": 3}, "d": {**base, "train.patience": 0}}
    settings, legend, _ = compare.group_settings(configs)
    assert settings == {"A": ["a", "b"], "B": ["c"], "C": ["d"]}
    assert legend["B"] == "train.num_epochs=3, train.patience=5"


def test_output_names_never_collide_with_the_table(tmp_path, capsys):
    paths = compare.output_paths(tmp_path / "lr_0.001")
    assert paths["csv"].name == "lr_0.001.csv" and paths["plot"].name == "lr_0.001.png"
    paths = compare.output_paths(tmp_path / "cmp.md")
    assert [paths[k].name for k in ("table", "csv", "distill_csv", "plot")] == [
        "cmp.md", "cmp.csv", "cmp.distill.csv", "cmp.png"]
    assert compare.output_paths("~/x.md")["table"] == compare.Path.home() / "x.md"
    evaluate.write_report(_records(0, 0.1), tmp_path / "r")
    for bad, hint in (("cmp.csv", "cmp.md"), ("cmp.PNG", "cmp.md"), ("t.md.csv", "t.md")):
        assert cli.main(["compare", str(tmp_path / "r"), "--out", str(tmp_path / bad)]) == 2
        err = capsys.readouterr().err
        assert "names the Markdown table" in err and err.rstrip().endswith(
            f"--out {tmp_path / hint} (set HAAQI_JAX_TRACEBACK=1 for the traceback)"), err
        assert not (tmp_path / bad).exists()
    (tmp_path / "d.png").mkdir()                  # a sibling output that cannot be written
    assert cli.main(["compare", str(tmp_path / "r"), "--out", str(tmp_path / "d.md")]) == 2
    assert "is a folder" in capsys.readouterr().err and not (tmp_path / "d.md").exists()


def test_runs_of_other_clip_counts_get_no_summary(tmp_path, capsys):
    """Other eval splits make another "all": those runs are shown, not averaged."""
    records = _records(0, 0.1)
    paths = [_workdir(tmp_path / "s0", records),
             _workdir(tmp_path / "s1", [r for r in records if r["split"] == "valid"], seed=1)]
    rows = compare.compare({p.name: compare.read_scores(p) for p in paths}, ["all", "valid"],
                           {"": ["s0", "s1"]})
    assert [(r["split"], r["run"]) for r in rows] == [
        ("all", "s0"), ("all", "s1"), ("valid", "s0"), ("valid", "s1"), ("valid", "mean"),
        ("valid", "sd"), ("valid", "range")]
    assert cli.main(["compare", *map(str, paths)]) == 0
    assert ("split 'all': the runs scored different numbers of clips (30, 70), so no mean"
            in capsys.readouterr().err)
    # The same number of clips in other splits: "all" still covers other clips.
    same_n = [dict(r, split="test_seen") if r["split"] == "test_unseen" else r
              for r in records]
    paths.append(_workdir(tmp_path / "s2", same_n, seed=2))
    runs = {p.name: compare.read_scores(p) for p in (paths[0], paths[2])}
    rows = compare.compare(runs, ["all"], {"": list(runs)})
    assert [r["run"] for r in rows] == ["s0", "s2"]
    assert compare.unsummarised(runs, rows) == [
        "split 'all': the runs' 'all' pools different splits, so no mean, sd or range"]


def test_settings_of_other_structure_are_summarised_by_section():
    """A distillation run next to its teacher's run: the keys only one has are counted by
    section, not listed one by one as "<absent>"."""
    teacher = {"seed": 0, "model.head.lstm_hidden": 100, "model.head.num_heads": 16,
               "loss.name": "haaqi_mse"}
    student = {"seed": 0, "loss.name": "distill_uncertainty", "distill.student_layers": [0, 1],
               "distill.teacher.model.head.lstm_hidden": 100, "distill.head_kind": "independent"}
    settings, legend, _ = compare.group_settings({"t": teacher, "s": student})
    assert settings == {"A": ["t"], "B": ["s"]}
    assert legend == {
        "A": 'loss.name="haaqi_mse", also model.* (2 keys the others lack), no distill.*',
        "B": 'loss.name="distill_uncertainty", also distill.* (3 keys the others lack), '
             'no model.*'}
    # Two settings that differ inside a section a third lacks: that key is listed by value.
    other = {**student, "distill.head_kind": "sequential"}
    settings, legend, _ = compare.group_settings({"t": teacher, "s": student, "o": other})
    assert legend["B"].startswith('distill.head_kind="independent"')
    assert legend["C"].startswith('distill.head_kind="sequential"')
    assert legend["A"].startswith('distill.head_kind=<absent>')


def test_unused_teacher_settings_make_no_setting():
    """A run distilled from a teacher checkpoint never read its distill.teacher.* keys: they
    neither split its seeds apart nor describe it."""
    own = {"seed": 0, "distill.teacher_checkpoint": None,
           "distill.teacher.train.num_epochs": 25, "distill.teacher.optimizer.learning_rate": 1e-3}
    given = {**own, "distill.teacher_checkpoint": "t/report/best_model"}
    configs = {"own": own, "own_other": {**own, "distill.teacher.train.num_epochs": 5},
               "given0": given, "given1": {**given, "seed": 1,
                                           "distill.teacher.train.num_epochs": 5}}
    settings, legend, _ = compare.group_settings(configs)
    assert settings == {"A": ["own"], "B": ["own_other"], "C": ["given0", "given1"]}
    assert legend == {
        "A": "distill.teacher.train.num_epochs=25, distill.teacher_checkpoint=null",
        "B": "distill.teacher.train.num_epochs=5, distill.teacher_checkpoint=null",
        "C": 'distill.teacher_checkpoint="t/report/best_model"'}
    # All training runs alike next to an evaluate report: their setting is described.
    _, legend, _ = compare.group_settings({"given0": given, "report": None})
    assert legend == {"A": "the training runs (their settings agree)",
                      "B": "no config.json (evaluate reports)"}


def test_the_plot_does_not_magnify_runs_that_agree(tmp_path, monkeypatch):
    """Runs 3e-6 apart filled the panel with an offset axis; now it spans at least
    MIN_PLOT_RANGE, with plain tick labels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [{"split": "test", "run": f"r{i}", "setting": "", "lcc": 0.7916 + 1e-6 * i}
            for i in range(3)]
    monkeypatch.setattr(plt, "close", lambda *a, **k: None)
    compare.comparison_plot(rows, tmp_path / "c.png")
    (ax,) = plt.gcf().axes
    low, high = ax.get_ylim()
    assert high - low == pytest.approx(compare.MIN_PLOT_RANGE) and low < 0.7916 < high
    assert (low + high) / 2 == pytest.approx(0.7916, abs=1e-4)       # centred on the runs
    assert not ax.yaxis.get_major_formatter().get_useOffset()
    plt.close("all")
    # Runs further apart than the least range: the panel spans them all.
    rows = [{"split": "test", "run": f"r{i}", "setting": "", "lcc": v}
            for i, v in enumerate((0.50, 0.90))]
    compare.comparison_plot(rows, tmp_path / "d.png")
    (ax,) = plt.gcf().axes
    low, high = ax.get_ylim()
    assert low <= 0.50 and high >= 0.90
    plt.close("all")


def test_a_whole_float_and_its_int_are_one_setting():
    """A loss keyword added by --set keeps the literal's type: loss.kwargs.score_weight=1 and
    =1.0 are one run's setting (a resume takes either), but made two settings here."""
    configs = {"r0": {"seed": 0, "loss.kwargs.score_weight": 1},
               "r1": {"seed": 1, "loss.kwargs.score_weight": 1.0},
               "r2": {"seed": 0, "loss.kwargs.score_weight": 0.5}}
    settings, legend, _ = compare.group_settings(configs)
    assert settings == {"A": ["r0", "r1"], "B": ["r2"]}
    assert legend == {"A": "loss.kwargs.score_weight=1", "B": "loss.kwargs.score_weight=0.5"}
    assert compare.group_settings({n: configs[n] for n in ("r0", "r1")})[0] == {
        "": ["r0", "r1"]}


def test_spellings_of_one_path_are_one_setting():
    """"data_cache/demo", "./data_cache/demo" and "data_cache/demo/" name one folder: repeats of
    one setting (they were three). The legend keeps the spelling as written; other paths,
    absolute vs relative spellings and strings that are not paths stay apart."""
    base = {"seed": 0, "loss.name": "haaqi_mse", "data.train_split": "train",
            "data.demo_dir": "data_cache/demo", "distill.teacher.data.cache_dir": "f/x"}
    configs = {"r0": base,
               "r1": {**base, "seed": 1, "data.demo_dir": "./data_cache/demo",
                      "distill.teacher.data.cache_dir": "f//x/"},
               "r2": {**base, "seed": 2, "data.demo_dir": "data_cache/demo/"},
               "other": {**base, "data.demo_dir": "data_cache/demo2"},
               "absolute": {**base, "data.demo_dir": "/work/data_cache/demo"},
               "split": {**base, "data.train_split": "./train"},
               "teacher": {**base, "distill.teacher.data.cache_dir": "f/y"}}
    settings, legend, _ = compare.group_settings(configs)
    assert settings == {"A": ["r0", "r1", "r2"], "B": ["other"], "C": ["absolute"],
                        "D": ["split"], "E": ["teacher"]}
    assert legend["A"] == ('data.demo_dir="data_cache/demo", data.train_split="train", '
                           'distill.teacher.data.cache_dir="f/x"')
    assert legend["B"].startswith('data.demo_dir="data_cache/demo2"')
    assert legend["C"].startswith('data.demo_dir="/work/data_cache/demo"')
    # Only spellings apart: one setting, as runs whose configs agree; None is no path.
    assert compare.group_settings({n: configs[n] for n in ("r0", "r1", "r2")}) == (
        {"": ["r0", "r1", "r2"]}, {}, None)
    settings, legend, _ = compare.group_settings({"r1": configs["r1"],
                                                  "none": {**base, "data.demo_dir": None}})
    assert settings == {"A": ["r1"], "B": ["none"]}
    assert legend == {"A": 'data.demo_dir="./data_cache/demo"', "B": "data.demo_dir=null"}


def test_every_path_key_of_a_run_config_is_compared_as_a_path():
    """The keys of RUN_KEYS that name a file or folder are PATH_KEYS (which resumes and
    `compare` read as paths): a new one must join them."""
    from haaqi_jax import config as cfglib
    path_like = {f"{section}.{key}" for section, keys in cfglib.RUN_KEYS.items() if section
                 for key in keys if key.endswith(("_dir", "_checkpoint", "_path", "_file"))
                 or key == "manifest"}
    assert path_like == set(cfglib.PATH_KEYS)


# ----------------------------------------------------------------------------- --metric NAME

#: The tables' heads without --metric (they must stay as they were: scripts read them).
OLD_CSV_HEADER = "split,setting,run,n,lcc,srcc,mse"
OLD_MD_HEADER = ["| split | run | n | LCC | SRCC | MSE |", "|---|---|---|---|---|---|"]


def _write_metrics(folder, entries):
    """A hand-made metrics.json: entries {"all" or split: entry}."""
    folder.mkdir(parents=True, exist_ok=True)
    report = {"overall": entries["all"],
              "by_split": {k: v for k, v in entries.items() if k != "all"}}
    (folder / "metrics.json").write_text(json.dumps(report))
    return folder


def test_a_metric_of_your_own_gets_columns_and_summaries(tmp_path):
    """compare(..., metrics=[NAME]): each run's value as its metrics.json has it, the mean, sd
    and range over the runs worked out here; a null value is n/a and left out of them."""
    rng = np.random.default_rng(3)
    values = {f"r{i}": {"all": rng.uniform(0.2, 0.6), "valid": rng.uniform(0.2, 0.6)}
              for i in range(4)}
    values["r3"]["valid"] = None                         # undefined on valid
    runs = {}
    for name, by_split in values.items():
        entries = {split: {"n": 30 if split == "valid" else 70, "lcc": rng.uniform(),
                           "srcc": rng.uniform(), "mse": rng.uniform(0, 0.1),
                           "max_error": value, "label_mean": 0.5}
                   for split, value in by_split.items()}
        runs[name] = compare.read_scores(_write_metrics(tmp_path / name, entries),
                                         ["max_error"])
    rows = compare.compare(runs, metrics=["max_error"])
    plain = compare.compare(runs)
    assert [{k: v for k, v in r.items() if k != "max_error"} for r in rows] == plain
    for split in ("all", "valid"):
        mine = {r["run"]: r for r in rows if r["split"] == split}
        for name in values:
            want = values[name][split]
            assert (np.isnan(mine[name]["max_error"]) if want is None
                    else mine[name]["max_error"] == want), (split, name)
        defined = np.array([v[split] for v in values.values() if v[split] is not None])
        assert len(defined) == (4 if split == "all" else 3)
        assert mine["mean"]["max_error"] == pytest.approx(defined.mean(), abs=1e-12)
        assert mine["sd"]["max_error"] == pytest.approx(defined.std(ddof=1), abs=1e-12)
        assert mine["range"]["max_error"] == pytest.approx((defined.min(), defined.max()))
        assert mine["mean"]["n"] == 4
    assert compare.left_out(rows, ["max_error"]) == [
        "split 'valid': max_error is undefined for r3; its mean, sd and range cover the other "
        "3 runs"]
    text = compare.markdown(rows, metrics=["max_error"]).splitlines()
    assert text[:2] == ["| split | run | n | LCC | SRCC | MSE | max_error |",
                        "|---|---|---|---|---|---|---|"]
    lines = {(l.split(" | ")[0][2:], l.split(" | ")[1]): l for l in text[2:]}
    assert lines["all", "r0"].endswith(f" | {values['r0']['all']:.4f} |")
    assert lines["valid", "r3"].endswith(" | n/a |")
    mean = np.mean([v["valid"] for n, v in values.items() if n != "r3"])
    assert lines["valid", "**mean**"].endswith(f" | {mean:.4f} |")
    # The built-in columns are the table without --metric.
    assert [l.rsplit(" | ", 1)[0] + " |" for l in text[2:]] == \
        compare.markdown(plain).splitlines()[2:]
    # Asked for by another name: read_scores keeps what it is asked for.
    assert "label_mean" not in runs["r0"]["all"]


def test_compare_metric_option_reads_it_from_every_report(tmp_path, max_error, capsys):
    """`haaqi-jax compare --metric NAME`: a column in the table and the CSV, the setting's mean,
    sd and range of the values that `evaluate --metric` wrote (worked out here from the
    records); a run whose report lacks it and a null value read n/a, are named in a note, and
    the summary says it covers the others."""
    records = {f"s{i}": _records(i, 0.05 + 0.05 * i) for i in range(4)}
    paths = []
    for i, (name, recs) in enumerate(records.items()):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"seed": i}))
        evaluate.write_report(recs, tmp_path / name / "report",
                              metrics=[max_error] if name != "s3" else [])
        paths.append(tmp_path / name)
    file = tmp_path / "s1" / "report" / "metrics.json"
    report = json.loads(file.read_text())
    report["by_split"]["valid"][max_error] = None        # undefined there
    file.write_text(json.dumps(report))

    def truth(name, split):
        sel = [r for r in records[name] if split == "all" or r["split"] == split]
        return float(np.max(np.abs(np.array([r["prediction"] for r in sel])
                                   - np.array([r["label"] for r in sel]))))

    out = tmp_path / "cmp.md"
    assert cli.main(["compare", *map(str, paths), "--metric", max_error, "--out",
                     str(out)]) == 0
    captured = capsys.readouterr()
    assert f"note: s3: its report has no {max_error} (n/a in the table;" in captured.err
    assert "s1: its report" not in captured.err      # null in its report: undefined, not absent
    assert (f"split 'valid': {max_error} is undefined for s1 and not in the report of s3; its "
            f"mean, sd and range cover the other 2 runs") in captured.err, captured.err
    assert (f"split 'all': {max_error} is not in the report of s3; its mean, sd and range "
            f"cover the other 3 runs") in captured.err, captured.err
    assert out.read_text() == captured.out
    lines = captured.out.splitlines()
    assert lines[0] == f"| split | run | n | LCC | SRCC | MSE | {max_error} |"
    table = {(r["split"], r["run"]): r for r in csv.DictReader(out.with_suffix(".csv").open())}
    assert list(next(iter(table.values()))) == OLD_CSV_HEADER.split(",") + [max_error]
    for split in ("all", "valid", "test_unseen"):
        have = [n for n in ("s0", "s1", "s2") if not (split == "valid" and n == "s1")]
        want = np.array([truth(n, split) for n in have])
        for name in have:
            assert float(table[split, name][max_error]) == pytest.approx(truth(name, split),
                                                                         abs=1e-12)
        assert table[split, "s3"][max_error] == ""                # not in its report
        assert float(table[split, "mean"][max_error]) == pytest.approx(want.mean(), abs=1e-12)
        assert float(table[split, "sd"][max_error]) == pytest.approx(want.std(ddof=1), abs=1e-12)
        low, high = map(float, table[split, "range"][max_error].split(" to "))
        assert (low, high) == pytest.approx((want.min(), want.max()), abs=1e-12)
        row = next(l for l in lines if l.startswith(f"| {split} | **mean** |"))
        assert row.endswith(f" | {want.mean():.4f} |"), row
        assert next(l for l in lines if l.startswith(f"| {split} | s3 |")).endswith(" | n/a |")
    assert float(table["valid", "s1"][max_error]) != float(table["valid", "s1"][max_error])  # nan
    assert out.with_suffix(".png").is_file()


def test_plot_option_draws_the_named_score_or_metric(tmp_path, max_error, capsys,
                                                     monkeypatch):
    """`--plot NAME`: the PNG shows that score or --metric per run (a run lacking the metric
    is left out of its panel, not drawn at nan); a name neither is refused before anything is
    written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.collections
    import matplotlib.pyplot as plt

    records = {f"s{i}": _records(i, 0.05 + 0.05 * i) for i in range(3)}
    paths = []
    for i, (name, recs) in enumerate(records.items()):
        evaluate.write_report(recs, tmp_path / name, metrics=[max_error] if i < 2 else [])
        paths.append(tmp_path / name)

    def drawn(plot):
        monkeypatch.setattr(plt, "close", lambda *a, **k: None)
        assert cli.main(["compare", *map(str, paths), "--splits", "valid", "--metric",
                         max_error, "--out", str(tmp_path / f"{plot}.md"), "--plot", plot]) == 0
        (ax,) = plt.gcf().axes
        dots = sorted(float(y) for c in ax.collections
                      if isinstance(c, matplotlib.collections.PathCollection)
                      for _, y in c.get_offsets())
        label = ax.get_ylabel()
        plt.close("all")
        return dots, label

    def truth(name, fn):
        sel = [r for r in records[name] if r["split"] == "valid"]
        return fn(np.array([r["prediction"] for r in sel]), np.array([r["label"] for r in sel]))

    dots, label = drawn(max_error)
    assert label == max_error.upper()
    assert dots == pytest.approx(sorted(truth(n, lambda p, t: np.max(np.abs(p - t)))
                                        for n in ("s0", "s1")), abs=1e-12)
    dots, label = drawn("srcc")
    assert label == "SRCC"
    assert dots == pytest.approx(sorted(truth(n, lambda p, t: scipy.stats.spearmanr(p, t)[0])
                                        for n in records), abs=1e-9)
    capsys.readouterr()
    assert cli.main(["compare", *map(str, paths), "--out", str(tmp_path / "x.md"),
                     "--plot", max_error]) == 2           # not among this comparison's --metric
    err = capsys.readouterr().err
    assert f"--plot {max_error!r}: not lcc, srcc, mse nor a --metric" in err, err
    assert not (tmp_path / "x.md").exists()


def test_without_metric_option_the_outputs_are_as_before(tmp_path, max_error, capsys):
    """Reports with a metric of their own, compared without --metric (or with a built-in
    name): table, CSV and plot byte for byte those of the same reports without it."""
    outputs = {}
    for kind, metrics in (("plain", []), ("with", [max_error])):
        paths = []
        for i in range(3):
            path = tmp_path / kind / f"s{i}"
            evaluate.write_report(_records(i, 0.1), path, metrics=metrics)
            paths.append(path)
        for extra in ([], ["--metric", "lcc"]):
            out = tmp_path / f"{kind}{len(extra)}" / "cmp.md"
            assert cli.main(["compare", *map(str, paths), "--out", str(out), *extra]) == 0
            captured = capsys.readouterr()
            assert captured.err == ""
            outputs[kind, len(extra)] = [captured.out] + [
                out.with_suffix(ext).read_bytes() for ext in (".md", ".csv", ".png")]
    assert len({tuple(v) for v in outputs.values()}) == 1
    text, _, csv_text, _ = outputs["plain", 0]
    assert text.splitlines()[:2] == OLD_MD_HEADER
    assert csv_text.decode().splitlines()[0] == OLD_CSV_HEADER


def test_a_metric_no_report_has_or_a_column_name_is_refused(tmp_path, max_error, capsys):
    for i in range(2):
        evaluate.write_report(_records(i, 0.1), tmp_path / f"s{i}", metrics=[max_error])
    runs = [str(tmp_path / "s0"), str(tmp_path / "s1")]
    assert cli.main(["compare", *runs, "--metric", "max_eror"]) == 2
    assert "no run has metric 'max_eror'" in capsys.readouterr().err
    for name in ("n", "run", "split", "setting"):
        assert cli.main(["compare", *runs, "--metric", name]) == 2
        assert f"--metric {name}" in capsys.readouterr().err
    runs = {f"s{i}": compare.read_scores(tmp_path / f"s{i}", [max_error]) for i in range(2)}
    with pytest.raises(ValueError, match="no run has metric 'nope'"):
        compare.compare(runs, metrics=[max_error, "nope"])
    # A value that is no number: that report is named and skipped, as other unreadable ones.
    report = json.loads((tmp_path / "s1" / "metrics.json").read_text())
    report["overall"][max_error] = "high"
    (tmp_path / "s1" / "metrics.json").write_text(json.dumps(report))
    with pytest.raises(ValueError, match=rf"entry 'all' has {max_error} = 'high'"):
        compare.read_scores(tmp_path / "s1", [max_error])


def test_compare_with_a_metric_does_not_import_jax(tmp_path, max_error):
    """compare reads the values from the reports: no registry, no jax (a light command)."""
    import subprocess
    import sys
    for i in range(2):
        evaluate.write_report(_records(i, 0.1), tmp_path / f"s{i}", metrics=[max_error])
    code = ("import sys\nfrom haaqi_jax import cli\n"
            f"assert cli.main(['compare', {str(tmp_path / 's0')!r}, {str(tmp_path / 's1')!r}, "
            f"'--metric', {max_error!r}, '--out', {str(tmp_path / 'c.md')!r}]) == 0\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax'))\n"
            "assert not bad, bad\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert max_error in (tmp_path / "c.csv").read_text().splitlines()[0]


def test_a_metric_named_twice_is_one_column(tmp_path):
    """--metric NAME --metric NAME (or --metric lcc, a built-in): one column, one summary."""
    entry = {"n": 10, "lcc": 0.5, "srcc": 0.4, "mse": 0.02, "max_error": 0.25}
    runs = {f"r{i}": compare.read_scores(_write_metrics(tmp_path / f"r{i}", {"all": dict(
        entry, max_error=0.25 * (i + 1))}), ["max_error", "max_error"]) for i in range(2)}
    assert compare.check_metric_names(["max_error", "lcc", "max_error"]) == ("max_error",)
    rows = compare.compare(runs, metrics=["max_error", "max_error"])
    text = compare.markdown(rows, metrics=compare.check_metric_names(["max_error", "max_error"]))
    assert text.splitlines()[0] == "| split | run | n | LCC | SRCC | MSE | max_error |"
    assert {r["run"]: r["max_error"] for r in rows if r["run"] in ("r0", "r1", "mean")} == {
        "r0": 0.25, "r1": 0.5, "mean": 0.375}


@pytest.mark.parametrize("value", [True, False, "0.5", [0.5]])
def test_a_metric_value_that_is_no_number_names_the_file(tmp_path, value):
    """true / false in a metrics.json are no values (float(True) would read as 1.0)."""
    folder = _write_metrics(tmp_path / "r", {"all": {"n": 10, "lcc": 0.5, "srcc": 0.4,
                                                     "mse": 0.02, "max_error": value}})
    with pytest.raises(ValueError, match=r"metrics.json: entry 'all' has max_error = .*; "
                                         r"expected a number or null"):
        compare.read_scores(folder, ["max_error"])


def test_a_setting_of_one_run_has_no_sd_and_no_warning():
    """The sd of one run is n/a (NaN), said without numpy's degrees-of-freedom warning on the
    console."""
    import warnings
    runs = {"a": {"valid": {"n": 40.0, "lcc": 0.8, "srcc": 0.7, "mse": 0.02, "m": 0.1}}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = {r["run"]: r for r in compare.compare(runs, ["valid"], metrics=["m"])}
    assert all(np.isnan(rows["sd"][k]) for k in ("lcc", "srcc", "mse", "m"))
    assert rows["mean"]["m"] == 0.1 and rows["range"]["m"] == (0.1, 0.1)


def test_a_report_lacking_a_metric_in_some_splits_is_named_with_those_splits():
    """A report with the metric in "all" only (e.g. a hand-edited one): the note names the
    splits whose cells read n/a; a run that lacks it everywhere is named without splits."""
    entry = {"n": 10.0, "lcc": 0.5, "srcc": 0.4, "mse": 0.02}
    runs = {"part": {"all": dict(entry, m=0.1), "valid": dict(entry), "test": dict(entry)},
            "none": {"all": dict(entry), "valid": dict(entry), "test": dict(entry)},
            "whole": {"all": dict(entry, m=0.2), "valid": dict(entry, m=0.3),
                      "test": dict(entry, m=0.4)}}
    rows = compare.compare(runs, metrics=["m"])
    hint = "(n/a in the table; a report has it when `evaluate --metric m` or report.metrics " \
           "named it)"
    assert sorted(compare.missing_metrics(rows, ["m"])) == [
        f"none: its report has no m {hint}",
        f"part: its report has no m for splits 'test', 'valid' {hint}"]
    one = compare.compare(runs, ["all", "valid"], metrics=["m"])
    assert f"part: its report has no m for split 'valid' {hint}" in compare.missing_metrics(
        one, ["m"])


def test_an_empty_path_is_no_spelling_of_the_current_folder():
    """model.encoder_checkpoint="" means none (read as false), "." the current folder:
    normpath("") is "." but they are two settings."""
    base = {"seed": 0, "model.encoder_checkpoint": ""}
    settings, legend, _ = compare.group_settings({
        "none": base, "none1": {**base, "seed": 1},
        "here": {**base, "model.encoder_checkpoint": "."}})
    assert settings == {"A": ["none", "none1"], "B": ["here"]}
    assert legend == {"A": 'model.encoder_checkpoint=""', "B": 'model.encoder_checkpoint="."'}


def test_a_relative_path_and_its_absolute_spelling_here_stay_apart():
    """Not made absolute: runs started from other folders read "data/demo" from theirs, so
    it is not this folder's absolute path, even where the two would name one folder here."""
    import os
    base = {"seed": 0, "data.demo_dir": "data_cache/demo"}
    here = {**base, "seed": 1, "data.demo_dir": os.path.join(os.getcwd(), "data_cache/demo")}
    settings, _, _ = compare.group_settings({"relative": base, "absolute": here})
    assert settings == {"A": ["relative"], "B": ["absolute"]}


@pytest.mark.parametrize("content,match", [
    (b'{"overall": 5}', r"entry 'all' is not an object"),
    (b'{"overall": {"lcc": [1], "srcc": 1, "mse": 0, "n": 3}}', r"entry 'all' has lcc = \[1\]"),
    (b'{"overall": {"lcc": "high", "srcc": 1, "mse": 0, "n": 3}}',
     r"entry 'all' has lcc = 'high'"),
    (b'{"overall": {"lcc": 1, "srcc": 1, "mse": 0, "n": "x"}}', r"entry 'all' has n = 'x'"),
    (b'{"overall": {"lcc": 1, "srcc": 1, "mse": 0, "n": Infinity}}', r"entry 'all' has n = inf"),
    (b'{"overall": {"lcc": 1, "srcc": 1, "mse": 0, "n": 3}, "by_split": "x"}',
     r"'by_split' is not an object"),
    (b'\xff\xfe{}', r"not JSON \(not UTF-8 text\)"),
])
def test_a_damaged_report_is_skipped_by_name_and_the_others_compared(reports, tmp_path, capsys,
                                                                     content, match):
    """A metrics.json of the wrong shape (an entry that is no object, a score that is no
    number, by_split no object, bytes that are no UTF-8) is one skipped run named by its
    file: it used to end `compare` with a TypeError traceback, or skip it with Python's bare
    "could not convert string to float" naming no file."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.json").write_bytes(content)
    with pytest.raises(ValueError, match=match) as err:
        compare.read_scores(bad)
    assert str(bad / "metrics.json") in str(err.value)
    paths, _ = reports
    assert cli.main(["compare", str(paths[0]), str(bad), str(paths[1])]) == 1
    out, err_text = capsys.readouterr()
    assert f"skipped: {bad / 'metrics.json'}" in err_text
    assert "| all | seed0 |" in out and "| all | seed1 |" in out
