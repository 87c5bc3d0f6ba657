"""`haaqi-jax label`: manifest parsing, bad rows, ears, resume, and labels vs pyclarity 0.9.0.

The plumbing tests inject a cheap scorer whose outputs are simple functions of its inputs, so
each label can be recomputed here straight from the files (channel routing, audiograms, level1
rules, settings); the last tests run the real JAX HAAQI and compare with pyclarity's haaqi_v1.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import math
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from haaqi_jax import cli
from haaqi_jax.haaqi import label as label_mod

SR = 24000
N = SR // 2  # 0.5 s clips
NORMAL = [0, 0, 0, 0, 0, 0, 0, 0]
SLOPING = [10, 15, 20, 30, 40, 50, 55, 60]
FLAT40 = [40] * 8


# ------------------------------------------------------------------------------------------------
# Test data


def _music(rng: np.random.Generator, n: int, sr: int, f0: float) -> np.ndarray:
    """A few decaying harmonic notes plus a little noise: music-like, unambiguous alignment."""
    t = np.arange(n) / sr
    x = np.zeros(n)
    for k, start in enumerate(np.linspace(0, n / sr, 4, endpoint=False)):
        env = np.where(t >= start, np.exp(-(t - start) * 6.0), 0.0)
        f = f0 * 2 ** (k * 4 / 12)
        x += env * sum(np.sin(2 * np.pi * f * h * t + h) / h for h in range(1, 6))
    x += 0.01 * rng.standard_normal(n)
    return 0.1 * x / np.max(np.abs(x))


def _degrade(rng: np.random.Generator, x: np.ndarray, snr_db: float) -> np.ndarray:
    noise = rng.standard_normal(x.shape)
    noise *= np.sqrt(np.mean(x**2) / np.mean(noise**2)) * 10 ** (-snr_db / 20)
    return 0.8 * x + noise


def _write(path: Path, samples: np.ndarray, sr: int = SR, subtype: str = "FLOAT") -> str:
    sf.write(str(path), samples, sr, subtype=subtype)
    return path.name


def _make_dataset(root: Path) -> dict:
    """Good rows (mono/stereo, one or two audiograms, two rates, a row level1) and one bad row
    of every kind. Returns {"rows": [json-able dicts or raw text], "expect": {id: reason part}}."""
    rng = np.random.default_rng(7)
    root.mkdir(parents=True, exist_ok=True)
    rows: list = []
    good: list = []
    for i in range(7):
        sr = 16000 if i == 5 else SR
        n = (sr // 2) + 480 * i  # different lengths: the plan sorts them into batches
        ref = _music(rng, n, sr, 220.0 * (1 + 0.1 * i))
        stereo = i % 2 == 0
        if stereo:
            ref = np.stack([ref, 0.5 * np.roll(ref, 7)], axis=1)
        proc = _degrade(rng, ref, 5.0 + 3 * i)
        row = {"id": f"good{i}", "reference": _write(root / f"ref{i}.wav", ref, sr),
               "processed": _write(root / f"proc{i}.wav", proc, sr)}
        if i in (0, 3, 4):
            row["audiogram_left"], row["audiogram_right"] = SLOPING, FLAT40
        else:
            row["audiogram"] = NORMAL if i != 6 else SLOPING
        if i == 4:
            row["level1"] = 70.0
        if i == 6:  # non-standard frequencies: the tool resamples them like HAAQI does
            row["audiogram"] = [5, 20, 45, 60]
            row["audiogram_frequencies"] = [250, 1000, 4000, 8000]
        rows.append(row)
        good.append(row["id"])
    ref_ok = rows[1]["reference"]
    proc_ok = rows[1]["processed"]

    def bad(row_id, reason, **fields):
        rows.append({"id": row_id, "reference": ref_ok, "processed": proc_ok,
                     "audiogram": NORMAL, **fields})
        expect[row_id] = reason

    expect: dict = {}
    rows.append('{"id": "broken", "reference": "ref1.wav",')  # row index 7
    expect[7] = "malformed JSON"
    rows.append({"id": "no_processed", "reference": ref_ok, "audiogram": NORMAL})
    expect["no_processed"] = "missing key 'processed'"
    bad("count", "7 levels but 8 frequencies", audiogram=NORMAL[:7])
    bad("range", "outside", audiogram=[0, 0, 0, 140, 0, 0, 0, 0])
    rows.append('{"id": "nan_audiogram", "reference": "%s", "processed": "%s", '
                '"audiogram": [0, 0, NaN, 0, 0, 0, 0, 0]}' % (ref_ok, proc_ok))
    expect["nan_audiogram"] = "not finite"
    bad("text_audiogram", "item 3 ('twenty') is not a number", audiogram="0,10,twenty")
    bad("dict_audiogram", "expected a list of numbers", audiogram={"250": 0})
    bad("missing_file", "nowhere.wav does not exist", reference="nowhere.wav")
    (root / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt garbage" + bytes(64))
    bad("corrupt", "cannot read processed file", processed="corrupt.wav")
    x = _music(rng, N, SR, 300.0)
    _write(root / "x.wav", x)
    y = x.copy()
    y[100] = np.nan
    bad("nan_samples", "non-finite sample (nan)", processed=_write(root / "nan.wav", y),
        reference="x.wav")
    y[100] = np.inf
    bad("inf_samples", "non-finite sample (inf)", reference=_write(root / "inf.wav", y),
        processed="x.wav")
    bad("empty", "is empty", reference=_write(root / "empty.wav", np.zeros(0)),
        processed=_write(root / "empty2.wav", np.zeros(0)))
    bad("silent", "is silent", reference=_write(root / "silent.wav", np.zeros(N)),
        processed="x.wav")
    bad("silent_right", "silent (right channel)",
        reference=_write(root / "silent_r.wav", np.stack([x, 0 * x], axis=1)),
        processed=_write(root / "x_both.wav", np.stack([x, x], axis=1)), audiogram_left=NORMAL,
        audiogram_right=NORMAL, audiogram=None)
    bad("lengths", "lengths differ", processed=_write(root / "short.wav", x[:-10]),
        reference="x.wav")
    bad("rates", "sample rates differ", processed=_write(root / "x16.wav", x, 16000),
        reference="x.wav")
    bad("good0", "duplicate id")
    bad("one_ear", "needs audiogram_right", audiogram=None, audiogram_left=SLOPING)
    bad("three_channels", "3 channels", reference=_write(root / "3ch.wav", np.stack([x] * 3, 1)))
    bad("both_kinds", "either 'audiogram' or", audiogram_left=NORMAL, audiogram_right=NORMAL)
    bad("bad_level1", "level1: expected a number", level1="loud")
    bad("bool_level1", "level1: expected a number", level1=True)
    bad("channels", "channels differ: reference 2, processed 1",
        reference=_write(root / "x_stereo.wav", np.stack([x, x], axis=1)), processed="x.wav")
    (root / "a_folder").mkdir()
    bad("folder", "a_folder is a folder, not a file", processed="a_folder")
    return {"rows": rows, "good": good, "expect": expect}


def _write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w") as f:
        f.write("# comment lines are not rows (as read_manifest reads them)\n")
        for row in rows:
            if isinstance(row, dict):
                row = json.dumps({k: v for k, v in row.items() if v is not None})
            f.write(row + "\n\n")  # blank lines are not rows
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("label") / "audio"
    data = _make_dataset(root)
    data["manifest"] = _write_jsonl(root / "manifest.jsonl", data["rows"])
    data["root"] = root
    return data


# ------------------------------------------------------------------------------------------------
# An injected scorer, and the same numbers recomputed from the files


def _rms(x):
    return float(np.sqrt(np.mean(np.square(x))))


class FakeScorer:
    """haaqi_batch-shaped; records the batch shapes it saw. Components: combined = rms ratio / 2
    (inside HAAQI's range, which the training manifest enforces),
    nonlinear = mean audiogram level / 100, linear = level1 / 100, cephigh = equalisation,
    bmsync5 = duration in s, d_loud = a key-dependent number, d_norm = dtype is float64.
    A level1 of 123 makes it raise ValueError (a metric-stage bad item); 111 gives NaN; 0 gives
    cephigh = bmsync5 = 0, HAAQI's output for a reference below the threshold."""

    def __init__(self, fail_on_call: int | None = None):
        self.shapes: list[tuple] = []
        self.fail_on_call = fail_on_call

    def __call__(self, reference, processed, sample_rate, audiogram_levels, audiogram_frequencies,
                 *, equalisation=1, level1=65.0, lengths=None, key=None, dtype=None):
        import jax
        if self.fail_on_call is not None and len(self.shapes) == self.fail_on_call:
            raise RuntimeError("injected crash")
        self.shapes.append(reference.shape)
        level1 = np.broadcast_to(np.asarray(level1, dtype=np.float64), reference.shape[:1])
        if np.any(level1 == 123.0):
            raise ValueError(f"item {int(np.argmax(level1 == 123.0))}: level1 123 rejected")
        assert np.all(np.asarray(audiogram_frequencies) == label_mod.STANDARD_FREQUENCIES)
        combined = np.asarray([_rms(p[:n]) / _rms(r[:n]) / 2
                               for r, p, n in zip(reference, processed, lengths)])
        combined[level1 == 111.0] = np.nan
        inaudible = level1 == 0.0
        return types.SimpleNamespace(
            combined=combined, nonlinear=np.mean(audiogram_levels, axis=1) / 100,
            linear=level1 / 100,
            cephigh=np.where(inaudible, 0.0, float(equalisation)),
            bmsync5=np.where(inaudible, 0.0, np.asarray(lengths) / sample_rate),
            d_loud=np.asarray(jax.vmap(jax.random.uniform)(key)),
            d_norm=np.full(len(level1), float(dtype is np.float64)))


def _expected_fake(root: Path, row: dict, *, level1_rule, equalisation=1, ears="average"):
    """The fake's per-ear numbers for one manifest row, straight from the wav files."""
    ref, sr = sf.read(str(root / row["reference"]), always_2d=True)
    proc, _ = sf.read(str(root / row["processed"]), always_2d=True)
    stereo = max(ref.shape[1], proc.shape[1]) == 2
    if "audiogram" in row:
        levels = row["audiogram"]
        if "audiogram_frequencies" in row:  # log-frequency interpolation, clamped
            levels = np.interp(np.log(label_mod.STANDARD_FREQUENCIES),
                               np.log(row["audiogram_frequencies"]), levels)
        side = {"left": levels, "right": levels}
        names = ["left", "right"] if stereo else ["both"]
        side["both"] = levels
    else:
        side = {"left": row["audiogram_left"], "right": row["audiogram_right"]}
        names = ["left", "right"]
    if ears != "average":
        names = [ears]
    out = {}
    for name in names:
        c = 1 if name == "right" else 0
        r, p = ref[:, min(c, ref.shape[1] - 1)], proc[:, min(c, proc.shape[1] - 1)]
        lvl = row.get("level1", 65 - 20 * math.log10(_rms(r))
                      if level1_rule == "cadenza" else level1_rule)
        out[name] = {"combined": _rms(p) / _rms(r) / 2, "nonlinear": np.mean(side[name]) / 100,
                     "linear": lvl / 100, "cephigh": equalisation, "bmsync5": len(r) / sr,
                     "level1": lvl}
    return out


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------------------
# Plumbing (injected scorer)


@pytest.mark.parametrize("level1_rule,equalisation", [(65.0, 1), ("cadenza", 2)])
def test_labels_and_bad_rows(dataset, tmp_path, level1_rule, equalisation):
    scorer = FakeScorer()
    out = tmp_path / "labels.jsonl"
    summary = label_mod.label_manifest(dataset["manifest"], out, batch_size=3,
                                       equalisation=equalisation, level1=level1_rule,
                                       scorer=scorer, progress=False)
    labels = {r["id"]: r for r in _read_jsonl(out)}
    errors = {r["id"]: r for r in _read_jsonl(tmp_path / "labels.errors.jsonl")}
    assert sorted(labels) == sorted(dataset["good"])
    assert summary.n_ok == len(dataset["good"]) and summary.n_failed == len(errors)
    assert summary.n_rows == summary.n_ok + summary.n_failed
    # Every bad row is reported once, with its id, line and a reason that names the problem.
    assert sorted(map(str, errors)) == sorted(map(str, dataset["expect"]))
    for row_id, part in dataset["expect"].items():
        assert part in errors[row_id]["reason"], (row_id, errors[row_id])
        assert errors[row_id]["line"] >= 1
    assert "manifest.jsonl, line" in errors["count"]["reason"]
    # One compiled shape: every call has the same (padded) batch size.
    assert {s[0] for s in scorer.shapes} == {3}
    rows = {r["id"]: r for r in dataset["rows"][:len(dataset["good"])]}
    for row_id, got in labels.items():
        want = _expected_fake(dataset["root"], rows[row_id], level1_rule=level1_rule,
                              equalisation=equalisation)
        assert sorted(got["per_ear"]) == sorted(want), row_id
        for ear, values in want.items():
            for name, value in values.items():
                np.testing.assert_allclose(got["per_ear"][ear][name], value, rtol=1e-9,
                                           err_msg=f"{row_id} {ear} {name}")
        np.testing.assert_allclose(got["haaqi"], np.mean([v["combined"] for v in want.values()]),
                                   rtol=1e-12)
        assert got["equalisation"] == equalisation and got["level1_rule"] == level1_rule
        assert got["sample_rate"] == (16000 if row_id == "good5" else SR)
        assert got["reference"] == rows[row_id]["reference"]


def test_progress_bar_counts_every_row(dataset, tmp_path, capsys):
    """The bar's total is every manifest row: rows refused before scoring (a missing file, a
    manifest fault) are counted as done from the start, not left out."""
    summary = label_mod.label_manifest(dataset["manifest"], tmp_path / "labels.jsonl",
                                       batch_size=3, scorer=FakeScorer(), progress=True)
    final = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert summary.n_rows > summary.n_ok > 0
    assert f"{summary.n_rows}/{summary.n_rows}" in final, final
    assert f"ok={summary.n_ok}" in final and f"failed={summary.n_failed}" in final, final


def test_one_ear_and_metric_errors(dataset, tmp_path):
    rows = dataset["rows"][:len(dataset["good"])]
    rows = rows + [dict(rows[1], id="rejected", level1=123.0),
                   dict(rows[2], id="nan_score", level1=111.0)]
    manifest = _write_jsonl(dataset["root"] / "ears.jsonl", rows)
    out = tmp_path / "right.jsonl"
    label_mod.label_manifest(manifest, out, ears="right", batch_size=2, dtype="float64",
                             scorer=FakeScorer(), progress=False)
    labels = {r["id"]: r for r in _read_jsonl(out)}
    errors = {r["id"]: r for r in _read_jsonl(tmp_path / "right.errors.jsonl")}
    assert errors["rejected"]["stage"] == "metric"
    assert "123 rejected" in errors["rejected"]["reason"]
    assert errors["nan_score"]["reason"] == "right ear: the metric returned a non-finite score"
    assert sorted(labels) == sorted(r["id"] for r in rows[:7])
    for row in rows[:7]:
        got = labels[row["id"]]
        want = _expected_fake(dataset["root"], row, level1_rule=65.0, ears="right")
        assert list(got["per_ear"]) == ["right"]
        np.testing.assert_allclose(got["haaqi"], want["right"]["combined"], rtol=1e-9)
        assert got["per_ear"]["right"]["d_norm"] == 1.0  # float64 reached the scorer


def test_training_manifest_one_row_per_ear(dataset, tmp_path):
    from haaqi_jax.data.manifest import read_manifest, split_rows

    good = dataset["rows"][:len(dataset["good"])]
    rows = [dict(r, distortion=f"noise {i}", split="test_seen" if i == 3 else None)
            for i, r in enumerate(good)]
    manifest = _write_jsonl(dataset["root"] / "pairs_for_training.jsonl", rows)
    out, train = tmp_path / "labels.jsonl", tmp_path / "train" / "train.jsonl"
    summary = label_mod.label_manifest(manifest, out, batch_size=3, scorer=FakeScorer(),
                                       progress=False, manifest_out=train)
    written = read_manifest(train, require_label=True, check_files=True)
    by_id = {r.id: r for r in written}
    expected_ids = []
    for row in rows:
        want = _expected_fake(dataset["root"], row, level1_rule=65.0)
        several = len(want) > 1
        for ear, values in want.items():
            row_id = f"{row['id']}/{ear}" if several else row["id"]
            expected_ids.append(row_id)
            got = by_id[row_id]
            assert got.haaqi_score == pytest.approx(min(max(values["combined"], 0), 1), rel=1e-9)
            assert got.haaqi_components == pytest.approx(
                (min(values["nonlinear"], 1), min(values["linear"], 1)), rel=1e-9)
            # the fake's nonlinear part is the mean of the audiogram it was given
            np.testing.assert_allclose(got.audiogram.mean() / 100, values["nonlinear"],
                                       rtol=1e-6)
            assert got.channel == (None if ear == "both" else ear)
            assert got.group == (row["id"] if several else None)
            assert got.file_path == (dataset["root"] / row["processed"]).absolute()
            assert got.reference == (dataset["root"] / row["reference"]).absolute()
            assert (got.split, got.distortion) == (row.get("split"), row["distortion"])
    assert sorted(by_id) == sorted(expected_ids)
    assert (summary.training.n_rows, summary.training.n_labels) == (len(expected_ids), len(rows))
    assert summary.training.left_out == ()
    assert "training manifest: " in str(summary)
    # a random train / valid split keeps the two ears of a clip together
    for seed in range(4):
        side = {r.id: name for name, part in split_rows(written, seed=seed).items() for r in part}
        assert all(side[f"{g}/left"] == side[f"{g}/right"] for g in {r.group for r in written
                                                                      if r.group})
    # label rows missing from the manifest, or with a non-finite score, are left out and named
    labels = {label["id"]: label for label in _read_jsonl(out)}
    labels["good1"]["per_ear"]["both"]["linear"] = float("nan")
    labels["good2"]["per_ear"]["left"]["combined"] = 1.3                 # no HAAQI gives this
    edited = tmp_path / "edited.jsonl"
    edited.write_text("".join(json.dumps(label) + "\n" for label in labels.values()))
    fewer = _write_jsonl(dataset["root"] / "pairs_fewer.jsonl", rows[1:])
    partial = label_mod.write_training_manifest(edited, fewer, tmp_path / "partial.jsonl")
    reasons = dict(partial.left_out)
    assert sorted(reasons) == ["good0", "good1", "good2"]
    assert "no row with this id" in reasons["good0"]
    assert "'good1', both ear: haaqi_components.linear is not finite" in reasons["good1"]
    assert "'good2', left ear: haaqi_score = 1.3 is outside what HAAQI can give" in reasons[
        "good2"]
    kept = [i for i in expected_ids if i.split("/")[0] not in ("good0", "good1", "good2")]
    assert partial.n_labels == len(rows) - 3
    assert sorted(r.id for r in read_manifest(partial.path)) == sorted(kept)
    with pytest.raises(ValueError, match="no labelled row"):
        label_mod.write_training_manifest(
            edited, _write_jsonl(tmp_path / "other.jsonl", [dict(rows[0], id="unknown")]),
            tmp_path / "none.jsonl")


def test_training_manifest_leaves_out_what_training_refuses(dataset, tmp_path):
    """Rows train.py would stop at (processed audio the encoder refuses: shorter than one BEATs
    patch, silent) and ears HAAQI found inaudible (their score is the metric's floor) stay out
    of the training manifest, each named; the rest is written."""
    from haaqi_jax.data.manifest import read_manifest

    rng = np.random.default_rng(3)
    root = dataset["root"]
    short = _music(rng, int(0.1 * SR), SR, 330.0)             # 1600 samples at 16 kHz < 2800
    _write(root / "short_ref.wav", short)
    _write(root / "short_proc.wav", 0.5 * short)
    quiet = _music(rng, N, SR, 250.0)
    _write(root / "silent_ref.wav", quiet)
    _write(root / "silent_proc.wav", np.zeros(N))
    good = dataset["rows"][:len(dataset["good"])]
    single = next(r for r in good if "audiogram" in r)                # one ear: "both"
    stereo = next(r for r in good if "audiogram_left" in r)           # two ears
    rows = [single, stereo,
            dict(single, id="short", reference="short_ref.wav", processed="short_proc.wav"),
            dict(single, id="silent", reference="silent_ref.wav", processed="silent_proc.wav")]
    manifest = _write_jsonl(root / "pairs_untrainable.jsonl", rows)
    out, train = tmp_path / "labels.jsonl", tmp_path / "train.jsonl"
    summary = label_mod.label_manifest(manifest, out, scorer=FakeScorer(), progress=False,
                                       manifest_out=train)
    assert summary.n_ok == 4                                  # HAAQI scores all four
    reasons = dict(summary.training.left_out)
    assert sorted(reasons) == ["short", "silent"]
    assert "the encoder cannot read it" in reasons["short"] and "too short" in reasons["short"]
    assert "silent" in reasons["silent"]
    assert sorted(r.id for r in read_manifest(train)) == sorted(
        [single["id"], f"{stereo['id']}/left", f"{stereo['id']}/right"])
    assert "2 left out:\n  id 'short': the encoder cannot read it" in str(summary.training)
    # An inaudible ear goes; the other ear of its clip stays.
    labels = _read_jsonl(out)
    for label in labels:
        if label["id"] == stereo["id"]:
            label["per_ear"]["left"]["audible"] = False
    edited = tmp_path / "inaudible.jsonl"
    edited.write_text("".join(json.dumps(label) + "\n" for label in labels))
    again = label_mod.write_training_manifest(edited, manifest, tmp_path / "train2.jsonl")
    assert dict(again.left_out)[f"{stereo['id']}/left"].startswith("inaudible: ")
    assert sorted(r.id for r in read_manifest(again.path)) == sorted(
        [single["id"], f"{stereo['id']}/right"])
    assert again.n_labels == 2


def test_csv_manifest_equals_jsonl(dataset, tmp_path):
    rows = dataset["rows"][:len(dataset["good"])]
    columns = ["id", "reference", "processed", "audiogram", "audiogram_left", "audiogram_right",
               "audiogram_frequencies", "level1"]
    manifest = dataset["root"] / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for i, row in enumerate(rows):   # lists as "0,10,..." cells, every other one "[0, 10, ...]"
            writer.writerow({k: ((json.dumps(v) if i % 2 else ",".join(map(str, v)))
                                 if isinstance(v, list) else v) for k, v in row.items()})
    from_csv = tmp_path / "csv.jsonl"
    from_json = tmp_path / "json.jsonl"
    label_mod.label_manifest(manifest, from_csv, scorer=FakeScorer(), progress=False)
    label_mod.label_manifest(_write_jsonl(dataset["root"] / "good.jsonl", rows), from_json,
                             scorer=FakeScorer(), progress=False)
    strip = lambda r: {k: v for k, v in r.items() if k not in ("line", "reference", "processed")}
    labels = [strip(r) for r in _read_jsonl(from_csv)]
    assert len(labels) == len(rows) and labels == [strip(r) for r in _read_jsonl(from_json)]


def test_cli_refuses_clashing_or_unwritable_outputs_before_labelling(dataset, tmp_path,
                                                                       capsys):
    from haaqi_jax import cli
    out = tmp_path / "labels.jsonl"
    cases = [(["--errors", str(out)], "--errors"),
             (["--manifest-out", str(dataset["manifest"])], "the manifest being labelled"),
             (["--manifest-out", str(out / "train.jsonl")], "--manifest-out")]
    for extra, message in cases:
        assert cli.main(["label", str(dataset["manifest"]), "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        assert not out.exists()                              # nothing labelled first
    # A labels file written with other settings: one line naming the difference, exit 2.
    out.write_text(json.dumps({"id": "x", "per_ear": {}, "equalisation": 2, "level1_rule": 65.0,
                               "ears": "average", "dtype": "float32", "seed": 0}) + "\n")
    assert cli.main(["label", str(dataset["manifest"]), "--out", str(out)]) == 2
    assert "other settings" in capsys.readouterr().err
    # An errors file (or any JSONL with ids) given as --out: named as such.
    out.write_text(json.dumps({"id": "x", "stage": "audio", "reason": "missing"}) + "\n")
    assert cli.main(["label", str(dataset["manifest"]), "--out", str(out)]) == 2
    assert "not a labels file" in capsys.readouterr().err
    # A folder, or a file that is not UTF-8, given as the manifest.
    assert cli.main(["label", str(tmp_path), "--out", str(tmp_path / "o" / "l.jsonl")]) == 2
    assert "is a folder; give the manifest file" in capsys.readouterr().err
    latin = tmp_path / "latin.csv"
    latin.write_bytes("id,reference\ncaf\xe9,x.wav\n".encode("latin-1"))
    assert cli.main(["label", str(latin), "--out", str(tmp_path / "o" / "l.jsonl")]) == 2
    assert "latin.csv is not UTF-8 text" in capsys.readouterr().err
    # A manifest without rows is a usage error, not "0 rows: 0 labelled" and success.
    (tmp_path / "header.csv").write_text("id,reference,processed,audiogram\n")
    (tmp_path / "empty.jsonl").write_text("\n")
    for empty, where in (("header.csv", "has no rows below its header"),
                         ("empty.jsonl", "has no rows: nothing to label")):
        assert cli.main(["label", str(tmp_path / empty), "--out",
                         str(tmp_path / "o" / "l.jsonl")]) == 2
        assert f"{empty} {where}" in capsys.readouterr().err


def test_a_fixed_row_is_labelled_on_the_next_run(dataset, tmp_path):
    row = dict(dataset["rows"][1], id="late", processed="late.wav")
    row["reference"] = str(dataset["root"] / row["reference"])
    manifest = _write_jsonl(tmp_path / "late.jsonl", [row])
    out = tmp_path / "labels.jsonl"
    first = label_mod.label_manifest(manifest, out, scorer=FakeScorer(), progress=False)
    assert (first.n_ok, first.n_failed) == (0, 1)                 # late.wav is not there yet
    shutil.copy(dataset["root"] / dataset["rows"][1]["processed"], tmp_path / "late.wav")
    second = label_mod.label_manifest(manifest, out, scorer=FakeScorer(), progress=False)
    assert (second.n_ok, second.n_failed, second.n_retried) == (1, 0, 1)   # was: "already done"
    assert [r["id"] for r in _read_jsonl(out)] == ["late"]
    assert (tmp_path / "labels.errors.jsonl").read_text() == ""


def test_resume_after_crash_equals_uninterrupted(dataset, tmp_path):
    whole = tmp_path / "whole.jsonl"
    label_mod.label_manifest(dataset["manifest"], whole, batch_size=3, scorer=FakeScorer(),
                             progress=False)
    part = tmp_path / "part.jsonl"
    with pytest.raises(RuntimeError, match="injected crash"):
        label_mod.label_manifest(dataset["manifest"], part, batch_size=3,
                                 scorer=FakeScorer(fail_on_call=3), progress=False)
    done = _read_jsonl(part)
    failed = _read_jsonl(tmp_path / "part.errors.jsonl")
    assert 0 < len(done) < len(dataset["good"])
    with open(part, "a") as f:  # a kill in the middle of a write leaves half a line
        f.write('{"id": "good6", "haaq')
    summary = label_mod.label_manifest(dataset["manifest"], part, batch_size=3,
                                       scorer=FakeScorer(), progress=False)
    # Failed rows are tried again (and fail again here): only labelled rows are skipped.
    assert summary.n_skipped == len(done)
    assert summary.n_retried == len({str(e["id"]) for e in failed} - {d["id"] for d in done})
    assert part.read_text() == whole.read_text()  # same rows, same order, same noise keys
    errors = tmp_path / "part.errors.jsonl"
    whole_errors = (tmp_path / "whole.errors.jsonl").read_text()
    assert errors.read_text() == whole_errors
    # A third run labels nothing new; the bad rows are retried and recorded once, as before.
    again = label_mod.label_manifest(dataset["manifest"], part, batch_size=3,
                                     scorer=FakeScorer(), progress=False)
    n_bad = len(whole_errors.splitlines())
    assert (again.n_ok, again.n_failed, again.n_skipped) == (0, n_bad, summary.n_rows - n_bad)
    assert "had failed before" in str(again)
    assert part.read_text() == whole.read_text() and errors.read_text() == whole_errors
    # A row relabelled alone (its line deleted, e.g. to retry it) gets the same numbers, noise
    # key included: batches come from the whole manifest, not from the rows left to do.
    lines = whole.read_text().splitlines(keepends=True)
    retry = [i for i, line in enumerate(lines) if json.loads(line)["id"] == "good1"]
    keep = [line for i, line in enumerate(lines) if i not in retry]
    part.write_text("".join(keep))
    label_mod.label_manifest(dataset["manifest"], part, batch_size=3, scorer=FakeScorer(),
                             progress=False)
    assert part.read_text() == "".join(keep + [lines[retry[0]]])


def test_resume_refuses_other_settings(dataset, tmp_path):
    out = tmp_path / "labels.jsonl"
    label_mod.label_manifest(dataset["manifest"], out, limit=3, scorer=FakeScorer(),
                             progress=False)
    with pytest.raises(ValueError, match="equalisation=1 .now 2."):
        label_mod.label_manifest(dataset["manifest"], out, equalisation=2, scorer=FakeScorer(),
                                 progress=False)


def test_bad_arguments(dataset, tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        label_mod.label_manifest(tmp_path / "none.jsonl", tmp_path / "o.jsonl",
                                 scorer=FakeScorer())
    for kwargs, match in [({"equalisation": 3}, "equalisation"), ({"ears": "both"}, "ears"),
                          ({"level1": float("nan")}, "level1"), ({"level1": "loud"}, "level1"),
                          ({"batch_size": 0}, "batch"), ({"dtype": "float16"}, "dtype")]:
        with pytest.raises(ValueError, match=match):
            label_mod.label_manifest(dataset["manifest"], tmp_path / "o.jsonl",
                                     scorer=FakeScorer(), **kwargs)
    (tmp_path / "junk.jsonl").write_text("not json\n")
    with pytest.raises(ValueError, match="junk.jsonl, line 1"):
        label_mod.label_manifest(dataset["manifest"], tmp_path / "junk.jsonl",
                                 scorer=FakeScorer())


def test_cli_arguments_reach_the_labeller(dataset, tmp_path, monkeypatch, capsys):
    scorer = FakeScorer()
    monkeypatch.setattr(label_mod, "label_manifest",
                        functools.partial(label_mod.label_manifest, scorer=scorer))
    out = tmp_path / "cli.jsonl"
    errors = tmp_path / "bad.jsonl"
    code = cli.main(["label", str(dataset["manifest"]), "--out", str(out), "--errors",
                     str(errors), "--batch-size", "5", "--equalisation", "2", "--level1",
                     "cadenza", "--ears", "left", "--dtype", "float64", "--seed", "3",
                     "--limit", "4", "--no-progress", "--manifest-out",
                     str(tmp_path / "train.jsonl")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "4 rows: 4 labelled, 0 failed" in printed
    assert f"training manifest: 4 rows from 4 labels -> {tmp_path / 'train.jsonl'}" in printed
    labels = _read_jsonl(out)
    assert [r["id"] for r in labels] == ["good0", "good1", "good2", "good3"][:len(labels)]
    assert {s[0] for s in scorer.shapes} == {5} and errors.read_text() == ""
    for got in labels:
        assert (got["equalisation"], got["level1_rule"], got["ears"], got["dtype"],
                got["seed"]) == (2, "cadenza", "left", "float64", 3)
        assert list(got["per_ear"]) == ["left"]
    with pytest.raises(SystemExit):
        cli.main(["label", str(dataset["manifest"]), "--out", str(out), "--level1", "loud"])


def test_cli_plot_draws_the_training_manifests_labels(dataset, tmp_path, monkeypatch, capsys):
    from figures import drawn

    monkeypatch.setattr(label_mod, "label_manifest",
                        functools.partial(label_mod.label_manifest, scorer=FakeScorer()))
    out, train, plot = tmp_path / "l.jsonl", tmp_path / "train.jsonl", tmp_path / "labels.png"
    # Without the training manifest there is nothing to draw: refused before any labelling.
    assert cli.main(["label", str(dataset["manifest"]), "--out", str(out), "--plot",
                     str(plot)]) == 2
    assert "give --manifest-out too" in capsys.readouterr().err and not out.exists()
    assert cli.main(["label", str(dataset["manifest"]), "--out", str(out), "--limit", "4",
                     "--no-progress", "--manifest-out", str(train), "--plot", str(plot)]) == 0
    assert f"labels plot: {plot}" in capsys.readouterr().out
    assert plot.read_bytes().startswith(b"\x89PNG")
    # Nothing labelled (every row fails): no plot, and a line that says so.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "reference": "missing.wav", "processed": "missing.wav",
                               "audiogram": [10] * 8}) + "\n")
    assert cli.main(["label", str(bad), "--out", str(tmp_path / "b.jsonl"), "--no-progress",
                     "--manifest-out", str(tmp_path / "bt.jsonl"), "--plot",
                     str(tmp_path / "none.png")]) == 1
    assert "no labels plot: no row is labelled" in capsys.readouterr().err
    assert not (tmp_path / "none.png").exists()
    # What it draws: every training row's label once (one row per scored ear; these rows name
    # no split: "(none)").
    scores = [json.loads(line)["haaqi_score"] for line in train.read_text().splitlines()]
    fig = drawn(label_mod.plot_labels, train, tmp_path / "again.png")
    (hist,) = [a for a in fig.axes[0].get_children() if (a.get_gid() or "") == "hist:(none)"]
    expected, _ = np.histogram(np.clip(scores, 0, 1), bins=20, range=(0.0, 1.0))
    np.testing.assert_array_equal(hist.get_data().values, expected)
    assert len(fig.axes) == 1 and f"{len(scores)} clips" in fig.axes[0].get_title()


# ------------------------------------------------------------------------------------------------
# The real metric (haaqi_jax.haaqi.api) against pyclarity 0.9.0's haaqi_v1


@pytest.fixture(scope="module")
def real_manifest(tmp_path_factory) -> Path:
    """Two good rows (stereo with two audiograms, mono with one) of one length (one compiled
    shape) and a row whose reference is too short once trimmed (the metric's own check)."""
    root = tmp_path_factory.mktemp("real")
    rng = np.random.default_rng(3)
    left = _music(rng, N, SR, 196.0)
    stereo = np.stack([left, 0.7 * _music(rng, N, SR, 262.0)], axis=1)
    mono = _music(rng, N, SR, 330.0)
    blip = np.zeros(N)
    blip[5000:5100] = 0.1 * np.sin(np.arange(100))
    rows = [
        {"id": "stereo", "reference": _write(root / "s_ref.wav", stereo),
         "processed": _write(root / "s_proc.wav", _degrade(rng, stereo, 8.0)),
         "audiogram_left": SLOPING, "audiogram_right": FLAT40},
        {"id": "mono", "reference": _write(root / "m_ref.wav", mono),
         "processed": _write(root / "m_proc.wav", _degrade(rng, mono, 12.0)),
         "audiogram": NORMAL},
        {"id": "blip", "reference": _write(root / "b_ref.wav", blip),
         "processed": _write(root / "b_proc.wav", blip), "audiogram": NORMAL},
    ]
    return _write_jsonl(root / "manifest.jsonl", rows)


def _pyclarity_labels(manifest: Path, *, equalisation: int, level1_rule) -> dict:
    """{id: {ear: combined}} from pyclarity's haaqi_v1, one call per ear (numpy seeded)."""
    from clarity.evaluator.haaqi import haaqi_v1
    from clarity.utils.audiogram import Audiogram as ClarityAudiogram
    out = {}
    for row in _read_jsonl_rows(manifest):
        if row["id"] == "blip":
            continue
        ref, sr = sf.read(str(manifest.parent / row["reference"]), always_2d=True)
        proc, _ = sf.read(str(manifest.parent / row["processed"]), always_2d=True)
        ears = ["both"] if "audiogram" in row else ["left", "right"]
        out[row["id"]] = {}
        for ear in ears:
            c = 1 if ear == "right" else 0
            r, p = ref[:, min(c, ref.shape[1] - 1)], proc[:, min(c, proc.shape[1] - 1)]
            levels = row.get("audiogram", row.get(f"audiogram_{ear}"))
            audiogram = ClarityAudiogram(np.asarray(levels, float),
                                         np.asarray(label_mod.STANDARD_FREQUENCIES))
            lvl = 65 - 20 * np.log10(_rms(r)) if level1_rule == "cadenza" else level1_rule
            np.random.seed(0)
            out[row["id"]][ear] = haaqi_v1(r, sr, p, sr, audiogram, equalisation, lvl)[0]
    return out


def _read_jsonl_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def _check_against_pyclarity(out: Path, want: dict, atol: float) -> None:
    labels = {r["id"]: r for r in _read_jsonl(out)}
    assert sorted(labels) == sorted(want)
    for row_id, ears in want.items():
        got = labels[row_id]
        assert sorted(got["per_ear"]) == sorted(ears)
        for ear, value in ears.items():
            assert abs(got["per_ear"][ear]["combined"] - value) < atol, (row_id, ear, value, got)
        assert abs(got["haaqi"] - np.mean(list(ears.values()))) < atol
    errors = {r["id"]: r for r in _read_jsonl(out.with_name(out.stem + ".errors.jsonl"))}
    assert list(errors) == ["blip"] and errors["blip"]["stage"] == "metric"
    assert "16 ms" in errors["blip"]["reason"]


def test_float64_labels_equal_pyclarity(real_manifest, tmp_path):
    """eq 1, level1 65: within 1e-3 (the threshold noise comes from jax.random, not numpy's
    global generator; a seed moves a score by ~1e-4)."""
    out = tmp_path / "f64.jsonl"
    summary = label_mod.label_manifest(real_manifest, out, batch_size=4, dtype="float64",
                                       progress=False)
    assert (summary.n_ok, summary.n_failed) == (2, 1)
    want = _pyclarity_labels(real_manifest, equalisation=1, level1_rule=65.0)
    _check_against_pyclarity(out, want, atol=1e-3)


def test_cli_float32_cadenza_labels_equal_pyclarity(real_manifest, tmp_path):
    """The CLI with the Cadenza conventions (eq 2, level1 from the reference RMS per ear)."""
    out = tmp_path / "f32.jsonl"
    code = cli.main(["label", str(real_manifest), "--out", str(out), "--batch-size", "4",
                     "--equalisation", "2", "--level1", "cadenza", "--dtype", "float32",
                     "--no-progress"])
    assert code == 1                             # the blip row fails (and is named); 2 labelled
    want = _pyclarity_labels(real_manifest, equalisation=2, level1_rule="cadenza")
    _check_against_pyclarity(out, want, atol=2e-3)


def test_default_batch_size_is_wide_on_accelerators():
    class Device:
        def __init__(self, platform):
            self.platform = platform

    assert label_mod.default_batch_size([Device("cpu")]) == 8
    assert label_mod.default_batch_size([Device("gpu")]) == 64
    assert label_mod.default_batch_size([Device("tpu")] * 4) == 256


def test_a_changed_manifest_row_is_labelled_again(dataset, tmp_path):
    """A labelled row whose manifest entry changes (audiogram, path, level1) is relabelled and
    its old label removed; the training manifest never pairs a new entry with an old score."""
    rows = [dict(r) for r in dataset["rows"][1:4]]          # good1 (mono), good2, good3 (ears)
    manifest = _write_jsonl(dataset["root"] / "changing.jsonl", rows)
    out, train = tmp_path / "labels.jsonl", tmp_path / "train.jsonl"
    label_mod.label_manifest(manifest, out, scorer=FakeScorer(), progress=False)
    before = {r["id"]: r for r in _read_jsonl(out)}
    assert before["good1"]["inputs"] == {"audiograms": {"both": NORMAL}, "level1": None}
    rows[0]["audiogram"] = SLOPING                           # the scorer's nonlinear follows it
    rows[1]["processed"] = rows[1]["reference"]               # combined becomes 1/2
    _write_jsonl(manifest, rows)
    # The old labels against the edited manifest: left out, never paired with the new entries.
    stale = label_mod.write_training_manifest(out, manifest, train)
    assert sorted(i for i, _ in stale.left_out) == ["good1", "good2"]
    assert "changed since it was labelled (both audiogram" in dict(stale.left_out)["good1"]
    summary = label_mod.label_manifest(manifest, out, scorer=FakeScorer(), progress=False,
                                       manifest_out=train)
    assert (summary.n_ok, summary.n_skipped) == (2, 1)
    assert sorted(i for i, _ in summary.changed) == ["good1", "good2"]
    assert "their old labels removed, scored again" in str(summary)
    assert "processed" in dict(summary.changed)["good2"]
    after = _read_jsonl(out)
    assert sorted(r["id"] for r in after) == ["good1", "good2", "good3"]   # no duplicate ids
    fresh = tmp_path / "fresh.jsonl"
    label_mod.label_manifest(manifest, fresh, scorer=FakeScorer(), progress=False)
    assert {r["id"]: r for r in after} == {r["id"]: r for r in _read_jsonl(fresh)}
    after = {r["id"]: r for r in after}
    np.testing.assert_allclose(after["good1"]["per_ear"]["both"]["nonlinear"],
                               np.mean(SLOPING) / 100)
    np.testing.assert_allclose(after["good2"]["haaqi"], 0.5)
    assert after["good3"] == before["good3"]
    assert summary.training is not None and not summary.training.left_out
    # A row's own level1, and its ears, count too.
    rows[2]["level1"] = 70.0
    _write_jsonl(manifest, rows)
    again = label_mod.label_manifest(manifest, out, scorer=FakeScorer(), progress=False)
    assert [i for i, _ in again.changed] == ["good3"] and again.n_ok == 1
    assert "level1 None -> 70.0" in dict(again.changed)["good3"]
    # One file spelt another way ("dir/./a.wav" for "dir/a.wav") is no change.
    respell = lambda path: os.path.join(os.path.dirname(path), ".", os.path.basename(path))
    _write_jsonl(manifest, [dict(r, reference=respell(r["reference"]),
                                 processed=respell(r["processed"])) for r in rows])
    same = label_mod.label_manifest(manifest, out, scorer=FakeScorer(), progress=False)
    assert same.n_skipped == 3 and not same.changed and same.n_ok == 0
    _write_jsonl(manifest, rows)
    # Labels written before `inputs` was recorded are compared by their paths and level1 only.
    legacy = [{k: v for k, v in r.items() if k != "inputs"} for r in _read_jsonl(out)]
    out.write_text("".join(json.dumps(r) + "\n" for r in legacy))
    rows[0]["audiogram"] = NORMAL
    rows[2]["level1"] = 72.0
    _write_jsonl(manifest, rows)
    old = label_mod.label_manifest(manifest, out, scorer=FakeScorer(), progress=False)
    assert old.n_skipped == 2 and [i for i, _ in old.changed] == ["good3"]
    # A labelled row made invalid in the manifest loses its label; the training manifest says
    # why the row is missing.
    rows[1]["audiogram"] = [0, 0, 0]
    _write_jsonl(manifest, rows)
    bad = label_mod.label_manifest(manifest, out, scorer=FakeScorer(), progress=False,
                                   manifest_out=train)
    assert dict(bad.changed) == {"good2": "the row is invalid now"} and bad.n_failed == 1
    assert sorted(r["id"] for r in _read_jsonl(out)) == ["good1", "good3"]
    label_mod.write_training_manifest(out, manifest, train)
    out.write_text(out.read_text() + json.dumps(before["good2"]) + "\n")
    stale = label_mod.write_training_manifest(out, manifest, train)
    assert dict(stale.left_out)["good2"].startswith("the manifest row is invalid now: ")


def test_errors_option_never_overwrites_a_labels_file(dataset, tmp_path):
    out = tmp_path / "labels.jsonl"
    label_mod.label_manifest(dataset["manifest"], out, limit=2, scorer=FakeScorer(),
                             progress=False)
    other = tmp_path / "other.jsonl"
    other.write_bytes(out.read_bytes())
    with pytest.raises(ValueError, match="not an errors file"):
        label_mod.label_manifest(dataset["manifest"], tmp_path / "new.jsonl",
                                 errors_path=other, scorer=FakeScorer(), progress=False)
    assert other.read_bytes() == out.read_bytes()


def test_csv_with_a_bom_and_leading_zero_ids(dataset, tmp_path):
    row = dataset["rows"][1]
    manifest = tmp_path / "excel.csv"
    with open(manifest, "w", newline="", encoding="utf-8-sig") as f:   # Excel's "CSV UTF-8"
        writer = csv.writer(f)
        writer.writerow(["id", "reference", "processed", "audiogram"])
        for row_id in ("007", "7"):
            writer.writerow([row_id, str(dataset["root"] / row["reference"]),
                             str(dataset["root"] / row["processed"]), ",".join(map(str, NORMAL))])
    out = tmp_path / "labels.jsonl"
    summary = label_mod.label_manifest(manifest, out, scorer=FakeScorer(), progress=False)
    assert (summary.n_ok, summary.n_failed) == (2, 0)
    assert [r["id"] for r in _read_jsonl(out)] == ["007", 7]


def test_inaudible_ears_are_flagged(dataset, tmp_path):
    rows = [dict(dataset["rows"][1]), dict(dataset["rows"][3], level1=0.0)]
    manifest = _write_jsonl(dataset["root"] / "quiet.jsonl", rows)
    out = tmp_path / "labels.jsonl"
    summary = label_mod.label_manifest(manifest, out, scorer=FakeScorer(), progress=False)
    labels = {r["id"]: r for r in _read_jsonl(out)}
    assert [e["audible"] for e in labels["good1"]["per_ear"].values()] == [True]
    assert [e["audible"] for e in labels["good3"]["per_ear"].values()] == [False, False]
    assert summary.inaudible == ("good3",)
    assert "warning: 1 row(s) have an ear whose reference is below" in str(summary)


def test_one_writer_per_labels_file(dataset, tmp_path):
    """A second run on the same OUT is refused while the first holds it (both would label the
    rows left to do and write them twice); the lock goes with the run."""
    import fcntl
    out = tmp_path / "labels.jsonl"
    with open(tmp_path / ".labels.jsonl.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)     # as a running label would
        with pytest.raises(ValueError, match="another `haaqi-jax label` is writing"):
            label_mod.label_manifest(dataset["manifest"], out, limit=2, scorer=FakeScorer(),
                                     progress=False)
        assert not out.exists()
    label_mod.label_manifest(dataset["manifest"], out, limit=2, scorer=FakeScorer(),
                             progress=False)
    assert out.exists()
    # A symlink to OUT is the same labels file: the same lock.
    link = tmp_path / "link.jsonl"
    link.symlink_to(out)
    with open(tmp_path / ".labels.jsonl.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ValueError, match="another `haaqi-jax label` is writing"):
            label_mod.label_manifest(dataset["manifest"], link, limit=3, scorer=FakeScorer(),
                                     progress=False)
    # Two labels of one id (written by two runs before the lock): the training manifest keeps
    # one, and says so, rather than write a manifest train.py refuses.
    out.write_text(out.read_text() * 2)
    summary = label_mod.write_training_manifest(out, dataset["manifest"], tmp_path / "t.jsonl")
    assert summary.n_labels == 2
    assert [r for _, r in summary.left_out] == ["a second label with this id (two runs wrote "
                                                "one labels file)"] * 2


def test_a_pair_too_long_for_memory_fails_alone(real_manifest, tmp_path, monkeypatch, capsys):
    """XLA's RESOURCE_EXHAUSTED on a batch: each pair is scored alone, the one that still does
    not fit is an error row with the reason, the rest are labelled (the run used to die with a
    traceback and no labels)."""
    from haaqi_jax.haaqi import api
    real = api.score_prepared
    failed_alone = []

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 3397388488 bytes.\n"
                           "(XLA's further lines)")

    def short_of_memory(pairs, **kwargs):
        if len({id(p) for p in pairs}) > 1 or True not in failed_alone:  # batch; 1st alone
            failed_alone.append(len(pairs) == 1)
            out_of_memory()
        return real(pairs, **kwargs)

    expected = tmp_path / "plain.jsonl"
    label_mod.label_manifest(real_manifest, expected, batch_size=4, progress=False)
    monkeypatch.setattr(api, "score_prepared", short_of_memory)
    out = tmp_path / "oom.jsonl"
    summary = label_mod.label_manifest(real_manifest, out, batch_size=4, progress=False)
    assert failed_alone == [False, True]
    assert (summary.n_ok, summary.n_failed) == (1, 2)
    plain = {r["id"]: r["haaqi"] for r in _read_jsonl(expected)}
    labels = {r["id"]: r["haaqi"] for r in _read_jsonl(out)}
    assert labels == {"mono": pytest.approx(plain["mono"], abs=1e-6)}   # alone vs in a batch
    errors = {r["id"]: r["reason"] for r in _read_jsonl(out.with_name("oom.errors.jsonl"))}
    assert sorted(errors) == ["blip", "stereo"]
    assert errors["stereo"].startswith("left ear: out of memory scoring this 0.5 s pair alone")
    # A command that runs out of memory says so in one line, with what to do.
    assert cli.run_guarded("haaqi-jax score", out_of_memory, interrupted="") == 2
    err = capsys.readouterr().err
    assert err.startswith("haaqi-jax score: error: out of memory (RESOURCE_EXHAUSTED: Out of "
                          "memory allocating 3397388488 bytes.); memory grows with clip length")
    assert "further lines" not in err


def test_a_custom_scorer_short_of_memory_scores_pairs_alone(dataset, tmp_path):
    """A user's scorer that runs out of memory on batches: each pair is scored alone, and the
    one that still does not fit is an error row; the rest equal a plain run's labels."""
    rows = dataset["rows"][:len(dataset["good"])]
    manifest = _write_jsonl(dataset["root"] / "oom.jsonl", rows)
    plain = tmp_path / "plain.jsonl"
    label_mod.label_manifest(manifest, plain, batch_size=3, scorer=FakeScorer(), progress=False)
    longest = max(sf.info(str(dataset["root"] / r["processed"])).frames for r in rows)

    class ShortOfMemory(FakeScorer):
        def __call__(self, reference, processed, sample_rate, *args, lengths=None, **kwargs):
            # (a pair alone comes in the batch's shape, filled with copies of itself)
            if len({r.tobytes() for r in reference}) > 1 or int(np.max(lengths)) >= longest:
                raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 123 bytes.")
            return super().__call__(reference, processed, sample_rate, *args,
                                    lengths=lengths, **kwargs)

    out = tmp_path / "oom_labels.jsonl"
    label_mod.label_manifest(manifest, out, batch_size=3, scorer=ShortOfMemory(),
                             progress=False)
    errors = {r["id"]: r["reason"] for r in _read_jsonl(tmp_path / "oom_labels.errors.jsonl")}
    too_long = [r["id"] for r in rows
                if sf.info(str(dataset["root"] / r["processed"])).frames == longest]
    assert sorted(errors) == sorted(too_long)
    assert all("out of memory scoring this" in reason for reason in errors.values())
    want = {r["id"]: r["haaqi"] for r in _read_jsonl(plain) if r["id"] not in too_long}
    assert {r["id"]: r["haaqi"] for r in _read_jsonl(out)} == pytest.approx(want, rel=1e-12)


def test_a_row_whose_ears_both_fail_names_the_first(dataset, tmp_path):
    stereo = next(r for r in dataset["rows"][:len(dataset["good"])] if "audiogram_left" in r)
    manifest = _write_jsonl(dataset["root"] / "both_fail.jsonl",
                            [dict(stereo, id="both", level1=123.0)])
    label_mod.label_manifest(manifest, tmp_path / "l.jsonl", scorer=FakeScorer(),
                             progress=False)
    (error,) = _read_jsonl(tmp_path / "l.errors.jsonl")
    assert error["reason"].startswith("left ear: ") and "123 rejected" in error["reason"]


def _count_scored_pairs(monkeypatch, api) -> list[int]:
    """Wraps api.score_prepared: the returned list gets each call's number of pairs."""
    real_score = api.score_prepared
    scored = []

    def counting(pairs, **kwargs):
        scored.append(len(pairs))
        return real_score(pairs, **kwargs)

    monkeypatch.setattr(api, "score_prepared", counting)
    return scored


def test_a_lone_long_pair_is_not_scored_as_a_full_batch_of_copies(tmp_path, monkeypatch):
    """On a CPU a long pair is scored one item per call (its scratch alone exceeds the chunk
    budget). Padding the last batch up to the batch size then bought no shape reuse and cost
    one extra call per copy: one 60 s pair was scored 8 times (89 s instead of ~30 s)."""
    from haaqi_jax.haaqi import api
    rng = np.random.default_rng(3)
    ref = _music(rng, N, SR, 330.0)
    _write(tmp_path / "r.wav", ref)
    _write(tmp_path / "p.wav", _degrade(rng, ref, 10.0))
    manifest = _write_jsonl(tmp_path / "m.jsonl", [{"id": "x", "reference": "r.wav",
                                                     "processed": "p.wav",
                                                     "audiogram": SLOPING}])
    monkeypatch.setattr(api, "default_chunking", lambda length, devices, dtype=None: (1, 8))
    scored = _count_scored_pairs(monkeypatch, api)
    label_mod.label_manifest(manifest, tmp_path / "labels.jsonl", batch_size=8,
                             progress=False)
    assert sum(scored) == 1, scored
    (row,) = _read_jsonl(tmp_path / "labels.jsonl")
    assert 0.0 < row["haaqi"] < 1.0


def _pairs_manifest(root: Path, count: int, *, seed: int, base_hz: float,
                    step_hz: float) -> Path:
    """root/m.jsonl of `count` rows x0, x1, ...: music at base_hz + i * step_hz and its
    10 dB SNR degradation, for the sloping audiogram."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        ref = _music(rng, N, SR, base_hz + step_hz * i)
        _write(root / f"r{i}.wav", ref)
        _write(root / f"p{i}.wav", _degrade(rng, ref, 10.0))
        rows.append({"id": f"x{i}", "reference": f"r{i}.wav", "processed": f"p{i}.wav",
                     "audiogram": SLOPING})
    return _write_jsonl(root / "m.jsonl", rows)


def test_a_short_last_batch_keeps_the_full_batches_call_shape(tmp_path, monkeypatch):
    """The last batch of a length group is padded to whole calls of the size a full batch's
    calls have: 8 rows at 5 items per call go as two calls of 4, so 3 leftover rows go as one
    call of 4 (a call of 5 would compile a shape of its own, ~10 s; 8 would be 2 calls)."""
    from haaqi_jax.haaqi import api
    manifest = _pairs_manifest(tmp_path, 11, seed=4, base_hz=220.0, step_hz=10.0)
    monkeypatch.setattr(api, "default_chunking", lambda length, devices, dtype=None: (5, 8))
    real_core = api._batch_core
    call_items = []

    def counting(reference, *args, **kwargs):
        call_items.append(reference.shape[0])
        return real_core(reference, *args, **kwargs)

    monkeypatch.setattr(api, "_batch_core", counting)
    label_mod.label_manifest(manifest, tmp_path / "labels.jsonl", batch_size=8, progress=False)
    assert call_items == [4, 4, 4], call_items
    assert len(_read_jsonl(tmp_path / "labels.jsonl")) == 11


def _two_row_manifest(root: Path) -> Path:
    return _pairs_manifest(root, 2, seed=8, base_hz=247.0, step_hz=30.0)


def test_float64_labels_on_a_tpu_host_run_on_the_host_cpu(tmp_path, monkeypatch):
    """TPUs have no float64: `--dtype float64` there labels on the host CPU, sized for it (8
    items per call, not 64 per TPU), warns once, and writes a CPU host's labels; none of the
    (fake) TPUs is touched (a Mesh over them would fail)."""
    import jax
    from haaqi_jax.haaqi import api
    from test_haaqi_placement import CPU0, pretend_tpu_host, spy_default_device
    manifest = _two_row_manifest(tmp_path)
    label_mod.label_manifest(manifest, tmp_path / "cpu_host.jsonl", dtype="float64",
                             progress=False)
    tpus = pretend_tpu_host(monkeypatch)
    assert label_mod.default_batch_size(jax.local_devices()) == 64 * len(tpus)
    calls = spy_default_device(monkeypatch, api, "_batch_core")
    scored = _count_scored_pairs(monkeypatch, api)
    with pytest.warns(UserWarning, match="float64 runs on the host CPU .* as tpu has no float64"):
        label_mod.label_manifest(manifest, tmp_path / "tpu_host.jsonl", dtype="float64",
                                 progress=False)
    assert scored == [8] and calls == [CPU0]     # one call of the CPU's default batch size
    want = {r["id"]: r for r in _read_jsonl(tmp_path / "cpu_host.jsonl")}
    got = {r["id"]: r for r in _read_jsonl(tmp_path / "tpu_host.jsonl")}
    assert sorted(got) == ["x0", "x1"]
    for row_id, row in got.items():
        assert row["per_ear"] == want[row_id]["per_ear"] and row["haaqi"] == want[row_id]["haaqi"]


def test_float32_labels_on_a_tpu_host_keep_to_the_accelerators(tmp_path, monkeypatch):
    from test_haaqi_placement import _MeshBuilt, _stop_at_the_mesh, pretend_tpu_host
    manifest = _two_row_manifest(tmp_path)
    tpus = pretend_tpu_host(monkeypatch)
    _stop_at_the_mesh(monkeypatch)
    with pytest.raises(_MeshBuilt) as built:
        label_mod.label_manifest(manifest, tmp_path / "l.jsonl", dtype="float32",
                                 progress=False)
    assert built.value.devices == tpus


def test_a_pair_below_haaqis_lowest_rate_fails_alone(dataset, tmp_path):
    """A pair at 500 Hz (HAAQI refuses rates below 1 kHz) is a bad row: it goes to the errors
    file naming its rate and file, and the other rows are still labelled. It used to abort the
    whole run (exit 2) with "sample_rate must be at least 1000 Hz", naming no row or file."""
    x = _music(np.random.default_rng(3), 4000, 500, 60.0)
    low = _write(tmp_path / "low.wav", x, 500)
    good = dict(dataset["rows"][1], id="good")
    good["reference"] = str(dataset["root"] / good["reference"])
    good["processed"] = str(dataset["root"] / good["processed"])
    manifest = _write_jsonl(tmp_path / "low.jsonl", [
        {"id": "low", "reference": low, "processed": low, "audiogram": NORMAL}, good])
    out = tmp_path / "labels.jsonl"
    summary = label_mod.label_manifest(manifest, out, scorer=FakeScorer(), progress=False)
    assert (summary.n_ok, summary.n_failed) == (1, 1)
    assert [r["id"] for r in _read_jsonl(out)] == ["good"]
    [error] = _read_jsonl(tmp_path / "labels.errors.jsonl")
    assert error["id"] == "low" and "500 Hz" in error["reason"]
    assert "low.wav" in error["reason"] and "1000 Hz" in error["reason"]
    # The built-in metric: the same row is reported, not raised (only it is in this manifest,
    # so nothing is compiled).
    alone = _write_jsonl(tmp_path / "alone.jsonl", [
        {"id": "low", "reference": low, "processed": low, "audiogram": NORMAL}])
    summary = label_mod.label_manifest(alone, tmp_path / "alone_labels.jsonl", progress=False)
    assert (summary.n_ok, summary.n_failed) == (0, 1)
