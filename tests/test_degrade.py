"""Each degradation does what it says, measured independently (Welch PSD, energies, levels)."""

import numpy as np
import pytest
import scipy.signal

from haaqi_jax.data import degrade as D
from haaqi_jax.data import synth

SR = 24_000


def _white(seed=0, seconds=4.0):
    return np.random.default_rng(seed).standard_normal(int(seconds * SR))


def _psd(x):
    f, p = scipy.signal.welch(x, fs=SR, nperseg=4096)
    return f, p


@pytest.fixture(scope="module")
def music():
    x, _ = synth.synthesize_piece(np.random.default_rng(11), 3.0)
    return x.astype(np.float64)


def test_lowpass_removes_energy_above_cutoff():
    x = _white()
    y = D.lowpass(x, SR, 1000.0)
    f, px = _psd(x)
    _, py = _psd(y)
    ratio_db = 10 * np.log10(py / px)
    assert np.all(ratio_db[f >= 2000] < -40)
    assert np.all(np.abs(ratio_db[(f > 50) & (f <= 500)]) < 1.0)


def test_highpass_removes_energy_below_cutoff():
    x = _white(1)
    y = D.highpass(x, SR, 2000.0)
    f, px = _psd(x)
    _, py = _psd(y)
    ratio_db = 10 * np.log10(py / px)
    assert np.all(ratio_db[(f > 0) & (f <= 1000)] < -40)
    assert np.all(np.abs(ratio_db[(f >= 4000) & (f < 11000)]) < 1.0)


@pytest.mark.parametrize("slope", [-6.0, -2.5, 3.0, 8.0])
def test_tilt_changes_the_slope_by_the_requested_db_per_octave(slope):
    x = _white(2)
    y = D.spectral_tilt(x, SR, slope)
    f, px = _psd(x)
    _, py = _psd(y)
    band = (f >= 200) & (f <= 8000)
    fitted = np.polyfit(np.log2(f[band]), 10 * np.log10(py[band] / px[band]), 1)[0]
    assert abs(fitted - slope) < 0.1


@pytest.mark.parametrize("freqs,gains,qs", [([1500.0], [12.0], [4.0]),
                                            ([400.0, 3000.0], [9.0, 15.0], [3.0, 6.0])])
def test_resonance_adds_a_peak_at_its_frequency(freqs, gains, qs):
    x = _white(3)
    y = D.resonances(x, SR, freqs, gains, qs)
    f, px = _psd(x)
    _, py = _psd(y)
    ratio_db = 10 * np.log10(py / px)
    for freq, gain in zip(freqs, gains):
        near = (f > freq / 1.5) & (f < freq * 1.5)
        peak_f = f[near][np.argmax(ratio_db[near])]
        assert abs(np.log2(peak_f / freq)) < 0.05
        assert abs(ratio_db[near].max() - gain) < 1.5
    far = (f > 6000) & (f < 11000)
    assert np.all(np.abs(ratio_db[far]) < 1.5)


def test_compression_reduces_level_changes_by_its_ratio():
    # A 1 kHz tone stepping between -30 and -10 dBFS: above a -40 dB threshold a 4:1
    # compressor turns the 20 dB step into 5 dB.
    t = np.arange(4 * SR) / SR
    level = np.where((t % 1.0) < 0.5, 10 ** (-30 / 20), 10 ** (-10 / 20))
    x = np.sqrt(2) * level * np.sin(2 * np.pi * 1000 * t)
    y = D.compress(x, SR, threshold_db=-40.0, ratio=4.0, attack_ms=5.0, release_ms=50.0)
    def steady_db(sig, start):
        seg = sig[int((start + 0.3) * SR):int((start + 0.45) * SR)]
        return 20 * np.log10(np.sqrt(np.mean(seg ** 2)))
    step = steady_db(y, 2.5) - steady_db(y, 2.0)
    assert abs(step - 5.0) < 0.5
    np.testing.assert_allclose(steady_db(y, 2.0), -40 + 10 / 4, atol=0.5)


