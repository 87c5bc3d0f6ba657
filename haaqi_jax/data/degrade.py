"""Degradations of music like those in the HAAQI-Net paper's training data.

Single types: babble noise (a small formant synthesizer of our own makes the talkers), spectral
subtraction of added stationary noise (over-subtraction leaves "musical noise"), dynamic-range
compression, low-pass and high-pass filtering, positive and negative spectral tilt, and one or
several resonance peaks; plus combinations written "a+b" and applied left to right (noise first,
as at a hearing aid's microphone, then noise reduction, shaping, compression), and "clean".

Seen and unseen types: the paper tests on distortions held out of training. Here
`UNSEEN_DISTORTIONS` (only in the test_unseen split) holds two single types that never occur in
training (negative tilt, several resonances) and combinations of seen types that never occur
together in training; `SEEN_DISTORTIONS` is everything the train/valid/test_seen splits use:
"clean", the seven other single types and eleven of their pairs (a hearing aid chains its
stages, so training sees chains, just never the held-out ones).

Loudness: a hearing aid hands the listener a signal at a comfortable level, so every processed
clip is scaled to the RMS of its reference (`match_loudness`); the degradation functions
themselves do not rescale, so that each can be measured on its own.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np
import scipy.fft
import scipy.ndimage
import scipy.signal

# -------------------------------------------------------------------------------- filtering


def lowpass(x: np.ndarray, sample_rate: int, cutoff_hz: float, order: int = 4) -> np.ndarray:
    """Zero-phase Butterworth low-pass (run forwards and backwards: 2*order poles). (N,)->(N,)."""
    _check_cutoff(cutoff_hz, sample_rate, "lowpass")
    sos = scipy.signal.butter(order, cutoff_hz, "lowpass", fs=sample_rate, output="sos")
    return scipy.signal.sosfiltfilt(sos, x).astype(x.dtype)


def highpass(x: np.ndarray, sample_rate: int, cutoff_hz: float, order: int = 4) -> np.ndarray:
    """Zero-phase Butterworth high-pass (2*order poles). (N,) -> (N,)."""
    _check_cutoff(cutoff_hz, sample_rate, "highpass")
    sos = scipy.signal.butter(order, cutoff_hz, "highpass", fs=sample_rate, output="sos")
    return scipy.signal.sosfiltfilt(sos, x).astype(x.dtype)


def _check_cutoff(cutoff_hz, sample_rate, what):
    if not 0 < cutoff_hz < sample_rate / 2:
        raise ValueError(f"{what}: cut-off {cutoff_hz} Hz must lie in (0, {sample_rate / 2}) Hz")


def fft_gain(x: np.ndarray, sample_rate: int, gain_db: Callable[[np.ndarray], np.ndarray],
             pad: int = 4096) -> np.ndarray:
    """Zero-phase filtering by a smooth gain curve gain_db(f Hz) -> dB, in one FFT.

    The clip is zero-padded by `pad` samples: a smooth gain has a short impulse response, which
    the padding absorbs (no wrap-around). (N,) -> (N,).
    """
    n = x.shape[-1]
    n_fft = scipy.fft.next_fast_len(n + pad)
    f = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    y = np.fft.irfft(np.fft.rfft(x, n_fft) * 10.0 ** (gain_db(f) / 20.0), n_fft)[:n]
    return y.astype(x.dtype)


def spectral_tilt(x: np.ndarray, sample_rate: int, db_per_octave: float,
                  pivot_hz: float = 1000.0, floor_hz: float = 50.0) -> np.ndarray:
    """Zero-phase gain of db_per_octave * log2(f / pivot_hz) dB (f held at floor_hz below it).

    (N,) -> (N,).
    """
    return fft_gain(x, sample_rate,
                    lambda f: db_per_octave * np.log2(np.maximum(f, floor_hz) / pivot_hz))


def peaking_sos(freq_hz: float, gain_db: float, q: float, sample_rate: int) -> np.ndarray:
    """One peaking-EQ biquad (the audio-EQ-cookbook form) as a (1, 6) sos row."""
    if not 0 < freq_hz < sample_rate / 2 or q <= 0:
        raise ValueError(f"resonance at {freq_hz} Hz with Q {q} is not valid at {sample_rate} Hz")
    amp = 10.0 ** (gain_db / 40.0)
    w0 = 2 * np.pi * freq_hz / sample_rate
    alpha = np.sin(w0) / (2 * q)
    b = np.array([1 + alpha * amp, -2 * np.cos(w0), 1 - alpha * amp])
    a = np.array([1 + alpha / amp, -2 * np.cos(w0), 1 - alpha / amp])
    return np.concatenate([b / a[0], a / a[0]])[None, :]


def resonances(x: np.ndarray, sample_rate: int, freqs_hz, gains_db, qs) -> np.ndarray:
    """Cascade of peaking resonances (gain gains_db[i] at freqs_hz[i], quality qs[i]). (N,)."""
    if not len(freqs_hz) == len(gains_db) == len(qs) >= 1:
        raise ValueError("resonances: freqs_hz, gains_db and qs need the same, non-zero length")
    sos = np.concatenate([peaking_sos(f, g, q, sample_rate)
                          for f, g, q in zip(freqs_hz, gains_db, qs)])
    return scipy.signal.sosfilt(sos, x).astype(x.dtype)


# ------------------------------------------------------------------------------ compression


def _one_pole(x: np.ndarray, tau_s: float, sample_rate: int) -> np.ndarray:
    a = np.exp(-1.0 / (tau_s * sample_rate))
    return scipy.signal.lfilter([1 - a], [1, -a], x)


def compress(x: np.ndarray, sample_rate: int, threshold_db: float, ratio: float,
             attack_ms: float, release_ms: float) -> np.ndarray:
    """Feed-forward RMS compressor (no make-up gain).

    The level is the RMS over `attack_ms` (one-pole on x^2); above `threshold_db` (dB re full
    scale) the gain falls by (1 - 1/ratio) dB per dB; the gain is then smoothed with `release_ms`
    but may drop instantly after a peak (min of the raw and smoothed gain). What falls is the
    level's spread over frames of a few ms and up; a transient shorter than `attack_ms` still
    passes before the level detector sees it, so on music with sharp onsets the crest factor
    can rise (as with a real RMS compressor). (N,) -> (N,).
    """
    if not ratio >= 1 or not np.isfinite(ratio):
        raise ValueError(f"compress: ratio must be a finite number >= 1, got {ratio}")
    if not (attack_ms > 0 and release_ms > 0 and np.isfinite(attack_ms + release_ms)):
        raise ValueError(f"compress: attack_ms and release_ms must be > 0, got {attack_ms}, "
                         f"{release_ms}")
    if not np.isfinite(threshold_db):
        raise ValueError(f"compress: threshold_db must be finite, got {threshold_db}")
    level_db = 10 * np.log10(_one_pole(x.astype(np.float64) ** 2, attack_ms / 1e3,
                                       sample_rate) + 1e-12)
    gain_db = -(1.0 - 1.0 / ratio) * np.maximum(level_db - threshold_db, 0.0)
    # Peak-hold over the attack time keeps the release smoothing from letting onsets through.
    held = -scipy.ndimage.maximum_filter1d(-gain_db, max(1, int(attack_ms / 1e3 * sample_rate)),
                                           origin=0)
    smooth = _one_pole(held, release_ms / 1e3, sample_rate)
    gain_db = np.minimum(smooth, gain_db)
    return (x * 10.0 ** (gain_db / 20.0)).astype(x.dtype)


# ----------------------------------------------------------------------------------- noise


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.asarray(x, dtype=np.float64) ** 2)))


def mix_at_snr(x: np.ndarray, noise: np.ndarray, snr_db: float) -> tuple[np.ndarray, np.ndarray]:
    """x + g*noise with g set so that 10 log10(sum x^2 / sum (g*noise)^2) = snr_db.

    Returns (noisy (N,), the scaled noise (N,)).
    """
    if noise.shape != x.shape:
        raise ValueError(f"noise shape {noise.shape} differs from signal shape {x.shape}")
    if not np.isfinite(snr_db):
        raise ValueError(f"mix_at_snr: snr_db must be finite, got {snr_db}")
    if rms(noise) == 0 or rms(x) == 0:
        raise ValueError("mix_at_snr: signal or noise is silent; the SNR is undefined")
    scaled = noise * (rms(x) / rms(noise) * 10.0 ** (-snr_db / 20.0))
    return (x + scaled).astype(x.dtype), scaled.astype(x.dtype)


# Vowel formants F1..F3 (Hz) of an adult male voice (Peterson & Barney averages).
_VOWEL_FORMANTS = np.array([
    [730, 1090, 2440],  # a
    [270, 2290, 3010],  # i
    [300, 870, 2240],   # u
    [530, 1840, 2480],  # e
    [570, 840, 2410],   # o
    [660, 1720, 2410],  # ae
    [490, 1350, 1690],  # er
], dtype=np.float64)
_FORMANT_BANDWIDTHS = np.array([80.0, 100.0, 150.0, 250.0])  # F1..F4


def _resonator_sos(freq, bandwidth, sample_rate):
    """Two-pole resonator with unit gain at DC, as a (6,) sos row."""
    r = np.exp(-np.pi * bandwidth / sample_rate)
    a1, a2 = -2 * r * np.cos(2 * np.pi * freq / sample_rate), r * r
    return np.array([1 + a1 + a2, 0.0, 0.0, 1.0, a1, a2])


def synthesize_talker(rng: np.random.Generator, n: int, sample_rate: int) -> np.ndarray:
    """One synthetic talker, unit RMS, shape (n,).

    Source: a glottal pulse train (impulses at the zero crossings of a pitch phase with an
    intonation contour and per-period jitter and shimmer) through a 2-pole glottal low-pass
    and a lip-radiation difference, plus aspiration noise. Filter: each vowel's formant
    cascade (F1..F3 + F4 = 3.5 kHz, scaled for female voices) applied to the whole source; the
    syllable sequence then picks one vowel-filtered signal per syllable under a raised-cosine
    syllable envelope (3-7 syllables/s, pauses between phrases), some with a fricative onset.
    """
    sr = sample_rate
    female = rng.random() < 0.5
    f0_base = rng.uniform(165, 255) if female else rng.uniform(85, 145)
    t = np.arange(n) / sr
    # Intonation: +-3 semitones through random points every 250 ms, plus declination.
    knots = np.arange(0.0, n / sr + 0.5, 0.25)
    contour = np.interp(t, knots, rng.uniform(-3, 3, knots.size)) - 1.0 * (t % 2.0)
    period_idx = np.floor(t * f0_base).astype(np.int64)
    jitter = rng.normal(0.0, 0.01, period_idx[-1] + 2)[period_idx]  # ~1 % per period
    f0 = f0_base * 2.0 ** (contour / 12.0) * (1.0 + jitter)
    phase = np.cumsum(f0) / sr
    pulses = np.diff(np.floor(phase), prepend=0.0) > 0
    shimmer = rng.uniform(0.85, 1.15, period_idx[-1] + 2)[period_idx]
    source = pulses * shimmer
    pole = np.exp(-2 * np.pi * 150.0 / sr)
    source = scipy.signal.lfilter([1.0], [1.0, -2 * pole, pole * pole], source)  # glottal
    source = np.diff(source, prepend=0.0)  # lip radiation
    source /= rms(source) + 1e-12
    source += 0.05 * rng.standard_normal(n)  # aspiration
    scale = 1.17 if female else 1.0
    vowels = np.stack([
        scipy.signal.sosfilt(np.stack([_resonator_sos(f * scale, bw, sr) for f, bw in
                                       zip([*fmt, 3500.0 * scale], _FORMANT_BANDWIDTHS)]), source)
        for fmt in _VOWEL_FORMANTS])  # (V, n)
    # Syllables and pauses.
    durations = rng.uniform(1 / 7, 1 / 3, int(n / sr * 7) + 2)
    starts = np.concatenate([[0.0], np.cumsum(durations)[:-1]]) - rng.uniform(0, 0.3)
    syl = np.clip(np.searchsorted(starts, t, side="right") - 1, 0, durations.size - 1)
    pos = (t - starts[syl]) / durations[syl]  # 0..1 within the syllable
    voiced = rng.random(durations.size) > 0.15  # pauses
    vowel_of = rng.integers(0, len(_VOWEL_FORMANTS), durations.size)
    envelope = np.sin(np.pi * np.clip(pos, 0, 1)) ** 2 * voiced[syl]
    speech = np.take_along_axis(vowels, vowel_of[syl][None, :], axis=0)[0] * envelope
    # Fricative onsets: high-passed noise over the first 60 ms of a third of the syllables.
    fric = rng.random(durations.size) < 0.35
    onset_s = pos * durations[syl]
    fric_env = (onset_s < 0.06) * np.sin(np.pi * np.clip(onset_s / 0.06, 0, 1)) * fric[syl]
    hiss = scipy.signal.sosfilt(scipy.signal.butter(4, 3500, "highpass", fs=sr, output="sos"),
                                rng.standard_normal(n))
    speech = speech + 0.5 * hiss * fric_env * voiced[syl]
    return speech / (rms(speech) + 1e-12)


def synthesize_babble(rng: np.random.Generator, n: int, sample_rate: int,
                      n_talkers: int = 6) -> np.ndarray:
    """Sum of n_talkers synthetic talkers at equal level, unit RMS. (n,) float64."""
    if n_talkers < 1:
        raise ValueError(f"n_talkers must be >= 1, got {n_talkers}")
    babble = sum(synthesize_talker(rng, n, sample_rate) for _ in range(n_talkers))
    return babble / (rms(babble) + 1e-12)


def add_babble(x: np.ndarray, rng: np.random.Generator, sample_rate: int, snr_db: float,
               n_talkers: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """x plus babble at snr_db. Returns (noisy (N,), the added noise (N,))."""
    return mix_at_snr(x, synthesize_babble(rng, x.shape[-1], sample_rate, n_talkers), snr_db)


def coloured_noise(rng: np.random.Generator, n: int, sample_rate: int,
                   slope_db_per_octave: float) -> np.ndarray:
    """Stationary Gaussian noise with a power spectrum sloping by slope dB/oct. (n,) unit RMS."""
    white = rng.standard_normal(n)
    return _unit(spectral_tilt(white, sample_rate, slope_db_per_octave))


def _unit(x):
    return x / (rms(x) + 1e-12)


_STFT = dict(nperseg=512, noverlap=384, window="hann")


def spectral_subtraction(noisy: np.ndarray, noise_estimate: np.ndarray, sample_rate: int,
                         over_subtraction: float, floor: float) -> np.ndarray:
    """Power spectral subtraction with over-subtraction and a spectral floor.

    The noise power spectrum is the long-term mean of `noise_estimate`'s STFT power (what a
    perfect stationary-noise tracker would estimate). Each bin keeps
    max(|Y|^2 - over_subtraction * noise_psd, floor * |Y|^2) with the noisy phase; the isolated
    bins that survive are the "musical noise". (N,) -> (N,).
    """
    if over_subtraction <= 0 or not 0 <= floor < 1:
        raise ValueError(f"spectral_subtraction: need over_subtraction > 0 and 0 <= floor < 1, "
                         f"got {over_subtraction}, {floor}")
    n = noisy.shape[-1]
    _, _, spec = scipy.signal.stft(noisy.astype(np.float64), fs=sample_rate, **_STFT)
    _, _, noise_spec = scipy.signal.stft(noise_estimate.astype(np.float64), fs=sample_rate,
                                         **_STFT)
    noise_psd = np.mean(np.abs(noise_spec) ** 2, axis=-1, keepdims=True)
    power = np.abs(spec) ** 2
    kept = np.maximum(power - over_subtraction * noise_psd, floor * power)
    gain = np.sqrt(kept / np.maximum(power, 1e-20))
    _, y = scipy.signal.istft(spec * gain, fs=sample_rate, **_STFT)
    return y[:n].astype(noisy.dtype)


def noise_then_subtract(x: np.ndarray, rng: np.random.Generator, sample_rate: int,
                        snr_db: float, over_subtraction: float, floor: float,
                        noise_slope_db_per_octave: float) -> tuple[np.ndarray, np.ndarray]:
    """Adds stationary coloured noise at snr_db, then removes it by spectral subtraction.

    Returns (processed (N,), the added noise (N,)).
    """
    noise = coloured_noise(rng, x.shape[-1], sample_rate, noise_slope_db_per_octave)
    noisy, noise = mix_at_snr(x, noise, snr_db)
    return spectral_subtraction(noisy, noise, sample_rate, over_subtraction, floor), noise


# ------------------------------------------------------------------------- distortion sets

#: Distortions of the train / valid / test_seen splits ("clean" = untouched).
SEEN_DISTORTIONS = (
    "clean", "babble", "spectral_subtraction", "compression", "lowpass", "highpass", "tilt_up",
    "resonance", "babble+compression", "spectral_subtraction+tilt_up", "lowpass+resonance",
    "babble+lowpass", "babble+resonance", "spectral_subtraction+highpass", "highpass+resonance",
    "lowpass+tilt_up", "tilt_up+compression", "resonance+compression", "highpass+compression",
)
#: Distortions only in test_unseen: two held-out single types and unseen combinations.
UNSEEN_DISTORTIONS = (
    "tilt_down", "multi_resonance", "babble+highpass", "babble+tilt_down",
    "spectral_subtraction+multi_resonance", "lowpass+compression", "highpass+tilt_up+compression",
)
SINGLE_DISTORTIONS = ("babble", "spectral_subtraction", "compression", "lowpass", "highpass",
                      "tilt_up", "tilt_down", "resonance", "multi_resonance")


def _log_uniform(rng, lo, hi):
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _resonance_params(rng, k):
    return {"freqs_hz": [round(_log_uniform(rng, 250, 6000), 1) for _ in range(k)],
            "gains_db": [round(float(rng.uniform(6, 24)), 2) for _ in range(k)],
            "qs": [round(_log_uniform(rng, 1, 12), 3) for _ in range(k)]}


# Random strengths, from barely audible to severe. Values are rounded so that the manifest
# records exactly what was applied.
_PARAM_SAMPLERS: dict[str, Callable[[np.random.Generator], dict[str, Any]]] = {
    "babble": lambda rng: {"snr_db": round(float(rng.uniform(-5, 25)), 2),
                           "n_talkers": int(rng.integers(3, 9))},
    "spectral_subtraction": lambda rng: {
        "snr_db": round(float(rng.uniform(-5, 20)), 2),
        "over_subtraction": round(float(rng.uniform(1.0, 6.0)), 3),
        "floor": round(_log_uniform(rng, 0.002, 0.1), 4),
        "noise_slope_db_per_octave": round(float(rng.uniform(-6, 0)), 2)},
    "compression": lambda rng: {
        "threshold_db_re_rms": round(float(rng.uniform(-25, 0)), 2),
        "ratio": round(_log_uniform(rng, 1.5, 20), 3),
        "attack_ms": round(float(rng.uniform(1, 20)), 2),
        "release_ms": round(float(rng.uniform(20, 300)), 1)},
    "lowpass": lambda rng: {"cutoff_hz": round(_log_uniform(rng, 250, 8000), 1)},
    "highpass": lambda rng: {"cutoff_hz": round(_log_uniform(rng, 150, 4000), 1)},
    "tilt_up": lambda rng: {"db_per_octave": round(float(rng.uniform(1, 10)), 2)},
    "tilt_down": lambda rng: {"db_per_octave": -round(float(rng.uniform(1, 10)), 2)},
    "resonance": lambda rng: _resonance_params(rng, 1),
    "multi_resonance": lambda rng: _resonance_params(rng, int(rng.integers(2, 5))),
}


def sample_params(distortion: str, rng: np.random.Generator) -> dict[str, dict[str, Any]]:
    """Random strengths for each stage of `distortion` ("a+b"): {stage: {param: value}}."""
    return {stage: _PARAM_SAMPLERS[stage](rng) for stage in split_distortion(distortion)}


def split_distortion(distortion: str) -> tuple[str, ...]:
    """"a+b" -> ("a", "b"); "clean" -> (). Raises ValueError on unknown stages."""
    if distortion == "clean":
        return ()
    stages = tuple(distortion.split("+"))
    unknown = [s for s in stages if s not in _PARAM_SAMPLERS]
    if unknown:
        raise ValueError(f"unknown distortion {unknown[0]!r} in {distortion!r}; known: "
                         f"{SINGLE_DISTORTIONS} and 'clean'")
    return stages


@dataclasses.dataclass(frozen=True)
class Degraded:
    """A processed clip and what made it.

    Attributes:
      processed: (N,) float32, loudness-matched to the reference.
      noise: (N,) float32 sum of the noise added by noise stages (before loudness matching),
        or None when no stage added noise.
      params: {stage: {param: value}} as applied.
    """

    processed: np.ndarray
    noise: np.ndarray | None
    params: dict[str, dict[str, Any]]


#: Fraction of the sample rate that caps cut-off and resonance frequencies (below Nyquist).
MAX_FREQUENCY_FRACTION = 0.45
#: Parameters that must be > 0, and >= 0 (the rest may be any finite number; ratio >= 1,
#: floor < 1).
_POSITIVE = {"attack_ms", "release_ms", "n_talkers", "cutoff_hz", "freqs_hz", "qs",
             "over_subtraction"}
_NON_NEGATIVE = {"floor"}


def stage_params(stage: str, params: Mapping[str, Any], sample_rate: int) -> dict[str, Any]:
    """One stage's parameters checked, and as they are applied.

    Frequencies (cutoff_hz, freqs_hz) above MAX_FREQUENCY_FRACTION x sample_rate are capped
    there, so that what a manifest records is what the filters did.

    Raises:
      ValueError naming the stage and the parameter: missing or unknown, not a finite number,
        not > 0 where it must be, a ratio below 1, lists of unequal length.
    """
    if stage not in _PARAM_SAMPLERS:
        raise ValueError(f"unknown distortion stage {stage!r}")
    wanted = set(_PARAM_SAMPLERS[stage](np.random.default_rng(0)))    # the keys it draws
    missing, unknown = sorted(wanted - set(params)), sorted(set(params) - wanted)
    if missing or unknown:
        raise ValueError(f"{stage}: parameters {sorted(wanted)} expected"
                         + (f"; missing {missing}" if missing else "")
                         + (f"; unknown {unknown}" if unknown else ""))
    applied = {}
    for key, value in params.items():
        values = np.asarray(value, dtype=np.float64)
        if values.ndim > 1 or not np.all(np.isfinite(values)) or (
                key in _POSITIVE and not np.all(values > 0)) or (
                key in _NON_NEGATIVE and not np.all(values >= 0)):
            need = "> 0" if key in _POSITIVE else ">= 0" if key in _NON_NEGATIVE else "finite"
            raise ValueError(f"{stage}: {key} = {value!r} must be {need}")
        applied[key] = value
    if stage == "compression" and params["ratio"] < 1:
        raise ValueError(f"compression: ratio = {params['ratio']!r} must be >= 1")
    if stage == "spectral_subtraction" and params["floor"] >= 1:
        raise ValueError(f"spectral_subtraction: floor = {params['floor']!r} must be < 1")
    cap = MAX_FREQUENCY_FRACTION * sample_rate
    if "cutoff_hz" in applied:
        applied["cutoff_hz"] = min(applied["cutoff_hz"], cap)
    if "freqs_hz" in applied:
        lists = [list(applied[k]) for k in ("freqs_hz", "gains_db", "qs")]
        if len({len(v) for v in lists}) != 1:
            raise ValueError(f"{stage}: freqs_hz, gains_db and qs must have one entry per "
                             f"resonance, got lengths {[len(v) for v in lists]}")
        applied["freqs_hz"] = [min(f, cap) for f in lists[0]]
    return applied


def apply_stage(stage: str, x: np.ndarray, sample_rate: int, params: dict[str, Any],
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """One named degradation with explicit params (checked and capped by `stage_params`).
    Returns (output (N,), added noise or None)."""
    p = stage_params(stage, params, sample_rate)
    if stage == "babble":
        return add_babble(x, rng, sample_rate, p["snr_db"], p["n_talkers"])
    if stage == "spectral_subtraction":
        return noise_then_subtract(x, rng, sample_rate, p["snr_db"], p["over_subtraction"],
                                   p["floor"], p["noise_slope_db_per_octave"])
    if stage == "compression":
        return compress(x, sample_rate, 20 * np.log10(rms(x) + 1e-12) + p["threshold_db_re_rms"],
                        p["ratio"], p["attack_ms"], p["release_ms"]), None
    if stage in ("lowpass", "highpass"):
        return (lowpass if stage == "lowpass" else highpass)(x, sample_rate, p["cutoff_hz"]), None
    if stage in ("tilt_up", "tilt_down"):
        return spectral_tilt(x, sample_rate, p["db_per_octave"]), None
    return resonances(x, sample_rate, p["freqs_hz"], p["gains_db"], p["qs"]), None


def match_loudness(processed: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Scales processed to the RMS of reference (a hearing aid's output level)."""
    return (processed * (rms(reference) / max(rms(processed), 1e-12))).astype(np.float32)


