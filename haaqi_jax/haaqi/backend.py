"""The HAAQI back end: ear-model outputs -> cephigh, bmsync5, d_loud, d_norm and the scores.

Fixed-shape and masked: the ear outputs sit left-aligned in (32, N_max) buffers with a traced
valid length `n`; every stage masks frames / segments past the true count and divides by true
counts, so the functions are jit- and vmap-able and a padded buffer gives the unpadded result.

Stages (pyclarity 0.9.0, clarity/evaluator/haspi/eb.py and haaqi/haaqi.py, translated from
J. M. Kates's MATLAB code; Kates & Arehart, "The Hearing-Aid Audio Quality Index (HAAQI)",
IEEE/ACM TASLP 24(2), 2016):
  env_smooth       8 ms Hann-window averages at a 4 ms hop (first and last frames half windows),
                   as two half-window dot products per 96-sample block.
  melcor9          mel-cepstral correlation in 8 modulation bands after removing the silent
                   frames and joining the rest (a stable compaction) -> cephigh.
  spectrum_diff    long-term loudness-spectrum differences -> d_loud, d_norm.
  bm_covary        16 ms windowed cross-covariances of the BM signals within +-1 ms (FFT).
  ave_covary2      averages over loud tiles with IHC-synchronisation low-pass weights -> bmsync5.

Follows pyclarity closely: MIT License, Copyright (c) 2022 The PyClarity Team.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import scipy.signal
from jax import lax

from haaqi_jax.haaqi import preprocess

SAMPLE_RATE = 24000.0
NUM_BANDS = 32
ENV_SEGMENT_MS = 8            # envelope smoothing window (the frame hop is half of it)
NUM_CEPSTRAL = 6              # mel-cepstral coefficients (0 is the level and is ignored)
MOD_EDGES = (4.0, 8.0, 12.5, 20.0, 32.0, 50.0, 80.0)   # Hz: 8 modulation bands over 0-125 Hz
COVARY_LAG_MS = 1.0
SYNC_ORDERS = (1, 3, 5, 5, 5, 5)                        # IHC sync-loss low-pass orders
SYNC_CUTOFFS = (1500.0, 2000.0, 2500.0, 3000.0, 3500.0, 4000.0)
_SMALL = 1e-30
_HIGHEST = lax.Precision.HIGHEST


@flax.struct.dataclass
class HAAQIResult:
    """HAAQI scores; each field has the batch shape (() for one pair, (B,) for a batch).

    combined: the HAAQI index. nonlinear = 0.754 cephigh^3 + 0.246 bmsync5.
    linear = 0.329 d_loud + 0.671 d_norm. cephigh: high-modulation mel-cepstral correlation.
    bmsync5: BM segment coherence with IHC sync loss (3.5 kHz low-pass). d_loud, d_norm:
    1 - normalised long-term spectrum differences, clipped to [0, 1].
    """

    combined: jax.Array
    nonlinear: jax.Array
    linear: jax.Array
    cephigh: jax.Array
    bmsync5: jax.Array
    d_loud: jax.Array
    d_norm: jax.Array

    @property
    def nothing_audible(self):
        """Where the reference had at most one frame above the listener's threshold (see
        `nothing_audible`): the score says nothing about the processing there."""
        return nothing_audible(self.cephigh, self.bmsync5)


def nothing_audible(cephigh, bmsync5):
    """True where HAAQI kept at most one reference frame and segment above the hearing
    threshold (a level1 too low for the audiogram, or a loss too severe): its nonlinear part is
    then 0 by rule, cephigh and bmsync5 exactly 0 (a measured correlation is never exactly 0),
    and the score is 0.162 for any processed signal as quiet. numpy or JAX arrays, any shape.

    It errs towards False: at an absurd level1 (around -50 dB SPL) BM segments of the threshold
    noise alone pass, bmsync5 is not 0, and a score constant in the processing goes unflagged.
    (cephigh = 0 alone would also flag an audible reference whose processed signal is silent.)"""
    return (cephigh == 0) & (bmsync5 == 0)


# ----------------------------------------------------------------------------------------------
# Host-side constants (float64 numpy; cast to the compute dtype where used)


def _even_samples(ms: float) -> int:
    size = int(np.around(ms * 0.001 * SAMPLE_RATE))
    return size + size % 2


@functools.lru_cache(maxsize=None)
def _env_window() -> np.ndarray:
    return np.hanning(_even_samples(ENV_SEGMENT_MS))


@functools.lru_cache(maxsize=None)
def _modulation_filters() -> np.ndarray:
    """(8, 129) linear-phase FIRs (Hann windowed) at the 250 Hz envelope rate."""
    nyquist = 0.5 * 1000.0 / (0.5 * ENV_SEGMENT_MS)
    taps = int(2 * np.floor(np.around(128 * (nyquist / 125)) / 2)) + 1
    edges = np.asarray(MOD_EDGES) / nyquist
    firs = [scipy.signal.firwin(taps, edges[0], window="hann", pass_zero="lowpass")]
    firs += [scipy.signal.firwin(taps, [lo, hi], window="hann", pass_zero="bandpass")
             for lo, hi in zip(edges[:-1], edges[1:])]
    firs += [scipy.signal.firwin(taps, edges[-1], window="hann", pass_zero="highpass")]
    return np.stack(firs)


@functools.lru_cache(maxsize=None)
def _cepstral_basis() -> np.ndarray:
    """(32, 6) half-cosine basis, unit-norm columns."""
    basis = np.cos(np.outer(np.arange(NUM_BANDS), np.arange(NUM_CEPSTRAL)) * np.pi
                   / (NUM_BANDS - 1))
    return basis / np.linalg.norm(basis, axis=0, keepdims=True)


@functools.lru_cache(maxsize=None)
def _covary_constants(segment_ms: int):
    """Window, max lag and the inverted window autocorrelations for bm_covary."""
    max_lag = int(np.around(COVARY_LAG_MS * 0.001 * SAMPLE_RATE))
    window = np.hanning(_even_samples(segment_ms))
    half = window[window.size // 2:]

    def inverse_autocorr(w):
        if w.size - 1 - max_lag < 0:
            raise ValueError(f"segment_covariance={segment_ms} ms is too small for a "
                             f"+-{max_lag}-sample lag")
        c = np.correlate(w, w, "full")
        return 1.0 / c[w.size - 1 - max_lag: w.size + max_lag]

    return dict(window=window, max_lag=max_lag, full_corr=inverse_autocorr(window),
                half_corr=inverse_autocorr(half), full_norm=1.0 / np.sum(window**2),
                half_norm=1.0 / np.sum(half**2))


@functools.lru_cache(maxsize=None)
def _sync_weights() -> np.ndarray:
    """(6, 32) IHC sync-loss weights sqrt(fc^2p / (fc^2p + f^2p)), in float64 (8000^10 would
    overflow float32)."""
    order = np.asarray(SYNC_ORDERS, dtype=np.float64)[:, None]
    fc2p = np.asarray(SYNC_CUTOFFS)[:, None] ** (2 * order)
    f2p = preprocess.center_frequencies(NUM_BANDS)[None, :] ** (2 * order)
    return np.sqrt(fc2p / (fc2p + f2p))


def _const(x: np.ndarray, dtype) -> jax.Array:
    return jnp.asarray(np.asarray(x, dtype=dtype))


# ----------------------------------------------------------------------------------------------
# Frame and segment counts (pyclarity's formulas; valid for lengths >= one window)


def num_frames(n, window: int | None = None):
    """Envelope frames of a length-n signal: 1 + floor(n / W) + floor((n - W/2) / W)."""
    window = window or _even_samples(ENV_SEGMENT_MS)
    return 1 + n // window + (n - window // 2) // window


#: Shortest trimmed 24 kHz length the back end accepts (two 16 ms covariance half-segments).
MIN_LENGTH = _even_samples(16)


def _fast_length(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n (an FFT size the CPU and GPU FFTs handle well)."""
    return min(m for m in (2**a * 3**b * 5**c for a in range(12) for b in range(7)
                           for c in range(5)) if m >= n)


