"""Public HAAQI API (haaqi_v1, compute_haaqi, haaqi_batch, `haaqi-jax score`) against pyclarity
0.9.0 end to end, plus the batch's own properties (float32 accuracy, batch == items alone,
validation, no NaN)."""

from __future__ import annotations

import json
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.signal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clarity.evaluator.haaqi import compute_haaqi as clarity_compute_haaqi
from clarity.evaluator.haaqi import haaqi_v1 as clarity_haaqi_v1
from clarity.utils.audiogram import Audiogram as ClarityAudiogram

from haaqi_jax.audiogram import STANDARD_FREQUENCIES, Audiogram
from haaqi_jax.haaqi import api
from haaqi_jax.haaqi.api import compute_haaqi, haaqi_batch, haaqi_v1, prepare_batch
from signals import harmonic_music

FIELDS = ("combined", "nonlinear", "linear", "cephigh", "bmsync5", "d_loud", "d_norm")
AUDIOGRAMS = {
    "normal": [0, 0, 5, 0, 5, 10, 10, 15],
    "sloping": [10, 15, 20, 30, 40, 50, 60, 65],
    "flat60": [60] * 8,
    "severe": [70, 75, 80, 85, 90, 95, 100, 100],
}


def music(seconds: float, fs: float, seed: int) -> np.ndarray:
    return harmonic_music(seconds, fs, seed, harmonics=7)


