"""Audiograms: hearing thresholds in dB HL at a set of frequencies, validated once."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

#: The 8 frequencies HAAQI-Net's audiogram input uses (and pyclarity's default), Hz.
STANDARD_FREQUENCIES = (250.0, 500.0, 1000.0, 2000.0, 3000.0, 4000.0, 6000.0, 8000.0)
#: The frequencies HAAQI's ear model reads the loss at, Hz.
HAAQI_FREQUENCIES = (250.0, 500.0, 1000.0, 2000.0, 4000.0, 6000.0)
#: Valid hearing-threshold range, dB HL (audiometers measure -10..120; a margin either side).
MIN_LEVEL_DB_HL = -20.0
MAX_LEVEL_DB_HL = 130.0


@dataclasses.dataclass(frozen=True, eq=False)
class Audiogram:
    """One ear's hearing thresholds.

    Attributes:
      levels: (F,) float64 thresholds in dB HL, each in [-20, 130].
      frequencies: (F,) float64 strictly increasing, positive frequencies in Hz.

    Raises:
      ValueError: on a shape mismatch, non-finite values, levels out of range, or frequencies
        that are not positive and strictly increasing. The message names the offending entry.
    """

    levels: np.ndarray
    frequencies: np.ndarray = dataclasses.field(
        default_factory=lambda: np.asarray(STANDARD_FREQUENCIES))

    def __post_init__(self) -> None:
        # Copies: the stored arrays are made read-only, the caller's must stay writable.
        try:
            levels = np.array(self.levels, dtype=np.float64)
            freqs = np.array(self.frequencies, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(f"audiogram levels and frequencies must be numbers: {err}") from None
        if levels.ndim != 1 or freqs.ndim != 1:
            raise ValueError(
                f"audiogram levels and frequencies must be 1-D, got shapes {levels.shape} "
                f"and {freqs.shape}")
        if levels.shape != freqs.shape:
            raise ValueError(
                f"audiogram has {levels.size} levels but {freqs.size} frequencies")
        if levels.size == 0:
            raise ValueError("audiogram is empty")
        bad = np.flatnonzero(~np.isfinite(levels))
        if bad.size:
            raise ValueError(f"audiogram level at {freqs[bad[0]]:g} Hz is not finite "
                             f"({levels[bad[0]]})")
        bad = np.flatnonzero((levels < MIN_LEVEL_DB_HL) | (levels > MAX_LEVEL_DB_HL))
        if bad.size:
            raise ValueError(
                f"audiogram level {levels[bad[0]]:g} dB HL at {freqs[bad[0]]:g} Hz is outside "
                f"[{MIN_LEVEL_DB_HL:g}, {MAX_LEVEL_DB_HL:g}]")
        if not np.all(np.isfinite(freqs)) or np.any(freqs <= 0):
            raise ValueError(f"audiogram frequencies must be finite and positive, got {freqs}")
        if np.any(np.diff(freqs) <= 0):
            raise ValueError(f"audiogram frequencies must be strictly increasing, got {freqs}")
        levels.setflags(write=False)
        freqs.setflags(write=False)
        object.__setattr__(self, "levels", levels)
        object.__setattr__(self, "frequencies", freqs)

    @classmethod
    def from_any(cls, audiogram) -> "Audiogram":
        """Accepts an Audiogram, pyclarity's Audiogram (duck-typed), or 8 standard levels."""
        if isinstance(audiogram, cls):
            return audiogram
        if hasattr(audiogram, "levels") and hasattr(audiogram, "frequencies"):
            return cls(audiogram.levels, audiogram.frequencies)
        levels = np.asarray(audiogram, dtype=np.float64)
        if levels.shape != (len(STANDARD_FREQUENCIES),):
            raise ValueError(
                f"an audiogram given as plain values needs {len(STANDARD_FREQUENCIES)} levels at "
                f"{STANDARD_FREQUENCIES} Hz, got shape {levels.shape}")
        return cls(levels)

    def has_frequencies(self, frequencies: Sequence[float]) -> bool:
        return bool(np.all(np.isin(np.asarray(frequencies, dtype=np.float64), self.frequencies)))

    def resample(self, frequencies: Sequence[float]) -> "Audiogram":
        """Interpolates linearly in log frequency, holding the end values beyond the range."""
        new = np.asarray(frequencies, dtype=np.float64)
        levels = np.interp(np.log(new), np.log(self.frequencies), self.levels)
        return Audiogram(levels, new)

    def __eq__(self, other) -> bool:
        if not isinstance(other, Audiogram):
            return NotImplemented
        return (np.array_equal(self.levels, other.levels)
                and np.array_equal(self.frequencies, other.frequencies))

    def __hash__(self) -> int:
        return hash((self.levels.tobytes(), self.frequencies.tobytes()))

    def __repr__(self) -> str:
        pairs = ", ".join(f"{f:g}: {l:g}" for f, l in zip(self.frequencies, self.levels))
        return f"Audiogram({{{pairs}}} dB HL)"


