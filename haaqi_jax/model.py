"""HAAQI-Net = a (frozen) audio encoder + the HAAQI-Net head; loading, saving and prediction.

    net = HAAQINet.load("checkpoints/haaqinet")           # written by convert_haaqinet / training
    scores = net.predict([wav_a, wav_b], 44100, [[10, 15, 20, 30, 40, 45, 50, 55]] * 2)

Encoders are looked up by kind in a small registry, so another module can add one (as the
distilled student's module does on import) without editing this file:

    register_encoder("my_encoder", build=lambda cfg: MyEncoder(**cfg),
                     default_config=lambda: {"width": 256})
    net = HAAQINet.init_random(HAAQINetConfig(encoder_kind="my_encoder",
                                              encoder_config={"width": 512}))

An encoder is a linen module called as `encoder(waveform (B, N), padding_mask (B, N) bool
True = pad | None, *, deterministic)` that returns an object with `last_hidden_state (B, T, C)`
and `hidden_states` (a sequence of (B, T, C); index 0 = encoder input, i = layer i), like
`haaqi_jax.beats.BEATs`. A kind not registered yet is imported once as `haaqi_jax.<kind>`, so a
module named after its kind that registers itself on import is found by `HAAQINet.load`.

Padding: a padded batch gives each clip the score it gets alone. The sample padding mask
handed to the encoder is chosen so that the encoder's own (reference) reduction of it to tokens
marks exactly the tokens an unpadded run of that clip would have (`encoder_padding_mask`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import types
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from haaqi_jax import fbank as fbank_lib
from haaqi_jax.audiogram import STANDARD_FREQUENCIES, is_audiogram, standard_levels
# The sample rates `prepare_waveform` accepts (Hz), as `load_audio` does for files.
from haaqi_jax.data.audio import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE
from haaqi_jax.fbank import FRAME_LENGTH, FRAME_SHIFT, SAMPLE_RATE
from haaqi_jax.head import HAAQINetHead, HeadConfig, HeadOutput, check_valid_first

PATCH = 16             # BEATs patches are 16 frames x 16 mel bins
MEL_PATCHES = fbank_lib.NUM_MEL_BINS // PATCH           # 8 tokens per time patch
MIN_SAMPLES = FRAME_LENGTH + (PATCH - 1) * FRAME_SHIFT  # 2800 samples = one time patch
CHECKPOINT_KIND = "haaqinet"
CHECKPOINT_VERSION = 1

# ----------------------------------------------------------------------------- encoders


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """How to build one kind of encoder from its JSON-able config dict."""

    build: Callable[[Mapping[str, Any]], nn.Module]
    default_config: Callable[[], dict[str, Any]]


_ENCODERS: dict[str, EncoderSpec] = {}


def register_encoder(kind: str, build: Callable[[Mapping[str, Any]], nn.Module],
                     default_config: Callable[[], dict[str, Any]], *,
                     overwrite: bool = False) -> None:
    """Makes `HAAQINetConfig(encoder_kind=kind)` buildable (see the module docstring).

    `default_config()` lists every key the kind's config may have: a HAAQINetConfig's
    `encoder_config` is merged onto it and may name no other key. The same `build` registered
    again (a config file loaded twice) replaces itself; another one under a taken kind needs
    overwrite."""
    from haaqi_jax.config import definition_site
    old = _ENCODERS.get(kind)
    if (old is not None and not overwrite
            and definition_site(old.build) != definition_site(build)):
        raise ValueError(f"encoder kind {kind!r} is already registered (pass overwrite=True)")
    _ENCODERS[kind] = EncoderSpec(build, default_config)


#: Encoder kinds of the library; each module registers itself when first imported.
BUILTIN_ENCODERS = ("beats", "fbank_patches", "student")


def resolve_encoder_config(kind: str, overrides: Mapping[str, Any] | Any | None
                           ) -> dict[str, Any]:
    """The full config of encoder `kind`: its default config with `overrides` on top.

    A partial dict therefore changes only what it names (`{"encoder_layers": 2}` is the
    released BEATs with two layers, not the reference class's non-released defaults), and a
    nested dict (the student's `beats`) is merged one level down the same way. A key the
    default config does not have is refused, with the nearest known key: a misspelt key would
    otherwise build another model without a word.

    Args:
      kind: a registered encoder kind.
      overrides: None (the default config), a dict, or a config object with `to_dict()`.
    Returns:
      a plain dict with every key of the kind's default config.
    Raises:
      ValueError: naming the unknown keys, or a value whose type is not the default's (a bool
        for a bool, an int for an int, a number for a float, a string, a list); a float
        setting given an int becomes that float.
    """
    from haaqi_jax.config import unknown_keys_message
    merged = _thaw_json(_config_dict(encoder_spec(kind).default_config()))
    if overrides is None:
        return merged
    overrides = _thaw_json(_config_dict(overrides))
    for key, value in overrides.items():
        if key not in merged:
            continue
        if isinstance(merged[key], dict) and isinstance(value, Mapping):
            unknown = set(value) - set(merged[key])
            if unknown:
                raise ValueError(f"encoder_config.{key}: " + unknown_keys_message(
                    unknown, merged[key], f"encoder kind {kind!r}"))
            value = {**merged[key], **{k: _typed_like(merged[key][k], v, f"{key}.{k}", kind)
                                       for k, v in value.items()}}
        merged[key] = _typed_like(merged[key], value, key, kind)
    unknown = set(overrides) - set(merged)
    if unknown:
        raise ValueError("encoder_config: " + unknown_keys_message(
            unknown, merged, f"encoder kind {kind!r}"))
    return merged


def _typed_like(default: Any, value: Any, key: str, kind: str) -> Any:
    """`value` for an encoder config key whose default is `default`, checked to be of its
    type (an int for a float setting becomes a float); None or dict defaults take any value.

    Raises:
      ValueError naming `encoder_config.KEY`, the kind, the default and the value.
    """
    from haaqi_jax.config import is_number, is_whole
    if default is None or isinstance(default, dict):
        return value
    if isinstance(default, bool):
        ok, wanted = isinstance(value, bool), "a bool"
    elif isinstance(default, int):
        ok, wanted = is_whole(value), "an int"
    elif isinstance(default, float):
        ok, wanted = is_number(value), "a number"
        value = float(value) if ok else value
    elif isinstance(default, str):
        ok, wanted = isinstance(value, str), "a string"
    elif isinstance(default, (list, tuple)):
        ok, wanted = isinstance(value, (list, tuple)), "a list"
    else:
        return value
    if not ok:
        raise ValueError(f"encoder_config.{key}: expected {wanted} for encoder kind {kind!r} "
                         f"(default {default!r}), got {value!r}")
    return value


def encoder_spec(kind: str) -> EncoderSpec:
    """The registered spec of `kind`, importing `haaqi_jax.<kind>` once if it is unknown."""
    if kind not in _ENCODERS:
        try:
            importlib.import_module(f"haaqi_jax.{kind}")
        except ImportError:
            pass
    if kind not in _ENCODERS:
        for builtin in BUILTIN_ENCODERS:                 # so that the message lists them all
            importlib.import_module(f"haaqi_jax.{builtin}")
        raise ValueError(f"unknown encoder kind {kind!r}; registered: {sorted(_ENCODERS)} "
                         "(import the module that calls register_encoder for it; on the "
                         "command line: haaqi-jax --import MODULE ...)")
    return _ENCODERS[kind]


def _config_dict(cfg) -> dict[str, Any]:
    return dict(cfg.to_dict()) if hasattr(cfg, "to_dict") else dict(cfg)


def _build_beats(cfg: Mapping[str, Any]) -> nn.Module:
    from haaqi_jax.beats import BEATs, BEATsConfig
    return BEATs(BEATsConfig.from_dict(dict(cfg)))


def _released_beats_config() -> dict[str, Any]:
    from haaqi_jax.beats import RELEASED_CONFIG
    return _config_dict(RELEASED_CONFIG)


register_encoder("beats", _build_beats, _released_beats_config)

# ----------------------------------------------------------------------------- config


def _freeze_json(value):
    """Deep, hashable, immutable copy of a JSON-like value."""
    if isinstance(value, Mapping):
        return types.MappingProxyType({k: _freeze_json(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze_json(v) for v in value)
    return value


def _thaw_json(value):
    if isinstance(value, Mapping):
        return {k: _thaw_json(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw_json(v) for v in value]
    return value


@dataclasses.dataclass(frozen=True)
class HAAQINetConfig:
    """Everything needed to rebuild a HAAQI-Net.

    Attributes:
      encoder_kind: a registered encoder kind ("beats"; others via `register_encoder`).
      encoder_config: that encoder's config, as changes to the kind's default (for "beats"
        the released BEATs_iter3+ AS2M configuration): None keeps the default, a partial dict
        changes the keys it names, an unknown key is refused (`resolve_encoder_config`). The
        stored value is the full config.
      feature_mode: "last" (the encoder's last hidden state, the 2024 paper) or "weighted"
        (learned weighted sum of `feature_layers`, the later version).
      feature_layers: hidden-state indices summed in "weighted" mode (0 = encoder input,
        i = layer i); default layers 1..12 as in the paper.
      head: the head's sizes; its num_weighted_layers is derived from the two fields above.
      freeze_encoder: the encoder runs in eval mode and training leaves its weights as they
        are (as released; the train step's labels freeze them, so gradients with
        respect to the input still flow through `HAAQINet.apply`).
    """

    encoder_kind: str = "beats"
    encoder_config: Mapping[str, Any] | None = None
    feature_mode: str = "last"
    feature_layers: tuple[int, ...] = tuple(range(1, 13))
    head: HeadConfig = HeadConfig()
    freeze_encoder: bool = True

    def __post_init__(self):
        if self.feature_mode not in ("last", "weighted"):
            raise ValueError(f"HAAQINetConfig: feature_mode must be 'last' or 'weighted', got "
                             f"{self.feature_mode!r}")
        layers = tuple(int(i) for i in self.feature_layers)
        if self.feature_mode == "weighted" and (not layers or min(layers) < 0):
            raise ValueError(f"HAAQINetConfig: feature_layers must be non-empty hidden-state "
                             f"indices >= 0, got {layers}")
        enc = resolve_encoder_config(self.encoder_kind, self.encoder_config)
        head = self.head if isinstance(self.head, HeadConfig) else HeadConfig.from_dict(self.head)
        head = dataclasses.replace(
            head, num_weighted_layers=len(layers) if self.feature_mode == "weighted" else 0)
        object.__setattr__(self, "feature_layers", layers)
        object.__setattr__(self, "encoder_config", _freeze_json(_thaw_json(enc)))
        object.__setattr__(self, "head", head)

    def __hash__(self):
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def __eq__(self, other):
        return isinstance(other, HAAQINetConfig) and self.to_dict() == other.to_dict()

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict; `from_dict(to_dict())` round-trips."""
        return {"encoder_kind": self.encoder_kind,
                "encoder_config": _thaw_json(self.encoder_config),
                "feature_mode": self.feature_mode, "feature_layers": list(self.feature_layers),
                "head": self.head.to_dict(), "freeze_encoder": self.freeze_encoder}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "HAAQINetConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"HAAQINetConfig: unknown keys {sorted(unknown)}")
        d = dict(d)
        if "head" in d:
            d["head"] = HeadConfig.from_dict(dict(d["head"]))
        if "feature_layers" in d:
            d["feature_layers"] = tuple(d["feature_layers"])
        return cls(**d)

# ----------------------------------------------------------------------------- compute dtype

#: Names `compute_dtype` accepts (the run config's `model.dtype`). float16 is left out: without
#: loss scaling its gradients underflow, and its 65,504 ceiling is within reach of raw logits.
COMPUTE_DTYPES = ("float32", "bfloat16")


def compute_dtype(name: str | None, where: str = "model.dtype") -> Any:
    """The module `dtype` attribute for a compute-dtype name: None for "float32" (or None;
    every computation exactly as it has always been), jnp.bfloat16 for "bfloat16".

    The compute dtype is a run setting, not architecture: parameters stay float32 whatever it
    is, and a saved model (config.json) does not record it.

    Raises:
      ValueError naming `where` and the accepted names.
    """
    if name is None or name == "float32":
        return None
    if name == "bfloat16":
        return jnp.bfloat16
    why = (" (float16 would need loss scaling in training; use bfloat16)"
           if name == "float16" else "")
    raise ValueError(f"{where} must be one of {', '.join(map(repr, COMPUTE_DTYPES))}, got "
                     f"{name!r}{why}")

# ----------------------------------------------------------------------------- masks


def tokens_for_samples(num_samples):
    """Tokens an unpadded 16 kHz clip of `num_samples` gives (8 per whole 16-frame patch).

    Works on ints and on integer arrays (numpy or jax); too-short clips give 0.
    """
    frames = 1 + (num_samples - FRAME_LENGTH) // FRAME_SHIFT
    frames = frames * (num_samples >= FRAME_LENGTH)
    return (frames // PATCH) * MEL_PATCHES


def encoder_padding_mask(num_samples: jax.Array, padded_length: int) -> jax.Array:
    """Sample padding mask (B, N) True = pad for clips with `num_samples` (B,) valid samples.

    The BEATs reference reduces a sample mask to fbank frames (chunks of N // F samples, a frame
    is padding when its whole chunk is) and then to tokens (chunks of F // T frames, as if the
    flattened token index were time). Marking padding from sample c_f * c_t * K on makes that
    reduction flag exactly the tokens >= K, where K = `tokens_for_samples(num_samples)` is what
    the clip alone gives; the frames those K tokens read never reach past the clip's own
    samples. (Padding right after the clip's last sample would flag about K + 1 tokens.)

    Raises ValueError when `padded_length` is shorter than one patch (MIN_SAMPLES).
    """
    frames = 1 + (padded_length - FRAME_LENGTH) // FRAME_SHIFT
    tokens = tokens_for_samples(padded_length)
    if tokens == 0:
        raise ValueError(f"a padded length of {padded_length} samples is shorter than one "
                         f"BEATs patch ({MIN_SAMPLES} samples)")
    samples_per_token = (padded_length // frames) * (frames // tokens)
    first_pad = samples_per_token * tokens_for_samples(num_samples)
    return jnp.arange(padded_length)[None, :] >= first_pad[:, None]

# ----------------------------------------------------------------------------- module


class HAAQINetModel(nn.Module):
    """Encoder + head; parameters {"encoder": ..., "head": ...}.

    dtype: the compute dtype (`compute_dtype`; None = float32, the default), handed to the
    head and to an encoder module that has a `dtype` attribute (BEATs, the student); an
    encoder without one (fbank_patches: no matmuls) computes as it always does.
    """

    config: HAAQINetConfig
    dtype: Any = None

    def setup(self):
        cfg = self.config
        encoder = encoder_spec(cfg.encoder_kind).build(_thaw_json(cfg.encoder_config))
        if self.dtype is not None and "dtype" in {f.name for f in dataclasses.fields(encoder)}:
            encoder = encoder.clone(dtype=self.dtype)
        self.encoder = encoder
        self.head = HAAQINetHead(cfg.head, self.dtype)

    def encode(self, waveform: jax.Array, padding_mask: jax.Array | None = None, *,
               deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
        """The head's input.

        Args:
          waveform: (B, N) float, 16 kHz mono in [-1, 1].
          padding_mask: (B, N) bool, True = padded sample (padding after the clip), or None.
        Returns:
          features (B, T, C) in "last" mode or (B, L, T, C) in "weighted" mode, and
          token_mask (B, T) bool, True = valid token.
        """
        cfg = self.config
        _checked_padding_mask(waveform, padding_mask, "HAAQINetModel.encode")  # static shapes
        batch, length = waveform.shape
        if padding_mask is None:
            valid = jnp.full((batch,), length, jnp.int32)
        else:
            valid = (~padding_mask.astype(bool)).sum(axis=-1).astype(jnp.int32)
        # Always the mask, None too: its samples past the last whole patch are what padding
        # gives, so an encoder that summarises the clip (fbank_patches' statistics) sees the
        # same frames whether the clip comes alone, padded, or without a mask.
        enc_mask = encoder_padding_mask(valid, length)
        out = self.encoder(waveform, enc_mask,
                           deterministic=True if cfg.freeze_encoder else deterministic)
        if cfg.feature_mode == "last":
            features = out.last_hidden_state
        else:
            hidden = out.hidden_states
            if max(cfg.feature_layers) >= len(hidden):
                raise ValueError(f"HAAQINetConfig.feature_layers {cfg.feature_layers} asks for "
                                 f"hidden state {max(cfg.feature_layers)} but the encoder "
                                 f"returns {len(hidden)}")
            shapes = {i: tuple(hidden[i].shape) for i in cfg.feature_layers}
            if len(set(shapes.values())) > 1:
                raise ValueError(f"feature_mode 'weighted' sums hidden states of one shape; "
                                 f"encoder {cfg.encoder_kind!r} gives {shapes} (hidden state: "
                                 f"shape) for feature_layers {cfg.feature_layers}")
            features = jnp.stack([hidden[i] for i in cfg.feature_layers], axis=1)
        if features.shape[-2] != tokens_for_samples(length):
            raise ValueError(f"encoder {cfg.encoder_kind!r} gave {features.shape[-2]} tokens for "
                             f"{length} samples; HAAQI-Net expects BEATs' 16x16-patch layout "
                             f"({tokens_for_samples(length)} tokens)")
        # freeze_encoder does not stop gradients here: training freezes the encoder through
        # its parameters (`steps.stop_frozen`), and gradients with respect to the input (e.g.
        # saliency maps through `HAAQINet.apply`) still flow.
        token_mask = (jnp.arange(features.shape[-2])[None, :]
                      < tokens_for_samples(valid)[:, None])
        return features, token_mask

    def score_features(self, features: jax.Array, token_mask: jax.Array, audiogram: jax.Array,
                       *, deterministic: bool = True) -> HeadOutput:
        """The head alone, e.g. on cached `encode` outputs: features (B, T, C) (or (B, L, T,
        C) in "weighted" mode), token_mask (B, T) True = valid token, valid tokens first,
        audiogram (B, 8) dB HL -> HeadOutput(frame_scores (B, T), clip_score (B,))."""
        return self.head(features, token_mask, audiogram, deterministic=deterministic)

    def __call__(self, waveform: jax.Array, padding_mask: jax.Array | None,
                 audiogram: jax.Array, *, deterministic: bool = True) -> HeadOutput:
        """waveform (B, N), padding_mask (B, N) True = pad | None, audiogram (B, 8) dB HL
        -> HeadOutput(frame_scores (B, T), clip_score (B,))."""
        features, token_mask = self.encode(waveform, padding_mask, deterministic=deterministic)
        return self.score_features(features, token_mask, audiogram,
                                   deterministic=deterministic)

# ----------------------------------------------------------------------------- inputs


def resample_to_16k(waveform: np.ndarray, sample_rate: int) -> np.ndarray:
    """Resamples a 1-D waveform to 16 kHz float32 exactly as `haaqi_jax.data.audio.load_audio`
    does, so that scoring a file and scoring its samples give the same number."""
    from haaqi_jax.data.audio import resample
    return resample(waveform, int(sample_rate), SAMPLE_RATE)


def prepare_waveform(waveform, sample_rate: int, *, where: str = "waveform") -> np.ndarray:
    """Validates one mono clip and resamples it to 16 kHz float32.

    Raises:
      ValueError naming `where` for: a bad sample rate, not 1-D, not float, non-finite
      samples, a peak far outside [-1, 1] (above `fbank.MAX_PEAK`: integer PCM read as
      float), silence, or fewer samples than one BEATs patch (0.175 s) after resampling
      (checks of `haaqi_jax.data.audio.check_waveform`).
    """
    from haaqi_jax.data.audio import check_waveform
    if isinstance(sample_rate, (float, np.floating)) and float(sample_rate).is_integer():
        sample_rate = int(sample_rate)                       # 24000.0 is a rate in Hz too
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) \
            or sample_rate <= 0:
        raise ValueError(f"{where}: sample rate must be a positive whole number of Hz, got "
                         f"{sample_rate!r}")
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise ValueError(f"{where}: sample rate {sample_rate} Hz is not an audio rate (accepted: "
                         f"{MIN_SAMPLE_RATE} Hz to {MAX_SAMPLE_RATE // 1000} kHz)")
    x = check_waveform(waveform, name=where, min_samples=1)
    return check_waveform(resample_to_16k(x, sample_rate), name=where, min_samples=MIN_SAMPLES)


def plan_batches(lengths: Sequence[int], batch_size: int) -> list[tuple[list[int], int, int]]:
    """Groups clips of similar length: [(clip indices, padded samples, batch rows)].

    Clips are grouped by `haaqi_jax.data.buckets.bucket_length` (a geometric ladder of
    lengths); each batch holds at most `batch_size` clips and is padded to one row count for the
    whole call (`batch_size`, or the next power of two of a smaller clip count) by repeating a
    clip, so one shape per bucket is compiled.
    """
    from haaqi_jax.data.buckets import bucket_length
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    buckets: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        buckets.setdefault(bucket_length(int(n)), []).append(i)
    rows = min(batch_size, 1 << (len(lengths) - 1).bit_length())
    return [(buckets[width][start:start + batch_size], width, rows)
            for width in sorted(buckets) for start in range(0, len(buckets[width]), batch_size)]


def _tree_shapes(tree) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): tuple(np.shape(leaf)) for path, leaf in flat}


def check_param_tree(params, expected, what: str) -> None:
    """Raises ValueError naming the first missing/unexpected/mis-shaped parameter."""
    got, want = _tree_shapes(params), _tree_shapes(expected)
    for key in sorted(want):
        if key not in got:
            raise ValueError(f"{what}: missing parameter {key} (shape {want[key]})")
    for key in sorted(got):
        if key not in want:
            raise ValueError(f"{what}: unexpected parameter {key}")
        if got[key] != want[key]:
            raise ValueError(f"{what}: parameter {key} has shape {got[key]}, expected "
                             f"{want[key]}")


def _check_concrete_batch(waveform, padding_mask, where: str) -> None:
    """Value checks of a (B, N) batch and its mask, skipped for tracers (jit, vmap, grad).

    Every row must hold finite samples within `fbank.MAX_PEAK`, its valid samples first (the
    model keeps only each row's count of valid samples) and enough of them for one BEATs token.
    Raises ValueError naming `where` and the rows.
    """
    from haaqi_jax import beats as beats_lib
    if any(isinstance(x, jax.core.Tracer) for x in (waveform, padding_mask)):
        return
    if padding_mask is not None:
        check_valid_first(~np.asarray(padding_mask, bool), f"{where}: padding_mask", "samples")
    try:
        beats_lib.check_waveform_batch(waveform, padding_mask)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _check_audiogram_levels(audiogram, batch: int, where: str) -> None:
    """A (B, 8) array of dB HL levels; values (finite, in range) checked unless traced."""
    from haaqi_jax.audiogram import validate_levels
    if tuple(audiogram.shape) != (batch, len(STANDARD_FREQUENCIES)):
        raise ValueError(f"{where}: audiogram must be (B, 8) = "
                         f"{(batch, len(STANDARD_FREQUENCIES))}, got shape {audiogram.shape}")
    if not isinstance(audiogram, jax.core.Tracer):
        for row, levels in enumerate(np.asarray(audiogram)):
            validate_levels(levels, where=f"{where}: audiogram row {row}")


def _checked_padding_mask(waveform, padding_mask, where: str):
    """Checks a (B, N) waveform and its (B, N) padding mask (or None); returns the mask as bool
    (numpy for numpy input, else a JAX array)."""
    if waveform.ndim != 2:
        raise ValueError(f"{where}: waveform must be (B, N) 16 kHz samples, got shape "
                         f"{waveform.shape} (one clip: x[None])")
    if padding_mask is None:
        return None
    xp = np if isinstance(padding_mask, np.ndarray) or not hasattr(padding_mask, "shape") \
        else jnp
    padding_mask = xp.asarray(padding_mask).astype(bool)
    if padding_mask.shape != waveform.shape:
        raise ValueError(f"{where}: padding_mask must have the waveform's shape "
                         f"{waveform.shape} (True = padded sample), got {padding_mask.shape}")
    return padding_mask


@dataclasses.dataclass(frozen=True, eq=False)
class HAAQINet:
    """A HAAQI-Net ready to use: config + linen module + parameters (+ a jitted forward).

    dtype: the compute dtype of `apply`, `encode` and `predict`, "float32" (default) or
    "bfloat16" (`compute_dtype`): a run setting, not saved with the model, so a loaded model
    computes in float32 unless asked (`HAAQINet.load(path, dtype="bfloat16")`).
    """

    config: HAAQINetConfig
    params: Any
    module: HAAQINetModel = dataclasses.field(init=False, repr=False)
    _forward: Callable[..., HeadOutput] = dataclasses.field(init=False, repr=False)
    _encode: Callable[..., tuple[jax.Array, jax.Array]] = dataclasses.field(init=False,
                                                                             repr=False)
    dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "module", HAAQINetModel(
            self.config, compute_dtype(self.dtype, "HAAQINet dtype")))
        module = self.module
        object.__setattr__(self, "_forward", jax.jit(
            lambda params, wav, mask, hl: module.apply({"params": params}, wav, mask, hl)))
        object.__setattr__(self, "_encode", jax.jit(
            lambda params, wav, mask: module.apply({"params": params}, wav, mask,
                                                   method="encode")))

    # -- construction ------------------------------------------------------------------

    @staticmethod
    def _init_params(config: HAAQINetConfig, seed: int):
        module = HAAQINetModel(config)
        wav = jnp.zeros((1, MIN_SAMPLES), jnp.float32)
        return jax.jit(module.init)(jax.random.key(seed), wav, None,
                                    jnp.zeros((1, len(STANDARD_FREQUENCIES))))["params"]

    @staticmethod
    def param_shapes(config: HAAQINetConfig):
        """The parameter tree's ShapeDtypeStructs (no computation)."""
        module = HAAQINetModel(config)
        wav = jax.ShapeDtypeStruct((1, MIN_SAMPLES), jnp.float32)
        hl = jax.ShapeDtypeStruct((1, len(STANDARD_FREQUENCIES)), jnp.float32)
        return jax.eval_shape(lambda w, h: module.init(jax.random.key(0), w, None, h),
                              wav, hl)["params"]

    @classmethod
    def init_random(cls, config: HAAQINetConfig | None = None, seed: int = 0, *,
                    encoder_params=None) -> "HAAQINet":
        """Random weights (demos, tests, training from scratch); `encoder_params` (e.g. from a
        converted BEATs checkpoint) replaces the random encoder after a strict shape check."""
        config = HAAQINetConfig() if config is None else config
        params = dict(cls._init_params(config, seed))
        if encoder_params is not None:
            check_param_tree(encoder_params, params["encoder"], "encoder_params")
            params["encoder"] = jax.tree_util.tree_map(jnp.asarray, encoder_params)
        return cls(config, params)

    @classmethod
    def from_params(cls, config: HAAQINetConfig, params, *,
                    dtype: str = "float32") -> "HAAQINet":
        """Wraps a parameter tree after checking it against the config."""
        check_param_tree(params, cls.param_shapes(config), "HAAQI-Net parameters")
        return cls(config, params, dtype=dtype)

    @classmethod
    def load(cls, directory: str | os.PathLike, *, dtype: str = "float32") -> "HAAQINet":
        """Reads a directory written by `save` (or by `convert_haaqinet`); `dtype` is the
        compute dtype to run it in ("float32" or "bfloat16"; see the class docstring).

        Raises:
          FileNotFoundError: no such folder, no config.json or params/ in it, or a PyTorch
            .pt / .pth given instead (convert it first).
          ValueError: a folder of another kind (a converted BEATs, or a training workdir:
            the message names its report/best_model), or parameters that do not match the
            config.
        """
        from haaqi_jax.train.checkpoint import load_config, load_params
        meta = load_config(directory)
        best = Path(directory) / "report" / "best_model"
        if meta.get("kind") != CHECKPOINT_KIND and (best / "config.json").is_file():
            raise ValueError(f"{directory} is a training workdir; its model is {best}")
        if meta.get("kind") != CHECKPOINT_KIND:
            raise ValueError(f"{directory}: config.json has kind {meta.get('kind')!r}, expected "
                             f"{CHECKPOINT_KIND!r} (is this a HAAQI-Net checkpoint?)")
        config = HAAQINetConfig.from_dict(meta["config"])
        params, _ = load_params(directory)
        return cls.from_params(config, params, dtype=dtype)

    def save(self, directory: str | os.PathLike, *, overwrite: bool = False,
             extra: Mapping[str, Any] | None = None):
        """Writes params + config.json {"kind": "haaqinet", "version", "config", **extra}.

        Returns:
          the absolute path written (atomically: nothing is left on an error).
        Raises:
          FileExistsError: `directory` exists and `overwrite` is off, or it exists and is not
            a parameter folder (overwrite replaces only config.json and params/), or a file.
        """
        from haaqi_jax.train.checkpoint import save_params
        meta = {"kind": CHECKPOINT_KIND, "version": CHECKPOINT_VERSION,
                "config": self.config.to_dict(), **dict(extra or {})}
        return save_params(directory, self.params, meta, overwrite=overwrite)

    # -- use ---------------------------------------------------------------------------

    def apply(self, waveform, padding_mask, audiogram) -> HeadOutput:
        """Jitted eval forward on 16 kHz batches, traceable (jit, vmap, grad of the input).

        Args:
          waveform: (B, N) float, 16 kHz mono. padding_mask: (B, N) bool, True = padded
            sample, or None (every sample valid). audiogram: (B, 8) dB HL.
        Returns:
          HeadOutput(frame_scores (B, T), clip_score (B,)).

        Unlike `predict` it does not resample or bucket lengths. Shapes are always checked;
        concrete (untraced) inputs also have their values checked: finite samples within
        [-64, 64] (above: 16-bit values left unscaled), each row's valid samples first and
        enough of them for one BEATs token, audiogram levels finite and in [-20, 130] dB HL.
        Under jit / vmap / grad only the shapes can be checked.

        Raises:
          ValueError naming the problem and the rows.
        """
        where = "HAAQINet.apply"
        if not hasattr(waveform, "dtype"):
            waveform = np.asarray(waveform)
        padding_mask = _checked_padding_mask(waveform, padding_mask, where)   # bool
        if not fbank_lib.is_float_dtype(waveform.dtype):
            raise ValueError(f"{where}: waveform must be floating point in [-1, 1], got dtype "
                             f"{waveform.dtype} (for 16-bit PCM divide by 32768)")
        _check_audiogram_levels(audiogram if hasattr(audiogram, "shape")
                                else np.asarray(audiogram, np.float32), waveform.shape[0], where)
        _check_concrete_batch(waveform, padding_mask, where)
        waveform = jnp.asarray(waveform, jnp.float32)
        padding_mask = None if padding_mask is None else jnp.asarray(padding_mask, bool)
        return self._forward(self.params, waveform, padding_mask,
                             jnp.asarray(audiogram, jnp.float32))

    def encode(self, waveform, padding_mask=None) -> tuple[np.ndarray, np.ndarray]:
        """The head's input, eval mode, split over this host's devices (as `predict`).

        Args:
          waveform: (B, N) float, 16 kHz mono. padding_mask: (B, N) bool, True = padded
            sample (after the clip), or None (every sample valid).
        Returns:
          features (B, T, C) or (B, L, T, C) ("weighted" mode) and token_mask (B, T) bool,
          True = valid token, as numpy arrays.
        Raises:
          ValueError for a mask of another shape, padding before a row's valid samples, a row
          with fewer valid samples than one BEATs patch, or samples that are not finite or
          peak above 64; TypeError under jax.jit / vmap / grad (a host function: use
          `self.module.apply({"params": params}, waveform, padding_mask, method="encode")`
          there).
        """
        from haaqi_jax.tracing import refuse_traced
        refuse_traced("HAAQINet.encode", waveform, padding_mask,
                      traceable='HAAQINet.module.apply(..., method="encode")')
        waveform = np.asarray(waveform)
        padding_mask = _checked_padding_mask(waveform, padding_mask, "HAAQINet.encode")
        _check_concrete_batch(waveform, padding_mask, "HAAQINet.encode")
        waveform = waveform.astype(np.float32)
        mask = (np.zeros(waveform.shape, bool) if padding_mask is None
                else np.asarray(padding_mask, bool))
        valid = (~mask).sum(axis=1)
        short = np.flatnonzero(valid < MIN_SAMPLES)
        if short.size:
            raise ValueError(f"HAAQINet.encode: row {int(short[0])} has {int(valid[short[0]])} "
                             f"valid samples; at least {MIN_SAMPLES} (one 16x16 BEATs patch) "
                             f"are needed")
        return self._data_parallel(self._encode, waveform, mask)

    def _data_parallel(self, fn: Callable[..., Any], *batch: np.ndarray) -> Any:
        """fn(params, *batch) split over this host's devices (`sharding.local_data_parallel`);
        the parameters are copied to every device once per HAAQINet and kept."""
        from haaqi_jax.train import sharding
        placed = self.__dict__.get("_placed")
        if placed is None:
            mesh = sharding.make_mesh(jax.local_devices())
            placed = (mesh, sharding.replicate(self.params, mesh))
            object.__setattr__(self, "_placed", placed)
        mesh, params = placed
        return sharding.local_data_parallel(fn, params, batch, mesh)

    def head_apply(self, features, token_mask, audiogram, *, head_params=None,
                   deterministic: bool = True, rngs=None) -> HeadOutput:
        """The head alone on cached features (B, T, C) / (B, L, T, C) ("weighted" mode),
        token_mask (B, T) bool True = valid token (valid tokens first), audiogram (B, 8) dB HL
        -> HeadOutput(frame_scores (B, T), clip_score (B,)); `head_params` defaults to this
        model's. Unlike `apply` it checks no values (the head checks shapes and the mask)."""
        head_params = self.params["head"] if head_params is None else head_params
        return HAAQINetHead(self.config.head, self.module.dtype).apply(
            {"params": head_params}, features, token_mask, audiogram,
            deterministic=deterministic, rngs=rngs)

    def predict(self, waveforms, sample_rate, audiograms, batch_size: int = 8, *,
                lengths=None, progress: Any = True) -> np.ndarray:
        """Clip scores of mono clips of any lengths.

        The model hears each clip's digital level as it is (nothing normalises it), while the
        demo labels do not depend on it (level1 by the Cadenza rule): score audio scaled as the
        training data was (the demo's clips peak at 0.98 less 0-3 dB). Files, folders and
        manifests: `haaqi-jax predict`, or `haaqi_jax.predict.collect_jobs` + `score_jobs`.

        Args:
          waveforms: a list of 1-D float arrays (any lengths), one 1-D array, or a 2-D array
            (B, N) of B clips (every sample of a row is scored unless `lengths` is given).
          sample_rate: one rate for all, or one per clip (Hz); clips are resampled to 16 kHz.
          audiograms: (B, 8) raw levels in dB HL at 250..8000 Hz, or one (8,) or (1, 8) for
            all clips;
            or Audiogram objects (haaqi_jax's or pyclarity's; one, or one per clip), read at
            those frequencies (interpolated in log frequency where one lacks a frequency).
          batch_size: clips per forward pass; clips are grouped by length (few shapes). Each
            pass is split over this host's devices (data parallel).
          lengths: (B,) valid samples of each row of a zero-padded (B, N) array.
          progress: show a tqdm bar (True/False/None), or an open tqdm bar to advance.
        Returns:
          (B,) float32 predicted HAAQI in (0, 1), in input order; each clip scores as if alone.
        Raises:
          ValueError naming the clip ("item i") on bad audio, rates or audiograms.
          TypeError for file paths (see above), or under jax.jit / vmap / grad (a host
          function; `apply` is the traceable forward).
        """
        from tqdm.auto import tqdm

        from haaqi_jax.tracing import refuse_traced
        refuse_traced("HAAQINet.predict", waveforms, audiograms, traceable="HAAQINet.apply")
        if isinstance(waveforms, (str, os.PathLike)) or (
                isinstance(waveforms, (list, tuple)) and waveforms
                and all(isinstance(w, (str, os.PathLike)) for w in waveforms)):
            raise TypeError("predict: takes waveforms (arrays), not file paths; for files, "
                            "folders and manifests use `haaqi-jax predict` or "
                            "haaqi_jax.predict.collect_jobs + score_jobs")
        if hasattr(waveforms, "ndim"):                      # numpy or JAX array
            waveforms = np.asarray(waveforms)
            # No clip is 16 samples or shorter (a BEATs patch needs 0.175 s): such "clips"
            # are channels.
            if waveforms.ndim == 2 and waveforms.shape[1] <= 16 < waveforms.shape[0]:
                raise ValueError(
                    f"predict: waveforms of shape {waveforms.shape} look like one clip of "
                    f"(samples, channels); pass mono clips (e.g. x.mean(axis=1)) as a list or "
                    f"a (clips, samples) array")
        items = list(waveforms) if not isinstance(waveforms, np.ndarray) or waveforms.ndim > 1 \
            else [waveforms]
        n = len(items)
        if n == 0:
            raise ValueError("predict: no waveforms given")
        if lengths is not None:
            lengths = np.asarray(lengths)
            if not isinstance(waveforms, np.ndarray) or waveforms.ndim != 2:
                raise ValueError("predict: lengths is for a zero-padded (B, N) array")
            if lengths.shape != (n,) or lengths.dtype.kind not in "iu" \
                    or np.any(lengths < 1) or np.any(lengths > waveforms.shape[1]):
                raise ValueError(f"predict: lengths must be ({n},) integers in [1, "
                                 f"{waveforms.shape[1]}], got {lengths!r}")
            items = [item[:count] for item, count in zip(items, lengths)]
        progress = False if progress is None else progress
        rates = [sample_rate] * n if np.ndim(sample_rate) == 0 else list(sample_rate)
        if len(rates) != n:
            raise ValueError(f"predict: {len(rates)} sample rates for {n} waveforms")
        if is_audiogram(audiograms):
            audiograms = [audiograms] * n
        elif isinstance(audiograms, (list, tuple)) and any(map(is_audiogram, audiograms)):
            if len(audiograms) != n:
                raise ValueError(f"predict: {len(audiograms)} audiograms for {n} waveforms")
        else:
            audiograms = np.asarray(audiograms, dtype=np.float64)
            if audiograms.ndim == 1 or (audiograms.ndim == 2 and len(audiograms) == 1):
                audiograms = np.broadcast_to(audiograms, (n, audiograms.shape[-1]))  # one for all
            if audiograms.shape != (n, len(STANDARD_FREQUENCIES)):
                raise ValueError(f"predict: audiograms must be (B, 8) with B = {n} waveforms, "
                                 f"got shape {audiograms.shape}")
        levels = np.stack([standard_levels(audiograms[i], where=f"item {i} audiogram")
                           for i in range(n)])
        clips = [prepare_waveform(x, r, where=f"item {i}")
                 for i, (x, r) in enumerate(zip(items, rates))]
        loud = [i for i, clip in enumerate(clips) if np.max(np.abs(clip)) > fbank_lib.WARN_PEAK]
        if loud:
            warnings.warn(f"predict: items {loud[:8]}{' ...' if len(loud) > 8 else ''} peak "
                          f"above {fbank_lib.WARN_PEAK:g}; audio is expected in [-1, 1] (scored "
                          f"as given, i.e. louder than it is)", stacklevel=2)

        scores = np.zeros(n, np.float32)
        plan = plan_batches([len(c) for c in clips], batch_size)
        if isinstance(progress, bool):
            bar_context = tqdm(total=n, desc="HAAQI-Net", unit="clip", disable=not progress)
        else:  # a caller's bar (e.g. the CLI's, over all files)
            bar_context = contextlib.nullcontext(progress)
        with bar_context as bar:
            for idx, length, rows in plan:
                rows_idx = idx + [idx[-1]] * (rows - len(idx))  # fill rows with a real clip
                wav = np.zeros((rows, length), np.float32)
                valid = np.zeros(rows, np.int64)
                for r, i in enumerate(rows_idx):
                    wav[r, :len(clips[i])] = clips[i]
                    valid[r] = len(clips[i])
                mask = np.arange(length)[None, :] >= valid[:, None]
                out = self._data_parallel(self._forward, wav, mask,
                                          levels[rows_idx].astype(np.float32))
                scores[idx] = out.clip_score[:len(idx)]
                bar.update(len(idx))
        return scores
