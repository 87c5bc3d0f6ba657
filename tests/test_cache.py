"""The feature cache: one encoder call per clip, staleness, resume, batches equal to encoding,
cached targets added to waveform batches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from haaqi_jax.data.audio import load_audio
from haaqi_jax.data.buckets import bucket_length
from haaqi_jax.data.cache import (FeatureCache, add_cached_targets, build_feature_cache,
                                  make_feature_batches, params_fingerprint)
from haaqi_jax.data.manifest import ManifestRow
from haaqi_jax.data.pipeline import InputConfig, make_train_iterator

SECONDS = [0.3, 1.2, 0.8, 2.1, 0.5, 1.0, 1.7]
HOP = 320  # samples per token of the toy encoder
LAYERS = 3


class ToyEncoder:
    """A stand-in for the frozen encoder: tokens of HOP samples through a seeded projection.

    Padded samples are zero, so a clip's valid tokens do not depend on how far it is padded;
    a token is padding when all its samples are (the BEATs rule). Counts calls and clips.
    """

    def __init__(self, seed=0, channels=5, all_layers=False):
        self.weights = np.random.default_rng(seed).standard_normal((HOP, channels))
        self.all_layers = all_layers
        self.calls = 0
        self.fail_after = None

    def __call__(self, waveform, padding_mask):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("encoder interrupted")
        self.calls += 1
        b, n = waveform.shape
        t = n // HOP
        chunks = np.where(padding_mask, 0.0, waveform)[:, :t * HOP].reshape(b, t, HOP)
        features = (chunks @ self.weights).astype(np.float32)
        token_pad = padding_mask[:, :t * HOP].reshape(b, t, HOP).all(axis=-1)
        if self.all_layers:
            features = np.stack([np.tanh(features * (k + 1)) for k in range(LAYERS)], axis=1)
        return features, token_pad

    def direct(self, wave):
        """Features of one clip encoded alone, padded to its bucket: (..., t_valid, C), t_full."""
        n = bucket_length(wave.shape[0])
        x = np.zeros((1, n), np.float32)
        x[0, :wave.shape[0]] = wave
        mask = np.arange(n)[None] >= wave.shape[0]
        calls = self.calls
        features, token_pad = self(x, mask)
        self.calls = calls
        t_valid = int((~token_pad[0]).sum())
        return features[0][..., :t_valid, :], features.shape[-2]


def _make_rows(folder):
    rng = np.random.default_rng(1)
    rows = []
    for i, sec in enumerate(SECONDS):
        rate = 44100 if i == 3 else 16000
        path = folder / f"c{i}.wav"
        sf.write(path, 0.1 * rng.standard_normal(int(sec * rate)), rate, subtype="FLOAT")
        rows.append(ManifestRow(id=f"clip/{i}", file_path=path, audiogram=np.full(8, 3.0 * i),
                                haaqi_score=(i + 1) / 10, line=i + 1))
    return rows


@pytest.fixture()
def rows(tmp_path):
    (tmp_path / "audio").mkdir()
    return _make_rows(tmp_path / "audio")


def _check_against_direct(batches, rows, encoder, cfg, *, layers, rtol=0.0):
    seen = []
    for batch in batches:
        assert set(batch) == {"features", "token_mask", "audiogram", "label", "components",
                              "weight", "index"}
        t = batch["features"].shape[-2]
        assert batch["features"].dtype == np.float32
        assert batch["token_mask"].shape == (cfg.batch_size, t)
        t_fulls = []
        for slot in range(cfg.batch_size):
            i = int(batch["index"][slot])
            if batch["weight"][slot] == 0:
                assert i == -1 and batch["label"][slot] == 0
                continue
            seen.append(i)
            expected, t_full = encoder.direct(load_audio(rows[i].file_path))
            t_fulls.append(t_full)
            t_valid = expected.shape[-2]
            got = batch["features"][slot]
            mask = batch["token_mask"][slot]
            assert mask[:t_valid].all() and not mask[t_valid:].any()  # True = valid
            if layers == "all":
                assert got.shape == (LAYERS, t, expected.shape[-1])
            np.testing.assert_allclose(got[..., :t_valid, :], expected, rtol=rtol, atol=1e-6)
            assert not got[..., t_valid:, :].any()
            np.testing.assert_array_equal(batch["audiogram"][slot], rows[i].audiogram)
            assert batch["label"][slot] == np.float32(rows[i].haaqi_score)
        assert t == max(t_fulls)  # T follows the waveform buckets
    return seen


@pytest.mark.parametrize("layers,dtype", [("last", "float32"), ("all", "float32"),
                                          ("last", "float16")])
def test_batches_equal_direct_encoding(rows, tmp_path, layers, dtype):
    encoder = ToyEncoder(all_layers=True)
    cache = build_feature_cache(rows, encoder, tmp_path / "cache", batch_size=3, layers=layers,
                                fingerprint="toy", dtype=dtype)
    if layers == "last":  # the last of the returned layers
        encoder.direct = _last_layer(encoder.direct)
    assert len(cache) == len(rows)
    assert cache.feature_shape == ((5,) if layers == "last" else (LAYERS, 5))
    cfg = InputConfig(batch_size=3, seed=4, bucket_pool=2)
    rtol = 2e-3 if dtype == "float16" else 0.0
    train = make_feature_batches(cache, rows, cfg, num_epochs=2)
    seen = _check_against_direct(train, rows, encoder, cfg, layers=layers, rtol=rtol)
    assert sorted(seen) == sorted(list(range(len(rows))) * 2)  # each row once per epoch
    evaluation = make_feature_batches(cache, rows, cfg, train=False)
    seen = _check_against_direct(evaluation, rows, encoder, cfg, layers=layers, rtol=rtol)
    assert sorted(seen) == list(range(len(rows)))


def _last_layer(direct):
    def wrapped(wave):
        features, t_full = direct(wave)
        return features[-1], t_full
    return wrapped


def test_encoder_called_once_per_clip_and_resumes(rows, tmp_path):
    encoder = ToyEncoder()
    build = lambda rs: build_feature_cache(rs, encoder, tmp_path / "cache", batch_size=1,
                                           fingerprint="v1")
    build(rows[:3])
    assert encoder.calls == 3
    build(rows)  # only the new clips
    assert encoder.calls == len(rows)
    cache = build(rows)  # nothing left to do
    assert encoder.calls == len(rows) and len(cache) == len(rows)
    # an edited audio file is re-encoded, the others are not
    sf.write(rows[2].file_path, 0.2 * np.ones(9000), 16000)
    build(rows)
    assert encoder.calls == len(rows) + 1
    # ... also when the edit keeps its size (other samples of the same length and format)
    import os
    size = os.path.getsize(rows[2].file_path)
    before = os.stat(rows[2].file_path).st_mtime_ns
    sf.write(rows[2].file_path, -0.2 * np.ones(9000), 16000)
    os.utime(rows[2].file_path, ns=(before + 10**9, before + 10**9))  # a coarse clock's tick
    assert os.path.getsize(rows[2].file_path) == size
    cache = build(rows)
    assert encoder.calls == len(rows) + 2
    # the features of the two earlier versions of that clip are gone: one file per clip
    assert len(list(cache.directory.glob("*.npy"))) == len(rows)
    # a build interrupted mid-way keeps what it finished
    fresh = ToyEncoder()
    fresh.fail_after = 4
    with pytest.raises(RuntimeError, match="interrupted"):
        build_feature_cache(rows, fresh, tmp_path / "cache", batch_size=1, fingerprint="v2")
    fresh.fail_after = None
    cache = build_feature_cache(rows, fresh, tmp_path / "cache", batch_size=1, fingerprint="v2")
    assert fresh.calls == len(rows) and len(cache) == len(rows)


def test_changed_fingerprint_rebuilds(rows, tmp_path):
    encoder = ToyEncoder(seed=0)
    first = build_feature_cache(rows, encoder, tmp_path / "c", batch_size=4,
                                fingerprint=params_fingerprint({"w": encoder.weights}))
    calls = encoder.calls
    changed = ToyEncoder(seed=1)
    second = build_feature_cache(rows, changed, tmp_path / "c", batch_size=4,
                                 fingerprint=params_fingerprint({"w": changed.weights}))
    assert changed.calls == calls and second.directory != first.directory
    assert params_fingerprint({"w": encoder.weights}) == params_fingerprint(
        {"w": encoder.weights.copy()})
    assert params_fingerprint({"w": encoder.weights}, {"layers": 12}) != params_fingerprint(
        {"w": encoder.weights}, {"layers": 11})
    # without a fingerprint, a probe signal tells encoders apart (one extra call each build)
    probe_a = ToyEncoder(seed=0)
    build_feature_cache(rows, probe_a, tmp_path / "p", batch_size=1)
    assert probe_a.calls == len(rows) + 1
    build_feature_cache(rows, probe_a, tmp_path / "p", batch_size=1)
    assert probe_a.calls == len(rows) + 2
    probe_b = ToyEncoder(seed=2)
    build_feature_cache(rows, probe_b, tmp_path / "p", batch_size=1)
    assert probe_b.calls == len(rows) + 1
    # batches from a stale cache are refused for the edited clip
    sf.write(rows[0].file_path, 0.3 * np.ones(5000), 16000)
    with pytest.raises(ValueError, match=r"id 'clip/0'.*not in the feature cache"):
        make_feature_batches(FeatureCache(first.directory), rows, InputConfig(batch_size=2))


def test_resume_same_as_waveform_pipeline(rows, tmp_path):
    encoder = ToyEncoder()
    cache = build_feature_cache(rows, encoder, tmp_path / "cache", batch_size=2,
                                fingerprint="toy", dtype="float32")
    cfg = InputConfig(batch_size=2, seed=9)
    reference = [next(it) for it in [make_feature_batches(cache, rows, cfg)] for _ in range(9)]
    it = make_feature_batches(cache, rows, cfg)
    head = [next(it) for _ in range(5)]
    state = json.loads(json.dumps(it.get_state()))
    resumed = make_feature_batches(cache, rows, cfg)
    resumed.set_state(state)
    for a, b in zip(head + [next(resumed) for _ in range(4)], reference):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    # features and waveforms of the same (rows, cfg) share the epoch orders
    waves = make_train_iterator(rows, InputConfig(batch_size=2, seed=9))
    waveform_order = [next(waves)["index"].tolist() for _ in range(9)]
    assert [b["index"].tolist() for b in reference] == waveform_order


def test_errors(rows, tmp_path):
    class NaNEncoder(ToyEncoder):
        def __call__(self, waveform, padding_mask):
            features, pad = super().__call__(waveform, padding_mask)
            return features * np.nan, pad

    with pytest.raises(ValueError, match=r"id 'clip/\d'.*NaN"):
        build_feature_cache(rows, NaNEncoder(), tmp_path / "a", batch_size=2, fingerprint="n")

    class HugeEncoder(ToyEncoder):
        def __call__(self, waveform, padding_mask):
            features, pad = super().__call__(waveform, padding_mask)
            return features * 1e6, pad

    with pytest.raises(ValueError, match=r"float16 range"):
        build_feature_cache(rows, HugeEncoder(), tmp_path / "b", batch_size=2, fingerprint="h")
    build_feature_cache(rows[:2], HugeEncoder(), tmp_path / "b", batch_size=2, fingerprint="h",
                        dtype="float32")

    class ScrambledMask(ToyEncoder):
        def __call__(self, waveform, padding_mask):
            features, pad = super().__call__(waveform, padding_mask)
            return features, pad[:, ::-1]

    with pytest.raises(ValueError, match="not a leading prefix"):
        build_feature_cache(rows, ScrambledMask(), tmp_path / "c", batch_size=1, fingerprint="s")
    with pytest.raises(ValueError, match="layers='all' needs"):
        build_feature_cache(rows, ToyEncoder(), tmp_path / "d", batch_size=1, fingerprint="x",
                            layers="all")
    dup = list(rows) + [rows[0]]
    with pytest.raises(ValueError, match="clip/0.*more than once"):
        build_feature_cache(dup, ToyEncoder(), tmp_path / "e", batch_size=1, fingerprint="x")
    cache = build_feature_cache(rows[:2], ToyEncoder(), tmp_path / "f", batch_size=1,
                                fingerprint="x")
    with pytest.raises(ValueError, match=r"id 'clip/2'.*run build_feature_cache"):
        make_feature_batches(cache, rows, InputConfig(batch_size=2))
    with pytest.raises(ValueError, match="crop_seconds must be None"):
        make_feature_batches(cache, rows[:2], InputConfig(batch_size=2, crop_seconds=1.0))


def test_cached_targets_added_to_waveform_batches(rows, tmp_path):
    """add_cached_targets: the waveform pipeline's batches unchanged plus each clip's cached
    outputs (as encoded alone), zeros past them and for fillers; same resume; crops and a
    cache of another token rule refused."""
    encoder = ToyEncoder(all_layers=True)
    cache = build_feature_cache(rows, encoder, tmp_path / "cache", batch_size=2, layers="all",
                                fingerprint="toy", dtype="float32")
    num_tokens = lambda n: -(-n // HOP)  # noqa: E731  (the toy's rule; buckets are whole hops)
    cfg = InputConfig(batch_size=3, seed=2, prefetch=0)
    waves = make_train_iterator(rows, cfg)
    batches = add_cached_targets(make_train_iterator(rows, cfg), cache, rows, num_tokens)
    assert batches.steps_per_epoch == waves.steps_per_epoch == 3
    fillers = 0
    for _ in range(2 * batches.steps_per_epoch):
        batch, plain = next(batches), next(waves)
        assert set(batch) == set(plain) | {"targets"}
        for key in plain:
            np.testing.assert_array_equal(batch[key], plain[key], err_msg=key)
        t = plain["waveform"].shape[1] // HOP
        assert batch["targets"].shape == (3, LAYERS, t, 5)
        assert batch["targets"].dtype == np.float32
        for slot, i in enumerate(batch["index"]):
            if i < 0:
                fillers += 1
                assert not batch["targets"][slot].any()
                continue
            expected, _ = encoder.direct(load_audio(rows[i].file_path))
            t_valid = expected.shape[-2]
            np.testing.assert_allclose(batch["targets"][slot, :, :t_valid], expected, atol=1e-6)
            assert not batch["targets"][slot, :, t_valid:].any()
    assert fillers == 4  # 7 rows in batches of 3: 2 fillers per epoch
    state = json.loads(json.dumps(batches.get_state()))
    want = next(batches)
    resumed = add_cached_targets(make_train_iterator(rows, cfg), cache, rows, num_tokens)
    resumed.set_state(state)
    got = next(resumed)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)

    cropped = make_train_iterator(rows, InputConfig(batch_size=7, prefetch=0, crop_seconds=0.4))
    with pytest.raises(ValueError, match=r"id 'clip/\d'.*whole clips"):
        next(add_cached_targets(cropped, cache, rows, num_tokens))
    other_rule = add_cached_targets(make_train_iterator(rows, cfg), cache, rows,
                                    lambda n: n // HOP + 1)
    with pytest.raises(ValueError, match="built by another encoder"):
        next(other_rule)
    with pytest.raises(ValueError, match=r"id 'clip/new'.*run build_feature_cache"):
        add_cached_targets(waves, FeatureCache(cache.directory), rows + [
            ManifestRow(id="clip/new", file_path=rows[0].file_path, audiogram=np.zeros(8))],
            num_tokens)


def test_a_changed_channel_is_recomputed(tmp_path):
    stereo = 0.1 * np.random.default_rng(4).standard_normal((16000, 2))
    sf.write(tmp_path / "s.wav", stereo, 16000, subtype="FLOAT")
    left = ManifestRow(id="s", file_path=tmp_path / "s.wav", audiogram=np.zeros(8),
                       haaqi_score=0.5, channel="left")
    encoder = ToyEncoder()
    cache = build_feature_cache([left], encoder, tmp_path / "cache", batch_size=1,
                                fingerprint="toy", dtype="float32")
    stored = cache.load(left)
    np.testing.assert_allclose(stored, encoder.direct(stereo[:, 0].astype(np.float32))[0],
                               rtol=1e-6)
    # the same id now reading the right channel: stale, so encoded again from that channel
    right = ManifestRow(id="s", file_path=left.file_path, audiogram=np.zeros(8),
                        haaqi_score=0.5, channel="right")
    assert cache.is_current(left) and not cache.is_current(right)
    calls = encoder.calls
    cache = build_feature_cache([right], encoder, tmp_path / "cache", batch_size=1,
                                fingerprint="toy", dtype="float32")
    assert encoder.calls == calls + 1
    stored = cache.load(right)
    np.testing.assert_allclose(stored, encoder.direct(stereo[:, 1].astype(np.float32))[0],
                               rtol=1e-6)


def test_rows_of_one_id_from_other_audio_never_share_features(rows, tmp_path):
    """Two datasets whose rows share ids (two demo folders) in one cache folder: each run keeps
    reading its own clips' features, even after the other run encoded its clips."""
    (tmp_path / "other").mkdir()
    other = _make_rows(tmp_path / "other")
    for row in other:                                  # the same ids, other audio
        sf.write(row.file_path, 0.3 * np.sin(np.arange(16000) / 7.0), 16000, subtype="FLOAT")
    encoder = ToyEncoder()
    first = build_feature_cache(rows, encoder, tmp_path / "cache", batch_size=2,
                                fingerprint="v1")
    second = build_feature_cache(other, encoder, tmp_path / "cache", batch_size=2,
                                 fingerprint="v1")
    for row_a, row_b in zip(rows, other):
        want_a = encoder.direct(load_audio(row_a.file_path))[0]
        want_b = encoder.direct(load_audio(row_b.file_path))[0]
        for cache in (first, FeatureCache(first.directory)):      # opened before and after
            np.testing.assert_allclose(cache.load(row_a), want_a, rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(second.load(row_b), want_b, rtol=1e-3, atol=1e-3)
    calls = encoder.calls
    build_feature_cache(rows, encoder, tmp_path / "cache", batch_size=2, fingerprint="v1")
    build_feature_cache(other, encoder, tmp_path / "cache", batch_size=2, fingerprint="v1")
    assert encoder.calls == calls                      # both stay cached side by side


def test_a_damaged_feature_file_is_named_and_encoded_again(rows, tmp_path):
    encoder = ToyEncoder()
    cache = build_feature_cache(rows, encoder, tmp_path / "cache", batch_size=1,
                                fingerprint="v1")
    path = cache.directory / cache.entry(rows[3]).file
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])            # cut short (a full disk, a crash)
    with pytest.raises(ValueError, match=rf"id 'clip/3'.*{path.name} cannot be read .*"
                                         r"encodes it again"):
        cache.load(rows[3])
    # Another clip's features in its place: the token count does not match the index.
    np.save(path, np.load(cache.directory / cache.entry(rows[0]).file))
    with pytest.raises(ValueError, match=r"holds shape \(\d+, 5\), the index says"):
        cache.load(rows[3])
    empty = cache.directory / cache.entry(rows[4]).file
    empty.write_bytes(b"")                             # created, never written (a power cut)
    with pytest.raises(ValueError, match=rf"id 'clip/4'.*{empty.name} cannot be read"):
        cache.load(rows[4])
    calls = encoder.calls
    rebuilt = build_feature_cache(rows, encoder, tmp_path / "cache", batch_size=1,
                                  fingerprint="v1")
    assert encoder.calls == calls + 2                  # those two clips alone
    np.testing.assert_allclose(rebuilt.load(rows[3]),
                               encoder.direct(load_audio(rows[3].file_path))[0],
                               rtol=1e-3, atol=1e-3)
    (cache.directory / "meta.json").write_text('{"fingerprint": ')
    with pytest.raises(ValueError, match=r"meta.json \(a feature cache's record\) is damaged"):
        FeatureCache(cache.directory)