def degrade(x: np.ndarray, fs: float, condition: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(reference, processed) for a named condition."""
    rng = np.random.default_rng(seed + 1000)
    if condition == "identity":
        return x, x.copy()
    if condition == "noise":
        return x, x + 0.3 * np.std(x) * rng.standard_normal(x.size)
    if condition == "lowpass":
        b, a = scipy.signal.butter(4, 1500 / (fs / 2))
        return x, scipy.signal.lfilter(b, a, x)
    if condition == "delayed":                           # 10 ms later
        d = int(0.01 * fs)
        return x, np.concatenate([np.zeros(d), x[:-d]])
    if condition == "gain":
        return x, 0.5 * x
    if condition == "silence":                           # 0.1 s of silence before and after
        z = np.zeros(int(0.1 * fs))
        ref = np.concatenate([z, x, z])
        return ref, ref + 0.1 * np.std(x) * rng.standard_normal(ref.size)
    if condition == "near_silent":
        return x, 1e-5 * x + 1e-7 * rng.standard_normal(x.size)
    raise ValueError(condition)


def cadenza_level1(ref: np.ndarray) -> float:
    return 65.0 - 20.0 * np.log10(np.sqrt(np.mean(ref**2)))


# (id, seconds, fs, condition, audiogram, equalisation, level1 rule)
CASES = [
    ("identity-normal-eq2", 0.5, 24000, "identity", "normal", 2, "65"),
    ("noise-sloping-eq1", 0.5, 44100, "noise", "sloping", 1, "65"),
    ("lowpass-flat60-cadenza", 0.5, 48000, "lowpass", "flat60", 1, "cadenza"),
    ("delayed-severe-eq2", 0.5, 16000, "delayed", "severe", 2, "cadenza"),
    ("gain-sloping-eq2", 0.5, 24000, "gain", "sloping", 2, "65"),
    ("silence-normal-eq1", 0.5, 44100, "silence", "normal", 1, "65"),
    ("near-silent-flat60", 0.5, 24000, "near_silent", "flat60", 2, "65"),
    ("identity-sloping-eq1", 0.5, 16000, "identity", "sloping", 1, "65"),
    ("noise-severe-3s", 3.0, 44100, "noise", "severe", 1, "cadenza"),
    ("identity-normal-3s", 3.0, 24000, "identity", "normal", 2, "65"),
    pytest.param("noise-sloping-10s", 10.0, 44100, "noise", "sloping", 1, "65",
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name,seconds,fs,condition,audiogram,eq,level_rule", CASES,
                         ids=[c.values[0] if hasattr(c, "marks") else c[0] for c in CASES])
def test_haaqi_v1_matches_pyclarity(name, seconds, fs, condition, audiogram, eq, level_rule):
    seed = zlib.crc32(name.encode()) % 1000
    ref, proc = degrade(music(seconds, fs, seed), fs, condition, seed)
    level1 = 65.0 if level_rule == "65" else cadenza_level1(ref)
    levels = np.asarray(AUDIOGRAMS[audiogram], dtype=float)
    np.random.seed(seed)
    expected = clarity_haaqi_v1(ref, fs, proc, fs, ClarityAudiogram(levels, STANDARD_FREQUENCIES),
                                eq, level1)
    after_expected = np.random.random()
    np.random.seed(seed)
    ours = haaqi_v1(ref, fs, proc, fs, Audiogram(levels), eq, level1)
    after_ours = np.random.random()
    flat = lambda r: [r[0], r[1], r[2], *r[3]]
    np.testing.assert_allclose(flat(ours), flat(expected), atol=1e-6, rtol=0)
    assert after_ours == after_expected, "numpy's global generator must end in pyclarity's state"
    if condition == "identity" and eq == 2:
        assert ours[0] > 0.99


def test_pyclarity_regression_haaqi_v1():
    """pyclarity's tests/evaluator/haaqi/test_haaqi.py::test_haaqi_v1, verbatim inputs."""
    np.random.seed(0)
    sample_rate = 16000
    x = np.random.uniform(-1, 1, int(sample_rate * 0.5))
    y = np.random.uniform(-1, 1, int(sample_rate * 0.5))
    audiogram = ClarityAudiogram(levels=np.array([45, 45, 35, 45, 60, 65]),
                                 frequencies=np.array([250, 500, 1000, 2000, 4000, 6000]))
    score, _, _, _ = haaqi_v1(x, sample_rate, y, sample_rate, audiogram, 1, 65)
    assert score == pytest.approx(0.111290948, abs=1e-7)


@pytest.mark.parametrize("levels,freqs", [
    ([10, 20, 30, 40, 50, 60], [250, 500, 1000, 2000, 4000, 6000]),
    ([10, 20, 40, 50, 60], [250, 500, 2000, 4000, 6000]),        # 1 kHz interpolated
])
def test_pyclarity_regression_compute_haaqi(levels, freqs):
    """pyclarity's test_compute_haaqi, verbatim inputs."""
    np.random.seed(42)
    sample_rate = 16000
    enh_signal = np.random.uniform(-1, 1, int(sample_rate * 0.5))
    ref_signal = np.random.uniform(-1, 1, int(sample_rate * 0.5))
    audiogram = ClarityAudiogram(levels=np.array(levels), frequencies=np.array(freqs))
    score = compute_haaqi(processed_signal=enh_signal, reference_signal=ref_signal,
                          processed_sample_rate=sample_rate, reference_sample_rate=sample_rate,
                          audiogram=audiogram)
    assert score == pytest.approx(0.113759275, abs=1e-7)


def test_silent_processed_scores_like_a_vanishing_one_where_pyclarity_gives_nan():
    ref, proc = degrade(music(0.5, 44100, 9), 44100, "noise", 9)
    silent = np.zeros_like(proc)
    audiogram = Audiogram(AUDIOGRAMS["sloping"])
    np.random.seed(1)
    clarity = clarity_haaqi_v1(ref, 44100, silent, 44100,
                               ClarityAudiogram(np.asarray(AUDIOGRAMS["sloping"], float),
                                                STANDARD_FREQUENCIES), 1, 65.0)
    assert np.isnan(clarity[0])              # its 44.1 -> 24 kHz RMS rescale divides 0 by 0
    scores = []
    for processed in (silent, proc * 1e-9):
        np.random.seed(1)
        scores.append(haaqi_v1(ref, 44100, processed, 44100, audiogram, 1)[0])
    assert np.isfinite(scores[0]) and scores[0] < 0.1
    assert scores[0] == pytest.approx(scores[1], abs=1e-9)


def test_compute_haaqi_empty_reference_like_pyclarity():
    audiogram = ClarityAudiogram(np.zeros(8), np.asarray(STANDARD_FREQUENCIES))
    for proc in (np.zeros(0), np.ones(10)):
        assert compute_haaqi(proc, np.zeros(0), 16000, 16000, audiogram) == \
            clarity_compute_haaqi(proc, np.zeros(0), 16000, 16000, audiogram)


# ----------------------------------------------------------------------------------------------
# Batches

FS = 24000


def _pairs(count: int, seconds: float = 0.5):
    refs, procs = [], []
    for i in range(count):
        ref, proc = degrade(music(seconds, FS, 50 + i), FS, ("noise", "lowpass")[i % 2], i)
        refs.append(ref)
        procs.append(proc)
    return np.stack(refs), np.stack(procs)


def test_batch_float64_equals_haaqi_v1_with_the_same_noise():
    ref, proc = _pairs(1)
    levels = np.asarray([AUDIOGRAMS["sloping"]], dtype=float)
    key = jax.random.PRNGKey(3)
    batch = haaqi_batch(ref, proc, FS, levels, equalisation=1, key=key, dtype=jnp.float64)
    n = prepare_batch(ref, proc, FS, levels)[0][0].n
    with jax.enable_x64(True):
        noise = np.asarray(api.threshold_noise(jax.random.fold_in(key, 0), n, jnp.float64))
    single = haaqi_v1(ref[0], FS, proc[0], FS, Audiogram(levels[0]), 1,
                      reference_noise=noise[0], processed_noise=noise[1])
    flat = [single[0], single[1], single[2], *single[3]]
    np.testing.assert_allclose([float(getattr(batch, f)[0]) for f in FIELDS], flat, atol=1e-9)
    assert not bool(batch.nothing_audible[0])
    quiet = haaqi_batch(ref, proc, FS, levels, level1=0.0, key=key, dtype=jnp.float64)
    assert bool(quiet.nothing_audible[0]) and float(quiet.combined[0]) == pytest.approx(0.162)


def test_threshold_noise_is_standard_normal_independent_and_prefix_stable():
    """The counter-hash generator against scipy's normal law (KS), and for independence."""
    from scipy import stats
    key = jax.random.PRNGKey(7)
    noise = np.asarray(api.threshold_noise(key, 20_000)).reshape(64, -1)
    assert abs(noise.mean()) < 0.005 and abs(noise.std() - 1) < 0.005
    assert stats.kstest(noise.ravel(), "norm").pvalue > 1e-3
    corr = np.corrcoef(np.concatenate([noise[:, 1:], noise[:, :-1]], axis=0))  # rows, lag 1
    assert np.abs(corr - np.eye(128)).max() < 0.04                           # 4.5 sigma
    other = np.asarray(api.threshold_noise(jax.random.PRNGKey(8), 20_000)).reshape(64, -1)
    assert abs(np.corrcoef(noise.ravel(), other.ravel())[0, 1]) < 0.005
    np.testing.assert_array_equal(np.asarray(api.threshold_noise(key, 5_000)).reshape(64, -1),
                                  noise[:, :5_000])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_threshold_noise_uniforms_stay_inside_the_unit_interval(dtype):
    """The extreme hash outputs map strictly inside (0, 1), so no noise sample is infinite
    (a 24-bit grid rounded its top value to 1.0 in float32: ndtri(1) = inf)."""
    with jax.enable_x64(dtype == jnp.float64):
        bits = jnp.asarray([0, 1, 511, 512, 2**31, 2**32 - 513, 2**32 - 1], jnp.uint32)
        u = np.asarray(api.open_unit_uniform(bits, dtype), np.float64)
        assert np.all((u > 0) & (u < 1)) and u[0] == u[2] == 2.0**-24 and u[-1] == 1 - 2.0**-24
        assert np.all(np.diff(u) >= 0)
        # the whole generator on a stretch that holds such extremes: every sample finite
        noise = np.asarray(api.threshold_noise(jax.random.fold_in(jax.random.PRNGKey(0), 4),
                                               60_000, dtype))
        assert np.all(np.isfinite(noise)) and np.abs(noise).max() < 5.4


def test_batch_float32_close_to_float64_and_items_alone():
    ref, proc = _pairs(2)
    lengths = np.array([ref.shape[1], ref.shape[1] - 400])   # one length bucket
    levels = np.asarray([AUDIOGRAMS["sloping"], AUDIOGRAMS["normal"]], dtype=float)
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    r32 = haaqi_batch(ref, proc, FS, levels, lengths=lengths, key=keys, dtype=jnp.float32)
    r64 = haaqi_batch(ref, proc, FS, levels, lengths=lengths, key=keys, dtype=jnp.float64)
    for f in FIELDS:
        np.testing.assert_allclose(getattr(r32, f), getattr(r64, f), atol=2e-3, err_msg=f)
    for i in range(2):
        alone = haaqi_batch(ref[i:i + 1, :lengths[i]], proc[i:i + 1, :lengths[i]], FS,
                            levels[i:i + 1], key=keys[i:i + 1], dtype=jnp.float32)
        for f in FIELDS:
            np.testing.assert_allclose(getattr(alone, f)[0], getattr(r32, f)[i], atol=1e-5,
                                       err_msg=f"item {i} {f}")


def held_tone_pair(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A held 0.45 s harmonic note at 24 kHz (slow tremolo) and a noisy copy, with an audiogram:
    its low-band envelopes are so smooth and periodic that alignment lags nearly tie."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(0.45 * 24000)) / 24000
    f0, partials = rng.uniform(100, 400), int(rng.integers(1, 10))
    x = sum((0.5 / h) * np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 2 * np.pi))
            for h in range(1, partials + 1))
    x = 0.05 * x * (1 + 0.5 * np.sin(2 * np.pi * rng.uniform(1, 6) * t))
    y = x + rng.uniform(0.0005, 0.02) * rng.standard_normal(x.size)
    levels = np.clip(np.linspace(rng.uniform(0, 30), rng.uniform(0, 80), 8), 0, 120)
    return x, y, levels


