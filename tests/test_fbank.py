"""haaqi_jax.fbank against torchaudio's Kaldi fbank (the BEATs pre-processing reference)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from beats_reference import reference_padding_masks, torch_kaldi_fbank
from haaqi_jax.fbank import kaldi_fbank, normalize_fbank, num_frames

SR = 16000


def _music(seconds: float, seed: int, noise_floor: float) -> np.ndarray:
    """Chords of harmonic tones with vibrato and note envelopes over a recording noise floor."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    x = np.zeros_like(t)
    for f0 in rng.uniform(110, 880, size=4):
        for h in range(1, 7):
            vibrato = 1 + 0.004 * np.sin(2 * np.pi * rng.uniform(4, 6) * t)
            x += 0.12 / h * np.sin(2 * np.pi * f0 * h * t * vibrato + rng.uniform(0, 6.3))
    note = t % 0.4
    x *= np.minimum(1.0, note * 40) * np.exp(-4 * note)
    return (x + noise_floor * rng.normal(size=t.size)).astype(np.float32)


def _ours(wav: np.ndarray) -> np.ndarray:
    return np.asarray(normalize_fbank(kaldi_fbank(jnp.asarray(wav))[0]))


def _signals():
    rng = np.random.default_rng(0)
    return {
        "white_noise": (0.3 * rng.uniform(-1, 1, (1, 3 * SR))).astype(np.float32),
        "loud_noise": np.clip(rng.normal(0, 0.5, (1, SR)), -1, 1).astype(np.float32),
        # A -80 dB noise floor (any real recording has one); see test_pure_tones_float32_floor.
        "music_like": _music(2.0, 1, 1e-4)[None],
        "music_like_floor_60db": _music(1.5, 2, 1e-3)[None],
        "silence": np.zeros((1, SR), np.float32),
        "odd_length": (0.1 * rng.normal(size=(1, 12345))).astype(np.float32),
        "one_frame": (0.1 * rng.normal(size=(1, 400))).astype(np.float32),
        "one_frame_plus": (0.1 * rng.normal(size=(1, 559))).astype(np.float32),
    }


@pytest.mark.parametrize("name", list(_signals()))
def test_matches_torchaudio(kaldi, name):
    wav = _signals()[name]
    ref = torch_kaldi_fbank(kaldi, wav)
    ours = _ours(wav)
    assert ours.shape == ref.shape == (1, num_frames(wav.shape[1]), 128)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_empty_mel_filter_is_log_eps(kaldi):
    """With 128 bins at 512 points filter 3 is empty in torchaudio: always log(eps)."""
    wav = _signals()["white_noise"]
    raw = np.asarray(kaldi_fbank(jnp.asarray(wav))[0])
    ref = kaldi.fbank(torch.from_numpy(wav) * 2 ** 15, num_mel_bins=128,
                      sample_frequency=16000, frame_length=25, frame_shift=10).numpy()
    np.testing.assert_allclose(ref[:, 3], np.log(np.finfo(np.float32).eps), rtol=1e-6)
    np.testing.assert_allclose(raw[0, :, 3], ref[:, 3], rtol=1e-6)


def test_pure_tones_float32_floor(kaldi):
    """Noise-free synthetic tones have a ~1e-8 relative float32 FFT round-off floor in the quiet
    bands; there neither torch nor we can be exact. Against a float64 run of the reference we
    must be about as good as torch's own float32 run."""
    t = np.arange(2 * SR) / SR
    wav = (0.5 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 1320 * t + 1)
           ).astype(np.float32)[None]
    exact = np.stack([((kaldi.fbank(torch.from_numpy(w.astype(np.float64))[None] * 2 ** 15,
                                    num_mel_bins=128, sample_frequency=16000, frame_length=25,
                                    frame_shift=10).numpy() - 15.41663) / (2 * 6.55582))
                      for w in wav])
    torch32 = torch_kaldi_fbank(kaldi, wav)
    ours = _ours(wav)
    torch_error = np.abs(torch32 - exact).max()
    our_error = np.abs(ours - exact).max()
    assert our_error <= 2 * torch_error + 1e-4, (our_error, torch_error)
    # Loud bands (within 60 dB of the frame's strongest band) agree tightly regardless.
    loud = exact > exact.max(axis=-1, keepdims=True) - np.log(1e6) / (2 * 6.55582)
    np.testing.assert_allclose(ours[loud], torch32[loud], atol=1e-4)


def test_num_frames():
    assert num_frames(160000) == 998
    assert num_frames(399) == 0
    assert num_frames(400) == 1
    assert num_frames(559) == 1 and num_frames(560) == 2


def test_batch_padding_and_mask_rule(kaldi):
    """Rows of a padded batch equal each clip alone on its own frames; the frame mask follows
    speechbrain's forward_padding_mask rule."""
    rng = np.random.default_rng(3)
    lengths = np.array([SR, 7000, 2811])
    n = SR + 333
    wav = np.zeros((3, n), np.float32)
    for i, length in enumerate(lengths):
        wav[i, :length] = 0.2 * rng.normal(size=length)
    fbank, frame_mask = kaldi_fbank(jnp.asarray(wav), jnp.asarray(lengths))
    fbank = np.asarray(normalize_fbank(fbank))
    for i, length in enumerate(lengths):
        alone = torch_kaldi_fbank(kaldi, wav[i:i + 1, :length])[0]
        np.testing.assert_allclose(fbank[i, :alone.shape[0]], alone, atol=1e-4)
    ref_frames, _ = reference_padding_masks(n, lengths, fbank.shape[1], 8)
    np.testing.assert_array_equal(np.asarray(frame_mask), ~ref_frames)
    _, no_lengths_mask = kaldi_fbank(jnp.asarray(wav))
    assert np.asarray(no_lengths_mask).all()


def test_jit_and_vmap_agree():
    wav = _signals()["music_like"][:, :20000]
    batch = jnp.asarray(np.concatenate([wav, 0.5 * wav]))
    eager, _ = kaldi_fbank(batch)
    jitted, _ = jax.jit(kaldi_fbank)(batch, jnp.array([20000, 15000]))
    mapped = jax.vmap(lambda w: kaldi_fbank(w[None])[0][0])(batch)
    # Fusion changes float32 rounding in the quiet bands: compare on the normalised scale.
    scale = lambda x: np.asarray(normalize_fbank(x))
    np.testing.assert_allclose(scale(jitted), scale(eager), atol=1e-4)
    np.testing.assert_allclose(scale(mapped), scale(eager), atol=1e-4)


def test_bad_input():
    with pytest.raises(ValueError, match="shorter than one"):
        kaldi_fbank(jnp.zeros((1, 399)))
    with pytest.raises(ValueError, match="batch, samples"):
        kaldi_fbank(jnp.zeros((1, 2, 4000)))


def test_the_cached_window_and_filters_are_read_only():
    # They are cached and shared: an in-place change by one caller would shift every fbank.
    from haaqi_jax import fbank
    for constant in (fbank.povey_window(), fbank.mel_filter_bank()):
        with pytest.raises(ValueError, match="read-only"):
            constant *= 0.5
