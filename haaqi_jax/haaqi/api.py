"""Public HAAQI functions: pyclarity-compatible `haaqi_v1` / `compute_haaqi` (float64, one pair)
and `haaqi_batch` (many pairs, one jit-compiled ear model + back end, float32 or float64).

Host side (numpy, per item, data-dependent shapes): resample to 24 kHz, align, trim, NAL-R
(`ear_model.prepare_pair`). Device side (fixed shapes): the trimmed signals are left-aligned in
buffers whose length is rounded up to a bucket (`bucket_length`, so new lengths rarely
recompile) with the true length carried along; `ear_model.ear_model_core` and
`backend.haaqi_backend` mask everything past it.

Follows pyclarity 0.9.0 (clarity/evaluator/haaqi/haaqi.py; Kates & Arehart 2016):
MIT License, Copyright (c) 2022 The PyClarity Team.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import math
import warnings
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from haaqi_jax.audiogram import (HAAQI_FREQUENCIES, STANDARD_FREQUENCIES, Audiogram,
                                 is_audiogram)
from haaqi_jax.haaqi import backend
from haaqi_jax.haaqi import ear_model
from haaqi_jax.haaqi import placement
from haaqi_jax.haaqi.backend import HAAQIResult
from haaqi_jax.host_cpus import usable_cpu_count

logger = logging.getLogger(__name__)

NUM_BANDS = backend.NUM_BANDS
#: Buffers are whole multiples of this many 24 kHz samples (one 16 ms covariance window).
BUCKET_UNIT = 384
#: XLA's scratch for one chunk item on a CPU, in bytes per 24 kHz buffer sample at 8 bands per
#: step (`memory_analysis()` of the compiled scorer: 2,306 in float32, 3,587 in float64). XLA's
#: YNNPACK fusions allocate their own intermediates on top of it (benchmarks/README.md).
CPU_SCRATCH_BYTES_PER_SAMPLE = {4: 2_310, 8: 3_590}
#: Default scratch budget of one CPU chunk: below `host_memory.DEFAULT_THRESHOLD_BYTES` (1 GiB),
#: so that under `keep_freed_memory()` (the CLI, train.py) each call reuses the heap pages of
#: the last one. A larger scratch is mapped afresh by glibc on every call: 3 ten-second clips
#: per chunk (1.6 GB) took 1.25 million page faults per batch of 8 and 17-26 % more time per
#: clip than 1 clip per chunk (benchmarks/README.md, 2026-11-29). One item is the least a
#: chunk holds, so a float32 item longer than ~16 s (float64: ~10 s) still exceeds the budget,
#: and one longer than ~18 s (float64: ~12 s) exceeds the 1 GiB threshold and pays those faults
#: (buffer lengths are bucketed: `bucket_length`).
CPU_CHUNK_BYTES = 900 * 2 ** 20
#: Accelerator memory per 24 kHz buffer sample of one chunk item (float32, all 32 bands in one
#: step), measured on an H100: chunks of 16, 32 and 64 ten-second clips peaked at 10.9, 21.7
#: and 43.4 GB (2.76-2.77 kB per sample). float64 doubles it.
ACCELERATOR_BYTES_PER_SAMPLE = 2_800
#: Share of an accelerator's memory limit that a default chunk may fill.
ACCELERATOR_MEMORY_SHARE = 0.6


def default_chunking(length: int, devices: Sequence, dtype=np.float32) -> tuple[int, int]:
    """Default (chunk, bands_per_step) for buffers of `length` samples on `devices`.

    CPU: as many items as keep XLA's scratch within CPU_CHUNK_BYTES (one ten-second clip,
    five of 3 s; at least one) and 8 bands per step (host memory is shared with everything
    else). Accelerators (GPU, TPU): all 32 bands in one step and as many items as fill
    ACCELERATOR_MEMORY_SHARE of the smallest device's memory limit, per device; a wide chunk
    is what keeps the sequential block scans of the ear model busy (on an H100, 3 items per
    call ran at 0.32 s per ten-second clip, 64 items at 0.011 s).

    Args:
      length: buffer length in 24 kHz samples; devices: the local devices that share a chunk.
    Returns:
      (items per call over all devices, bands_per_step).
    Raises:
      ValueError for a dtype other than float32 and float64.
    """
    limits = []
    for device in devices:
        try:
            stats = device.memory_stats() if device.platform != "cpu" else None
        except Exception:  # noqa: BLE001 -- a backend without memory statistics: CPU rule
            stats = None
        limits.append((stats or {}).get("bytes_limit"))
    if np.dtype(dtype) not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {np.dtype(dtype)}")
    if not limits or None in limits:
        item_bytes = CPU_SCRATCH_BYTES_PER_SAMPLE[np.dtype(dtype).itemsize] * length
        return max(1, CPU_CHUNK_BYTES // item_bytes), 8
    item_bytes = ACCELERATOR_BYTES_PER_SAMPLE * length * (np.dtype(dtype).itemsize // 4)
    per_device = max(1, int(ACCELERATOR_MEMORY_SHARE * min(limits) // item_bytes))
    return per_device * len(devices), NUM_BANDS


# ----------------------------------------------------------------------------------------------
# Helpers


def hearing_loss_6(audiogram) -> np.ndarray:
    """(6,) dB HL at HAAQI's 250..6000 Hz from an Audiogram (ours or pyclarity's) or 8 standard
    levels; validated, interpolated linearly in log frequency and clamped at the ends."""
    return np.asarray(Audiogram.from_any(audiogram).resample(HAAQI_FREQUENCIES).levels)


def bucket_length(n: int) -> int:
    """Buffer length (24 kHz samples) for a valid length n: n rounded up to BUCKET_UNIT times
    a number of units that is at most 16 or has at most 4 significant bits (8..15 times a
    power of 2). That is under 12.5 % padding once n exceeds 8 units (3,072 samples, 128 ms);
    a shorter n is only rounded up to whole units (385 samples -> 768)."""
    units = max(1, math.ceil(n / BUCKET_UNIT))
    if units > 16:
        step = 1 << (units.bit_length() - 4)
        units = -(-units // step) * step
    return units * BUCKET_UNIT


def _mix32(x: jax.Array) -> jax.Array:
    """The "lowbias32" integer hash (C. Wellons): a bijection of uint32 with full avalanche."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def threshold_noise(key: jax.Array, length: int, dtype=jnp.float32) -> jax.Array:
    """(2, 32, length) standard normals (reference, processed) for one item's IHC threshold
    noise; sample t is the same for every `length` > t.

    Counter-based: sample t of row r (2 x 32 rows) is a function of (key, 64 t + r) only, two
    rounds of an integer hash seeded from the key, then the normal quantile of a 23-bit
    uniform (`open_unit_uniform`; |x| < 5.3). This is ~3x cheaper than drawing with threefry
    (which was ~17 % of `haaqi_batch`'s time); for threshold noise 10 dB below audibility its
    quality is ample (tests check the moments, a KS test against the normal law and
    independence across rows, lags and keys). Counters wrap after 2**26 samples (46 min at
    24 kHz).
    """
    seed = jax.random.bits(key, (2,), jnp.uint32)
    counter = (jnp.arange(length, dtype=jnp.uint32)[None, :] * jnp.uint32(2 * NUM_BANDS)
               + jnp.arange(2 * NUM_BANDS, dtype=jnp.uint32)[:, None])       # (64, length)
    bits = _mix32(_mix32(counter ^ seed[0]) + seed[1])
    # The quantile as sqrt(2) erfinv(2u - 1): XLA's erfinv costs ~20 % less than ndtri here.
    normal = np.sqrt(2.0) * jax.lax.erf_inv(2 * open_unit_uniform(bits, dtype) - 1)
    return normal.reshape(2, NUM_BANDS, length)


