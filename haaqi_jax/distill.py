"""Distillation of HAAQI-Net's BEATs into distillBEATs: the step, the loop, the comparison.

    python train.py --config configs/distill.py            # the demo: teacher, then student

`distill_and_evaluate(config, workdir)` (`train_and_evaluate`, which train.py calls, hands it
a config that has a `distill` section, holding the workdir's lock):
 1. the teacher: a trained HAAQI-Net directory (`distill.teacher_checkpoint`), or, when None,
    one trained first by the ordinary loop from the run config `distill.teacher` into
    workdir/teacher (reused when it is already there);
 2. the student HAAQI-Net: encoder = `student_from_teacher` (teacher layers
    `distill.student_layers`), head copied from the teacher's head (`distill.head_init`), with
    the parts in `distill.frozen_head` (default BLSTM and attention) frozen; prediction heads
    (`distill.head_kind`) for the teacher layers `distill.target_layers`;
 3. training with the jitted, data-parallel step (`make_distill_step`, `jit_distill_step`):
    teacher forward frozen (an explicit argument outside the train state: no gradient, no
    optimizer state, not checkpointed), student forward, loss = the configured registry loss
    (`distill_weighted` or `distill_uncertainty` combining the HAAQI loss and per-layer
    distillation terms); validation on the student's HAAQI loss every epoch, early
    stopping (on `train.monitor`: that loss, or the student's LCC, SRCC, MSE or a registered
    metric), checkpoints and resumption as in `haaqi_jax.train.loop` (same checkpoint
    manager, metrics file, progress bar);
    with `distill.cache_targets` the teacher's target layers are computed once per clip into a
    disk cache (`haaqi_jax.data.cache`, keyed by the teacher and the layers, float16 by
    default, resumable) and the step reads them from the batch: the teacher never runs in it;
 4. the report: the student's report folder (as the teacher's) plus distill_report.json with
    student vs teacher LCC, SRCC, MSE per split, parameter counts and inference time per 10 s
    clip (`time_inference`: teacher and student timed interleaved, min and median), and
    distill_report.png showing them.

Cached targets are off by default: they cost disk (K layers x C x 2 bytes per token: 2.3 MB per
10 s clip for 3 layers of 768 in float16), pay off only after the first epoch (that epoch runs
the teacher anyway, to fill the cache), round the targets to float16 (relative 2**-11, unless
distill.target_cache_dtype="float32") and rule out random crops (a target belongs to one exact
input: crops are refused with a ValueError).

Parameters of the train state: {"encoder": student, "head": HAAQI-Net head, "pred_heads": the
prediction heads, "loss": learnable loss parameters (may be empty)}.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from haaqi_jax import config as cfglib
from haaqi_jax import losses
from haaqi_jax.train import metrics as metrics_lib
from haaqi_jax.train import sharding
from haaqi_jax.train import state as state_lib
from haaqi_jax.train import steps as steps_lib
from haaqi_jax.train.state import TrainState

REPORT_FILE = "distill_report.json"
#: The same at a glance: scores per split, time per clip and parameters (`comparison_plot`).
PLOT_FILE = "distill_report.png"
#: How far below its teacher's LCC a student may score and still count as keeping its accuracy
#: (the project's target for distillBEATs), drawn on the plot.
LCC_TARGET_GAP = 0.03
TEACHER_DIR = "teacher"
TARGET_CACHE_DIR = "target_cache"

# ----------------------------------------------------------------------------- the student


def student_model_config(teacher_config: Any, distill_cfg: Any):
    """HAAQINetConfig of the student: encoder kind "student" built from the teacher's BEATs
    config, the teacher's head sizes, `distill.feature_mode` ("last" or "weighted" over the
    student's layers 1..N)."""
    from haaqi_jax.model import HAAQINetConfig
    from haaqi_jax.student import StudentConfig  # importing it registers the "student" kind

    if teacher_config.encoder_kind != "beats":
        raise ValueError(f"distillation needs a teacher with a BEATs encoder, got encoder kind "
                         f"{teacher_config.encoder_kind!r}")
    layers = tuple(int(i) for i in distill_cfg.student_layers)
    student = StudentConfig(beats=dict(teacher_config.encoder_config), num_layers=len(layers),
                            shared_position_bias=bool(distill_cfg.shared_position_bias))
    return HAAQINetConfig(encoder_kind="student", encoder_config=student.to_dict(),
                          feature_mode=str(distill_cfg.feature_mode),
                          feature_layers=tuple(range(1, len(layers) + 1)),
                          head=teacher_config.head, freeze_encoder=False)


