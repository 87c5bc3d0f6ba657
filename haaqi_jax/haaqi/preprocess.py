"""Host-side (numpy, float64) steps of the HAAQI ear model: loss parameters, resampling to
24 kHz, broadband alignment, trim and the NAL-R FIR. Per item and data dependent in shape, so
they run before the fixed-shape JAX core (`ear_model.ear_model_core`).

Follows pyclarity 0.9.0 (clarity/evaluator/haspi/eb.py, clarity/enhancer/nalr.py and fir2 in
clarity/evaluator/msbg/msbg_utils.py), itself a translation of J. M. Kates's MATLAB code
(Kates & Arehart). The arithmetic is kept in pyclarity's order so that these steps agree with it
bit for bit. pyclarity: MIT License, Copyright (c) 2022 The PyClarity Team.
"""

from __future__ import annotations

import numpy as np
import scipy.interpolate
import scipy.signal

SAMPLE_RATE = 24000.0
NUM_BANDS = 32
#: Audiometric frequencies of the 6 losses the ear model reads, Hz.
LOSS_FREQUENCIES = np.array([250, 500, 1000, 2000, 4000, 6000])
NALR_TAPS = 140          # FIR order; the filter has 141 taps and a 70-sample delay
ALIGN_BACKUP = 48        # input_align backs the lag up by 2 ms at 24 kHz
_EAR_Q, _MIN_BW = 9.26449, 24.7


def center_frequencies(num_bands: int = NUM_BANDS, low: float = 80.0,
                       high: float = 8000.0) -> np.ndarray:
    """(num_bands,) gammatone centre frequencies on the ERB scale, low to high (Slaney)."""
    c = _EAR_Q * _MIN_BW
    cf = -c + np.exp(np.arange(1, num_bands) * (-np.log(high + c) + np.log(low + c))
                     / (num_bands - 1)) * (high + c)
    return np.flip(np.insert(cf, 0, high))


def loss_parameters(hearing_loss: np.ndarray, center_freq: np.ndarray):
    """Splits the loss into outer/inner hair-cell parts per band.

    Args:
      hearing_loss: (6,) dB HL at LOSS_FREQUENCIES. center_freq: (B,) Hz.
    Returns:
      attn_ohc, bandwidth, low_knee, compression_ratio, attn_ihc: (B,) each.
    """
    nfilt = len(center_freq)
    f_v = np.insert(LOSS_FREQUENCIES, [0, len(LOSS_FREQUENCIES)],
                    [center_freq[0], center_freq[-1]])
    loss = np.interp(center_freq, f_v, np.insert(
        hearing_loss, [0, len(hearing_loss)], [hearing_loss[0], hearing_loss[-1]]))
    loss = np.maximum(loss, 0)
    ratio = 1.25 + 2.25 * np.arange(nfilt) / (nfilt - 1)
    max_ohc = 70 * (1 - (1 / ratio))
    theoretical_ohc = 1.25 * max_ohc
    over = loss >= theoretical_ohc
    attn_ohc = np.where(over, 0.8 * theoretical_ohc, 0.8 * loss)
    attn_ihc = np.where(over, 0.2 * theoretical_ohc + (loss - theoretical_ohc), 0.2 * loss)
    bandwidth = np.ones(nfilt) + (attn_ohc / 50.0) + 2.0 * (attn_ohc / 50.0) ** 6
    low_knee = attn_ohc + 30
    upamp = 30 + (70 / ratio)
    ratio = (100 - low_knee) / (upamp + attn_ohc - low_knee)
    return attn_ohc, bandwidth, low_knee, ratio, attn_ihc


def gammatone_pole(bandwidth: np.ndarray, center_freq: np.ndarray) -> np.ndarray:
    """a = exp(-2 pi 1.019 bw ERB / fs), in pyclarity's operation order."""
    erb = _MIN_BW + (center_freq / _EAR_Q)
    return np.exp(-(bandwidth * (2 * np.pi / SAMPLE_RATE) * erb * 1.019))


def gammatone_gain(a: np.ndarray) -> np.ndarray:
    """pyclarity's gammatone gain 2 (1 - 4a + 6a^2 - 4a^3 + a^4) / (1 + 4a + 4a^2), expanded and
    in its operation order (its rounding, up to 1e-7 relative at 80 Hz, is part of the
    reference)."""
    a1, a2, a3, a4, a5 = 4.0 * a, -6.0 * a * a, 4.0 * a * a * a, -a * a * a * a, 4.0 * a * a
    return 2.0 * (1 - a1 - a2 - a3 - a4) / (1 + a1 + a5)