def open_unit_uniform(bits: jax.Array, dtype=jnp.float32) -> jax.Array:
    """uint32 bits (any shape) -> uniforms of that shape in `dtype`, elementwise from the top
    23 bits, on the grid (k + 1/2) 2^-23, k < 2^23: strictly inside (0, 1)
    in float32 too. (With 24 bits the top value, 1 - 2^-25, rounds to 1.0 in float32, whose
    normal quantile is inf: about one threshold-noise sample in 2^24 was infinite.)"""
    return ((bits >> 9).astype(dtype) + 0.5) * (2.0 ** -23)


def _check_length(n: int, where: str) -> None:
    if n < backend.MIN_LENGTH:
        raise ValueError(
            f"{where}: only {n} samples at 24 kHz are left to compare (both signals cut to "
            f"the shorter one, then the reference's leading/trailing silence trimmed); HAAQI "
            f"needs at least {backend.MIN_LENGTH} (16 ms)")


def _pad(x: np.ndarray, length: int, dtype) -> np.ndarray:
    out = np.zeros(x.shape[:-1] + (length,), dtype=dtype)
    out[..., :x.shape[-1]] = x
    return out


def _cast_params(params, dtype):
    return jax.tree.map(lambda v: np.asarray(v, dtype=dtype), params)


