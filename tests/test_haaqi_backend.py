"""HAAQI back end (haaqi_jax.haaqi.backend) against pyclarity 0.9.0's own stages, in float64.

Inputs are pyclarity's eb.ear_model outputs for a music-like pair with a silent gap in the middle
(so melcor9 has to drop and join frames), placed in longer zero-padded buffers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clarity.evaluator.haspi import eb

from haaqi_jax.haaqi import backend
from signals import harmonic_music

FS = 24000
PAD = 1000          # buffers are longer than the signals by this (not a multiple of any hop)


def music(seconds: float, seed: int, fs: int = FS) -> np.ndarray:
    return harmonic_music(seconds, fs, seed, harmonics=5)


@pytest.fixture(scope="module")
def ear():
    """pyclarity ear-model outputs (float64) and their length."""
    ref = music(1.2, 0)
    ref[9600:16800] *= 1e-5                      # 0.3 s of near silence in the middle
    proc = np.convolve(ref, np.ones(4) / 4, "same") + 0.002 * np.random.default_rng(1).normal(
        size=ref.size)
    np.random.seed(7)
    out = eb.ear_model(ref, FS, proc, FS, np.array([20, 25, 30, 40, 50, 60.0]), 1, 65.0)
    names = ("reference_db", "reference_bm", "processed_db", "processed_bm", "reference_sl",
             "processed_sl")
    d = dict(zip(names, out[:6]))
    d["n"] = d["reference_db"].shape[1]
    return d


def padded(x: np.ndarray, extra: int = PAD) -> np.ndarray:
    return np.pad(x, [(0, 0), (0, extra)])


def assert_close(ours, ref, atol=1e-9, rtol=1e-9):
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=atol, rtol=rtol)


@pytest.fixture(scope="module")
def smooth(ear):
    with jax.enable_x64(True):
        f = jax.jit(backend.env_smooth)
        ref, frames = f(padded(ear["reference_db"]), ear["n"])
        proc, _ = f(padded(ear["processed_db"]), ear["n"])
        return np.asarray(ref), np.asarray(proc), int(frames)


def test_env_smooth(ear, smooth):
    ref, proc, frames = smooth
    expected_ref = eb.env_smooth(ear["reference_db"], 8, FS)
    expected_proc = eb.env_smooth(ear["processed_db"], 8, FS)
    assert frames == expected_ref.shape[1]
    assert ref.shape[1] == backend.num_frames(ear["n"] + PAD)
    assert_close(ref[:, :frames], expected_ref)
    assert_close(proc[:, :frames], expected_proc)
    assert not np.any(ref[:, frames:])


@pytest.mark.parametrize("threshold", [2.5, 12.0, 1e3])
def test_melcor9_drops_and_joins_silent_frames(ear, smooth, threshold):
    ref, proc, frames = smooth
    expected = eb.melcor9(ref[:, :frames], proc[:, :frames], threshold, 0.0, 8)
    with jax.enable_x64(True):
        ours = jax.jit(backend.melcor9)(ref, proc, frames, threshold)
    keep = np.asarray(backend.loud_frames(ref, frames, threshold))
    if threshold == 2.5:           # frames are dropped between kept ones (the gap is joined)
        kept = np.flatnonzero(keep)
        assert kept.size > 1 and not np.all(keep[kept.min():kept.max() + 1])
    if threshold == 1e3:
        assert int(ours["kept"]) <= 1 and float(ours["high"]) == 0.0
    assert int(ours["kept"]) == int(np.sum(keep))
    assert_close(ours["average"], expected[0])
    assert_close(ours["low"], expected[1])
    assert_close(ours["high"], expected[2])
    assert_close(ours["modulation"], expected[3])


def test_melcor9_add_noise_draws_like_pyclarity(smooth):
    ref, proc, frames = smooth
    np.random.seed(11)
    expected = eb.melcor9(ref[:, :frames], proc[:, :frames], 2.5, 0.7, 8)
    with jax.enable_x64(True):
        kept = int(jnp.sum(backend.loud_frames(ref, frames, 2.5)))
        np.random.seed(11)
        noise = np.zeros((2,) + ref.shape)
        noise[0, :, :kept] = np.random.standard_normal((32, kept))
        noise[1, :, :kept] = np.random.standard_normal((32, kept))
        ours = jax.jit(backend.melcor9)(ref, proc, frames, 2.5, 0.7, noise[0], noise[1])
    assert_close(ours["high"], expected[2])
    assert_close(ours["modulation"], expected[3])


def test_spectrum_diff(ear):
    with jax.enable_x64(True):
        ours = backend.spectrum_diff(ear["reference_sl"], ear["processed_sl"])
    for a, b in zip(ours, eb.spectrum_diff(ear["reference_sl"], ear["processed_sl"])):
        assert_close(a, b)


@pytest.mark.parametrize("segment_ms", [16, 8])
def test_bm_covary(ear, segment_ms):
    expected = eb.bm_covary(ear["reference_bm"], ear["processed_bm"], segment_ms, FS)
    with jax.enable_x64(True):
        f = jax.jit(backend.bm_covary, static_argnames="segment_ms")
        *ours, segments = f(padded(ear["reference_bm"]), padded(ear["processed_bm"]), ear["n"],
                            segment_ms=segment_ms)
    segments = int(segments)
    assert segments == expected[0].shape[1]
    for a, b in zip(ours, expected):
        assert_close(np.asarray(a)[:, :segments], b, atol=1e-12)
        assert not np.any(np.asarray(a)[:, segments:])


def test_a_non_finite_sample_is_not_hidden(ear):
    """An infinite BM sample makes its segments' covariance NaN (and so the score), where
    pyclarity's "ratio if variance > 1e-30 else 0" would quietly give those segments 0."""
    bm = ear["processed_bm"].copy()
    bm[3, 700] = np.inf
    with jax.enable_x64(True):
        f = jax.jit(backend.bm_covary, static_argnames="segment_ms")
        clean = np.asarray(f(padded(ear["reference_bm"]), padded(ear["processed_bm"]),
                             ear["n"])[0])
        broken = np.asarray(f(padded(ear["reference_bm"]), padded(bm), ear["n"])[0])
    hit = ~np.isfinite(broken)
    # 384-sample windows, hop 192 (segment j >= 1 covers [192 j, 192 j + 384)): sample 700
    # lies in segments 2 and 3, of band 3 only
    assert np.argwhere(hit).tolist() == [[3, 2], [3, 3]]
    np.testing.assert_array_equal(broken[~hit], clean[~hit])


