"""Conversion of the authors' released HAAQI-Net PyTorch checkpoint to a haaqi_jax directory.

The released model (github dyahayumgw/HAAQI-Net, downloaded into `model/`; their test script
reads `model/haaqi_net_best.pth`) is `torch.save({'model': state_dict})`, or a bare state dict,
with (an `nn.DataParallel` "module." prefix is removed)

    beats_model.*                        the BEATs encoder (its own key layout, prefixed)
    blstm.{weight_ih,weight_hh,bias_ih,bias_hh}_l{k}[_reverse]   nn.LSTM, gates (i, f, g, o),
                                         layers k = 0.. (one as released)
    linear0.{weight,bias}                adapter C -> 256
    linear1.{weight,bias}                dense 200 -> 256
    haaqiAtt_layer.{in_proj_weight (768,256), in_proj_bias, out_proj.weight, out_proj.bias}
    haaqiframe_score.{weight,bias}       256 -> 1
    weights, layer_norm.{i}.{weight,bias}   weighted-sum variant only

Roles are checked by shape, not only by name; any missing or unexpected key or wrong shape is
an error naming the key, and nothing is written. The BEATs configuration is not in the file: it
is an argument (default: the released BEATs_iter3+ AS2M configuration; `read_beats_config`
takes it from another BEATs checkpoint).

The authors' distilled model (`HAAQINetStudent`, their model/haaqi_net_distillBEATs.pth) is
self-contained and converts alone (`student_haaqinet_from_state_dict`):

    patch_embedding.weight, beats_layer_norm.*, linear2.*   the student's front end (BEATs'
                                         patch_embedding, layer_norm, post_extract_proj)
    encoder{i}.*  (i = 0, 1, 2)          BEATs encoder layers, each with its own position table
    encoder5/8/11.{weight,bias}          distillation prediction heads (not converted: scoring
                                         does not use them)
    weights, layer_norm.{i}.*, head keys as above (the head sums the student's layers)

Their code runs those layers on batch-first tensors where the layers expect time first, so each
token attends only to itself; the converted student reproduces that (`StudentConfig(attention=
"self_only")`) so that it scores as their checkpoint does. Its BEATs sizes are the released
teacher's unless `beats_config` says otherwise (their student takes the teacher's config).

A head-only file, `{'model': head state_dict, 'optimizer': ..., 'epoch': ...}` as the authors'
trainer saves `best_loss.pth` (their example script loads BEATs from its own .pt beside it),
converts together with that BEATs checkpoint: `convert_haaqinet(..., beats_checkpoint=PATH)`
(an official BEATs .pt, or a folder written by `convert_beats_checkpoint`), which supplies both
the encoder's weights and its configuration.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from haaqi_jax.head import HeadConfig

BEATS_PREFIX = "beats_model."


def _np(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def head_config_from_state_dict(state_dict: Mapping[str, Any], *, num_heads: int = 16
                                ) -> HeadConfig:
    """Reads the head sizes off the tensor shapes (num_heads is not stored in the file)."""
    for key in ("linear0.weight", "linear1.weight", "blstm.weight_hh_l0", "blstm.weight_ih_l0"):
        if key not in state_dict:
            raise ValueError(f"HAAQI-Net state dict: missing key {key!r}")
    adapter_dim = _np(state_dict["linear0.weight"]).shape[0]
    lstm_hidden = _np(state_dict["blstm.weight_hh_l0"]).shape[1]
    lstm_in = _np(state_dict["blstm.weight_ih_l0"]).shape[1]
    num_layers = _np(state_dict["weights"]).shape[0] if "weights" in state_dict else 0
    lstm_layers = 1
    while f"blstm.weight_ih_l{lstm_layers}" in state_dict:
        lstm_layers += 1
    return HeadConfig(num_weighted_layers=int(num_layers), adapter_dim=int(adapter_dim),
                      audiogram_dim=int(lstm_in - adapter_dim), lstm_hidden=int(lstm_hidden),
                      lstm_layers=lstm_layers,
                      dense_dim=int(_np(state_dict["linear1.weight"]).shape[0]),
                      num_heads=num_heads)


def _expected_head_shapes(cfg: HeadConfig, feature_dim: int) -> dict[str, tuple[int, ...]]:
    h4, d = 4 * cfg.lstm_hidden, cfg.dense_dim
    shapes = {
        "linear0.weight": (cfg.adapter_dim, feature_dim), "linear0.bias": (cfg.adapter_dim,),
        "linear1.weight": (d, 2 * cfg.lstm_hidden), "linear1.bias": (d,),
        "haaqiAtt_layer.in_proj_weight": (3 * d, d), "haaqiAtt_layer.in_proj_bias": (3 * d,),
        "haaqiAtt_layer.out_proj.weight": (d, d), "haaqiAtt_layer.out_proj.bias": (d,),
        "haaqiframe_score.weight": (1, d), "haaqiframe_score.bias": (1,),
    }
    for layer in range(cfg.lstm_layers):
        inputs = 2 * cfg.lstm_hidden if layer else cfg.adapter_dim + cfg.audiogram_dim
        for sfx in (f"_l{layer}", f"_l{layer}_reverse"):
            shapes[f"blstm.weight_ih{sfx}"] = (h4, inputs)
            shapes[f"blstm.weight_hh{sfx}"] = (h4, cfg.lstm_hidden)
            shapes[f"blstm.bias_ih{sfx}"] = (h4,)
            shapes[f"blstm.bias_hh{sfx}"] = (h4,)
    if cfg.num_weighted_layers:
        shapes["weights"] = (cfg.num_weighted_layers,)
        for i in range(cfg.num_weighted_layers):
            shapes[f"layer_norm.{i}.weight"] = (feature_dim,)
            shapes[f"layer_norm.{i}.bias"] = (feature_dim,)
    return shapes


def check_state_dict(state_dict: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]],
                     what: str) -> dict[str, np.ndarray]:
    """Strict key and shape check; returns the tensors as float32 numpy arrays."""
    missing = sorted(set(expected) - set(state_dict))
    if missing:
        raise ValueError(f"{what}: missing key {missing[0]!r}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(set(state_dict) - set(expected))
    if unexpected:
        raise ValueError(f"{what}: unexpected key {unexpected[0]!r}"
                         + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    arrays = {}
    for key, shape in expected.items():
        arr = _np(state_dict[key])
        if arr.shape != tuple(shape):
            raise ValueError(f"{what}: key {key!r} has shape {arr.shape}, expected {tuple(shape)}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{what}: key {key!r} holds non-finite values")
        arrays[key] = arr
    return arrays


def head_params_from_state_dict(state_dict: Mapping[str, Any], *, num_heads: int = 16
                                ) -> tuple[dict[str, Any], HeadConfig]:
    """Converts the head part of a released state dict (no `beats_model.` keys).

    Returns:
      (params for `HAAQINetHead`, its HeadConfig).
    Raises:
      ValueError naming the first missing/unexpected key or wrong shape.
    """
    cfg = head_config_from_state_dict(state_dict, num_heads=num_heads)
    feature_dim = _np(state_dict["linear0.weight"]).shape[1]
    sd = check_state_dict(state_dict, _expected_head_shapes(cfg, feature_dim),
                          "HAAQI-Net head state dict")

    def dense(prefix):
        return {"kernel": sd[f"{prefix}.weight"].T, "bias": sd[f"{prefix}.bias"]}

    def lstm(sfx):
        # Same gate order (i, f, g, o) on both sides; PyTorch's two biases add up.
        return {"input": {"kernel": sd[f"blstm.weight_ih{sfx}"].T,
                          "bias": sd[f"blstm.bias_ih{sfx}"] + sd[f"blstm.bias_hh{sfx}"]},
                "recurrent_kernel": sd[f"blstm.weight_hh{sfx}"].T}

    d = cfg.dense_dim
    w_in, b_in = sd["haaqiAtt_layer.in_proj_weight"], sd["haaqiAtt_layer.in_proj_bias"]
    attention = {name: {"kernel": w_in[i * d:(i + 1) * d].T, "bias": b_in[i * d:(i + 1) * d]}
                 for i, name in enumerate(("query", "key", "value"))}
    attention["out"] = dense("haaqiAtt_layer.out_proj")
    params: dict[str, Any] = {
        "adapter": dense("linear0"),
        "blstm": {f"{direction}_{layer}" if layer else direction:
                  lstm(f"_l{layer}" + ("_reverse" if direction == "backward" else ""))
                  for layer in range(cfg.lstm_layers) for direction in ("forward", "backward")},
        "dense": dense("linear1"),
        "attention": attention,
        "frame_score": dense("haaqiframe_score"),
    }
    if cfg.num_weighted_layers:
        params["layer_weights"] = sd["weights"]
        for i in range(cfg.num_weighted_layers):
            params[f"layer_norm_{i}"] = {"scale": sd[f"layer_norm.{i}.weight"],
                                         "bias": sd[f"layer_norm.{i}.bias"]}
    return params, cfg


def _load_state_dict(src_path, *, head_only: bool) -> dict[str, Any]:
    """The state dict of a HAAQI-Net file: with its BEATs (`beats_model.*` keys), or without it
    when `head_only` (its encoder then comes from a separate BEATs checkpoint)."""
    import torch
    src_path = Path(src_path)
    if src_path.is_dir():
        raise FileNotFoundError(f"{src_path} is a folder; give the .pth checkpoint file")
    if not src_path.is_file():
        raise FileNotFoundError(f"{src_path} does not exist")
    if src_path.stat().st_size == 0:
        raise ValueError(f"{src_path}: the file is empty")
    try:
        obj = torch.load(src_path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files, non-tensor objects
        raise ValueError(f"{src_path}: cannot be read as a PyTorch checkpoint ({e})") from None
    if isinstance(obj, Mapping) and "cfg" in obj and "model" in obj:
        raise ValueError(f"{src_path} is a BEATs checkpoint ('cfg' and 'model'); convert it "
                         f"without --haaqinet" + (", or give it as the head's BEATs"
                                                  if head_only else ""))
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if (isinstance(obj, Mapping) and obj
            and all(str(k).startswith("module.") for k in obj)):
        obj = {str(k)[len("module."):]: v for k, v in obj.items()}   # nn.DataParallel's prefix
    if not isinstance(obj, Mapping) or "linear0.weight" not in obj:
        raise ValueError(f"{src_path}: not a HAAQI-Net checkpoint (expected a dict "
                         f"{{'model': state_dict}} with the head's 'linear0.*', 'blstm.*', ... "
                         f"keys, as the authors' model/haaqi_net_best.pth or best_loss.pth)")
    has_encoder = any(str(k).startswith(BEATS_PREFIX) for k in obj) or is_student_file(obj)
    if head_only and has_encoder:
        raise ValueError(f"{src_path} holds its own encoder ('{BEATS_PREFIX}*' keys, or the "
                         f"distilled student's); a separate BEATs checkpoint (--beats) is only "
                         f"for a head-only file")
    if not head_only and not has_encoder:
        raise ValueError(f"{src_path} is a head-only HAAQI-Net file (no '{BEATS_PREFIX}*' "
                         f"keys, as the authors' trainer's best_loss.pth): give the BEATs "
                         f"checkpoint it was trained on, convert_weights.py --haaqinet "
                         f"{src_path.name} OUT --beats BEATs_iter3_plus_AS2M.pt "
                         f"(Python: beats_checkpoint=)")
    return dict(obj)


#: Keys that mark the authors' distilled model (HAAQINetStudent): its projection and layers.
_STUDENT_MARKS = ("linear2.weight", "encoder0.fc1.weight")
_STUDENT_PREDICTION_HEAD = re.compile(r"encoder\d+\.(weight|bias)")


def is_student_file(state_dict: Mapping[str, Any]) -> bool:
    """Whether a state dict is the authors' distilled HAAQI-Net (haaqi_net_distillBEATs.pth)."""
    return all(key in state_dict for key in _STUDENT_MARKS)


