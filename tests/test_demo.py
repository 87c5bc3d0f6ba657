"""The demo dataset: listeners, determinism, caching, resuming, the CLI and real HAAQI labels."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.signal

from haaqi_jax.audiogram import STANDARD_FREQUENCIES
from haaqi_jax.data import degrade as D
from haaqi_jax.data import demo
from haaqi_jax.data import listeners as L
from haaqi_jax.data import synth
from haaqi_jax.data.manifest import read_manifest
from haaqi_jax.haaqi.backend import combined_from_parts

SR = synth.SAMPLE_RATE
FREQ = np.asarray(STANDARD_FREQUENCIES)


# ------------------------------------------------------------------------------- listeners

def _mean(levels, freqs):
    return levels[:, np.isin(FREQ, freqs)].mean(axis=1)


def _pta(levels):  # pure-tone average 500, 1k, 2k, 4k Hz
    return _mean(levels, [500, 1000, 2000, 4000])


SHAPE_CHECKS = {
    "normal": lambda a: a.max(axis=1) <= 25,
    "mild_sloping": lambda a: (_mean(a, [4000, 6000, 8000]) - _mean(a, [250, 500]) >= 20)
    & (_pta(a) >= 15) & (_pta(a) <= 45),
    "moderate_sloping": lambda a: (_mean(a, [4000, 6000, 8000]) - _mean(a, [250, 500]) >= 20)
    & (_pta(a) >= 40) & (_pta(a) <= 70),
    "severe_sloping": lambda a: (_mean(a, [4000, 6000, 8000]) - _mean(a, [250, 500]) >= 20)
    & (_pta(a) >= 65),
    "flat": lambda a: (a.max(axis=1) - a.min(axis=1) <= 20) & (_pta(a) >= 20),
    "noise_notch": lambda a: (a[:, FREQ == 4000][:, 0] - np.maximum(a[:, FREQ == 2000][:, 0],
                                                                    a[:, FREQ == 8000][:, 0])
                              >= 10),
    "reverse_slope": lambda a: _mean(a, [250, 500]) - _mean(a, [4000, 6000, 8000]) >= 15,
    "cookie_bite": lambda a: _mean(a, [1000, 2000, 3000]) - np.maximum(
        _mean(a, [250]), _mean(a, [8000])) >= 15,
}


@pytest.mark.parametrize("shape", L.LISTENER_SHAPES)
def test_audiograms_are_in_range_and_of_their_shape(shape):
    rng = np.random.default_rng(0)
    levels = np.stack([L.draw_audiogram(rng, shape) for _ in range(300)])
    assert levels.shape == (300, 8) and levels.dtype == np.float32
    assert levels.min() >= -10 and levels.max() <= 120
    ok = SHAPE_CHECKS[shape](levels.astype(np.float64))
    assert ok.all(), f"{shape}: {np.count_nonzero(~ok)} of 300 draws off-shape"
    assert levels.std(axis=0).min() > 1.0  # jittered, not a constant template


def test_listener_draws_and_bad_shape():
    rng = np.random.default_rng(1)
    shapes = [L.draw_listener(rng)[0] for _ in range(400)]
    assert set(shapes) == set(L.LISTENER_SHAPES)
    assert 0.18 < shapes.count("normal") / 400 < 0.32
    with pytest.raises(ValueError, match="unknown listener shape"):
        L.draw_audiogram(rng, "bionic")


def test_nalr_gains_match_pyclarity():
    from clarity.enhancer.nalr import NALR
    from clarity.utils.audiogram import Audiogram as ClarityAudiogram
    rng = np.random.default_rng(2)
    for shape in ("normal", "mild_sloping", "severe_sloping", "reverse_slope"):
        levels = L.draw_audiogram(rng, shape)
        fir, _ = NALR(220, SR).build(ClarityAudiogram(levels.astype(np.float64), FREQ))
        check = [500.0, 1000.0, 2000.0, 4000.0, 6000.0]
        _, h = scipy.signal.freqz(fir, worN=check, fs=SR)
        ours = L.nalr_gains_db(levels)[1:]
        np.testing.assert_allclose(ours, 20 * np.log10(np.abs(h)), atol=1.5, err_msg=shape)
        # The zero-phase aid applies those gains to a tone.
        t = np.arange(SR) / SR
        tone = np.sin(2 * np.pi * 2000 * t)
        aided = L.fit_hearing_aid(tone, SR, levels)
        gain = 20 * np.log10(D.rms(aided[2400:-2400]) / D.rms(tone[2400:-2400]))
        assert abs(gain - ours[2]) < 0.2


# ---------------------------------------------------------------------------------- builds

def correlation_labeller(reference, processed, sample_rate, levels, lengths, *, seeds):
    """Stand-in label: squared correlation of the valid samples (cheap, in [0, 1])."""
    correlation_labeller.calls += len(seeds)
    out = []
    for r, p, n in zip(reference, processed, lengths):
        c = np.corrcoef(r[:n], p[:n])[0, 1]
        out.append(max(c, 0.0) ** 2)
    return np.asarray(out)


correlation_labeller.name = "test-correlation"
correlation_labeller.calls = 0

SMALL = dict(n_clips=6, clip_seconds=(0.5, 1.0), labeller=correlation_labeller, batch_size=4,
             progress=False)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = demo.build_demo_dataset(tmp_path / "a", seed=3, **SMALL)
    b = demo.build_demo_dataset(tmp_path / "b", seed=3, **SMALL)
    c = demo.build_demo_dataset(tmp_path / "c", seed=4, **SMALL)
    files_a, files_b, files_c = (_files(p.parent) for p in (a, b, c))
    assert files_a == files_b
    # 2 wavs + 1 json per clip, settings, labels, manifest, labels.png and the (empty) lock
    # file; the plot's bytes too are the same for the same seed
    assert len(files_a) == 3 * 6 + 5 and files_a[demo.LOCK_FILE] == b""
    assert files_a["labels.png"].startswith(b"\x89PNG")
    for name, data in files_a.items():
        if name.endswith(".wav"):
            assert files_c[name] != data, name


def test_threads_make_the_same_files_as_one(tmp_path, monkeypatch):
    """Clips synthesised side by side (and finished out of order) give the bytes a serial
    build gives, records in clip order."""
    monkeypatch.setattr(demo, "synthesis_workers", lambda: 1)
    serial = demo.build_demo_dataset(tmp_path / "serial", seed=5, **SMALL)
    monkeypatch.setattr(demo, "synthesis_workers", lambda: 4)
    threaded = demo.build_demo_dataset(tmp_path / "threads", seed=5, **SMALL)
    assert _files(serial.parent) == _files(threaded.parent)


def test_synthesis_workers_follow_the_cores_this_process_may_use(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 5, 7})
    assert demo.synthesis_workers() == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert demo.synthesis_workers() == 8


def test_manifest_fields_and_reader(tmp_path):
    path = demo.build_demo_dataset(tmp_path, seed=0, **SMALL)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 6
    for row in rows:
        for key in ("id", "file_path", "reference", "audiogram", "haaqi_score", "split",
                    "distortion", "distortion_params", "listener_shape"):
            assert key in row, key
        assert (tmp_path / row["file_path"]).exists() and (tmp_path / row["reference"]).exists()
        assert 0.0 <= row["haaqi_score"] <= 1.0
        assert row["split"] in dict(demo.DEFAULT_SPLITS)
        pool = D.UNSEEN_DISTORTIONS if row["split"] == "test_unseen" else D.SEEN_DISTORTIONS
        assert row["distortion"] in pool
        assert set(row["distortion_params"]) == set(D.split_distortion(row["distortion"]))
        assert row["listener_shape"] in L.LISTENER_SHAPES
    parsed = read_manifest(path, require_label=True, check_files=True)
    assert [r.id for r in parsed] == [r["id"] for r in rows]
    assert parsed[0].reference is not None and parsed[0].distortion == rows[0]["distortion"]
    ref = np.asarray(__import__("soundfile").read(parsed[0].reference)[0])
    assert np.max(np.abs(ref)) <= demo.PEAK_LIMIT + 1e-4


def parts_labeller(reference, processed, sample_rate, levels, lengths, *, seeds):
    """A labeller that also returns two parts (the square root of its score, and one part a
    hair above 1, as float32 rounding gives, that the manifest must clip)."""
    score = correlation_labeller(reference, processed, sample_rate, levels, lengths,
                                 seeds=seeds)
    return {"combined": score, "nonlinear": np.sqrt(score), "linear": 1.0 + 1e-4 * score}


parts_labeller.name = "test-parts"


def test_labeller_parts_reach_the_manifest(tmp_path):
    path = demo.build_demo_dataset(tmp_path, seed=0, **dict(SMALL, labeller=parts_labeller))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:
        parts = row["haaqi_components"]
        assert parts["nonlinear"] == pytest.approx(np.sqrt(row["haaqi_score"]))
        assert parts["linear"] == 1.0                                   # clipped
    parsed = read_manifest(path, require_label=True)
    assert parsed[0].haaqi_components == (rows[0]["haaqi_components"]["nonlinear"],
                                          rows[0]["haaqi_components"]["linear"])
    # labels.jsonl keeps the raw (unclipped) parts
    raw = [json.loads(line) for line in (tmp_path / "labels.jsonl").read_text().splitlines()]
    assert max(r["haaqi_components"]["linear"] for r in raw) > 1.0


def test_cached_rebuilt_and_resumed(tmp_path):
    correlation_labeller.calls = 0
    path = demo.build_demo_dataset(tmp_path, seed=1, **SMALL)
    first = _files(tmp_path)
    assert correlation_labeller.calls >= 6
    # Same settings: nothing is done.
    correlation_labeller.calls = 0
    assert demo.build_demo_dataset(tmp_path, seed=1, **SMALL) == path
    assert correlation_labeller.calls == 0 and _files(tmp_path) == first
    # Interrupted run: a clip and two labels lost, no manifest -> only those are redone.
    (tmp_path / "manifest.jsonl").unlink()
    (tmp_path / "clips" / "demo000002.json").unlink()
    (tmp_path / "audio" / "processed" / "demo000002.wav").unlink()
    labels = (tmp_path / "labels.jsonl").read_text().splitlines()
    (tmp_path / "labels.jsonl").write_text("\n".join(labels[:-2]) + "\n{\"id\": \"demo0")
    demo.build_demo_dataset(tmp_path, seed=1, **SMALL)
    assert 2 <= correlation_labeller.calls <= 4 + 4  # padded batches
    assert _files(tmp_path)["manifest.jsonl"] == first["manifest.jsonl"]
    assert _files(tmp_path)["audio/processed/demo000002.wav"] == \
        first["audio/processed/demo000002.wav"]
    # Other settings: rebuilt from scratch.
    demo.build_demo_dataset(tmp_path, seed=1, **{**SMALL, "n_clips": 4})
    rows = (tmp_path / "manifest.jsonl").read_text().splitlines()
    assert len(rows) == 4 and not (tmp_path / "clips" / "demo000005.json").exists()


def test_splits_and_bad_settings(tmp_path):
    names = demo.assign_splits(20, demo.DEFAULT_SPLITS, 0)
    assert [names.count(s) for s, _ in demo.DEFAULT_SPLITS] == [12, 2, 2, 4]
    assert names != demo.assign_splits(20, demo.DEFAULT_SPLITS, 1)
    with pytest.raises(ValueError, match="sum to 1"):
        demo.build_demo_dataset(tmp_path, splits=(("train", 0.5),), **SMALL)
    with pytest.raises(ValueError, match="clip_seconds"):
        demo.build_demo_dataset(tmp_path, **{**SMALL, "clip_seconds": (2.0, 1.0)})
    with pytest.raises(ValueError, match="clip_seconds"):                # too short to degrade
        demo.build_demo_dataset(tmp_path, **{**SMALL, "clip_seconds": (0.01, 0.01)})
    with pytest.raises(ValueError, match="n_clips must be a whole number"):
        demo.build_demo_dataset(tmp_path, **{**SMALL, "n_clips": 2.7})
    with pytest.raises(ValueError, match="sum to 1"):
        demo.assign_splits(10, (("train", 1.5), ("valid", -0.5)), 0)
    with pytest.raises(ValueError, match="sum to 1"):
        demo.build_demo_dataset(tmp_path, **{**SMALL, "splits": (("a", np.nan), ("b", 1.0))})
    for seconds in ((1.0, np.inf), (1.0, np.nan), (1e9, 1e9)):   # inf: OverflowError; 1e9 hung
        with pytest.raises(ValueError, match="clip_seconds"):
            demo.build_demo_dataset(tmp_path, **{**SMALL, "clip_seconds": seconds})
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="a_file is a file; give a folder"):
        demo.build_demo_dataset(tmp_path / "a_file", **SMALL)


def test_only_its_own_files_are_ever_deleted(tmp_path, capsys):
    from haaqi_jax.cli import main
    # A folder with other files and no dataset is refused, untouched.
    theirs = tmp_path / "theirs"
    (theirs / "audio" / "processed").mkdir(parents=True)
    (theirs / "audio" / "processed" / "mywork.wav").write_bytes(b"keep me")
    with pytest.raises(ValueError, match="not empty and holds no demo dataset"):
        demo.build_demo_dataset(theirs, **SMALL)
    assert (theirs / "audio" / "processed" / "mywork.wav").read_bytes() == b"keep me"
    # So is one whose settings.json is somebody else's (JSON or not), with what it names.
    # (Binary, or sharing only some of a demo's keys, it is not ours either.)
    for foreign in ('{"model": "mine"}', "not json", b"\xff\xfe\x00",
                    '{"n_clips": 6, "seed": 0, "model": "mine"}'):
        write = (theirs / "settings.json").write_bytes if isinstance(foreign, bytes) \
            else (theirs / "settings.json").write_text
        write(foreign)
        (theirs / "manifest.jsonl").write_text("their rows")
        with pytest.raises(ValueError, match="its settings.json is not a demo settings.json"):
            demo.build_demo_dataset(theirs, **SMALL)
        assert (theirs / "manifest.jsonl").read_text() == "their rows"
        read = (theirs / "settings.json").read_bytes if isinstance(foreign, bytes) \
            else (theirs / "settings.json").read_text
        assert read() == foreign
    # A bad option on a rerun fails before anything is deleted (it wiped the set before).
    ours = tmp_path / "ours"
    manifest = demo.build_demo_dataset(ours, seed=0, **SMALL)
    before = _files(ours)
    assert main(["demo-data", str(ours), "--n", "6", "--seed", "-1"]) == 2
    assert "seed must be a whole number >= 0" in capsys.readouterr().err
    assert _files(ours) == before
    assert main(["demo-data", str(ours), "--n", "6", "--seconds", "1", "inf"]) == 2
    assert "clip_seconds must be (min, max)" in capsys.readouterr().err
    assert _files(ours) == before
    # New settings replace the dataset's own files and nothing else.
    (ours / "audio" / "processed" / "mywork.wav").write_bytes(b"keep me")
    demo.build_demo_dataset(ours, seed=1, **SMALL)
    assert (ours / "audio" / "processed" / "mywork.wav").read_bytes() == b"keep me"
    assert manifest.exists() and _files(ours)[
        "audio/processed/demo000000.wav"] != before["audio/processed/demo000000.wav"]


def _constant_labeller(output):
    def labeller(reference, processed, sample_rate, levels, lengths, *, seeds):
        return {k: np.full(len(reference), v) for k, v in output.items()}
    labeller.name = f"test-constant-{sorted(output.items())}"
    return labeller


@pytest.mark.parametrize("output, message", [
    ({"combined": 1.3}, r"combined = 1.3 for clip demo\d+: not finite or outside"),
    ({"combined": np.nan}, r"combined = nan for clip demo\d+"),
    ({"score": 0.5}, "without 'combined'"),
])
def test_labeller_bugs_are_named(tmp_path, output, message):
    with pytest.raises(ValueError, match=message):
        demo.build_demo_dataset(tmp_path, **{**SMALL, "labeller": _constant_labeller(output)})


# ------------------------------------------------------------------------ with real HAAQI

def test_real_haaqi_labels_clean_above_severe(monkeypatch, capsys):
    """Clean clips for normal and mildly impaired listeners beat severely degraded ones. The
    labeller draws no bar of its own, even when its batch is scored in several chunks (the
    demo build has its own bar, and --no-progress must silence all of them)."""
    from haaqi_jax.haaqi import api
    monkeypatch.setattr(api, "CPU_CHUNK_BYTES", 2 * 2 * api.CPU_SCRATCH_BYTES_PER_SAMPLE[4] * SR)
    music, _ = synth.synthesize_piece(np.random.default_rng(5), 1.8)
    music = music.astype(np.float64)
    severe = D.degrade(music, SR, "babble+lowpass", np.random.default_rng(0),
                       params={"babble": {"snr_db": -5.0, "n_talkers": 4},
                               "lowpass": {"cutoff_hz": 400.0}}).processed
    listeners = [L.draw_audiogram(np.random.default_rng(0), "normal"),
                 L.draw_audiogram(np.random.default_rng(0), "mild_sloping")]
    refs, procs, levels = [], [], []
    for lv in listeners:
        aided_ref = L.fit_hearing_aid(music, SR, lv)
        for proc in (music, severe):
            aided = L.fit_hearing_aid(proc, SR, lv)
            aided *= D.rms(aided_ref) / D.rms(aided)
            gain = 0.5 / max(np.abs(aided).max(), np.abs(music).max())
            refs.append(music * gain)
            procs.append(aided * gain)
            levels.append(lv)
    width = 2 * SR
    ref = np.zeros((4, width), np.float32)
    proc = np.zeros((4, width), np.float32)
    for i in range(4):
        ref[i, :music.size], proc[i, :music.size] = refs[i], procs[i]
    labels = demo.haaqi_labeller(ref, proc, SR, np.stack(levels),
                                 np.full(4, music.size, np.int32), seeds=np.arange(4))
    assert "HAAQI" not in capsys.readouterr().err          # 2 chunks of 2 clips, no bar
    scores = labels["combined"]
    assert np.all((scores >= 0) & (scores <= 1)), scores
    # The two parts stored for the "haaqi_components" loss give the score by HAAQI's polynomial
    # (itself checked against pyclarity in test_haaqi_backend).
    np.testing.assert_allclose(combined_from_parts(labels["nonlinear"], labels["linear"]), scores,
                               atol=1e-6)
    assert labels["linear"][1] < labels["linear"][0] - 0.1   # low-pass: a spectral change
    assert scores[0] > 0.8 and scores[0] > scores[1] + 0.3, scores
    assert scores[2] > scores[3] + 0.2, scores


def test_labeller_equals_pyclarity_with_the_cadenza_level1():
    """Rows of two lengths and two digital levels, padded to one width: each label is
    pyclarity 0.9.0's haaqi_v1 on the row's own samples with level1 = 65 - 20 log10(rms of
    the reference) (the Cadenza rule), within the float32 batch mode's tolerance."""
    from clarity.evaluator.haaqi import haaqi_v1
    from clarity.utils.audiogram import Audiogram as ClarityAudiogram

    music, _ = synth.synthesize_piece(np.random.default_rng(8), 1.6)
    music = music.astype(np.float64)
    lengths = np.array([music.size, int(0.6 * music.size)])
    gains = (0.5, 0.05)                       # 20 dB apart: level1 must follow
    listener = L.draw_audiogram(np.random.default_rng(1), "moderate_sloping")
    width = music.size
    ref = np.zeros((2, width), np.float32)
    proc = np.zeros((2, width), np.float32)
    for i, (n, g) in enumerate(zip(lengths, gains)):
        ref[i, :n] = g * music[:n]
        proc[i, :n] = g * D.degrade(music[:n], SR, "lowpass", np.random.default_rng(i),
                                    params={"lowpass": {"cutoff_hz": 2000.0}}).processed
    labels = demo.haaqi_labeller(ref, proc, SR, np.stack([listener] * 2), lengths,
                                 seeds=np.arange(2))
    audiogram = ClarityAudiogram(levels=np.asarray(listener),
                                 frequencies=np.asarray(STANDARD_FREQUENCIES))
    for i, n in enumerate(lengths):
        r, p = ref[i, :n].astype(np.float64), proc[i, :n].astype(np.float64)
        level1 = 65.0 - 20.0 * np.log10(np.sqrt(np.mean(r ** 2)))
        np.random.seed(0)
        want = haaqi_v1(r, SR, p, SR, audiogram, 1, level1)[0]
        assert labels["combined"][i] == pytest.approx(want, abs=2e-3), (i, want)