def init_student(teacher: Any, distill_cfg: Any, seed: int) -> tuple[Any, dict[str, Any]]:
    """(student HAAQINet, prediction-head params) from a teacher HAAQINet.

    The encoder is `student_from_teacher`; the head's leaves are the teacher's where names and
    shapes agree (`distill.head_init = "teacher"`) and random otherwise (e.g. the weighted-sum
    LayerNorms when the teacher used its last layer), or all random ("random").
    """
    from haaqi_jax.head import HAAQINetHead
    from haaqi_jax.model import HAAQINet, check_param_tree
    from haaqi_jax.student import PredictionHeads, student_from_teacher

    net_cfg = student_model_config(teacher.config, distill_cfg)
    _, enc_params = student_from_teacher(teacher.params["encoder"],
                                         dict(teacher.config.encoder_config),
                                         tuple(distill_cfg.student_layers),
                                         shared_position_bias=bool(
                                             distill_cfg.shared_position_bias))
    channels = int(teacher.config.encoder_config["encoder_embed_dim"])
    n_feat = net_cfg.head.num_weighted_layers
    features = jnp.zeros((1, n_feat, 8, channels) if n_feat else (1, 8, channels))
    head = HAAQINetHead(net_cfg.head).init(jax.random.key(seed), features, jnp.ones((1, 8), bool),
                                           jnp.zeros((1, net_cfg.head.audiogram_dim)))["params"]
    if distill_cfg.head_init == "teacher":
        teacher_head = {state_lib.path_name(p): x for p, x in
                        jax.tree_util.tree_flatten_with_path(teacher.params["head"])[0]}

        def take(path, fresh):
            old = teacher_head.get(state_lib.path_name(path))
            return fresh if old is None or np.shape(old) != fresh.shape else jnp.asarray(old)

        head = jax.tree_util.tree_map_with_path(take, head)
    elif distill_cfg.head_init != "random":
        raise ValueError(f"distill.head_init must be 'teacher' or 'random', got "
                         f"{distill_cfg.head_init!r}")
    params = {"encoder": jax.tree_util.tree_map(jnp.asarray, enc_params), "head": head}
    check_param_tree(params, HAAQINet.param_shapes(net_cfg), "student HAAQI-Net parameters")
    pred = PredictionHeads(len(distill_cfg.target_layers), str(distill_cfg.head_kind)).init(
        jax.random.key(seed + 1), jnp.zeros((1, 1, channels)))["params"]
    return HAAQINet(net_cfg, params), pred


#: Head parts `distill.frozen_head` may name (parameter groups of HAAQINetHead).
HEAD_PARTS = ("adapter", "blstm", "dense", "attention", "frame_score", "layer_norm_<i>")


def _checked_teacher_layers(config: Any) -> int | None:
    """Checks the teacher's encoder kind and returns its transformer layers, from its
    checkpoint's config.json or the config of the teacher trained here (None when neither
    says). ValueError when the teacher's encoder is not BEATs (a student is built from BEATs
    layers)."""
    given = config.distill.get("teacher_checkpoint")
    if given:
        from haaqi_jax.train.checkpoint import load_config
        net = load_config(given).get("config", {})
        kind, encoder = net.get("encoder_kind", "beats"), net.get("encoder_config") or {}
        where = f"distill.teacher_checkpoint ({given})"
    else:
        model = config.distill.teacher.model
        kind = model.get("encoder_kind", "beats")
        encoder = cfglib.to_dict(model.get("encoder_config") or {})
        where = "distill.teacher.model.encoder_kind"
    check_teacher_kind(kind, where)
    layers = encoder.get("encoder_layers")
    return None if layers is None else int(layers)


def check_teacher_kind(kind: str, where: str) -> None:
    """ValueError unless a teacher's encoder kind is "beats"."""
    if kind != "beats":
        raise ValueError(f"{where}: the teacher's encoder is {kind!r}, and a distillation "
                         f"distils a BEATs encoder (the student is built from its layers): "
                         f"a HAAQI-Net on BEATs is needed, e.g. a run of "
                         f"configs/haaqinet_beats.py or a converted model")


def check_layer_ranges(dc: Any, n_layers: int) -> None:
    """distill.student_layers and target_layers against a teacher of `n_layers` layers."""
    bad = [int(i) for i in dc.student_layers if not 0 <= int(i) < n_layers]
    if bad:
        raise ValueError(f"distill.student_layers {tuple(dc.student_layers)}: {bad} are not "
                         f"teacher layers (0..{n_layers - 1}, 0-based)")
    bad = [int(i) for i in dc.target_layers if not 0 <= int(i) <= n_layers]
    if bad:
        raise ValueError(f"distill.target_layers {tuple(dc.target_layers)}: {bad} are not "
                         f"teacher hidden states (0..{n_layers})")


def _check_cached_targets(config: Any, cached: bool | None = None) -> None:
    """Cached targets and random crops exclude each other; `cached` defaults to the config's
    distill.cache_targets."""
    if cached is None:
        cached = bool(config.distill.get("cache_targets"))
    if cached and config.data.get("crop_seconds") is not None:
        raise ValueError("distill.cache_targets=True needs data.crop_seconds=None: a cached "
                         "target belongs to one exact input, the whole clip (or set "
                         "distill.cache_targets=False to run the teacher on every crop)")


def check_distill_settings(config: Any) -> None:
    """The distillation settings, checked before anything trains (the teacher's own run
    included): names, layer ranges, head parts, the losses and their keywords."""
    import re

    from haaqi_jax.data.cache import STORAGE_DTYPES
    from haaqi_jax.student import HEAD_KINDS

    dc = config.distill
    if config.model.get("encoder_checkpoint"):
        raise ValueError("model.encoder_checkpoint is not read by a distillation (the student "
                         "is built from the teacher): set distill.teacher.model."
                         "encoder_checkpoint for the teacher's BEATs, or "
                         "distill.teacher_checkpoint for a trained teacher HAAQI-Net")
    choices = {"head_kind": HEAD_KINDS, "feature_mode": ("last", "weighted"),
               "head_init": ("teacher", "random"),
               "target_cache_dtype": STORAGE_DTYPES}
    for key, allowed in choices.items():
        if key in dc and dc[key] not in allowed:
            raise ValueError(f"distill.{key} must be one of {allowed}, got {dc[key]!r}")
    part = "|".join(p.replace("<i>", r"\d+") for p in HEAD_PARTS)
    unknown = [p for p in dc.get("frozen_head", ()) if not re.fullmatch(part, str(p))]
    if unknown:
        raise ValueError(f"distill.frozen_head names {unknown}, which the HAAQI-Net head does "
                         f"not have (its parts: {', '.join(HEAD_PARTS)})")
    if not tuple(dc.student_layers):
        raise ValueError("distill.student_layers is empty: name the teacher layers to copy")
    if not tuple(dc.target_layers):
        raise ValueError("distill.target_layers is empty: name the teacher layers the "
                         "prediction heads predict, e.g. (6, 9, 12)")
    n_layers = _checked_teacher_layers(config)
    if n_layers is not None:
        check_layer_ranges(dc, n_layers)
    losses.check_loss_config(config.loss.name, cfglib.to_dict(config.loss.get("kwargs") or {}),
                             num_targets=len(tuple(dc.target_layers)))
    _check_cached_targets(config)
    if config.data.get("cache"):
        raise ValueError("distillation trains the student encoder on waveforms: set "
                         "data.cache=False (the teacher's own run may cache)")
    if not dc.get("teacher_checkpoint") and "teacher" in dc:
        from haaqi_jax.train import loop
        try:
            loop.check_run_settings(teacher_config(config))
        except (ValueError, FileNotFoundError) as err:
            raise type(err)(f"distill.teacher: {err}") from err


