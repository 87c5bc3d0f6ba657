"""distillBEATs student: parameter counts, weights copied from the teacher, agreement with the
teacher's layers run by speechbrain (PyTorch), prediction heads vs numpy, the encoder registry."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import beats_reference as ref
from haaqi_jax import beats, student
from haaqi_jax.convert.beats_torch import beats_params_from_state_dict

SR = 16000
TEACHER_CFG = dict(ref.TINY_CFG, encoder_layers=4)


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def test_released_parameter_counts():
    released = beats.BEATsConfig.from_dict(ref.RELEASED_CFG)
    teacher = jax.eval_shape(lambda k: beats.init_params(released, k), jax.random.key(0))
    assert _count(teacher) == 90_311_792
    per_layer = student.param_shapes(student.StudentConfig(beats=released))
    assert _count(per_layer) == 21_802_812  # the paper's figure: 75.86 % fewer
    shared = student.param_shapes(student.StudentConfig(beats=released,
                                                        shared_position_bias=True))
    assert _count(shared) == 21_802_812 - 2 * 320 * 12


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A 4-layer tiny BEATs: official-layout random weights, speechbrain model, our params."""
    state_dict = ref.make_beats_state_dict(TEACHER_CFG, seed=3)
    path = ref.save_official_checkpoint(tmp_path_factory.mktemp("t") / "t.pt", TEACHER_CFG,
                                        state_dict)
    return ref.speechbrain_beats(path), beats_params_from_state_dict(state_dict, TEACHER_CFG)


@pytest.mark.parametrize("shared", [False, True])
def test_copied_weights_equal_teacher(teacher, shared):
    _, params = teacher
    layers = (3, 1)
    module, sparams = student.student_from_teacher(params, TEACHER_CFG, layers,
                                                   shared_position_bias=shared)
    assert module.config.num_layers == 2
    flat = lambda t: {jax.tree_util.keystr(p): np.asarray(x)
                      for p, x in jax.tree_util.tree_flatten_with_path(t)[0]}
    ours = flat(sparams)
    expected = flat({"front_end": params["front_end"],
                     **{f"layers_{j}": params[f"layers_{i}"] for j, i in enumerate(layers)}})
    for key, value in expected.items():
        np.testing.assert_array_equal(ours[key], value, err_msg=key)
    tables = [k for k in ours if "relative_position_bias" in k]
    assert len(tables) == (1 if shared else 2)
    for key in tables:
        np.testing.assert_array_equal(ours[key],
                                      np.asarray(params["relative_position_bias"]["embedding"]))
    # The tree is exactly what the module builds.
    shapes = student.param_shapes(module.config)
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(sparams)


def _torch_student(sb_model, fbank, layers):
    """The reference student: speechbrain's front end and the chosen teacher layers, run over
    the whole token sequence (time-first, as the layers expect), no positional conv."""
    with torch.no_grad():
        x = torch.from_numpy(fbank).unsqueeze(1)
        x = sb_model.patch_embedding(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).transpose(1, 2)
        x = sb_model.post_extract_proj(sb_model.layer_norm(x))
        hidden = [x.numpy()]
        x = x.transpose(0, 1)
        pos_bias = None
        for i in layers:
            x, _, pos_bias = sb_model.encoder.layers[i](x, self_attn_padding_mask=None,
                                                        need_weights=False, pos_bias=pos_bias)
            hidden.append(x.transpose(0, 1).numpy())
    return hidden


@pytest.mark.parametrize("layers", [(0, 1, 2), (1, 3)])
def test_student_matches_teacher_layers_in_torch(teacher, kaldi, layers):
    sb_model, params = teacher
    rng = np.random.default_rng(0)
    wav = np.clip(0.2 * rng.normal(size=(2, 2 * SR)), -1, 1).astype(np.float32)
    fbank = ref.torch_kaldi_fbank(kaldi, wav)
    expected = _torch_student(sb_model, fbank, layers)
    module, sparams = student.student_from_teacher(params, TEACHER_CFG, layers)
    out = jax.jit(functools.partial(module.apply, {"params": sparams},
                                    method=student.StudentEncoder.encode_fbank))(
                                        jnp.asarray(fbank))
    assert len(out.hidden_states) == len(layers) + 1
    for i, (ours, theirs) in enumerate(zip(out.hidden_states, expected)):
        np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=0,
                                   err_msg=f"student hidden state {i}")
    # From the waveform (our fbank) as well.
    out_wave = jax.jit(functools.partial(module.apply, {"params": sparams}))(jnp.asarray(wav))
    np.testing.assert_allclose(np.asarray(out_wave.last_hidden_state), expected[-1], atol=2e-3,
                               rtol=0)