def parse_numbers(text: str, *, where: str) -> list[float]:
    """Numbers written in one piece of text, as on a command line or in a CSV cell:
    "10,15,20", "10 15 20", "10;15;20", "10, 15 20," or "[10, 15, 20]".

    Raises ValueError naming `where` and the item at fault: an empty item ("10,,20": a level
    left out, not a shorter audiogram) or one that is not a number.
    """
    body = text.strip()
    if body[:1] + body[-1:] in ("[]", "()"):
        body = body[1:-1]
    body = body.replace(";", ",").strip()
    if body.endswith(","):                      # one trailing separator, as hands write lists
        body = body[:-1]
    if not body:
        return []
    items = [part for item in body.split(",") for part in (item.split() or [""])]
    values = []
    for k, item in enumerate(items, start=1):
        if not item:
            raise ValueError(f"{where}: {text!r}: item {k} is empty")
        try:
            values.append(float(item))
        except ValueError:
            raise ValueError(f"{where}: {text!r}: item {k} ({item!r}) is not a number") from None
    return values


def validate_levels(levels, *, where: str = "audiogram") -> np.ndarray:
    """Checks a (..., 8) array of standard-frequency levels; returns it as float32.

    Raises ValueError naming `where` and the first bad entry (index, frequency, value).
    """
    try:
        arr = np.asarray(levels, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected {len(STANDARD_FREQUENCIES)} numbers (dB HL), got "
                         f"{levels!r}") from None
    if arr.shape[-1:] != (len(STANDARD_FREQUENCIES),):
        raise ValueError(f"{where}: expected {len(STANDARD_FREQUENCIES)} levels at "
                         f"{STANDARD_FREQUENCIES} Hz, got shape {arr.shape}")
    bad = ~np.isfinite(arr) | (arr < MIN_LEVEL_DB_HL) | (arr > MAX_LEVEL_DB_HL)
    if bad.any():
        idx = tuple(int(i[0]) for i in np.nonzero(bad))
        shown = idx[0] if len(idx) == 1 else idx
        raise ValueError(
            f"{where}: level {float(arr[idx])!r} dB HL at {STANDARD_FREQUENCIES[idx[-1]]:g} Hz "
            f"(index {shown}) is not finite or outside [{MIN_LEVEL_DB_HL:g}, "
            f"{MAX_LEVEL_DB_HL:g}]")
    return arr.astype(np.float32)


def is_audiogram(value) -> bool:
    """True for an Audiogram or an object with `levels` and `frequencies` (pyclarity's)."""
    return hasattr(value, "levels") and hasattr(value, "frequencies")


def standard_levels(audiogram, *, where: str = "audiogram") -> np.ndarray:
    """(8,) float32 levels at STANDARD_FREQUENCIES of one ear, HAAQI-Net's audiogram input.

    Args:
      audiogram: an Audiogram (or pyclarity's): read at the standard frequencies, interpolated
        in log frequency (end values held) where it lacks one; or 8 plain levels.
      where: names the audiogram in error messages.
    """
    if is_audiogram(audiogram):
        try:
            audiogram = Audiogram.from_any(audiogram)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        if not audiogram.has_frequencies(STANDARD_FREQUENCIES):
            audiogram = audiogram.resample(STANDARD_FREQUENCIES)
        keep = np.isin(audiogram.frequencies, STANDARD_FREQUENCIES)
        return validate_levels(audiogram.levels[keep], where=where)
    return validate_levels(audiogram, where=where)


