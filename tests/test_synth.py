"""Synthesized music: determinism, every style, Karplus-Strong tuning, the mastering limiter."""

import numpy as np
import pytest

from haaqi_jax.data import synth

SR = synth.SAMPLE_RATE


def test_same_seed_same_audio_other_seed_differs():
    a, info_a = synth.synthesize_piece(np.random.default_rng(7), 2.0)
    b, info_b = synth.synthesize_piece(np.random.default_rng(7), 2.0)
    c, _ = synth.synthesize_piece(np.random.default_rng(8), 2.0)
    assert a.tobytes() == b.tobytes() and info_a == info_b
    assert a.shape == c.shape and not np.allclose(a, c)


@pytest.mark.parametrize("style", sorted(synth.STYLES))
def test_every_style_renders_a_mastered_clip(style):
    x, info = synth.synthesize_piece(np.random.default_rng(3), 2.5, style=style)
    assert x.shape == (int(2.5 * SR),) and x.dtype == np.float32
    assert np.all(np.isfinite(x))
    rms = np.sqrt(np.mean(x.astype(np.float64) ** 2))
    np.testing.assert_allclose(rms, synth.PIECE_RMS, rtol=1e-4)
    crest_db = 20 * np.log10(np.max(np.abs(x)) / rms)
    assert crest_db <= synth.CREST_DB[1] + 0.5
    assert info["style"] == style
    # Music, not silence or a single tone: energy spread over low, mid and high octaves.
    spec = np.abs(np.fft.rfft(x)) ** 2
    f = np.fft.rfftfreq(x.size, 1 / SR)
    for lo, hi in ((50, 400), (400, 2000), (2000, 8000)):
        share = spec[(f >= lo) & (f < hi)].sum() / spec.sum()
        assert share > 1e-4, (style, lo, hi, share)


@pytest.mark.parametrize("sample_rate", [16000, 17000])
def test_every_style_renders_at_low_rates(sample_rate):
    # The snare's band-pass reached 9 kHz, above Nyquist below 18 kHz (scipy raised).
    for style in sorted(synth.STYLES):
        x, _ = synth.synthesize_piece(np.random.default_rng(0), 1.0, style=style,
                                      sample_rate=sample_rate)
        assert x.shape == (sample_rate,) and np.all(np.isfinite(x)), style


@pytest.mark.parametrize("freq", [41.2, 110.0, 261.6, 440.0, 1318.5])
def test_karplus_strong_is_in_tune(freq):
    y = synth._karplus_strong(freq, SR, SR, 0.8, 1.5, np.random.default_rng(0))
    seg = y[2400:2400 + 16384] * np.hanning(16384)
    spec = np.abs(np.fft.rfft(seg, 1 << 20))
    f = np.fft.rfftfreq(1 << 20, 1 / SR)
    band = (f > 0.8 * freq) & (f < 1.2 * freq)
    measured = f[band][np.argmax(spec[band])]
    assert abs(1200 * np.log2(measured / freq)) < 3.0  # cents
    assert np.max(np.abs(y[-2400:])) < 1e-2 * np.max(np.abs(y))  # it decays


def test_peak_limit_holds_the_ceiling_and_spares_quiet_signals():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(SR) * np.where(np.arange(SR) % 4000 < 200, 8.0, 1.0)
    y = synth.peak_limit(x, 2.0, SR)
    assert np.max(np.abs(y)) <= 2.0 + 1e-12
    quiet = 0.1 * np.sin(np.arange(SR) / 10)
    np.testing.assert_array_equal(synth.peak_limit(quiet, 2.0, SR), quiet)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="style"):
        synth.synthesize_piece(np.random.default_rng(0), 1.0, style="polka")
    with pytest.raises(ValueError, match="seconds"):
        synth.synthesize_piece(np.random.default_rng(0), 0.0)