def test_cli_writes_a_readable_manifest(tmp_path, capsys):
    from haaqi_jax.cli import main
    rc = main(["demo-data", str(tmp_path), "--n", "4", "--seed", "2", "--seconds", "1.5", "1.9",
               "--batch-size", "4", "--no-progress"])
    assert rc == 0
    captured = capsys.readouterr()
    assert "HAAQI of 4 clips" in captured.out and "manifest:" in captured.out
    assert f"labels plot: {tmp_path / 'labels.png'}" in captured.out
    assert (tmp_path / "labels.png").stat().st_size > 0
    assert "labelling (HAAQI)" not in captured.err and "%|" not in captured.err  # no bars
    rows = read_manifest(tmp_path / "manifest.jsonl", require_label=True, check_files=True)
    assert len(rows) == 4
    assert all(0.0 <= r.haaqi_score <= 1.0 for r in rows)


def test_a_torn_label_line_or_damaged_clip_record_is_made_again(tmp_path):
    """What a kill (a label line cut short) or an editor (a clip record damaged) leaves in a
    demo folder: the next build redoes that clip and its label, and the dataset comes out as
    it was, every line of labels.jsonl readable."""
    manifest = demo.build_demo_dataset(tmp_path, seed=1, **SMALL)
    before = manifest.read_text()
    labels = tmp_path / "labels.jsonl"
    labels.write_bytes(labels.read_bytes()[:-30])
    (tmp_path / "clips" / "demo000002.json").write_text('{"id": "demo0')
    leftover = tmp_path / "audio" / "processed" / ".demo000003.wav.1a2b3c4d.tmp"
    leftover.write_bytes(b"RIFF")                      # a killed write's temporary file
    manifest.unlink()
    assert demo.build_demo_dataset(tmp_path, seed=1, **SMALL).read_text() == before
    rows = [json.loads(line) for line in labels.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == [demo.clip_id(i) for i in range(6)]
    assert not leftover.exists()


def test_a_second_build_of_one_folder_waits_for_the_first(tmp_path, capsys):
    """Two processes building one demo folder (a seed sweep started from nothing) crashed on
    each other's temporary files; the second now waits for the first and reuses its work."""
    import threading

    from haaqi_jax.files import exclusive_lock

    done = []
    with exclusive_lock(tmp_path / demo.LOCK_FILE, "held by this test"):
        second = threading.Thread(
            target=lambda: done.append(demo.build_demo_dataset(tmp_path, seed=1, **SMALL)))
        second.start()
        second.join(timeout=1.0)
        assert second.is_alive() and not (tmp_path / "manifest.jsonl").exists()
    second.join(timeout=120)
    assert done and done[0].exists()
    assert "another process is building the demo dataset" in capsys.readouterr().err


def test_a_made_dataset_is_read_without_a_lock_and_a_run_lock_is_not_waited_on(
        tmp_path, monkeypatch):
    """A finished demo folder is used without writing its lock file (a read-only copy works);
    a folder holding a training run's own lock (demo_dir = workdir) is refused at once, not
    waited on forever."""
    import threading

    from haaqi_jax.files import exclusive_lock

    manifest = demo.build_demo_dataset(tmp_path / "made", seed=1, **SMALL)

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(demo, "exclusive_lock", read_only)
    assert demo.build_demo_dataset(tmp_path / "made", seed=1, **SMALL) == manifest
    monkeypatch.undo()
    errors = []

    def build_in_workdir():
        try:
            demo.build_demo_dataset(tmp_path / "run", seed=1, **SMALL)
        except ValueError as err:
            errors.append(str(err))

    with exclusive_lock(tmp_path / "run" / ".lock", "held by the run"):
        builder = threading.Thread(target=build_in_workdir)
        builder.start()
        builder.join(timeout=30)
        assert not builder.is_alive()
    assert errors and "is not empty and holds no demo dataset" in errors[0]


@pytest.mark.parametrize("option", ["--n", "--batch-size"])
def test_cli_counts_below_one_are_named_by_their_option(tmp_path, capsys, option):
    """`demo-data --n 0` was refused as "n_clips must be a whole number >= 1", a name the
    command line does not have; now argparse names the option, before anything is made."""
    from haaqi_jax.cli import main
    with pytest.raises(SystemExit) as exit_:
        main(["demo-data", str(tmp_path / "d"), option, "0", "--no-progress"])
    assert exit_.value.code == 2
    assert f"argument {option}: expected a number >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