def loss_param_labels(labels: dict[str, Any], opt_cfg: Any) -> dict[str, Any]:
    """`labels` with the trainable loss parameters (labels["loss"]) labelled LOSS_PARAMS when
    optimizer.loss_params_learning_rate is set. Why a rate of their own: Adam moves each
    parameter by about its learning rate per step whatever the gradient, so uncertainty
    weights at the model's 5e-4 change by at most ~0.3 in log over 600 steps (weights within
    0.74-1.35x): at that rate the adaptive loss is nearly a fixed one."""
    if opt_cfg.get("loss_params_learning_rate") is None:
        return labels
    as_loss = lambda label: state_lib.LOSS_PARAMS if label == state_lib.TRAINABLE else label
    return {**labels, "loss": jax.tree_util.tree_map(as_loss, labels.get("loss", {}))}


def distill_frozen_patterns(config: Any) -> tuple[str, ...]:
    """Regexes of frozen state paths: head parts in `distill.frozen_head` plus
    `train.frozen_patterns`."""
    return sum(_frozen_pattern_sources(config).values(), ())


def _frozen_pattern_sources(config: Any) -> dict[str, tuple[str, ...]]:
    parts = tuple(config.distill.get("frozen_head", ()))
    return {"distill.frozen_head": tuple(f"head/{p}/.*" for p in parts),
            "train.frozen_patterns": tuple(config.train.get("frozen_patterns", ()))}


def check_frozen_patterns(config: Any, params: Any) -> None:
    """ValueError naming the key when a frozen head part or pattern matches no parameter of
    the student HAAQI-Net `params` (e.g. layer_norm_0 of a head that reads one layer)."""
    for key, patterns in _frozen_pattern_sources(config).items():
        state_lib.check_frozen_patterns(patterns, params, key)

# ----------------------------------------------------------------------------- step


def _encoder_mask(batch: Mapping[str, jax.Array]) -> jax.Array:
    """The sample mask both encoders get: `encoder_padding_mask` of the batch's valid counts,
    which makes an encoder flag exactly the tokens past each clip (also for the cache)."""
    from haaqi_jax.model import encoder_padding_mask

    waveform, padding_mask = batch["waveform"], batch["padding_mask"]
    valid = (~padding_mask.astype(bool)).sum(-1).astype(jnp.int32)
    return encoder_padding_mask(valid, waveform.shape[1])


def _teacher_targets(teacher: Any, teacher_params: Any, waveform: jax.Array,
                     enc_mask: jax.Array, target_layers: tuple[int, ...]):
    """(targets (B, K, T, C) under stop_gradient, token padding mask (B, T) True = pad)."""
    out = teacher.apply({"params": teacher_params}, waveform, enc_mask, deterministic=True)
    targets = jnp.stack([out.hidden_states[i] for i in target_layers], axis=1)
    return jax.lax.stop_gradient(targets.astype(jnp.float32)), out.padding_mask


