"""load_audio against exact band-limited signals and scipy's polyphase resampler; every error."""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf
from scipy import signal

from haaqi_jax.data.audio import (MIN_SAMPLES, audio_num_samples, check_waveform, load_audio,
                                  resampled_length)

DURATION = 0.4


def _tones(t, channel=0):
    """In-band for every rate tested (< 4 kHz, the Nyquist of 8 kHz)."""
    return (0.3 * np.sin(2 * np.pi * 440 * t + channel)
            + 0.2 * np.sin(2 * np.pi * (1500 + 700 * channel) * t + 1.0))


@pytest.mark.parametrize("fmt", ["wav", "flac"])
@pytest.mark.parametrize("rate", [8000, 16000, 44100, 48000])
@pytest.mark.parametrize("channels", [1, 2])
def test_load_audio_resamples_to_exact_values(tmp_path, fmt, rate, channels):
    n = int(DURATION * rate) + 7
    t = np.arange(n) / rate
    data = np.stack([_tones(t, c) for c in range(channels)], axis=1)
    path = tmp_path / f"x.{fmt}"
    subtype = "FLOAT" if fmt == "wav" else "PCM_24"
    sf.write(path, data, rate, subtype=subtype)
    stored = sf.read(path, dtype="float64", always_2d=True)[0].mean(axis=1)

    out = load_audio(path, 16000)
    assert out.dtype == np.float32 and out.ndim == 1
    expected_len = round(n * 16000 / rate)
    assert out.shape[0] == expected_len == resampled_length(n, rate, 16000)
    assert audio_num_samples(path, 16000) == expected_len

    # 1) the exact continuous signal at the new sample times (interior: edges see the onset)
    t16 = np.arange(expected_len) / 16000
    exact = np.mean([_tones(t16, c) for c in range(channels)], axis=0)
    interior = slice(800, expected_len - 800)
    quantisation = 1e-6 if fmt == "wav" else 2e-6  # 24-bit FLAC
    if rate == 16000:
        np.testing.assert_array_equal(out, stored.astype(np.float32))
    np.testing.assert_allclose(out[interior], exact[interior], atol=1e-5 + quantisation)
    # 2) an independent resampler (scipy polyphase, long Kaiser filter) on the stored samples
    if rate != 16000:
        g = math.gcd(rate, 16000)
        reference = signal.resample_poly(stored, 16000 // g, rate // g,
                                         window=("kaiser", 12.0))
        np.testing.assert_allclose(out[interior], reference[:expected_len][interior], atol=1e-4)


def test_int16_wav_scaled_and_other_target_rate(tmp_path):
    x = (np.arange(4000) % 200 - 100).astype(np.int16) * 100
    sf.write(tmp_path / "a.wav", x, 16000, subtype="PCM_16")
    np.testing.assert_array_equal(load_audio(tmp_path / "a.wav"), x.astype(np.float32) / 32768)
    t = np.arange(4410) / 44100
    sf.write(tmp_path / "b.wav", _tones(t), 44100, subtype="FLOAT")
    out = load_audio(tmp_path / "b.wav", sample_rate=22050)
    assert out.shape == (2205,)
    exact = _tones(np.arange(2205) / 22050)
    np.testing.assert_allclose(out[300:-300], exact[300:-300], atol=1e-5)


def test_load_audio_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        load_audio(tmp_path / "missing.wav")
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        audio_num_samples(tmp_path / "missing.wav")

    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF" + bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="junk.wav.*not readable audio"):
        load_audio(junk)

    truncated = tmp_path / "truncated.flac"
    sf.write(truncated, np.sin(np.arange(48000) / 10), 16000)
    raw = truncated.read_bytes()
    truncated.write_bytes(raw[:len(raw) // 2])
    with pytest.raises(ValueError, match="truncated.flac"):
        load_audio(truncated)

    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0), 16000)
    with pytest.raises(ValueError, match="empty.wav.*empty"):
        load_audio(empty)
    with pytest.raises(ValueError, match="empty.wav.*empty"):
        audio_num_samples(empty)

    for bad in (np.nan, np.inf):
        x = np.full((3000, 2), 0.1)
        x[1234, 1] = bad
        path = tmp_path / f"bad_{bad}.wav"
        sf.write(path, x, 16000, subtype="FLOAT")
        with pytest.raises(ValueError, match=rf"bad_{bad}.wav: sample 1234 is NaN or infinite"):
            load_audio(path)


