"""The grain input pipeline: coverage, bucketed shapes, masks, fillers, determinism, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from haaqi_jax.data.audio import load_audio
from haaqi_jax.data.buckets import bucket_length
from haaqi_jax.data.manifest import ManifestRow
from haaqi_jax.data.pipeline import InputConfig, make_eval_batches, make_train_iterator

# 11 clips of 0.2 .. 2.6 s, some at 44.1 kHz, so lengths (and buckets) differ.
SECONDS = [0.2, 0.5, 1.3, 2.6, 0.9, 1.1, 0.35, 2.0, 1.6, 0.7, 1.0]
KEYS = {"waveform", "padding_mask", "audiogram", "label", "components", "weight", "index"}


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(0)
    out = []
    for i, sec in enumerate(SECONDS):
        rate = 44100 if i % 3 == 0 else 16000
        path = folder / f"c{i}.flac"
        sf.write(path, 0.1 * rng.standard_normal(int(sec * rate)), rate)
        out.append(ManifestRow(id=f"clip{i}", file_path=path, audiogram=np.full(8, 5.0 * i),
                               haaqi_score=(i + 1) / 20, line=i + 1))
    return out


@pytest.fixture(scope="module")
def waves(rows):
    """The independent expectation of every row's samples."""
    return [load_audio(row.file_path) for row in rows]


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _check_batch(batch, rows, waves, cfg, crop=None):
    b = cfg.batch_size
    assert set(batch) == KEYS
    n = batch["waveform"].shape[1]
    assert batch["waveform"].shape == batch["padding_mask"].shape == (b, n)
    assert batch["waveform"].dtype == np.float32 and batch["padding_mask"].dtype == bool
    assert batch["audiogram"].shape == (b, 8) and batch["audiogram"].dtype == np.float32
    for key, dtype in (("label", np.float32), ("weight", np.float32), ("index", np.int32)):
        assert batch[key].shape == (b,) and batch[key].dtype == dtype
    real = batch["weight"] > 0
    assert real[0] and np.all(real[:real.sum()])  # fillers only at the end
    lengths = []
    for slot in range(b):
        valid = ~batch["padding_mask"][slot]
        length = int(valid.sum())
        assert valid[:length].all() and not valid[length:].any()  # mask = suffix padding
        assert not batch["waveform"][slot, length:].any()
        if not real[slot]:
            assert batch["index"][slot] == -1 and batch["label"][slot] == 0
            continue
        i = int(batch["index"][slot])
        wave = waves[i]
        if crop is None:
            np.testing.assert_array_equal(batch["waveform"][slot, :length], wave)
        else:
            assert length == min(crop, wave.shape[0])
        lengths.append(length)
        np.testing.assert_array_equal(batch["audiogram"][slot], rows[i].audiogram)
        assert batch["label"][slot] == np.float32(rows[i].haaqi_score)
    assert n == bucket_length(max(lengths))
    return batch["index"][real].tolist()


def test_every_row_once_per_epoch_shapes_masks_fillers(rows, waves):
    cfg = InputConfig(batch_size=4, seed=1, bucket_pool=2, prefetch=2)
    it = make_train_iterator(rows, cfg)
    assert it.steps_per_epoch == 3
    shapes = set()
    for epoch in range(3):
        seen = []
        for step in range(it.steps_per_epoch):
            assert it.position == (epoch, step)
            batch = next(it)
            seen += _check_batch(batch, rows, waves, cfg)
            shapes.add(batch["waveform"].shape[1])
        assert sorted(seen) == list(range(len(rows)))
        assert batch["weight"].tolist() == [1, 1, 1, 0]  # 11 = 2 * 4 + 3: last batch filled
    assert len(shapes) <= len({bucket_length(w.shape[0]) for w in waves})


def test_length_grouping_reduces_padding(rows, waves):
    def padding(pool):
        cfg = InputConfig(batch_size=2, seed=0, bucket_pool=pool, drop_remainder=True)
        it = make_train_iterator(rows, cfg, num_epochs=4)
        return sum(int(b["padding_mask"].sum()) for b in it)
    assert padding(8) < padding(1)


def test_deterministic_and_seed_dependent(rows):
    cfg = InputConfig(batch_size=3, seed=7, prefetch=2)
    first = _take(make_train_iterator(rows, cfg), 8)
    again = _take(make_train_iterator(rows, cfg), 8)
    _assert_same(first, again)
    serial = _take(make_train_iterator(rows, InputConfig(batch_size=3, seed=7, prefetch=0)), 8)
    _assert_same(first, serial)  # threads change nothing
    other = _take(make_train_iterator(rows, InputConfig(batch_size=3, seed=8)), 8)
    assert [b["index"].tolist() for b in other] != [b["index"].tolist() for b in first]
    # epochs are reshuffled
    order = [b["index"].tolist() for b in first]
    assert order[:4] != order[4:8]


