"""Distillation: each loss vs PyTorch on known inputs, the adaptive weighting, a user's own
loss, the distillation step (frozen parts get no gradient and no optimizer state, the teacher
gets nothing), 8 simulated devices = 1 device, the step on cached teacher targets = the step
that runs the teacher (which it never calls), and the whole job on a tiny dataset, with and
without cached targets."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from haaqi_jax import config as cfglib
from haaqi_jax import losses

REPO = Path(__file__).resolve().parents[1]
TINY_TEACHER_ENCODER = {
    "encoder_layers": 4, "encoder_embed_dim": 32, "encoder_ffn_embed_dim": 64,
    "encoder_attention_heads": 4, "embed_dim": 32, "conv_pos": 16, "conv_pos_groups": 4,
    "num_buckets": 32, "max_distance": 64}
TINY_HEAD = {"adapter_dim": 8, "lstm_hidden": 4, "dense_dim": 8, "num_heads": 2,
             "dropout_rate": 0.3}

# ----------------------------------------------------------------------------- losses


def _inputs(seed=0, b=4, k=3, t=7, c=5):
    rng = np.random.default_rng(seed)
    lengths = np.array([7, 3, 5, 1])[:b]
    mask = np.arange(t)[None, :] < lengths[:, None]
    student = rng.normal(size=(b, k, t, c)).astype(np.float32)
    teacher = rng.normal(size=(b, k, t, c)).astype(np.float32)
    teacher[0, 0, 0] = 2.0 * student[0, 0, 0]  # a token with cos = 1
    frames = rng.uniform(0, 1, (b, t)) * mask
    predictions = {"student_layers": jnp.asarray(student),
                   "teacher_layers": jnp.asarray(teacher), "frame_mask": jnp.asarray(mask),
                   "frame_scores": jnp.asarray(frames, jnp.float32),
                   "clip_score": jnp.asarray(frames.sum(1) / lengths, jnp.float32)}
    batch = {"label": jnp.asarray(rng.uniform(0, 1, b), jnp.float32),
             "weight": jnp.asarray([1.0, 1.0, 0.0, 1.0][:b], jnp.float32)}
    return predictions, batch, lengths


def _torch_layer_terms(predictions, batch, lengths, per_token):
    """Per layer: each (weighted) item alone, its valid tokens only -- the b = 1 setting."""
    student = torch.tensor(np.asarray(predictions["student_layers"]), dtype=torch.float64)
    teacher = torch.tensor(np.asarray(predictions["teacher_layers"]), dtype=torch.float64)
    weight = np.asarray(batch["weight"], np.float64)
    terms = []
    for k in range(student.shape[1]):
        items = [float(per_token(student[i, k, :lengths[i]], teacher[i, k, :lengths[i]]))
                 for i in range(student.shape[0])]
        terms.append(float(np.sum(weight * np.asarray(items)) / weight.sum()))
    return np.asarray(terms)


F = torch.nn.functional
TORCH_TERMS = {
    "l1": lambda s, t: F.l1_loss(s, t),
    "mse": lambda s, t: F.mse_loss(s, t),
    "cosine": lambda s, t: (1 - F.cosine_similarity(s, t, dim=-1)).mean(),
    "l1_cosine": lambda s, t: F.l1_loss(s, t) - 0.5 * F.logsigmoid(
        F.cosine_similarity(s, t, dim=-1)).mean(),
    # Each valid student frame classifies its own teacher frame among the item's valid ones.
    "info_nce": lambda s, t: F.cross_entropy(
        F.cosine_similarity(s[:, None], t[None], dim=-1) / 0.1, torch.arange(len(s))),
}


@pytest.mark.parametrize("name", sorted(TORCH_TERMS))
def test_distillation_losses_match_torch(name):
    predictions, batch, lengths = _inputs()
    kwargs = {"cosine_weight": 0.5} if name == "l1_cosine" else {}
    loss, aux = losses.get_loss(name, **kwargs)(predictions, batch)
    expected = _torch_layer_terms(predictions, batch, lengths, TORCH_TERMS[name])
    assert float(loss) == pytest.approx(expected.sum(), rel=1e-5)
    for k in range(3):
        assert float(aux[f"{name}_{k}"]) == pytest.approx(expected[k], rel=1e-5)
    weighted, _ = losses.get_loss(name, layer_weights=(1.0, 0.0, 2.0), **kwargs)(predictions,
                                                                                  batch)
    assert float(weighted) == pytest.approx(expected[0] + 2 * expected[2], rel=1e-5)


@pytest.mark.parametrize("name", sorted(TORCH_TERMS))
def test_zero_tokens_give_torch_gradients_not_nan(name):
    # Padded tokens of an encoder's input layer are exact zeros; one valid token is zero too.
    predictions, batch, lengths = _inputs()
    student = np.asarray(predictions["student_layers"]).copy()
    mask = np.asarray(predictions["frame_mask"])
    student[~np.broadcast_to(mask[:, None, :], student.shape[:3])] = 0.0
    student[0, 1, 2] = 0.0
    loss_fn = losses.get_loss(name, **({"cosine_weight": 0.5} if name == "l1_cosine" else {}))
    grad = np.asarray(jax.grad(lambda s: loss_fn({**predictions, "student_layers": s},
                                                 batch)[0])(jnp.asarray(student)))
    s = torch.tensor(student, dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor(np.asarray(predictions["teacher_layers"]), dtype=torch.float64)
    weight = np.asarray(batch["weight"], np.float64)
    total = sum(weight[i] * TORCH_TERMS[name](s[i, k, :lengths[i]], teacher[i, k, :lengths[i]])
                for k in range(s.shape[1]) for i in range(s.shape[0])) / weight.sum()
    total.backward()
    assert np.isfinite(grad).all()
    np.testing.assert_allclose(grad, s.grad.numpy(), rtol=1e-4, atol=1e-7)


def test_filler_items_and_padding_do_not_count():
    predictions, batch, _ = _inputs()
    changed = dict(predictions)
    noise = np.asarray(predictions["student_layers"]).copy()
    noise[2] += 100.0                      # the weight-0 item
    noise[1, :, 3:] += 100.0               # padded tokens of item 1
    changed["student_layers"] = jnp.asarray(noise)
    teacher = np.asarray(predictions["teacher_layers"]).copy()
    teacher[1, :, 3:] = np.asarray(predictions["student_layers"])[1, :, :3].mean(1)[:, None]
    changed["teacher_layers"] = jnp.asarray(teacher)  # padded teacher frames: no candidates
    for name in TORCH_TERMS:
        a, _ = losses.get_loss(name)(predictions, batch)
        b, _ = losses.get_loss(name)(changed, batch)
        assert float(a) == pytest.approx(float(b), rel=1e-6), name


def test_info_nce_temperature_must_be_positive():
    predictions, batch, _ = _inputs()
    for bad in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"info_nce: temperature must be a number > 0"):
            losses.get_loss("info_nce", temperature=bad)(predictions, batch)
    for bad in (True, "0.1"):
        with pytest.raises(ValueError, match=r"keyword 'temperature' takes a number"):
            losses.get_loss("info_nce", temperature=bad)(predictions, batch)
    sharp, _ = losses.get_loss("info_nce", temperature=0.05)(predictions, batch)
    assert np.isfinite(float(sharp))


def test_distill_weighted_and_uncertainty():
    predictions, batch, lengths = _inputs()
    haaqi, _ = losses.get_loss("haaqi_mse")(predictions, batch)
    per_layer = _torch_layer_terms(predictions, batch, lengths, TORCH_TERMS["l1_cosine"])
    spec = {"haaqi": {"name": "haaqi_mse"},
            "distill": {"name": "l1_cosine", "kwargs": {"cosine_weight": 0.5}}}
    loss, aux = losses.get_loss("distill_weighted", haaqi_weight=2.0, distill_weight=0.5,
                                layer_weights=(1.0, 1.0, 3.0), **spec)(predictions, batch)
    expected = 2.0 * float(haaqi) + 0.5 * (per_layer[0] + per_layer[1] + 3 * per_layer[2])
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # The logged distillation loss is the weighted sum of the layer terms the total uses.
    assert float(aux["distill_loss"]) == pytest.approx(
        per_layer[0] + per_layer[1] + 3 * per_layer[2], rel=1e-5)
    # Each layer's L1 and cosine parts are logged, not only their sum.
    for k in range(3):
        assert float(aux[f"distill_{k}/l1"]) + 0.5 * float(aux[f"distill_{k}/cos"]) == \
            pytest.approx(float(aux[f"distill_{k}"]), rel=1e-5)
        assert float(aux[f"distill_{k}/l1_cosine"]) == pytest.approx(per_layer[k], rel=1e-5)

    log_vars = jnp.asarray([0.5, -1.0, 0.0, 2.0])
    assert losses.loss_params("distill_uncertainty", 3)["log_vars"].shape == (4,)
    assert losses.loss_params("distill_weighted", 3) == {}
    fn = losses.get_loss("distill_uncertainty", **spec)
    loss, aux = fn({**predictions, "loss_params": {"log_vars": log_vars}}, batch)
    terms = np.concatenate([[float(haaqi)], per_layer])
    s = np.asarray(log_vars, np.float64)
    assert float(loss) == pytest.approx(np.sum(np.exp(-s) * terms + s), rel=1e-5)
    # d/ds_i = 1 - exp(-s_i) L_i: the learned weights move towards 1 / L_i.
    grad = jax.grad(lambda lv: fn({**predictions, "loss_params": {"log_vars": lv}}, batch)[0])(
        log_vars)
    np.testing.assert_allclose(np.asarray(grad), 1 - np.exp(-s) * terms, rtol=1e-4)
    # Below min_log_var (-10) a log-variance is held there: the loss uses -10 and its gradient
    # is 0, so a term that reaches ~0 cannot get an unbounded weight.
    low = jnp.asarray([-12.0, -1.0, 0.0, 2.0])
    loss = fn({**predictions, "loss_params": {"log_vars": low}}, batch)[0]
    held = np.maximum(np.asarray(low, np.float64), -10.0)
    assert float(loss) == pytest.approx(np.sum(np.exp(-held) * terms + held), rel=1e-5)
    grad = jax.grad(lambda lv: fn({**predictions, "loss_params": {"log_vars": lv}}, batch)[0])(
        low)
    assert float(grad[0]) == 0.0
    np.testing.assert_allclose(np.asarray(grad[1:]), 1 - np.exp(-held[1:]) * terms[1:],
                               rtol=1e-4)


def test_user_registered_loss_is_selectable_by_name():
    """A loss registered from user code (no library edit) is picked by the config and gives
    per-layer terms inside the combined loss."""

    @losses.register_loss("test_user_max_abs", overwrite=True)
    def max_abs(predictions, batch, *, scale=1.0):
        diff = jnp.abs(predictions["student_layers"] - predictions["teacher_layers"])
        mask = predictions["frame_mask"][:, None, :, None]
        value = scale * jnp.max(jnp.where(mask, diff, 0.0))
        return value, {"max_abs": value}

    predictions, batch, lengths = _inputs()
    cfg = cfglib.ConfigDict({"name": "distill_weighted", "kwargs": {
        "distill": {"name": "test_user_max_abs", "kwargs": {"scale": 2.0}}}})
    fn = losses.get_loss(cfg.name, **cfglib.to_dict(cfg.kwargs))
    loss, aux = fn(predictions, batch)
    diff = np.abs(np.asarray(predictions["student_layers"]) -
                  np.asarray(predictions["teacher_layers"]))
    mask = np.asarray(predictions["frame_mask"])
    expected = [2.0 * max(diff[i, k, :lengths[i]].max() for i in range(4)) for k in range(3)]
    for k in range(3):
        assert float(aux[f"distill_{k}"]) == pytest.approx(expected[k], rel=1e-6)
        assert float(aux[f"distill_{k}/max_abs"]) == pytest.approx(expected[k], rel=1e-6)
    haaqi, _ = losses.get_loss("haaqi_mse")(predictions, batch)
    assert float(loss) == pytest.approx(float(haaqi) + sum(expected), rel=1e-6)
    with pytest.raises(ValueError, match="already registered"):
        losses.register_loss("test_user_max_abs")(lambda p, b: (0.0, {}))
    with pytest.raises(ValueError, match="unknown loss 'nope'"):
        losses.get_loss("distill_weighted", distill="nope")(predictions, batch)
    assert mask.any()

    # A loss that forgets to reduce is named, at trace time, instead of a stacking error.
    @losses.register_loss("test_user_unreduced", overwrite=True)
    def unreduced(predictions, batch):
        return jnp.abs(predictions["student_layers"] - predictions["teacher_layers"]).mean(
            (1, 2, 3)), {}

    with pytest.raises(ValueError, match=r"loss 'test_user_unreduced' returned a loss of shape "
                                         r"\(4,\); expected a scalar"):
        losses.get_loss("distill_weighted", distill="test_user_unreduced")(predictions, batch)

def test_a_sub_loss_with_learnable_parameters_is_refused_by_name():
    """A distillation objective hands its sub-losses no parameters of their own (the train
    state holds only the objective's, loss.name's): a user's loss registered with params (say
    a learned InfoNCE temperature) and named as loss.kwargs.distill would never be trained.
    It is refused before training, naming the key, not met at trace time as a "missing key"
    (or, under distill_uncertainty, handed the objective's log_vars)."""

    @losses.register_loss("test_user_learned_scale", overwrite=True,
                          params=lambda num_targets: {"log_scale": jnp.zeros(())})
    def learned_scale(predictions, batch):
        scale = jnp.exp(predictions["loss_params"]["log_scale"])
        return scale * jnp.mean(predictions["student_layers"]), {}

    for objective in ("distill_weighted", "distill_uncertainty"):
        for key in ("distill", "haaqi"):
            with pytest.raises(ValueError, match=rf"loss.kwargs.{key}: loss "
                                                 r"'test_user_learned_scale' has learnable"):
                losses.check_loss_config(objective, {key: "test_user_learned_scale"},
                                         num_targets=3)
    predictions, batch, _ = _inputs()
    predictions["loss_params"] = {"log_vars": jnp.zeros((4,))}
    with pytest.raises(ValueError, match="'test_user_learned_scale' has learnable"):
        losses.get_loss("distill_uncertainty", distill="test_user_learned_scale")(predictions,
                                                                                  batch)


# ----------------------------------------------------------------------------- the step


def _tiny_setup(seed=0, frozen_head=("blstm", "attention"), loss="distill_uncertainty",
                optimizer="adam"):
    """A random tiny teacher HAAQI-Net, its student, a train state, a batch of 8 waveforms."""
    from haaqi_jax import distill
    from haaqi_jax.head import HeadConfig
    from haaqi_jax.model import HAAQINet, HAAQINetConfig
    from haaqi_jax.train import state as state_lib

    teacher = HAAQINet.init_random(HAAQINetConfig(
        encoder_config={**_released(), **TINY_TEACHER_ENCODER}, head=HeadConfig(**TINY_HEAD)),
        seed=seed)
    dcfg = cfglib.ConfigDict({"student_layers": (0, 1), "target_layers": (2, 4),
                              "head_kind": "sequential", "shared_position_bias": False,
                              "feature_mode": "weighted", "head_init": "teacher",
                              "frozen_head": frozen_head})
    student, pred = distill.init_student(teacher, dcfg, seed)
    cfg = cfglib.ConfigDict({"distill": dcfg, "train": {"frozen_patterns": ()}})
    params = {**student.params, "pred_heads": pred, "loss": losses.loss_params(loss, 2)}
    labels = state_lib.param_labels(params, distill.distill_frozen_patterns(cfg))
    opt = cfglib.ConfigDict({"name": optimizer, "learning_rate": 1e-2})
    tx = state_lib.make_optimizer(opt, labels, 10)
    state = state_lib.create_train_state(params, tx, seed)
    loss_fn = losses.get_loss(loss, distill="l1_cosine")
    forward = distill.make_distill_forward(teacher.config, student.config, (2, 4), "sequential")
    rng = np.random.default_rng(seed)
    lengths = np.array([8000, 6000, 8000, 6500, 7000, 8000, 6000, 7500])
    wav = np.clip(0.2 * rng.normal(size=(8, 8000)), -1, 1).astype(np.float32)
    pad = np.arange(8000)[None, :] >= lengths[:, None]
    wav[pad] = 0
    batch = {"waveform": wav, "padding_mask": pad,
             "audiogram": rng.uniform(0, 60, (8, 8)).astype(np.float32),
             "label": rng.uniform(0, 1, 8).astype(np.float32),
             "weight": np.array([1, 1, 1, 1, 1, 1, 1, 0], np.float32)}
    return teacher, student, state, labels, tx, loss_fn, forward, batch


def _released():
    from haaqi_jax.beats import RELEASED_CONFIG
    return dict(RELEASED_CONFIG)


@pytest.fixture(scope="module")
def tiny_setup():
    return _tiny_setup()


def test_student_starts_as_teacher_copy_with_head_from_teacher(tiny_setup):
    teacher, student, state, *_ = tiny_setup
    head_t, head_s = teacher.params["head"], state.params["head"]
    for part in ("adapter", "blstm", "dense", "attention", "frame_score"):
        for a, b in zip(jax.tree_util.tree_leaves(head_t[part]),
                        jax.tree_util.tree_leaves(head_s[part])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=part)
    assert "layer_weights" in head_s and "layer_weights" not in head_t  # weighted: fresh
    np.testing.assert_array_equal(
        np.asarray(state.params["encoder"]["layers_1"]["fc1"]["kernel"]),
        np.asarray(teacher.params["encoder"]["layers_1"]["fc1"]["kernel"]))


def test_targets_are_the_teachers_hidden_states_of_the_target_layers(tiny_setup):
    """target_layers (2, 4) -> the teacher BEATs' hidden states 2 and 4 (0 = the layers'
    input, as speechbrain's BEATs numbers them: test_beats), on the batch's valid tokens."""
    from haaqi_jax import distill
    from haaqi_jax.model import _thaw_json, encoder_padding_mask, encoder_spec

    teacher, student, state, _, _, _, forward, batch = tiny_setup
    predictions = forward(state.params, teacher.params["encoder"], batch, rng=None,
                          deterministic=True)
    beats = encoder_spec("beats").build(_thaw_json(teacher.config.encoder_config))
    valid = (~batch["padding_mask"]).sum(-1)
    out = beats.apply({"params": teacher.params["encoder"]}, jnp.asarray(batch["waveform"]),
                      encoder_padding_mask(jnp.asarray(valid), batch["waveform"].shape[1]))
    mask = np.asarray(predictions["frame_mask"])[:, :, None]
    for k, layer in enumerate((2, 4)):
        np.testing.assert_allclose(np.asarray(predictions["teacher_layers"][:, k]) * mask,
                                   np.asarray(out.hidden_states[layer]) * mask, atol=1e-5)
    assert not np.allclose(np.asarray(out.hidden_states[1]) * mask,
                           np.asarray(out.hidden_states[2]) * mask, atol=1e-3)


def test_distill_step_freezes_frozen_parts(tiny_setup):
    """Frozen head parts get no update and no optimizer state; the teacher is an argument of
    the step, outside the state, so it has neither."""
    from haaqi_jax import distill
    from haaqi_jax.train.state import FROZEN

    teacher, _, state, labels, tx, loss_fn, forward, batch = tiny_setup
    leaves = list(zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(labels)))
    trainable = sum(int(np.size(x)) for x, label in leaves if label != FROZEN)
    assert any(label == FROZEN for _, label in leaves)
    opt_scalars = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(state.opt_state)
                      if np.ndim(x) > 0)
    assert opt_scalars == 2 * trainable  # Adam: mu and nu of trainable leaves, nothing else

    step = jax.jit(distill.make_distill_step(forward, loss_fn, tx, labels))
    before = jax.tree_util.tree_map(np.asarray, state.params)
    new_state, metrics = step(state, teacher.params["encoder"], batch)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    for (path, old), new, label in zip(jax.tree_util.tree_flatten_with_path(before)[0],
                                       jax.tree_util.tree_leaves(new_state.params),
                                       jax.tree_util.tree_leaves(labels)):
        name = jax.tree_util.keystr(path)
        if label == FROZEN:
            np.testing.assert_array_equal(np.asarray(new), old, err_msg=name)
        elif "head" in name and "blstm" not in name:
            assert not np.array_equal(np.asarray(new), old), name
    assert set(jax.tree_util.tree_leaves(labels["head"]["blstm"])) == {FROZEN}
    assert set(jax.tree_util.tree_leaves(labels["head"]["attention"])) == {FROZEN}
    assert FROZEN not in jax.tree_util.tree_leaves(labels["encoder"])


