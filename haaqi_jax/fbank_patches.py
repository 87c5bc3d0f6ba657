"""A transformer-free encoder: the normalised log-mel patches that BEATs reads, as tokens.

Encoder kind "fbank_patches" (registered on import, so `HAAQINetConfig(encoder_kind=
"fbank_patches")` and `HAAQINet.load` find it). It computes BEATs' own input -- the Kaldi
fbank of the 16 kHz waveform, normalised as BEATs does -- and cuts it into BEATs' 16 x 16
patches in BEATs' token order (time patch major, 8 mel patches within), so every token of the
HAAQI-Net head sits exactly where a BEATs token would. A token's feature is its patch's 256
log-mel values (16 frames x 16 bins, frame major), followed by a small embedding of its mel
patch index (0..7; initialised to one-hot) so that the head can tell the bands apart.

Why it exists: with no pretrained BEATs weights on the machine (the demo job), a *random*
BEATs projects each patch through a random convolution, a per-token LayerNorm (which removes
the patch's overall level, i.e. exactly the spectral balance that low-pass, tilt and
resonance change) and random attention that mixes tokens. Handing the head the patches
themselves keeps all of that information and costs only the fbank.

Optionally every token also carries the spectrum of its time patch (`spectrum_context`) and
per-band summaries of the whole clip (`clip_statistics`, on in configs/default.py): a head
trained on a few hundred clips learns the clip-level spectral balance from these far more
readily than from 496 single-band patches.

    __call__(waveform (B, N) float in [-1, 1], padding_mask (B, N) bool True = pad | None)
      -> beats.BEATsOutput(last_hidden_state (B, T, FbankPatchesConfig.feature_dim),
         hidden_states (that one array), padding_mask (B, T) True = pad)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from haaqi_jax import beats as beats_lib
from haaqi_jax import fbank as fbank_lib
from haaqi_jax import model as model_lib
from haaqi_jax.config import reject_unknown_keys

PATCH = model_lib.PATCH                  # BEATs' 16 x 16 patches
MEL_PATCHES = model_lib.MEL_PATCHES


@dataclasses.dataclass(frozen=True)
class FbankPatchesConfig:
    """position_dim: width of the mel-patch index embedding appended to each token (0 = none;
    initialised to the first `position_dim` columns of an 8 x 8 identity, so <= 8 is one-hot).
    spectrum_context: also append the whole 128-bin spectrum of the token's time patch (mean
    over its 16 frames), so that every token sees the spectral balance, not one band of it.
    clip_statistics: also append, to every token, three 128-bin summaries of the whole clip's
    valid frames: the mean and standard deviation of each band and the standard deviation of
    its frame-to-frame change (what benchmarks/demo_feature_baseline.py regresses on)."""

    position_dim: int = MEL_PATCHES
    spectrum_context: bool = False
    clip_statistics: bool = False

    def __post_init__(self):
        if self.position_dim < 0:
            raise ValueError(f"position_dim must be >= 0, got {self.position_dim}")

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "FbankPatchesConfig":
        reject_unknown_keys(cfg, cls)
        return cls(**cfg)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def feature_dim(self) -> int:
        return (PATCH * PATCH + self.position_dim
                + fbank_lib.NUM_MEL_BINS * (self.spectrum_context + 3 * self.clip_statistics))


def clip_band_statistics(fbank: jax.Array, frame_padding: jax.Array) -> jax.Array:
    """Per-band summaries of each clip's valid frames.

    Args:
      fbank: (B, F, M) log-mel frames; frame_padding: (B, F) bool, True = padded frame (valid
        frames first).
    Returns:
      (B, 3 M): band means, band standard deviations, standard deviations of the frame-to-frame
      change (over pairs of valid frames; 0 for a one-frame clip).
    """
    valid = (~frame_padding).astype(fbank.dtype)[..., None]             # (B, F, 1)
    count = jnp.maximum(valid.sum(axis=1), 1.0)                          # (B, 1)
    mean = (fbank * valid).sum(axis=1) / count
    std = _sqrt_or_zero(((fbank - mean[:, None]) ** 2 * valid).sum(axis=1) / count)
    delta = fbank[:, 1:] - fbank[:, :-1]
    pair = valid[:, 1:] * valid[:, :-1]
    pairs = jnp.maximum(pair.sum(axis=1), 1.0)
    delta_mean = (delta * pair).sum(axis=1) / pairs
    delta_std = _sqrt_or_zero(((delta - delta_mean[:, None]) ** 2 * pair).sum(axis=1) / pairs)
    return jnp.concatenate([mean, std, delta_std], axis=-1)


def _sqrt_or_zero(variance: jax.Array) -> jax.Array:
    """sqrt with a zero gradient at 0: a constant band (a silent mel band floors to one
    value) has a variance of exactly 0, where sqrt's infinite slope made every input
    gradient NaN. Values are sqrt's, bit for bit."""
    positive = variance > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, variance, 1.0)), 0.0)


def _one_hot_init(key, shape, dtype=jnp.float32):
    del key
    return jnp.eye(*shape, dtype=dtype)


class FbankPatches(nn.Module):
    """See the module docstring."""

    config: FbankPatchesConfig = FbankPatchesConfig()

    @nn.compact
    def __call__(self, waveform: jax.Array, padding_mask: jax.Array | None = None, *,
                 deterministic: bool = True) -> beats_lib.BEATsOutput:
        del deterministic  # no dropout
        fbank, frame_padding = beats_lib.encoder_input(waveform, padding_mask,
                                                    patch_size=PATCH)   # (B, F, 128), (B, F)
        batch, n_frames, _ = fbank.shape
        n_time = n_frames // PATCH
        patches = fbank[:, :n_time * PATCH].reshape(batch, n_time, PATCH, MEL_PATCHES, PATCH)
        tokens = patches.transpose(0, 1, 3, 2, 4).reshape(batch, n_time * MEL_PATCHES,
                                                           PATCH * PATCH)
        token_padding = beats_lib.token_padding_mask(frame_padding, tokens.shape[1])
        if self.config.spectrum_context:
            spectrum = patches.mean(axis=2).reshape(batch, n_time, 1, -1)  # (B, T/8, 1, 128)
            spectrum = jnp.broadcast_to(spectrum, (batch, n_time, MEL_PATCHES, spectrum.shape[-1]))
            tokens = jnp.concatenate([tokens, spectrum.reshape(batch, tokens.shape[1], -1)], -1)
        if self.config.clip_statistics:
            stats = clip_band_statistics(fbank, frame_padding)          # (B, 384)
            tokens = jnp.concatenate([tokens, jnp.broadcast_to(
                stats[:, None], (batch, tokens.shape[1], stats.shape[-1]))], axis=-1)
        if self.config.position_dim:
            table = self.param("mel_position", _one_hot_init,
                               (MEL_PATCHES, self.config.position_dim))
            position = jnp.tile(table, (n_time, 1))                     # (T, position_dim)
            tokens = jnp.concatenate(
                [tokens, jnp.broadcast_to(position, (batch,) + position.shape)], axis=-1)
        tokens = jnp.where(token_padding[..., None], 0.0, tokens)
        return beats_lib.BEATsOutput(last_hidden_state=tokens, hidden_states=(tokens,),
                                     padding_mask=token_padding)


model_lib.register_encoder(
    "fbank_patches", build=lambda cfg: FbankPatches(FbankPatchesConfig.from_dict(cfg)),
    default_config=lambda: FbankPatchesConfig().to_dict())