def test_check_waveform():
    good = 0.1 * np.sin(np.arange(MIN_SAMPLES))
    out = check_waveform(good, name="clip")
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, good.astype(np.float32))
    with pytest.raises(ValueError, match="clip: expected a 1-D waveform"):
        check_waveform(np.zeros((2, 4000)), name="clip")
    with pytest.raises(ValueError, match="clip: .*dtype int16.*32768"):
        check_waveform(np.ones(4000, np.int16), name="clip")
    bad = good.copy()
    bad[7] = np.nan
    with pytest.raises(ValueError, match="clip: sample 7 is NaN"):
        check_waveform(bad, name="clip")
    bad[7] = -np.inf
    with pytest.raises(ValueError, match="clip: sample 7 is NaN or infinite"):
        check_waveform(bad, name="clip")
    with pytest.raises(ValueError, match=rf"clip: {MIN_SAMPLES - 1} samples \(0.175 s at 16 "
                                         rf"kHz\) is too short; at least {MIN_SAMPLES} \(0.175 s\)"):
        check_waveform(good[1:], name="clip")
    assert check_waveform(good[:10], name="clip", min_samples=10).shape == (10,)
    with pytest.raises(ValueError, match="clip: waveform is silent"):
        check_waveform(np.full(4000, 1e-9), name="clip")
    assert check_waveform(np.zeros(4000), name="clip", allow_silent=True).shape == (4000,)
    assert MIN_SAMPLES == 2800


@pytest.mark.parametrize("channels", [1, 2])
def test_load_audio_reads_one_channel(tmp_path, channels):
    t = np.arange(int(DURATION * 16000)) / 16000
    data = np.stack([_tones(t, c) for c in range(channels)], axis=1)
    sf.write(tmp_path / "x.wav", data, 16000, subtype="FLOAT")
    stored = sf.read(tmp_path / "x.wav", dtype="float64", always_2d=True)[0]
    for name, column in (("left", 0), ("right", 1)):
        # a mono file's only channel serves either ear, as in `haaqi-jax label`
        np.testing.assert_array_equal(load_audio(tmp_path / "x.wav", 16000, name),
                                      stored[:, min(column, channels - 1)].astype(np.float32))
    if channels == 2:
        assert not np.allclose(load_audio(tmp_path / "x.wav", 16000, "left"),
                               load_audio(tmp_path / "x.wav", 16000, "right"))
    with pytest.raises(ValueError, match="channel must be one of"):
        load_audio(tmp_path / "x.wav", 16000, "centre")


@pytest.mark.parametrize("rate", [1, 500, 999])
def test_a_file_at_no_audio_rate_is_refused_as_its_samples_are(tmp_path, rate):
    """A file whose header says 1 or 500 Hz (a corrupt header, or a sensor log) was upsampled
    to 16 kHz and scored by `haaqi-jax predict` and `evaluate`, while the same samples given
    to the model with their rate are refused (`model.prepare_waveform`, and HAAQI itself,
    accept 1 kHz to 768 kHz)."""
    path = tmp_path / "low.wav"
    sf.write(path, 0.3 * np.sin(np.arange(4 * rate + 8) / 3), rate)
    with pytest.raises(ValueError, match=rf"low.wav: sample rate {rate} Hz is not an audio "
                                         rf"rate \(accepted: 1000 Hz to 768 kHz\)"):
        load_audio(path)
    ok = tmp_path / "ok.wav"
    sf.write(ok, 0.3 * np.sin(np.arange(4000) / 3), 1000)   # the lowest accepted rate
    assert load_audio(ok).shape == (64000,)