_DEVICES_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    import jax, numpy as np
    from test_distill import _tiny_setup
    from haaqi_jax import distill
    from haaqi_jax.train import sharding
    assert jax.device_count() == 8
    out = {{}}
    # SGD: the update is linear in the gradient (Adam's first step, g / (|g| + eps), turns
    # summation-order noise in near-zero gradients into large relative differences).
    teacher, _, state0, labels, tx, loss_fn, forward, batch = _tiny_setup(optimizer="sgd")
    host_state = jax.tree_util.tree_map(np.asarray, state0)
    for n in (1, 8):
        mesh = sharding.make_mesh(jax.devices()[:n])
        step = distill.jit_distill_step(distill.make_distill_step(forward, loss_fn, tx, labels),
                                        mesh)
        state = sharding.replicate(host_state, mesh)
        new, metrics = step(state, sharding.replicate(teacher.params["encoder"], mesh),
                            sharding.shard_batch(batch, mesh))
        out[n] = {{"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
                   "params": [np.asarray(x).ravel()[:50].tolist()
                              for x in jax.tree_util.tree_leaves(new.params)]}}
    # The target cache's teacher pass, 3 rows over all 8 devices (5 filled rows dropped).
    jitted, spread = distill._jitted_target_encoder, []
    def spy(*key):
        encode = jitted(*key)
        return lambda params, wave, pad: spread.append(len(wave.sharding.device_set)) or \
            encode(params, wave, pad)
    distill._jitted_target_encoder = spy
    targets, token_pad = distill.make_target_encode_fn(teacher, (1, 2))(
        batch["waveform"][:3], batch["padding_mask"][:3])
    out["targets"] = {{"values": targets.tolist(), "token_pad": token_pad.tolist(),
                      "spread": spread}}
    print("RESULT" + json.dumps(out))
