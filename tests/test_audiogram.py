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


@pytest.mark.parametrize("text,values", [
    ("10,15,20", [10, 15, 20]), ("10 15 20", [10, 15, 20]), ("10; 15;20", [10, 15, 20]),
    ("[10, 15, 20]", [10, 15, 20]), (" (-5, 0) ", [-5, 0]), ("1e1,2.5", [10, 2.5]),
    ("10, 15 20,", [10, 15, 20]), ("", [])])            # mixed separators, one trailing
def test_numbers_are_read_from_text_as_written_by_hand(text, values):
    from haaqi_jax.audiogram import parse_numbers
    assert parse_numbers(text, where="x") == values


@pytest.mark.parametrize("text,message", [
    ("10,,20", r"x: '10,,20': item 2 is empty"),          # a level left out, not 2 levels
    ("10,20,,", r"item 3 is empty"),
    ("10,abc,20", r"item 2 \('abc'\) is not a number"),
    ("[10 20 x]", r"item 3 \('x'\) is not a number")])
def test_text_that_is_not_numbers_is_named(text, message):
    from haaqi_jax.audiogram import parse_numbers
    with pytest.raises(ValueError, match=message):
        parse_numbers(text, where="x")


def test_levels_that_are_not_numbers_are_named():
    from haaqi_jax.audiogram import validate_levels
    with pytest.raises(ValueError, match=r"listener: expected 8 numbers \(dB HL\), got \['a'"):
        validate_levels(["a"] + [0] * 7, where="listener")


@pytest.mark.parametrize("pta, grade", [
    (-20.0, "normal"), (19.99, "normal"), (20.0, "mild"), (34.99, "mild"), (35.0, "moderate"),
    (49.99, "moderate"), (50.0, "moderately_severe"), (64.99, "moderately_severe"),
    (65.0, "severe"), (79.99, "severe"), (80.0, "profound"), (94.99, "profound"),
    (95.0, "complete"), (130.0, "complete"),
])
def test_hearing_loss_grades_have_the_who_2021_bounds(pta, grade):
    """Each bound belongs to the grade above it (WHO: mild "20 to < 35 dB")."""
    from haaqi_jax.audiogram import HEARING_LOSS_GRADES, hearing_loss_grade

    assert HEARING_LOSS_GRADES[int(hearing_loss_grade(pta))] == grade


def test_hearing_loss_grades_of_an_array_keep_its_shape():
    from haaqi_jax.audiogram import hearing_loss_grade

    pta = np.array([[0.0, 20.0, 35.0], [50.0, 65.0, 95.0]])
    grades = hearing_loss_grade(pta)
    assert grades.shape == (2, 3) and grades.dtype == np.int64
    np.testing.assert_array_equal(grades, [[0, 1, 2], [3, 4, 6]])


@pytest.mark.parametrize("pta", [np.nan, [20.0, np.inf], [[10.0], [np.nan]]])
def test_a_missing_pure_tone_average_is_not_graded(pta):
    from haaqi_jax.audiogram import hearing_loss_grade

    with pytest.raises(ValueError, match="pure-tone average .* is not finite"):
        hearing_loss_grade(pta)


def test_pure_tone_average_is_the_mean_at_half_one_two_and_four_khz():
    from haaqi_jax.audiogram import pure_tone_average

    levels = np.array([LEVELS, [0, 10, 20, 30, 40, 50, 60, 70]], dtype=np.float32)
    np.testing.assert_allclose(pure_tone_average(levels),
                               [(15 + 20 + 30 + 50) / 4, (10 + 20 + 30 + 50) / 4], atol=1e-12)
    assert pure_tone_average(levels[0]).shape == ()
    with pytest.raises(ValueError, match=r"shape \(7,\) for 8 frequencies"):
        pure_tone_average(LEVELS[:7])


def test_pure_tone_average_interpolates_a_missing_frequency_in_log_frequency():
    """An audiogram measured at 250, 750, 1500, 3000, 6000 Hz: the PTA frequencies are read
    off it as `Audiogram.resample` reads them (np.interp in log frequency, ends held)."""
    from haaqi_jax.audiogram import PTA_FREQUENCIES, pure_tone_average

    freqs = [250.0, 750.0, 1500.0, 3000.0, 6000.0]
    levels = [10.0, 20.0, 35.0, 50.0, 70.0]
    at_pta = Audiogram(levels, freqs).resample(PTA_FREQUENCIES).levels
    assert pure_tone_average(levels, freqs) == pytest.approx(np.mean(at_pta), abs=1e-12)
    # by hand: 500 Hz sits log2(2)/log2(3) of the way from 250 to 750 Hz
    assert at_pta[0] == pytest.approx(10 + 10 * np.log(2) / np.log(3), abs=1e-12)
    # beyond the measured range the end value is held: 500 Hz of an audiogram from 1 kHz up
    assert pure_tone_average([30.0, 40.0, 60.0], [1000.0, 2000.0, 4000.0]) == pytest.approx(
        (30 + 30 + 40 + 60) / 4)


def test_a_float32_audiogram_whose_average_is_a_bound_gets_the_grade_above():
    """Levels in 0.1 dB steps are stored in float32 (ManifestRow, `standard_levels`): their
    exact PTA of 20 dB HL reads back as 19.9999995 and must still be mild, not normal."""
    from haaqi_jax.audiogram import (HEARING_LOSS_GRADES, hearing_loss_grade,
                                     pure_tone_average, standard_levels)

    for levels, grade in [([10.0, 27.3, 30.3, 31.4, 30.0, -9.0, 40.0, 50.0], "mild"),
                          ([10.0, 49.4, 34.6, 69.2, 30.0, 46.8, 40.0, 50.0],
                           "moderately_severe"),
                          ([10.0, 82.6, 97.2, 107.0, 30.0, 93.2, 40.0, 50.0], "complete")]:
        pta = pure_tone_average(standard_levels(levels))
        assert HEARING_LOSS_GRADES[int(hearing_loss_grade(pta))] == grade, (levels, pta)