def test_resume_equals_uninterrupted(rows):
    cfg = InputConfig(batch_size=3, seed=3, crop_seconds=0.5, prefetch=2)
    reference = _take(make_train_iterator(rows, cfg), 10)  # 2.5 epochs of 4 steps
    for cut in (1, 4, 6):
        it = make_train_iterator(rows, cfg)
        head = _take(it, cut)
        state = json.loads(json.dumps(it.get_state()))  # as a checkpoint would store it
        it.close()
        resumed = make_train_iterator(rows, cfg)
        resumed.set_state(state)
        assert resumed.position == divmod(cut, resumed.steps_per_epoch)
        _assert_same(head + _take(resumed, 10 - cut), reference)
    # a whole epoch by epoch_start, and a finite run
    _assert_same(_take(make_train_iterator(rows, cfg, epoch_start=1), 4), reference[4:8])
    finite = make_train_iterator(rows, cfg, epoch_start=1, num_epochs=1)
    assert len(finite) == 4
    _assert_same(list(finite), reference[4:8])


def test_state_of_other_data_refused(rows):
    it = make_train_iterator(rows, InputConfig(batch_size=3))
    next(it)
    state = it.get_state()
    with pytest.raises(ValueError, match="other rows or another batch config"):
        make_train_iterator(rows[:-1], InputConfig(batch_size=3)).set_state(state)
    with pytest.raises(ValueError, match="other rows or another batch config"):
        make_train_iterator(rows, InputConfig(batch_size=3, seed=1)).set_state(state)
    with pytest.raises(ValueError, match="lacks key"):
        it.set_state({"epoch": 0})