""")


def test_eight_simulated_devices_equal_one():
    """A distillation step, and the target cache's teacher pass, split over 8 devices equal
    one device."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest",
               PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, "-c",
                           _DEVICES_SCRIPT.format(tests=str(REPO / "tests"))],
                          env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
    out = json.loads(line[len("RESULT"):])
    one, eight = out["1"], out["8"]
    assert eight["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert eight["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)
    for a, b in zip(one["params"], eight["params"]):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    from haaqi_jax import distill
    teacher, *_, batch = _tiny_setup(optimizer="sgd")
    targets, token_pad = distill.make_target_encode_fn(teacher, (1, 2))(
        batch["waveform"][:3], batch["padding_mask"][:3])
    assert targets.shape[:2] == (3, 2) and out["targets"]["spread"] == [8]
    np.testing.assert_allclose(out["targets"]["values"], targets, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(out["targets"]["token_pad"], token_pad)

# ----------------------------------------------------------------------------- cached targets


def _target_rows(tmp_path):
    """The train rows of a tiny dataset: 6 clips of 0.8-1 s (one bucket, 16000 samples)."""
    from haaqi_jax.data.manifest import read_manifest, split_rows
    manifest = _write_dataset(tmp_path / "data")
    return split_rows(read_manifest(manifest, require_label=True))["train"]


def _target_config(tmp_path, dtype):
    return cfglib.ConfigDict({
        "distill": {"target_layers": (2, 4), "target_cache_dir": str(tmp_path / "targets"),
                    "target_cache_dtype": dtype},
        "data": {"encode_batch_size": 4}})


def test_cached_target_step_equals_teacher_step(tmp_path, tiny_setup, monkeypatch):
    """Targets from the disk cache give the step of the teacher-running step (exactly with a
    float32 cache, to float16 rounding with a float16 one), and that step never calls the
    teacher."""
    from haaqi_jax import distill
    from haaqi_jax.data.cache import add_cached_targets
    from haaqi_jax.data.pipeline import InputConfig, make_train_iterator
    from haaqi_jax.model import tokens_for_samples
    from haaqi_jax.train import state as state_lib

    teacher, student, adam_state, labels, _, loss_fn, _, _ = tiny_setup
    # SGD: the update is the gradient (Adam's first step turns rounding noise in near-zero
    # gradients, e.g. of the attention key biases, into full-size steps).
    tx = state_lib.make_optimizer(cfglib.ConfigDict({"name": "sgd", "learning_rate": 1e-2}),
                                  labels, 10)
    state = state_lib.create_train_state(adam_state.params, tx, 0)
    rows = _target_rows(tmp_path)
    calls = []
    real_targets = distill._teacher_targets
    monkeypatch.setattr(distill, "_teacher_targets",
                        lambda *a, **k: calls.append(1) or real_targets(*a, **k))
    with_teacher = jax.jit(distill.make_distill_step(
        distill.make_distill_forward(teacher.config, student.config, (2, 4), "sequential"),
        loss_fn, tx, labels))
    # No teacher config, no teacher parameters: nothing of the teacher can run.
    cached = jax.jit(distill.make_distill_step(
        distill.make_distill_forward(None, student.config, (2, 4), "sequential",
                                     cached_targets=True), loss_fn, tx, labels))
    caches = {dtype: distill.build_target_cache(teacher, _target_config(tmp_path, dtype),
                                                rows, tmp_path)
              for dtype in ("float32", "float16")}
    # float32 batches of both (the float16 values exactly): one compiled cached step.
    iterators = {dtype: add_cached_targets(
        make_train_iterator(rows, InputConfig(batch_size=4, prefetch=0, seed=3)), cache, rows,
        tokens_for_samples, dtype=np.float32) for dtype, cache in caches.items()}
    built = len(calls)  # building the caches ran the teacher
    for _ in range(2):  # a full batch, then one with 2 weight-0 fillers
        batches = {dtype: next(it) for dtype, it in iterators.items()}
        plain = {k: v for k, v in batches["float32"].items() if k != "targets"}
        ref_state, ref = with_teacher(state, teacher.params["encoder"], plain)
        assert len(calls) > built  # the counter sees the teacher (traced once)
        n_calls = len(calls)
        for dtype, batch in batches.items():
            assert batch["targets"].dtype == np.float32
            assert batch["targets"].shape == (4, 2, tokens_for_samples(16000), 32)
            np.testing.assert_array_equal(batch["waveform"], plain["waveform"])
            new_state, got = cached(state, batch)
            assert len(calls) == n_calls  # the cached step never traced the teacher
            leaves = zip(jax.tree_util.tree_flatten_with_path(ref_state.params)[0],
                         jax.tree_util.tree_leaves(new_state.params),
                         jax.tree_util.tree_leaves(state.params))
            if dtype == "float32":
                # The same targets, but two compiled programs: XLA may fuse the teacher-running
                # one differently, and on some CPUs the float32 sums then differ in the last
                # bit (grad_norm by 1 ulp on the project's current VM), so equal to rounding.
                for key in ref:
                    assert float(got[key]) == pytest.approx(float(ref[key]), rel=1e-6,
                                                            abs=1e-9), key
                for (path, a), b, _ in leaves:
                    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6,
                                               atol=1e-9, err_msg=jax.tree_util.keystr(path))
                continue
            for key in ref:
                assert float(got[key]) == pytest.approx(float(ref[key]), rel=2e-3, abs=1e-6)
            for (path, a), b, before in leaves:  # updates (-lr * gradient) to float16 rounding
                step_ref = np.asarray(a) - np.asarray(before)
                np.testing.assert_allclose(np.asarray(b) - np.asarray(before), step_ref, rtol=0,
                                           atol=1e-2 * np.abs(step_ref).max() + 1e-9,
                                           err_msg=jax.tree_util.keystr(path))
    assert np.asarray(batch["weight"]).tolist() == [1, 1, 0, 0]
    assert not np.asarray(batch["targets"][2:]).any()  # fillers: zeros, weight 0


