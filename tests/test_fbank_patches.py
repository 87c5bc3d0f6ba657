"""The "fbank_patches" encoder against torchaudio's Kaldi fbank cut into patches by torch's own
conv2d (an identity kernel, BEATs' patch-embedding layout), and inside HAAQI-Net."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from beats_reference import reference_padding_masks, torch_kaldi_fbank
from haaqi_jax.fbank_patches import FbankPatches, FbankPatchesConfig
from haaqi_jax.model import HAAQINet, HAAQINetConfig

SR = 16000


def _wavs(lengths, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(max(lengths)) / SR
    rows = []
    for n in lengths:
        x = 0.2 * np.sin(2 * np.pi * rng.uniform(100, 2000) * t) + 0.01 * rng.normal(size=t.size)
        x[n:] = 0
        rows.append(x)
    return np.stack(rows).astype(np.float32)


def _torch_patch_tokens(kaldi, wav):
    """BEATs' patch embedding with an identity kernel: token (time patch, mel patch) holds its
    16 x 16 patch, frame major -> (B, T, 256) in BEATs' flatten(2).transpose(1, 2) order."""
    fbank = torch.from_numpy(torch_kaldi_fbank(kaldi, wav))[:, None]      # (B, 1, F, 128)
    kernel = torch.eye(256).reshape(256, 1, 16, 16)
    patches = torch.nn.functional.conv2d(fbank, kernel, stride=16)          # (B, 256, F/16, 8)
    return patches.flatten(2).transpose(1, 2).numpy()


def test_tokens_are_kaldi_fbank_patches_in_beats_order(kaldi):
    wav = _wavs([SR])
    module = FbankPatches(FbankPatchesConfig(position_dim=0))
    out = module.apply({}, jnp.asarray(wav))
    np.testing.assert_allclose(np.asarray(out.last_hidden_state), _torch_patch_tokens(kaldi, wav),
                               atol=1e-4)


def test_mel_position_one_hot_and_padding_matches_reference_rule(kaldi):
    lengths = [SR, 9000]
    wav = _wavs(lengths, seed=1)
    module = FbankPatches()
    params = module.init(jax.random.PRNGKey(0), jnp.asarray(wav[:1, :4000]))
    pad = np.arange(wav.shape[1])[None] >= np.asarray(lengths)[:, None]
    out = module.apply(params, jnp.asarray(wav), jnp.asarray(pad))
    feats = np.asarray(out.last_hidden_state)
    n_tokens = feats.shape[1]
    _, token_pad = reference_padding_masks(wav.shape[1], lengths, 1 + (wav.shape[1] - 400) // 160,
                                           n_tokens)
    np.testing.assert_array_equal(np.asarray(out.padding_mask), token_pad)
    expected_position = np.tile(np.eye(8), (n_tokens // 8, 1))
    np.testing.assert_array_equal(feats[0, :, 256:], expected_position)
    assert np.all(feats[token_pad] == 0)
    np.testing.assert_allclose(feats[0, :, :256], _torch_patch_tokens(kaldi, wav[:1])[0], atol=1e-4)


def test_spectrum_context_is_each_time_patch_mean_spectrum(kaldi):
    wav = _wavs([SR], seed=3)
    module = FbankPatches(FbankPatchesConfig(position_dim=0, spectrum_context=True))
    feats = np.asarray(module.apply({}, jnp.asarray(wav)).last_hidden_state)[0]
    fbank = torch_kaldi_fbank(kaldi, wav)[0]                                 # (F, 128)
    n_time = fbank.shape[0] // 16
    spectra = fbank[:n_time * 16].reshape(n_time, 16, 128).mean(axis=1)      # (T/8, 128)
    assert feats.shape == (n_time * 8, 256 + 128)
    np.testing.assert_allclose(feats[:, 256:], np.repeat(spectra, 8, axis=0), atol=1e-4)


def test_clip_statistics_are_band_summaries_of_the_valid_frames(kaldi):
    lengths = [SR, 9000]
    wav = _wavs(lengths, seed=4)
    wav[1, 9000:] = 0.3          # garbage after the clip's end must not leak into its summary
    module = FbankPatches(FbankPatchesConfig(position_dim=0, clip_statistics=True))
    pad = np.arange(wav.shape[1])[None] >= np.asarray(lengths)[:, None]
    out = module.apply({}, jnp.asarray(wav), jnp.asarray(pad))
    feats, token_pad = np.asarray(out.last_hidden_state), np.asarray(out.padding_mask)
    fbank = torch_kaldi_fbank(kaldi, wav)                                     # (B, F, 128)
    frame_pad, _ = reference_padding_masks(wav.shape[1], lengths, fbank.shape[1], feats.shape[1])
    assert feats.shape[-1] == 256 + 3 * 128
    for i in range(2):
        frames = fbank[i][~frame_pad[i]].astype(np.float64)
        expected = np.concatenate([frames.mean(0), frames.std(0), np.diff(frames, axis=0).std(0)])
        valid_tokens = feats[i][~token_pad[i]]
        np.testing.assert_allclose(valid_tokens[:, 256:], np.broadcast_to(
            expected, (len(valid_tokens), expected.size)), atol=2e-4, err_msg=f"item {i}")


def test_haaqinet_with_fbank_patches_batch_equals_alone():
    config = HAAQINetConfig(encoder_kind="fbank_patches", encoder_config={"position_dim": 8})
    net = HAAQINet.init_random(config, seed=0)
    lengths = [SR, 20000]
    wav = _wavs(lengths, seed=2)
    audiogram = np.array([[10, 15, 20, 30, 40, 50, 60, 65], [0] * 8], np.float32)
    sample_pad = np.arange(wav.shape[1])[None] >= np.asarray(lengths)[:, None]
    both = np.asarray(net.apply(jnp.asarray(wav), jnp.asarray(sample_pad),
                                jnp.asarray(audiogram)).clip_score)
    for i, n in enumerate(lengths):
        alone = np.asarray(net.apply(jnp.asarray(wav[i:i + 1, :n]), None,
                                     jnp.asarray(audiogram[i:i + 1])).clip_score)
        np.testing.assert_allclose(alone[0], both[i], atol=1e-5)


def test_bad_config_and_short_input_name_the_problem():
    with pytest.raises(ValueError, match=r"FbankPatchesConfig: unknown keys \['position_dims'\]"):
        FbankPatchesConfig.from_dict({"position_dims": 8})
    with pytest.raises(ValueError, match="position_dim"):
        FbankPatchesConfig(position_dim=-1)
    with pytest.raises(ValueError):
        FbankPatches().init(jax.random.PRNGKey(0), jnp.zeros((1, 1000)))