@pytest.mark.parametrize("first_seed", [208, 368])
def test_batch_float32_keeps_float64_alignment_on_near_ties(first_seed):
    """Items whose float32 score was 1.7e-3 / 1.6e-3 off float64 (seeds 215 / 372) when an
    alignment lag flipped on a correlation tie closer than float32's FFT resolves; with the
    near-ties re-ranked the batch agrees to ~3e-6 (documented: 1e-4)."""
    pairs = [held_tone_pair(seed) for seed in range(first_seed, first_seed + 8)]
    ref, proc, levels = (np.stack(part) for part in zip(*pairs))
    r32 = haaqi_batch(ref, proc, 24000, levels, level1=83.9, dtype=jnp.float32)
    r64 = haaqi_batch(ref, proc, 24000, levels, level1=83.9, dtype=jnp.float64)
    for f in FIELDS:
        np.testing.assert_allclose(getattr(r32, f), getattr(r64, f), atol=1e-4, err_msg=f)


def test_batch_validation_names_the_item():
    ref, proc = _pairs(2)
    levels = np.zeros((2, 8))
    bad = ref.copy()
    bad[1, 100] = np.nan
    with pytest.raises(ValueError, match=r"item 1: .*non-finite"):
        haaqi_batch(bad, proc, FS, levels)
    silent = ref.copy()
    silent[0] = 0
    with pytest.raises(ValueError, match=r"item 0: .*silent"):
        haaqi_batch(silent, proc, FS, levels)
    with pytest.raises(ValueError, match=r"item 1: .*outside"):
        haaqi_batch(ref, proc, FS, np.array([[0] * 8, [0] * 7 + [200]]))
    with pytest.raises(ValueError, match="shape"):
        haaqi_batch(ref, proc[:, :-1], FS, levels)
    with pytest.raises(ValueError, match="audiogram_levels"):
        haaqi_batch(ref, proc, FS, np.zeros((3, 8)))
    short = np.zeros_like(ref)
    short[:, :200] = ref[:, :200]
    with pytest.raises(ValueError, match=r"item 0: .*16 ms"):
        haaqi_batch(short, proc, FS, levels)
    # prepare_batch reports per item instead of raising.
    prepared = prepare_batch(bad, proc, FS, levels)
    assert prepared[0][1] is None and prepared[0][0] is not None
    assert prepared[1][0] is None and prepared[1][1].startswith("item 1:")