def test_crops(rows, waves):
    crop = 0.5
    cfg = InputConfig(batch_size=4, seed=2, crop_seconds=crop)
    n_crop = int(crop * 16000)
    batches = _take(make_train_iterator(rows, cfg), 6)
    for batch in batches:
        _check_batch(batch, rows, waves, cfg, crop=n_crop)
        assert batch["waveform"].shape[1] <= bucket_length(n_crop)
        for slot in np.flatnonzero(batch["weight"]):
            wave = waves[batch["index"][slot]]
            piece = batch["waveform"][slot, :min(n_crop, wave.shape[0])]
            windows = np.lib.stride_tricks.sliding_window_view(wave, piece.shape[0])
            assert np.any(np.all(windows == piece, axis=1))  # a contiguous window of the clip
    # random crops differ between epochs for the same (long) clip
    starts = {}
    for batch in batches:
        for slot in np.flatnonzero(batch["weight"]):
            i = int(batch["index"][slot])
            if waves[i].shape[0] > 2 * n_crop:
                starts.setdefault(i, set()).add(batch["waveform"][slot, :4].tobytes())
    assert any(len(s) > 1 for s in starts.values())
    # evaluation takes the centre window
    for batch in make_eval_batches(rows, cfg):
        for slot in np.flatnonzero(batch["weight"]):
            wave = waves[batch["index"][slot]]
            start = max(0, (wave.shape[0] - n_crop) // 2)
            np.testing.assert_array_equal(
                batch["waveform"][slot, :min(n_crop, wave.shape[0])], wave[start:start + n_crop])


def test_eval_batches_cover_rows_once_and_allow_missing_labels(rows, waves):
    unlabelled = [ManifestRow(id=r.id, file_path=r.file_path, audiogram=r.audiogram,
                              haaqi_score=None if i % 2 else r.haaqi_score)
                  for i, r in enumerate(rows)]
    cfg = InputConfig(batch_size=4, shuffle=True, drop_remainder=True)
    batches = list(make_eval_batches(unlabelled, cfg))
    assert len(batches) == 3 == len(make_eval_batches(unlabelled, cfg))
    seen = []
    for batch in batches:
        real = batch["weight"] > 0
        seen += batch["index"][real].tolist()
        for slot in np.flatnonzero(real):
            i = batch["index"][slot]
            expected = unlabelled[i].haaqi_score or 0.0
            assert batch["label"][slot] == np.float32(expected)
            np.testing.assert_array_equal(
                batch["waveform"][slot, :waves[i].shape[0]], waves[i])
    assert sorted(seen) == list(range(len(rows)))
    assert batches[-1]["weight"].tolist() == [1, 1, 1, 0]
    with pytest.raises(ValueError, match=r"row \(id 'clip1', .*c1.flac\) has no haaqi_score"):
        make_train_iterator(unlabelled, cfg)


def test_drop_remainder(rows):
    it = make_train_iterator(rows, InputConfig(batch_size=4, drop_remainder=True), num_epochs=2)
    batches = list(it)
    assert len(batches) == 4 and all(b["weight"].all() for b in batches)
    with pytest.raises(ValueError, match="make no batch"):
        make_train_iterator(rows[:3], InputConfig(batch_size=4, drop_remainder=True))


def test_hosts_split_the_global_batch(rows):
    whole = _take(make_train_iterator(rows, InputConfig(batch_size=4, seed=5)), 6)
    parts = [_take(make_train_iterator(
        rows, InputConfig(batch_size=4, seed=5, shard_index=h, shard_count=2)), 6)
        for h in range(2)]
    for step, batch in enumerate(whole):
        for key in batch:
            joined = np.concatenate([parts[0][step][key], parts[1][step][key]])
            np.testing.assert_array_equal(joined, batch[key], err_msg=key)
    with pytest.raises(ValueError, match="must divide by shard_count"):
        InputConfig(batch_size=3, shard_count=2)


def test_bad_items_fail_naming_the_row(rows, tmp_path):
    missing = ManifestRow(id="gone", file_path=tmp_path / "gone.wav", audiogram=np.zeros(8),
                          haaqi_score=0.5, line=12)
    with pytest.raises(ValueError, match=r"line 12, id 'gone'.*gone.wav.*does not exist"):
        make_train_iterator(list(rows) + [missing], InputConfig(batch_size=4))
    short = tmp_path / "short.wav"
    sf.write(short, 0.1 * np.ones(2799), 16000)
    with pytest.raises(ValueError, match=r"id 'short'.*2799 samples.*shorter"):
        make_eval_batches([ManifestRow(id="short", file_path=short, audiogram=np.zeros(8))],
                          InputConfig())
    # a file that breaks after the iterator was built: fails when its batch is read
    silent = tmp_path / "silent.wav"
    sf.write(silent, 0.1 * np.ones(4000), 16000)
    row = ManifestRow(id="silent", file_path=silent, audiogram=np.zeros(8), haaqi_score=0.1)
    it = make_train_iterator([row], InputConfig(batch_size=1, prefetch=0))
    sf.write(silent, np.zeros(4000), 16000)
    with pytest.raises(ValueError, match=r"id 'silent'.*silent"):
        next(it)


def test_config_validation():
    with pytest.raises(ValueError, match="batch_size"):
        InputConfig(batch_size=0)
    with pytest.raises(ValueError, match="crop_seconds"):
        InputConfig(crop_seconds=0.1)
    with pytest.raises(ValueError, match="prefetch"):
        InputConfig(prefetch=-1)


def test_row_fields_carry_haaqi_components():
    """components (B, 2): a row's (nonlinear, linear) parts; 0 for rows without them and for
    filler slots."""
    from haaqi_jax.data.manifest import ManifestRow
    from haaqi_jax.data.pipeline import row_fields
    rows = [ManifestRow(id=str(i), file_path=f"c{i}.wav", audiogram=np.zeros(8), haaqi_score=0.5,
                        haaqi_components=(0.1 * i, 0.2 * i) if i else None) for i in range(3)]
    fields = row_fields(rows, np.array([2, 0, 1, 1]), np.array([True, True, True, False]))
    np.testing.assert_allclose(fields["components"],
                               [[0.2, 0.4], [0.0, 0.0], [0.1, 0.2], [0.0, 0.0]], rtol=1e-6)
    assert fields["components"].dtype == np.float32


def test_rows_of_one_channel_read_that_channel(tmp_path):
    # The two ears of a stereo clip (rows of `haaqi-jax label --manifest-out`) and the whole clip
    stereo = 0.1 * np.random.default_rng(3).standard_normal((9000, 2))
    sf.write(tmp_path / "s.wav", stereo, 16000, subtype="FLOAT")
    stereo = sf.read(tmp_path / "s.wav", dtype="float64")[0]  # as stored (float32 values)
    rows = [ManifestRow(id=f"s/{ear}", file_path=tmp_path / "s.wav", audiogram=np.zeros(8),
                        haaqi_score=0.5, channel=ear, group="s") for ear in ("left", "right")]
    rows.append(ManifestRow(id="s", file_path=tmp_path / "s.wav", audiogram=np.zeros(8),
                            haaqi_score=0.5))
    expected = [stereo[:, 0], stereo[:, 1], stereo.mean(axis=1)]
    (batch,) = make_eval_batches(rows, InputConfig(batch_size=3, shuffle=False))
    for slot in range(3):
        np.testing.assert_array_equal(batch["waveform"][slot, :9000],
                                      expected[batch["index"][slot]].astype(np.float32))