def make_distill_forward(teacher_cfg: Any, student_cfg: Any, target_layers, head_kind: str, *,
                         cached_targets: bool = False,
                         dtype: Any = None) -> Callable[..., dict[str, jax.Array]]:
    """The distillation forward.

    cached_targets=False: (params, teacher_params, batch, *, rng, deterministic); the teacher
      encoder runs on the batch in eval mode under stop_gradient.
    cached_targets=True: (params, batch, *, rng, deterministic); the targets are read from
      batch["targets"] (B, K, T, C) (`haaqi_jax.data.cache.add_cached_targets`) and no teacher
      is built or run at all.

    predictions: clip_score (B,), frame_scores (B, T), frame_mask (B, T) True = valid,
    student_layers / teacher_layers (B, K, T, C) float32, loss_params.
    dtype: compute dtype of the student, its heads and the teacher (`loop.run_dtype`; None =
    float32); the layers the loss compares are float32 whatever it is.
    """
    from haaqi_jax.head import HAAQINetHead
    from haaqi_jax.model import _thaw_json, encoder_spec
    from haaqi_jax.student import PredictionHeads

    student = encoder_spec("student").build(_thaw_json(student_cfg.encoder_config)).clone(
        dtype=dtype)
    head = HAAQINetHead(student_cfg.head, dtype)
    heads = PredictionHeads(len(target_layers), head_kind, dtype)
    target_layers = tuple(int(i) for i in target_layers)
    feature_layers = tuple(student_cfg.feature_layers)
    weighted = student_cfg.feature_mode == "weighted"

    def student_forward(params, batch, enc_mask, targets, rng, deterministic):
        enc_rng, head_rng = (None, None) if rng is None else jax.random.split(rng)
        s_rngs = None if deterministic or rng is None else {"dropout": enc_rng}
        h_rngs = None if deterministic or rng is None else {"dropout": head_rng}
        s_out = student.apply({"params": params["encoder"]}, batch["waveform"], enc_mask,
                              deterministic=deterministic, rngs=s_rngs)
        # encoder_padding_mask makes the encoder flag exactly the tokens past each clip.
        token_mask = ~s_out.padding_mask
        features = (jnp.stack([s_out.hidden_states[i] for i in feature_layers], axis=1)
                    if weighted else s_out.last_hidden_state)
        out = head.apply({"params": params["head"]}, features, token_mask, batch["audiogram"],
                         deterministic=deterministic, rngs=h_rngs)
        predicted = heads.apply({"params": params["pred_heads"]},
                                s_out.last_hidden_state).astype(jnp.float32)
        if targets.shape != predicted.shape:
            raise ValueError(f"distillation targets have shape {targets.shape}, the prediction "
                             f"heads make {predicted.shape} (B, K, T, C)")
        return {**steps_lib.head_predictions(out, token_mask), "student_layers": predicted,
                "teacher_layers": targets, "loss_params": params.get("loss", {})}

    if cached_targets:
        def forward_cached(params, batch, *, rng=None, deterministic=True):
            targets = jax.lax.stop_gradient(jnp.asarray(batch["targets"], jnp.float32))
            return student_forward(params, batch, _encoder_mask(batch), targets, rng,
                                   deterministic)

        return forward_cached

    teacher = encoder_spec("beats").build(_thaw_json(teacher_cfg.encoder_config)).clone(
        dtype=dtype)

    def forward(params, teacher_params, batch, *, rng=None, deterministic=True):
        enc_mask = _encoder_mask(batch)
        targets, _ = _teacher_targets(teacher, teacher_params, batch["waveform"], enc_mask,
                                      target_layers)
        return student_forward(params, batch, enc_mask, targets, rng, deterministic)

    return forward


@functools.lru_cache(maxsize=8)
def _jitted_target_encoder(encoder_config_json: str, layers: tuple[int, ...]) -> Callable:
    """One jitted teacher-target function per teacher architecture and layers (compiled once
    per shape however many caches are built)."""
    from haaqi_jax.model import encoder_spec

    module = encoder_spec("beats").build(json.loads(encoder_config_json))
    return jax.jit(lambda params, wave, pad: _teacher_targets(
        module, params, wave, _encoder_mask({"waveform": wave, "padding_mask": pad}), layers))


def make_target_encode_fn(teacher: Any, target_layers) -> Callable[[np.ndarray, np.ndarray],
                                                                   tuple[Any, Any]]:
    """The teacher as `haaqi_jax.data.cache.build_feature_cache` calls it: (waveform (B, N),
    padding_mask (B, N) True = pad) -> (targets (B, K, T, C), token padding mask (B, T)), with
    the same sample mask and layers as `make_distill_forward` (jitted, eval mode, split over
    this host's devices)."""
    from haaqi_jax.model import _thaw_json

    encode = _jitted_target_encoder(
        json.dumps(_thaw_json(teacher.config.encoder_config), sort_keys=True),
        tuple(int(i) for i in target_layers))
    mesh = sharding.make_mesh(jax.local_devices())
    params = sharding.replicate(teacher.params["encoder"], mesh)

    def encode_fn(waveform, padding_mask):
        return sharding.local_data_parallel(
            encode, params, (np.asarray(waveform, np.float32), np.asarray(padding_mask, bool)),
            mesh)

    return encode_fn


def build_target_cache(teacher: Any, config: Any, rows, workdir: Path):
    """The teacher's target hidden states of every row's whole clip, on disk
    (`haaqi_jax.data.cache.build_feature_cache`, layers "all" = the K target layers): keyed by
    the teacher encoder's parameters and config and the target layers, `distill.
    target_cache_dtype` (float16 by default), resumable, clips whose audio changed re-encoded.
    Folder: `distill.target_cache_dir`, default workdir/target_cache."""
    from haaqi_jax.data import cache as cache_lib

    dc = config.distill
    layers = [int(i) for i in dc.target_layers]
    identity = {"kind": "distill_targets", "encoder_config": dict(teacher.config.encoder_config),
                "target_layers": layers}
    fingerprint = cache_lib.params_fingerprint(teacher.params["encoder"], identity)
    return sharding.main_process_first("target cache", lambda: cache_lib.build_feature_cache(
        rows, make_target_encode_fn(teacher, layers),
        dc.get("target_cache_dir") or (workdir / TARGET_CACHE_DIR),
        batch_size=int(config.data.get("encode_batch_size", 8)), layers="all",
        fingerprint=fingerprint, dtype=str(dc.get("target_cache_dtype", "float16")),
        probe=True,   # targets of a teacher whose code changed are not reused
        progress=bool((config.get("train") or {}).get("progress", True))))


def make_distill_step(forward: Callable[..., dict], loss_fn: steps_lib.LossFn,
                      tx: optax.GradientTransformation, labels: Any
                      ) -> Callable[[TrainState, Any, Mapping[str, jax.Array]], tuple]:
    """One optimizer step: (state, teacher_params, batch) -> (new state, scalar metrics), or
    (state, batch) with a cached-targets forward (`make_distill_forward(...,
    cached_targets=True)`: the teacher does not run).

    The teacher parameters are an argument, not part of the state: the gradient is taken
    with respect to state.params only, so nothing reaches the teacher and the optimizer holds
    no state for it. Frozen student leaves (labels) get stop_gradient and are carried over
    bit for bit, as in `haaqi_jax.train.steps.make_train_step`.
    """
    return steps_lib.make_train_step(forward, loss_fn, tx, labels)


