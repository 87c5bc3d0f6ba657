"""Reading audio files as 16 kHz mono float32 waveforms, and validating waveforms.

Resampling uses libsoxr at its "very high quality" setting (the `soxr` package). Measured on
in-band sines (440 + 1500 Hz, 8/44.1/48 kHz -> 16 kHz) it is within 1e-9 of the exact values,
where scipy.signal.resample_poly with its default Kaiser window is off by 2e-4..6e-4, and it
is as fast. Its output length, round-half-up of n * target / source, is known from the file
header (`resampled_length`), which the length-bucketed input pipeline relies on; `load_audio`
enforces it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

#: Fewest samples at 16 kHz that give one 16x16 BEATs patch: 16 fbank frames of 400 samples
#: with a 160-sample shift.
MIN_SAMPLES = 400 + 15 * 160
#: Sample rates accepted (Hz): below 1 kHz no music is left to judge (HAAQI refuses it too);
#: above 768 kHz the rate is more likely a mistake than a recording.
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1000, 768_000
#: |x| below this everywhere counts as silence (float32 audio from a broken export or a
#: muted channel; real recordings have dither or noise far above it).
SILENCE_THRESHOLD = 1e-8


def resampled_length(n_samples: int, orig_rate: int, target_rate: int) -> int:
    """Number of samples `load_audio` returns for n_samples at orig_rate."""
    if orig_rate == target_rate:
        return int(n_samples)
    return (2 * int(n_samples) * int(target_rate) + int(orig_rate)) // (2 * int(orig_rate))


def audio_info(path: Path):
    """libsndfile's header of an audio file (frames, samplerate, channels, ...).

    Raises:
      FileNotFoundError: the path does not exist, or is a folder.
      ValueError: libsndfile cannot read it as audio.
    """
    import soundfile as sf
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"audio file {path} {what}")
    try:
        return sf.info(str(path))
    except Exception as err:  # libsndfile raises LibsndfileError / RuntimeError / TypeError
        raise ValueError(f"{path}: not readable audio ({err})") from None


def audio_num_samples(path: str | os.PathLike, sample_rate: int = 16000) -> int:
    """Length `load_audio(path, sample_rate)` will have, read from the file header only."""
    path = Path(path)
    info = audio_info(path)
    if info.frames <= 0:
        raise ValueError(f"{path}: audio file is empty")
    return resampled_length(info.frames, info.samplerate, sample_rate)


def load_audio(path: str | os.PathLike, sample_rate: int = 16000,
               channel: str | None = None) -> np.ndarray:
    """Reads any libsndfile format (wav, flac, ogg, ...) as mono float32 at `sample_rate`.

    Channels are averaged, or with `channel` "left" / "right" the first / second channel is
    read (a mono file's only channel serves either, as in `haaqi-jax label`); integer formats
    are scaled to [-1, 1) by libsndfile.

    Returns:
      (N,) float32, N = resampled_length(frames, file rate, sample_rate).

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: naming the file, when it is unreadable or corrupt, empty, holds NaN/inf, or
        its rate is outside MIN_SAMPLE_RATE..MAX_SAMPLE_RATE (as `model.prepare_waveform`).
    """
    import soundfile as sf

    from haaqi_jax.data.manifest import CHANNELS

    if channel is not None and channel not in CHANNELS:
        raise ValueError(f"{path}: channel must be one of {CHANNELS} or None, got {channel!r}")
    path = Path(path)
    audio_info(path)
    try:
        data, rate = sf.read(str(path), dtype="float64", always_2d=True)
    except Exception as err:
        raise ValueError(f"{path}: cannot decode audio ({err})") from None
    if data.shape[0] == 0:
        raise ValueError(f"{path}: audio file is empty")
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise ValueError(f"{path}: sample rate {rate} Hz is not an audio rate (accepted: "
                         f"{MIN_SAMPLE_RATE} Hz to {MAX_SAMPLE_RATE // 1000} kHz)")
    if not np.all(np.isfinite(data)):
        bad = int(np.flatnonzero(~np.isfinite(data).all(axis=1))[0])
        raise ValueError(f"{path}: sample {bad} is NaN or infinite")
    if channel is None:
        mono = data.mean(axis=1)
    else:
        mono = data[:, min(CHANNELS.index(channel), data.shape[1] - 1)]
    if rate != sample_rate and resampled_length(mono.shape[0], rate, sample_rate) == 0:
        raise ValueError(f"{path}: {mono.shape[0]} samples at {rate} Hz is empty at "
                         f"{sample_rate} Hz")
    return resample(mono, rate, sample_rate)


def resample(waveform: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    """Resamples a 1-D waveform with libsoxr "VHQ"; returns float32 of exactly
    `resampled_length(len(waveform), orig_rate, target_rate)` samples (the same rule for
    files and arrays, so scoring a file and scoring its samples agree)."""
    import soxr

    x = np.asarray(waveform, np.float64)
    if int(orig_rate) == int(target_rate):
        return x.astype(np.float32)
    n_out = resampled_length(x.shape[0], orig_rate, target_rate)
    y = soxr.resample(x, int(orig_rate), int(target_rate), quality="VHQ")
    # soxr's length rule is the one above; pin it so headers predict lengths exactly.
    return np.pad(y[:n_out], (0, max(0, n_out - y.shape[0]))).astype(np.float32)


def check_waveform(x, *, name: str = "waveform", min_samples: int = MIN_SAMPLES,
                   allow_silent: bool = False) -> np.ndarray:
    """Validates one waveform for the encoder; returns it as float32.

    Checks: a 1-D floating-point array (bfloat16 too; integer samples mean a missed 1/32768
    scaling), every sample finite, a peak within `fbank.MAX_PEAK` (above it: 16-bit values left
    unscaled), at least `min_samples` samples (default: one BEATs patch, 2800 at 16 kHz), and
    not silent (all |x| < 1e-8) unless `allow_silent`.

    Raises:
      ValueError naming `name` and the problem.
    """
    from haaqi_jax.fbank import MAX_PEAK, is_float_dtype
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D waveform, got shape {arr.shape}")
    if not is_float_dtype(arr.dtype):
        raise ValueError(f"{name}: expected floating-point samples in [-1, 1], got dtype "
                         f"{arr.dtype} (scale integer PCM by 1/32768)")
    arr = arr.astype(np.float32, copy=False)
    if arr.shape[0] == 0:
        raise ValueError(f"{name}: the waveform is empty (0 samples)")
    finite = np.isfinite(arr)
    if not finite.all():
        raise ValueError(f"{name}: sample {int(np.flatnonzero(~finite)[0])} is NaN or infinite")
    peak = float(np.max(np.abs(arr)))
    if peak > MAX_PEAK:
        raise ValueError(f"{name}: peak {peak:.4g} is far outside [-1, 1]: 16-bit integer "
                         f"values left unscaled? (divide by 32768)")
    if arr.shape[0] < min_samples:
        raise ValueError(f"{name}: {arr.shape[0]} samples ({arr.shape[0] / 16000:.3f} s at 16 "
                         f"kHz) is too short; at least {min_samples} ({min_samples / 16000:.3f} "
                         f"s) are needed (one 16x16 BEATs patch)")
    if not allow_silent and not np.any(np.abs(arr) >= SILENCE_THRESHOLD):
        raise ValueError(f"{name}: waveform is silent (all |x| < {SILENCE_THRESHOLD:g})")
    return arr
