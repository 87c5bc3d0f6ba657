"""Distillation of HAAQI-Net's BEATs into distillBEATs: the step, the loop, the comparison.

    python train.py --config configs/distill.py            # the demo: teacher, then student

`distill_and_evaluate(config, workdir)` (train.py calls it when the config has a `distill`
section):
 1. the teacher: a trained HAAQI-Net directory (`distill.teacher_checkpoint`), or, when None,
    one trained first by the ordinary loop from `distill.teacher_config` into workdir/teacher
    (reused when it is already there);
 2. the student HAAQI-Net: encoder = `student_from_teacher` (teacher layers
    `distill.student_layers`), head copied from the teacher's head (`distill.head_init`), with
    the parts in `distill.frozen_head` (default BLSTM and attention) frozen; prediction heads
    (`distill.head_kind`) for the teacher layers `distill.target_layers`;
 3. training with the jitted, data-parallel `distill_step`: teacher forward frozen (an explicit
    argument outside the train state: no gradient, no optimizer state, not checkpointed), student
    forward, loss = the configured registry loss (`distill_weighted` or `distill_uncertainty`
    combining the HAAQI loss and per-layer distillation terms); validation on the student's
    HAAQI loss every epoch, early stopping, checkpoints and resumption as in
    `haaqi_jax.train.loop` (same checkpoint manager, metrics file, progress bar);
 4. the report: the student's report folder (as the teacher's) plus distill_report.json with
    student vs teacher LCC, SRCC, MSE per split, parameter counts and inference time per 10 s
    clip.

Parameters of the train state: {"encoder": student, "head": HAAQI-Net head, "pred_heads": the
prediction heads, "loss": learnable loss parameters (may be empty)}.
"""

from __future__ import annotations

import json
import os
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
TEACHER_DIR = "teacher"

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


def distill_frozen_patterns(config: Any) -> tuple[str, ...]:
    """Regexes of frozen state paths: head parts in `distill.frozen_head` plus
    `train.frozen_patterns`."""
    parts = tuple(config.distill.get("frozen_head", ()))
    return tuple(f"head/{p}/.*" for p in parts) + tuple(config.train.get("frozen_patterns", ()))

# ----------------------------------------------------------------------------- step


def make_distill_forward(teacher_cfg: Any, student_cfg: Any, target_layers, head_kind: str
                         ) -> Callable[..., dict[str, jax.Array]]:
    """(params, teacher_params, batch, rng, deterministic) -> predictions.

    predictions: clip_score (B,), frame_scores (B, T), frame_mask (B, T) True = valid,
    student_layers / teacher_layers (B, K, T, C), loss_params. The teacher encoder runs in eval
    mode under stop_gradient.
    """
    from haaqi_jax.head import HAAQINetHead
    from haaqi_jax.model import _thaw_json, encoder_padding_mask, encoder_spec
    from haaqi_jax.student import PredictionHeads

    teacher = encoder_spec("beats").build(_thaw_json(teacher_cfg.encoder_config))
    student = encoder_spec("student").build(_thaw_json(student_cfg.encoder_config))
    head = HAAQINetHead(student_cfg.head)
    heads = PredictionHeads(len(target_layers), head_kind)
    target_layers = tuple(int(i) for i in target_layers)
    feature_layers = tuple(student_cfg.feature_layers)
    weighted = student_cfg.feature_mode == "weighted"

    def forward(params, teacher_params, batch, *, rng=None, deterministic=True):
        waveform, padding_mask = batch["waveform"], batch["padding_mask"]
        valid = (~padding_mask.astype(bool)).sum(-1).astype(jnp.int32)
        enc_mask = encoder_padding_mask(valid, waveform.shape[1])
        t_out = teacher.apply({"params": teacher_params}, waveform, enc_mask, deterministic=True)
        targets = jax.lax.stop_gradient(
            jnp.stack([t_out.hidden_states[i] for i in target_layers], axis=1))
        enc_rng, head_rng = (None, None) if rng is None else jax.random.split(rng)
        s_rngs = None if deterministic or rng is None else {"dropout": enc_rng}
        h_rngs = None if deterministic or rng is None else {"dropout": head_rng}
        s_out = student.apply({"params": params["encoder"]}, waveform, enc_mask,
                              deterministic=deterministic, rngs=s_rngs)
        # encoder_padding_mask makes the encoder flag exactly the tokens past each clip.
        token_mask = ~s_out.padding_mask
        features = (jnp.stack([s_out.hidden_states[i] for i in feature_layers], axis=1)
                    if weighted else s_out.last_hidden_state)
        out = head.apply({"params": params["head"]}, features, token_mask, batch["audiogram"],
                         deterministic=deterministic, rngs=h_rngs)
        predicted = heads.apply({"params": params["pred_heads"]}, s_out.last_hidden_state)
        return {"clip_score": out.clip_score, "frame_scores": out.frame_scores,
                "frame_mask": token_mask, "student_layers": predicted,
                "teacher_layers": targets, "loss_params": params.get("loss", {})}

    return forward