def jit_distill_step(step: Callable, mesh: Any, *, with_teacher: bool = True) -> Callable:
    """jit for data parallelism: state (and teacher) replicated, batch split over 'data', the
    state donated. with_teacher=False for the cached-targets step (state, batch)."""
    repl, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    in_shardings = (repl, repl, data) if with_teacher else (repl, data)
    return jax.jit(step, in_shardings=in_shardings, out_shardings=(repl, repl),
                   donate_argnums=(0,))

# ----------------------------------------------------------------------------- teacher

_SHARED_DATA_KEYS = ("manifest", "demo_dir", "demo_clips", "demo_seed", "demo_seconds",
                     "demo_label_batch", "train_split", "valid_split", "eval_splits",
                     "hold_out", "valid_fraction", "prefetch", "bucket_pool")


def teacher_config(config: Any) -> Any:
    """The config the teacher is trained with when no checkpoint is given: `distill.teacher`
    with the run's data (same manifest and splits) and seed."""
    teacher = cfglib.ConfigDict(cfglib.to_dict(config.distill.teacher))
    for key in _SHARED_DATA_KEYS:
        if key in config.data and key in teacher.data:
            value = config.data[key]
            teacher.data[key] = tuple(value) if isinstance(value, (list, tuple)) else value
    teacher.seed = int(config.seed)
    teacher.train.progress = bool(config.train.get("progress", True))
    return teacher


def resolve_teacher(config: Any, workdir: Path) -> Path:
    """distill.teacher_checkpoint, or workdir/teacher/report/best_model (trained first by the
    ordinary loop when missing; resumable like any run)."""
    from haaqi_jax.train import loop

    given = config.distill.get("teacher_checkpoint")
    if given:
        return Path(given)
    best = workdir / TEACHER_DIR / loop.REPORT_DIR / "best_model"
    teacher_cfg = cfglib.freeze(teacher_config(config))
    if (best / "config.json").is_file():
        # A finished teacher is reused only if it was trained with this teacher config.
        cfglib.save_run_config(teacher_cfg, workdir / TEACHER_DIR, loop.CONFIG_FILE,
                               write=sharding.is_main_process())
    else:
        try:
            result = loop.train_and_evaluate(teacher_cfg, workdir / TEACHER_DIR)
        except (ValueError, FileNotFoundError) as err:  # its keys are distill.teacher's
            raise type(err)(f"distill.teacher (the teacher's run in {workdir / TEACHER_DIR}): "
                            f"{err}") from err
        if result.report_dir is None:
            raise ValueError(f"teacher training in {workdir / TEACHER_DIR} ended without a "
                             "report (interrupted?); run again to resume it")
    return best

# ----------------------------------------------------------------------------- measurements


def param_counts(teacher: Any, student: Any) -> dict[str, int]:
    """Scalars of the encoders (the paper's comparison) and of whole models."""
    count = state_lib.count_params
    out = {"teacher_encoder": count(teacher.params["encoder"]),
           "student_encoder": count(student.params["encoder"]),
           "teacher_total": count(teacher.params), "student_total": count(student.params)}
    out["encoder_reduction"] = 1.0 - out["student_encoder"] / out["teacher_encoder"]
    return out


def _timed_forwards(net: Any, seconds: float, seed: int, batch: int = 1
                    ) -> dict[str, Callable[[], Any]]:
    """{"model": encoder + head -> clip scores, "encoder": encoder -> features} of `batch`
    random clips of `seconds`, as a user calls them: `HAAQINet.apply` and a jitted `encode`.
    Inputs and parameters are on the device already, so no host transfer is timed."""
    from haaqi_jax.model import HAAQINet

    net = HAAQINet(net.config, jax.device_put(net.params))
    rng = np.random.default_rng(seed)
    wav = jnp.asarray(0.1 * rng.standard_normal((batch, int(seconds * 16000))), jnp.float32)
    hl = jnp.zeros((batch, 8), jnp.float32)
    module = net.module
    encoder = jax.jit(lambda p, w: module.apply({"params": p}, w, None, method="encode")[0])
    return {"model": lambda: net.apply(wav, None, hl).clip_score,
            "encoder": lambda: encoder(net.params, wav)}


def interleaved_runs(jobs: Mapping[Any, Callable[[], Any]], repeats: int, *,
                     progress: bool = False) -> dict[Any, list[float]]:
    """Wall seconds of every job in `repeats` rounds, interleaved.

    Every job is run once first (compile, warm-up; not timed). In each round every job runs
    once, in an order rotated from round to round, so a slow spell of a shared machine hits
    all jobs alike and none always runs first. Returns {job key: [seconds per round]}.
    `progress` shows a bar over the warm-up and the rounds.
    """
    from tqdm.auto import tqdm

    keys = list(jobs)
    bar = tqdm(total=len(keys) * (repeats + 1), desc="timing inference", unit="forward",
               disable=not progress)
    for key in keys:
        jax.block_until_ready(jobs[key]())
        bar.update()
    runs: dict[Any, list[float]] = {key: [] for key in keys}
    for r in range(repeats):
        shift = r % len(keys)
        for key in keys[shift:] + keys[:shift]:
            start = time.perf_counter()
            jax.block_until_ready(jobs[key]())
            runs[key].append(time.perf_counter() - start)
            bar.update()
    bar.close()
    return runs