def _safe_ratio(num, a, b):
    """num / sqrt(a b), or 0 where a or b is at most 1e-30 (sqrt taken separately: a b can
    underflow in float32). Written as "0 where small" rather than pyclarity's "ratio where
    a > 1e-30": the same for numbers, but a NaN stays NaN instead of turning into a silent 0
    (which once hid infinite threshold-noise samples)."""
    small = (a <= _SMALL) | (b <= _SMALL)
    den = jnp.sqrt(jnp.where(small, 1, a)) * jnp.sqrt(jnp.where(small, 1, b))
    return jnp.where(small, 0, num / den)


# ----------------------------------------------------------------------------------------------
# Envelope smoothing


def env_smooth(envelopes: jax.Array, n: jax.Array) -> tuple[jax.Array, jax.Array]:
    """pyclarity's env_smooth (8 ms segments at 24 kHz) on a masked buffer.

    Frame 0 is the falling half window over samples [0, 96); frame j in 1..F-2 the full 192-point
    Hann window over [96 j, 96 j + 192); frame F-1 the rising half over [96 (F-1), 96 F). Each
    is a weighted average (divided by the window's sum).

    Args:
      envelopes: (..., N_max) signals, zero past n. n: () int valid length (>= 192).

    Returns:
      (smooth (..., F_max), frames ()) with F_max = num_frames(N_max), zero past `frames`.
    """
    window = _env_window()
    hop = window.size // 2
    dtype = envelopes.dtype
    length = envelopes.shape[-1]
    f_max = int(num_frames(length))
    n_blocks = f_max + 1
    pad = n_blocks * hop - length
    x = envelopes[..., :n_blocks * hop] if pad < 0 else jnp.pad(
        envelopes, [(0, 0)] * (envelopes.ndim - 1) + [(0, pad)])
    blocks = x.reshape(x.shape[:-1] + (n_blocks, hop))
    halves = jnp.einsum("...bk,hk->...bh", blocks, _const(window.reshape(2, hop), dtype),
                        precision=_HIGHEST)                              # (..., n_blocks, 2)
    rise, fall = halves[..., 0], halves[..., 1]
    frames = num_frames(jnp.asarray(n, jnp.int32))
    j = jnp.arange(f_max)
    full = (rise[..., :f_max] + fall[..., 1:f_max + 1]) / np.sum(window)
    half_sum = np.sum(window[hop:])
    smooth = jnp.where(j == 0, fall[..., :f_max] / half_sum,
                       jnp.where(j == frames - 1, rise[..., :f_max] / half_sum, full))
    return jnp.where(j < frames, smooth, 0), frames