def test_target_cache_resumes_and_refuses_crops(tmp_path, tiny_setup):
    """The target cache is built once per clip (a build resumes), keyed by the target layers;
    target batches resume like waveform batches; crops and unknown clips are refused."""
    from haaqi_jax import distill
    from haaqi_jax.data.cache import add_cached_targets
    from haaqi_jax.data.pipeline import InputConfig, make_train_iterator
    from haaqi_jax.model import tokens_for_samples

    teacher = tiny_setup[0]
    rows = _target_rows(tmp_path)
    config = _target_config(tmp_path, "float16")
    first = distill.build_target_cache(teacher, config, rows[:3], tmp_path)
    index = first.directory / "index.jsonl"
    assert len(index.read_text().splitlines()) == 3
    cache = distill.build_target_cache(teacher, config, rows, tmp_path)  # resumes
    assert cache.directory == first.directory
    assert len(index.read_text().splitlines()) == len(rows)
    other_layers = _target_config(tmp_path, "float16")
    other_layers.distill.target_layers = (1, 4)
    assert distill.build_target_cache(teacher, other_layers, rows[:1],
                                      tmp_path).directory != first.directory

    in_cfg = InputConfig(batch_size=2, prefetch=0, seed=5)
    make = lambda: add_cached_targets(make_train_iterator(rows, in_cfg), cache, rows,  # noqa
                                      tokens_for_samples)
    reference = make()
    expected = [next(reference) for _ in range(5)]
    it = make()
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    resumed = make()
    resumed.set_state(state)
    for want in expected[3:]:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)

    cropped = make_train_iterator(rows, dataclasses.replace(in_cfg, crop_seconds=0.5))
    with pytest.raises(ValueError, match="cached targets belong to whole clips"):
        next(add_cached_targets(cropped, cache, rows, tokens_for_samples))
    with pytest.raises(ValueError, match="'new'.*not in the feature cache"):
        add_cached_targets(cropped, cache, rows + [dataclasses.replace(rows[0], id="new")],
                           tokens_for_samples)
    crop_config = cfglib.ConfigDict({"data": {"crop_seconds": 0.5}})
    with pytest.raises(ValueError, match="cache_targets=True needs data.crop_seconds=None"):
        distill.with_cached_targets(crop_config, teacher, None, tmp_path)