def time_inference(nets: Mapping[str, Any], seconds: float = 10.0, repeats: int = 15,
                   seed: int = 0, batch: int = 1, *, progress: bool = False
                   ) -> dict[str, dict[str, dict[str, Any]]]:
    """Wall times per clip of jitted forwards of several HAAQI-Nets, interleaved.

    Every (net, part) function is timed by `interleaved_runs` (compiled first, then
    `repeats` rotated rounds).

    Args:
      nets: name -> HAAQINet (e.g. {"teacher": ..., "student": ...}).
      seconds: clip length; repeats: timed rounds; seed: of the random clips.
      batch: clips per forward (1: one clip at a time, as the released code runs).
      progress: a progress bar over the forwards.
    Returns:
      {name: {"model" | "encoder": {"min", "median" (seconds per clip: a forward's wall time
      / batch), "runs" (list, round order)}}}.
    """
    if repeats < 1:
        raise ValueError(f"time_inference: repeats must be >= 1, got {repeats}")
    if batch < 1:
        raise ValueError(f"time_inference: batch must be >= 1, got {batch}")
    jobs = {(name, part): fn for name, net in nets.items()
            for part, fn in _timed_forwards(net, seconds, seed, batch).items()}
    runs = interleaved_runs(jobs, repeats, progress=progress)
    out: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in nets}
    for (name, part), times in runs.items():
        times = [t / batch for t in times]
        out[name][part] = {"min": float(np.min(times)), "median": float(np.median(times)),
                           "runs": times}
    return out


def timing_ratios(times: Mapping[str, Any], numerator: str = "student",
                  denominator: str = "teacher") -> dict[str, dict[str, float]]:
    """numerator / denominator per part of `time_inference`'s result: ratio of the minima, of
    the medians, and the median of the per-round ratios (each pair timed in the same round)."""
    out = {}
    for part in times[numerator]:
        a, b = times[numerator][part], times[denominator][part]
        paired = np.asarray(a["runs"]) / np.asarray(b["runs"])
        out[part] = {"min": a["min"] / b["min"], "median": a["median"] / b["median"],
                     "paired_median": float(np.median(paired))}
    return out


# ----------------------------------------------------------------------------- the loop


def _head_loss(config: Any) -> steps_lib.LossFn:
    """The HAAQI part of the configured loss (validation and reports use it alone)."""
    kwargs = cfglib.to_dict(config.loss.get("kwargs") or {})
    name, sub_kwargs = losses._named(kwargs.get("haaqi"), "haaqi_mse")
    return losses.get_loss(name, **sub_kwargs)


def with_cached_targets(config: Any, teacher: Any, data: Any, workdir: Path) -> Any:
    """`data` whose train batches carry the teacher's cached targets ("targets", float16 by
    default, cast on the device): the cache is built over the train split first (or resumed,
    or reused). Raises ValueError when crops are configured (a target belongs to one exact
    input)."""
    from haaqi_jax.data import cache as cache_lib
    from haaqi_jax.model import tokens_for_samples

    _check_cached_targets(config, cached=True)
    rows = data.rows[config.data.train_split]
    cache = build_target_cache(teacher, config, rows, workdir)
    train = cache_lib.add_cached_targets(data.train, cache, rows, tokens_for_samples)
    return dataclasses.replace(data, train=train)


def _model_params(params: Mapping[str, Any]) -> dict[str, Any]:
    return {"encoder": params["encoder"], "head": params["head"]}