def _result_floats(result: HAAQIResult) -> HAAQIResult:
    return jax.tree.map(lambda v: np.asarray(v, dtype=np.float64), result)


# ----------------------------------------------------------------------------------------------
# One pair, pyclarity-compatible


@jax.jit
def _ear_and_loud_frames(reference, processed, n, params, reference_noise, processed_noise,
                         level1, silence_threshold):
    ear = ear_model.ear_model_core(reference, processed, n, params, reference_noise,
                                   processed_noise, level1)
    smooth, frames = backend.env_smooth(ear.reference_db, n)
    return ear, jnp.sum(backend.loud_frames(smooth, frames, silence_threshold))


@functools.partial(jax.jit, static_argnames=("segment_covariance",))
def _backend_jit(ear, n, silence_threshold, add_noise, envelope_noise, segment_covariance):
    return backend.haaqi_backend(
        ear.reference_db, ear.reference_bm, ear.processed_db, ear.processed_bm,
        ear.reference_sl, ear.processed_sl, n, silence_threshold=silence_threshold,
        add_noise=add_noise, envelope_noise=envelope_noise, segment_covariance=segment_covariance)


def haaqi_v1(reference, reference_freq: float, processed, processed_freq: float, audiogram,
             equalisation: int, level1: float = 65.0, silence_threshold: float = 2.5,
             add_noise: float = 0.0, segment_covariance: int = 16, *,
             reference_noise=None, processed_noise=None
             ) -> tuple[float, float, float, list[float]]:
    """HAAQI of one pair, as pyclarity's `haaqi_v1` computes it (float64).

    Runs on JAX's default backend, or on the host CPU where that lacks float64 (TPUs:
    `placement.float64_placement`), with the same results.

    Args:
      reference: (N,) clean reference. reference_freq: its sample rate, Hz.
      processed: (M,) processed signal. processed_freq: its sample rate, Hz.
      audiogram: pyclarity's or haaqi_jax's Audiogram (or 8 levels at the standard frequencies);
        interpolated onto 250..6000 Hz.
      equalisation: 1 = apply NAL-R to the reference; 2 = the reference is already amplified.
        (0, accepted as pyclarity accepts it, is its ear model's intelligibility mode: the
        reference through a normal-hearing ear, no NAL-R; not a HAAQI convention.)
      level1: dB SPL of a signal with RMS 1 (a size-1 array is accepted, as in pyclarity).
      silence_threshold: dB SL below which frames/segments are ignored.
      add_noise: standard deviation (dB) of noise added to the envelopes before the cepstra.
      segment_covariance: BM covariance segment length, ms.
      reference_noise, processed_noise: optional (32, n) standard-normal IHC threshold noise for
        the trimmed length n. If omitted they are drawn from numpy's GLOBAL generator, reference
        first, then (after the ear model, as pyclarity does) the two (32, kept-frames) envelope
        noises; so `np.random.seed(s)` before the call reproduces pyclarity's call, and the
        generator ends in the same state.

    Returns:
      (combined, nonlinear, linear, [cephigh, bmsync5, d_loud, d_norm]) as Python floats.

    Raises:
      ValueError: empty / non-finite / silent input, an invalid audiogram or equalisation, a
        reference shorter than 16 ms after trimming, or noise of the wrong shape.
      TypeError: under jax.jit / vmap / grad (the preparation runs on the host, in numpy).
    """
    from haaqi_jax.tracing import refuse_traced
    refuse_traced("haaqi_v1", reference, processed)
    if segment_covariance != int(segment_covariance) or segment_covariance < 2:
        raise ValueError(f"segment_covariance must be a whole number of ms >= 2, got "
                         f"{segment_covariance}")
    level1 = ear_model.check_level1(level1)
    for name, value in (("silence_threshold", silence_threshold), ("add_noise", add_noise)):
        if not isinstance(value, (int, float, np.integer, np.floating)) or not np.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    loss = hearing_loss_6(audiogram)
    pair = ear_model.prepare_pair(reference, reference_freq, processed, processed_freq, loss,
                                  equalisation, level1)
    n = pair.n
    _check_length(n, "haaqi_v1")
    noises = []
    for name, noise in (("reference_noise", reference_noise),
                        ("processed_noise", processed_noise)):
        noise = np.random.standard_normal((NUM_BANDS, n)) if noise is None else np.asarray(
            noise, dtype=np.float64)
        if noise.shape != (NUM_BANDS, n):
            raise ValueError(f"{name} must have shape {(NUM_BANDS, n)} (bands, trimmed length), "
                             f"got {noise.shape}")
        noises.append(noise)
    length = bucket_length(n)
    f = np.float64
    with jax.enable_x64(True), placement.float64_placement():
        args = (_pad(pair.reference_24k, length, f), _pad(pair.processed_24k, length, f),
                np.int32(n), _cast_params(pair.params, f), _pad(noises[0], length, f),
                _pad(noises[1], length, f), f(level1), f(silence_threshold))
        ear, kept = _ear_and_loud_frames(*args)
        kept = int(kept)
        # pyclarity's melcor9 draws these whenever more than one frame is kept.
        frames_max = int(backend.num_frames(length))
        envelope_noise = np.zeros((2, NUM_BANDS, frames_max))
        if kept > 1:
            envelope_noise[0, :, :kept] = np.random.standard_normal((NUM_BANDS, kept))
            envelope_noise[1, :, :kept] = np.random.standard_normal((NUM_BANDS, kept))
        result = _backend_jit(ear, np.int32(n), f(silence_threshold), f(add_noise),
                              (envelope_noise[0], envelope_noise[1]), int(segment_covariance))
        result = _result_floats(result)
    return (float(result.combined), float(result.nonlinear), float(result.linear),
            [float(result.cephigh), float(result.bmsync5), float(result.d_loud),
             float(result.d_norm)])