# ----------------------------------------------------------------------------------------------
# Mel-cepstral correlation in modulation bands


def loud_frames(reference_smooth: jax.Array, frames: jax.Array,
                threshold: float | jax.Array) -> jax.Array:
    """(F_max,) bool: valid frames whose band-averaged loudness exceeds `threshold` dB."""
    loudness = 20 * jnp.log10(jnp.mean(10 ** (reference_smooth / 20), axis=-2))
    return (loudness > threshold) & (jnp.arange(reference_smooth.shape[-1]) < frames)


def _compact(x: jax.Array, keep: jax.Array) -> jax.Array:
    """Moves the kept columns of x (..., F) to the front in their order; zeros after them."""
    order = jnp.argsort(~keep, stable=True)
    kept = jnp.arange(keep.shape[-1]) < jnp.sum(keep)
    return jnp.where(kept, jnp.take(x, order, axis=-1), 0)


def melcor9(reference_smooth: jax.Array, processed_smooth: jax.Array, frames: jax.Array,
            threshold: float | jax.Array = 2.5, add_noise: float | jax.Array = 0.0,
            reference_noise: jax.Array | None = None,
            processed_noise: jax.Array | None = None) -> dict[str, jax.Array]:
    """pyclarity's melcor9: cepstral correlations after silent-frame removal.

    Args:
      reference_smooth, processed_smooth: (32, F_max) smoothed envelopes (dB SL), zero past
        `frames`. frames: () valid frame count.
      threshold: loudness (dB) a frame needs to be kept.
      add_noise, reference_noise, processed_noise: add_noise * noise is added to the kept
        frames; noise (32, F_max) indexed by position among the KEPT frames (pyclarity draws
        standard normals of shape (32, kept) for the reference, then the processed signal).

    Returns:
      dict with 'average', 'low', 'high' (() each; 'high' is cephigh), 'modulation' (8,),
      'covariance' (8, 6) and 'kept' (() number of kept frames). All zero when kept <= 1.
    """
    dtype = reference_smooth.dtype
    f_max = reference_smooth.shape[-1]
    keep = loud_frames(reference_smooth, frames, threshold)
    count = jnp.sum(keep)
    valid = jnp.arange(f_max) < count
    ref = _compact(reference_smooth, keep)
    proc = _compact(processed_smooth, keep)
    if reference_noise is not None:
        ref = ref + jnp.where(valid, add_noise * reference_noise.astype(dtype), 0)
    if processed_noise is not None:
        proc = proc + jnp.where(valid, add_noise * processed_noise.astype(dtype), 0)
    safe_count = jnp.maximum(count, 1).astype(dtype)

    def centre(x):                     # (..., F): remove the mean over the kept frames
        mean = jnp.sum(jnp.where(valid, x, 0), axis=-1, keepdims=True) / safe_count
        return jnp.where(valid, x - mean, 0)

    basis = _const(_cepstral_basis(), dtype)
    ref_cep = centre(jnp.einsum("kc,kf->cf", basis, ref, precision=_HIGHEST))   # (6, F)
    proc_cep = centre(jnp.einsum("kc,kf->cf", basis, proc, precision=_HIGHEST))

    # Modulation filtering: the centred part of the full convolution (scipy's 'same' offsets),
    # zero beyond the kept frames; as a (F, taps) unfold times the filters.
    firs = _modulation_filters()
    taps = firs.shape[-1]
    half = taps // 2
    unfold = np.arange(f_max)[:, None] + np.arange(taps)[None, :]
    flipped = _const(firs[:, ::-1], dtype)

    def modulate(cep):                 # (6, F) -> (8, 6, F)
        padded = jnp.pad(cep, [(0, 0), (half, half)])
        return centre(jnp.einsum("cft,mt->mcf", padded[:, unfold], flipped, precision=_HIGHEST))

    ref_mod, proc_mod = modulate(ref_cep), modulate(proc_cep)
    xy = jnp.sum(ref_mod * proc_mod, axis=-1)
    covariance = _safe_ratio(jnp.abs(xy), jnp.sum(ref_mod**2, axis=-1),
                             jnp.sum(proc_mod**2, axis=-1))                       # (8, 6)
    enough = count > 1
    covariance = jnp.where(enough, covariance, 0)
    upper = covariance[:, 1:]
    return dict(average=jnp.mean(upper), low=jnp.mean(upper[:4]), high=jnp.mean(upper[4:]),
                modulation=jnp.mean(upper, axis=-1), covariance=covariance, kept=count)