def distill_and_evaluate(config: Any, workdir: str | os.PathLike, *, data: Any = None):
    """Distils the teacher into the student, evaluates both, writes the reports.

    Args:
      config: a ConfigDict with a `distill` section (see configs/distill.py).
      workdir: output folder (config.json, metrics.jsonl, checkpoints/, report/,
        distill_report.json, teacher/ when the teacher is trained here).
      data: prebuilt waveform-mode TrainData; default `build_train_data(config, ...)`.
    Returns:
      haaqi_jax.train.loop.TrainResult of the student.

    Called directly it takes no workdir lock: `haaqi_jax.train.loop.train_and_evaluate` (same
    arguments) does, and is the entry point to use.
    """
    from haaqi_jax.model import HAAQINet
    from haaqi_jax.train import loop

    loop.check_run_settings(config)
    check_distill_settings(config)
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    cfglib.save_run_config(config, workdir, loop.CONFIG_FILE, write=sharding.is_main_process())
    tc, dc = config.train, config.distill
    mesh = sharding.make_mesh()      # (check_run_settings checked the batches divide over it)

    teacher_path = resolve_teacher(config, workdir)
    try:
        teacher = HAAQINet.load(teacher_path)
    except (ValueError, FileNotFoundError) as err:
        key = "distill.teacher_checkpoint" if config.distill.get("teacher_checkpoint") \
            else "the teacher trained here"
        raise type(err)(f"{key} ({teacher_path}): {err}") from err
    check_teacher_kind(teacher.config.encoder_kind, f"the teacher ({teacher_path})")
    check_layer_ranges(dc, int(teacher.config.encoder_config["encoder_layers"]))
    student, pred_params = init_student(teacher, dc, int(config.seed))
    check_frozen_patterns(config, {**student.params, "pred_heads": pred_params})
    if data is None:
        # The teacher's weights are the run's starting point (the student is made from them,
        # the config and the seed): a resume against another teacher is refused.
        data = loop.build_train_data(config, student, workdir, start_params=teacher.params)
    if data.mode != "waveform":
        raise ValueError(f"distillation needs waveform batches, got mode {data.mode!r}")
    keys = loop.BATCH_KEYS["waveform"]
    cached = bool(dc.get("cache_targets", False))
    train_keys = keys + ("targets",) if cached else keys
    if cached:
        data = with_cached_targets(config, teacher, data, workdir)
    valid_split = config.data.valid_split
    valid_labels = loop.training_labels(config, data.rows)

    loss_kwargs = cfglib.to_dict(config.loss.get("kwargs") or {})
    loss_fn = losses.get_loss(config.loss.name, **loss_kwargs)
    params = {**student.params, "pred_heads": pred_params,
              "loss": losses.loss_params(config.loss.name, len(dc.target_layers))}
    labels = loss_param_labels(state_lib.param_labels(params, distill_frozen_patterns(config)),
                               config.optimizer)
    total_steps = int(tc.num_epochs) * data.steps_per_epoch
    tx = state_lib.make_optimizer(config.optimizer, labels, total_steps)
    state = sharding.replicate(state_lib.create_train_state(params, tx, int(config.seed)), mesh)
    forward = make_distill_forward(teacher.config, student.config, dc.target_layers,
                                   str(dc.head_kind), cached_targets=cached,
                                   dtype=loop.run_dtype(config))
    step_fn = jit_distill_step(make_distill_step(forward, loss_fn, tx, labels), mesh,
                               with_teacher=not cached)
    if not cached:
        teacher_params = sharding.replicate(teacher.params["encoder"], mesh)
        teacher_step = step_fn
        step_fn = lambda st, batch: teacher_step(st, teacher_params, batch)  # noqa: E731
    head_loss = _head_loss(config)
    _, student_eval = steps_lib.jit_steps(
        lambda s, b: (s, {}),
        steps_lib.make_eval_step(
            loop.make_forward(student.config, "waveform", loop.run_dtype(config)), head_loss),
        mesh)

    run = loop.run_loop(
        state, step_fn=step_fn,
        evaluate=lambda st: loop.run_eval(student_eval, _model_params(st.params),
                                          data.eval_batches(valid_split), mesh, keys,
                                          len(valid_labels)),
        data=data, mesh=mesh, keys=train_keys, valid_labels=valid_labels, tc=tc,
        workdir=workdir, desc="distill")
    state, step, early, interrupted, ckpt = (run.state, run.step, run.early, run.interrupted,
                                             run.ckpt)

    report_dir = None
    if not interrupted and early["best_step"] is not None and tc.get("write_report", True):
        best_state, _ = ckpt.restore(int(early["best_step"]), state)
        best = _model_params(best_state.params)
        report_dir = loop.write_training_report(config, student, best, data, student_eval, mesh,
                                                keys, workdir / loop.REPORT_DIR,
                                                {**early, "stopped": run.stopped_early})
        comparison = compare(config, teacher, HAAQINet(student.config, jax.device_get(best)),
                             data, head_loss, mesh, keys, student_eval, best,
                             timing=_earlier_timing(workdir / REPORT_FILE, config,
                                                    int(early["best_step"])))
        comparison["best_step"] = int(early["best_step"])
        if sharding.is_main_process():
            (workdir / REPORT_FILE).write_text(json.dumps(metrics_lib.json_safe(comparison),
                                                          indent=2, sort_keys=True) + "\n")
            comparison_plot(comparison, workdir / PLOT_FILE)
            print(format_comparison(comparison))
    ckpt.close()
    return loop.TrainResult(workdir=workdir, final_step=step, best_step=early["best_step"],
                            best_valid_loss=early["best_valid_loss"],
                            stopped_early=run.stopped_early, interrupted=interrupted,
                            state=state, report_dir=report_dir, monitor=early["monitor"],
                            best_value=early["best_value"])


def _earlier_timing(report_file: Path, config: Any, best_step: int) -> dict[str, Any] | None:
    """The timings of an earlier distill_report.json of this run, when it timed the same best
    student with the same timing settings (a rerun of a finished run then keeps them instead of
    rewriting them with new, noisy ones); else None."""
    try:
        earlier = json.loads(report_file.read_text())
        timing = earlier["seconds_per_clip"]
        same = (earlier.get("best_step") == best_step
                and timing["clip_seconds"] == float(config.distill.get("timing_seconds", 10.0))
                and timing["repeats"] == int(config.distill.get("timing_repeats", 15)))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return timing if same else None


