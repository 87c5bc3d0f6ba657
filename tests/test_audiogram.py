"""haaqi_jax.Audiogram: validation, value semantics, interpolation (against numpy.interp)."""

from __future__ import annotations

import numpy as np
import pytest

from haaqi_jax.audiogram import HAAQI_FREQUENCIES, STANDARD_FREQUENCIES, Audiogram

LEVELS = [10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 65.0]


@pytest.mark.parametrize("levels, frequencies, message", [
    (LEVELS[:7], STANDARD_FREQUENCIES, "7 levels but 8 frequencies"),
    ([], [], "empty"),
    ([[10.0, 20.0]], [250.0, 500.0], "1-D"),
    ([10.0, np.nan], [250.0, 500.0], "at 500 Hz is not finite"),
    ([10.0, 131.0], [250.0, 500.0], "131 dB HL at 500 Hz is outside"),
    ([10.0, -21.0], [250.0, 500.0], "-21 dB HL at 500 Hz is outside"),
    ([10.0, 20.0], [500.0, 250.0], "strictly increasing"),
    ([10.0, 20.0], [0.0, 250.0], "finite and positive"),
    (["a", "b"], [250.0, 500.0], "must be numbers"),
])
def test_invalid_audiograms_are_named(levels, frequencies, message):
    with pytest.raises(ValueError, match=message):
        Audiogram(levels, frequencies)


def test_the_callers_array_stays_writable_and_the_audiogram_does_not_change():
    levels = np.array(LEVELS)
    audiogram = Audiogram(levels)
    levels[0] = 99.0                                      # was refused: the array went read-only
    assert audiogram.levels[0] == 10.0
    with pytest.raises(ValueError):
        audiogram.levels[0] = 0.0                         # the audiogram's own copy is frozen


def test_equality_and_hash_by_value():
    a, b = Audiogram(LEVELS), Audiogram(np.array(LEVELS))
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != Audiogram([11.0] + LEVELS[1:])
    assert a != Audiogram(LEVELS[:2], STANDARD_FREQUENCIES[:2])


def test_resample_is_linear_in_log_frequency_and_holds_the_ends():
    audiogram = Audiogram([20.0, 40.0, 60.0], [500.0, 1000.0, 4000.0])
    out = audiogram.resample(HAAQI_FREQUENCIES)
    expected = np.interp(np.log(HAAQI_FREQUENCIES), np.log([500.0, 1000.0, 4000.0]),
                         [20.0, 40.0, 60.0])
    np.testing.assert_allclose(out.levels, expected)
    assert out.levels[0] == 20.0 and out.levels[-1] == 60.0      # 250 and 6000 Hz held
    assert out.levels[3] == pytest.approx(50.0)                   # 2000 Hz: halfway in log f
