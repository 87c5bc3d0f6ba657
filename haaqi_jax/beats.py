"""BEATs audio encoder (Chen et al., 2022) in Flax linen, numerically matching the reference.

Follows the structure of Microsoft's BEATs code (github.com/microsoft/unilm, folder beats/) as
also packaged in speechbrain 1.1.2 (speechbrain/lobes/models/beats.py); written from scratch.
BEATs: MIT License, Copyright (c) Microsoft Corporation.

Pipeline (shapes for the released model, 10 s clip: F = 998 frames, T = 62 * 8 = 496 tokens):

    waveform (B, N) --fbank.kaldi_fbank, normalize_fbank--> (B, F, 128)
    --front_end: Conv 16x16/16 -> (B, F/16, 8, 512), flattened time-major (token = t*8 + f),
      LayerNorm, post_extract_proj 512 -> 768--> (B, T, 768)
    --padded tokens zeroed; + pos_conv(x) (grouped Conv1d, weight norm, last step dropped,
      exact GELU); encoder_layer_norm--> hidden_states[0]
    --L deep-norm post-LN layers, gated relative position bias shared by all layers-->
      hidden_states[1..L]; last_hidden_state = hidden_states[L] (no final LayerNorm)
    --fine-tuned checkpoints only: predictor Dense(768 -> 527) per token, masked time mean,
      sigmoid--> logits, probs

Padding (reference semantics, speechbrain `forward_padding_mask`): a (B, N) sample mask is
reduced to frames (`fbank.frame_padding_mask`: N // F samples per frame, a frame is padding
only if all its samples are) and then to tokens (`token_padding_mask`: the same rule applied to
the flattened token axis as if it were time, i.e. about two frames per token). Padded tokens
are zeroed before the positional conv and ignored as attention keys; their outputs are not
zeroed. Consequences: at the feature level (`encode_fbank`) a frame mask whose valid frames
are a whole number of patches gives exactly the clip's stand-alone result on its valid tokens;
at the waveform level the N // F rule drifts from the patch grid, so a padded clip usually
keeps one or two extra "valid" tokens (partly padding) as keys and differs slightly from the
clip run alone -- exactly as the reference does. Only some lengths align (see the tests).

Parameter tree (`BEATs(config).init(...)['params']`; PyTorch key in brackets):

    front_end/patch_embedding/kernel (16, 16, 1, 512)   [patch_embedding.weight]
    front_end/layer_norm/{scale, bias}                    [layer_norm.*]
    front_end/post_extract_proj/{kernel, bias}            [post_extract_proj.*]
    pos_conv/{weight_g (K,), weight_v (K, C/G, C), bias}  [encoder.pos_conv.0.*]
    encoder_layer_norm/{scale, bias}                      [encoder.layer_norm.*]
    relative_position_bias/embedding (buckets, H)         [encoder.layers.{L-1}.self_attn.
                                                           relative_attention_bias.weight]
    layers_{i}/self_attn/{q,k,v,out}_proj/{kernel, bias}  [encoder.layers.i.self_attn.*]
    layers_{i}/self_attn/grep_linear/{kernel, bias}, layers_{i}/self_attn/grep_a (H,)
    layers_{i}/{self_attn_layer_norm, final_layer_norm}/{scale, bias}, layers_{i}/{fc1, fc2}
    predictor/{kernel, bias}                              (fine-tuned checkpoints only)

Dense kernels are (in, out) (PyTorch's transposed). `BEATsFrontEnd`, `BEATsEncoderLayer` and
`RelativePositionBias` are the reusable pieces for the distilled student (same subtree names).
Layer drop (`encoder_layerdrop`) and layer-wise gradient decay are training tricks of the
original pre-training and are not applied here; dropout is, when `deterministic=False`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import types
from typing import Any, Callable, Mapping

import flax.linen as nn
import flax.struct
from flax.linen.dtypes import promote_dtype
import jax
import jax.numpy as jnp
import numpy as np

from haaqi_jax import attention as attention_lib
from haaqi_jax import fbank as fbank_lib

LAYER_NORM_EPS = 1e-5


# ----------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass(frozen=True)
class BEATsConfig:
    """BEATs hyper-parameters, named as in the checkpoint's 'cfg' dict.

    Defaults are the reference code's class defaults (NOT the released model: use
    `BEATsConfig.from_dict(RELEASED_CONFIG)` or the checkpoint's cfg, which always wins).
    `from_dict` ignores keys that are not fields here (e.g. pre-training-only settings of
    future checkpoints); `layer_wise_gradient_decay_ratio` and `encoder_layerdrop` are kept for
    round trips but unused.
    """

    input_patch_size: int = 16
    embed_dim: int = 512
    conv_bias: bool = False
    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"
    layer_wise_gradient_decay_ratio: float = 1.0
    layer_norm_first: bool = False
    deep_norm: bool = False
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    encoder_layerdrop: float = 0.0
    dropout_input: float = 0.0
    conv_pos: int = 128
    conv_pos_groups: int = 16
    relative_position_embedding: bool = False
    num_buckets: int = 320
    max_distance: int = 1280
    gru_rel_pos: bool = False
    finetuned_model: bool = False
    predictor_dropout: float = 0.1
    predictor_class: int = 527

    def __post_init__(self):
        if self.layer_norm_first:
            raise ValueError("BEATsConfig: layer_norm_first=True is not supported (no released "
                             "BEATs checkpoint uses it)")
        if self.encoder_embed_dim % self.encoder_attention_heads:
            raise ValueError(f"BEATsConfig: encoder_embed_dim={self.encoder_embed_dim} is not "
                             f"divisible by encoder_attention_heads={self.encoder_attention_heads}")
        if self.encoder_embed_dim % self.conv_pos_groups:
            raise ValueError(f"BEATsConfig: encoder_embed_dim={self.encoder_embed_dim} is not "
                             f"divisible by conv_pos_groups={self.conv_pos_groups}")
        if self.activation_fn not in _ACTIVATIONS:
            raise ValueError(f"BEATsConfig: activation_fn={self.activation_fn!r} is not supported "
                             f"(choose from {sorted(_ACTIVATIONS)})")
        if fbank_lib.NUM_MEL_BINS % self.input_patch_size:
            raise ValueError(f"BEATsConfig: input_patch_size={self.input_patch_size} does not "
                             f"divide the {fbank_lib.NUM_MEL_BINS} mel bins")

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "BEATsConfig":
        """Builds a config from a checkpoint's 'cfg' dict; unknown keys are ignored."""
        if not isinstance(cfg, Mapping):
            raise ValueError(f"BEATsConfig.from_dict: expected a dict, got {type(cfg).__name__}")
        names = {f.name: f.type for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in cfg.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict with the checkpoint's key names."""
        return dataclasses.asdict(self)

    @property
    def head_dim(self) -> int:
        return self.encoder_embed_dim // self.encoder_attention_heads

    @property
    def deep_norm_alpha(self) -> float:
        return (2.0 * self.encoder_layers) ** 0.25 if self.deep_norm else 1.0

    @property
    def tokens_per_patch_row(self) -> int:
        """Frequency patches per time step (8 for 128 mel bins and 16x16 patches)."""
        return fbank_lib.NUM_MEL_BINS // self.input_patch_size


# cfg of BEATs_iter3_plus_AS2M.pt (the checkpoint HAAQI-Net uses). Dropout-type values only
# matter for training; the architecture keys are what the released weights need.
RELEASED_CONFIG: Mapping[str, Any] = types.MappingProxyType({
    "input_patch_size": 16, "embed_dim": 512, "conv_bias": False,
    "encoder_layers": 12, "encoder_embed_dim": 768, "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12, "activation_fn": "gelu",
    "layer_wise_gradient_decay_ratio": 0.6, "layer_norm_first": False, "deep_norm": True,
    "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
    "encoder_layerdrop": 0.05, "dropout_input": 0.0,
    "conv_pos": 128, "conv_pos_groups": 16,
    "relative_position_embedding": True, "num_buckets": 320, "max_distance": 800,
    "gru_rel_pos": True, "finetuned_model": False, "predictor_dropout": 0.0,
    "predictor_class": 527,
})  # read-only: HAAQINetConfig() reads it each time, so a change would change the default

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_accurate": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "linear": lambda x: x,
}