def compute_haaqi(processed_signal, reference_signal, processed_sample_rate: float,
                  reference_sample_rate: float, audiogram, equalisation: int = 1,
                  level1: float = 65.0) -> float:
    """The combined HAAQI score, as pyclarity's `compute_haaqi` (note: processed first).

    An empty reference scores 1.0 when the processed signal is empty too and 0.0 otherwise (as
    in pyclarity). Otherwise see `haaqi_v1` (float64; on the host CPU where JAX's default
    backend lacks float64, e.g. on a TPU host).
    """
    if len(reference_signal) == 0:
        if len(processed_signal) == 0:
            return 1.0
        logger.error("If `Reference` is empty, `Processed` must be empty as well")
        return 0.0
    score, _, _, _ = haaqi_v1(reference_signal, reference_sample_rate, processed_signal,
                              processed_sample_rate, audiogram, equalisation, level1)
    return score


# ----------------------------------------------------------------------------------------------
# Batches


def _as_batch(name: str, x, batch: int | None = None) -> np.ndarray:
    try:
        arr = np.asarray(x)
    except ValueError:                     # numpy's "inhomogeneous shape": clips of many lengths
        sizes = sorted({np.shape(item) for item in x}, key=str)
        raise ValueError(f"{name}: the items have different shapes ({', '.join(map(str, sizes))}"
                         f"); zero-pad them to one (batch, samples) array and give each item's "
                         f"true length in lengths=") from None
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a (batch, samples) array, got shape {arr.shape}")
    if batch is not None and arr.shape[0] != batch:
        raise ValueError(f"{name} has {arr.shape[0]} items but reference has {batch}")
    ear_model.check_real(arr, name)
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} has no items")
    if arr.shape[1] == 0:
        raise ValueError(f"{name} has no samples (shape {arr.shape})")
    ear_model.warn_if_integer_samples(arr, name)
    return arr