def student_haaqinet_from_state_dict(state_dict: Mapping[str, Any], *, beats_config=None,
                                     num_heads: int = 16):
    """Builds a `HAAQINet` from the authors' distilled model (see the module docstring).

    Args:
      state_dict: their `HAAQINetStudent` state dict.
      beats_config: the teacher BEATs configuration their student was built with (sizes,
        buckets, deep-norm alpha); default `haaqi_jax.beats.RELEASED_CONFIG`.
      num_heads: attention heads of the head (16 as released; not stored in the file).
    Returns:
      A HAAQINet whose encoder is a `StudentEncoder` with attention "self_only" (as their
      code computes), feature mode "weighted" over the student's layers.
    Raises:
      ValueError naming the first missing/unexpected key or wrong shape.
    """
    import jax

    from haaqi_jax.convert.beats_torch import (_front_end_entries, _layer_entries,
                                               _params_from_table)
    from haaqi_jax.model import HAAQINet, HAAQINetConfig, check_param_tree
    from haaqi_jax.student import StudentConfig, param_shapes

    cfg = _beats_config(beats_config)
    num_layers = 0
    while f"encoder{num_layers}.fc1.weight" in state_dict:
        num_layers += 1
    student_cfg = StudentConfig(beats=cfg, num_layers=num_layers, attention="self_only")
    table: dict[str, Any] = {}
    _front_end_entries(table, cfg, "patch_embedding", "beats_layer_norm", "linear2")
    for i in range(num_layers):
        _layer_entries(table, cfg, f"encoder{i}", (f"layers_{i}",),
                       (f"relative_position_bias_{i}", "embedding"))
    what = "HAAQI-Net student state dict"
    def part(key):               # stray keys under an encoder name are the encoder's errors
        if _STUDENT_PREDICTION_HEAD.fullmatch(key):
            return "prediction head"
        encoder = key in table or key.startswith(("encoder", "patch_embedding.",
                                                  "beats_layer_norm.", "linear2."))
        return "encoder" if encoder else "head"

    encoder_sd = {k: v for k, v in state_dict.items() if part(k) == "encoder"}
    head_sd = {k: v for k, v in state_dict.items() if part(k) == "head"}
    encoder_params = _params_from_table(encoder_sd, table, what)
    check_param_tree(encoder_params, jax.tree_util.tree_map(
        lambda x: np.broadcast_to(np.float32(0), x.shape), param_shapes(student_cfg)), what)
    head_params, head_cfg = head_params_from_state_dict(head_sd, num_heads=num_heads)
    _check_head_width(head_sd, cfg, what)
    if head_cfg.num_weighted_layers != num_layers:
        raise ValueError(f"{what}: 'weights' has {head_cfg.num_weighted_layers} entries for "
                         f"{num_layers} student layers (the released head sums every layer)")
    config = HAAQINetConfig(encoder_kind="student", encoder_config=student_cfg.to_dict(),
                            feature_mode="weighted",
                            feature_layers=tuple(range(1, num_layers + 1)), head=head_cfg,
                            freeze_encoder=True)
    return HAAQINet.from_params(config, {"encoder": encoder_params, "head": head_params})


