"""Manifests: both file forms, path resolution, every bad-row kind, skipping, splits."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import soundfile as sf

from haaqi_jax.data.manifest import (HELD_OUT_SPLIT, Manifest, ManifestRow,
                                     distortion_stages, hold_out_distortions, read_manifest,
                                     label_fields, split_rows, write_manifest)

AUDIOGRAM = [20, 20, 20, 30, 95, 85, 75, 30]


def _row(i, **overrides):
    row = {"file_path": f"audio/c{i}.wav", "audiogram": AUDIOGRAM, "haaqi_score": 0.1 * i}
    row.update(overrides)
    return row


def _write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture()
def audio_dir(tmp_path):
    (tmp_path / "audio").mkdir()
    for i in range(4):
        sf.write(tmp_path / "audio" / f"c{i}.wav", np.full(4000, 0.1), 16000)
    return tmp_path


def test_authors_json_document_and_relative_paths(tmp_path):
    # The authors' data/train.json layout: {"data": [...]}, paths relative to its folder.
    doc = {"data": [_row(0), _row(1, file_path="/abs/x.wav")]}
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "train.json"
    path.write_text(json.dumps(doc, indent=2))
    rows = read_manifest(path)
    assert isinstance(rows, Manifest) and isinstance(rows, list) and rows.skipped == ()
    assert [r.id for r in rows] == ["1", "2"] and [r.line for r in rows] == [1, 2]
    assert rows[0].file_path == tmp_path / "sub" / "audio" / "c0.wav"
    assert str(rows[1].file_path) == "/abs/x.wav"
    np.testing.assert_array_equal(rows[0].audiogram, np.asarray(AUDIOGRAM, np.float32))
    assert rows[0].audiogram.dtype == np.float32 and not rows[0].audiogram.flags.writeable
    assert rows[1].haaqi_score == pytest.approx(0.1)


def test_jsonl_optional_keys_comments_and_default_ids(tmp_path):
    path = _write_jsonl(tmp_path / "m.jsonl", [
        "# a comment", _row(0, id="a", reference="ref/r0.wav", split="test_seen",
                             distortion="clip 3 dB"), "", _row(1, haaqi_score=None), _row(2)])
    rows = read_manifest(path)
    assert [r.id for r in rows] == ["a", "4", "5"]  # default id = line number
    assert rows[0].reference == tmp_path / "ref" / "r0.wav"
    assert (rows[0].split, rows[0].distortion) == ("test_seen", "clip 3 dB")
    assert rows[1].haaqi_score is None and rows[1].reference is None


def test_a_rows_listener_shape_is_kept_and_written_back(tmp_path):
    """The demo's rows name their listener's audiogram shape; the report breaks down by it."""
    path = _write_jsonl(tmp_path / "m.jsonl", [_row(0, listener_shape="flat"), _row(1)])
    rows = read_manifest(path)
    assert [r.listener_shape for r in rows] == ["flat", None]
    back = read_manifest(write_manifest(tmp_path / "back.jsonl", rows))
    assert [r.listener_shape for r in back] == ["flat", None]
    assert "listener_shape" not in json.loads((tmp_path / "back.jsonl").read_text()
                                               .splitlines()[1])
    _write_jsonl(path, [_row(0, listener_shape=3)])
    with pytest.raises(ValueError, match=r"m.jsonl:1 \(id '1'\): key 'listener_shape' must be a "
                                         r"string, got 3"):
        read_manifest(path)


def test_write_then_read_round_trip(tmp_path):
    rows = [ManifestRow(id=f"r{i}", file_path=tmp_path / "audio" / f"c{i}.wav",
                        audiogram=np.asarray(AUDIOGRAM) + i, haaqi_score=0.25 * i,
                        split="train" if i else None, distortion=None if i else "noise")
            for i in range(3)]
    path = write_manifest(tmp_path / "out.jsonl", rows)
    first = json.loads(path.read_text().splitlines()[0])
    assert first["file_path"] == "audio/c0.wav"  # relative to the manifest's folder
    back = read_manifest(path)
    for a, b in zip(rows, back):
        assert (a.id, a.file_path, a.haaqi_score, a.split, a.distortion) == (
            b.id, b.file_path, b.haaqi_score, b.split, b.distortion)
        np.testing.assert_array_equal(a.audiogram, b.audiogram)
    # HAAQI's two parts survive the round trip; rows without them read None
    parts = ManifestRow(id="p", file_path=tmp_path / "p.wav", audiogram=np.asarray(AUDIOGRAM),
                        haaqi_score=0.5, haaqi_components={"nonlinear": 0.6, "linear": 0.7})
    assert parts.haaqi_components == (0.6, 0.7)
    back = read_manifest(write_manifest(tmp_path / "p.jsonl", [parts, rows[0]]))
    assert back[0].haaqi_components == (0.6, 0.7) and back[1].haaqi_components is None
    # one ear of a stereo file, and the group that keeps a clip's ears in one split
    ear = ManifestRow(id="e", file_path=tmp_path / "e.wav", audiogram=np.asarray(AUDIOGRAM),
                      channel="right", group=7)
    assert ear.group == "7"
    back = read_manifest(write_manifest(tmp_path / "e.jsonl", [ear, rows[0]]))
    assert (back[0].channel, back[0].group) == ("right", "7")
    assert (back[1].channel, back[1].group) == (None, None)
    with pytest.raises(ValueError, match="'channel'"):
        ManifestRow(id="e", file_path="/e.wav", audiogram=AUDIOGRAM, channel="both")
    # dicts are written as given
    write_manifest(tmp_path / "d.jsonl", [_row(0), _row(1)])
    assert [r.haaqi_score for r in read_manifest(tmp_path / "d.jsonl")] == [0.0, 0.1]


BAD_ROWS = [
    ('{"file_path": "a.wav", "audiogram": [1,2', "bad JSON"),
    (_row(0, file_path=None) | {}, "'file_path'"),
    ({"audiogram": AUDIOGRAM, "haaqi_score": 0.5}, "missing key 'file_path'"),
    ({"file_path": "a.wav", "haaqi_score": 0.5}, "missing key 'audiogram'"),
    (_row(0, audiogram=AUDIOGRAM[:7]), "'audiogram'"),
    (_row(0, audiogram=AUDIOGRAM[:7] + [140]), "'audiogram'"),
    (_row(0, audiogram=AUDIOGRAM[:7] + ["x"]), "'audiogram'"),
    (_row(0, haaqi_score=1.5), "'haaqi_score'"),
    (_row(0, haaqi_score=-0.1), "'haaqi_score'"),
    ('{"file_path": "a.wav", "audiogram": [0,0,0,0,0,0,0,0], "haaqi_score": NaN}',
     "'haaqi_score'"),
    (_row(0, haaqi_score="0.5"), "'haaqi_score'"),
    (_row(0, split=3), "'split'"),
    ("[1, 2, 3]", "JSON object"),
    (_row(0, haaqi_components={"nonlinear": 0.5}), "lacks 'linear'"),
    (_row(0, haaqi_components={"nonlinear": 0.5, "linear": 1.2}), "'haaqi_components.linear'"),
    (_row(0, haaqi_components=0.5), "'haaqi_components'"),
    (_row(0, channel="mid"), "'channel'"),
    (_row(0, channel=1), "'channel'"),
    (_row(0, group=[1]), "'group'"),
]


@pytest.mark.parametrize("bad,key", BAD_ROWS)
def test_bad_row_message_names_file_line_id_and_key(tmp_path, bad, key):
    if isinstance(bad, dict):
        bad = dict(bad, id="bad-one")
    path = _write_jsonl(tmp_path / "m.jsonl", [_row(0, id="ok"), "", bad, _row(2, id="ok2")])
    with pytest.raises(ValueError) as err:
        read_manifest(path)
    message = str(err.value)
    assert f"{path}:3" in message and key in message
    if isinstance(bad, dict):
        assert "'bad-one'" in message
    # on_error="skip" keeps the good rows and reports the bad one with its line
    rows = read_manifest(path, on_error="skip")
    assert [r.id for r in rows] == ["ok", "ok2"]
    assert [line for line, _ in rows.skipped] == [3]
    assert key in rows.skipped[0][1]


def test_missing_label_only_refused_when_required(tmp_path):
    path = _write_jsonl(tmp_path / "m.jsonl", [_row(0), _row(1, id="u", haaqi_score=None)])
    assert read_manifest(path)[1].haaqi_score is None
    with pytest.raises(ValueError, match=r"m\.jsonl:2 \(id 'u'\).*haaqi_score"):
        read_manifest(path, require_label=True)


def test_duplicate_id(tmp_path):
    path = _write_jsonl(tmp_path / "m.jsonl", [_row(0, id="x"), _row(1, id="x")])
    with pytest.raises(ValueError, match=r":2 \(id 'x'\): key 'id': duplicate id.*line 1"):
        read_manifest(path)


def test_check_files(audio_dir):
    (audio_dir / "audio" / "junk.wav").write_bytes(b"this is not audio" * 10)
    good = [_row(i) for i in range(3)]
    assert len(read_manifest(_write_jsonl(audio_dir / "m.jsonl", good), check_files=True)) == 3
    path = _write_jsonl(audio_dir / "m.jsonl", good + [_row(9, id="gone")])
    read_manifest(path)  # not checked unless asked
    with pytest.raises(ValueError, match=r":4 \(id 'gone'\): key 'file_path'.*does not exist"):
        read_manifest(path, check_files=True)
    path = _write_jsonl(audio_dir / "m.jsonl", [_row(0, file_path="audio", id="dir")])
    with pytest.raises(ValueError, match=r"id 'dir'.*key 'file_path'.*audio is a folder, not a "
                                         r"file"):                  # was "does not exist"
        read_manifest(path, check_files=True)
    path = _write_jsonl(audio_dir / "m.jsonl",
                        [_row(0, reference="audio/junk.wav", id="r")])
    with pytest.raises(ValueError, match=r"id 'r'.*key 'reference'.*not readable audio"):
        read_manifest(path, check_files=True)


def test_file_level_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_manifest(tmp_path / "nope.jsonl")
    path = _write_jsonl(tmp_path / "m.jsonl", [_row(0, haaqi_score=2.0)])
    with pytest.raises(ValueError, match="no usable rows"):
        read_manifest(path, on_error="skip")
    with pytest.raises(ValueError, match="on_error"):
        read_manifest(path, on_error="ignore")
    with pytest.raises(ValueError, match="is a folder"):
        read_manifest(tmp_path)
    binary = tmp_path / "b.jsonl"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(ValueError, match="b.jsonl is not UTF-8 text"):
        read_manifest(binary)


def test_a_byte_order_mark_is_not_bad_json(tmp_path):
    path = _write_jsonl(tmp_path / "m.jsonl", [_row(0), _row(1)])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())            # Excel's UTF-8 export
    assert [r.id for r in read_manifest(path)] == [r.id for r in read_manifest(
        _write_jsonl(tmp_path / "n.jsonl", [_row(0), _row(1)]))]


def test_write_manifest_names_an_unwritable_row(tmp_path):
    rows = [{"id": "a", "haaqi_score": 0.5}, {"id": "b", "haaqi_score": float("nan")}]
    with pytest.raises(ValueError, match=r"row 1 \(id 'b'\) cannot be written"):
        write_manifest(tmp_path / "out.jsonl", rows)
    assert not (tmp_path / "out.jsonl").exists()


def _rows(n, splits=None):
    return [ManifestRow(id=str(i), file_path=f"/x/{i}.wav", audiogram=AUDIOGRAM,
                        haaqi_score=0.5, split=None if splits is None else splits[i])
            for i in range(n)]


def test_split_rows_seeded_80_20():
    rows = _rows(50)
    parts = split_rows(rows, seed=3)
    assert set(parts) == {"train", "valid"} and len(parts["valid"]) == 10
    ids = [r.id for r in parts["train"]] + [r.id for r in parts["valid"]]
    assert sorted(ids, key=int) == [r.id for r in rows]  # disjoint, complete
    assert [r.id for r in parts["train"]] == sorted((r.id for r in parts["train"]), key=int)
    again = split_rows(rows, seed=3)
    assert [r.id for r in again["valid"]] == [r.id for r in parts["valid"]]
    other = split_rows(rows, seed=4)
    assert [r.id for r in other["valid"]] != [r.id for r in parts["valid"]]
    assert len(split_rows(rows, valid_fraction=0.3)["valid"]) == 15
    assert set(split_rows(_rows(3), valid_fraction=0.1)) == {"train", "valid"}
    with pytest.raises(ValueError, match="valid_fraction"):
        split_rows(rows, valid_fraction=1.0)


def test_split_rows_keeps_groups_together():
    rows = [ManifestRow(id=f"{i}/{ear}", file_path=f"/x/{i}.wav", audiogram=AUDIOGRAM,
                        channel=ear, group=str(i)) for i in range(20) for ear in ("left", "right")]
    rows += [ManifestRow(id=f"solo{i}", file_path=f"/y/{i}.wav", audiogram=AUDIOGRAM)
             for i in range(10)]
    for seed in range(5):
        parts = split_rows(rows, seed=seed)
        side = {r.id: name for name, members in parts.items() for r in members}
        assert len(side) == len(rows)
        assert all(side[f"{i}/left"] == side[f"{i}/right"] for i in range(20))
        # 30 units (20 clips, 10 single rows), 20 % of them valid
        units = {r.group or r.id for r in parts["valid"]}
        assert len(units) == 6
    # a manifest without groups splits exactly as one unit per row does
    plain = _rows(30)
    grouped = [ManifestRow(id=r.id, file_path=r.file_path, audiogram=AUDIOGRAM,
                           haaqi_score=0.5, group=f"g{r.id}") for r in plain]
    assert ([r.id for r in split_rows(plain, seed=2)["valid"]]
            == [r.id for r in split_rows(grouped, seed=2)["valid"]])


def test_label_fields_clip_and_refuse_non_finite():
    assert label_fields(1.0000003) == {"haaqi_score": 1.0}
    out = label_fields(0.5, {"nonlinear": -2e-7, "linear": 0.25, "other": 9.0})
    assert out == {"haaqi_score": 0.5, "haaqi_components": {"nonlinear": 0.0, "linear": 0.25}}
    with pytest.raises(ValueError, match="haaqi_components.linear is not finite"):
        label_fields(0.5, {"nonlinear": 0.5, "linear": float("nan")})
    # A negative cepstral correlation takes HAAQI's parts below 0 (clipped); values no HAAQI
    # can give are a labeller bug, not rounding.
    assert label_fields(-0.05, {"nonlinear": -0.7, "linear": 0.0})["haaqi_score"] == 0.0
    with pytest.raises(ValueError, match="haaqi_score = 1.3 is outside what HAAQI can give"):
        label_fields(1.3)
    with pytest.raises(ValueError, match="haaqi_components.nonlinear = -0.9 is outside"):
        label_fields(0.5, {"nonlinear": -0.9, "linear": 0.5})


def test_split_rows_uses_split_field():
    names = ["train", "valid", "test_seen", "test_unseen", None, None, None, None, None, None]
    parts = split_rows(_rows(10, names))
    assert [r.id for r in parts["test_seen"]] == ["2"]
    assert [r.id for r in parts["test_unseen"]] == ["3"]
    # the six unsplit rows are divided 80/20 (1 valid) and join the explicit ones
    assert len(parts["train"]) + len(parts["valid"]) == 8 and len(parts["valid"]) == 2
    assert "1" in {r.id for r in parts["valid"]} and "0" in {r.id for r in parts["train"]}


def test_manifest_row_validates_when_built_in_code():
    with pytest.raises(ValueError, match=re.escape("row 'z'")):
        ManifestRow(id="z", file_path="/a.wav", audiogram=[0] * 7)
    with pytest.raises(ValueError, match="haaqi_score"):
        ManifestRow(id="z", file_path="/a.wav", audiogram=[0] * 8, haaqi_score=float("nan"))


def _distorted(specs):
    """specs: (split, distortion) pairs -> rows with ids 0.."""
    return [ManifestRow(id=str(i), file_path=f"/x/{i}.wav", audiogram=AUDIOGRAM,
                        haaqi_score=0.5, split=split, distortion=distortion, line=i + 1)
            for i, (split, distortion) in enumerate(specs)]


def test_hold_out_distortions_moves_train_and_valid_rows_of_the_stages():
    rows = _distorted([("train", "clean"), ("train", "babble+resonance"), ("valid", "tilt_up"),
                       ("train", "lowpass"), ("test_seen", "resonance"), ("valid", "babble"),
                       ("train", "tilt_up+compression"), ("test_unseen", "tilt_down")])
    parts = hold_out_distortions(split_rows(rows), ["resonance", "tilt_up"])
    ids = {name: [r.id for r in part] for name, part in parts.items()}
    assert ids == {"train": ["0", "3"], "valid": ["5"], "test_seen": ["4"],
                   "test_unseen": ["7"], HELD_OUT_SPLIT: ["1", "6", "2"]}
    # whole stages only: "tilt" is not "tilt_up"
    assert distortion_stages("babble + tilt_up") == ("babble", "tilt_up")
    with pytest.raises(ValueError, match=r"\['tilt'\] occur in no row"):
        hold_out_distortions(split_rows(rows), ["tilt"])
    # stages that only test splits have are a typo for this purpose, too
    with pytest.raises(ValueError, match="tilt_down"):
        hold_out_distortions(split_rows(rows), ["tilt_down"])
    with pytest.raises(ValueError, match="no stages"):
        hold_out_distortions(split_rows(rows), [])


def test_hold_out_distortions_needs_every_row_to_name_its_distortion():
    rows = _distorted([("train", "clean"), ("train", None), ("valid", "babble")])
    with pytest.raises(ValueError, match=r"row '1' \(line 2, split 'train'\) has no 'distortion'"):
        hold_out_distortions(split_rows(rows), ["babble"])
    named = _distorted([("train", "babble"), (HELD_OUT_SPLIT, "clean")])
    with pytest.raises(ValueError, match="already has a split"):
        hold_out_distortions(split_rows(named), ["babble"])


def test_a_csv_file_is_named_as_the_wrong_manifest(tmp_path):
    """A CSV (label's pairs format) given where the JSONL manifest belongs: say so, not
    "bad JSON" on line 1."""
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("reference,processed\nref.wav,proc.wav\n")
    with pytest.raises(ValueError, match=r"pairs.csv: a CSV file; this manifest is JSON Lines"
                                         r".*haaqi-jax label"):
        read_manifest(pairs)


def test_checking_a_large_manifest_shows_a_bar_unless_told_not_to(audio_dir, capsys):
    rows = [_row(i % 4, id=f"r{i}", haaqi_score=0.1) for i in range(201)]
    path = _write_jsonl(audio_dir / "large.jsonl", rows)
    assert len(read_manifest(path, check_files=True)) == 201
    assert "checking large.jsonl" in capsys.readouterr().err
    assert len(read_manifest(path, check_files=True, progress=False)) == 201
    assert "checking" not in capsys.readouterr().err
