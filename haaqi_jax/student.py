"""distillBEATs: a 3-layer BEATs student built from a teacher, and its prediction heads.

The student of HAAQI-Net's distillation (Wisnu et al. 2024) is BEATs without the positional
convolution and with fewer layers, initialised from the teacher's first layers:

    waveform (B, N) --fbank--> (B, F, 128) --BEATsFrontEnd (patch embedding 16x16, LayerNorm,
    post_extract_proj 512 -> 768)--> (B, T, 768), padded tokens zeroed = hidden_states[0]
    --N BEATs encoder layers (deep norm, gated relative position bias)--> hidden_states[1..N]

It reuses `haaqi_jax.beats` (same modules, same parameter sub-trees) and, unlike the authors'
released student, attends over the token sequence (their code fed batch-first tensors to
time-first layers, so each token attended only to itself). `attention="self_only"` reproduces
that behaviour, only to run their released student checkpoint as it was trained
(`convert_weights.py --haaqinet haaqi_net_distillBEATs.pth`); nothing here trains that way by
default.

Choices (documented because they decide parameter counts and initial outputs):
- Deep norm uses the TEACHER's alpha, (2 * teacher_layers) ** 0.25: the copied layers then
  compute exactly what they computed inside the teacher (the authors' layers are likewise built
  with the teacher's encoder_layers).
- Relative position bias: same T5 buckets and gate as the teacher; by default every student
  layer owns its table (`relative_position_bias_{i}`), each initialised from the teacher's shared
  table. This is the authors' layout (their student layers are not tied) and gives the paper's
  21,802,812 front-end parameters; `shared_position_bias=True` keeps one table (21,795,132).

Parameter tree (`StudentEncoder(cfg).init(...)["params"]`):

    front_end/{patch_embedding, layer_norm, post_extract_proj}   as BEATs
    relative_position_bias_{i}/embedding (buckets, H)           (or relative_position_bias/)
    layers_{i}/...                                               as BEATs layers

Prediction heads (`PredictionHeads`) map the student output to K teacher layers (default 6, 9,
12): "independent" (K Dense C -> C on the student output) or "sequential" (head k reads head
k-1's output). BEATs: MIT License, Copyright (c) Microsoft Corporation.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from haaqi_jax import beats as beats_lib
from haaqi_jax import fbank as fbank_lib
from haaqi_jax.config import reject_unknown_keys

HEAD_KINDS = ("independent", "sequential")
ATTENTION_KINDS = ("sequence", "self_only")


@dataclasses.dataclass(frozen=True)
class StudentConfig:
    """The student's architecture.

    Attributes:
      beats: the TEACHER's BEATs config (sizes, buckets, gating, deep-norm alpha come from it).
      num_layers: transformer layers of the student (3).
      shared_position_bias: one relative-position table for all layers (True) or one per layer
        (False, the authors' layout and the paper's parameter count).
      attention: "sequence" (every token attends over the clip's tokens) or "self_only" (each
        token attends only to itself, i.e. the layers see sequences of one token: what the
        authors' released student computes, kept to run its checkpoint faithfully).
    """

    beats: beats_lib.BEATsConfig = beats_lib.BEATsConfig.from_dict(beats_lib.RELEASED_CONFIG)
    num_layers: int = 3
    shared_position_bias: bool = False
    attention: str = "sequence"

    def __post_init__(self):
        if isinstance(self.beats, Mapping):
            object.__setattr__(self, "beats", beats_lib.BEATsConfig.from_dict(self.beats))
        if not isinstance(self.beats, beats_lib.BEATsConfig):
            raise ValueError(f"StudentConfig.beats must be a BEATsConfig or dict, got "
                             f"{type(self.beats).__name__}")
        if not 1 <= int(self.num_layers):
            raise ValueError(f"StudentConfig.num_layers must be >= 1, got {self.num_layers}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"StudentConfig.attention must be one of {ATTENTION_KINDS}, got "
                             f"{self.attention!r}")
        if self.beats.finetuned_model:
            # The AudioSet predictor belongs to the teacher's last layer; a student has none.
            object.__setattr__(self, "beats",
                               dataclasses.replace(self.beats, finetuned_model=False))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict; `from_dict(to_dict())` round-trips."""
        return {"beats": self.beats.to_dict(), "num_layers": int(self.num_layers),
                "shared_position_bias": bool(self.shared_position_bias),
                "attention": str(self.attention)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StudentConfig":
        reject_unknown_keys(d, cls)
        d = dict(d)
        if "beats" in d:
            d["beats"] = beats_lib.BEATsConfig.from_dict(dict(d["beats"]))
        return cls(**d)


DEFAULT_STUDENT = StudentConfig()


class StudentEncoder(nn.Module):
    """distillBEATs encoder; called like `haaqi_jax.beats.BEATs`.

    __call__(waveform (B, N) float in [-1, 1], padding_mask (B, N) bool True=pad | None)
      -> BEATsOutput (hidden_states: num_layers + 1 entries)
    encode_fbank(fbank (B, F, 128) normalised, frame_padding_mask (B, F) True=pad | None)
      -> BEATsOutput
    dtype: the compute dtype, as `beats.BEATs.dtype` (None: the inputs', float32).
    """

    config: StudentConfig
    dtype: Any = None

    def setup(self):
        cfg, bcfg = self.config, self.config.beats
        self.front_end = beats_lib.BEATsFrontEnd(bcfg, self.dtype)
        if bcfg.relative_position_embedding:
            if self.config.shared_position_bias:
                self.relative_position_bias = beats_lib.RelativePositionBias(bcfg)
            else:
                # A list attribute: submodules named relative_position_bias_{i}.
                self.relative_position_bias = [beats_lib.RelativePositionBias(bcfg)
                                               for _ in range(cfg.num_layers)]
        # The teacher's config: deep-norm alpha of the teacher (see the module docstring).
        self.layers = [beats_lib.BEATsEncoderLayer(bcfg, self.dtype)
                       for _ in range(cfg.num_layers)]

    def __call__(self, waveform: jax.Array, padding_mask: jax.Array | None = None, *,
                 deterministic: bool = True) -> beats_lib.BEATsOutput:
        bcfg = self.config.beats
        fbank, frame_padding = beats_lib.encoder_input(waveform, padding_mask,
                                                    patch_size=bcfg.input_patch_size)
        return self.encode_fbank(fbank, frame_padding, deterministic=deterministic)

    def encode_fbank(self, fbank: jax.Array, frame_padding_mask: jax.Array | None = None, *,
                     deterministic: bool = True) -> beats_lib.BEATsOutput:
        """Feature-level entry point: normalised fbank (B, F, 128), frame_padding_mask (B, F)
        bool True = padded frame | None -> BEATsOutput (hidden_states[0]: the front end's
        output with padded tokens zeroed; no positional conv, no encoder LayerNorm)."""
        bcfg = self.config.beats
        frame_padding_mask = beats_lib.check_fbank(fbank, frame_padding_mask,
                                                   bcfg.input_patch_size)
        x, token_padding = self.front_end(fbank, frame_padding_mask, deterministic=deterministic)
        x = jnp.where(token_padding[..., None], 0.0, x)
        hidden_states = [x]
        self_only = self.config.attention == "self_only"
        # self_only: every token is a sequence of its own, (B, T, C) -> (B * T, 1, C) with
        # nothing masked (a padded token sees only itself, and the head masks it).
        layer_shape = (-1, 1, x.shape[-1]) if self_only else x.shape
        layer_mask = (jnp.zeros((x.shape[0] * x.shape[1], 1), bool) if self_only
                      else token_padding)
        n_tokens = layer_shape[1]                   # the length the position bias spans
        shared_bias = None
        if bcfg.relative_position_embedding and self.config.shared_position_bias:
            shared_bias = self.relative_position_bias(n_tokens)
        for i, layer in enumerate(self.layers):
            if not bcfg.relative_position_embedding:
                bias = None
            elif shared_bias is not None:
                bias = shared_bias
            else:
                bias = self.relative_position_bias[i](n_tokens)
            x = layer(x.reshape(layer_shape), layer_mask, bias,
                      deterministic=deterministic).reshape(x.shape)
            hidden_states.append(x)
        return beats_lib.BEATsOutput(last_hidden_state=x, hidden_states=tuple(hidden_states),
                                     padding_mask=token_padding)


def init_params(config: StudentConfig, key: jax.Array, n_frames: int = 16) -> dict[str, Any]:
    """Random student parameters (shapes do not depend on n_frames)."""
    fbank = jnp.zeros((1, n_frames, fbank_lib.NUM_MEL_BINS), jnp.float32)
    return StudentEncoder(config).init(key, fbank, method=StudentEncoder.encode_fbank)["params"]


def param_shapes(config: StudentConfig) -> Any:
    """The student's parameter ShapeDtypeStructs (jax.eval_shape: nothing is allocated)."""
    return jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0))


