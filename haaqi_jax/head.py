"""The HAAQI-Net head: encoder features + audiogram -> frame scores and a clip score.

Architecture as released by the authors of HAAQI-Net (Wisnu et al. 2024,
github.com/dyahayumgw/HAAQI-Net); this is an independent Flax implementation:

    [optional] learned weighted sum of L layer outputs, each through its own LayerNorm
    adapter      Dense C -> 256, no activation
    concat       the 8 raw audiogram values on every token -> 264 (optionally scaled)
    BLSTM        1 layer, 100 per direction -> 200
    dense        Dense 200 -> 256, ReLU, dropout 0.3
    attention    16-head self-attention at 256 (no residual, no LayerNorm)
    frame_score  Dense 256 -> 1, sigmoid -> frame scores (B, T); clip score = masked mean
                 (readout "haaqi_components", not in the release: Dense 256 -> 2, sigmoids ->
                 HAAQI's nonlinear and linear parts per frame; their masked means; frame and
                 clip scores = HAAQI's polynomial of the parts)

Unlike the released code (batch size 1, no masks) every step honours a token mask, so a
padded batch gives each item the score it gets alone. The attention's value and output
projections and the frame score are linear maps in a row, so they are folded into one value
per head, token and frame output (`SelfAttentionReadout`): the same scores and gradients,
less work.

Parameter layout (what `haaqi_jax.convert.haaqinet_torch` writes):

    layer_norm_{i}/{scale,bias}      (C,)            weighted mode only, i < L
    layer_weights                    (L,)            weighted mode only (softmax logits)
    adapter/{kernel (C,256), bias}
    blstm/{forward,backward}/input/{kernel (264,4H), bias (4H,)}   gates (i, f, g, o); the
    blstm/{forward,backward}/recurrent_kernel (H,4H)               bias is b_ih + b_hh
    dense/{kernel (2H,256), bias}
    attention/{query,key,value,out}/{kernel (256,256), bias}
    frame_score/{kernel (256,1), bias}               (256,2) with readout "haaqi_components"
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
from flax.linen.dtypes import promote_dtype
import jax
import jax.numpy as jnp
import numpy as np

from haaqi_jax import attention as attention_lib
from haaqi_jax.config import check_fraction, reject_unknown_keys


#: Frame readouts of the head and their outputs per frame.
READOUTS = ("score", "haaqi_components")


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """Sizes of the HAAQI-Net head (defaults = the released model).

    Attributes:
      num_weighted_layers: L > 0 turns on the learned weighted sum over L stacked layer outputs
        (the paper's later variant sums BEATs layers 1..12, L = 12); 0 takes plain features.
      adapter_dim: adapter output width (256).
      audiogram_dim: number of audiogram levels concatenated on every token (8).
      lstm_hidden: BLSTM units per direction (100).
      lstm_layers: stacked BLSTM layers (1 as released; the authors' trainer config also
        trains 6 x 200), each reading the previous layer's [forward, backward] outputs.
      lstm_dropout_rate: dropout between stacked BLSTM layers in training (nn.LSTM's
        `dropout`; not stored in a torch file, so a converted head gets 0).
      dense_dim: width after the BLSTM and of the attention (256).
      num_heads: attention heads (16).
      dropout_rate: dropout after the ReLU (0.3); the head's only other dropout is
        `lstm_dropout_rate` between stacked BLSTM layers (none in the attention).
      layer_norm_eps: epsilon of the per-layer LayerNorms (PyTorch's 1e-5).
      audiogram_scale: factor on the dB HL levels before they join the tokens. 1.0 is the
        released model (raw 0..120 dB into the BLSTM gates, which saturates them); a head
        trained from scratch learns faster with 0.01 (levels of order 1).
      readout: "score" (released): one sigmoid per frame, the HAAQI score. "haaqi_components":
        two sigmoids per frame, HAAQI's nonlinear and linear parts, which HAAQI's own polynomial
        turns into the score (`haaqi.backend.combined_from_parts`); trained with the
        `haaqi_components` loss on labels that carry both parts.
    """

    num_weighted_layers: int = 0
    adapter_dim: int = 256
    audiogram_dim: int = 8
    lstm_hidden: int = 100
    lstm_layers: int = 1
    lstm_dropout_rate: float = 0.0
    dense_dim: int = 256
    num_heads: int = 16
    dropout_rate: float = 0.3
    layer_norm_eps: float = 1e-5
    audiogram_scale: float = 1.0
    readout: str = "score"

    def __post_init__(self):
        if self.readout not in READOUTS:
            raise ValueError(f"HeadConfig: readout must be one of {READOUTS}, got "
                             f"{self.readout!r}")
        for name in ("adapter_dim", "lstm_hidden", "dense_dim", "num_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"HeadConfig: {name} must be a whole number >= 1, got "
                                 f"{value!r}")
        if self.dense_dim % self.num_heads:
            raise ValueError(f"HeadConfig: dense_dim {self.dense_dim} is not divisible by "
                             f"num_heads {self.num_heads}")
        if self.lstm_layers < 1:
            raise ValueError(f"HeadConfig: lstm_layers must be >= 1, got {self.lstm_layers}")
        if self.num_weighted_layers < 0:
            raise ValueError(f"HeadConfig: num_weighted_layers must be >= 0, got "
                             f"{self.num_weighted_layers}")
        for name in ("dropout_rate", "lstm_dropout_rate"):   # 1 drops everything
            check_fraction(getattr(self, name), f"HeadConfig: {name}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HeadConfig":
        reject_unknown_keys(d, cls)
        return cls(**d)


class HeadOutput(NamedTuple):
    """frame_scores: (B, T) in (0, 1), 0 on padded tokens; clip_score: (B,).

    With the "haaqi_components" readout also frame_components (B, T, 2) and clip_components
    (B, 2): HAAQI's (nonlinear, linear) parts per frame (0 on padded tokens) and their masked
    means; then frame_scores and clip_score are HAAQI's polynomial of those. Otherwise None.
    """

    frame_scores: jax.Array
    clip_score: jax.Array
    frame_components: jax.Array | None = None
    clip_components: jax.Array | None = None


def reverse_valid(x: jax.Array, lengths: jax.Array) -> jax.Array:
    """Reverses each item's first `lengths[b]` steps, leaving the padded tail in place.

    Args:
      x: (B, T, ...).
      lengths: (B,) int, valid steps per item.
    Returns:
      (B, T, ...); applying it twice gives x back.
    """
    steps = jnp.arange(x.shape[1])[None, :]
    idx = jnp.where(steps < lengths[:, None], lengths[:, None] - 1 - steps, steps)
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


class LSTMDirection(nn.Module):
    """The parameters of one LSTM direction, PyTorch's gate order (i, f, g, o).

    __call__(x (B, T, D)) -> (input gates (B, T, 4H) = x W_ih + b, recurrent kernel (H, 4H)):
    the input projection of every step is one matmul outside the recurrence.
    """

    hidden: int
    dtype: Any = None       # of the input projection (None: float32, the float32 parameters
                            # promoted with the inputs, so half-precision inputs too)

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        gates_in = nn.Dense(4 * self.hidden, dtype=self.dtype, name="input")(x)
        w_hh = self.param("recurrent_kernel", nn.initializers.orthogonal(),
                          (self.hidden, 4 * self.hidden), jnp.float32)
        return gates_in, w_hh


def lstm_recurrence(gates_in: jax.Array, w_hh: jax.Array, *, unroll: int = 4) -> jax.Array:
    """Runs D independent LSTMs side by side from a zero state, left to right.

    Args:
      gates_in: (D, B, T, 4H) input contributions to the gates (i, f, g, o).
      w_hh: (D, H, 4H) recurrent kernels.
      unroll: scan steps per loop iteration (fewer loop trips of the sequential recurrence).
    Returns:
      (D, B, T, H) hidden states.
    """
    hid = w_hh.shape[1]

    def step(carry, g_in):                                   # g_in (D, B, 4H)
        h, c = carry
        gates = g_in + jnp.einsum("dbh,dhk->dbk", h, w_hh)
        # One sigmoid over all 4H gates (the g slice is unused): one fused op per step.
        sig = jax.nn.sigmoid(gates)
        i, f, o = sig[..., :hid], sig[..., hid:2 * hid], sig[..., 3 * hid:]
        c = f * c + i * jnp.tanh(gates[..., 2 * hid:3 * hid])
        h = o * jnp.tanh(c)
        return (h, c), h

    zeros = jnp.zeros(gates_in.shape[:2] + (hid,), gates_in.dtype)
    _, hs = jax.lax.scan(step, (zeros, zeros), jnp.moveaxis(gates_in, 2, 0), unroll=unroll)
    return jnp.moveaxis(hs, 0, 2)


class BLSTM(nn.Module):
    """Bidirectional LSTM over prefix-valid sequences, `num_layers` stacked (nn.LSTM's
    bidirectional, multi-layer semantics: layer k reads layer k - 1's [forward, backward]
    outputs, with dropout between layers in training).

    The backward direction runs over each item's valid part reversed, so padding never
    reaches a valid step in either direction. Outputs on padded steps are meaningless. Both
    directions advance in one scan (half the sequential steps of one scan per direction).
    Parameters: forward / backward for the first layer (the released single-layer names),
    forward_k / backward_k for layer k >= 1.

    dtype: compute dtype of the input projections (None: float32, half-precision inputs
    included, as flax promotes them with the float32 parameters). The recurrence itself
    (gates, cell state, hidden state) runs in float32 whatever it is: it accumulates over
    hundreds of steps, and its per-step matmul is too small to gain from half precision.
    """

    hidden: int
    num_layers: int = 1
    dropout_rate: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, lengths: jax.Array, *,
                 deterministic: bool = True) -> jax.Array:
        """x: (B, T, D), lengths: (B,) -> (B, T, 2H) = [forward, backward] of the last layer."""
        for layer in range(self.num_layers):
            if layer:
                x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
            suffix = f"_{layer}" if layer else ""
            fwd_in, fwd_hh = LSTMDirection(self.hidden, self.dtype, name="forward" + suffix)(x)
            bwd_in, bwd_hh = LSTMDirection(self.hidden, self.dtype, name="backward" + suffix)(
                reverse_valid(x, lengths))
            gates_in = attention_lib.at_least_float32(jnp.stack([fwd_in, bwd_in]))
            hs = lstm_recurrence(gates_in, jnp.stack([fwd_hh, bwd_hh]))
            x = jnp.concatenate([hs[0], reverse_valid(hs[1], lengths)], axis=-1)
        return x


class DenseParams(nn.Module):
    """The kernel (in, out) and bias (out,) of a Dense layer, declared as nn.Dense declares them
    (names, initialisers, order: the same values at init) but returned instead of applied, for
    a linear map that is folded into another one.

    __call__(in_features) -> (kernel (in_features, features), bias (features,))
    """

    features: int

    @nn.compact
    def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array]:
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (in_features, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        return kernel, bias


class SelfAttentionReadout(nn.Module):
    """Multi-head self-attention with a key padding mask (torch.nn.MultiheadAttention maths),
    read out through one linear map: (attention output) @ w + b, HAAQI-Net's frame score(s).

    The readout, the attention's output projection and each head's value projection are
    linear maps in a row, so they fold into K values per head and token,
    s_h = x (W_v,h W_o,h w) + b_v,h W_o,h w, and the attention averages H x K numbers per
    query instead of H vectors of D / H, with no output projection. The same function of the
    same parameters (`attention/{query,key,value,out}` as nn.Dense lays them out), exact up to
    rounding; for a 10 s clip it saves ~1.3 of the head's ~11 ms on the project's CPU.

    __call__(x (B, T, D), token_mask (B, T) True = valid, w (D, K), b (K,)) -> (B, T, K)
    dtype: compute dtype of the projections and the attention's matmuls (None: float32,
      half-precision inputs included, as flax promotes them with the float32 parameters); the
      folding of the parameters, the softmax and the sum over heads (the output) stay float32.
    """

    num_heads: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, token_mask: jax.Array, w: jax.Array,
                 b: jax.Array) -> jax.Array:
        batch, length, dim = x.shape
        head_dim = dim // self.num_heads
        heads_first = lambda y: jnp.transpose(y, (0, 2, 1, 3))      # (B, heads, T, ...)

        def heads(name):                                     # -> (B, heads, T, head_dim)
            y = nn.Dense(dim, dtype=self.dtype, name=name)(x)
            return heads_first(y.reshape(batch, length, self.num_heads, head_dim))

        value_kernel, value_bias = DenseParams(dim, name="value")(dim)
        out_kernel, out_bias = DenseParams(dim, name="out")(dim)
        per_channel = (out_kernel @ w).reshape(self.num_heads, head_dim, -1)  # (H, Dh, K)
        values = (jnp.einsum("ihd,hdk->ihk", value_kernel.reshape(dim, self.num_heads, head_dim),
                             per_channel)                                    # (D, H, K)
                  .reshape(dim, -1))
        value_bias = jnp.einsum("hd,hdk->hk", value_bias.reshape(self.num_heads, head_dim),
                                per_channel).reshape(-1)
        x_values, values, value_bias = promote_dtype(x, values, value_bias, dtype=self.dtype)
        values = (x_values @ values + value_bias).reshape(batch, length, self.num_heads, -1)
        out = attention_lib.attend(heads("query") * head_dim ** -0.5, heads("key"),
                                   heads_first(values), token_mask)          # (B, H, T, K)
        return attention_lib.at_least_float32(out).sum(axis=1) + out_bias @ w + b


def check_valid_first(valid, where: str, what: str) -> None:
    """Raises ValueError naming the rows of a concrete (B, T) mask, True = valid, that have a
    valid entry after a padded one; tracers (jit, vmap, grad) pass unchecked.

    The BLSTM reads only each row's count of valid entries, the attention and the mean read the
    mask itself: with gaps the two disagree and the score is wrong without a word.
    """
    if isinstance(valid, jax.core.Tracer):
        return
    valid = np.asarray(valid, bool)
    reopened = np.flatnonzero((~valid[:, :-1] & valid[:, 1:]).any(axis=1))
    if reopened.size:
        raise ValueError(f"{where}: rows {reopened.tolist()} have valid {what} after padded "
                         f"ones; each row must hold its valid {what} first, padding after them")


class HAAQINetHead(nn.Module):
    """HAAQI-Net head. See the module docstring for the layers and parameter names.

    dtype: the compute dtype of the Dense layers, LayerNorms and attention matmuls (None: the
    features', float32; jnp.bfloat16 for half precision). Parameters stay float32, and so do
    the LayerNorm statistics, the layer-weight softmax, the LSTM recurrence, the attention
    softmax, the frame scores and the clip-score mean.
    """

    config: HeadConfig = HeadConfig()
    dtype: Any = None

    @nn.compact
    def __call__(self, features: jax.Array, token_mask: jax.Array, audiogram: jax.Array, *,
                 deterministic: bool = True) -> HeadOutput:
        """Scores a batch.

        Args:
          features: (B, T, C) one layer's features, or (B, L, T, C) stacked layer outputs when
            config.num_weighted_layers = L > 0.
          token_mask: (B, T) bool, True = valid token; valid tokens must come first (checked
            when the mask is concrete).
          audiogram: (B, config.audiogram_dim) (8 as released) raw hearing levels in dB HL
            (not normalised, as released; multiplied by config.audiogram_scale here).
          deterministic: False turns dropout on (needs a 'dropout' rng).
        Returns:
          HeadOutput(frame_scores (B, T), clip_score (B,)), float32 whatever `dtype`; with the
          "haaqi_components" readout also frame_components (B, T, 2), clip_components (B, 2).
        Raises:
          ValueError: features, token_mask or audiogram of another shape, or (concrete masks
            only) a row with a valid token after a padded one.
        """
        cfg = self.config
        if cfg.num_weighted_layers:
            if features.ndim != 4 or features.shape[1] != cfg.num_weighted_layers:
                raise ValueError(
                    f"HAAQINetHead: weighted mode expects stacked features (B, "
                    f"{cfg.num_weighted_layers}, T, C), got shape {features.shape}")
            layer_logits = self.param("layer_weights", nn.initializers.ones,
                                      (cfg.num_weighted_layers,), jnp.float32)
            layer_weights = jax.nn.softmax(layer_logits)
            x = sum(nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype,
                                 name=f"layer_norm_{i}")(
                features[:, i]) * layer_weights[i] for i in range(cfg.num_weighted_layers))
        else:
            if features.ndim != 3:
                raise ValueError(f"HAAQINetHead: expects features (B, T, C), got shape "
                                 f"{features.shape}")
            x = features
        batch, length, _ = x.shape
        if token_mask.shape != (batch, length):
            raise ValueError(f"HAAQINetHead: token_mask shape {token_mask.shape} does not match "
                             f"features (B, T) = {(batch, length)}")
        if audiogram.shape != (batch, cfg.audiogram_dim):
            raise ValueError(f"HAAQINetHead: audiogram shape {audiogram.shape}, expected "
                             f"{(batch, cfg.audiogram_dim)}")
        check_valid_first(token_mask, "HAAQINetHead: token_mask", "tokens")
        token_mask = token_mask.astype(bool)
        lengths = token_mask.sum(axis=-1).astype(jnp.int32)

        x = nn.Dense(cfg.adapter_dim, dtype=self.dtype, name="adapter")(x)
        hl = jnp.broadcast_to(cfg.audiogram_scale * audiogram[:, None, :].astype(x.dtype),
                              (batch, length, cfg.audiogram_dim))
        x = jnp.concatenate([x, hl], axis=-1)
        x = BLSTM(cfg.lstm_hidden, cfg.lstm_layers, cfg.lstm_dropout_rate, self.dtype,
                  name="blstm")(
            x, lengths, deterministic=deterministic)
        x = nn.relu(nn.Dense(cfg.dense_dim, dtype=self.dtype, name="dense")(x))
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        outputs = 2 if cfg.readout == "haaqi_components" else 1
        score_kernel, score_bias = DenseParams(outputs, name="frame_score")(cfg.dense_dim)
        frame = jax.nn.sigmoid(SelfAttentionReadout(cfg.num_heads, self.dtype, name="attention")(
            x, token_mask, score_kernel, score_bias))                       # (B, T, outputs)
        frame = jnp.where(token_mask[..., None], frame, 0.0)
        clip = frame.sum(axis=1) / jnp.maximum(lengths, 1).astype(frame.dtype)[:, None]
        if outputs == 1:
            return HeadOutput(frame_scores=frame[..., 0], clip_score=clip[:, 0])
        from haaqi_jax.haaqi.backend import combined_from_parts  # lazy: the metric needs scipy
        return HeadOutput(
            frame_scores=jnp.where(token_mask, combined_from_parts(frame[..., 0], frame[..., 1]),
                                   0.0),
            clip_score=combined_from_parts(clip[:, 0], clip[:, 1]),
            frame_components=frame, clip_components=clip)