def test_padded_batch_equals_items_alone(teacher):
    _, params = teacher
    module, sparams = student.student_from_teacher(params, TEACHER_CFG)
    apply = jax.jit(functools.partial(module.apply, {"params": sparams}))
    rng = np.random.default_rng(1)
    n_short = 400 + (32 * 2 - 1) * 160  # ends on a 16-frame patch boundary: 2 patches
    wav = np.clip(0.2 * rng.normal(size=(2, 2 * SR)), -1, 1).astype(np.float32)
    wav[1, n_short:] = 0
    # The sample mask whose reference reduction flags exactly the tokens past the clip.
    from haaqi_jax.model import encoder_padding_mask
    pad = np.asarray(encoder_padding_mask(jnp.asarray([2 * SR, n_short]), 2 * SR))
    batch = apply(jnp.asarray(wav), jnp.asarray(pad))
    alone = apply(jnp.asarray(wav[1:, :n_short]))
    t = alone.last_hidden_state.shape[1]
    np.testing.assert_allclose(np.asarray(batch.last_hidden_state[1, :t]),
                               np.asarray(alone.last_hidden_state[0]), atol=1e-5, rtol=0)
    assert bool(batch.padding_mask[1, t:].all()) and not bool(batch.padding_mask[1, :t].any())


@pytest.mark.parametrize("kind", ["independent", "sequential"])
def test_prediction_heads_match_numpy(kind):
    heads = student.PredictionHeads(3, kind)
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    params = heads.init(jax.random.key(1), x)["params"]
    out = np.asarray(heads.apply({"params": params}, x))
    assert out.shape == (2, 3, 5, 8)
    h = np.asarray(x, np.float64)
    for k in range(3):
        w, b = (np.asarray(params[f"head_{k}"][n], np.float64) for n in ("kernel", "bias"))
        y = (np.asarray(x, np.float64) if kind == "independent" else h) @ w + b
        np.testing.assert_allclose(out[:, k], y, atol=1e-5)
        h = y
    with pytest.raises(ValueError, match="kind"):
        student.PredictionHeads(2, "parallel").init(jax.random.key(0), x)


def test_bad_arguments_raise(teacher):
    _, params = teacher
    with pytest.raises(ValueError, match=r"teacher layers \[4\] do not exist"):
        student.student_from_teacher(params, TEACHER_CFG, (0, 4))
    with pytest.raises(ValueError, match="empty"):
        student.student_from_teacher(params, TEACHER_CFG, ())
    with pytest.raises(ValueError, match="no 'front_end'"):
        student.student_from_teacher({k: v for k, v in params.items() if k != "front_end"},
                                     TEACHER_CFG)
    with pytest.raises(ValueError, match="unknown keys"):
        student.StudentConfig.from_dict({"num_layer": 3})


def test_student_encoder_in_haaqinet(teacher, tmp_path):
    """The "student" encoder kind: a HAAQI-Net with a student encoder, saved and loaded."""
    from haaqi_jax.head import HeadConfig
    from haaqi_jax.model import HAAQINet, HAAQINetConfig

    _, params = teacher
    module, sparams = student.student_from_teacher(params, TEACHER_CFG, (0, 1))
    cfg = HAAQINetConfig(encoder_kind="student", encoder_config=module.config.to_dict(),
                         feature_mode="weighted", feature_layers=(1, 2),
                         head=HeadConfig(adapter_dim=8, lstm_hidden=4, dense_dim=8, num_heads=2))
    net = HAAQINet.init_random(cfg, encoder_params=sparams)
    wav = np.clip(0.2 * np.random.default_rng(2).normal(size=(1, SR)), -1, 1).astype(np.float32)
    score = net.apply(wav, None, np.full((1, 8), 20.0))
    net.save(tmp_path / "student_net")
    again = HAAQINet.load(tmp_path / "student_net")
    np.testing.assert_allclose(np.asarray(again.apply(wav, None, np.full((1, 8), 20.0)).clip_score),
                               np.asarray(score.clip_score), atol=1e-6)