def test_batch_argument_checks_name_the_argument():
    ref, proc = _pairs(2)
    levels = np.zeros((2, 8))
    rms = np.sqrt(np.mean(ref ** 2, axis=1, keepdims=True))
    # float32 overflowed to NaN at ~1e15 (345 dB SPL); now a named error, while 199 dB (just
    # under the limit) still scores finitely in float32.
    with pytest.raises(ValueError, match=r"item 0: reference plays at \d+ dB SPL .* above 200"):
        haaqi_batch(ref * 1e15, proc * 1e15, FS, levels)
    with pytest.raises(ValueError, match=r"item 1: reference plays at .* above 200"):
        haaqi_batch(ref, proc, FS, levels, level1=np.array([65.0, 250.0]))
    loud = 10 ** ((199 - 65) / 20) / rms
    assert np.all(np.isfinite(haaqi_batch(ref * loud, proc * loud, FS, levels).combined))
    with pytest.raises(ValueError, match=r"6 frequencies per item but audiogram_frequencies"):
        haaqi_batch(ref, proc, FS, levels[:, :6])
    with pytest.raises(ValueError, match="key must be a PRNG key"):
        haaqi_batch(ref, proc, FS, levels, key=5)
    with pytest.raises(ValueError, match="reference has no items"):
        haaqi_batch(ref[:0], proc[:0], FS, levels[:0])
    # A list of clips of several lengths: the fix is named, not numpy's "inhomogeneous shape".
    with pytest.raises(ValueError, match=r"reference: the items have different shapes .*"
                                         r"zero-pad .* lengths="):
        haaqi_batch([ref[0], ref[1, :-5]], [proc[0], proc[1, :-5]], FS, levels)
    with pytest.raises(ValueError, match="sample_rate must be a number"):
        haaqi_batch(ref, proc, None, levels)
    with pytest.raises(ValueError, match="chunk must be a positive"):
        haaqi_batch(ref, proc, FS, levels, chunk=0)
    with pytest.warns(UserWarning, match="integer samples"):
        prepare_batch((ref * 3000).astype(np.int16), proc, FS, levels)
    with pytest.raises(ValueError, match=r"reference has no samples \(shape \(2, 0\)\)"):
        haaqi_batch(ref[:, :0], proc[:, :0], FS, levels)        # was "outside [1, 0]"
    with pytest.raises(ValueError, match=r"processed must hold real samples, got dtype "
                                         r"complex128"):
        haaqi_batch(ref, proc + 0j, FS, levels)
    with pytest.raises(ValueError, match=r"3 audiograms for 2 items"):
        haaqi_batch(ref, proc, FS, [Audiogram(levels[0])] * 3)



