"""Length buckets: pad clips to a small ladder of lengths so new lengths reuse compiled code.

A jitted encoder recompiles for every new input shape. Padding each batch to the next rung of
a geometric ladder (minimum * step_ratio**k, rounded up to whole 0.1 s) bounds the number of
distinct shapes to O(log(max / minimum)) while wasting at most (step_ratio - 1) of compute.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

ROUND_TO = 1600          # samples (0.1 s at 16 kHz): rungs are whole tenths of a second
DEFAULT_STEP_RATIO = 1.25


def bucket_length(n_samples: int, *, minimum: int = 16000,
                  step_ratio: float = DEFAULT_STEP_RATIO) -> int:
    """Smallest rung >= n_samples of the ladder ceil(minimum * step_ratio**k / 1600) * 1600."""
    if n_samples <= 0:
        raise ValueError(f"bucket_length: n_samples must be positive, got {n_samples}")
    if minimum <= 0 or step_ratio <= 1.0:
        raise ValueError(f"bucket_length: need minimum > 0 and step_ratio > 1, got "
                         f"minimum={minimum}, step_ratio={step_ratio}")
    rung = lambda k: int(math.ceil(minimum * step_ratio ** k / ROUND_TO)) * ROUND_TO
    k = 0
    while rung(k) < n_samples:   # a few dozen rungs cover hours of audio
        k += 1
    return rung(k)


def pad_to_bucket(waveforms: Sequence[np.ndarray], *, minimum: int = 16000,
                  step_ratio: float = DEFAULT_STEP_RATIO) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads 1-D clips with zeros to the bucket of the longest one.

    Args:
      waveforms: B mono clips, 1-D float arrays (any lengths).

    Returns:
      batch: (B, Nb) float32; padding_mask: (B, Nb) bool, True = padding.
    """
    if len(waveforms) == 0:
        raise ValueError("pad_to_bucket: no waveforms given")
    clips = []
    for i, wave in enumerate(waveforms):
        wave = np.asarray(wave)
        if wave.ndim != 1:
            raise ValueError(f"pad_to_bucket: waveform {i} must be 1-D mono, got shape "
                             f"{wave.shape}")
        if not np.issubdtype(wave.dtype, np.floating):
            raise ValueError(f"pad_to_bucket: waveform {i} has dtype {wave.dtype}; expected "
                             f"float in [-1, 1]")
        if wave.size == 0:
            raise ValueError(f"pad_to_bucket: waveform {i} is empty")
        clips.append(wave)
    width = bucket_length(max(c.size for c in clips), minimum=minimum, step_ratio=step_ratio)
    lengths = np.array([c.size for c in clips])
    batch = np.zeros((len(clips), width), np.float32)
    for i, clip in enumerate(clips):    # host-side copy into the padded buffer
        batch[i, :clip.size] = clip
    padding_mask = np.arange(width)[None, :] >= lengths[:, None]
    return batch, padding_mask