@pytest.mark.parametrize("threshold", [2.5, 30.0, 1e3])
def test_ave_covary2(ear, threshold):
    cov, ms, _ = eb.bm_covary(ear["reference_bm"], ear["processed_bm"], 16, FS)
    expected = eb.ave_covary2(cov, ms, threshold)
    with jax.enable_x64(True):
        ours = jax.jit(backend.ave_covary2)(padded(cov, 7), padded(ms, 7), cov.shape[1],
                                            threshold)
    assert_close(ours[0], expected[0])
    assert_close(ours[1], expected[1])


def pyclarity_backend(d) -> list[float]:
    """haaqi_v1's back end, from pyclarity's stage functions."""
    ref_s = eb.env_smooth(d["reference_db"], 8, FS)
    proc_s = eb.env_smooth(d["processed_db"], 8, FS)
    cephigh = eb.melcor9(ref_s, proc_s, 2.5, 0.0, 8)[2]
    dloud, dnorm, _ = eb.spectrum_diff(d["reference_sl"], d["processed_sl"])
    cov, ms, _ = eb.bm_covary(d["reference_bm"], d["processed_bm"], 16, FS)
    bmsync5 = eb.ave_covary2(cov, ms, 2.5)[1][4]
    d_loud = min(max(1 - dloud[1] / 2.5, 0), 1)
    d_norm = min(max(1 - dnorm[1] / 25, 0), 1)
    nl = 0.754 * cephigh**3 + 0.246 * bmsync5
    lin = 0.329 * d_loud + 0.671 * d_norm
    return [0.336 * nl + 0.001 * lin + 0.501 * nl**2 + 0.161 * lin**2, nl, lin, cephigh, bmsync5,
            d_loud, d_norm]


FIELDS = ("combined", "nonlinear", "linear", "cephigh", "bmsync5", "d_loud", "d_norm")


def _ear_args(d, n, length):
    return tuple(padded(d[k][:, :n], length - n) for k in
                 ("reference_db", "reference_bm", "processed_db", "processed_bm")) + (
        d["reference_sl"], d["processed_sl"])


def test_backend_vmapped_over_lengths_matches_pyclarity(ear):
    """Two items of different lengths in one vmapped call, each equal to pyclarity alone."""
    n_full = ear["n"]
    n_short = n_full - 5000
    short = {k: (v[:, :n_short] if v.ndim == 2 else v) for k, v in ear.items() if k != "n"}
    length = n_full + PAD
    items = [_ear_args(ear, n_full, length), _ear_args(short, n_short, length)]
    stacked = [np.stack(parts) for parts in zip(*items)]
    with jax.enable_x64(True):
        result = jax.jit(jax.vmap(backend.haaqi_backend))(*stacked,
                                                          np.array([n_full, n_short], np.int32))
    for i, d in enumerate([ear, short]):
        expected = pyclarity_backend(d)
        ours = [float(getattr(result, f)[i]) for f in FIELDS]
        assert_close(ours, expected, atol=1e-9)


def test_backend_float32_close_to_float64(ear):
    n = ear["n"]
    args = _ear_args(ear, n, n + PAD)
    with jax.enable_x64(True):
        r64 = jax.jit(backend.haaqi_backend)(*args, np.int32(n))
    r32 = jax.jit(backend.haaqi_backend)(*[np.asarray(a, np.float32) for a in args], np.int32(n))
    for f in FIELDS:
        assert np.isfinite(float(getattr(r32, f)))
        assert abs(float(getattr(r32, f)) - float(getattr(r64, f))) < 1e-4, f


def test_combined_from_parts_is_pyclarity_combination():
    """HAAQI's score from its two parts (used by the head's "haaqi_components" readout) is
    pyclarity's: its haaqi_v1 returns the score and both parts."""
    from clarity.evaluator.haaqi import haaqi_v1

    ref = music(0.6, 3)
    proc = np.convolve(ref, np.ones(6) / 6, "same") + 0.01 * np.random.default_rng(2).normal(
        size=ref.size)
    np.random.seed(0)
    combined, nonlinear, linear, _ = haaqi_v1(ref, FS, proc, FS, _clarity_audiogram(), 1, 65.0)
    assert 0.05 < nonlinear < 0.95 and 0.05 < linear < 0.95     # not a trivial corner
    assert float(backend.combined_from_parts(nonlinear, linear)) == pytest.approx(combined,
                                                                                  abs=1e-12)


def _clarity_audiogram():
    from clarity.utils.audiogram import Audiogram
    return Audiogram(np.array([20, 25, 30, 40, 50, 60.0]),
                     np.array([250, 500, 1000, 2000, 4000, 6000]))
