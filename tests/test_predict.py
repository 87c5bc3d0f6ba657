"""`haaqi-jax predict` on a temporary folder: mixed lengths, rates and channels, bad files."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import soundfile as sf

from haaqi_jax import cli
from haaqi_jax.model import HAAQINet, HAAQINetConfig
from beats_reference import TINY_CFG

LEVELS = [10, 15, 20, 30, 40, 45, 50, 55]


def _tone(rate, seconds, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(rate * seconds)) / rate
    x = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 1500) * t) + 0.02 * rng.normal(size=t.size)
    return np.stack([x, 0.5 * x], axis=1) if channels == 2 else x


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    net = HAAQINet.init_random(HAAQINetConfig(encoder_config=TINY_CFG), seed=11)
    net.save(root / "ckpt")
    music = root / "music"
    (music / "sub").mkdir(parents=True)
    sf.write(music / "a.wav", _tone(16000, 0.5, seed=1), 16000)
    sf.write(music / "sub" / "b.flac", _tone(44100, 0.6, seed=2), 44100)
    sf.write(music / "sub" / "c.wav", _tone(8000, 0.45, channels=2, seed=3), 8000,
             subtype="PCM_16")
    sf.write(music / "short.wav", _tone(16000, 0.1, seed=4), 16000)
    sf.write(music / "silent.wav", np.zeros(8000), 16000)
    (music / "broken.wav").write_bytes(b"RIFF0000WAVEjunk")
    (music / "notes.txt").write_text("not audio")
    return root, net


def _reference(net, path, levels):
    """The API on the file's own samples (channel mean) at its own rate: the CLI must agree,
    resampling included."""
    data, rate = sf.read(path, dtype="float64", always_2d=True)
    return float(net.predict([data.mean(axis=1)], rate, np.asarray(levels)[None],
                             progress=False)[0])


def _rows(path):
    with open(path, newline="") as f:
        return {r["file"]: r for r in csv.DictReader(f)}


def test_predict_folder_with_bad_files(setup, capsys):
    root, net = setup
    out = root / "results.csv"
    rc = cli.main(["predict", "--checkpoint", str(root / "ckpt"), "--audiogram",
                   ",".join(map(str, LEVELS)), str(root / "music"), "--out", str(out),
                   "--batch-size", "2"])
    assert rc == 1  # some files failed, the rest were scored
    rows = _rows(out)
    music = root / "music"
    assert set(rows) == {str(music / n) for n in ("a.wav", "sub/b.flac", "sub/c.wav",
                                                   "short.wav", "silent.wav", "broken.wav")}
    for name in ("a.wav", "sub/b.flac", "sub/c.wav"):
        row = rows[str(music / name)]
        assert row["error"] == ""
        assert float(row["haaqi"]) == pytest.approx(_reference(net, music / name, LEVELS),
                                                    abs=1e-5)
    for name, why in (("short.wav", "too short"), ("silent.wav", "silent"),
                      ("broken.wav", "not readable")):
        row = rows[str(music / name)]
        assert row["haaqi"] == "" and why in row["error"]
    err = capsys.readouterr().err
    assert "broken.wav" in err and "scored 3 of 6" in err and "HAAQI-Net" in err  # tqdm bar


def test_dtype_bfloat16_scores_as_the_api_does_in_bfloat16(setup, tmp_path):
    root, net = setup
    files = [root / "music" / "a.wav", root / "music" / "sub" / "b.flac"]
    scored = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"{dtype}.csv"
        assert cli.main(["predict", "--checkpoint", str(root / "ckpt"), "--audiogram",
                         ",".join(map(str, LEVELS)), *map(str, files), "--out", str(out),
                         "--dtype", dtype, "--no-progress"]) == 0
        scored[dtype] = _rows(out)
    half = HAAQINet.load(root / "ckpt", dtype="bfloat16")
    for path in files:
        row = scored["bfloat16"][str(path)]
        assert float(row["haaqi"]) == pytest.approx(_reference(half, path, LEVELS), abs=1e-5)
        assert float(scored["float32"][str(path)]["haaqi"]) == pytest.approx(
            _reference(net, path, LEVELS), abs=1e-5)
    # bfloat16 really ran: its scores are near float32's, not equal to them.
    gaps = [abs(float(scored["bfloat16"][k]["haaqi"]) - float(scored["float32"][k]["haaqi"]))
            for k in map(str, files)]
    assert 0 < max(gaps) < 3e-2


def test_audiogram_table_and_manifest(setup):
    root, net = setup
    music = root / "music"
    other = [30, 35, 40, 50, 60, 65, 70, 75]
    table = root / "listeners.csv"
    table.write_text("file,250,500,1000,2000,3000,4000,6000,8000\n"
                     f"a.wav,{','.join(map(str, other))}\n"
                     "c.wav,10,10,abc,10,10,10,10,10\n")       # fails c.wav alone
    manifest = root / "m.jsonl"
    manifest.write_text(
        # A label outside [0, 1] does not matter to a prediction (it refused the row).
        json.dumps({"file_path": "music/sub/b.flac", "audiogram": other, "haaqi_score": 1.7})
        + "\n"
        + json.dumps({"file_path": "music/sub/c.wav", "audiogram": [1, 2, 3]}) + "\n")
    out = root / "r2.csv"
    lonely = root / "lonely.wav"                              # in no table, no default
    lonely.write_bytes((music / "a.wav").read_bytes())
    rc = cli.main(["predict", "--checkpoint", str(root / "ckpt"), "--audiograms", str(table),
                   str(music / "a.wav"), str(music / "sub" / "c.wav"), str(manifest),
                   str(lonely), "--out", str(out), "--no-progress"])
    assert rc == 1
    rows = _rows(out)
    assert float(rows[str(music / "a.wav")]["haaqi"]) == pytest.approx(
        _reference(net, music / "a.wav", other), abs=1e-5)
    assert float(rows[str(music / "sub" / "b.flac")]["haaqi"]) == pytest.approx(
        _reference(net, music / "sub" / "b.flac", other), abs=1e-5)
    assert "no audiogram" in rows[str(lonely)]["error"]
    assert "bad --audiograms entry" in rows[str(music / "sub" / "c.wav")]["error"]
    assert "row 3 (c.wav): levels" in rows[str(music / "sub" / "c.wav")]["error"]
    assert "audiogram" in rows[f"{manifest.absolute()}:2"]["error"]

    # JSON table, keyed by base name, and a default for the rest: everything scores.
    table_json = root / "listeners.json"
    table_json.write_text(json.dumps({"c.wav": other}))
    rc = cli.main(["predict", "--checkpoint", str(root / "ckpt"), "--audiograms",
                   str(table_json), "--audiogram", ",".join(map(str, LEVELS)),
                   str(music / "a.wav"), str(music / "sub" / "c.wav"),
                   "--out", str(root / "r3.csv"), "--no-progress"])
    assert rc == 0
    rows = _rows(root / "r3.csv")
    assert float(rows[str(music / "sub" / "c.wav")]["haaqi"]) == pytest.approx(
        _reference(net, music / "sub" / "c.wav", other), abs=1e-5)


def test_manifest_rows_of_one_channel(setup):
    # rows from `haaqi-jax label --manifest-out`: one ear of a stereo file each
    root, net = setup
    stereo = root / "music" / "sub" / "c.wav"
    manifest = root / "ears.jsonl"
    manifest.write_text("".join(
        json.dumps({"id": f"c/{ear}", "file_path": str(stereo), "audiogram": LEVELS,
                    "channel": ear}) + "\n" for ear in ("left", "right")))
    out = root / "ears.csv"
    assert cli.main(["predict", "--checkpoint", str(root / "ckpt"), str(manifest),
                     "--out", str(out), "--no-progress"]) == 0
    rows = _rows(out)
    data, rate = sf.read(stereo, dtype="float64", always_2d=True)
    for column, ear in enumerate(("left", "right")):
        expected = float(net.predict([data[:, column]], rate, np.asarray(LEVELS)[None],
                                     progress=False)[0])
        row = rows[f"{stereo} ({ear} channel)"]
        assert float(row["haaqi"]) == pytest.approx(expected, abs=1e-5)
        assert row["id"] == f"c/{ear}"               # joins back to the manifest row
    # A row whose file is missing, and a row the manifest check refuses: each error names
    # the manifest line, and the id column joins it back to the row.
    manifest.write_text(manifest.read_text() + "".join(json.dumps(r) + "\n" for r in (
        {"id": "gone", "file_path": str(root / "nope.wav"), "audiogram": LEVELS},
        {"id": "deaf", "file_path": str(stereo), "audiogram": [200] * 8})))
    assert cli.main(["predict", "--checkpoint", str(root / "ckpt"), str(manifest),
                     "--out", str(out), "--no-progress"]) == 1
    by_id = {row["id"]: row for row in _rows(out).values()}
    assert by_id["gone"]["error"].startswith(f"{manifest}:3 (id 'gone'): ")
    assert "nope.wav does not exist" in by_id["gone"]["error"]
    assert f"{manifest}:4 (id 'deaf')" in by_id["deaf"]["error"]
    assert "200" in by_id["deaf"]["error"] and not by_id["deaf"]["haaqi"]


@pytest.mark.parametrize("args, message", [
    (["--audiogram", "10,20,30"], "--audiogram: expected 8 levels"),
    (["--audiogram", "10,20,x,1,1,1,1,1"], "item 3 ('x') is not a number"),
    (["--audiogram", "10,,20,30,40,50,60,70"], "item 2 is empty"),   # not "7 levels"
    (["--audiogram", "10,20,30,40,50,60,70,500"], "dB HL at 8000 Hz"),
    (["--audiograms", "TABLE_BAD_HEADER"], "header must be"),
    (["--audiograms", "MISSING.csv"], "does not exist"),
    (["--audiograms", "NOT_UTF8.csv"], "not_utf8.csv: not UTF-8 text"),   # named no file
    (["--audiograms", "NOT_UTF8.json"], "not_utf8.json: not UTF-8 text"),
    (["--audiograms", "A_FOLDER"], "is a folder"),                       # "does not exist"
    (["--checkpoint", "NOT_A_CHECKPOINT"], "config.json is missing"),
    (["--out", "UNDER_A_FILE"], "--out"),                   # found before scoring, not after
    (["--out", "A_FOLDER"], "is a folder"),
    ([], "no audiogram for any file: pass --audiogram"),  # not a CSV of one error per file
    (["--dtype", "float16"], "--dtype must be one of 'float32', 'bfloat16', got 'float16'"),
])
def test_usage_errors_exit_2(setup, capsys, args, message):
    root, _ = setup
    (root / "bad_row.csv").write_text("file,250,500,1000,2000,3000,4000,6000,8000\n"
                                      "a.wav,1,2,3,4,5,6,7,8\n"
                                      "b.wav,1,2,3,4,5,6,7\n")
    (root / "bad_header.csv").write_text("name,250,500\n")
    (root / "not_utf8.csv").write_bytes(b"file,250,500,1000,2000,3000,4000,6000,8000\n"
                                        b"a\xff.wav,1,2,3,4,5,6,7,8\n")
    (root / "not_utf8.json").write_bytes(b'{"a\xff.wav": [1, 2, 3, 4, 5, 6, 7, 8]}')
    subst = {"TABLE_BAD_ROW": str(root / "bad_row.csv"),
             "TABLE_BAD_HEADER": str(root / "bad_header.csv"),
             "MISSING.csv": str(root / "missing.csv"), "NOT_A_CHECKPOINT": str(root / "music"),
             "NOT_UTF8.csv": str(root / "not_utf8.csv"),
             "NOT_UTF8.json": str(root / "not_utf8.json"),
             "UNDER_A_FILE": str(root / "bad_row.csv" / "x.csv"), "A_FOLDER": str(root)}
    args = [subst.get(a, a) for a in args]
    base = ["predict", str(root / "music" / "a.wav")]
    if "--out" not in args:
        base += ["--out", str(root / "x.csv")]
    if "--checkpoint" not in args:
        base += ["--checkpoint", str(root / "ckpt")]
    assert cli.main(base + args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (root / "x.csv").exists()


_FOUR_DEVICE_SCRIPT = """
import json, sys
import jax, numpy as np, soundfile as sf
from haaqi_jax.model import HAAQINet
from haaqi_jax.train.loop import make_encode_fn
assert jax.local_device_count() == 4
ckpt, levels, out = sys.argv[1], np.asarray(json.loads(sys.argv[2])), sys.argv[3]
net = HAAQINet.load(ckpt)
forward, spread = net._forward, []
def spy(params, wav, *rest):
    spread.append(len(wav.sharding.device_set))
    return forward(params, wav, *rest)