def test_prepare_batch_under_jit_names_itself():
    """prepare_batch called inside jax.jit is refused under its own name (it said
    'haaqi_batch prepares its input ...', a function the caller never called)."""
    ref, proc = _pairs(2)
    levels = np.zeros((2, 8))
    with pytest.raises(TypeError, match=r"^prepare_batch prepares its input on the host"):
        jax.jit(lambda r: prepare_batch(r, r, FS, levels)[0][1])(ref)
    with pytest.raises(TypeError, match=r"^haaqi_batch prepares its input on the host"):
        jax.jit(lambda r: haaqi_batch(r, r, FS, levels).combined)(ref)

def test_batch_takes_audiogram_objects():
    """B Audiogram objects (ours or pyclarity's, any frequencies) score as their levels and
    frequencies given as arrays."""
    ref, proc = _pairs(2)
    levels = np.asarray([AUDIOGRAMS["sloping"], AUDIOGRAMS["flat60"]], dtype=float)
    freqs = np.asarray(STANDARD_FREQUENCIES)
    plain = haaqi_batch(ref, proc, FS, levels, key=jax.random.PRNGKey(1))
    objects = [Audiogram(levels[0]), ClarityAudiogram(levels=levels[1], frequencies=freqs)]
    got = haaqi_batch(ref, proc, FS, objects, key=jax.random.PRNGKey(1))
    np.testing.assert_array_equal(got.combined, plain.combined)
    six = [0, 1, 2, 3, 5, 6]                                  # 250..6000 Hz, HAAQI's own
    sparse = [Audiogram(levels[i][six], freqs[six]) for i in range(2)]
    np.testing.assert_allclose(haaqi_batch(ref, proc, FS, sparse,
                                           key=jax.random.PRNGKey(1)).combined,
                               plain.combined, atol=1e-6)


def test_batch_refuses_one_audiogram_object_by_name():
    """One Audiogram for a batch (haaqi_batch takes B of them) is refused naming
    audiogram_levels; it failed with numpy's "float() argument must be ... not 'Audiogram'"."""
    ref, proc = _pairs(2)
    for one in (Audiogram(AUDIOGRAMS["sloping"]),
                ClarityAudiogram(levels=np.asarray(AUDIOGRAMS["sloping"], float),
                                 frequencies=np.asarray(STANDARD_FREQUENCIES))):
        with pytest.raises(ValueError, match=r"audiogram_levels: one Audiogram for 2 items"):
            haaqi_batch(ref, proc, FS, one)
        with pytest.raises(ValueError, match=r"audiogram_levels: one Audiogram for 2 items"):
            prepare_batch(ref, proc, FS, one)