# ------------------------------------------------------------------- degree of hearing loss

#: The frequencies of the four-frequency pure-tone average that grades hearing loss, Hz.
PTA_FREQUENCIES = (500.0, 1000.0, 2000.0, 4000.0)
#: WHO grades of hearing loss, mildest first (World report on hearing, 2021, Table 1.3).
HEARING_LOSS_GRADES = ("normal", "mild", "moderate", "moderately_severe", "severe", "profound",
                       "complete")
#: Lower bound of every grade but "normal", dB HL: a PTA of exactly 20 is mild, 19.99 normal.
HEARING_LOSS_BOUNDS_DB_HL = (20.0, 35.0, 50.0, 65.0, 80.0, 95.0)
#: Decimals of dB a pure-tone average is graded (and reported) at: far finer than an
#: audiometer's 1 dB, far coarser than the float32 rounding of stored levels (< 1e-5 dB).
PTA_DECIMALS = 4


def pure_tone_average(levels, frequencies: Sequence[float] = STANDARD_FREQUENCIES) -> np.ndarray:
    """Four-frequency pure-tone average (PTA_FREQUENCIES: 0.5, 1, 2, 4 kHz) of audiograms.

    A PTA frequency that `frequencies` lacks is read off the audiogram linearly in log
    frequency, the end values held beyond its range (as `Audiogram.resample`).

    Args:
      levels: (..., F) thresholds in dB HL at `frequencies` (finite).
      frequencies: (F,) strictly increasing, positive frequencies in Hz; default the 8 standard
        ones, which hold all four PTA frequencies.
    Returns:
      (...,) float64 mean of the four thresholds, dB HL.
    """
    levels = np.asarray(levels, dtype=np.float64)
    log_freqs = np.log(np.asarray(frequencies, dtype=np.float64))
    if levels.shape[-1:] != log_freqs.shape:
        raise ValueError(f"pure_tone_average: levels of shape {levels.shape} for "
                         f"{log_freqs.size} frequencies")
    # (F,) weights: the interpolation of each frequency's unit vector at the PTA frequencies,
    # averaged; a present frequency gets exactly 1/4.
    weights = np.mean([np.interp(np.log(PTA_FREQUENCIES), log_freqs, unit)
                       for unit in np.eye(log_freqs.size)], axis=1)
    return levels @ weights


def hearing_loss_grade(pta_db) -> np.ndarray:
    """Grade of hearing loss of each pure-tone average, by the WHO's 2021 classification.

    World Health Organization, "World report on hearing" (Geneva, 2021; ISBN 978-92-4-002048-1),
    Table 1.3 "Grades of hearing loss and related hearing experience", graded on the average
    threshold at 0.5, 1, 2 and 4 kHz: normal < 20 dB, mild 20 to < 35, moderate 35 to < 50,
    moderately severe 50 to < 65, severe 65 to < 80, profound 80 to < 95, complete (total
    hearing loss / deafness) >= 95 dB HL. Each bound belongs to the grade above it. (The WHO
    grades a person by the better ear; here each audiogram, one ear, is graded on its own.)
    The average is graded rounded to PTA_DECIMALS: levels in 0.1 dB steps stored as float32
    (ManifestRow, `standard_levels`) whose exact PTA is a bound (20) average to 19.9999995,
    graded as the bound, not as the grade below it.

    Args:
      pta_db: (...,) pure-tone averages in dB HL (`pure_tone_average`), finite.
    Returns:
      (...,) int64 index into HEARING_LOSS_GRADES (0 = normal ... 6 = complete).
    Raises:
      ValueError naming the first non-finite entry (a missing audiogram is its caller's to
      leave out, not a grade).
    """
    pta_db = np.asarray(pta_db, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(pta_db))
    if bad.size:
        where = tuple(int(i) for i in np.unravel_index(bad[0], pta_db.shape))
        raise ValueError(f"hearing_loss_grade: pure-tone average {pta_db.reshape(-1)[bad[0]]} "
                         f"at index {where} is not finite")
    return np.searchsorted(HEARING_LOSS_BOUNDS_DB_HL, np.round(pta_db, PTA_DECIMALS),
                           side="right").astype(np.int64)
