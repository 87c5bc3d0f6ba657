"""Synthetic listeners: audiograms at the 8 standard frequencies drawn from typical shapes.

Each shape is a template of thresholds (dB HL at 250, 500, 1k, 2k, 3k, 4k, 6k, 8k Hz) with a
random overall offset and small per-frequency jitter, clipped to the audiometer range
-10..120 dB HL. The templates follow the usual clinical descriptions: sloping high-frequency
losses of mild / moderate / severe degree (pure-tone average 500-4k Hz roughly 20-40, 40-70 and
70-95 dB HL), flat losses, a noise-induced notch around 4 kHz, reverse-slope (low-frequency)
losses and "cookie-bite" (mid-frequency) losses.
"""

from __future__ import annotations

import numpy as np

from haaqi_jax.audiogram import STANDARD_FREQUENCIES, validate_levels

#: Audiometer range the drawn levels are clipped to, dB HL.
LEVEL_RANGE = (-10.0, 120.0)

# template (8 levels), random offset range (dB, added to every frequency), jitter sd (dB).
_TEMPLATES: dict[str, tuple[tuple[float, ...], tuple[float, float], float]] = {
    "normal": ((5, 5, 5, 5, 5, 8, 10, 10), (-8.0, 5.0), 3.0),
    "mild_sloping": ((10, 15, 20, 30, 38, 45, 50, 55), (-3.0, 5.0), 3.0),
    "moderate_sloping": ((25, 35, 45, 55, 60, 65, 70, 75), (-5.0, 5.0), 3.0),
    "severe_sloping": ((50, 60, 70, 80, 85, 90, 95, 100), (-5.0, 5.0), 3.0),
    "flat": ((45, 45, 45, 45, 45, 45, 45, 45), (-20.0, 25.0), 3.0),
    "noise_notch": ((10, 10, 10, 15, 30, 45, 30, 20), (-5.0, 8.0), 3.0),
    "reverse_slope": ((55, 50, 40, 30, 25, 20, 20, 20), (-8.0, 8.0), 3.0),
    "cookie_bite": ((15, 25, 45, 50, 45, 35, 20, 15), (-5.0, 10.0), 3.0),
}
#: Names of the shapes, in a fixed order.
LISTENER_SHAPES = tuple(_TEMPLATES)
#: Default sampling weights: a quarter of the listeners have normal hearing.
DEFAULT_SHAPE_WEIGHTS = {"normal": 0.25, **{s: 0.75 / 7 for s in LISTENER_SHAPES[1:]}}


def draw_audiogram(rng: np.random.Generator, shape: str) -> np.ndarray:
    """One audiogram of the named shape.

    Args:
      rng: numpy Generator.
      shape: one of LISTENER_SHAPES.

    Returns:
      (8,) float32 levels in dB HL at STANDARD_FREQUENCIES, within LEVEL_RANGE.
    """
    if shape not in _TEMPLATES:
        raise ValueError(f"unknown listener shape {shape!r}; choose from {LISTENER_SHAPES}")
    template, offset_range, jitter = _TEMPLATES[shape]
    # Jitter is smoothed across neighbouring frequencies so that shapes stay recognisable.
    noise = rng.normal(0.0, jitter, len(STANDARD_FREQUENCIES) + 2)
    smooth = (noise[:-2] + 2 * noise[1:-1] + noise[2:]) / np.sqrt(6.0)
    levels = np.asarray(template, dtype=np.float64) + rng.uniform(*offset_range) + smooth
    levels = np.round(np.clip(levels, *LEVEL_RANGE))  # whole dB, as audiograms are recorded
    return validate_levels(levels, where=f"synthetic {shape} audiogram")


def draw_listener(rng: np.random.Generator,
                  weights: dict[str, float] | None = None) -> tuple[str, np.ndarray]:
    """A random shape (by `weights`, default DEFAULT_SHAPE_WEIGHTS) and its audiogram (8,)."""
    weights = DEFAULT_SHAPE_WEIGHTS if weights is None else weights
    unknown = set(weights) - set(LISTENER_SHAPES)
    if unknown:
        raise ValueError(f"unknown listener shapes {sorted(unknown)}; known: {LISTENER_SHAPES}")
    names = sorted(weights)
    p = np.asarray([weights[n] for n in names], dtype=np.float64)
    if np.any(p < 0) or p.sum() <= 0:
        raise ValueError(f"listener shape weights must be non-negative with a positive sum: "
                         f"{weights}")
    shape = names[int(rng.choice(len(names), p=p / p.sum()))]
    return shape, draw_audiogram(rng, shape)


# NAL-R prescription (Byrne & Dillon 1986, with the profound-loss extension of the 3-frequency
# average): gain(f) = X + 0.31 HL(f) + k(f), clipped at 0 dB.
_NALR_FREQUENCIES = np.array([250.0, 500.0, 1000.0, 2000.0, 4000.0, 6000.0])
_NALR_BIAS_DB = np.array([-17.0, -8.0, 1.0, -1.0, -2.0, -2.0])


def nalr_gains_db(levels) -> np.ndarray:
    """NAL-R insertion gains (6,) dB at 250, 500, 1k, 2k, 4k, 6k Hz for 8 standard levels."""
    levels = validate_levels(levels, where="NAL-R audiogram").astype(np.float64)
    hl = np.interp(np.log(_NALR_FREQUENCIES), np.log(STANDARD_FREQUENCIES), levels)
    three = hl[1] + hl[2] + hl[3]  # 500 Hz + 1 kHz + 2 kHz
    x = 0.05 * three if three <= 180 else 9.0 + 0.116 * (three - 180)
    return np.maximum(x + 0.31 * hl + _NALR_BIAS_DB, 0.0)


def fit_hearing_aid(x: np.ndarray, sample_rate: int, levels) -> np.ndarray:
    """The listener's linear hearing aid: NAL-R gains as a zero-phase filter. (N,) -> (N,).

    Gains are interpolated linearly in frequency between the prescription frequencies and held
    beyond them (as HAAQI's own NAL-R equalisation does).
    """
    from haaqi_jax.data.degrade import fft_gain
    gains = nalr_gains_db(levels)
    return fft_gain(np.asarray(x, dtype=np.float64), sample_rate,
                    lambda f: np.interp(f, _NALR_FREQUENCIES, gains))