def make_distill_step(forward: Callable[..., dict], loss_fn: steps_lib.LossFn,
                      tx: optax.GradientTransformation, labels: Any
                      ) -> Callable[[TrainState, Any, Mapping[str, jax.Array]], tuple]:
    """One optimizer step: (state, teacher_params, batch) -> (new state, scalar metrics).

    The teacher parameters are an argument, not part of the state: the gradient is taken
    with respect to state.params only, so nothing reaches the teacher and the optimizer holds
    no state for it. Frozen student leaves (labels) get stop_gradient and are carried over
    bit for bit, as in `haaqi_jax.train.steps.make_train_step`.
    """
    return steps_lib.make_train_step(forward, loss_fn, tx, labels)


def jit_distill_step(step: Callable, mesh: Any) -> Callable:
    """jit for data parallelism: state and teacher replicated, batch split over 'data', the
    state donated."""
    repl, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    return jax.jit(step, in_shardings=(repl, repl, data), out_shardings=(repl, repl),
                   donate_argnums=(0,))

# ----------------------------------------------------------------------------- teacher

_SHARED_DATA_KEYS = ("manifest", "demo_dir", "demo_clips", "demo_seed", "train_split",
                     "valid_split", "eval_splits", "valid_fraction", "prefetch", "bucket_pool")


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
    if not (best / "config.json").is_file():
        result = loop.train_and_evaluate(cfglib.freeze(teacher_config(config)),
                                         workdir / TEACHER_DIR)
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


def inference_seconds(net: Any, seconds: float = 10.0, repeats: int = 5, seed: int = 0
                      ) -> dict[str, float]:
    """Median wall time of a jitted, compiled forward on one clip of `seconds` (batch 1):
    {"model": encoder + head, "encoder": encoder alone}."""
    from haaqi_jax.model import HAAQINet

    net = HAAQINet(net.config, jax.device_put(net.params))  # no host transfer per call
    rng = np.random.default_rng(seed)
    wav = jnp.asarray(0.1 * rng.standard_normal((1, int(seconds * 16000))), jnp.float32)
    hl = jnp.zeros((1, 8), jnp.float32)
    module = net.module
    encoder = jax.jit(lambda p, w: module.apply({"params": p}, w, None, method="encode")[0])
    times = {}
    for name, fn in (("model", lambda: net.apply(wav, None, hl).clip_score),
                     ("encoder", lambda: encoder(net.params, wav))):
        jax.block_until_ready(fn())  # compile
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            runs.append(time.perf_counter() - start)
        times[name] = float(np.median(runs))
    return times

# ----------------------------------------------------------------------------- the loop


