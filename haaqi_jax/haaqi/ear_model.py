"""The HAAQI ear model (Kates & Arehart): host-side preparation + a fixed-shape JAX core.

Representation: each signal sits left-aligned in a buffer of static length N_max (24 kHz) with
a traced valid length `n`; everything past `n` is zero on input and on output, every mean
divides by `n`. The core is jit- and vmap-able and runs in float64 (agreement with pyclarity;
use `jax.enable_x64`, and on a TPU, which has no float64, a CPU device:
`placement.float64_placement`) or float32.

Follows pyclarity 0.9.0's clarity.evaluator.haspi.eb.ear_model (translated from J. M. Kates's
MATLAB code). pyclarity: MIT License, Copyright (c) 2022 The PyClarity Team.

Agreement with pyclarity (float64): the host steps are bit-identical. The core replaces
pyclarity's direct-form 4th-order gammatone IIR by cascaded first-order sections; the direct
form carries a rounding error of about eps / (1 - a)^4 relative (4e-8 in the 80 Hz band for a
normal-hearing bandwidth, below 1e-9 above ~1.5 kHz), so the low bands agree only to that level
while ours is accurate to ~1e-14. Integer lags use FFT correlation (exact unless the peak is a
near-tie). float32: ~1e-4 relative overall. Its FFT correlation cannot rank alignment lags
whose correlations differ by less than ~1e-7 of the peak (the flat peaks of smooth low-band
envelopes, periodic envelopes), so its winner is re-ranked against the closest rivals by exact
differences (`filters.align_envelope`); the lags then match float64's wherever the float32
envelopes themselves allow.

Memory: bands are processed `bands_per_step` at a time (lax.map over groups), so one clip holds
about 40 (2, bands_per_step, N_max) arrays plus the (2, 32, N_max) outputs; vmap multiplies by
the batch. Measured peak per 10 s clip at the default 8 bands per step: ~0.5 GB (float32),
~0.8 GB (float64); batches of 64 such clips need chunking over clips or fewer bands per step.
A whole score, back end included, grows with the clip: `haaqi_v1` (float64) peaked at 4.7 GB
for a 30 s pair and 8.9 GB for 60 s (~1.4 GB per 10 s), `haaqi_batch` in float32 at 4.2 GB for
60 s. Longer pieces are scored in parts, or on a machine with that much memory.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import scipy.signal

from haaqi_jax.haaqi import filters
from haaqi_jax.haaqi import placement
from haaqi_jax.haaqi import preprocess

SAMPLE_RATE = preprocess.SAMPLE_RATE
NUM_BANDS = preprocess.NUM_BANDS
ALIGN_MAX_LAG = 2400          # envelope_align searches +-100 ms
IHC_THRESHOLD_DB = -10.0      # threshold noise, dB re auditory threshold
_SMALL = 1e-30
_BUCKET = 6000                # ear_model() pads to multiples of 0.25 s
_UPPER_KNEE = 100.0


@flax.struct.dataclass
class EarParams:
    """Per-band cochlear parameters from one audiogram (all derived host-side in float64).

    Row 0 of the (2, 32) fields is the reference, row 1 the processed signal (they differ only
    for equalisation 0, where the reference is modelled with normal hearing).

    Attributes:
      center_freq: (32,) Hz. control_bandwidth: (32,) maximum-loss bandwidth of the control
        filter. control_pole: (32,) its gammatone pole a.
      attn_ohc, bandwidth_min, low_knee, compression_ratio, attn_ihc: (2, 32).
      pole_min: (2, 32) gammatone pole at bandwidth_min.
      control_gain: (32,), gain_min: (2, 32) gammatone gains 2 (1-a)^4 / (1 + 4a + 4a^2) of
        control_pole and pole_min, evaluated as pyclarity does (expanded numerator).

    Why host-side: pyclarity's expanded numerator 1 - 4a + 6a^2 - 4a^3 + a^4 is so
    ill-conditioned (~eps / (1-a)^4 relative) that one ulp in a (XLA's exp differs from numpy's
    for ~15% of inputs) or an FMA contraction under jit moves it by ~1e-7 in the low bands.
    Only a level-interpolated bandwidth (50..100 dB control level) needs an in-graph pole; its
    gain uses the accurate (1-a)^4, and differs from pyclarity's rounding by up to that much.
    """

    center_freq: jax.Array
    control_bandwidth: jax.Array
    control_pole: jax.Array
    attn_ohc: jax.Array
    bandwidth_min: jax.Array
    low_knee: jax.Array
    compression_ratio: jax.Array
    attn_ihc: jax.Array
    pole_min: jax.Array
    control_gain: jax.Array
    gain_min: jax.Array


@flax.struct.dataclass
class EarOutputs:
    """What pyclarity's ear_model returns, in buffers (zero past n).

    reference_db, reference_bm, processed_db, processed_bm: (32, N_max).
    reference_sl, processed_sl: (32,) dB SL of the average band levels.
    """

    reference_db: jax.Array
    reference_bm: jax.Array
    processed_db: jax.Array
    processed_bm: jax.Array
    reference_sl: jax.Array
    processed_sl: jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class PreparedPair:
    """One pair after the host-side steps (float64 numpy).

    reference_24k, processed_24k: (n,) trimmed and aligned at 24 kHz (NAL-R applied to the
    reference when equalisation == 1). params: EarParams of numpy arrays. Also the input lag and
    trim bounds (in 24 kHz samples before trimming), for inspection.
    """

    reference_24k: np.ndarray
    processed_24k: np.ndarray
    params: EarParams
    level1: float
    lag: int
    trim_start: int
    trim_stop: int

    @property
    def n(self) -> int:
        return len(self.reference_24k)


def ear_params(hearing_loss_6, equalisation: int) -> EarParams:
    """EarParams for a (6,) loss at 250, 500, 1000, 2000, 4000, 6000 Hz (dB HL)."""
    loss = _check_loss(hearing_loss_6)
    _check_equalisation(equalisation)
    cf = preprocess.center_frequencies()
    processed = preprocess.loss_parameters(loss, cf)
    reference = (preprocess.loss_parameters(np.zeros(len(loss)), cf) if equalisation == 0
                 else processed)
    _, control_bw, _, _, _ = preprocess.loss_parameters(np.full(6, 100), cf)
    stacked = [np.stack([r, p]) for r, p in zip(reference, processed)]
    return EarParams(
        center_freq=cf, control_bandwidth=control_bw,
        control_pole=preprocess.gammatone_pole(control_bw, cf),
        attn_ohc=stacked[0], bandwidth_min=stacked[1], low_knee=stacked[2],
        compression_ratio=stacked[3], attn_ihc=stacked[4],
        pole_min=preprocess.gammatone_pole(stacked[1], cf),
        control_gain=preprocess.gammatone_gain(preprocess.gammatone_pole(control_bw, cf)),
        gain_min=preprocess.gammatone_gain(preprocess.gammatone_pole(stacked[1], cf)))


def _check_loss(hearing_loss_6) -> np.ndarray:
    loss = np.asarray(hearing_loss_6, dtype=np.float64)
    if loss.shape != (6,):
        raise ValueError(f"hearing_loss_6 must have 6 levels (250..6000 Hz), got shape "
                         f"{loss.shape}")
    if not np.all(np.isfinite(loss)):
        raise ValueError(f"hearing_loss_6 has non-finite levels: {loss}")
    return loss


def _check_equalisation(equalisation) -> None:
    if equalisation not in (0, 1, 2):
        raise ValueError(f"equalisation must be 0, 1 or 2, got {equalisation!r}")


#: The lowest input rate. Resampling goes from the rate rounded to whole kHz (pyclarity's
#: rule): 500-999 Hz would be read as 1 kHz, i.e. played up to 2x too fast (pyclarity
#: scores that; we refuse it), and below 500 Hz as 0 kHz (pyclarity divides by zero).
MIN_SAMPLE_RATE = 1000.0
#: The loudest signal accepted, dB SPL (level1 + 20 log10 RMS): far above any real sound
#: (130-140 dB is the threshold of pain), well below float32 overflow in the ear model.
MAX_LEVEL_DB_SPL = 200.0
#: The level1 accepted, dB SPL of RMS 1. Beyond it float32 breaks down (level1 -1000 scored
#: 0.162 against float64's and pyclarity's 0.178; +425 with samples of ~1e-18 moved a score by
#: 5e-2), and no real scale needs it: at -300 every representable signal is inaudible, at +300
#: a 65 dB SPL signal has RMS 2e-12.
LEVEL1_RANGE_DB = (-300.0, 300.0)


def check_sample_rate(sample_rate, name: str) -> float:
    """Returns `sample_rate` as a float; ValueError naming `name` unless it is a rate in Hz
    (a number, or a 0-d numpy array as pyclarity takes)."""
    if isinstance(sample_rate, np.ndarray) and sample_rate.ndim == 0:
        sample_rate = sample_rate[()]
    if isinstance(sample_rate, (bool, np.bool_)) or not isinstance(
            sample_rate, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number in Hz, got {sample_rate!r}")
    if not np.isfinite(sample_rate) or sample_rate < MIN_SAMPLE_RATE:
        raise ValueError(f"{name} must be at least {MIN_SAMPLE_RATE:g} Hz, got {sample_rate}")
    return float(sample_rate)


def check_level1(level1, name: str = "level1") -> float:
    """A scalar level1 (a size-1 array is accepted, as pyclarity does) as a float within
    LEVEL1_RANGE_DB (pyclarity takes any value)."""
    try:
        value = np.asarray(level1, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number (dB SPL of RMS 1), got {level1!r}") from None
    if value.size != 1:
        raise ValueError(f"{name} must be one number (dB SPL of RMS 1), got shape {value.shape}")
    value = float(value.reshape(()))
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    low, high = LEVEL1_RANGE_DB
    if not low <= value <= high:
        raise ValueError(f"{name} must be within [{low:g}, {high:g}] dB SPL (of RMS 1), got "
                         f"{value:g}: check the signal's scale and the level rule")
    return value


def warn_if_integer_samples(x, name: str) -> None:
    """Integer PCM is scored at its face value (+-32767 for int16), as pyclarity does: ~90 dB
    louder than the same audio in [-1, 1]. Almost always a mistake, so say so."""
    if np.asarray(x).dtype.kind in "iu":
        warnings.warn(f"{name} has integer samples ({np.asarray(x).dtype}), scored at face "
                      "value; scale PCM into [-1, 1] first (e.g. int16 / 32768)",
                      stacklevel=5)  # the caller of haaqi_v1 / haaqi_batch


def check_real(x, name: str) -> None:
    """Complex samples would lose their imaginary part to a float cast with only numpy's
    ComplexWarning; refuse them by name."""
    if np.iscomplexobj(x):
        raise ValueError(f"{name} must hold real samples, got dtype {np.asarray(x).dtype}")


def _check_signal(x, sample_rate, name: str) -> np.ndarray:
    check_real(x, name)
    warn_if_integer_samples(x, name)
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D signal, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} has non-finite samples (first at index "
                         f"{int(np.flatnonzero(~np.isfinite(x))[0])})")
    check_sample_rate(sample_rate, f"{name} sample rate")
    return x


def _check_level(x: np.ndarray, level1: float, name: str) -> None:
    rms = float(np.sqrt(np.mean(np.square(x))))
    if rms > 0 and level1 + 20 * np.log10(rms) > MAX_LEVEL_DB_SPL:
        raise ValueError(
            f"{name} plays at {level1 + 20 * np.log10(rms):.0f} dB SPL (level1 {level1:g} + "
            f"20 log10 RMS {rms:.3g}), above {MAX_LEVEL_DB_SPL:g}: check the sample scale "
            "(integer PCM?) and level1")


def prepare_pair(reference, reference_sr: float, processed, processed_sr: float,
                 hearing_loss_6, equalisation: int, level1: float) -> PreparedPair:
    """Host-side front of pyclarity's ear_model, up to and including the trim and NAL-R.

    Resamples both signals to 24 kHz, truncates them to the shorter, aligns the processed
    signal by the |cross-covariance| peak (minus 2 ms), trims both to the reference's span
    above 0.001 of its peak, and for equalisation 1 applies the 141-tap NAL-R FIR to the
    reference (with its 70-sample advance).

    Raises:
      ValueError: on empty, non-finite or silent input, a signal above 200 dB SPL, a bad rate,
        level1, loss or equalisation.
    """
    reference = _check_signal(reference, reference_sr, "reference")
    processed = _check_signal(processed, processed_sr, "processed")
    level1 = check_level1(level1)
    _check_level(reference, level1, "reference")
    _check_level(processed, level1, "processed")
    params = ear_params(hearing_loss_6, equalisation)
    ref = preprocess.resample_24khz(reference, reference_sr)
    proc = preprocess.resample_24khz(processed, processed_sr)
    n = min(len(ref), len(proc))
    ref, proc = ref[:n], proc[:n]
    lag = preprocess.input_lag(ref, proc)
    proc = preprocess.shift_processed(proc, lag)
    start, stop = preprocess.trim_bounds(ref)
    ref, proc = ref[start:stop], proc[start:stop]
    if equalisation == 1:
        ref = preprocess.apply_nalr(ref, _check_loss(hearing_loss_6))
    return PreparedPair(reference_24k=ref, processed_24k=proc, params=params,
                        level1=float(level1), lag=lag, trim_start=start, trim_stop=stop)


# ----------------------------------------------------------------------------- JAX core


def _gammatone_gain(pole: jax.Array) -> jax.Array:
    """2 (1-a)^4 / (1 + 4a + 4a^2) in the stable factored form (the expansion cancels to 0 in
    float32 at 80 Hz)."""
    return 2.0 * (1 - pole) ** 4 / (1 + 4.0 * pole + 4.0 * pole * pole)


def _theta(center_freq):
    return (2 * np.pi / SAMPLE_RATE) * center_freq


def _group_delay_samples(pole: jax.Array, one_minus_pole: jax.Array) -> jax.Array:
    """Integer DC group delay of the gammatone b/a (pole a, and 1 - a computed accurately).

    float64: evaluated as scipy.signal.group_delay does (pyclarity's rounding). float32: the
    closed form 4a/(1-a) + 4a/(1+2a), as scipy's ratio of sums cancels to noise there; with
    1 - a from expm1, as 1 - a from a rounded a ~ 0.99 is off by ~4e-6, which moved delays
    of ~200 samples across a rounding boundary (a 2.9e-4 change of a 0.45 s clip's HAAQI).
    """
    if pole.dtype != jnp.float64:
        return jnp.rint(4 * pole / one_minus_pole + 4 * pole / (1 + 2 * pole)).astype(jnp.int32)
    a1, a5 = 4.0 * pole, 4.0 * pole * pole
    a2, a3, a4 = -6.0 * pole * pole, 4.0 * pole * pole * pole, -pole * pole * pole * pole
    b = [jnp.ones_like(pole), a1, a5]
    den_rev = [-a4, -a3, -a2, -a1, jnp.ones_like(pole)]      # a[::-1] with a = [1,-a1,..,-a4]
    c = []
    for k in range(7):
        terms = [b[i] * den_rev[k - i] for i in range(3) if 0 <= k - i < 5]
        total = terms[0]
        for t in terms[1:]:
            total = total + t
        c.append(total)
    num, den = c[6] * 6, c[6]
    for k in range(5, -1, -1):                               # Horner at z = 1, highest first
        num = num + c[k] * k
        den = den + c[k]
    return jnp.rint(num / den - 5 + 1).astype(jnp.int32)


def _band_group(mid, n, level1, cf, control_bw, control_pole, bw_min, attn_ohc, low_knee,
                ratio, attn_ihc, pole_min, control_gain, gain_min, *, block):
    """One group of G bands for both signals. mid: (2, N). Per-band args: (G,) or (2, G)."""
    length = mid.shape[-1]
    valid = jnp.arange(length) < n
    theta = _theta(cf)                                              # (G,)
    x = mid[:, None, :]                                             # (2, 1, N)

    # Wide control filter -> level-dependent bandwidth of the main filter.
    control_re, control_im = filters.gammatone_parts(x, control_pole, theta, block=block)
    control = jnp.sqrt(control_re * control_re + control_im * control_im)
    control = jnp.where(valid, control_gain[:, None] * control, 0)  # (2, G, N)
    control_rms = jnp.sqrt(filters.masked_mean(control**2, n))      # (2, G)
    control_db = 20 * jnp.log10(control_rms) + level1
    bandwidth = jnp.where(
        control_db < 50, bw_min,
        jnp.where(control_db > 100, control_bw,
                  bw_min + ((control_db - 50) / 50) * (control_bw - bw_min)))
    erb = 24.7 + (cf / 9.26449)
    pole = jnp.where(
        control_db < 50, pole_min,
        jnp.where(control_db > 100, control_pole,
                  jnp.exp(-(bandwidth * (2 * np.pi / SAMPLE_RATE) * erb * 1.019))))  # (2, G)
    band_re, band_im = filters.gammatone_parts(x, pole, jnp.broadcast_to(theta, pole.shape),
                                               block=block)
    gain = jnp.where(control_db < 50, gain_min,
                     jnp.where(control_db > 100, control_gain, _gammatone_gain(pole)))[..., None]
    env = jnp.where(valid, gain * jnp.sqrt(band_re * band_re + band_im * band_im), 0)
    bm = jnp.where(valid, gain * band_re, 0)
    average = jnp.sqrt(filters.masked_mean(env**2, n))

    env, bm = compress(env, bm, control, attn_ohc, low_knee, ratio, level1, block=block)
    # Materialise once: otherwise XLA re-evaluates the compression's log/pow chain inside each
    # of the four FFT zero-padding fusions of the alignment search below.
    env, bm = jax.lax.optimization_barrier(
        (jnp.where(valid, env, 0), jnp.where(valid, bm, 0)))

    # Align the processed envelope and BM to the reference (separately).
    env_lag, aligned_env = filters.align_envelope(env[0], env[1], n, ALIGN_MAX_LAG)
    bm_lag, aligned_bm = filters.align_envelope(bm[0], bm[1], n, ALIGN_MAX_LAG)
    env = env.at[1].set(aligned_env)
    bm = bm.at[1].set(aligned_bm)

    db, bm = envelope_sl(env, bm, attn_ihc, level1)
    db = jnp.where(valid, db, 0)
    adapted, bm = ihc_adaptation(db, bm, block=block)
    bm = jnp.where(valid, bm, 0)
    adapted = jnp.where(valid, adapted, 0)
    return dict(db=adapted, bm=bm, bandwidth=bandwidth, average=average,
                control_average=control_rms, lags=jnp.stack([env_lag, bm_lag]))


def compress(env, bm, control, attn_ohc, low_knee, ratio, level1, *, block=32):
    """OHC compression (pyclarity's env_compress_basilar_membrane) along the last axis.

    env, bm, control: (..., N); attn_ohc, low_knee, ratio: (...,) per band. The gain follows
    the control level between the knee and 100 dB SPL, smoothed by an 800 Hz 1-pole low-pass.
    """
    log_control = level1 + 20 * jnp.log10(jnp.maximum(control, _SMALL))
    log_control = jnp.maximum(jnp.minimum(log_control, _UPPER_KNEE), low_knee[..., None])
    gain_db = -attn_ohc[..., None] - (log_control - low_knee[..., None]) * (
        1 - (1 / ratio[..., None]))
    lp_b, lp_a = _butter1(800.0)
    # exp, not 10 ** x: XLA:CPU evaluates a power as exp(y log x) per sample, log(10) included.
    smooth = filters.iir(jnp.exp(gain_db * (np.log(10.0) / 20)), lp_b, lp_a, block=block)
    return smooth * env, smooth * bm


def envelope_sl(env, bm, attn_ihc, level1):
    """Envelope to dB above the impaired threshold, and BM rescaled to that envelope."""
    db = jnp.maximum(level1 - attn_ihc[..., None] + 20 * jnp.log10(env + _SMALL), 0)
    return db, (db + _SMALL) / (env + _SMALL) * bm


def ihc_adaptation(db, bm, *, block=32):
    """pyclarity's inner_hair_cell_adaptation (rapid 2 ms + short-term 60 ms), last axis."""
    mat, vec, out = _ihc_state_space(db.dtype)
    v1 = filters.lti_filter(db, mat, vec, out, block=block)
    adapted = jnp.maximum((db - v1) * _IHC_R1_INV, 0)
    return adapted, (adapted + _SMALL) / (db + _SMALL) * bm


def _butter1(cutoff: float):
    b, a = scipy.signal.butter(1, cutoff / (0.5 * SAMPLE_RATE))
    return np.asarray(b), np.asarray(a)


def _ihc_constants():
    """pyclarity's RC-circuit IHC adaptation (delta 2, 2 ms and 60 ms) as a 2-state system."""
    delta = max(2, 1.0001)
    tau1, tau2 = 0.001 * 2, 0.001 * 60
    dt = 1 / SAMPLE_RATE
    r1 = 1 / delta
    r2 = 0.5 * (1 - r1)
    r3 = r2
    c1 = tau1 * (r1 + r2) / (r1 * r2)
    c2 = tau2 / ((r1 + r2) * r3)
    a11 = r1 + r2 + r1 * r2 * (c1 / dt)
    a12 = -r1
    a21 = -r3
    a22 = r2 + r3 + r2 * r3 * (c2 / dt)
    denom = 1 / ((a11 * a22) - (a21 * a12))
    p1 = r1 * r2 * (c1 / dt)
    p2 = r2 * r3 * (c2 / dt)
    # v1' = denom (a22 (v0 r2 + p1 v1) - a12 p2 v2); v2' = denom (-a21 (v0 r2 + p1 v1) + a11 p2 v2)
    mat = denom * np.array([[a22 * p1, -a12 * p2], [-a21 * p1, a11 * p2]])
    vec = denom * np.array([a22 * r2, -a21 * r2])
    return mat, vec, 1 / r1


_IHC_MAT, _IHC_VEC, _IHC_R1_INV = _ihc_constants()


def _ihc_state_space(dtype):
    return (jnp.asarray(_IHC_MAT, dtype), jnp.asarray(_IHC_VEC, dtype),
            jnp.asarray([1.0, 0.0], dtype))


def _middle_ear(x: jax.Array, block: int) -> jax.Array:
    """1-pole low-pass at 5 kHz, then the 2-pole Butterworth high-pass at 350 Hz.

    The high-pass runs as its double zero at DC (b0 (1 - z^-1)^2) first, then its pole pair as
    two complex first-order sections: a direct form would carry the ~240x low-frequency gain of
    1/a(z) in its state and lose the low bands' (80-200 Hz) content to cancellation.
    """
    b, a = scipy.signal.butter(1, 5000 / (0.5 * SAMPLE_RATE))
    x = filters.iir(x, b, a, block=block)
    b, a = scipy.signal.butter(2, 350 / (0.5 * SAMPLE_RATE), "high")
    pad = [(0, 0)] * (x.ndim - 1)
    x = b[0] * (x - 2 * jnp.pad(x[..., :-1], pad + [(1, 0)]) + jnp.pad(x[..., :-2], pad + [(2, 0)]))
    pole = complex(np.roots(a)[np.argmax(np.roots(a).imag)])
    cdtype = jnp.complex128 if x.dtype == jnp.float64 else jnp.complex64
    mat = jnp.asarray([[pole, 0], [pole, np.conj(pole)]], cdtype)
    vec = jnp.asarray([1, 1], cdtype)
    out = jnp.asarray([0, 1], cdtype)
    return filters.lti_filter(x, mat, vec, out, block=block).real


def _convert_rms_to_sl(average, control, attn_ohc, low_knee, ratio, attn_ihc, level1):
    control_db = level1 + 20 * jnp.log10(jnp.maximum(control, _SMALL))
    control_db = jnp.maximum(jnp.minimum(control_db, _UPPER_KNEE), low_knee)
    gain = -attn_ohc - (control_db - low_knee) * (1 - (1 / ratio))
    level = jnp.maximum(level1 + 20 * jnp.log10(jnp.maximum(average, _SMALL)), 0)
    return jnp.maximum(level + gain - attn_ihc, 0)


def ear_model_core(reference: jax.Array, processed: jax.Array, n: jax.Array,
                   params: EarParams, reference_noise: jax.Array, processed_noise: jax.Array,
                   level1: jax.Array, *, bands_per_step: int = 8,
                   block: int = 32) -> EarOutputs:
    """The cochlear model on prepared, left-aligned buffers; jit- and vmap-able.

    Args:
      reference, processed: (N_max,) 24 kHz signals from `prepare_pair`, zero past n.
      n: () int32 valid length. params: EarParams (arrays of the compute dtype).
      reference_noise, processed_noise: (32, N_max) standard-normal threshold noise (only
        [:, :n] is used; pyclarity draws reference first, then processed).
      level1: () dB SPL of a signal with RMS 1.
      bands_per_step: bands processed together (static; 32 must divide by it): memory is
        about 40 (2, bands_per_step, N_max) arrays at a time.
      block: block length of the blocked IIR evaluation (static).

    Returns:
      EarOutputs, as pyclarity's ear_model after the threshold noise and the group-delay
      compensation, zero past n.
    """
    return _ear_model(reference, processed, n, params, reference_noise, processed_noise,
                      level1, bands_per_step=bands_per_step, block=block)[0]


def _ear_model(reference, processed, n, params, reference_noise, processed_noise, level1, *,
               bands_per_step, block):
    if NUM_BANDS % bands_per_step:
        raise ValueError(f"bands_per_step must divide {NUM_BANDS}, got {bands_per_step}")
    dtype = jnp.result_type(reference, processed)
    length = reference.shape[-1]
    n = jnp.asarray(n, jnp.int32)
    level1 = jnp.asarray(level1, dtype)
    valid = jnp.arange(length) < n
    signals = jnp.where(valid, jnp.stack([reference, processed]).astype(dtype), 0)
    mid = jnp.where(valid, _middle_ear(signals, block), 0)

    groups = NUM_BANDS // bands_per_step

    def per_group(g):
        def band(x):
            return jnp.asarray(x, dtype).reshape(x.shape[:-1] + (groups, bands_per_step))[..., g, :]
        return _band_group(
            mid, n, level1, band(params.center_freq), band(params.control_bandwidth),
            band(params.control_pole), band(params.bandwidth_min), band(params.attn_ohc),
            band(params.low_knee), band(params.compression_ratio), band(params.attn_ihc),
            band(params.pole_min), band(params.control_gain), band(params.gain_min),
            block=block)

    out = jax.lax.map(per_group, jnp.arange(groups))
    # (groups, 2, G, ...) -> (2, 32, ...)
    out = jax.tree.map(lambda v: jnp.moveaxis(v, 0, 1).reshape(
        (v.shape[1], NUM_BANDS) + v.shape[3:]), out)

    noise_gain = 10 ** ((IHC_THRESHOLD_DB - level1) / 20)
    noise = jnp.stack([reference_noise, processed_noise]).astype(dtype)
    bm = jnp.where(valid, out["bm"] + noise_gain * noise, 0)

    # Group-delay compensation from the reference's bandwidths, for both signals.
    erb = 24.7 + (jnp.asarray(params.center_freq, dtype) / 9.26449)
    # (group_delay_compensate multiplies in this order, unlike the gammatone)
    exponent = (2 * np.pi / SAMPLE_RATE) * 1.019 * out["bandwidth"][0] * erb
    raw_delay = _group_delay_samples(jnp.exp(-exponent), -jnp.expm1(-exponent))
    delay = raw_delay - jnp.min(raw_delay)
    correct = jnp.max(delay) - delay                                # (32,)
    db = filters.shift_with_zero_fill(out["db"], -correct, n)
    bm = filters.shift_with_zero_fill(bm, -correct, n)

    p = jax.tree.map(lambda v: jnp.asarray(v, dtype), params)
    sl = _convert_rms_to_sl(out["average"], out["control_average"], p.attn_ohc, p.low_knee,
                            p.compression_ratio, p.attn_ihc, level1)
    outputs = EarOutputs(reference_db=db[0], reference_bm=bm[0], processed_db=db[1],
                         processed_bm=bm[1], reference_sl=sl[0], processed_sl=sl[1])
    internals = dict(envelope_lag=out["lags"][0], bm_lag=out["lags"][1], group_delay=raw_delay,
                     bandwidth=out["bandwidth"])
    return outputs, internals


def ear_model_internals(reference, processed, n, params, reference_noise, processed_noise,
                        level1, *, bands_per_step: int = 8, block: int = 32) -> dict:
    """The integer decisions of `ear_model_core`, for inspection and tests.

    Returns a dict: envelope_lag, bm_lag (32,) processed-to-reference alignment lags (pyclarity's
    envelope_align delay), group_delay (32,) integer gammatone delays before the min is removed,
    bandwidth (2, 32) level-adjusted bandwidths.
    """
    return _ear_model(reference, processed, n, params, reference_noise, processed_noise, level1,
                      bands_per_step=bands_per_step, block=block)[1]


@functools.partial(jax.jit, static_argnames=("bands_per_step", "block"))
def _core_jit(reference, processed, n, params, reference_noise, processed_noise, level1, *,
              bands_per_step=8, block=32):
    return ear_model_core(reference, processed, n, params, reference_noise, processed_noise,
                          level1, bands_per_step=bands_per_step, block=block)


def ear_model(reference, reference_sr: float, processed, processed_sr: float, hearing_loss_6,
              equalisation: int, level1: float, reference_noise=None, processed_noise=None):
    """Drop-in for pyclarity's eb.ear_model (float64): prepare on the host, run the core
    (on the host CPU where JAX's default backend lacks float64: `placement.float64_placement`).

    Noise not given is drawn from numpy's global generator after all other work, reference
    first, as pyclarity does (so seeding np.random identically reproduces it).

    Returns:
      (reference_db, reference_bm, processed_db, processed_bm, reference_sl, processed_sl,
      24000.0), numpy arrays of the trimmed length n.
    """
    pair = prepare_pair(reference, reference_sr, processed, processed_sr, hearing_loss_6,
                        equalisation, level1)
    n = pair.n
    if reference_noise is None:
        reference_noise = np.random.standard_normal((NUM_BANDS, n))
    if processed_noise is None:
        processed_noise = np.random.standard_normal((NUM_BANDS, n))
    for name, noise in (("reference_noise", reference_noise),
                        ("processed_noise", processed_noise)):
        if np.shape(noise) != (NUM_BANDS, n):
            raise ValueError(f"{name} must have shape {(NUM_BANDS, n)}, got {np.shape(noise)}")
    # Pad to a 0.25 s bucket so that nearby lengths share one compiled core.
    n_max = -(-n // _BUCKET) * _BUCKET

    def padded(x):
        x = np.asarray(x, np.float64)
        return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n_max - n)])

    with jax.enable_x64(True), placement.float64_placement():   # the host CPU on a TPU host
        out = _core_jit(jnp.asarray(padded(pair.reference_24k)),
                        jnp.asarray(padded(pair.processed_24k)), jnp.asarray(n, jnp.int32),
                        jax.tree.map(jnp.asarray, pair.params),
                        jnp.asarray(padded(reference_noise)), jnp.asarray(padded(processed_noise)),
                        jnp.asarray(level1, jnp.float64))
        out = jax.tree.map(lambda v: np.asarray(v)[..., :n] if np.ndim(v) == 2 else np.asarray(v),
                           out)
    return (out.reference_db, out.reference_bm, out.processed_db, out.processed_bm,
            out.reference_sl, out.processed_sl, SAMPLE_RATE)