# ----------------------------------------------------------------------------- the job


def _write_dataset(out_dir, n=(6, 2, 2, 2), seconds=1.0, seed=0):
    """Noisy tones; the label is a logistic function of the SNR (independent of any model)."""
    import soundfile as sf
    out_dir = Path(out_dir)
    (out_dir / "audio").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i, split in enumerate(sum(([s] * k for s, k in zip(
            ("train", "valid", "test_seen", "test_unseen"), n)), [])):
        m = int(seconds * 16000 * rng.uniform(0.8, 1.0))
        clean = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 800) * np.arange(m) / 16000)
        snr = rng.uniform(-10, 30)
        x = clean + rng.standard_normal(m) * np.sqrt(np.mean(clean ** 2) / 10 ** (snr / 10))
        sf.write(out_dir / "audio" / f"c{i}.wav", x.astype(np.float32), 16000, subtype="FLOAT")
        rows.append({"id": f"c{i}", "file_path": f"audio/c{i}.wav", "split": split,
                     "audiogram": [float(v) for v in rng.uniform(0, 60, 8)],
                     "haaqi_score": float(1 / (1 + np.exp(-(snr - 10) / 6)))})
    (out_dir / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out_dir / "manifest.jsonl"


def _train_script():
    import importlib.util
    spec = importlib.util.spec_from_file_location("_train_script", REPO / "train.py")
    train_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_script)
    return train_script


def _argv(workdir, sets):
    argv = ["--config", str(REPO / "configs" / "distill.py"), "--workdir", str(workdir),
            "--compilation-cache", "none"]  # in-process: leave JAX's global config alone
    for s in sets:
        argv += ["--set", s]
    return argv


def _train_records(workdir):
    records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "train"]


@pytest.fixture(scope="module")
def distill_job(tmp_path_factory):
    """train.py --config configs/distill.py (shrunk): the teacher trained first, the student
    distilled with an interruption after 2 steps (checkpointed), then resumed to the end."""
    tmp_path = tmp_path_factory.mktemp("job")
    manifest = _write_dataset(tmp_path / "data")
    sets = [f"data.manifest={manifest}", "data.prefetch=0", "train.batch_size=2",
            "train.eval_batch_size=2", "train.num_epochs=2", "train.patience=0",
            "train.progress=False", "train.checkpoint_every_steps=2", "train.log_every_steps=1",
            "distill.student_layers=(0, 1)", "distill.target_layers=(2, 4)",
            "distill.timing_seconds=1.0", "distill.timing_repeats=3",
            f"distill.teacher.data.cache_dir={tmp_path / 'cache'}",
            "distill.teacher.train.num_epochs=1", "distill.teacher.train.batch_size=2",
            "distill.teacher.train.eval_batch_size=2", "distill.teacher.data.prefetch=0"]
    sets += [f"distill.teacher.model.encoder_config.{k}={v}"
             for k, v in TINY_TEACHER_ENCODER.items()]
    sets += [f"distill.teacher.model.head.{k}={v}" for k, v in TINY_HEAD.items()]
    workdir = tmp_path / "run"
    train_script = _train_script()
    assert train_script.main(_argv(workdir, sets + ["train.stop_after_steps=2"])) == 0
    interrupted_report = (workdir / "distill_report.json").exists()
    assert train_script.main(_argv(workdir, sets)) == 0
    return {"workdir": workdir, "sets": sets, "interrupted_report": interrupted_report,
            "train_script": train_script}


def test_distillation_job_end_to_end(distill_job):
    """Teacher trained first, student distilled (resumed once), reports written, the student
    loadable as a HAAQI-Net."""
    from haaqi_jax.model import HAAQINet

    workdir = distill_job["workdir"]
    assert not distill_job["interrupted_report"]
    report = json.loads((workdir / "distill_report.json").read_text())
    assert set(report["splits"]) == {"valid", "test_seen", "test_unseen"}
    for row in report["splits"].values():
        assert set(row["student"]) == {"lcc", "srcc", "mse"}
    assert report["params"]["student_encoder"] < report["params"]["teacher_encoder"]
    timing = report["seconds_per_clip"]
    assert timing["repeats"] == 3 and 0 < timing["student"]["model_min"]
    assert timing["student"]["model_min"] <= timing["student"]["model"]
    assert set(timing["ratios"]["model"]) == {"min", "median", "paired_median"}
    train_records = _train_records(workdir)
    assert [r["step"] for r in train_records] == list(range(1, 7))  # 3 steps x 2 epochs, once
    assert {"haaqi_loss", "distill_0", "distill_1", "weight_0"} <= set(train_records[0])
    net = HAAQINet.load(workdir / "report" / "best_model")
    assert net.config.encoder_kind == "student"
    assert (workdir / "teacher" / "report" / "best_model" / "config.json").is_file()
    import matplotlib.image
    assert matplotlib.image.imread(workdir / "distill_report.png").ndim == 3
    assert not (workdir / "target_cache").exists()  # cache_targets is off by default


def test_two_processes_distil_as_one(distill_job, tmp_path):
    """The distillation job as two processes of one CPU device each (`train.py
    --coordinator`): the teacher's feature cache built once by process 0, the teacher trained
    and its report written before either process reads the teacher's best_model, then the
    student: the same losses and scores as the one-process job, one report."""
    from processes import run_train_processes

    sets = [s for s in distill_job["sets"] if not s.startswith("distill.teacher.data.cache_dir=")]
    sets.append(f"distill.teacher.data.cache_dir={tmp_path / 'shared_cache'}")
    work = tmp_path / "run"
    _, outputs = run_train_processes(REPO / "configs" / "distill.py", work, sets,
                                     tmp_path / "jax_cache")
    assert "report in" in outputs[0] and "report in" not in outputs[1]
    one, two = (_train_records(w) for w in (distill_job["workdir"], work))
    assert [r["step"] for r in one] == [r["step"] for r in two]
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-4)
    reports = [json.loads((w / "distill_report.json").read_text())
               for w in (distill_job["workdir"], work)]
    for split, row in reports[0]["splits"].items():
        for model in ("teacher", "student"):
            np.testing.assert_allclose(reports[1]["splits"][split][model]["mse"],
                                       row[model]["mse"], rtol=1e-4, err_msg=(split, model))