# ----------------------------------------------------------------------------------------------
# Outputs, masks, input checks


@flax.struct.dataclass
class BEATsOutput:
    """Encoder outputs (a pytree).

    last_hidden_state: (B, T, C) output of the last layer.
    hidden_states: tuple of L + 1 arrays (B, T, C): encoder input after the encoder LayerNorm,
      then each layer's output (the distilled student's index 0: its front end's output).
    padding_mask: (B, T) bool, True = padded token.
    logits: (B, classes) masked time mean of the predictor (fine-tuned models), else None.
    probs: sigmoid(logits), else None.
    """

    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...]
    padding_mask: jax.Array
    logits: jax.Array | None = None
    probs: jax.Array | None = None


def num_tokens(n_frames: int, patch_size: int = 16) -> int:
    """Number of tokens for `n_frames` fbank frames: (n_frames // patch) * (128 // patch)."""
    return (n_frames // patch_size) * (fbank_lib.NUM_MEL_BINS // patch_size)


def token_padding_mask(frame_padding_mask: jax.Array, n_tokens: int) -> jax.Array:
    """Reference rule: (B, F) True=pad -> (B, T) True=pad.

    The frame axis is cut into T chunks of F // T frames (remainder dropped) as if the
    flattened token axis were time; a token is padding when its whole chunk is.
    """
    batch, n_frames = frame_padding_mask.shape
    chunk = n_frames // n_tokens
    return frame_padding_mask[:, :n_tokens * chunk].reshape(batch, n_tokens, chunk).all(-1)


def min_samples(patch_size: int = 16) -> int:
    """Shortest waveform (samples) that yields one patch of `patch_size` frames."""
    return fbank_lib.FRAME_LENGTH + (patch_size - 1) * fbank_lib.FRAME_SHIFT


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_waveform_batch(waveform: Any, padding_mask: Any = None, *,
                         patch_size: int = 16) -> None:
    """Host-side checks of a (B, N) batch; raises ValueError naming the problem (one clip's
    checks and resampling: `haaqi_jax.data.audio.check_waveform`).

    Run it before a jitted step: under jit only the shape and dtype checks can run.

    Args:
      waveform: (B, N) mono float audio in [-1, 1] at 16 kHz.
      padding_mask: None or (B, N) bool, True = padding.
      patch_size: BEATs patch size (frames per patch).
    """
    shape = tuple(np.shape(waveform))
    if len(shape) != 2:
        hint = (" (a channel axis? mix stereo to mono first)" if len(shape) == 3 else
                " (add a batch axis: waveform[None])" if len(shape) == 1 else "")
        raise ValueError(f"waveform must be (batch, samples) mono audio, got shape {shape}{hint}")
    dtype = np.dtype(waveform.dtype if hasattr(waveform, "dtype") else np.asarray(waveform).dtype)
    if not fbank_lib.is_float_dtype(dtype):
        raise ValueError(f"waveform must be floating point in [-1, 1], got dtype {dtype} (for "
                         f"16-bit PCM divide by 32768)")
    if shape[1] < min_samples(patch_size):
        raise ValueError(f"waveform has {shape[1]} samples; BEATs needs at least "
                         f"{min_samples(patch_size)} (one {patch_size}-frame patch)")
    if padding_mask is not None:
        if tuple(np.shape(padding_mask)) != shape:
            raise ValueError(f"padding_mask shape {tuple(np.shape(padding_mask))} != waveform "
                             f"shape {shape}")
        mask_dtype = np.dtype(padding_mask.dtype if hasattr(padding_mask, "dtype")
                              else np.asarray(padding_mask).dtype)
        if mask_dtype != np.bool_:
            raise ValueError(f"padding_mask must be bool (True = padding), got {mask_dtype}")
    if not _is_concrete(waveform):
        return
    values = np.asarray(waveform, np.float32)
    finite = np.isfinite(values).all(axis=1)
    if not finite.all():
        raise ValueError(f"waveform rows {np.flatnonzero(~finite).tolist()} contain NaN or inf")
    peak = float(np.abs(values).max()) if values.size else 0.0
    if peak > fbank_lib.MAX_PEAK:
        raise ValueError(f"waveform peak {peak:.4g} is far outside [-1, 1]: integer PCM scale? "
                         f"(divide by 32768)")
    if padding_mask is not None and _is_concrete(padding_mask):
        # What matters is the reference's own reduction of the mask to tokens: a row with no
        # valid token would attend over nothing. (A one-patch clip padded into a long batch
        # can keep its token with fewer than min_samples unmasked samples.)
        mask = np.asarray(padding_mask)
        n_frames = fbank_lib.num_frames(shape[1])
        tokens = token_padding_mask(
            np.asarray(fbank_lib.frame_padding_mask(mask, n_frames)),
            num_tokens(n_frames, patch_size))
        empty = np.flatnonzero(np.asarray(tokens).all(axis=1))
        if empty.size:
            valid = (~mask).sum(axis=1)
            raise ValueError(f"waveform rows {empty.tolist()} have too few valid samples "
                             f"({valid[empty].tolist()}) for one BEATs token; each clip needs "
                             f"at least {min_samples(patch_size)} (one {patch_size}-frame patch)")


def encoder_input(waveform: jax.Array, padding_mask: jax.Array | None, *,
                  patch_size: int = 16) -> tuple[jax.Array, jax.Array]:
    """BEATs' input pipeline, shared by every encoder that reads its fbank: checks
    (`check_waveform_batch`), the Kaldi fbank and BEATs' normalisation.

    Args:
      waveform: (B, N) float audio in [-1, 1] at 16 kHz.
      padding_mask: (B, N) bool, True = padding, or None (every sample valid).
      patch_size: frames per patch (the checks need one whole patch per row).
    Returns:
      fbank: (B, F, 128) normalised log-mel energies.
      frame_padding_mask: (B, F) bool, True = padded frame, by the reference's reduction of
        the sample mask (`fbank.frame_padding_mask`).
    """
    check_waveform_batch(waveform, padding_mask, patch_size=patch_size)
    fbank, _ = fbank_lib.kaldi_fbank(jnp.asarray(waveform, jnp.float32))
    if padding_mask is None:
        frame_padding = jnp.zeros(fbank.shape[:2], bool)
    else:
        frame_padding = fbank_lib.frame_padding_mask(jnp.asarray(padding_mask),
                                                     fbank.shape[1])
    return fbank_lib.normalize_fbank(fbank), frame_padding


def check_fbank(fbank: jax.Array, frame_padding_mask: jax.Array | None,
                patch_size: int) -> jax.Array:
    """Shape checks of the feature-level entry point: fbank (B, F, 128) with F >= patch_size,
    frame_padding_mask (B, F) True = padded frame, or None. Returns the (B, F) mask (all False
    when None was given). Raises ValueError naming the problem."""
    if fbank.ndim != 3 or fbank.shape[-1] != fbank_lib.NUM_MEL_BINS:
        raise ValueError(f"fbank must be (batch, frames, {fbank_lib.NUM_MEL_BINS}), "
                         f"got {fbank.shape}")
    if fbank.shape[1] < patch_size:
        raise ValueError(f"fbank has {fbank.shape[1]} frames; BEATs needs at least "
                         f"{patch_size} (one patch)")
    if frame_padding_mask is None:
        return jnp.zeros(fbank.shape[:2], bool)
    if frame_padding_mask.shape != fbank.shape[:2]:
        raise ValueError(f"frame_padding_mask shape {frame_padding_mask.shape} != fbank "
                         f"frames {fbank.shape[:2]}")
    return frame_padding_mask

# ----------------------------------------------------------------------------------------------
# Modules


def _layer_norm(name: str, dtype: Any = None) -> nn.LayerNorm:
    # flax computes the statistics in float32 whatever `dtype` (the output's) is
    return nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=dtype, name=name)