def read_beats_checkpoint(path: str | os.PathLike, *, allow_pickle: bool = False
                          ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The encoder of a head-only HAAQI-Net file: (BEATs cfg dict, Flax params of `BEATs`)
    from an official BEATs .pt or a folder written by `convert_beats_checkpoint`."""
    from haaqi_jax.convert.beats_torch import (_checkpoint_parts, beats_params_from_state_dict,
                                               load_torch_checkpoint)
    from haaqi_jax.beats import load_beats

    path = Path(path)
    if path.is_dir():
        model, params = load_beats(path)
        return dict(model.config.to_dict()), params
    cfg, state_dict = _checkpoint_parts(load_torch_checkpoint(path, allow_pickle=allow_pickle),
                                        str(path))
    try:
        return cfg, beats_params_from_state_dict(state_dict, cfg)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _beats_config(beats_config):
    """A BEATsConfig from a BEATsConfig, a cfg dict, or None (the released BEATs_iter3+)."""
    from haaqi_jax.beats import RELEASED_CONFIG, BEATsConfig
    if isinstance(beats_config, BEATsConfig):
        return beats_config
    return BEATsConfig.from_dict(dict(RELEASED_CONFIG if beats_config is None else beats_config))


def haaqinet_from_state_dict(state_dict: Mapping[str, Any], *, beats_config=None,
                             num_heads: int = 16, feature_layers=None):
    """Builds a `HAAQINet` from a released state dict (no file I/O).

    Args:
      state_dict: `beats_model.*` + head keys (see the module docstring).
      beats_config: BEATs cfg dict or BEATsConfig; default `haaqi_jax.beats.RELEASED_CONFIG`.
      num_heads: attention heads of the head (16 as released; not stored in the file).
      feature_layers: hidden-state indices of the weighted sum; default 1..L (the L layer
        outputs, which is what the released code sums).
    """
    from haaqi_jax.convert.beats_torch import beats_params_from_state_dict

    beats_sd = {k[len(BEATS_PREFIX):]: v for k, v in state_dict.items()
                if k.startswith(BEATS_PREFIX)}
    head_sd = {k: v for k, v in state_dict.items() if not k.startswith(BEATS_PREFIX)}
    if not beats_sd:
        raise ValueError(f"HAAQI-Net state dict: no '{BEATS_PREFIX}*' (encoder) keys")
    cfg = _beats_config(beats_config)
    head_params, head_cfg = head_params_from_state_dict(head_sd, num_heads=num_heads)
    try:
        encoder_params = beats_params_from_state_dict(beats_sd, cfg)
    except (ValueError, KeyError) as e:
        raise ValueError(f"HAAQI-Net state dict, encoder part ('{BEATS_PREFIX}' prefix "
                         f"removed): {e}") from None
    _check_head_width(head_sd, cfg, "HAAQI-Net state dict")
    return _assemble(head_params, head_cfg, encoder_params, cfg, feature_layers)


def haaqinet_from_head_state_dict(head_state_dict: Mapping[str, Any], beats_config,
                                  encoder_params: Mapping[str, Any], *, num_heads: int = 16,
                                  feature_layers=None):
    """Builds a `HAAQINet` from a head-only state dict and a converted BEATs (no file I/O).

    Args:
      head_state_dict: the head's keys only (module docstring), e.g. the `'model'` entry of the
        authors' trainer's best_loss.pth.
      beats_config: the BEATs' cfg dict or BEATsConfig.
      encoder_params: Flax params of `BEATs(beats_config)` (`read_beats_checkpoint`).
      num_heads, feature_layers: as in `haaqinet_from_state_dict`.
    """
    cfg = _beats_config(beats_config)
    head_params, head_cfg = head_params_from_state_dict(head_state_dict, num_heads=num_heads)
    _check_head_width(head_state_dict, cfg, "HAAQI-Net state dict")
    return _assemble(head_params, head_cfg, encoder_params, cfg, feature_layers)


def _check_head_width(head_state_dict, cfg, what: str) -> None:
    """The head's input projection must read the encoder's width."""
    feature_dim = _np(head_state_dict["linear0.weight"]).shape[1]
    if feature_dim != cfg.encoder_embed_dim:
        raise ValueError(f"{what}: linear0.weight reads {feature_dim} features but the BEATs "
                         f"config has encoder_embed_dim {cfg.encoder_embed_dim}")


def _assemble(head_params, head_cfg, encoder_params, cfg, feature_layers):
    """A HAAQINet of a converted head and BEATs (widths already checked)."""
    from haaqi_jax.model import HAAQINet, HAAQINetConfig

    cfg_dict = dict(cfg.to_dict())
    layers = head_cfg.num_weighted_layers
    if layers:
        feature_layers = tuple(range(1, layers + 1)) if feature_layers is None \
            else tuple(feature_layers)
        if len(feature_layers) != layers or max(feature_layers) > cfg_dict["encoder_layers"]:
            raise ValueError(f"HAAQI-Net state dict: 'weights' has {layers} entries; "
                             f"feature_layers {feature_layers} must name {layers} of the "
                             f"{cfg_dict['encoder_layers'] + 1} hidden states")
    config = HAAQINetConfig(
        encoder_kind="beats", encoder_config=cfg_dict,
        feature_mode="weighted" if layers else "last",
        feature_layers=feature_layers if layers else HAAQINetConfig.feature_layers,
        head=head_cfg, freeze_encoder=True)
    return HAAQINet.from_params(config, {"encoder": encoder_params, "head": head_params})


def convert_haaqinet(src_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                     beats_config=None, beats_checkpoint: str | os.PathLike | None = None,
                     num_heads: int = 16, feature_layers=None, overwrite: bool = False,
                     allow_pickle: bool = False) -> Path:
    """Converts the authors' HAAQI-Net file to a directory `HAAQINet.load` reads.

    Args:
      src_path: the HAAQI-Net .pth: with its BEATs inside (`beats_model.*` keys, as
        model/haaqi_net_best.pth), or head-only (as the trainer's best_loss.pth) together
        with `beats_checkpoint`.
      out_dir: the directory to write.
      beats_config: the BEATs configuration of a file with its BEATs inside, when not the
        released BEATs_iter3+ (a cfg dict, e.g. from `read_beats_config`).
      beats_checkpoint: the BEATs a head-only file was trained on: an official BEATs .pt or a
        folder written by `convert_beats_checkpoint` (weights and configuration both).
      num_heads, feature_layers: as in `haaqinet_from_state_dict`.
      overwrite: replace out_dir if it is an earlier output of this tool.
      allow_pickle: read `beats_checkpoint` with torch.load(weights_only=False) (trusted files).

    Strict: a missing/unexpected key or a wrong shape raises ValueError naming the key, and
    nothing is written. Returns the directory written.
    """
    from haaqi_jax.train.checkpoint import check_params_target

    if beats_checkpoint is not None and beats_config is not None:
        raise ValueError("give beats_checkpoint or beats_config, not both: a BEATs checkpoint "
                         "carries its own configuration")
    if allow_pickle and beats_checkpoint is None:
        raise ValueError("allow_pickle applies to beats_checkpoint only (HAAQI-Net files load "
                         "without it)")
    check_params_target(out_dir, overwrite=overwrite)     # before minutes of loading
    state_dict = _load_state_dict(src_path, head_only=beats_checkpoint is not None)
    if beats_checkpoint is not None:     # its own errors name the BEATs file
        cfg, encoder_params = read_beats_checkpoint(beats_checkpoint, allow_pickle=allow_pickle)
    try:
        if beats_checkpoint is None and is_student_file(state_dict):
            if feature_layers is not None:
                raise ValueError("feature_layers: the distilled student's head sums all of its "
                                 "layers, as released; nothing to choose")
            net = student_haaqinet_from_state_dict(state_dict, beats_config=beats_config,
                                                   num_heads=num_heads)
        elif beats_checkpoint is None:
            net = haaqinet_from_state_dict(state_dict, beats_config=beats_config,
                                           num_heads=num_heads, feature_layers=feature_layers)
        else:
            net = haaqinet_from_head_state_dict(state_dict, cfg, encoder_params,
                                                num_heads=num_heads,
                                                feature_layers=feature_layers)
    except ValueError as e:
        hint = ("; a HAAQI-Net built on another BEATs (fine-tuned, smaller) needs that BEATs' "
                "config: convert_weights.py --haaqinet --beats-config BEATs.pt|cfg.json"
                if beats_config is None and "encoder part" in str(e) else "")
        raise ValueError(f"{src_path}: {e}{hint}") from None
    extra = {"source": str(Path(src_path).name)}
    dropped = sorted(k for k in state_dict if is_student_file(state_dict)
                     and _STUDENT_PREDICTION_HEAD.fullmatch(k))
    if dropped:
        extra["not_converted"] = {"keys": dropped, "why": "distillation prediction heads; "
                                  "scoring does not use them"}
    if beats_checkpoint is not None:
        extra["beats_source"] = str(Path(beats_checkpoint).name)
    return net.save(out_dir, overwrite=overwrite, extra=extra)


def read_beats_config(path: str | os.PathLike) -> dict[str, Any]:
    """A BEATs cfg for `convert_haaqinet(beats_config=...)`: from a BEATs .pt checkpoint (its
    'cfg'), a folder written by `convert_beats_checkpoint` (its config.json "cfg"), or a JSON
    file of the cfg itself."""
    from haaqi_jax.convert.beats_torch import _checkpoint_parts, load_torch_checkpoint

    path = Path(path)
    if path.is_dir():
        meta_file = path / "config.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{path}: no config.json (a converted BEATs folder?)")
        meta = json.loads(meta_file.read_text())
        if meta.get("kind") != "beats":
            raise ValueError(f"{path}: config.json has kind {meta.get('kind')!r}, not 'beats'")
        return dict(meta["cfg"])
    if path.suffix.lower() == ".json":
        try:
            return dict(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f"{path}: not a JSON BEATs config ({e})") from None
    cfg, _ = _checkpoint_parts(load_torch_checkpoint(path), str(path))
    return cfg