def test_rerun_of_a_finished_distillation_keeps_its_timings(distill_job, capsys):
    """A rerun of the finished job rescores but keeps the earlier inference times (new ones
    would be new noise), and `haaqi-jax compare` shows the student-vs-teacher table."""
    from haaqi_jax import cli

    workdir = distill_job["workdir"]
    before = json.loads((workdir / "distill_report.json").read_text())
    assert {s: row["n"] for s, row in before["splits"].items()} == {
        "valid": 2, "test_seen": 2, "test_unseen": 2}     # the clips of _write_dataset
    assert distill_job["train_script"].main(_argv(workdir, distill_job["sets"])) == 0
    printed = capsys.readouterr()
    assert "inference times: kept from the earlier report" in printed.err
    # train.py ends with each split's scores (2 clips each: too few to correlate).
    assert "LCC / SRCC: test_seen n/a / n/a, test_unseen n/a / n/a, valid n/a / n/a" \
        in printed.out
    after = json.loads((workdir / "distill_report.json").read_text())
    assert after["seconds_per_clip"] == before["seconds_per_clip"]
    assert after["best_step"] == before["best_step"]

    assert cli.main(["compare", str(workdir), "--splits", "valid"]) == 0
    out = capsys.readouterr().out
    valid = after["splits"]["valid"]
    cell = lambda v: "n/a" if v is None else f"{v:.4f}"      # noqa: E731 (2 clips: no LCC)
    assert (f"| valid | run | {cell(valid['teacher']['lcc'])} | {cell(valid['student']['lcc'])} "
            f"| {cell(valid['lcc_gap'])} |") in out
    assert f"{100 * after['params']['encoder_reduction']:.2f} % fewer" in out


def test_a_distillation_follows_train_monitor(distill_job, tmp_path, capsys):
    """train.monitor=lcc for the student (from the job's teacher): 2 validation clips have no
    LCC (NaN) in any epoch, so the first epoch stays the best step (best_value null) and the
    report is written; train.py names the monitored quantity."""
    workdir = tmp_path / "run"
    teacher = distill_job["workdir"] / "teacher" / "report" / "best_model"
    sets = distill_job["sets"] + [f"distill.teacher_checkpoint={teacher}", "train.monitor=lcc"]
    assert distill_job["train_script"].main(_argv(workdir, sets)) == 0
    assert "best valid lcc undefined (train.monitor) at step 3, valid loss" \
        in capsys.readouterr().out
    valid = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()
             if '"valid"' in l]
    assert [(r["lcc"], r["best"]) for r in valid] == [(None, True), (None, False)]
    summary = json.loads((workdir / "report" / "training.json").read_text())
    assert (summary["monitor"], summary["best_value"], summary["best_step"]) == ("lcc", None, 3)
    assert summary["best_valid_loss"] == valid[0]["loss"]
    assert json.loads((workdir / "distill_report.json").read_text())["best_step"] == 3


def test_distillation_job_with_cached_targets(distill_job, tmp_path):
    """The same job with distill.cache_targets (teacher from the first job's checkpoint):
    targets encoded once per train clip, and the training steps equal the teacher-running
    job's to float16 rounding."""
    train_script = distill_job["train_script"]
    teacher = distill_job["workdir"] / "teacher" / "report" / "best_model"
    sets = distill_job["sets"] + [f"distill.teacher_checkpoint={teacher}",
                                  "distill.cache_targets=True"]
    workdir = tmp_path / "cached"
    sets += ["train.write_report=False"]  # the first job tests the reports
    assert train_script.main(_argv(workdir, sets)) == 0
    (index,) = (workdir / "target_cache").glob("*/index.jsonl")
    assert len(index.read_text().splitlines()) == 6  # the 6 train clips, encoded once
    cached, ref = _train_records(workdir), _train_records(distill_job["workdir"])
    assert [r["step"] for r in cached] == list(range(1, 7))
    for a, b in zip(cached[:2], ref[:2]):
        for key in ("loss", "haaqi_loss", "distill_0", "distill_1", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=5e-3), (a["step"], key)


def test_a_teacher_checkpoint_at_odds_with_itself_is_named(distill_job, tmp_path, capsys):
    """A teacher folder whose config.json and params disagree: the error names the setting and
    the folder, not only a parameter shape."""
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(distill_job["workdir"] / "teacher" / "report" / "best_model", teacher)
    meta = json.loads((teacher / "config.json").read_text())
    meta["config"]["encoder_config"]["encoder_embed_dim"] = 64
    (teacher / "config.json").write_text(json.dumps(meta))
    sets = distill_job["sets"] + [f"distill.teacher_checkpoint={teacher}"]
    assert distill_job["train_script"].main(_argv(tmp_path / "run", sets)) == 2
    assert f"distill.teacher_checkpoint ({teacher}): " in capsys.readouterr().err
    # A teacher on another encoder (the default run's model) failed with a KeyError traceback
    # after the workdir was written.
    meta["config"]["encoder_kind"] = "fbank_patches"
    (teacher / "config.json").write_text(json.dumps(meta))
    assert distill_job["train_script"].main(_argv(tmp_path / "run2", sets)) == 2
    assert (f"distill.teacher_checkpoint ({teacher}): the teacher's encoder is "
            f"'fbank_patches', and a distillation distils a BEATs encoder"
            in capsys.readouterr().err)
    assert not (tmp_path / "run2").exists()


def test_a_resume_against_another_teacher_is_refused(distill_job, tmp_path, capsys):
    """Another teacher behind the same distill.teacher_checkpoint (its run resumed or trained
    again into that folder): the resume is refused, naming the key. It went on silently,
    the student's remaining steps learning from another teacher."""
    import shutil

    from haaqi_jax.model import HAAQINet

    teacher = tmp_path / "teacher"
    shutil.copytree(distill_job["workdir"] / "teacher" / "report" / "best_model", teacher)
    sets = distill_job["sets"] + [f"distill.teacher_checkpoint={teacher}",
                                  "train.write_report=False"]
    main = distill_job["train_script"].main
    assert main(_argv(tmp_path / "run", sets + ["train.stop_after_steps=2"])) == 0
    assert (tmp_path / "run" / "checkpoints" / "2").is_dir()
    net = HAAQINet.load(teacher)
    HAAQINet(net.config, jax.tree_util.tree_map(lambda x: 1.5 * np.asarray(x), net.params)
             ).save(teacher, overwrite=True)
    capsys.readouterr()
    assert main(_argv(tmp_path / "run", sets)) == 2
    assert ("holds a run that started from other weights: the files behind "
            "distill.teacher_checkpoint changed" in capsys.readouterr().err)


@pytest.mark.parametrize("extra, message", [
    (["train.frozen_patterns=blstm/.*", "distill.frozen_head=()"],
     r"train.frozen_patterns: 'blstm/\.\*' matches no parameter"),
    (["distill.frozen_head=('layer_norm_0',)"],       # a head reading one layer has none
     r"distill.frozen_head: 'head/layer_norm_0/\.\*' matches no parameter")])