def test_compression_reduces_crest_factor_and_dynamic_range(music):
    y = D.compress(music, SR, 20 * np.log10(D.rms(music)) - 10, 8.0, 2.0, 100.0)
    def crest(s):
        return np.max(np.abs(s)) / D.rms(s)
    def frame_level_sd(s):
        frames = s[: s.size // 240 * 240].reshape(-1, 240)
        lv = 10 * np.log10(np.mean(frames ** 2, axis=1) + 1e-12)
        return np.std(lv[lv > lv.max() - 60])
    assert crest(y) < crest(music)
    assert frame_level_sd(y) < 0.7 * frame_level_sd(music)


def test_babble_has_the_requested_snr(music):
    noisy, noise = D.add_babble(music, np.random.default_rng(4), SR, 3.5, n_talkers=5)
    snr = 10 * np.log10(np.sum(music ** 2) / np.sum(noise.astype(np.float64) ** 2))
    assert abs(snr - 3.5) < 1e-3
    np.testing.assert_allclose(noisy - music, noise, atol=1e-6)


def test_babble_is_speech_like():
    talker = D.synthesize_talker(np.random.default_rng(5), 6 * SR, SR)
    f, p = _psd(talker)
    # Speech energy sits below 4 kHz ...
    assert p[f < 4000].sum() > 0.9 * p.sum()
    # ... and its envelope is modulated at syllable rates (2-10 Hz).
    env = np.abs(scipy.signal.hilbert(talker))
    env = scipy.signal.decimate(scipy.signal.decimate(env, 10), 24)  # 100 Hz
    fm, pm = scipy.signal.welch(env - env.mean(), fs=100, nperseg=256)
    syllabic = pm[(fm >= 2) & (fm <= 8)].sum() / pm[fm > 0.3].sum()
    assert syllabic > 0.5
    babble = D.synthesize_babble(np.random.default_rng(6), 2 * SR, SR, n_talkers=6)
    np.testing.assert_allclose(D.rms(babble), 1.0, rtol=1e-6)


def test_spectral_subtraction_removes_noise_energy(music):
    rng = np.random.default_rng(7)
    noise = D.coloured_noise(rng, music.size, SR, -3.0) * 0.05
    # Noise alone: almost all of it goes (what stays is musical noise).
    out = D.spectral_subtraction(noise, noise, SR, over_subtraction=3.0, floor=0.002)
    assert np.sum(out ** 2) < 0.05 * np.sum(noise ** 2)
    # Music + noise: the output is closer to the clean music than the noisy input is.
    processed, added = D.noise_then_subtract(music, rng, SR, 5.0, 2.0, 0.01, -3.0)
    assert np.sum((processed - music) ** 2) < 0.5 * np.sum(added.astype(np.float64) ** 2)
    # Musical noise: the residual of noise alone is sparse in time-frequency.
    _, _, z = scipy.signal.stft(out, fs=SR, nperseg=512)
    mag = np.abs(z).ravel() ** 2
    assert np.mean(mag > 0.1 * mag.max()) < 0.05


def test_degrade_matches_loudness_and_records_params(music):
    for name in D.SEEN_DISTORTIONS + D.UNSEEN_DISTORTIONS:
        result = D.degrade(music, SR, name, np.random.default_rng(8))
        assert result.processed.shape == music.shape and result.processed.dtype == np.float32
        np.testing.assert_allclose(D.rms(result.processed), D.rms(music), rtol=1e-4)
        assert set(result.params) == set(D.split_distortion(name))
        noisy = {"babble", "spectral_subtraction"} & set(D.split_distortion(name))
        assert (result.noise is not None) == bool(noisy)
    clean = D.degrade(music, SR, "clean", np.random.default_rng(0))
    np.testing.assert_allclose(clean.processed, music, atol=1e-6)
    again = D.degrade(music, SR, "babble+compression", np.random.default_rng(9))
    same = D.degrade(music, SR, "babble+compression", np.random.default_rng(9))
    assert again.processed.tobytes() == same.processed.tobytes() and again.params == same.params


def test_explicit_params_are_applied():
    x = _white(10, 2.0)
    out = D.degrade(x, SR, "lowpass", np.random.default_rng(0),
                    params={"lowpass": {"cutoff_hz": 800.0}})
    f, px = _psd(x)
    _, py = _psd(out.processed.astype(np.float64))
    assert np.all(10 * np.log10(py / px)[f >= 1600] < -30)


def test_seen_and_unseen_sets():
    assert not set(D.SEEN_DISTORTIONS) & set(D.UNSEEN_DISTORTIONS)
    seen_stages = {s for name in D.SEEN_DISTORTIONS for s in D.split_distortion(name)}
    unseen_stages = {s for name in D.UNSEEN_DISTORTIONS for s in D.split_distortion(name)}
    assert {"tilt_down", "multi_resonance"} <= unseen_stages - seen_stages
    assert seen_stages | unseen_stages == set(D.SINGLE_DISTORTIONS)
    assert "clean" in D.SEEN_DISTORTIONS


def test_bad_inputs_raise_named_errors():
    x = _white(0, 0.5)
    with pytest.raises(ValueError, match="unknown distortion 'reverb'"):
        D.degrade(x, SR, "lowpass+reverb", np.random.default_rng(0))
    with pytest.raises(ValueError, match="lowpass: cut-off"):
        D.lowpass(x, SR, 20000.0)
    with pytest.raises(ValueError, match="silent"):
        D.mix_at_snr(np.zeros(10), np.ones(10), 0.0)
    with pytest.raises(ValueError, match="ratio"):
        D.compress(x, SR, -20.0, 0.5, 5.0, 50.0)


@pytest.mark.parametrize("stage, params, message", [
    ("babble", {"snr_db": np.nan, "n_talkers": 4}, r"babble: snr_db = nan must be finite"),
    ("babble", {"snr_db": -np.inf, "n_talkers": 4}, r"babble: snr_db = -inf must be finite"),
    ("compression", {"threshold_db_re_rms": -10.0, "ratio": np.nan, "attack_ms": 5.0,
                     "release_ms": 50.0}, r"compression: ratio = nan must be finite"),
    ("compression", {"threshold_db_re_rms": -10.0, "ratio": 4.0, "attack_ms": 0.0,
                     "release_ms": 50.0}, r"compression: attack_ms = 0.0 must be > 0"),
    ("spectral_subtraction", {"snr_db": 5.0, "over_subtraction": np.nan, "floor": 0.01,
                              "noise_slope_db_per_octave": -3.0},
     r"spectral_subtraction: over_subtraction = nan must be > 0"),
    ("spectral_subtraction", {"snr_db": 5.0, "over_subtraction": 0.0, "floor": 0.01,
                              "noise_slope_db_per_octave": -3.0},
     r"spectral_subtraction: over_subtraction = 0.0 must be > 0"),
    ("spectral_subtraction", {"snr_db": 5.0, "over_subtraction": 2.0, "floor": 1.0,
                              "noise_slope_db_per_octave": -3.0},
     r"spectral_subtraction: floor = 1.0 must be < 1"),
    ("compression", {"threshold_db_re_rms": -10.0, "ratio": 0.5, "attack_ms": 5.0,
                     "release_ms": 50.0}, r"compression: ratio = 0.5 must be >= 1"),
    ("resonance", {"freqs_hz": [1000.0], "gains_db": [6.0], "qs": [0.0]},
     r"resonance: qs = \[0.0\] must be > 0"),
    ("tilt_down", {"db_per_octave": np.nan}, r"tilt_down: db_per_octave = nan must be finite"),
    ("resonance", {"freqs_hz": [1000.0], "gains_db": [np.nan], "qs": [2.0]},
     r"resonance: gains_db = \[nan\] must be finite"),
    ("multi_resonance", {"freqs_hz": [1000.0, 2000.0], "gains_db": [6.0], "qs": [2.0, 2.0]},
     r"one entry per resonance, got lengths \[2, 1, 2\]"),
    ("lowpass", {}, r"lowpass: parameters \['cutoff_hz'\] expected; missing \['cutoff_hz'\]"),
    ("lowpass", {"cutoff_hz": 800.0, "order": 4}, r"unknown \['order'\]"),
])
def test_bad_stage_parameters_are_named_not_nan(music, stage, params, message):
    # Each of these returned NaN samples or failed deep inside numpy / scipy.
    with pytest.raises(ValueError, match=message):
        D.degrade(music, SR, stage, np.random.default_rng(0), params={stage: params})


def test_boundary_parameters_that_work_are_accepted(music):
    """floor 0 (no spectral floor) is a valid setting: refusing it would be a false alarm."""
    out = D.degrade(music, SR, "spectral_subtraction", np.random.default_rng(0), params={
        "spectral_subtraction": {"snr_db": 5.0, "over_subtraction": 2.0, "floor": 0.0,
                                 "noise_slope_db_per_octave": -3.0}})
    assert np.all(np.isfinite(out.processed)) and out.params["spectral_subtraction"]["floor"] == 0


def test_recorded_parameters_are_the_applied_ones(music):
    # Frequencies above 0.45 x the rate are capped, and the record says so.
    at_16k = D.degrade(music, 16000, "lowpass+resonance", np.random.default_rng(0), params={
        "lowpass": {"cutoff_hz": 7900.0},
        "resonance": {"freqs_hz": [7500.0], "gains_db": [12.0], "qs": [4.0]}})
    assert at_16k.params == {"lowpass": {"cutoff_hz": 7200.0},
                             "resonance": {"freqs_hz": [7200.0], "gains_db": [12.0],
                                           "qs": [4.0]}}
    with pytest.raises(ValueError, match="reference must be .* with NaN or inf"):
        D.degrade(np.full(4000, np.nan), SR, "clean", np.random.default_rng(0))