class BEATsFrontEnd(nn.Module):
    """Patch embedding + LayerNorm + post_extract_proj (+ input dropout).

    __call__(fbank (B, F, 128) normalised, frame_padding_mask (B, F) True=pad) ->
      (features (B, T, C), token_padding_mask (B, T) True=pad)
    dtype: compute dtype of the matmuls and of the output (None: the inputs', float32);
      parameters stay float32 (see `BEATs`).
    """

    config: BEATsConfig
    dtype: Any = None

    @nn.compact
    def __call__(self, fbank: jax.Array, frame_padding_mask: jax.Array, *,
                 deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        p = cfg.input_patch_size
        batch, n_frames, n_mels = fbank.shape
        n_time = n_frames // p
        patches = nn.Conv(cfg.embed_dim, (p, p), strides=(p, p), padding="VALID",
                          use_bias=cfg.conv_bias, dtype=self.dtype, name="patch_embedding")(
                              fbank[:, :n_time * p, :, None])       # (B, F/p, M/p, E)
        x = patches.reshape(batch, n_time * (n_mels // p), cfg.embed_dim)
        x = _layer_norm("layer_norm", self.dtype)(x)
        token_padding = token_padding_mask(frame_padding_mask, x.shape[1])
        if cfg.embed_dim != cfg.encoder_embed_dim:
            x = nn.Dense(cfg.encoder_embed_dim, dtype=self.dtype, name="post_extract_proj")(x)
        x = nn.Dropout(cfg.dropout_input)(x, deterministic=deterministic)
        return x, token_padding


class PositionalConv(nn.Module):
    """Grouped Conv1d with weight norm over the kernel axis, last step dropped, exact GELU.

    __call__(x (B, T, C)) -> (B, T, C)
    dtype: compute dtype of the convolution (None: float32, half-precision inputs included,
      as they are promoted with the float32 kernel); the weight norm is taken in float32, the
      parameters' dtype.
    """

    config: BEATsConfig
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        width, groups, channels = cfg.conv_pos, cfg.conv_pos_groups, cfg.encoder_embed_dim
        weight_g = self.param("weight_g", nn.initializers.ones, (width,))
        weight_v = self.param("weight_v", nn.initializers.normal(
            math.sqrt(4.0 / (width * channels))), (width, channels // groups, channels))
        bias = self.param("bias", nn.initializers.zeros, (channels,))
        norm = jnp.sqrt(jnp.sum(weight_v ** 2, axis=(1, 2), keepdims=True))
        kernel = weight_g[:, None, None] * weight_v / norm
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = jax.lax.conv_general_dilated(
            x, kernel, window_strides=(1,), padding=[(width // 2, width // 2)],
            dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=groups,
            precision=jax.lax.Precision.HIGHEST)
        if width % 2 == 0:
            y = y[:, :-1]                      # even kernel: one step too many, drop the LAST
        return jax.nn.gelu(y + bias, approximate=False)


def relative_position_buckets(n_tokens: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """T5 bidirectional buckets of (key - query), shape (T, T) int32, host-side numpy.

    Entry (q, k) is the bucket of offset k - q: built from the (2T - 1,) buckets of the offsets
    with one (T, T) int32 copy (no (T, T) int64 temporaries; a whole song is ~50 tokens per
    second).
    """
    per_offset = offset_buckets(np.arange(1 - n_tokens, n_tokens), num_buckets, max_distance)
    # Row q holds offsets -q .. T - 1 - q: the window of per_offset starting at T - 1 - q.
    windows = np.lib.stride_tricks.sliding_window_view(per_offset, n_tokens)
    return np.ascontiguousarray(windows[::-1])


def offset_buckets(relative: np.ndarray, num_buckets: int, max_distance: int) -> np.ndarray:
    """T5 bidirectional buckets of key - query offsets (any shape, int) -> int32, host-side.

    The logarithmic part is evaluated in float32 like the reference, so that values sitting on
    a bucket edge are truncated the same way.
    """
    relative = np.asarray(relative)
    half = num_buckets // 2
    buckets = (relative > 0).astype(np.int64) * half
    distance = np.abs(relative)
    max_exact = half // 2
    f32 = np.float32
    with np.errstate(divide="ignore"):
        log_ratio = np.log(distance.astype(f32) / f32(max_exact))
    large = log_ratio / f32(math.log(max_distance / max_exact)) * f32(half - max_exact)
    large = max_exact + np.where(distance < max_exact, 0, large).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (buckets + np.where(distance < max_exact, distance, large)).astype(np.int32)


class RelativePositionBias(nn.Module):
    """One learned bias table (BEATs shares it across all layers; the student may give each
    layer its own).

    __call__(n_tokens) -> (H, T, T) bias added to the attention logits; for inputs long enough
    that `attention.attend` walks them in query blocks (`attention.default_query_block`), the
    same bias as an `attention.ToeplitzBias` of (H, 2T - 1) diagonals, whose memory grows with
    T rather than T^2.
    """

    config: BEATsConfig

    @nn.compact
    def __call__(self, n_tokens: int) -> jax.Array | attention_lib.ToeplitzBias:
        cfg = self.config
        table = self.param("embedding", nn.initializers.normal(0.02),
                           (cfg.num_buckets, cfg.encoder_attention_heads))
        heads = cfg.encoder_attention_heads
        if attention_lib.default_query_block(heads, n_tokens, n_tokens) is not None:
            buckets = offset_buckets(np.arange(1 - n_tokens, n_tokens), cfg.num_buckets,
                                     cfg.max_distance)
            return attention_lib.ToeplitzBias(jnp.transpose(table[buckets]))
        buckets = relative_position_buckets(n_tokens, cfg.num_buckets, cfg.max_distance)
        return jnp.transpose(table[buckets], (2, 0, 1))


class BEATsSelfAttention(nn.Module):
    """Multi-head self-attention with the gated relative position bias (gru_rel_pos).

    __call__(x (B, T, C), key_padding_mask (B, T) True=pad, position_bias (H, T, T), an
      attention.ToeplitzBias or None) -> (B, T, C)
    dtype: compute dtype of the projections (None: float32, half-precision inputs included,
      as flax promotes them with the float32 parameters); `attention.attend` keeps the logits
      and softmax float32, the float32 position bias is added to them.
    """

    config: BEATsConfig
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, key_padding_mask: jax.Array,
                 position_bias: jax.Array | None, *, deterministic: bool = True) -> jax.Array:
        cfg = self.config
        batch, length, channels = x.shape
        dense = functools.partial(nn.Dense, dtype=self.dtype)
        heads, head_dim = cfg.encoder_attention_heads, cfg.head_dim
        split = lambda y: y.reshape(batch, length, heads, head_dim)
        q = split(dense(channels, name="q_proj")(x))
        k = split(dense(channels, name="k_proj")(x))
        v = split(dense(channels, name="v_proj")(x))
        heads_first = lambda y: jnp.transpose(y, (0, 2, 1, 3))          # (B, H, T, Dh)
        gate = None
        if position_bias is not None and cfg.gru_rel_pos:
            # Gate from the unscaled per-head query; grep_linear is shared across heads.
            grep_a = self.param("grep_a", nn.initializers.ones, (heads,))
            gates = dense(8, name="grep_linear")(q)                      # (B, T, H, 8)
            # the gate scales a float32 bias: its sigmoid in float32 too
            gates = attention_lib.at_least_float32(gates).reshape(batch, length, heads, 2, 4)
            gates = jax.nn.sigmoid(gates.sum(-1))
            gate_a, gate_b = gates[..., 0], gates[..., 1]                 # (B, T, H)
            gate = jnp.transpose(gate_a * (gate_b * grep_a - 1.0) + 2.0, (0, 2, 1))[..., None]
        dropout_key = None
        if not deterministic and cfg.attention_dropout > 0.0:
            dropout_key = self.make_rng("dropout")
        out = attention_lib.attend(
            heads_first(q * head_dim ** -0.5), heads_first(k), heads_first(v), ~key_padding_mask,
            bias=position_bias, bias_gate=gate, dropout_rate=cfg.attention_dropout,
            dropout_key=dropout_key)
        out = jnp.transpose(out, (0, 2, 1, 3)).reshape(batch, length, channels)
        return dense(channels, name="out_proj")(out)


class BEATsEncoderLayer(nn.Module):
    """Post-LN transformer layer with deep norm: x = LN(alpha * x + sublayer(x)).

    __call__(x (B, T, C), key_padding_mask (B, T) True=pad, position_bias (H, T, T), an
      attention.ToeplitzBias or None) -> (B, T, C)
    dtype: compute dtype of the matmuls and activations (None: float32, half-precision inputs
      included, as flax promotes them with the float32 parameters); LayerNorm statistics and
      the attention's softmax stay float32.
    """

    config: BEATsConfig
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, key_padding_mask: jax.Array,
                 position_bias: jax.Array | None, *, deterministic: bool = True) -> jax.Array:
        cfg = self.config
        alpha = cfg.deep_norm_alpha
        activation = _ACTIVATIONS[cfg.activation_fn]
        attended = BEATsSelfAttention(cfg, self.dtype, name="self_attn")(
            x, key_padding_mask, position_bias, deterministic=deterministic)
        attended = nn.Dropout(cfg.dropout)(attended, deterministic=deterministic)
        x = _layer_norm("self_attn_layer_norm", self.dtype)(x * alpha + attended)
        hidden = activation(nn.Dense(cfg.encoder_ffn_embed_dim, dtype=self.dtype,
                                     name="fc1")(x))
        hidden = nn.Dropout(cfg.activation_dropout)(hidden, deterministic=deterministic)
        hidden = nn.Dense(cfg.encoder_embed_dim, dtype=self.dtype, name="fc2")(hidden)
        hidden = nn.Dropout(cfg.dropout)(hidden, deterministic=deterministic)
        return _layer_norm("final_layer_norm", self.dtype)(x * alpha + hidden)


class BEATs(nn.Module):
    """The BEATs encoder (see the module docstring for the pipeline and the parameter tree).

    __call__(waveform (B, N) float in [-1, 1], padding_mask (B, N) bool True=pad | None)
      -> BEATsOutput
    encode_fbank(fbank (B, F, 128) normalised, frame_padding_mask (B, F) True=pad | None)
      -> BEATsOutput

    dtype: the compute dtype (None: the inputs', float32; jnp.bfloat16 for half-precision
      training and inference on accelerators). Matmuls, convolutions and the hidden states
      take it; the parameters stay float32 (flax casts them at each use), and so do the
      log-mel front end, LayerNorm statistics, the attention logits and softmax, the position
      bias and the predictor's time mean and sigmoid.
    """

    config: BEATsConfig
    dtype: Any = None

    def setup(self):
        cfg = self.config
        self.front_end = BEATsFrontEnd(cfg, self.dtype)
        self.pos_conv = PositionalConv(cfg, self.dtype)
        self.encoder_layer_norm = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype)
        self.encoder_dropout = nn.Dropout(cfg.dropout)
        if cfg.relative_position_embedding:
            self.relative_position_bias = RelativePositionBias(cfg)
        self.layers = [BEATsEncoderLayer(cfg, self.dtype) for _ in range(cfg.encoder_layers)]
        if cfg.finetuned_model:
            self.predictor_dropout = nn.Dropout(cfg.predictor_dropout)
            self.predictor = nn.Dense(cfg.predictor_class, dtype=self.dtype)

    def __call__(self, waveform: jax.Array, padding_mask: jax.Array | None = None, *,
                 deterministic: bool = True) -> BEATsOutput:
        fbank, frame_padding = encoder_input(waveform, padding_mask,
                                          patch_size=self.config.input_patch_size)
        return self.encode_fbank(fbank, frame_padding, deterministic=deterministic)

    def encode_fbank(self, fbank: jax.Array, frame_padding_mask: jax.Array | None = None, *,
                     deterministic: bool = True) -> BEATsOutput:
        """Feature-level entry point: normalised fbank (B, F, 128) -> BEATsOutput."""
        cfg = self.config
        frame_padding_mask = check_fbank(fbank, frame_padding_mask, cfg.input_patch_size)
        x, token_padding = self.front_end(fbank, frame_padding_mask, deterministic=deterministic)
        x = jnp.where(token_padding[..., None], 0.0, x)
        x = self.encoder_layer_norm(x + self.pos_conv(x))
        x = self.encoder_dropout(x, deterministic=deterministic)
        position_bias = (self.relative_position_bias(x.shape[1])
                         if cfg.relative_position_embedding else None)
        hidden_states = [x]
        for layer in self.layers:
            x = layer(x, token_padding, position_bias, deterministic=deterministic)
            hidden_states.append(x)
        logits = probs = None
        if cfg.finetuned_model:
            token_logits = attention_lib.at_least_float32(
                self.predictor(self.predictor_dropout(x, deterministic=deterministic)))
            valid = (~token_padding)[..., None].astype(token_logits.dtype)
            logits = (token_logits * valid).sum(1) / jnp.maximum(valid.sum(1), 1.0)
            probs = jax.nn.sigmoid(logits)
        return BEATsOutput(last_hidden_state=x, hidden_states=tuple(hidden_states),
                           padding_mask=token_padding, logits=logits, probs=probs)


def init_params(config: BEATsConfig, key: jax.Array, n_frames: int = 16) -> dict[str, Any]:
    """Random parameters (for tests and fresh training); shapes do not depend on n_frames."""
    fbank = jnp.zeros((1, n_frames, fbank_lib.NUM_MEL_BINS), jnp.float32)
    return BEATs(config).init(key, fbank, method=BEATs.encode_fbank)["params"]


def load_beats(directory: str | os.PathLike) -> tuple[BEATs, dict[str, Any]]:
    """Loads a converted BEATs parameter directory -> (BEATs module, params).

    `directory` is an output of `convert_weights.py` (config.json with kind "beats" and the
    checkpoint's cfg, params/); apply as `module.apply({"params": params}, waveform (B, N),
    padding_mask (B, N) | None)`. Parameters come back as numpy arrays.

    Raises:
      FileNotFoundError: no such folder, no config.json or params/ in it, or a PyTorch .pt
        given instead (convert it first).
      ValueError: a parameter folder of another kind (e.g. a HAAQI-Net).
    """
    from haaqi_jax.train.checkpoint import load_params
    params, config = load_params(directory)
    if not isinstance(config, dict) or config.get("kind") != "beats" or "cfg" not in config:
        raise ValueError(f"{directory} is not a converted BEATs directory (config.json needs "
                         f"kind='beats' and a 'cfg'; got kind={config.get('kind')!r})")
    return BEATs(BEATsConfig.from_dict(config["cfg"])), params
