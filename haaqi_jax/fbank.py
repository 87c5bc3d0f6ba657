"""Kaldi-compatible log-mel filter bank (BEATs pre-processing) in pure JAX.

Reproduces `torchaudio.compliance.kaldi.fbank(x * 2**15, num_mel_bins=128,
sample_frequency=16000, frame_length=25, frame_shift=10)` with torchaudio's other defaults:
no dither, per-frame DC removal, pre-emphasis 0.97 (the first sample of a frame is its own
predecessor), symmetric "povey" window (Hann(400, symmetric) ** 0.85), 512-point zero-padded
FFT, power spectrum, 128 triangular Kaldi-mel filters from 20 Hz to 8 kHz (the Nyquist bin has
weight 0), log floored at float32 eps, snip_edges framing: `1 + (N - 400) // 160` frames.
With 128 bins at this FFT size filter 3 is empty, so that channel is always log(eps) -- as in
torchaudio (Kaldi itself would refuse these settings).

Padding: a batch is right-padded to a common length N. The frame mask follows the rule of the
reference BEATs code (official and speechbrain `forward_padding_mask`): the N samples are cut
into F equal chunks of N // F samples (the remainder dropped) and frame j counts as padding
only if every sample of chunk j is padding. This is not the frame geometry (a frame spans 400
samples), but it is what the released model was run with; `beats.BEATs` relies on it.

Shapes: B batch, N samples, F frames, M = 128 mel bins.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

SAMPLE_RATE = 16000
FRAME_LENGTH = 400          # 25 ms
FRAME_SHIFT = 160           # 10 ms
FFT_SIZE = 512              # next power of two above FRAME_LENGTH
NUM_MEL_BINS = 128
LOW_FREQ = 20.0
HIGH_FREQ = SAMPLE_RATE / 2
PREEMPHASIS = 0.97
POVEY_POWER = 0.85
PCM_SCALE = 2.0 ** 15       # BEATs feeds 16-bit integer scale into the fbank
#: Samples are read as [-1, 1] (times PCM_SCALE); a peak above this is 16-bit integer scale
#: left unscaled, refused by the input checks. A peak above WARN_PEAK is scored with a warning.
MAX_PEAK = 64.0
WARN_PEAK = 2.0


def is_float_dtype(dtype) -> bool:
    """A floating-point sample type, bfloat16 included (numpy's own test misses it)."""
    return bool(jnp.issubdtype(dtype, jnp.floating))
LOG_FLOOR = float(np.finfo(np.float32).eps)
FBANK_MEAN = 15.41663
FBANK_STD = 6.55582


def num_frames(n_samples: int) -> int:
    """Number of fbank frames for `n_samples` samples (snip_edges); 0 if under one frame."""
    if n_samples < FRAME_LENGTH:
        return 0
    return 1 + (n_samples - FRAME_LENGTH) // FRAME_SHIFT


def _mel32(freq: np.ndarray) -> np.ndarray:
    return np.float32(1127.0) * np.log(np.float32(1.0) + freq / np.float32(700.0))


@functools.lru_cache(maxsize=None)
def mel_filter_bank() -> np.ndarray:
    """Kaldi triangular mel filters over the FFT bins below Nyquist, shape (FFT_SIZE // 2, M).

    Evaluated in float32 in torchaudio's operation order so the weights match the reference's
    to the last bit or so (which also decides which weights clamp to exactly 0, e.g. the empty
    filter 3). The Nyquist bin (weight 0 in torchaudio) is left out.
    """
    f32 = np.float32
    mel_low = 1127.0 * math.log(1.0 + LOW_FREQ / 700.0)
    mel_high = 1127.0 * math.log(1.0 + HIGH_FREQ / 700.0)
    delta = f32((mel_high - mel_low) / (NUM_MEL_BINS + 1))
    index = np.arange(NUM_MEL_BINS, dtype=f32)[:, None]
    left = index * delta + f32(mel_low)
    center = (index + f32(1.0)) * delta + f32(mel_low)
    right = (index + f32(2.0)) * delta + f32(mel_low)
    bin_mel = _mel32(np.arange(FFT_SIZE // 2, dtype=f32) * f32(SAMPLE_RATE / FFT_SIZE))[None, :]
    up = (bin_mel - left) / (center - left)
    down = (right - bin_mel) / (right - center)
    weights = np.maximum(f32(0.0), np.minimum(up, down))             # (M, FFT_SIZE // 2)
    return _read_only(np.ascontiguousarray(weights.T.astype(f32)))


@functools.lru_cache(maxsize=None)
def povey_window() -> np.ndarray:
    """Symmetric Hann window of FRAME_LENGTH samples raised to 0.85, shape (FRAME_LENGTH,)."""
    n = np.arange(FRAME_LENGTH, dtype=np.float64)
    hann = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / (FRAME_LENGTH - 1))
    return _read_only((hann ** POVEY_POWER).astype(np.float32))


def _read_only(array: np.ndarray) -> np.ndarray:
    """The cached constants above are shared by every caller: an in-place change by one
    would change every later fbank."""
    array.setflags(write=False)
    return array


def _frames(x: jax.Array, n_frames: int) -> jax.Array:
    """(B, N) -> (B, F, FRAME_LENGTH) overlapping frames without a gather.

    A frame is 2.5 hops long, so it is the concatenation of hop-sized blocks f, f + 1 and the
    first half of block f + 2.
    """
    batch = x.shape[0]
    n_blocks = n_frames + 2
    need = n_blocks * FRAME_SHIFT
    if x.shape[1] < need:
        x = jnp.pad(x, ((0, 0), (0, need - x.shape[1])))
    blocks = x[:, :need].reshape(batch, n_blocks, FRAME_SHIFT)
    tail = FRAME_LENGTH - 2 * FRAME_SHIFT
    return jnp.concatenate(
        [blocks[:, :n_frames], blocks[:, 1:n_frames + 1], blocks[:, 2:n_frames + 2, :tail]],
        axis=-1)


def frame_padding_mask(sample_padding_mask: jax.Array, n_frames: int) -> jax.Array:
    """Reference rule (see module docstring): (B, N) True=pad -> (B, F) True=pad."""
    batch, n = sample_padding_mask.shape
    chunk = n // n_frames
    return sample_padding_mask[:, :n_frames * chunk].reshape(batch, n_frames, chunk).all(-1)


def kaldi_fbank(waveform: jax.Array, lengths: jax.Array | None = None
                ) -> tuple[jax.Array, jax.Array]:
    """Kaldi log-mel filter bank of a batch of 16 kHz waveforms.

    Args:
        waveform: (B, N) float32 in [-1, 1]; scaled by 2**15 here. N >= 400.
        lengths: (B,) int valid samples per row (right padding), or None for all valid.

    Returns:
        fbank: (B, F, 128) float32 log-mel energies (not normalised), F = num_frames(N).
        frame_mask: (B, F) bool, True = valid frame (reference rule, see module docstring).
    """
    waveform = jnp.asarray(waveform, jnp.float32)
    if waveform.ndim != 2:
        raise ValueError(f"kaldi_fbank: waveform must be (batch, samples), got {waveform.shape}")
    n_frames = num_frames(waveform.shape[1])
    if n_frames == 0:
        raise ValueError(f"kaldi_fbank: {waveform.shape[1]} samples is shorter than one "
                         f"{FRAME_LENGTH}-sample frame")
    frames = _frames(waveform * PCM_SCALE, n_frames)                    # (B, F, 400)
    frames = frames - frames.mean(axis=-1, keepdims=True)
    previous = jnp.concatenate([frames[..., :1], frames[..., :-1]], axis=-1)
    frames = (frames - PREEMPHASIS * previous) * povey_window()
    spectrum = jnp.fft.rfft(frames, n=FFT_SIZE, axis=-1)[..., :FFT_SIZE // 2]
    power = jnp.real(spectrum) ** 2 + jnp.imag(spectrum) ** 2           # (B, F, 256)
    mel = jnp.einsum("bfk,km->bfm", power, mel_filter_bank(),
                     precision=jax.lax.Precision.HIGHEST)
    fbank = jnp.log(jnp.maximum(mel, LOG_FLOOR))

    if lengths is None:
        frame_mask = jnp.ones(fbank.shape[:2], bool)
    else:
        lengths = jnp.asarray(lengths)
        sample_pad = jnp.arange(waveform.shape[1])[None, :] >= lengths[:, None]
        frame_mask = ~frame_padding_mask(sample_pad, n_frames)
    return fbank, frame_mask


def normalize_fbank(x: jax.Array) -> jax.Array:
    """BEATs input normalisation: (x - 15.41663) / (2 * 6.55582) (the factor 2 is deliberate).

    Elementwise: x is a `kaldi_fbank` output (B, F, 128) or any shape; the result has x's
    shape (and x's dtype when x is a float array).
    """
    return (x - FBANK_MEAN) / (2.0 * FBANK_STD)
