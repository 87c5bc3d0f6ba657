"""The opt-in half-precision compute dtype (`model.dtype`): bfloat16 activations and matmuls,
float32 parameters, optimizer state, softmax, LayerNorm statistics, LSTM state and scores.

Tolerances: bfloat16 keeps 8 bits of mantissa (a relative rounding step of 2^-8 = 0.4 %). A
hidden state goes through a dozen roundings per layer but is renormalised by every post-LN
LayerNorm, so its error stays a few steps: relative (Frobenius) error 3e-2 for the tiny BEATs.
Scores are sigmoids read in float32 of a head whose matmuls alone are bf16: within 2e-2.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

import beats_reference as ref
from haaqi_jax import config as cfglib
from haaqi_jax import model as M
from haaqi_jax import student as student_lib
from haaqi_jax.beats import BEATs, BEATsConfig
from haaqi_jax.convert.beats_torch import beats_params_from_state_dict
from haaqi_jax.convert.haaqinet_torch import head_params_from_state_dict
from haaqi_jax.head import HAAQINetHead, HeadConfig
from haaqi_jax.train import loop
from haaqinet_reference import make_head, torch_head_scores

SR = 16000


def _relative_error(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


def _dot_dtypes(jaxpr) -> list[tuple[str, ...]]:
    """The operand dtypes of every dot_general / conv in a jaxpr, sub-jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)             # a ClosedJaxpr's Jaxpr
                if hasattr(sub, "eqns"):
                    found += _dot_dtypes(sub)
    return found


def _wave(seed, n, batch=2):
    rng = np.random.default_rng(seed)
    return np.clip(0.2 * rng.normal(size=(batch, n)), -1, 1).astype(np.float32)


# ---------------------------------------------------------------------------------- encoder


@pytest.fixture(scope="module")
def tiny_beats(tmp_path_factory):
    path = tmp_path_factory.mktemp("bf16") / "tiny.pt"
    state = ref.make_beats_state_dict(ref.TINY_CFG, 0)
    ref.save_official_checkpoint(path, ref.TINY_CFG, state)
    return ref.speechbrain_beats(path), beats_params_from_state_dict(state, ref.TINY_CFG)


def test_bfloat16_beats_stays_close_to_speechbrain_and_computes_in_bfloat16(tiny_beats, kaldi):
    speechbrain, params = tiny_beats
    wav = _wave(0, 24000)
    fbank = ref.torch_kaldi_fbank(kaldi, wav)
    expected, _ = ref.speechbrain_hidden_states(speechbrain, wav, fbank=fbank)
    module = BEATs(BEATsConfig.from_dict(ref.TINY_CFG), dtype=jnp.bfloat16)
    encode = lambda p, f: module.apply({"params": p}, f, method=BEATs.encode_fbank)
    out = jax.jit(encode)(params, jnp.asarray(fbank))
    for i, (ours, theirs) in enumerate(zip(out.hidden_states, expected)):
        assert ours.dtype == jnp.bfloat16, f"hidden state {i}"
        assert np.isfinite(np.asarray(ours, np.float32)).all()
        assert _relative_error(ours, theirs) < 3e-2, f"hidden state {i}"
    dots = _dot_dtypes(jax.make_jaxpr(encode)(params, jnp.asarray(fbank)).jaxpr)
    # per layer q, k, v, grep, out, fc1, fc2, logits, weights x values; + patch conv,
    # post_extract_proj, pos_conv
    assert sum(d == ("bfloat16", "bfloat16") for d in dots) == 9 * 2 + 3
    assert all("float32" not in d for d in dots)


def test_float32_dtype_is_the_default_computation_exactly(tiny_beats):
    """dtype None and float32 leave every matmul float32 and the outputs bit for bit."""
    _, params = tiny_beats
    fbank = jnp.asarray(np.random.default_rng(1).normal(size=(2, 64, 128)), jnp.float32)
    config = BEATsConfig.from_dict(ref.TINY_CFG)
    default = BEATs(config).apply({"params": params}, fbank, method=BEATs.encode_fbank)
    explicit = BEATs(config, dtype=None).apply({"params": params}, fbank,
                                               method=BEATs.encode_fbank)
    for a, b in zip(default.hidden_states, explicit.hidden_states):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bfloat16_student_stays_close_and_keeps_float32_params(tiny_beats):
    _, teacher_params = tiny_beats
    student, params = student_lib.student_from_teacher(teacher_params, ref.TINY_CFG, (0, 1))
    half = student.clone(dtype=jnp.bfloat16)
    fbank = jnp.asarray(np.random.default_rng(2).normal(size=(2, 64, 128)), jnp.float32)
    full = student.apply({"params": params}, fbank, method="encode_fbank")
    low = half.apply({"params": params}, fbank, method="encode_fbank")
    for i, (a, b) in enumerate(zip(low.hidden_states, full.hidden_states)):
        assert a.dtype == jnp.bfloat16 and b.dtype == jnp.float32
        assert _relative_error(a, b) < 3e-2, f"hidden state {i}"
    fresh = half.init(jax.random.key(0), fbank, method="encode_fbank")["params"]
    assert {x.dtype for x in jax.tree_util.tree_leaves(fresh)} == {jnp.dtype("float32")}