def count_params(tree: Any) -> int:
    """Scalars in a pytree of arrays or ShapeDtypeStructs."""
    return int(sum(np.prod(np.shape(x), dtype=np.int64) for x in jax.tree_util.tree_leaves(tree)))


def student_from_teacher(teacher_params: Mapping[str, Any],
                         teacher_cfg: beats_lib.BEATsConfig | Mapping[str, Any],
                         layers: Sequence[int] = (0, 1, 2), *,
                         shared_position_bias: bool = False
                         ) -> tuple[StudentEncoder, dict[str, Any]]:
    """A student whose weights are copies of the teacher's.

    Args:
      teacher_params: BEATs parameter tree (`haaqi_jax.beats.BEATs` layout).
      teacher_cfg: the teacher's BEATsConfig (or its dict).
      layers: 0-based teacher layers copied, in order, into student layers 0, 1, ...
      shared_position_bias: see StudentConfig.
    Returns:
      (StudentEncoder module, params): front end, layers and the relative-position table(s)
      are the teacher's arrays (the same array objects: no copy is made).
    Raises:
      ValueError naming a missing teacher parameter or a layer index out of range.
    """
    if not isinstance(teacher_cfg, beats_lib.BEATsConfig):
        teacher_cfg = beats_lib.BEATsConfig.from_dict(dict(teacher_cfg))
    try:    # operator.index: 1.7 is not a layer (int() would take layer 1)
        layers = tuple(operator.index(i) for i in layers)
    except TypeError:
        raise ValueError(f"student_from_teacher: layers must be whole numbers, got "
                         f"{tuple(layers)}") from None
    if not layers:
        raise ValueError("student_from_teacher: `layers` is empty")
    bad = [i for i in layers if not 0 <= i < teacher_cfg.encoder_layers]
    if bad:
        raise ValueError(f"student_from_teacher: teacher layers {bad} do not exist (the teacher "
                         f"has layers 0..{teacher_cfg.encoder_layers - 1})")
    for key in ["front_end"] + [f"layers_{i}" for i in layers] + (
            ["relative_position_bias"] if teacher_cfg.relative_position_embedding else []):
        if key not in teacher_params:
            raise ValueError(f"student_from_teacher: the teacher parameters have no {key!r} "
                             f"(top-level keys: {sorted(teacher_params)})")
    config = StudentConfig(beats=teacher_cfg, num_layers=len(layers),
                           shared_position_bias=shared_position_bias)
    params: dict[str, Any] = {"front_end": teacher_params["front_end"]}
    for j, i in enumerate(layers):
        params[f"layers_{j}"] = teacher_params[f"layers_{i}"]
    if teacher_cfg.relative_position_embedding:
        table = teacher_params["relative_position_bias"]
        if shared_position_bias:
            params["relative_position_bias"] = table
        else:
            for j in range(len(layers)):
                params[f"relative_position_bias_{j}"] = table
    return StudentEncoder(config), params


class PredictionHeads(nn.Module):
    """K linear heads predicting K teacher layers from the student output.

    kind "independent": y_k = Dense_k(x); "sequential": y_k = Dense_k(y_{k-1}), y_0 = x.
    __call__(x (B, T, C)) -> (B, K, T, C)
    dtype: compute dtype of the heads (None: float32, half-precision inputs included, as flax
      promotes them with the float32 parameters).
    """

    num_targets: int
    kind: str = "independent"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"PredictionHeads.kind must be one of {HEAD_KINDS}, got "
                             f"{self.kind!r}")
        outputs, h = [], x
        for k in range(self.num_targets):
            h = nn.Dense(x.shape[-1], dtype=self.dtype, name=f"head_{k}")(
                x if self.kind == "independent" else h)
            outputs.append(h)
        return jnp.stack(outputs, axis=1)


def _build_student(cfg: Mapping[str, Any]) -> nn.Module:
    return StudentEncoder(StudentConfig.from_dict(dict(cfg)))


def _register() -> None:
    from haaqi_jax.model import register_encoder
    register_encoder("student", _build_student, DEFAULT_STUDENT.to_dict, overwrite=True)


_register()
