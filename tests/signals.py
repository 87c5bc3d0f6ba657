"""Shared test signals (plain numpy, independent of the code under test)."""

from __future__ import annotations

import numpy as np


def harmonic_music(seconds: float, fs: float, seed: int, *, harmonics: int) -> np.ndarray:
    """Three harmonic tones (1..`harmonics` partials, 1/h amplitudes, random phases) with slow
    amplitude modulation and a little noise: music-like, deterministic for a seed."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * fs))) / fs
    x = np.zeros_like(t)
    for f0 in rng.uniform(110, 440, 3):
        for h in range(1, harmonics + 1):
            x += (0.5 / h) * np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 2 * np.pi))
    x *= 1 + 0.6 * np.sin(2 * np.pi * rng.uniform(1, 6) * t)
    return 0.05 * (x + 0.05 * rng.standard_normal(t.size))