object.__setattr__(net, "_forward", spy)
clips = [sf.read(path, dtype="float64", always_2d=True) for path in sys.argv[4:]]
scores = net.predict([data.mean(axis=1) for data, _ in clips], [rate for _, rate in clips],
                     levels[None].repeat(len(clips), 0), batch_size=2, progress=False)
wave = np.random.default_rng(5).normal(scale=0.1, size=(3, 8000)).astype(np.float32)
pad = np.arange(8000)[None, :] >= np.array([8000, 5000, 3000])[:, None]
features, token_pad = make_encode_fn(net)(wave, pad)   # 3 rows over 4 devices: one filled
np.savez(out, scores=scores, spread=spread, features=features, token_pad=token_pad,
         wave=wave, pad=pad)
"""


def test_predict_and_encode_split_over_local_devices(setup, tmp_path):
    """Under 4 simulated CPU devices every forward pass is split over all four (a batch of 2
    rows grows to 4) and each clip scores as on one device, across three sample rates; the
    feature cache's encoder gives the same features for 3 rows as one device does."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from haaqi_jax.train.loop import make_encode_fn

    root, net = setup
    paths = [root / "music" / "a.wav", root / "music" / "sub" / "b.flac",
             root / "music" / "sub" / "c.wav"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                           os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "four.npz"
    done = subprocess.run([sys.executable, "-c", _FOUR_DEVICE_SCRIPT, str(root / "ckpt"),
                           json.dumps(LEVELS), str(out)] + [str(p) for p in paths],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    four = np.load(out)
    assert four["spread"].size and set(four["spread"].tolist()) == {4}
    alone = [_reference(net, p, LEVELS) for p in paths]
    np.testing.assert_allclose(four["scores"], alone, atol=1e-5)
    features, token_pad = make_encode_fn(net)(four["wave"], four["pad"])
    assert four["features"].shape == features.shape and features.shape[0] == 3
    np.testing.assert_allclose(four["features"], features, atol=1e-5)
    np.testing.assert_array_equal(four["token_pad"], token_pad)


def test_a_model_giving_nan_fails_its_files_instead_of_writing_nan(setup, tmp_path, capsys):
    """NaN weights (a corrupt or badly converted model) used to give haaqi=nan with exit 0."""
    import jax
    root, net = setup
    params = jax.tree_util.tree_map(np.asarray, net.params)
    params["head"]["dense"]["bias"] = np.full_like(params["head"]["dense"]["bias"], np.nan)
    HAAQINet(net.config, params).save(tmp_path / "nan_model")
    out = tmp_path / "r.csv"
    rc = cli.main(["predict", "--checkpoint", str(tmp_path / "nan_model"), "--audiogram",
                   ",".join(map(str, LEVELS)), str(root / "music" / "a.wav"), "--out",
                   str(out)])
    assert rc == 1
    (row,) = _rows(out).values()
    assert row["haaqi"] == "" and "non-finite score" in row["error"]
    assert "non-finite score" in capsys.readouterr().err


def test_audiogram_keys_relative_to_the_table_or_folder_and_unmatched_entries(setup, capsys,
                                                                               monkeypatch):
    """A key names a file relative to the table's folder or the folder argument too; a key
    that matches nothing is listed (its files would silently get the default), a key listed
    twice fails its files, and the CSV says where each audiogram came from."""
    root, net = setup
    music = root / "music"
    other = [30, 35, 40, 50, 60, 65, 70, 75]
    louder = [60, 60, 65, 70, 75, 80, 85, 90]
    tables = root / "tables"
    tables.mkdir(exist_ok=True)
    table = tables / "listeners.csv"
    with open(table, "w", newline="", encoding="utf-8-sig") as f:    # Excel's CSV UTF-8
        f.write("file,250,500,1000,2000,3000,4000,6000,8000\n"
                f"../music/a.wav,{','.join(map(str, other))}\n"       # relative to the table
                f"sub/b.flac,{','.join(map(str, louder))}\n"          # relative to music/
                f"sub/c.wav,{','.join(map(str, other))}\n"
                f"sub/c.wav,{','.join(map(str, louder))}\n"           # twice: which one?
                f"elsewhere/y.wav,{','.join(map(str, other))}\n")     # matches nothing
    (root / "cwd").mkdir(exist_ok=True)
    monkeypatch.chdir(root / "cwd")          # neither the table's folder nor music/
    out = root / "keys.csv"
    rc = cli.main(["predict", "--checkpoint", str(root / "ckpt"), "--audiograms", str(table),
                   "--audiogram", ",".join(map(str, LEVELS)), str(music), "--out", str(out),
                   "--no-progress"])
    assert rc == 1            # c.wav, and the folder's bad files
    err = capsys.readouterr().err
    assert "warning: 1 --audiograms entry matched no input file: 'elsewhere/y.wav'" in err
    rows = _rows(out)
    a, b, c = str(music / "a.wav"), str(music / "sub" / "b.flac"), str(music / "sub" / "c.wav")
    assert float(rows[a]["haaqi"]) == pytest.approx(_reference(net, music / "a.wav", other),
                                                     abs=1e-5)
    assert rows[a]["audiogram"] == "--audiograms ../music/a.wav"
    assert float(rows[b]["haaqi"]) == pytest.approx(
        _reference(net, music / "sub" / "b.flac", louder), abs=1e-5)
    assert rows[b]["audiogram"] == "--audiograms sub/b.flac"
    assert "'sub/c.wav' is listed twice (rows 4 and 5)" in rows[c]["error"]


def test_a_bad_manifest_does_not_stop_the_other_inputs(setup, capsys):
    root, net = setup
    music = root / "music"
    empty_rows = root / "noag.jsonl"
    empty_rows.write_text(json.dumps({"file_path": "music/a.wav"}) + "\n")
    as_csv = root / "pairs.csv"
    as_csv.write_text("file_path,audiogram\nmusic/a.wav,1\n")
    authors = root / "authors.json"             # the authors' {"data": [...]} manifest
    authors.write_text(json.dumps({"data": [{"file_path": "music/sub/b.flac",
                                             "audiogram": LEVELS}]}))
    loud = root / "loud.wav"                  # above [-1, 1]: scored with a warning
    sf.write(loud, 8 * _tone(16000, 0.5, seed=1), 16000, subtype="FLOAT")
    unscaled = root / "unscaled.wav"          # 16-bit values in a float file: refused
    sf.write(unscaled, 30000 * _tone(16000, 0.5, seed=1), 16000, subtype="FLOAT")
    out = root / "mixed.csv"
    rc = cli.main(["predict", "--checkpoint", str(root / "ckpt"), "--audiogram",
                   ",".join(map(str, LEVELS)), str(empty_rows), str(as_csv), str(authors),
                   str(loud), str(unscaled), str(music / "a.wav"), "--out", str(out),
                   "--no-progress"])
    assert rc == 1
    rows = _rows(out)
    assert "no usable rows (1 skipped; the first: " in rows[str(empty_rows)]["error"]
    assert "'audiogram'" in rows[str(empty_rows)]["error"]
    assert "a CSV file" in rows[str(as_csv)]["error"]
    assert float(rows[str(music / "a.wav")]["haaqi"]) == pytest.approx(
        _reference(net, music / "a.wav", LEVELS), abs=1e-5)
    assert rows[str(music / "a.wav")]["audiogram"] == "--audiogram"
    from_authors = [r for r in rows.values() if r["audiogram"] == "manifest"]
    assert len(from_authors) == 1 and from_authors[0]["haaqi"]
    assert rows[str(loud)]["haaqi"]      # scored, with a warning
    assert f"warning: {loud}: peak 2.88; audio is expected in [-1, 1]" in \
        capsys.readouterr().err
    assert not rows[str(unscaled)]["haaqi"]
    assert "peak 1.08e+04 is far outside [-1, 1]: 16-bit integer values left unscaled? " \
        "(divide by 32768)" in rows[str(unscaled)]["error"]


def test_an_interrupted_predict_writes_what_it_scored(setup, monkeypatch):
    from haaqi_jax import predict

    root, net = setup
    music = root / "music"
    real_load = predict.load_job
    calls = []

    def load_then_interrupt(job):
        calls.append(job)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_load(job)

    monkeypatch.setattr(predict, "load_job", load_then_interrupt)
    out = root / "interrupted.csv"
    # Batch size 1: chunks of two files, so the first chunk is scored before the interrupt
    # (chunks of 64 files or more lost every score of a smaller run).
    rc = cli.main(["predict", "--checkpoint", str(root / "ckpt"), "--audiogram",
                   ",".join(map(str, LEVELS)), str(music / "a.wav"), str(music / "sub"),
                   "--out", str(out), "--no-progress", "--batch-size", "1"])
    assert rc == 130
    rows = list(_rows(out).values())
    assert sorted(bool(r["haaqi"]) for r in rows) == [False, True, True]
    assert [r["error"] for r in rows if not r["haaqi"]] == ["not scored: interrupted"]


def _count_scored(monkeypatch, interrupt_after=None):
    """Counts the clips HAAQINet.predict is asked to score; raises KeyboardInterrupt once
    `interrupt_after` calls have run (a Ctrl-C between two chunks)."""
    scored = []
    real = HAAQINet.predict

    def counting(self, clips, *args, **kwargs):
        if interrupt_after is not None and len(scored) >= interrupt_after:
            raise KeyboardInterrupt
        scored.append(len(clips))
        return real(self, clips, *args, **kwargs)
    monkeypatch.setattr(HAAQINet, "predict", counting)
    return scored


def test_a_rerun_after_an_interruption_scores_only_the_rest(setup, tmp_path, monkeypatch,
                                                             capsys):
    from haaqi_jax import predict

    root, net = setup
    music = tmp_path / "music"
    music.mkdir()
    for i in range(6):
        sf.write(music / f"{i}.wav", _tone(16000, 0.5 + 0.05 * i, seed=20 + i), 16000)
    args = ["predict", "--checkpoint", str(root / "ckpt"), "--audiogram",
            ",".join(map(str, LEVELS)), str(music), "--no-progress", "--batch-size", "1"]
    whole = tmp_path / "whole.csv"
    assert cli.main(args + ["--out", str(whole)]) == 0
    assert not predict.journal_path(whole).exists()          # deleted with the CSV written
    out = tmp_path / "out.csv"
    # Chunks of two files (batch size 1): interrupted once two chunks are scored.
    scored = _count_scored(monkeypatch, interrupt_after=2)
    assert cli.main(args + ["--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "run the same command again to resume" in err and str(predict.journal_path(out)) in err
    assert sum(scored) == 4 and len(predict.journal_path(out).read_text().splitlines()) == 5
    monkeypatch.undo()
    # A kill mid-line leaves half a line: dropped, that file scored again.
    with open(predict.journal_path(out), "a") as f:
        f.write('{"key": "/x|1')
    scored = _count_scored(monkeypatch)
    assert cli.main(args + ["--out", str(out)]) == 0
    assert "4 of 6 files scored by an earlier run" in capsys.readouterr().err
    assert sum(scored) == 2                                   # only the two not scored yet
    assert _rows(out) == _rows(whole)                         # the same scores, durations
    assert not predict.journal_path(out).exists()


def test_a_journal_is_not_used_for_another_model_audiogram_or_changed_file(setup, tmp_path,
                                                                           monkeypatch, capsys):
    from haaqi_jax import predict

    root, net = setup
    music = tmp_path / "music"
    music.mkdir()
    for i in range(3):
        sf.write(music / f"{i}.wav", _tone(16000, 0.5, seed=40 + i), 16000)
    out = tmp_path / "out.csv"

    def run(levels=LEVELS, checkpoint=root / "ckpt"):
        return cli.main(["predict", "--checkpoint", str(checkpoint), "--audiogram",
                         ",".join(map(str, levels)), str(music), "--no-progress", "--out",
                         str(out)])
    _count_scored(monkeypatch, interrupt_after=0)
    assert run() == 130                                   # a journal with its model line only
    monkeypatch.undo()
    journal = predict.journal_path(out)
    model_line = journal.read_text()
    # A journal holding every file: whatever differs from it is scored again.
    jobs = predict.collect_jobs([str(music)])
    for job in jobs:
        job.audiogram, job.score, job.duration_s = np.asarray(LEVELS, float), 0.123, 0.5
    predict.ScoreJournal(journal, json.loads(model_line)["model"]).record(jobs)
    sf.write(music / "2.wav", _tone(16000, 0.5, seed=99), 16000)          # changed since
    scored = _count_scored(monkeypatch)
    assert run() == 0 and sum(scored) == 1
    rows = _rows(out)
    assert [rows[str(music / f"{i}.wav")]["haaqi"] for i in range(2)] == ["0.123000"] * 2
    assert float(rows[str(music / "2.wav")]["haaqi"]) == pytest.approx(
        _reference(net, music / "2.wav", LEVELS), abs=1e-5)
    # A damaged journal (not UTF-8, an entry without its score) is started afresh, named.
    for damage in (b"\xff\xfe\n", b'{"key": "x", "duration_s": 1}\n'):
        journal.write_bytes(model_line.encode() + damage)
        scored.clear()
        assert run() == 0 and sum(scored) == 3
        assert "or is damaged" in capsys.readouterr().err
    # Another audiogram, or another model (weights), scores everything afresh.
    for other in ({"levels": [20] * 8}, {"checkpoint": tmp_path / "other"}):
        if "checkpoint" in other:
            HAAQINet.init_random(HAAQINetConfig(encoder_config=TINY_CFG), seed=12).save(
                tmp_path / "other")
        journal.write_text(model_line)
        predict.ScoreJournal(journal, json.loads(model_line)["model"]).record(jobs)
        scored.clear()
        assert run(**other) == 0 and sum(scored) == 3, other
        assert ("another model's scores" in capsys.readouterr().err) == ("checkpoint" in other)


def test_a_json_table_with_a_key_twice_fails_that_key(tmp_path):
    from haaqi_jax import predict

    table = tmp_path / "listeners.json"
    table.write_text('{"a.wav": [0, 0, 0, 0, 0, 0, 0, 0], "b.wav": [10, 10, 10, 10, 10, 10, 10, '
                     '10], "a.wav": [60, 60, 60, 60, 60, 60, 60, 60]}')
    read = predict.read_audiogram_table(table)
    assert read["a.wav"] == f"{table}: key 'a.wav': listed twice"
    np.testing.assert_array_equal(read["b.wav"], [10] * 8)


def test_a_clip_too_long_for_memory_fails_by_name_and_the_others_are_scored(setup, tmp_path,
                                                                           monkeypatch, capsys):
    """A whole song can need more memory than the host has (before attention walked long clips
    in blocks, a 10 min clip asked XLA for 67 GB): that file fails with its length named,
    and the files scored with it keep their scores (before, the run stopped with exit 2 and
    wrote no CSV at all)."""
    root, net = setup
    music = root / "music"
    real_predict = HAAQINet.predict

    def predict_within_memory(self, waveforms, *args, **kwargs):
        if max(len(w) for w in waveforms) > 0.55 * 16000:      # b.flac: 0.6 s
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 67029111920 "
                               "bytes.\nmore lines")
        return real_predict(self, waveforms, *args, **kwargs)

    monkeypatch.setattr(HAAQINet, "predict", predict_within_memory)
    out = tmp_path / "long.csv"
    rc = cli.main(["predict", "--checkpoint", str(root / "ckpt"), "--audiogram",
                   ",".join(map(str, LEVELS)), str(music / "a.wav"), str(music / "sub"),
                   "--out", str(out), "--no-progress"])
    assert rc == 1
    rows = _rows(out)
    assert rows[str(music / "a.wav")]["haaqi"] and rows[str(music / "sub" / "c.wav")]["haaqi"]
    long_row = rows[str(music / "sub" / "b.flac")]
    assert long_row["haaqi"] == ""
    assert "out of memory" in long_row["error"] and "0.6 s" in long_row["error"]
    assert "shorter parts" in long_row["error"]
    err = capsys.readouterr().err
    assert "b.flac" in err and "out of memory" in err


def test_a_json_table_entry_that_is_not_8_plain_numbers_fails_only_its_file(setup, tmp_path,
                                                                           capsys):
    """An entry nested one list deeper ([[8 levels]]) used to pass the check and then end the
    whole run (exit 2) with numpy's "all input arrays must have the same shape"; true / false
    were read as 1 / 0 dB HL. Each now fails its own file, the others are scored."""
    from haaqi_jax import predict

    root, net = setup
    music = root / "music"
    table = tmp_path / "listeners.json"
    table.write_text(json.dumps({"a.wav": LEVELS, "b.flac": [LEVELS],
                                 "c.wav": [True] + LEVELS[1:]}))
    read = predict.read_audiogram_table(table)
    np.testing.assert_array_equal(read["a.wav"], LEVELS)
    assert read["b.flac"] == f"{table}: key 'b.flac': expected a list of 8 numbers"
    assert read["c.wav"] == f"{table}: key 'c.wav': expected a list of 8 numbers"
    out = tmp_path / "r.csv"
    rc = cli.main(["predict", "--checkpoint", str(root / "ckpt"), "--audiograms", str(table),
                   str(music / "a.wav"), str(music / "sub" / "b.flac"),
                   str(music / "sub" / "c.wav"), "--out", str(out), "--no-progress"])
    assert rc == 1
    rows = _rows(out)
    assert float(rows[str(music / "a.wav")]["haaqi"]) == pytest.approx(
        _reference(net, music / "a.wav", LEVELS), abs=1e-5)
    for name in ("sub/b.flac", "sub/c.wav"):
        assert rows[str(music / name)]["haaqi"] == ""
        assert "expected a list of 8 numbers" in rows[str(music / name)]["error"]