def resample_24khz(signal: np.ndarray, sample_rate: float) -> np.ndarray:
    """pyclarity's resample_24khz: rate rounded to whole kHz, resample_poly, RMS rescale."""
    target_khz = np.round(SAMPLE_RATE / 1000)
    source_khz = np.round(sample_rate / 1000)
    if source_khz == target_khz:
        return signal
    out = scipy.signal.resample_poly(signal, target_khz, source_khz)
    if not np.any(out):
        # A silent signal stays silent (pyclarity's RMS rescale below divides 0 by 0 into NaN).
        return out
    if source_khz < target_khz:
        source_rms = np.sqrt(np.mean(signal**2))
        out_rms = np.sqrt(np.mean(out**2))
        return (source_rms / out_rms) * out
    # Match levels within 21 kHz (order-7 Chebyshev II low-passes on both sides).
    b, a = scipy.signal.cheby2(7, 30, 21 / source_khz)
    source_rms = np.sqrt(np.mean(scipy.signal.lfilter(b, a, signal, axis=0) ** 2))
    b, a = scipy.signal.cheby2(7, 30, 21 / target_khz)
    out_rms = np.sqrt(np.mean(scipy.signal.lfilter(b, a, out, axis=0) ** 2))
    return (source_rms / out_rms) * out


def input_lag(reference: np.ndarray, processed: np.ndarray) -> int:
    """Samples the processed signal lags the reference, minus 2 ms (pyclarity's input_align).

    The argmax of |cross-covariance| uses scipy.signal.correlate exactly as pyclarity does (it
    picks FFT correlation for long signals), so the lag is identical, ties included.
    """
    n = min(len(reference), len(processed))
    ref = reference[:n] - np.mean(reference[:n])
    proc = processed[:n] - np.mean(processed[:n])
    index = np.argmax(np.abs(scipy.signal.correlate(ref, proc, "full")))
    return int(n - index - 1 - ALIGN_BACKUP)


def shift_processed(processed: np.ndarray, delay: int) -> np.ndarray:
    """Advances (delay > 0) or delays the processed signal with zero fill, as pyclarity does."""
    n = len(processed)
    if delay > 0:
        return np.concatenate((processed[delay:n], np.zeros(delay)))
    return np.concatenate((np.zeros(-delay), processed[: n + delay]))


def trim_bounds(reference: np.ndarray, where: str = "reference") -> tuple[int, int]:
    """[start, stop) of the reference from its first to last sample above 0.001 max|ref|."""
    magnitude = np.abs(reference)
    above = np.flatnonzero(magnitude > 0.001 * np.max(magnitude))
    if above.size == 0:
        raise ValueError(f"{where} is silent (all samples zero): HAAQI is undefined")
    return int(above[0]), int(above[-1]) + 1


def _fir2(order: int, frequencies: np.ndarray, gains: np.ndarray) -> np.ndarray:
    """pyclarity's MATLAB-style fir2 (frequency sampling, Hamming window), vectorised over the
    breakpoints. Requires every breakpoint segment to cover at least one grid point."""
    taps = order + 1
    grid = 512 + 1 if taps < 1024 else int(2 ** np.ceil(np.log2(taps))) + 1
    ends = np.fix(frequencies[1:] * grid).astype(int) - 1
    starts = np.concatenate(([0], ends[:-1] + 1))
    if np.any(ends < starts) or ends[-1] != grid - 1:
        raise ValueError("fir2: breakpoints closer than the interpolation grid")
    k = np.arange(grid)
    seg = np.searchsorted(ends, k, side="left")
    nb, ne = starts[seg], ends[seg]
    inc = np.where(ne == nb, 0.0, (k - nb) / np.where(ne == nb, 1, ne - nb))
    response = inc * gains[seg + 1] + (1 - inc) * gains[seg]
    rad = -(0.5 * (taps - 1)) * 1j * np.pi * np.arange(0, grid) / (grid - 1)
    response = response * np.exp(rad)
    response = np.concatenate((response, response[grid - 2: 0: -1].conj()))
    return np.real(np.fft.ifft(response))[:taps] * scipy.signal.windows.hamming(taps)


def nalr_fir(hearing_loss: np.ndarray, num_taps: int = NALR_TAPS) -> np.ndarray:
    """(num_taps + 1,) NAL-R linear-phase FIR at 24 kHz for a (6,) loss (a delay if no loss)."""
    levels = np.asarray(hearing_loss, dtype=np.float64)
    if np.max(levels) <= 0:
        fir = np.zeros(num_taps + 1)
        fir[num_taps // 2] = 1.0
        return fir
    bias = np.array([-17, -8, 1, -1, -2, -2])
    critical = levels[1] + levels[2] + levels[3]
    x_ave = 0.05 * critical if critical <= 180 else 9.0 + 0.116 * (critical - 180)
    gain_db = np.clip(x_ave + 0.31 * levels + bias, a_min=0, a_max=None)
    fmax = 0.5 * SAMPLE_RATE
    interp = scipy.interpolate.interp1d(
        np.concatenate((np.array([0.0]), LOSS_FREQUENCIES, np.array([fmax]))),
        np.concatenate(([gain_db[0]], gain_db, [gain_db[-1]])))
    grid = np.linspace(0, num_taps, num_taps + 1) / num_taps
    gain = np.power(10, interp(fmax * grid) / 20.0)
    return _fir2(num_taps, grid, gain)


def apply_nalr(reference: np.ndarray, hearing_loss: np.ndarray) -> np.ndarray:
    """convolve(ref, fir)[140 : 140 + N]: NAL-R gain, advancing the reference by 70 samples."""
    n = len(reference)
    return np.convolve(reference, nalr_fir(hearing_loss))[NALR_TAPS: NALR_TAPS + n]