def _per_item(name: str, value, batch: int) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number or ({batch},) numbers, got {value!r}") from None
    if arr.ndim == 0:
        return np.full(batch, float(arr))
    if arr.shape != (batch,):
        raise ValueError(f"{name} must be a scalar or have shape ({batch},), got {arr.shape}")
    return arr


def default_prepare_workers() -> int:
    """Threads for host-side preparation: one per CPU core this process may use (its affinity
    and any container CPU quota: `host_cpus.usable_cpu_count`), at most 16."""
    return min(16, usable_cpu_count())


def prepare_batch(reference, processed, sample_rate: float, audiogram_levels,
                  audiogram_frequencies=STANDARD_FREQUENCIES, *, equalisation: int = 1,
                  level1=65.0, lengths=None, workers: int | None = None
                  ) -> list[tuple[ear_model.PreparedPair | None, str | None]]:
    """Host-side preparation of every item; per-item problems are returned, not raised.

    Use it to find the bad items of a batch (e.g. a labelling tool that must go on): each entry
    is (prepared pair, None) or (None, "item i: reason"). `score_prepared` scores the good ones.
    Arguments as `haaqi_batch`; `workers` threads prepare items side by side (default:
    `default_prepare_workers()`; the FFT-based alignment and resampling release the GIL),
    1 = serial.

    Raises:
      ValueError: only for problems of the whole batch: the arrays' shapes or dtypes (not
        (B, N), empty, complex or non-numeric), equalisation, sample rate, and the shapes of
        audiogram_levels / audiogram_frequencies (one Audiogram, or a list of Audiograms that
        is not B long), level1 and lengths.
      TypeError: under jax.jit / vmap / grad (host-side numpy).
    """
    from haaqi_jax.tracing import refuse_traced
    refuse_traced("prepare_batch", reference, processed)
    reference = _as_batch("reference", reference)
    batch = reference.shape[0]
    processed = _as_batch("processed", processed, batch)
    if processed.shape != reference.shape:
        raise ValueError(f"processed has shape {processed.shape} but reference has "
                         f"{reference.shape}")
    if equalisation not in (1, 2):
        raise ValueError(f"equalisation must be 1 (apply NAL-R) or 2 (already amplified), got "
                         f"{equalisation!r}")
    ear_model.check_sample_rate(sample_rate, "sample_rate")
    if is_audiogram(audiogram_levels):
        raise ValueError(f"audiogram_levels: one Audiogram for {batch} items; give one per "
                         f"item (e.g. [audiogram] * {batch}) or a ({batch}, frequencies) array")
    if isinstance(audiogram_levels, (list, tuple)) and any(map(is_audiogram,
                                                               audiogram_levels)):
        if len(audiogram_levels) != batch:
            raise ValueError(f"{len(audiogram_levels)} audiograms for {batch} items")
        given = list(audiogram_levels)

        def audiogram_of(i: int) -> Audiogram:
            return Audiogram.from_any(given[i])
    else:
        levels = np.asarray(audiogram_levels, dtype=np.float64)
        if levels.ndim != 2 or levels.shape[0] != batch:
            raise ValueError(f"audiogram_levels must have shape ({batch}, frequencies), or be "
                             f"{batch} Audiogram objects, got shape {levels.shape}")
        freqs = np.asarray(audiogram_frequencies, dtype=np.float64)
        if freqs.shape not in ((levels.shape[1],), levels.shape):
            raise ValueError(f"audiogram_levels have {levels.shape[1]} frequencies per item but "
                             f"audiogram_frequencies has shape {freqs.shape}: pass one "
                             f"frequency per level, ({levels.shape[1]},) or {levels.shape}")
        freqs = np.broadcast_to(freqs, levels.shape)

        def audiogram_of(i: int) -> Audiogram:
            return Audiogram(levels[i], freqs[i])
    level1 = _per_item("level1", level1, batch)
    if lengths is None:
        lengths = np.full(batch, reference.shape[1])
    lengths = np.asarray(lengths)
    if lengths.shape != (batch,) or lengths.dtype.kind not in "iu":
        raise ValueError(f"lengths must be ({batch},) integers, got {lengths.shape} "
                         f"{lengths.dtype}")

    def prepare(i: int) -> tuple[ear_model.PreparedPair | None, str | None]:
        try:
            if not 0 < lengths[i] <= reference.shape[1]:
                raise ValueError(f"length {lengths[i]} is outside [1, {reference.shape[1]}]")
            loss = hearing_loss_6(audiogram_of(i))
            ref = reference[i, :lengths[i]].astype(np.float64)
            proc = processed[i, :lengths[i]].astype(np.float64)
            pair = ear_model.prepare_pair(ref, sample_rate, proc, sample_rate, loss,
                                          equalisation, level1[i])
            _check_length(pair.n, "trimmed pair")
            return pair, None
        except ValueError as err:
            return None, f"item {i}: {err}"

    workers = default_prepare_workers() if workers is None else int(workers)
    if workers <= 1 or batch == 1:
        return [prepare(i) for i in range(batch)]
    with concurrent.futures.ThreadPoolExecutor(min(workers, batch)) as pool:
        return list(pool.map(prepare, range(batch)))