def test_haaqi_v1_argument_checks():
    ref, proc = _pairs(1)
    with pytest.raises(ValueError, match="level1 must be one number"):
        haaqi_v1(ref[0], FS, proc[0], FS, np.zeros(8), 1, level1=np.array([65.0, 70.0]))
    with pytest.raises(ValueError, match="at least 1000 Hz"):
        haaqi_v1(ref[0], 500, proc[0], FS, np.zeros(8), 1)
    # float32 scored level1 -1000 at 0.162 (pyclarity: 0.178), and +425 on samples of ~1e-18
    # 5e-2 off; both are outside any real scale, so refused by name.
    for level1 in (-1000.0, 425.0):
        with pytest.raises(ValueError, match=r"level1 must be within \[-300, 300\] dB SPL"):
            haaqi_v1(ref[0], FS, proc[0], FS, np.zeros(8), 1, level1=level1)
    with pytest.raises(ValueError, match=r"item 1: level1 must be within"):
        haaqi_batch(ref.repeat(2, 0), proc.repeat(2, 0), FS, np.zeros((2, 8)),
                    level1=np.array([65.0, 301.0]))
    # a processed signal under 16 ms: the message no longer blames the reference alone
    with pytest.raises(ValueError, match=r"only \d+ samples .* cut to the shorter one"):
        haaqi_v1(ref[0], FS, proc[0][:300], FS, np.zeros(8), 1)
    for name in ("add_noise", "silence_threshold"):
        with pytest.raises(ValueError, match=f"{name} must be a finite number"):
            haaqi_v1(ref[0], FS, proc[0], FS, np.zeros(8), 1, **{name: np.nan})
    # pyclarity takes a size-1 level1 array; so do we, with the same result as the scalar.
    n = prepare_batch(ref, proc, FS, np.zeros((1, 8)))[0][0].n
    noise = np.random.default_rng(0).standard_normal((2, 32, n))
    results = []
    for level1 in (np.array([70.0]), 70.0):
        np.random.seed(0)                                  # the envelope noise
        results.append(haaqi_v1(ref[0], FS, proc[0], FS, np.zeros(8), 1, level1=level1,
                                reference_noise=noise[0], processed_noise=noise[1]))
    as_array, as_float = results
    assert as_array[0] == as_float[0]
    # a 0-d numpy rate, which pyclarity takes, is the same rate (it was refused as not a number)
    np.random.seed(0)
    zero_d = haaqi_v1(ref[0], np.array(float(FS)), proc[0], np.array(FS), np.zeros(8), 1,
                      level1=70.0, reference_noise=noise[0], processed_noise=noise[1])
    assert zero_d[0] == as_float[0]
    with pytest.raises(ValueError, match=r"reference must hold real samples"):  # was cast
        haaqi_v1(ref[0] + 1j, FS, proc[0], FS, np.zeros(8), 1)


def test_prepare_batch_threads_equal_serial_and_keep_item_order():
    ref, proc = _pairs(4)
    levels = np.zeros((4, 8))
    ref[2, 50] = np.inf
    serial = prepare_batch(ref, proc, FS, levels, workers=1)
    threaded = prepare_batch(ref, proc, FS, levels, workers=3)
    assert [err for _, err in threaded] == [err for _, err in serial]
    assert threaded[2][0] is None and threaded[2][1].startswith("item 2:")
    for (a, _), (b, _) in zip(serial, threaded):
        if a is not None:
            np.testing.assert_array_equal(a.reference_24k, b.reference_24k)
            np.testing.assert_array_equal(a.processed_24k, b.processed_24k)
            assert (a.lag, a.trim_start, a.trim_stop) == (b.lag, b.trim_start, b.trim_stop)


def test_all_bands_in_one_step_equal_groups_of_eight():
    """The accelerator default (32 bands per step) computes what the CPU default (8) does."""
    ref, proc = _pairs(2)
    pairs = [p for p, _ in prepare_batch(ref, proc, FS, np.asarray(
        [AUDIOGRAMS["sloping"], AUDIOGRAMS["normal"]], dtype=float))]
    key = jax.random.PRNGKey(5)
    groups = api.score_prepared(pairs, key=key, bands_per_step=8, dtype=jnp.float64)
    whole = api.score_prepared(pairs, key=key, bands_per_step=32, dtype=jnp.float64)
    for f in FIELDS:
        np.testing.assert_allclose(getattr(whole, f), getattr(groups, f), atol=1e-10, err_msg=f)


class _FakeDevice:
    def __init__(self, platform, limit=None):
        self.platform, self._limit = platform, limit

    def memory_stats(self):
        if self._limit == "raises":
            raise NotImplementedError("no memory statistics on this backend")
        return None if self._limit is None else {"bytes_limit": self._limit}