def degrade(reference: np.ndarray, sample_rate: int, distortion: str, rng: np.random.Generator,
            params: dict[str, dict[str, Any]] | None = None) -> Degraded:
    """Applies `distortion` ("clean", a single type or "a+b+...") to a reference clip.

    Args:
      reference: (N,) float clean music.
      sample_rate: Hz.
      distortion: name from SEEN_DISTORTIONS / UNSEEN_DISTORTIONS or any "+"-joined stages.
      rng: numpy Generator for the strengths (when params is None) and the noises.
      params: {stage: {param: value}}; drawn with sample_params when None.

    Returns:
      Degraded with the loudness-matched processed clip (N,) float32.
    """
    stages = split_distortion(distortion)
    params = sample_params(distortion, rng) if params is None else params
    missing = [s for s in stages if s not in params]
    if missing:
        raise ValueError(f"degrade: no parameters for stage {missing[0]!r} of {distortion!r}")
    y = np.asarray(reference, dtype=np.float64)
    if y.ndim != 1 or not np.all(np.isfinite(y)):
        raise ValueError(f"degrade: the reference must be (N,) finite samples, got shape "
                         f"{y.shape}{'' if np.all(np.isfinite(y)) else ' with NaN or inf'}")
    noise_total = None
    for stage in stages:
        y, noise = apply_stage(stage, y, sample_rate, params[stage], rng)
        if noise is not None:
            noise_total = noise if noise_total is None else noise_total + noise
    if not np.all(np.isfinite(y)):
        raise ValueError(f"degrade: {distortion!r} with {params} produced non-finite samples")
    return Degraded(match_loudness(y, reference),
                    None if noise_total is None else noise_total.astype(np.float32),
                    {s: stage_params(s, params[s], sample_rate) for s in stages})