@functools.partial(jax.jit, static_argnames=("segment_covariance", "bands_per_step"))
def _batch_core(reference, processed, n, params, level1, keys, silence_threshold, *,
                segment_covariance, bands_per_step):
    """vmap over items of noise + ear model + back end. reference/processed (B, N_max)."""
    length = reference.shape[-1]

    def one(ref, proc, n_i, params_i, level1_i, key):
        noise = threshold_noise(key, length, ref.dtype)
        ear = ear_model.ear_model_core(ref, proc, n_i, params_i, noise[0], noise[1], level1_i,
                                       bands_per_step=bands_per_step)
        return backend.haaqi_backend(
            ear.reference_db, ear.reference_bm, ear.processed_db, ear.processed_bm,
            ear.reference_sl, ear.processed_sl, n_i, silence_threshold=silence_threshold,
            segment_covariance=segment_covariance)

    return jax.vmap(one)(reference, processed, n, params, level1, keys)


def balanced_chunk(batch: int, chunk: int, num_devices: int) -> int:
    """Items per device call of `score_prepared` for `batch` items and at most `chunk` per
    call: the calls share the batch evenly (no mostly-padded last call), then round up to
    whole items per device."""
    n_chunks = -(-batch // max(1, min(int(chunk), batch)))
    per_call = -(-batch // n_chunks)
    return -(-per_call // num_devices) * num_devices


def _item_keys(key, batch: int) -> jax.Array:
    """(batch,) per-item keys: fold_in(key, i), or `key` itself when it already holds one key
    per item (raw (batch, 2) uint32 or typed (batch,))."""
    key = jax.random.PRNGKey(0) if key is None else key
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    if not (typed and key.ndim <= 1) and not (
            key.dtype == jnp.uint32 and key.ndim in (1, 2) and key.shape[-1] == 2):
        raise ValueError(
            f"key must be a PRNG key (jax.random.key(0) or jax.random.PRNGKey(0)) or {batch} "
            f"per-item keys, got dtype {key.dtype} shape {key.shape}")
    per_item = key.ndim == (1 if typed else 2)
    if per_item:
        if key.shape[0] != batch:
            raise ValueError(f"key holds {key.shape[0]} per-item keys for {batch} items")
        return key
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch))


def score_prepared(pairs: Sequence[ear_model.PreparedPair], *, key=None, dtype=jnp.float32,
                   chunk: int | None = None, silence_threshold: float = 2.5,
                   segment_covariance: int = 16, bands_per_step: int | None = None,
                   progress: bool | None = None) -> HAAQIResult:
    """Scores prepared pairs (from `prepare_batch` or `ear_model.prepare_pair`).

    Items are padded to one bucketed length and scored `chunk` at a time by one compiled
    function (vmap over items), split over the local devices on a 'data' mesh. float64 where
    JAX's default backend lacks it (TPUs) runs on the host's CPU devices instead, with a
    warning (`placement.compute_devices`); float32 always runs on the default backend.

    Args:
      pairs: B prepared pairs (trimmed lengths >= 384).
      key: PRNG key for the threshold noise (default PRNGKey(0)); item i uses fold_in(key, i),
        or key[i] when `key` holds B keys.
      dtype: jnp.float32 or jnp.float64 (the latter computes under jax.enable_x64, on the
        host CPU on a TPU host).
      chunk: at most this many items per device call (chunks are balanced, then rounded up to
        a multiple of the device count); default from `default_chunking` (a fixed budget on
        CPU, a share of device memory on accelerators).
      bands_per_step: ear-model bands computed together (divides 32); default from
        `default_chunking` (8 on CPU, 32 on accelerators).
      progress: show a progress bar over chunks (default: when there is more than one).

    Returns:
      HAAQIResult of (B,) float64 numpy arrays.

    Raises:
      ValueError: no pairs, a dtype other than float32 / float64, a chunk that is not a
        positive whole number, a key that is neither one PRNG key nor B of them, a pair
        trimmed to fewer than 384 samples (16 ms), or float64 on a backend without it when JAX
        runs without its cpu backend.
    """
    from haaqi_jax.train import sharding
    from tqdm.auto import tqdm

    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    batch = len(pairs)
    if batch == 0:
        raise ValueError("no items to score")
    lengths = np.asarray([p.n for p in pairs], dtype=np.int32)
    for i, n in enumerate(lengths):
        _check_length(int(n), f"item {i}")
    length = bucket_length(int(lengths.max()))
    devices = placement.compute_devices(dtype)
    on_host = dtype == np.float64 and placement.float64_on_host()
    if on_host:
        warnings.warn(f"HAAQI in float64 runs on the host CPU ({len(devices)} device"
                      f"{'s' if len(devices) > 1 else ''}) as {jax.default_backend()} has no "
                      f"float64, much slower than the accelerators; dtype=float32 keeps the "
                      f"work on them", stacklevel=2)
        if isinstance(key, jax.Array):      # a key committed to an accelerator comes along
            key = jax.device_put(key, devices[0])
    n_dev = len(devices)
    auto_chunk, auto_bands = default_chunking(length, devices, dtype)
    if chunk is not None and (not isinstance(chunk, (int, np.integer)) or chunk < 1):
        raise ValueError(f"chunk must be a positive number of items, got {chunk!r}")
    chunk = balanced_chunk(batch, auto_chunk if chunk is None else chunk, n_dev)
    bands_per_step = auto_bands if bands_per_step is None else int(bands_per_step)
    n_chunks = -(-batch // chunk)
    mesh = sharding.make_mesh(devices)
    place = sharding.batch_sharding(mesh)
    show = n_chunks > 1 if progress is None else progress

    with jax.enable_x64(dtype == np.float64), (
            jax.default_device(devices[0]) if on_host else contextlib.nullcontext()):
        keys = _item_keys(key, batch)
        outputs = []
        for c in tqdm(range(n_chunks), desc="HAAQI", unit="chunk", disable=not show):
            idx = np.arange(c * chunk, (c + 1) * chunk)
            idx = np.where(idx < batch, idx, idx[0])   # pad with copies; results dropped
            items = [pairs[i] for i in idx]
            arrays = dict(
                reference=np.stack([_pad(p.reference_24k, length, dtype) for p in items]),
                processed=np.stack([_pad(p.processed_24k, length, dtype) for p in items]),
                n=lengths[idx],
                params=jax.tree.map(lambda *v: np.stack(v).astype(dtype),
                                    *[p.params for p in items]),
                level1=np.asarray([p.level1 for p in items], dtype=dtype),
                keys=keys[idx])
            arrays = jax.device_put(arrays, place)
            result = _batch_core(**arrays, silence_threshold=dtype.type(silence_threshold),
                                 segment_covariance=int(segment_covariance),
                                 bands_per_step=bands_per_step)
            outputs.append(result)  # left on the device: the next chunk's host work overlaps
        outputs = [_result_floats(result) for result in outputs]
    merged = jax.tree.map(lambda *v: np.concatenate(v)[:batch], *outputs)
    return merged


def haaqi_batch(reference, processed, sample_rate: float, audiogram_levels,
                audiogram_frequencies=STANDARD_FREQUENCIES, *, equalisation: int = 1,
                level1=65.0, lengths=None, key=None, dtype=jnp.float32,
                chunk: int | None = None, progress: bool | None = None) -> HAAQIResult:
    """HAAQI of B pairs sharing a sample rate, with one compiled ear model + back end.

    Args:
      reference, processed: (B, N) signals at `sample_rate`, item i valid in [:lengths[i]].
      sample_rate: Hz (rounded to whole kHz as pyclarity does; 24 kHz is used as is).
      audiogram_levels: (B, F) dB HL, or B Audiogram objects (haaqi_jax's or pyclarity's;
        audiogram_frequencies is then ignored). audiogram_frequencies: (F,) or (B, F) Hz
        (default the 8 standard frequencies); interpolated onto 250..6000 Hz per item.
      equalisation: 1 (apply NAL-R to the reference) or 2 (reference already amplified).
      level1: scalar or (B,) dB SPL of RMS 1 (Cadenza: 65 - 20 log10 rms(reference)).
      lengths: (B,) true lengths (default N).
      key: PRNG key for the IHC threshold noise (default PRNGKey(0)); or B per-item keys.
      dtype: jnp.float32 (fast) or jnp.float64 (agrees with `haaqi_v1` given the same noise).
        TPUs have no float64: there float64 runs on the host's CPU devices, with a warning
        (same scores as a CPU host's, at CPU speed); float32 runs on the TPUs.
      chunk: items per device call (default: `default_chunking`, memory bound); progress: a
        progress bar over chunks.

    Returns:
      HAAQIResult of (B,) float64 numpy arrays.

    Raises:
      ValueError naming the item for NaN/inf samples, an empty or silent (or shorter than
      16 ms after trimming) reference, an invalid audiogram, or a bad length; and for
      batch-wide shape problems. Use `prepare_batch` + `score_prepared` to skip bad items.
      TypeError under jax.jit / vmap / grad: the preparation runs on the host (numpy); the
      device part is jit-compiled inside (`score_prepared`), batched by vmap over items.

    float32 scores differ from float64 by rounding: 4.1e-5 at most on the benchmark's 10 s
    clips; at most 5.8e-6 on 240 music-like clips of 0.45-1 s, 1.1e-5 on 480 held notes and
    3.0e-5 on 160 synthesised pieces of 0.5-10 s (16-48 kHz, equalisation 1 and 2, level1 65
    and the Cadenza rule, eight audiogram shapes; 2.7e-5 on the 0.5 s ones), once the
    near-ties of the alignment search are re-ranked exactly (before, a flipped lag moved such
    clips by up to 5.5e-3). Far from music HAAQI itself is ill-conditioned, and no dtype
    gives a reproducible score: when the reference's envelope is steady (held tones)
    and the processed signal is short (a lone impulse), the correlations that the ear model's
    alignment searches maximise are flat to ~1e-13 of their size over hundreds of lags, so the
    lags, and with them cephigh, are picked by rounding. Tones of 440 + 1000 Hz against one
    impulse at 0.1 s (24 kHz, equalisation 2, a sloping loss) scored 0.1093 in float32, 0.1006
    in float64, 0.0898 in pyclarity, and 0.0931 in float64 with noise of RMS 1e-10 added to
    the reference; pyclarity's `haaqi_v1` is no more reproducible there than ours. An item's
    float32 score can also move with the other items of its batch (all are padded to one
    bucketed length): 6e-7 at most on those 240 clips padded to 3 s; float64 scores do not
    move with the padding. Either dtype moves with an item's *position*: item i draws its
    threshold noise from fold_in(key, i), so the same pair at another index gets other noise
    (~3e-5 measured on a 1 s clip). Labels that must not depend on the batch: dtype=
    jnp.float64 and B per-item keys, e.g. from each item's id, as `haaqi-jax label --dtype
    float64` does.
    """
    from haaqi_jax.tracing import refuse_traced
    refuse_traced("haaqi_batch", reference, processed)
    prepared = prepare_batch(reference, processed, sample_rate, audiogram_levels,
                             audiogram_frequencies, equalisation=equalisation, level1=level1,
                             lengths=lengths)
    errors = [err for _, err in prepared if err is not None]
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ValueError(errors[0] + more)
    return score_prepared([p for p, _ in prepared], key=key, dtype=dtype, chunk=chunk,
                          progress=progress)