def test_frozen_parts_that_match_nothing_are_named(distill_job, tmp_path, capsys, extra,
                                                   message):
    """Both were accepted: the first trained the BLSTM it meant to freeze, the second froze
    nothing. They fail now before the student's data is built or a step runs."""
    import re

    teacher = distill_job["workdir"] / "teacher" / "report" / "best_model"
    sets = distill_job["sets"] + [f"distill.teacher_checkpoint={teacher}"] + extra
    assert distill_job["train_script"].main(_argv(tmp_path / "run", sets)) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("key", ["head_checkpoint", "encoder_checkpoint"])
def test_a_missing_checkpoint_is_named_before_anything_is_written(tmp_path, key):
    from haaqi_jax.train import loop

    missing = tmp_path / "nowhere"
    config = cfglib.get_config(REPO / "configs" / "distill.py",
                               [f"distill.teacher.model.{key}={missing}"])
    with pytest.raises(FileNotFoundError, match=rf"^distill.teacher: model.{key}: {missing} "
                                                r"does not exist"):
        loop.train_and_evaluate(cfglib.freeze(config), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    # the same in the teacher's own kind of run
    config = cfglib.get_config(REPO / "configs" / "tiny.py", [f"model.{key}={missing}"])
    with pytest.raises(FileNotFoundError, match=rf"^model.{key}: {missing} does not exist"):
        loop.train_and_evaluate(cfglib.freeze(config), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_loss_parameters_can_have_a_learning_rate_of_their_own():
    """optimizer.loss_params_learning_rate: the uncertainty weights move at their own rate (one
    Adam step moves a parameter by its learning rate), the model's parameters at theirs."""
    import jax.numpy as jnp
    import optax
    from haaqi_jax import distill
    from haaqi_jax.train import state as state_lib

    params = {"head": {"w": jnp.ones((2,))}, "loss": {"log_vars": jnp.zeros((3,))}}
    grads = {"head": {"w": jnp.ones((2,))}, "loss": {"log_vars": -jnp.ones((3,))}}
    opt = cfglib.load_config_file(REPO / "configs" / "distill.py").optimizer
    opt.schedule = "constant"
    labels = state_lib.param_labels(params)
    assert distill.loss_param_labels(labels, opt) == labels   # None: the model's rate
    opt.loss_params_learning_rate = 0.1
    labels = distill.loss_param_labels(labels, opt)
    assert labels["loss"]["log_vars"] == state_lib.LOSS_PARAMS
    tx = state_lib.make_optimizer(opt, labels, total_steps=10)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["head"]["w"], 1.0 - opt.learning_rate, rtol=1e-6)
    np.testing.assert_allclose(new["loss"]["log_vars"], 0.1, rtol=1e-5)
    frozen = distill.loss_param_labels(state_lib.param_labels(params, ("loss/.*",)), opt)
    assert frozen["loss"]["log_vars"] == state_lib.FROZEN        # frozen stays frozen
    opt.loss_params_learning_rate = None
    with pytest.raises(ValueError, match="optimizer.loss_params_learning_rate must be > 0"):
        state_lib.make_optimizer(opt, labels, total_steps=10)


def test_teacher_shares_the_runs_hold_out():
    """A distillation run's teacher is trained on the run's data split, held-out types included
    (otherwise the teacher would train on the types the student is scored on as unseen)."""
    from haaqi_jax import distill
    cfg = cfglib.get_config(REPO / "configs" / "distill.py",
                            ['data.hold_out=("resonance", "tilt_up")'])
    assert tuple(distill.teacher_config(cfg).data.hold_out) == ("resonance", "tilt_up")
    assert tuple(distill.teacher_config(cfglib.get_config(
        REPO / "configs" / "distill.py")).data.hold_out) == ()


def test_time_inference_reports_seconds_per_clip(tiny_setup, monkeypatch):
    """A batch of B clips is timed once per round and reported per clip; bad args are refused."""
    from haaqi_jax import distill

    teacher, student = tiny_setup[:2]
    ticks = iter(np.arange(0.0, 1000.0, 0.5))         # every forward "takes" 0.5 s
    monkeypatch.setattr(distill.time, "perf_counter", lambda: float(next(ticks)))
    times = distill.time_inference({"teacher": teacher, "student": student}, seconds=0.5,
                                   repeats=3, batch=4)
    for name in ("teacher", "student"):
        for part in ("model", "encoder"):
            assert times[name][part]["runs"] == [0.125] * 3
    assert distill.timing_ratios(times)["model"]["paired_median"] == 1.0
    with pytest.raises(ValueError, match="batch must be >= 1"):
        distill.time_inference({"teacher": teacher}, seconds=0.5, repeats=1, batch=0)


@pytest.mark.parametrize("override, message", [
    ("distill.target_layers=(2, 13)", r"distill.target_layers \(2, 13\): \[13\] are not teacher "
                                      r"hidden states \(0..4\)"),
    ("distill.student_layers=(0, 4)", r"distill.student_layers \(0, 4\): \[4\] are not teacher "
                                      r"layers \(0..3"),
    ("distill.frozen_head=('blstm', 'nope')", r"distill.frozen_head names \['nope'\], which the "
                                              r"HAAQI-Net head does not have"),
    ("distill.head_kind=chained", r"distill.head_kind must be one of \('independent', "
                                  r"'sequential'\)"),
    ("distill.target_cache_dtype=int8", r"distill.target_cache_dtype must be one of"),
    ("loss.kwargs.distill.name=qa_nope", r"^loss.kwargs.distill: unknown loss 'qa_nope'"),
    ("loss.name=qa_nope", r"^loss.name='qa_nope': unknown loss 'qa_nope'"),
    # a distillation sub-loss sees one layer at a time: its layer_weights were [w] per layer
    ("loss.kwargs.distill.kwargs.layer_weights=[1.0, 2.0]",
     r"loss.kwargs.distill.kwargs.layer_weights: .* once per target layer.*"
     r"loss.name=distill_weighted, loss.kwargs.layer_weights"),
    ("loss.name=distill_weighted", None),  # with the layer_weights below: one per target
    ("loss.kwargs.distill.kwargs.cosine_wieght=1", r"loss 'l1_cosine' takes no keyword "
                                                   r"'cosine_wieght'"),
    ("distill.teacher.report.color_by=nope", r"distill.teacher: report.color_by must be one of"),
    ("distill.teacher.report.metrics=nope", r"distill.teacher: report.metrics: 'nope' is not "
                                            r"registered"),
    ("distill.teacher.train.num_epochs=-2", r"distill.teacher: train.num_epochs must be a "
                                            r"whole number >= 0, got -2"),
    ("train.num_epochs=-1", r"^train.num_epochs must be a whole number >= 0, got -1"),
    ("train.monitor=lccc", r"^train.monitor must be 'loss' or a registered metric"),
    ("distill.teacher.train.monitor=srccc", r"^distill.teacher: train.monitor must be 'loss' "
                                            r"or a registered metric .*got 'srccc'"),
    ("distill.target_layers=()", r"^distill.target_layers is empty"),  # was a numpy error
    ("loss.kwargs.min_log_var=abc", r"keyword 'min_log_var' takes a number"),  # a traceback
    ("model.encoder_checkpoint=/x", r"model.encoder_checkpoint is not read by a distillation.*"
                                    r"distill.teacher.model.encoder_checkpoint"),  # was ignored
])
def test_distillation_settings_fail_before_the_teacher_trains(tmp_path, override, message):
    """Bad distillation settings are named before any training (a teacher trained here takes
    minutes at real sizes); an error of the teacher's own run names distill.teacher."""
    from haaqi_jax.train import loop
    sets = [f"distill.teacher.model.encoder_config.{k}={v}"
            for k, v in TINY_TEACHER_ENCODER.items()]
    sets += ["distill.student_layers=(0, 1)", "distill.target_layers=(2, 4)", override]
    if message is None:
        sets.append("loss.kwargs.layer_weights=(1.0, 2.0, 3.0)")
        message = (r"^loss.kwargs.layer_weights=\[1.0, 2.0, 3.0\]: one weight per target "
                   r"layer, 2 here")
    config = cfglib.apply_overrides(cfglib.load_config_file(REPO / "configs" / "distill.py"),
                                    sets)
    with pytest.raises(ValueError, match=message):
        loop.train_and_evaluate(cfglib.freeze(config), tmp_path / "run")
    assert not (tmp_path / "run" / "teacher" / "checkpoints").exists()


def test_train_script_imports_a_module_that_registers_a_loss(tmp_path, capsys):
    """train.py --import my_loss.py: a loss registered in the user's own module is known to
    the run's checks (here the run then stops at a later check, before any training)."""
    module = tmp_path / "qa_imported_loss.py"
    module.write_text("from haaqi_jax import losses\n"
                      "@losses.register_loss('qa_imported_l2', overwrite=True)\n"
                      "def qa_imported_l2(predictions, batch, *, cosine_weight=1.0):\n"
                      "    return losses.get_loss('mse')(predictions, batch)\n")
    sets = ["loss.kwargs.distill.name=qa_imported_l2", "distill.cache_targets=True",
            "data.crop_seconds=2.0"]
    train_script = _train_script()
    assert train_script.main(_argv(tmp_path / "run", sets)) == 2
    assert "unknown loss 'qa_imported_l2'" in capsys.readouterr().err
    assert train_script.main(["--import", str(module)] + _argv(tmp_path / "run", sets)) == 2
    err = capsys.readouterr().err
    assert "unknown loss" not in err and "distill.cache_targets=True needs" in err
    assert train_script.main(["--import", str(tmp_path / "nope.py")] + _argv(
        tmp_path / "run", sets)) == 2
    assert "--import " + str(tmp_path / "nope.py") + ": no such file" in capsys.readouterr().err


def test_cached_targets_with_crops_fail_before_the_teacher_trains(tmp_path):
    """Checked when the targets were cached, i.e. after the teacher had trained."""
    from haaqi_jax.train import loop
    config = cfglib.apply_overrides(cfglib.load_config_file(REPO / "configs" / "distill.py"),
                                    ["distill.cache_targets=True", "data.crop_seconds=2.0"])
    with pytest.raises(ValueError, match=r"distill.cache_targets=True needs "
                                         r"data.crop_seconds=None"):
        loop.train_and_evaluate(cfglib.freeze(config), tmp_path / "run")
    assert not (tmp_path / "run" / "teacher").exists()


def _comparison(test_unseen_student_lcc=0.536):
    """A distill_report.json's content, by hand (the demo's figures of 2026-11-29)."""
    def scores(lcc, srcc, mse):
        return {"lcc": lcc, "srcc": srcc, "mse": mse}
    return {
        "best_step": 240,
        "params": {"teacher_encoder": 90_311_792, "student_encoder": 21_802_812,
                   "encoder_reduction": 1 - 21_802_812 / 90_311_792,
                   "teacher_total": 90_984_465, "student_total": 22_475_485},
        "seconds_per_clip": {
            "clip_seconds": 10.0, "repeats": 15, "ratio_encoder": 0.240, "ratio_model": 0.257,
            "ratios": {"encoder": {"min": 0.240, "median": 0.240, "paired_median": 0.241},
                       "model": {"min": 0.279, "median": 0.257, "paired_median": 0.257}},
            "teacher": {"encoder": 0.520, "encoder_min": 0.50, "model": 0.531, "model_min": 0.51},
            "student": {"encoder": 0.125, "encoder_min": 0.12, "model": 0.1365,
                        "model_min": 0.142}},
        "splits": {
            "valid": {"n": 80, "lcc_gap": 0.0002, "teacher": scores(0.785, 0.769, 0.041),
                      "student": scores(0.785, 0.763, 0.041)},
            "test_unseen": {"n": 160, "lcc_gap": 0.478 - test_unseen_student_lcc,
                            "teacher": scores(0.478, 0.513, 0.109),
                            "student": scores(test_unseen_student_lcc, 0.561, 0.096)}}}


def test_the_distill_plot_shows_each_split_s_scores_times_and_parameters(tmp_path):
    """distill_report.png: per split, teacher and student LCC and SRCC as bars of those
    heights, the target line (teacher LCC - 0.03) over each student LCC bar, the time per clip
    of both (encoder, whole model) with their ratios, and the parameter counts; every text
    inside the figure. An undefined LCC is no bar but "n/a"."""
    from figures import drawn, inside
    from haaqi_jax import distill

    c = _comparison()
    fig = drawn(distill.comparison_plot, c, tmp_path / "d.png")
    assert (tmp_path / "d.png").stat().st_size > 5_000
    scores_axes = {ax.get_title(): ax for ax in fig.axes}
    assert set(scores_axes) == {"LCC", "SRCC", "time per 10 s clip"}, set(scores_axes)
    for metric in ("lcc", "srcc"):
        ax = scores_axes[metric.upper()]
        heights = sorted(round(p.get_height(), 6) for p in ax.patches)
        want = sorted(round(c["splits"][s][m][metric], 6) for s in c["splits"]
                      for m in ("teacher", "student"))
        assert heights == want, (metric, heights)
        assert [t.get_text() for t in ax.get_xticklabels()] == ["valid\n80 clips",
                                                                 "test_unseen\n160 clips"]
    targets = sorted(round(y, 6) for line in scores_axes["LCC"].get_lines()
                     for y in line.get_ydata())
    assert targets == sorted(round(c["splits"][s]["teacher"]["lcc"] - 0.03, 6)
                             for s in c["splits"] for _ in (0, 1))
    time_ax = scores_axes["time per 10 s clip"]
    assert sorted(round(p.get_height(), 6) for p in time_ax.patches) == sorted(
        [0.520, 0.125, 0.531, 0.1365])
    texts = [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text"))
             if t.get_text()]
    assert any("0.240x" in t for t in texts) and any("0.257x" in t for t in texts), texts
    assert any("90.3 M -> 21.8 M encoder parameters (75.86 % fewer)" in t for t in texts), texts
    box = fig.bbox
    renderer = fig.canvas.get_renderer()
    for t in fig.findobj(lambda a: hasattr(a, "get_text") and a.get_visible()):
        if t.get_text():
            assert inside(t.get_window_extent(renderer), box), t.get_text()
    # An undefined LCC: no bar of nan height, a label saying n/a.
    fig = drawn(distill.comparison_plot, _comparison(float("nan")), tmp_path / "e.png")
    ax = {a.get_title(): a for a in fig.axes}["LCC"]
    assert all(np.isfinite(p.get_height()) for p in ax.patches) and len(ax.patches) == 3
    assert "n/a" in [t.get_text() for t in ax.texts]