def test_default_chunking_cpu_budget_and_accelerator_memory():
    n = 245_760                                         # a ten-second clip's buffer
    cpu = _FakeDevice("cpu")
    assert api.default_chunking(n, [cpu]) == (1, 8)
    assert api.default_chunking(73_728, [cpu]) == (5, 8)                  # 3 s buffers
    assert api.default_chunking(73_728, [cpu], np.float64) == (3, 8)
    assert api.default_chunking(10 * n, [cpu]) == (1, 8)                  # never 0 items
    item = api.ACCELERATOR_BYTES_PER_SAMPLE * n
    limit = int(40 * item / api.ACCELERATOR_MEMORY_SHARE) + 1        # room for 40 items
    gpu = _FakeDevice("gpu", limit)
    assert api.default_chunking(n, [gpu]) == (40, 32)
    assert api.default_chunking(n, [gpu], np.float64) == (20, 32)
    # Per device, by the smallest limit; a device that reports no limit falls back to the CPU rule.
    assert api.default_chunking(n, [gpu, _FakeDevice("gpu", limit // 2)]) == (2 * 20, 32)
    assert api.default_chunking(73_728, [gpu, _FakeDevice("tpu")]) == (5, 8)
    assert api.default_chunking(73_728, [_FakeDevice("gpu", "raises")]) == (5, 8)
    with pytest.raises(ValueError, match="dtype must be float32 or float64, got float16"):
        api.default_chunking(n, [cpu], np.float16)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_default_cpu_chunk_scratch_stays_below_the_kept_heap_threshold(dtype):
    """XLA's own accounting of the compiled scorer's scratch: a default CPU chunk fits under
    keep_freed_memory's threshold (its pages are reused, not faulted afresh on every call), and
    the per-sample constant the rule uses is within 1 % of what XLA reports."""
    from haaqi_jax import host_memory
    length = 24_576                                      # a 1 s buffer: many items per chunk
    chunk, bands = api.default_chunking(length, [_FakeDevice("cpu")], dtype)
    assert chunk > 1
    clip = harmonic_music(1.0, 24000, 0, harmonics=3)[None]
    pairs = [pair for pair, _ in api.prepare_batch(clip, clip, 24000, np.full((1, 8), 30.0))]
    assert api.bucket_length(pairs[0].n) == length
    with jax.enable_x64(dtype == np.float64):
        pad = lambda x: np.tile(api._pad(x, length, dtype), (chunk, 1))
        compiled = api._batch_core.lower(
            reference=pad(pairs[0].reference_24k), processed=pad(pairs[0].processed_24k),
            n=np.full(chunk, pairs[0].n, np.int32),
            params=jax.tree.map(
                lambda v: np.tile(np.asarray(v, dtype), (chunk,) + (1,) * np.ndim(v)),
                pairs[0].params),
            level1=np.full(chunk, pairs[0].level1, dtype), keys=api._item_keys(None, chunk),
            silence_threshold=dtype(2.5), segment_covariance=16, bands_per_step=bands).compile()
    scratch = compiled.memory_analysis().temp_size_in_bytes
    assert scratch <= api.CPU_CHUNK_BYTES < host_memory.DEFAULT_THRESHOLD_BYTES
    per_sample = api.CPU_SCRATCH_BYTES_PER_SAMPLE[np.dtype(dtype).itemsize]
    assert abs(scratch / (chunk * length) - per_sample) < 0.01 * per_sample


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), gain_db=st.floats(-40, 20),
       level=st.floats(-10, 110), delay=st.integers(0, 600), equalisation=st.sampled_from([1, 2]))
def test_batch_never_nan(seed, gain_db, level, delay, equalisation):
    rng = np.random.default_rng(seed)
    ref = music(0.5, FS, seed) * 10 ** rng.uniform(-3, 1)
    proc = 10 ** (gain_db / 20) * np.roll(ref, delay) + 1e-3 * rng.standard_normal(ref.size)
    levels = np.clip(level + rng.normal(0, 15, 8), -20, 130)[None]
    result = haaqi_batch(ref[None], proc[None], FS, levels, equalisation=equalisation,
                         key=jax.random.split(jax.random.PRNGKey(seed), 1))
    for f in FIELDS:
        value = float(getattr(result, f)[0])
        assert np.isfinite(value) and -1e-6 <= value <= 1 + 1e-6, (f, value)


def test_score_cli_matches_pyclarity(tmp_path, capsys):
    import soundfile as sf
    from haaqi_jax import cli

    ref, proc = degrade(music(0.5, 16000, 5), 16000, "noise", 5)
    sf.write(tmp_path / "ref.wav", ref, 16000, subtype="DOUBLE")
    sf.write(tmp_path / "proc.wav", proc, 16000, subtype="DOUBLE")
    levels = AUDIOGRAMS["sloping"]
    code = cli.main(["score", str(tmp_path / "ref.wav"), str(tmp_path / "proc.wav"),
                     "--audiogram", ",".join(map(str, levels)), "--seed", "4", "--json"])
    assert code == 0
    scores = json.loads(capsys.readouterr().out)
    np.random.seed(4)
    expected = clarity_haaqi_v1(ref, 16000, proc, 16000,
                                ClarityAudiogram(np.asarray(levels, float), STANDARD_FREQUENCIES),
                                1, 65.0)
    assert scores["combined"] == pytest.approx(expected[0], abs=1e-6)
    assert scores["audible"] is True and "warning" not in capsys.readouterr().err
    # Played far below the listener's threshold, every processing scores pyclarity's 0.162:
    # flagged, since such a score says nothing about the processing.
    for processed in ("proc.wav", "ref.wav"):
        assert cli.main(["score", str(tmp_path / "ref.wav"), str(tmp_path / processed),
                         "--audiogram", ",".join(map(str, levels)), "--level1", "0",
                         "--json"]) == 0
        captured = capsys.readouterr()
        quiet = json.loads(captured.out)
        assert quiet["audible"] is False and "below the listener's threshold" in captured.err
        np.random.seed(0)
        expected = clarity_haaqi_v1(ref, 16000, ref if processed == "ref.wav" else proc, 16000,
                                    ClarityAudiogram(np.asarray(levels, float),
                                                     STANDARD_FREQUENCIES), 1, 0.0)
        assert quiet["combined"] == pytest.approx(expected[0], abs=1e-6)
        assert quiet["combined"] == pytest.approx(0.162, abs=1e-12)
    assert cli.main(["score", str(tmp_path / "missing.wav"), str(tmp_path / "proc.wav"),
                     "--audiogram", "0,0,0,0,0,0,0,0"]) == 2
    assert "missing.wav does not exist" in capsys.readouterr().err
    assert cli.main(["score", str(tmp_path), str(tmp_path / "proc.wav"),
                     "--audiogram", "0,0,0,0,0,0,0,0"]) == 2
    assert "is a folder, not a file" in capsys.readouterr().err
    # Files of other durations: scored as pyclarity does (the first 0.3 s), with a warning.
    sf.write(tmp_path / "short.wav", proc[:4800], 16000, subtype="DOUBLE")
    assert cli.main(["score", str(tmp_path / "ref.wav"), str(tmp_path / "short.wav"),
                     "--audiogram", ",".join(map(str, levels)), "--json"]) == 0
    captured = capsys.readouterr()
    assert "lasts 0.500 s" in captured.err and "first 0.300 s of each" in captured.err
    np.random.seed(0)
    expected = clarity_haaqi_v1(ref, 16000, proc[:4800], 16000,
                                ClarityAudiogram(np.asarray(levels, float), STANDARD_FREQUENCIES),
                                1, 65.0)
    assert json.loads(captured.out)["combined"] == pytest.approx(expected[0], abs=1e-6)
    # A metric error names the files (here non-finite processed samples).
    bad = proc.copy()
    bad[100] = np.nan
    sf.write(tmp_path / "nan.wav", bad, 16000, subtype="DOUBLE")
    assert cli.main(["score", str(tmp_path / "ref.wav"), str(tmp_path / "nan.wav"),
                     "--audiogram", ",".join(map(str, levels))]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'ref.wav'} / {tmp_path / 'nan.wav'}: processed has non-finite" in err


_TWO_DEVICE_SCRIPT = """
import json, sys
import jax, numpy as np
sys.path.insert(0, sys.argv[1])
from test_haaqi_api import _pairs
from haaqi_jax.haaqi.api import haaqi_batch
assert jax.local_device_count() == 2
ref, proc = _pairs(3)
levels = np.zeros((3, 8))
keys = jax.random.split(jax.random.PRNGKey(1), 3)
batch = haaqi_batch(ref, proc, 24000, levels, key=keys, chunk=2)   # 2 chunks, last padded
alone = haaqi_batch(ref[2:], proc[2:], 24000, levels[2:], key=keys[2:], chunk=2)
print(json.dumps([batch.combined.tolist(), alone.combined.tolist()]))
"""


def test_batch_data_parallel_over_two_devices():
    """Chunks split over a 2-device 'data' mesh, odd batches padded and the dummies dropped."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=os.pathsep.join([str(here.parent), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", _TWO_DEVICE_SCRIPT, str(here)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    batch, alone = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(batch) == 3 and np.all(np.isfinite(batch))
    assert alone[0] == pytest.approx(batch[2], abs=1e-5)