# ---------------------------------------------------------------------------------- head


def test_bfloat16_head_stays_close_to_torch():
    torch_head = make_head(1, feature_dim=768)
    params, cfg = head_params_from_state_dict(torch_head.state_dict())
    rng = np.random.default_rng(4)
    lengths = (40, 25)
    items = [rng.normal(size=(t, 768)).astype(np.float32) for t in lengths]
    audiogram = rng.uniform(0, 80, (2, 8)).astype(np.float32)
    frames_ref, clips_ref = torch_head_scores(torch_head, items, audiogram)
    feats = np.zeros((2, 40, 768), np.float32)
    for b, item in enumerate(items):
        feats[b, :len(item)] = item
    mask = np.arange(40)[None, :] < np.asarray(lengths)[:, None]
    head = HAAQINetHead(cfg, dtype=jnp.bfloat16)
    apply = lambda p, f: head.apply({"params": p}, f, jnp.asarray(mask), jnp.asarray(audiogram))
    out = jax.jit(apply)(params, jnp.asarray(feats))
    assert out.clip_score.dtype == out.frame_scores.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out.clip_score), clips_ref, atol=2e-2, rtol=0)
    for b, t in enumerate(lengths):
        np.testing.assert_allclose(np.asarray(out.frame_scores[b, :t]), frames_ref[b],
                                   atol=3e-2, rtol=0)
    dots = _dot_dtypes(jax.make_jaxpr(apply)(params, jnp.asarray(feats)).jaxpr)
    # adapter, 2 LSTM input projections, dense, query, key, folded values, logits, weights x
    # values in bfloat16; the LSTM's recurrent step (float32 state) and the folding of the
    # readout's parameters stay float32
    assert sum(d == ("bfloat16", "bfloat16") for d in dots) == 9
    assert all(d in (("bfloat16", "bfloat16"), ("float32", "float32")) for d in dots)


def test_whole_haaqinet_in_bfloat16_scores_close_to_float32():
    config = M.HAAQINetConfig(encoder_config=ref.TINY_CFG, feature_mode="weighted",
                              feature_layers=(0, 1, 2), head=HeadConfig(audiogram_scale=0.01))
    net = M.HAAQINet.init_random(config, seed=3)
    half = M.HAAQINet(config, net.params, dtype="bfloat16")
    wav, levels = _wave(5, 32000, batch=3), np.random.default_rng(6).uniform(0, 70, (3, 8))
    full_out = net.apply(wav, None, levels)
    half_out = half.apply(wav, None, levels)
    assert half_out.clip_score.dtype == jnp.float32
    assert np.isfinite(np.asarray(half_out.frame_scores)).all()
    np.testing.assert_allclose(np.asarray(half_out.clip_score),
                               np.asarray(full_out.clip_score), atol=2e-2, rtol=0)
    features, _ = half.module.apply({"params": net.params}, jnp.asarray(wav), None,
                                    method="encode")
    assert features.dtype == jnp.bfloat16


def test_saved_model_loads_in_float32_unless_asked(tmp_path):
    config = M.HAAQINetConfig(encoder_config=ref.TINY_CFG, head=HeadConfig(audiogram_scale=0.01))
    net = M.HAAQINet.init_random(config, seed=1)
    net.save(tmp_path / "net")
    saved = json.loads((tmp_path / "net" / "config.json").read_text())
    assert "dtype" not in json.dumps(saved["config"])
    loaded = M.HAAQINet.load(tmp_path / "net")
    assert loaded.dtype == "float32"
    wav, levels = _wave(7, 20000, batch=1), np.full((1, 8), 30.0)
    np.testing.assert_array_equal(np.asarray(loaded.apply(wav, None, levels).clip_score),
                                  np.asarray(net.apply(wav, None, levels).clip_score))
    half = M.HAAQINet.load(tmp_path / "net", dtype="bfloat16")
    assert half.dtype == "bfloat16"
    features, _ = half.module.apply({"params": half.params}, jnp.asarray(wav), None,
                                    method="encode")
    assert features.dtype == jnp.bfloat16
    score = half.predict([wav[0]], SR, levels, progress=False)
    assert abs(float(score[0]) - float(net.apply(wav, None, levels).clip_score[0])) < 2e-2


# ---------------------------------------------------------------------------------- config


@pytest.mark.parametrize("value, message", [
    ("float16", "model.dtype.*'float32', 'bfloat16'.*float16"),
    ("fp32", "model.dtype.*'float32', 'bfloat16'"),
    ("bf16", "model.dtype.*'float32', 'bfloat16'"),
])
def test_compute_dtype_is_checked_by_name(value, message):
    with pytest.raises(ValueError, match=message):
        M.compute_dtype(value)
    with pytest.raises(ValueError, match=message.replace("model.dtype", "HAAQINet dtype")):
        M.HAAQINet(M.HAAQINetConfig(encoder_kind="fbank_patches"), {}, dtype=value)
    from haaqi_jax.evaluate import evaluate_manifest
    with pytest.raises(ValueError, match="evaluate_manifest: dtype"):
        evaluate_manifest("no_model", "no_manifest.jsonl", "no_out", dtype=value)