def _head_loss(config: Any) -> steps_lib.LossFn:
    """The HAAQI part of the configured loss (validation and reports use it alone)."""
    kwargs = cfglib.to_dict(config.loss.get("kwargs") or {})
    name, sub_kwargs = losses._named(kwargs.get("haaqi"), "haaqi_mse")
    return losses.get_loss(name, **sub_kwargs)


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
    """
    from haaqi_jax.model import HAAQINet
    from haaqi_jax.train import loop

    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    if sharding.is_main_process():
        cfglib.save_config(config, workdir / loop.CONFIG_FILE)
    tc, dc = config.train, config.distill
    if config.data.cache:
        raise ValueError("distillation trains the student encoder on waveforms: set "
                         "data.cache=False (the teacher's own run may cache)")
    mesh = sharding.make_mesh()
    sharding.check_global_batch(int(tc.batch_size), mesh)
    sharding.check_global_batch(int(tc.eval_batch_size), mesh)

    teacher = HAAQINet.load(resolve_teacher(config, workdir))
    n_teacher_layers = int(teacher.config.encoder_config["encoder_layers"])
    bad = [i for i in dc.target_layers if not 0 <= int(i) <= n_teacher_layers]
    if bad:
        raise ValueError(f"distill.target_layers {tuple(dc.target_layers)}: {bad} are not "
                         f"teacher hidden states (0..{n_teacher_layers})")
    student, pred_params = init_student(teacher, dc, int(config.seed))
    if data is None:
        data = loop.build_train_data(config, student, workdir)
    if data.mode != "waveform":
        raise ValueError(f"distillation needs waveform batches, got mode {data.mode!r}")
    keys = loop.BATCH_KEYS["waveform"]
    valid_split = config.data.valid_split
    valid_labels = loop.split_labels(data.rows[valid_split], valid_split)

    loss_kwargs = cfglib.to_dict(config.loss.get("kwargs") or {})
    loss_fn = losses.get_loss(config.loss.name, **loss_kwargs)
    params = {**student.params, "pred_heads": pred_params,
              "loss": losses.loss_params(config.loss.name, len(dc.target_layers))}
    labels = state_lib.param_labels(params, distill_frozen_patterns(config))
    total_steps = int(tc.num_epochs) * data.steps_per_epoch
    tx = state_lib.make_optimizer(config.optimizer, labels, total_steps)
    state = sharding.replicate(state_lib.create_train_state(params, tx, int(config.seed)), mesh)
    teacher_params = sharding.replicate(teacher.params["encoder"], mesh)

    forward = make_distill_forward(teacher.config, student.config, dc.target_layers,
                                   str(dc.head_kind))
    step_fn = jit_distill_step(make_distill_step(forward, loss_fn, tx, labels), mesh)
    head_loss = _head_loss(config)
    _, student_eval = steps_lib.jit_steps(
        lambda s, b: (s, {}),
        steps_lib.make_eval_step(loop.make_forward(student.config, "waveform"), head_loss), mesh)

    run = loop.run_loop(
        state, step_fn=lambda st, batch: step_fn(st, teacher_params, batch),
        evaluate=lambda st: loop.run_eval(student_eval, _model_params(st.params),
                                          data.eval_batches(valid_split), mesh, keys,
                                          len(valid_labels)),
        data=data, mesh=mesh, keys=keys, valid_labels=valid_labels, tc=tc, workdir=workdir,
        desc="distill")
    state, step, early, interrupted, ckpt = (run.state, run.step, run.early, run.interrupted,
                                             run.ckpt)

    report_dir = None
    if not interrupted and early["best_step"] is not None and tc.get("write_report", True):
        best_state, _ = ckpt.restore(int(early["best_step"]), state)
        best = _model_params(best_state.params)
        report_dir = loop.write_training_report(config, student, best, data, student_eval, mesh,
                                                keys, workdir / loop.REPORT_DIR, early)
        comparison = compare(config, teacher, HAAQINet(student.config, jax.device_get(best)),
                             data, head_loss, mesh, keys, student_eval, best)
        if sharding.is_main_process():
            (workdir / REPORT_FILE).write_text(json.dumps(metrics_lib.json_safe(comparison),
                                                          indent=2, sort_keys=True) + "\n")
            print(format_comparison(comparison))
    ckpt.close()
    return loop.TrainResult(workdir=workdir, final_step=step, best_step=early["best_step"],
                            best_valid_loss=early["best_valid_loss"],
                            stopped_early=early["stopped"], interrupted=interrupted,
                            state=state, report_dir=report_dir)


def compare(config: Any, teacher: Any, student: Any, data: Any, head_loss: steps_lib.LossFn,
            mesh: Any, keys, student_eval: Callable, student_params: Any) -> dict[str, Any]:
    """Student vs teacher: LCC, SRCC, MSE per eval split, parameter counts, time per clip."""
    from haaqi_jax.train import loop

    _, teacher_eval = steps_lib.jit_steps(
        lambda s, b: (s, {}),
        steps_lib.make_eval_step(loop.make_forward(teacher.config, "waveform"), head_loss), mesh)
    splits = {}
    for split in config.data.eval_splits:
        if split not in data.rows or not len(data.rows[split]):
            continue
        labels = loop.split_labels(data.rows[split], split)
        row = {}
        for name, fn, params in (("teacher", teacher_eval, teacher.params),
                                 ("student", student_eval, student_params)):
            _, pred = loop.run_eval(fn, params, data.eval_batches(split), mesh, keys,
                                    len(labels))
            summary = metrics_lib.summarize(pred, labels, np.isfinite(pred).astype(float))
            row[name] = {k: summary[k] for k in ("lcc", "srcc", "mse")}
        row["lcc_gap"] = row["teacher"]["lcc"] - row["student"]["lcc"]
        splits[split] = row
    seconds = float(config.distill.get("timing_seconds", 10.0))
    t_time = inference_seconds(teacher, seconds)
    s_time = inference_seconds(student, seconds)
    return {"splits": splits, "params": param_counts(teacher, student),
            "seconds_per_clip": {"clip_seconds": seconds, "teacher": t_time, "student": s_time,
                                 "ratio_model": s_time["model"] / t_time["model"],
                                 "ratio_encoder": s_time["encoder"] / t_time["encoder"]}}


def format_comparison(c: Mapping[str, Any]) -> str:
    """A small text table of `compare`'s result."""
    lines = [f"{'split':<14}{'model':<9}{'LCC':>8}{'SRCC':>8}{'MSE':>9}"]
    for split, row in c["splits"].items():
        for name in ("teacher", "student"):
            m = row[name]
            lines.append(f"{split:<14}{name:<9}{m['lcc']:>8.4f}{m['srcc']:>8.4f}"
                         f"{m['mse']:>9.5f}")
    p, t = c["params"], c["seconds_per_clip"]
    lines.append(f"encoder parameters: teacher {p['teacher_encoder']:,}, student "
                 f"{p['student_encoder']:,} ({100 * p['encoder_reduction']:.2f} % fewer)")
    lines.append(f"whole model parameters: teacher {p['teacher_total']:,}, student "
                 f"{p['student_total']:,}")
    lines.append(f"inference per {t['clip_seconds']:g} s clip: teacher "
                 f"{t['teacher']['model']:.4f} s, student {t['student']['model']:.4f} s "
                 f"(ratio {t['ratio_model']:.3f}; encoders alone {t['ratio_encoder']:.3f})")
    return "\n".join(lines)
