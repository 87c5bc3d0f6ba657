"""Conversion of official BEATs PyTorch checkpoints (e.g. BEATs_iter3_plus_AS2M.pt) to Flax.

The key layout is that of Microsoft's BEATs code (MIT License, Copyright (c) Microsoft
Corporation), which speechbrain 1.1.2 loads unchanged. A checkpoint file is
`torch.save({'cfg': dict, 'model': state_dict[, 'label_dict': ...]})`.

Mapping (PyTorch -> `haaqi_jax.beats` parameter tree, see its module docstring):
  Linear weight (out, in)            -> Dense kernel (in, out)
  patch_embedding.weight (E, 1, p, p) -> Conv kernel (p, p, 1, E)
  encoder.pos_conv.0.weight_g (1, 1, K), weight_v (C, C/G, K) -> weight_g (K,), weight_v
    (K, C/G, C); torch's newer `parametrizations.weight.original0/1` names are accepted too
  self_attn.grep_a (1, H, 1, 1)      -> grep_a (H,)
  LayerNorm weight                    -> scale
  encoder.layers.i.self_attn.relative_attention_bias.weight: every layer stores a copy of the
    one shared table; PyTorch's load_state_dict leaves the LAST layer's copy in the shared
    module, so that copy is used (all copies must be present, as in the official files).

Strict: any missing or unexpected key or wrong shape is a ValueError naming the key, and
nothing is written (`save_params` is atomic).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from haaqi_jax.beats import BEATsConfig, init_params

_Transform = Callable[[np.ndarray], np.ndarray]
_LINEAR: _Transform = lambda w: w.T
_SAME: _Transform = lambda w: w

# Aliases written by torch.nn.utils.parametrizations.weight_norm (speechbrain's own modules).
_POS_CONV_ALIASES = {
    "encoder.pos_conv.0.parametrizations.weight.original0": "encoder.pos_conv.0.weight_g",
    "encoder.pos_conv.0.parametrizations.weight.original1": "encoder.pos_conv.0.weight_v",
}


def _as_config(cfg: BEATsConfig | Mapping[str, Any]) -> BEATsConfig:
    return cfg if isinstance(cfg, BEATsConfig) else BEATsConfig.from_dict(cfg)


_Table = dict[str, tuple[tuple[str, ...] | None, tuple[int, ...], _Transform]]


def _linear(table: _Table, torch_name: str, path: tuple[str, ...], n_out: int, n_in: int):
    table[f"{torch_name}.weight"] = (path + ("kernel",), (n_out, n_in), _LINEAR)
    table[f"{torch_name}.bias"] = (path + ("bias",), (n_out,), _SAME)


def _layer_norm(table: _Table, torch_name: str, path: tuple[str, ...], n: int):
    table[f"{torch_name}.weight"] = (path + ("scale",), (n,), _SAME)
    table[f"{torch_name}.bias"] = (path + ("bias",), (n,), _SAME)


def _front_end_entries(table: _Table, cfg: BEATsConfig, patch_embedding: str = "patch_embedding",
                       layer_norm: str = "layer_norm",
                       post_extract_proj: str = "post_extract_proj") -> None:
    """Patch embedding, LayerNorm and projection (`BEATsFrontEnd`), under the torch names given."""
    e, c, p = cfg.embed_dim, cfg.encoder_embed_dim, cfg.input_patch_size
    table[f"{patch_embedding}.weight"] = (("front_end", "patch_embedding", "kernel"),
                                          (e, 1, p, p), lambda w: w.transpose(2, 3, 1, 0))
    if cfg.conv_bias:
        table[f"{patch_embedding}.bias"] = (("front_end", "patch_embedding", "bias"), (e,), _SAME)
    _layer_norm(table, layer_norm, ("front_end", "layer_norm"), e)
    if e != c:
        _linear(table, post_extract_proj, ("front_end", "post_extract_proj"), c, e)


def _layer_entries(table: _Table, cfg: BEATsConfig, src: str, dst: tuple[str, ...],
                   position_bias: tuple[str, ...] | None) -> None:
    """One `BEATsEncoderLayer` from torch prefix `src`; its relative-position table (a torch
    layer stores one when it has relative position bias) goes to `position_bias`, or is
    checked and dropped when that is None."""
    c, f, h, d = cfg.encoder_embed_dim, cfg.encoder_ffn_embed_dim, cfg.encoder_attention_heads, \
        cfg.head_dim
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        _linear(table, f"{src}.self_attn.{name}", dst + ("self_attn", name), c, c)
    if cfg.gru_rel_pos:
        _linear(table, f"{src}.self_attn.grep_linear", dst + ("self_attn", "grep_linear"), 8, d)
        table[f"{src}.self_attn.grep_a"] = (dst + ("self_attn", "grep_a"), (1, h, 1, 1),
                                            lambda w: w.reshape(-1))
    if cfg.relative_position_embedding:
        table[f"{src}.self_attn.relative_attention_bias.weight"] = (
            position_bias, (cfg.num_buckets, h), _SAME)
    _layer_norm(table, f"{src}.self_attn_layer_norm", dst + ("self_attn_layer_norm",), c)
    _linear(table, f"{src}.fc1", dst + ("fc1",), f, c)
    _linear(table, f"{src}.fc2", dst + ("fc2",), c, f)
    _layer_norm(table, f"{src}.final_layer_norm", dst + ("final_layer_norm",), c)


def _key_table(cfg: BEATsConfig) -> _Table:
    """torch key -> (Flax param path or None to check and drop, torch shape, transform)."""
    c, k = cfg.encoder_embed_dim, cfg.conv_pos
    table: _Table = {}
    _front_end_entries(table, cfg)
    table["encoder.pos_conv.0.weight_g"] = (("pos_conv", "weight_g"), (1, 1, k),
                                            lambda w: w.reshape(-1))
    table["encoder.pos_conv.0.weight_v"] = (("pos_conv", "weight_v"),
                                            (c, c // cfg.conv_pos_groups, k),
                                            lambda w: w.transpose(2, 1, 0))
    table["encoder.pos_conv.0.bias"] = (("pos_conv", "bias"), (c,), _SAME)
    _layer_norm(table, "encoder.layer_norm", ("encoder_layer_norm",), c)
    last = cfg.encoder_layers - 1
    for i in range(cfg.encoder_layers):
        _layer_entries(table, cfg, f"encoder.layers.{i}", (f"layers_{i}",),
                       ("relative_position_bias", "embedding") if i == last else None)
    if cfg.finetuned_model:
        _linear(table, "predictor", ("predictor",), cfg.predictor_class, c)
    return table


def _params_from_table(entries: Mapping[str, Any], table: _Table, what: str,
                       prefix: str = "") -> dict[str, Any]:
    """Strict fill of a Flax tree from `entries` (prefix already stripped): every table key
    present, no other, each of its shape and finite. Errors name `what` and the full key."""
    missing = set(table) - set(entries)
    if missing:
        raise ValueError(f"{what}: missing key(s) {_name_keys(prefix + k for k in missing)}")
    unexpected = set(entries) - set(table)
    if unexpected:
        raise ValueError(f"{what}: unexpected key(s) "
                         f"{_name_keys(prefix + k for k in unexpected)} (not part of this "
                         f"BEATs configuration)")
    params: dict[str, Any] = {}
    for key, (path, shape, transform) in table.items():
        array = _to_numpy(prefix + key, entries[key])
        if array.shape != shape:
            raise ValueError(f"{what}: {prefix + key!r} has shape {array.shape}, "
                             f"expected {shape} for this configuration")
        if path is None:
            continue
        node = params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = np.ascontiguousarray(transform(array))
    return params


def _to_numpy(key: str, value: Any) -> np.ndarray:
    if hasattr(value, "detach"):                                      # a torch tensor
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        value = value.numpy()
    array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"BEATs state dict: {key!r} has dtype {array.dtype}, expected float")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"BEATs state dict: {key!r} holds non-finite values (NaN or inf): "
                         f"a model with them scores NaN")
    return array


def _name_keys(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def beats_params_from_state_dict(state_dict: Mapping[str, Any],
                                 cfg: BEATsConfig | Mapping[str, Any], *,
                                 prefix: str = "") -> dict[str, Any]:
    """Official BEATs state dict -> Flax params of `BEATs(cfg)` (numpy float32 arrays).

    Args:
      state_dict: torch tensors or arrays in the official key layout.
      cfg: the checkpoint's cfg dict or a BEATsConfig.
      prefix: only keys starting with it are read (and it is stripped), e.g. "beats_model.";
        with a prefix, keys without it are ignored.

    Raises:
      ValueError naming the first missing / unexpected key or wrong shape.
    """
    config = _as_config(cfg)
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"BEATs state dict: expected a mapping of tensors, got "
                         f"{type(state_dict).__name__}")
    entries = {k[len(prefix):]: v for k, v in state_dict.items()
               if isinstance(k, str) and k.startswith(prefix)}
    for alias, official in _POS_CONV_ALIASES.items():
        if alias in entries:
            if official in entries:
                raise ValueError(f"BEATs state dict: both {prefix + alias!r} and "
                                 f"{prefix + official!r} are present")
            entries[official] = entries.pop(alias)
    params = _params_from_table(entries, _key_table(config), "BEATs state dict", prefix)
    _check_against_module(params, config)
    return params


def _check_against_module(params: dict[str, Any], config: BEATsConfig) -> None:
    """The converted tree must have exactly the structure and shapes `BEATs.init` makes."""
    import jax

    expected = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    flat_expected = {jax.tree_util.keystr(p): v.shape
                     for p, v in jax.tree_util.tree_leaves_with_path(expected)}
    flat_params = {jax.tree_util.keystr(p): v.shape
                   for p, v in jax.tree_util.tree_leaves_with_path(params)}
    if flat_expected != flat_params:
        diff = set(flat_expected.items()) ^ set(flat_params.items())
        raise ValueError(f"internal: converted tree does not match BEATs.init: {sorted(diff)}")


def load_torch_checkpoint(src_path: str | os.PathLike, *, allow_pickle: bool = False) -> Any:
    """torch.load on CPU, `weights_only=True` unless `allow_pickle` (trusted files only)."""
    import pickle

    import torch

    src_path = Path(src_path)
    if src_path.is_dir():
        raise FileNotFoundError(f"{src_path} is a folder; give the .pt checkpoint file")
    if not src_path.is_file():
        raise FileNotFoundError(f"{src_path}: no such checkpoint file")
    if src_path.stat().st_size == 0:
        raise ValueError(f"{src_path}: the file is empty")
    try:
        return torch.load(src_path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{src_path}: cannot be read with torch.load(weights_only=True) "
                         f"({reason}); if you trust the file, pass allow_pickle=True "
                         f"(convert_weights.py --allow-pickle)") from None
    except Exception as e:  # truncated, text or otherwise foreign files
        raise ValueError(f"{src_path}: not a readable PyTorch checkpoint "
                         f"({type(e).__name__}: {e})") from None


def _checkpoint_parts(obj: Any, src: str) -> tuple[dict[str, Any], Mapping[str, Any]]:
    if not isinstance(obj, Mapping):
        raise ValueError(f"{src} is not a BEATs checkpoint: expected a dict with 'cfg' and "
                         f"'model', got {type(obj).__name__}")
    for key in ("cfg", "model"):
        if key not in obj:
            hint = ("; a HAAQI-Net file? convert it with --haaqinet"
                    if any(str(k).startswith("beats_model.") for k in obj)
                    or isinstance(obj.get("model"), Mapping)
                    and any(str(k).startswith("beats_model.") for k in obj["model"]) else "")
            raise ValueError(f"{src} is not a BEATs checkpoint: missing key {key!r} (found "
                             f"{_name_keys(map(str, obj.keys())) or 'no keys'}){hint}")
    if not isinstance(obj["cfg"], Mapping) or not isinstance(obj["model"], Mapping):
        raise ValueError(f"{src} is not a BEATs checkpoint: 'cfg' and 'model' must be dicts")
    return dict(obj["cfg"]), obj["model"]


def convert_beats_checkpoint(src_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                             overwrite: bool = False, allow_pickle: bool = False) -> Path:
    """Converts an official BEATs .pt file into a parameter directory `load_beats` reads.

    config.json holds {"kind": "beats", "cfg": BEATsConfig(...).to_dict(), "source": name,
    "label_dict": ... (fine-tuned checkpoints, when JSON-able)}. Returns the directory.
    """
    from haaqi_jax.train.checkpoint import save_params

    from haaqi_jax.train.checkpoint import check_params_target

    src = str(src_path)
    check_params_target(out_dir, overwrite=overwrite)     # before minutes of loading
    checkpoint = load_torch_checkpoint(src_path, allow_pickle=allow_pickle)
    cfg_dict, state_dict = _checkpoint_parts(checkpoint, src)
    # numpy scalars from a pickled cfg (allow_pickle) as plain numbers, for config.json
    cfg_dict = {k: v.item() if isinstance(v, np.generic) else v for k, v in cfg_dict.items()}
    try:
        config = BEATsConfig.from_dict(cfg_dict)
        params = beats_params_from_state_dict(state_dict, config)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{src}: {e}") from None
    meta: dict[str, Any] = {"kind": "beats", "cfg": config.to_dict(),
                            "source": Path(src_path).name}
    if checkpoint.get("label_dict") is not None:
        try:   # class index <-> AudioSet id; kept only when it is plain JSON
            meta["label_dict"] = json.loads(json.dumps(
                {str(k): v for k, v in dict(checkpoint["label_dict"]).items()}))
        except (TypeError, ValueError):
            pass
    return save_params(out_dir, params, meta, overwrite=overwrite)