# ----------------------------------------------------------------------------------------------
# Long-term spectrum


def spectrum_diff(reference_sl: jax.Array, processed_sl: jax.Array
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """pyclarity's spectrum_diff: (3,) each of [sum |d|, 32 std(d), max |d|] for the loudness
    spectra difference (dloud), the normalised difference (dnorm) and the slope (dslope).

    reference_sl, processed_sl: (32,) dB SL.
    """
    bands = reference_sl.shape[-1]
    ref = 10 ** (reference_sl / 20)
    proc = 10 ** (processed_sl / 20)
    ref = ref / jnp.sum(ref, axis=-1, keepdims=True)
    proc = proc / jnp.sum(proc, axis=-1, keepdims=True)

    def stats(d):
        return jnp.stack([jnp.sum(jnp.abs(d), -1), bands * jnp.std(d, -1),
                          jnp.max(jnp.abs(d), -1)], axis=-1)

    slope = jnp.diff(ref, axis=-1) - jnp.diff(proc, axis=-1)
    return stats(ref - proc), stats((ref - proc) / (ref + proc)), stats(slope)


# ----------------------------------------------------------------------------------------------
# BM segment cross-covariances


def _segment_covariance(x, y, window, inverse_corr, norm, max_lag):
    """Windowed, 0-mean segments x, y (..., L) -> (max |unbiased xcorr| / rms^2, ms_x, ms_y)."""
    dtype = x.dtype
    w = _const(window, dtype)
    u = x * w
    v = y * w
    u = u - jnp.mean(u, axis=-1, keepdims=True)
    v = v - jnp.mean(v, axis=-1, keepdims=True)
    ms_u = jnp.sum(u**2, axis=-1) * norm
    ms_v = jnp.sum(v**2, axis=-1) * norm
    nfft = _fast_length(window.shape[-1] + max_lag)   # no circular wrap within +-max_lag
    spec = jnp.fft.rfft(u, nfft) * jnp.conj(jnp.fft.rfft(v, nfft))
    corr = jnp.fft.irfft(spec, nfft)                      # corr[l] = sum_t u[t + l] v[t]
    # Lags -max_lag..max_lag as two slices (a gather of them cost more than the FFTs).
    corr = jnp.concatenate([corr[..., nfft - max_lag:], corr[..., :max_lag + 1]], axis=-1)
    corr = corr * _const(inverse_corr, dtype)
    peak = jnp.max(jnp.abs(corr), axis=-1)
    return _safe_ratio(peak, ms_u, ms_v), ms_u, ms_v


def bm_covary(reference_bm: jax.Array, processed_bm: jax.Array, n: jax.Array,
              segment_ms: int = 16) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """pyclarity's bm_covary on masked buffers.

    Segment 0 is the falling half window over [0, W/2); segment j in 1..S-2 the full window over
    [W/2 j, W/2 j + W); segment S-1 the rising half over [W/2 (S-1), W/2 S). Each is windowed,
    made 0-mean; the peak over lags within +-1 ms of |cross-correlation| divided by the window's
    autocorrelation, normalised by the RMS levels, is clipped to [0, 1].

    Args:
      reference_bm, processed_bm: (32, N_max), zero past n. n: () int valid length (>= W).
      segment_ms: static segment length in ms.

    Returns:
      covariance (32, S_max), reference_ms (32, S_max), processed_ms (32, S_max) (the mean
      squares times 2, as pyclarity returns them), segments () -- all zero past `segments`.
    """
    const = _covary_constants(segment_ms)
    window, max_lag = const["window"], const["max_lag"]
    size = window.size
    hop = size // 2
    length = reference_bm.shape[-1]
    s_max = int(num_frames(length, size))
    segments = num_frames(jnp.asarray(n, jnp.int32), size)
    pair = jnp.stack([reference_bm, processed_bm])                         # (2, C, N)
    need = (s_max + 1) * hop
    pair = pair[..., :need] if need <= length else jnp.pad(
        pair, [(0, 0), (0, 0), (0, need - length)])
    halves = pair.reshape(pair.shape[:-1] + (s_max + 1, hop))             # (2, C, S+1, hop)
    full = jnp.concatenate([halves[..., :s_max, :], halves[..., 1:, :]], axis=-1)
    cov_full, ms_x_full, ms_y_full = _segment_covariance(
        full[0], full[1], window, const["full_corr"], const["full_norm"], max_lag)

    # The two half-window segments: the first block and the block at the last segment.
    last = jnp.take(halves, segments - 1, axis=-2)                         # (2, C, hop)
    ends = jnp.stack([halves[..., 0, :], last], axis=-2)                   # (2, C, 2, hop)
    end_windows = np.stack([window[hop:], window[:hop]])
    end_cov, end_x, end_y = _segment_covariance(
        ends[0], ends[1], end_windows, const["half_corr"], const["half_norm"], max_lag)

    j = jnp.arange(s_max)

    def assemble(mid, end):
        out = jnp.where(j == 0, end[..., 0:1], jnp.where(j == segments - 1, end[..., 1:2], mid))
        return jnp.where(j < segments, out, 0)

    covariance = jnp.clip(assemble(cov_full, end_cov), 0, 1)
    return (covariance, 2.0 * assemble(ms_x_full, end_x), 2.0 * assemble(ms_y_full, end_y),
            segments)


def ave_covary2(covariance: jax.Array, reference_ms: jax.Array, segments: jax.Array,
                threshold: float | jax.Array = 2.5) -> tuple[jax.Array, jax.Array]:
    """pyclarity's ave_covary2: (average covariance (), IHC-sync weighted averages (6,)).

    Keeps segments whose band-averaged level exceeds `threshold` dB, and in them the tiles
    above threshold; both outputs are 0 when at most one segment is kept.
    covariance, reference_ms: (32, S_max), zero past `segments`.
    """
    dtype = covariance.dtype
    rms = jnp.sqrt(reference_ms)
    level = 20 * jnp.log10(jnp.mean(10 ** (rms / 20), axis=-2))
    keep = (level > threshold) & (jnp.arange(covariance.shape[-1]) < segments)  # (S,)
    tile = keep & (rms > threshold)                                              # (32, S)
    weight = tile.astype(dtype)
    wsum = jnp.sum(weight)
    average = jnp.where(wsum >= 1, jnp.sum(weight * covariance) / jnp.maximum(wsum, 1), 0)
    sync = _const(_sync_weights(), dtype)                                        # (6, 32)
    num = jnp.einsum("pk,ks->p", sync, weight * covariance, precision=_HIGHEST)
    den = jnp.einsum("pk,ks->p", sync, weight, precision=_HIGHEST)
    enough = jnp.sum(keep) > 1
    sync_cov = jnp.where(enough, num / jnp.where(den > 0, den, 1), 0)
    return jnp.where(enough, average, 0), sync_cov


# ----------------------------------------------------------------------------------------------
# Scores


def combined_from_parts(nonlinear, linear):
    """HAAQI's index from its two parts: 0.336 N + 0.001 L + 0.501 N^2 + 0.161 L^2 (any
    matching shapes; N, L in [0, 1] give a score in [0, 1])."""
    return 0.336 * nonlinear + 0.001 * linear + 0.501 * nonlinear**2 + 0.161 * linear**2


def combine(cephigh, bmsync5, dloud_std, dnorm_std) -> HAAQIResult:
    """HAAQI's model from the raw features (Kates & Arehart 2016)."""
    d_loud = jnp.clip(1.0 - dloud_std / 2.5, 0, 1)
    d_norm = jnp.clip(1.0 - dnorm_std / 25, 0, 1)
    nonlinear = 0.754 * cephigh**3 + 0.246 * bmsync5
    linear = 0.329 * d_loud + 0.671 * d_norm
    combined = combined_from_parts(nonlinear, linear)
    return HAAQIResult(combined=combined, nonlinear=nonlinear, linear=linear, cephigh=cephigh,
                       bmsync5=bmsync5, d_loud=d_loud, d_norm=d_norm)


def haaqi_backend(reference_db: jax.Array, reference_bm: jax.Array, processed_db: jax.Array,
                  processed_bm: jax.Array, reference_sl: jax.Array, processed_sl: jax.Array,
                  n: jax.Array, *, silence_threshold: float | jax.Array = 2.5,
                  add_noise: float | jax.Array = 0.0,
                  envelope_noise: tuple[jax.Array, jax.Array] | None = None,
                  segment_covariance: int = 16) -> HAAQIResult:
    """The back end of pyclarity's haaqi_v1 for one pair; jit-able (segment_covariance static)
    and vmap-able.

    Args:
      reference_db, reference_bm, processed_db, processed_bm: (32, N_max) ear-model outputs,
        zero past n. reference_sl, processed_sl: (32,). n: () int32 valid length >= MIN_LENGTH.
      silence_threshold: dB; frames / segments below it are dropped.
      add_noise, envelope_noise: optional (32, F_max) standard-normal noise pair for melcor9
        (see `melcor9`); without it add_noise has no effect.
      segment_covariance: BM covariance segment length, ms.

    Returns:
      HAAQIResult of () arrays.
    """
    ref_smooth, frames = env_smooth(reference_db, n)
    proc_smooth, _ = env_smooth(processed_db, n)
    noise = envelope_noise if envelope_noise is not None else (None, None)
    mel = melcor9(ref_smooth, proc_smooth, frames, silence_threshold, add_noise, *noise)
    dloud, dnorm, _ = spectrum_diff(reference_sl, processed_sl)
    covariance, reference_ms, _, segments = bm_covary(reference_bm, processed_bm, n,
                                                      segment_covariance)
    _, sync = ave_covary2(covariance, reference_ms, segments, silence_threshold)
    return combine(mel["high"], sync[4], dloud[1], dnorm[1])