def compare(config: Any, teacher: Any, student: Any, data: Any, head_loss: steps_lib.LossFn,
            mesh: Any, keys, student_eval: Callable, student_params: Any, *,
            timing: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Student vs teacher: LCC, SRCC, MSE and the clip count per eval split, parameter counts,
    time per clip (`timing`, an earlier result's "seconds_per_clip", skips the timing)."""
    from haaqi_jax.train import loop

    progress = bool(config.train.get("progress", True))
    _, teacher_eval = steps_lib.jit_steps(
        lambda s, b: (s, {}),
        steps_lib.make_eval_step(
            loop.make_forward(teacher.config, "waveform", loop.run_dtype(config)), head_loss),
        mesh)
    splits = {}
    for split in loop.evaluated_splits(config):
        if split not in data.rows or not len(data.rows[split]):
            continue
        labels = loop.split_labels(data.rows[split], split)
        if progress:
            print(f"scoring teacher and student on {split} ({len(labels)} clips)",
                  file=sys.stderr)
        row = {}
        for name, fn, params in (("teacher", teacher_eval, teacher.params),
                                 ("student", student_eval, student_params)):
            _, pred = loop.run_eval(fn, params, data.eval_batches(split), mesh, keys,
                                    len(labels))
            summary = metrics_lib.summarize(pred, labels, np.isfinite(pred).astype(float))
            row[name] = {k: summary[k] for k in ("lcc", "srcc", "mse")}
        row["lcc_gap"] = row["teacher"]["lcc"] - row["student"]["lcc"]
        row["n"] = len(labels)
        splits[split] = row
    if timing is not None:
        print("inference times: kept from the earlier report of this best student (delete "
              f"{REPORT_FILE} to time again)", file=sys.stderr)
        return {"splits": splits, "params": param_counts(teacher, student),
                "seconds_per_clip": dict(timing)}
    seconds = float(config.distill.get("timing_seconds", 10.0))
    repeats = int(config.distill.get("timing_repeats", 15))
    times = time_inference({"teacher": teacher, "student": student}, seconds, repeats,
                           progress=progress)
    ratios = timing_ratios(times)
    per_clip = {"clip_seconds": seconds, "repeats": repeats,
                "ratio_model": ratios["model"]["median"],
                "ratio_encoder": ratios["encoder"]["median"], "ratios": ratios}
    for name, parts in times.items():  # medians as the headline, minima next to them
        per_clip[name] = {**{part: t["median"] for part, t in parts.items()},
                          **{f"{part}_min": t["min"] for part, t in parts.items()}}
    return {"splits": splits, "params": param_counts(teacher, student),
            "seconds_per_clip": per_clip}


def format_comparison(c: Mapping[str, Any]) -> str:
    """A small text table of `compare`'s result."""
    lines = [f"{'split':<14}{'clips':>6} {'model':<9}{'LCC':>8}{'SRCC':>8}{'MSE':>9}"]
    for split, row in c["splits"].items():
        for name in ("teacher", "student"):
            m = row[name]
            lines.append(f"{split:<14}{row.get('n', ''):>6} {name:<9}{m['lcc']:>8.4f}"
                         f"{m['srcc']:>8.4f}{m['mse']:>9.5f}")
    p, t = c["params"], c["seconds_per_clip"]
    lines.append(f"encoder parameters: teacher {p['teacher_encoder']:,}, student "
                 f"{p['student_encoder']:,} ({100 * p['encoder_reduction']:.2f} % fewer)")
    lines.append(f"whole model parameters: teacher {p['teacher_total']:,}, student "
                 f"{p['student_total']:,}")
    lines.append(f"inference per {t['clip_seconds']:g} s clip (median of {t['repeats']}, "
                 f"interleaved): teacher {t['teacher']['model']:.4f} s, student "
                 f"{t['student']['model']:.4f} s (ratio {t['ratio_model']:.3f}, of minima "
                 f"{t['ratios']['model']['min']:.3f}; encoders alone {t['ratio_encoder']:.3f})")
    return "\n".join(lines)


def comparison_plot(c: Mapping[str, Any], path: Path) -> Path:
    """`compare`'s result as a figure: per split, teacher and student LCC and SRCC as bars
    (the student's LCC target, the teacher's minus `LCC_TARGET_GAP`, as a dashed line over
    its bar; an undefined score reads n/a), the median time per clip of both encoders and
    whole models with the student/teacher ratios, and the parameter counts in the title."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    colours = {"teacher": "0.6", "student": "tab:blue"}
    width = 0.38
    splits = list(c["splits"])
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.8), dpi=120,
                             gridspec_kw={"width_ratios": [len(splits), len(splits), 2]})

    def bar(ax, x, value, model):
        if value is None or not np.isfinite(value):
            ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=7)
            return
        ax.bar(x, value, width, color=colours[model])
        ax.text(x, value, f"{value:.3f}", ha="center", va="bottom" if value >= 0 else "top",
                fontsize=7)

    for ax, metric in zip(axes[:2], ("lcc", "srcc")):
        values = []
        for i, split in enumerate(splits):
            row = c["splits"][split]
            for offset, model in ((-width / 2, "teacher"), (width / 2, "student")):
                value = row[model][metric]
                values.append(value)
                bar(ax, i + offset, value, model)
            teacher = row["teacher"][metric]
            if metric == "lcc" and teacher is not None and np.isfinite(teacher):
                ax.plot([i, i + width], [teacher - LCC_TARGET_GAP] * 2, color="black",
                        linestyle="--", linewidth=1)
        finite = [v for v in values if v is not None and np.isfinite(v)] or [0.0]
        ax.set_ylim(min(0.0, min(finite)) * 1.15, max(1.0, max(finite)) * 1.12)
        ax.set_xticks(range(len(splits)),
                      [f"{s}\n{c['splits'][s].get('n', '?')} clips" for s in splits])
        ax.set_title(metric.upper())
        ax.grid(axis="y", color="0.92")
        ax.set_axisbelow(True)
    t = c["seconds_per_clip"]
    ax = axes[2]
    for i, (part, ratio) in enumerate((("encoder", t["ratio_encoder"]),
                                       ("model", t["ratio_model"]))):
        ax.bar(i - width / 2, t["teacher"][part], width, color=colours["teacher"])
        ax.bar(i + width / 2, t["student"][part], width, color=colours["student"])
        ax.text(i + width / 2, t["student"][part], f"{ratio:.3f}x", ha="center",
                va="bottom", fontsize=7)
    ax.set_ylim(0, max(t["teacher"]["model"], t["teacher"]["encoder"]) * 1.15)
    ax.set_xticks([0, 1], ["encoder", "whole model"])
    ax.set_ylabel(f"seconds (median of {t['repeats']})", fontsize=8)
    ax.set_title(f"time per {t['clip_seconds']:g} s clip")
    p = c["params"]
    fig.suptitle(f"student vs teacher: {p['teacher_encoder'] / 1e6:.1f} M -> "
                 f"{p['student_encoder'] / 1e6:.1f} M encoder parameters "
                 f"({100 * p['encoder_reduction']:.2f} % fewer); best step "
                 f"{c.get('best_step', '?')}", fontsize=9)
    handles = [Patch(color=colours["teacher"], label="teacher"),
               Patch(color=colours["student"], label="student"),
               Line2D([], [], color="black", linestyle="--", linewidth=1,
                      label=f"teacher LCC - {LCC_TARGET_GAP} (the student's target)")]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path