def test_model_dtype_in_the_run_configs_and_resumes_old_runs():
    from pathlib import Path
    configs = Path(__file__).resolve().parents[1] / "configs"
    cfg = cfglib.load_config_file(configs / "default.py")
    assert cfg.model.dtype == "float32"
    assert M.compute_dtype("float32") is None and M.compute_dtype("bfloat16") == jnp.bfloat16
    cfglib.check_run_keys(cfg)
    cfglib.apply_overrides(cfg, ["model.dtype=bfloat16"])
    loop.check_run_settings(cfg)
    cfglib.apply_overrides(cfg, ["model.dtype=float16"])
    with pytest.raises(ValueError, match="model.dtype"):
        loop.check_run_settings(cfg)
    # a run saved before the key existed computed in float32: it resumes under the default
    old = cfglib.to_dict(cfglib.load_config_file(configs / "default.py"))
    del old["model"]["dtype"]
    new = cfglib.to_dict(cfglib.load_config_file(configs / "default.py"))
    assert cfglib.config_differences(old, new) == []
    distill = cfglib.to_dict(cfglib.load_config_file(configs / "distill.py"))
    assert distill["model"]["dtype"] == "float32"


# ---------------------------------------------------------------------------------- training


def _one_step(tmp_path, manifest_overrides, dtype):
    from test_train import TINY
    cfg = cfglib.get_config(TINY, manifest_overrides + [
        "data.cache=false", "train.stop_after_steps=1", "model.freeze_encoder=false",
        f"model.dtype={dtype}", "model.encoder_kind=beats"])
    cfg.model.encoder_config = ConfigDict(dict(ref.TINY_CFG))
    result = loop.train_and_evaluate(cfg, tmp_path / dtype)
    record = [json.loads(line) for line in (tmp_path / dtype / "metrics.jsonl").open()]
    return result, next(r for r in record if "loss" in r and r.get("step") == 1)["loss"]


def test_a_bfloat16_training_step_keeps_float32_state_and_a_close_loss(tmp_path):
    from test_train import write_tiny_dataset
    manifest = write_tiny_dataset(tmp_path / "data")
    overrides = [f"data.manifest={manifest}", "train.batch_size=2", "train.eval_batch_size=2",
                 "train.patience=0", "data.prefetch=0"]
    full, full_loss = _one_step(tmp_path, overrides, "float32")
    half, half_loss = _one_step(tmp_path, overrides, "bfloat16")
    assert half.final_step == 1 and np.isfinite(half_loss)
    for tree in (half.state.params, half.state.opt_state):
        leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype,
                                                                               jnp.floating)]
        assert leaves and {x.dtype for x in leaves} == {jnp.dtype("float32")}
    assert abs(half_loss - full_loss) <= 2e-2 * abs(full_loss) + 1e-4
    moved = jax.tree_util.tree_map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                                   half.state.params["encoder"], full.state.params["encoder"])
    assert any(jax.tree_util.tree_leaves(moved))    # the two runs did compute differently


def test_a_bfloat16_distillation_step_compares_float32_layers_and_keeps_float32_state():
    from haaqi_jax import distill
    from test_distill import _tiny_setup

    teacher, student, state, labels, tx, loss_fn, forward, batch = _tiny_setup()
    half = distill.make_distill_forward(teacher.config, student.config, (2, 4), "sequential",
                                        dtype=jnp.bfloat16)
    teacher_params = teacher.params["encoder"]
    full_out = forward(state.params, teacher_params, batch, rng=None, deterministic=True)
    half_out = half(state.params, teacher_params, batch, rng=None, deterministic=True)
    for key in ("student_layers", "teacher_layers", "clip_score"):
        assert half_out[key].dtype == jnp.float32, key
    for key in ("student_layers", "teacher_layers"):
        mask = np.asarray(full_out["frame_mask"])[:, None, :, None]
        assert _relative_error(np.asarray(half_out[key]) * mask,
                               np.asarray(full_out[key]) * mask) < 3e-2, key
    steps = {name: jax.jit(distill.make_distill_step(fn, loss_fn, tx, labels))
             for name, fn in (("full", forward), ("half", half))}
    (full_state, full_metrics), (half_state, half_metrics) = (
        steps[name](state, teacher_params, batch) for name in ("full", "half"))
    assert np.isfinite(float(half_metrics["loss"]))
    assert abs(float(half_metrics["loss"]) - float(full_metrics["loss"])) <= \
        2e-2 * abs(float(full_metrics["loss"]))
    leaves = jax.tree_util.tree_leaves((half_state.params, half_state.opt_state))
    assert {x.dtype for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)} == \
        {jnp.dtype("float32")}
