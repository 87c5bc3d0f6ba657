"""HAAQINetConfig / HAAQINetModel / HAAQINet: padding = alone, save/load, registry, bad input.

Agreement with the PyTorch reference pipeline is in test_convert_haaqinet.py.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haaqi_jax import model as M
from haaqi_jax.head import HeadConfig
from beats_reference import TINY_CFG

SR = 16000


def _clips(seed, lengths):
    rng = np.random.default_rng(seed)
    times = [np.arange(n) / SR for n in lengths]
    return [(0.3 * np.sin(2 * np.pi * rng.uniform(100, 3000) * t) + 0.05 * rng.normal(size=t.size))
            .astype(np.float32) for t in times]


@pytest.fixture(scope="module")
def weighted_net():
    cfg = M.HAAQINetConfig(encoder_config=TINY_CFG, feature_mode="weighted",
                           feature_layers=(0, 1, 2))
    return M.HAAQINet.init_random(cfg, seed=3)


@pytest.fixture(scope="module")
def levels():
    return np.random.default_rng(1).uniform(0, 70, (6, 8))


def test_config_roundtrip_and_validation():
    cfg = M.HAAQINetConfig(encoder_config=TINY_CFG, feature_mode="weighted",
                           feature_layers=(1, 2), head=HeadConfig(lstm_hidden=50))
    assert cfg.head.num_weighted_layers == 2 and cfg.head.lstm_hidden == 50
    d = json.loads(json.dumps(cfg.to_dict()))
    back = M.HAAQINetConfig.from_dict(d)
    assert back == cfg and hash(back) == hash(cfg)
    assert M.HAAQINetConfig(encoder_config=TINY_CFG).head.num_weighted_layers == 0
    with pytest.raises(ValueError, match="feature_mode"):
        M.HAAQINetConfig(encoder_config=TINY_CFG, feature_mode="mean")
    with pytest.raises(ValueError, match="unknown keys"):
        M.HAAQINetConfig.from_dict({**d, "colour": 1})
    with pytest.raises(ValueError, match="unknown encoder kind 'nope'"):
        M.HAAQINetConfig(encoder_kind="nope")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.feature_mode = "last"


def test_a_partial_encoder_config_changes_only_what_it_names():
    # The released BEATs as the tests write it out, not as the code under test does.
    from beats_reference import RELEASED_CFG
    two = M.HAAQINetConfig(encoder_config={"encoder_layers": 2}).encoder_config
    assert dict(two) == {**RELEASED_CFG, "encoder_layers": 2}
    assert dict(M.HAAQINetConfig().encoder_config) == RELEASED_CFG
    from haaqi_jax.beats import RELEASED_CONFIG       # what HAAQINetConfig() reads each time
    with pytest.raises(TypeError):
        RELEASED_CONFIG["encoder_layers"] = 2
    with pytest.raises(ValueError, match=r"unknown key encoder_layer \(did you mean "
                                         r"encoder_layers\?\) for encoder kind 'beats'"):
        M.HAAQINetConfig(encoder_config={"encoder_layer": 2})
    # One level down: the student's teacher config.
    student = M.HAAQINetConfig(encoder_kind="student",
                               encoder_config={"num_layers": 2, "beats": {"encoder_layers": 4}})
    assert student.encoder_config["num_layers"] == 2
    assert dict(student.encoder_config["beats"]) == {**RELEASED_CFG, "encoder_layers": 4}
    with pytest.raises(ValueError, match=r"encoder_config.beats: unknown key deep_nrom"):
        M.HAAQINetConfig(encoder_kind="student", encoder_config={"beats": {"deep_nrom": True}})


def test_padded_batches_score_each_clip_as_alone(weighted_net, levels):
    # Two buckets shared by clips of different lengths; the one at 44.1 kHz is resampled.
    lengths = [2800, 5123, 9000, 9950, 8000]
    clips = _clips(0, lengths)
    rates = [SR] * 4 + [44100]
    levels = levels[:5]
    together = weighted_net.predict(clips, rates, levels, batch_size=4, progress=False)
    alone = np.array([weighted_net.predict([c], r, l[None], progress=False)[0]
                      for c, r, l in zip(clips, rates, levels)])
    np.testing.assert_allclose(together, alone, atol=2e-5, rtol=0)
    assert together.shape == (5,) and np.all((together > 0) & (together < 1))
    # The audiogram matters.
    other = weighted_net.predict(clips[:2], SR, levels[:2] + 20, progress=False)
    assert np.max(np.abs(other - together[:2])) > 1e-5


def test_encoder_token_mask_equals_alone_token_count(weighted_net):
    """Our sample mask makes the encoder's own token rule flag exactly the alone token count,
    where the naive mask (padding from the clip's last sample) does not."""
    length = 16000
    valid = np.array([16000, 9000, 5123, 2800])
    wav = np.zeros((4, length), np.float32)
    naive = np.arange(length)[None] >= valid[:, None]

    def encoder_masks(module, wav, naive):
        ours = module.encoder(wav, M.encoder_padding_mask(jnp.asarray(valid), length)).padding_mask
        theirs = module.encoder(wav, naive).padding_mask
        return ours, theirs, module.encode(wav, naive)[1]

    ours, theirs, token_mask = jax.jit(functools.partial(
        weighted_net.module.apply, method=encoder_masks))({"params": weighted_net.params}, wav,
                                                          naive)
    expected = np.arange(ours.shape[1])[None] < M.tokens_for_samples(valid)[:, None]
    np.testing.assert_array_equal(~np.asarray(ours), expected)
    np.testing.assert_array_equal(np.asarray(token_mask), expected)
    assert not np.array_equal(~np.asarray(theirs), expected)


def test_save_load_roundtrip_and_errors(weighted_net, levels, tmp_path):
    clips = _clips(2, [4000, 6000])
    before = weighted_net.predict(clips, SR, levels[:2], progress=False)
    weighted_net.save(tmp_path / "net")
    loaded = M.HAAQINet.load(tmp_path / "net")
    assert loaded.config == weighted_net.config
    np.testing.assert_allclose(loaded.predict(clips, SR, levels[:2], progress=False), before,
                               atol=1e-6)
    with pytest.raises(FileExistsError):
        weighted_net.save(tmp_path / "net")

    from haaqi_jax.train.checkpoint import save_params
    save_params(tmp_path / "other", {"w": np.zeros(3)}, {"kind": "beats"})
    with pytest.raises(ValueError, match="kind 'beats'"):
        M.HAAQINet.load(tmp_path / "other")
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        M.HAAQINet.load(tmp_path / "nowhere")
    (tmp_path / "other" / "config.json").write_text('{"kind": "haaqinet",')
    with pytest.raises(ValueError, match=r"other/config.json \(a parameter folder's config\) "
                                         r"is damaged: not JSON"):
        M.HAAQINet.load(tmp_path / "other")
    params = jax.tree_util.tree_map(np.asarray, weighted_net.params)
    params["head"]["dense"]["bias"] = np.zeros(7, np.float32)
    with pytest.raises(ValueError, match=r"\['head'\]\['dense'\]\['bias'\] has shape"):
        M.HAAQINet.from_params(weighted_net.config, params)
    del params["head"]["dense"]
    with pytest.raises(ValueError, match="missing parameter"):
        M.HAAQINet.from_params(weighted_net.config, params)


def test_head_apply_and_frozen_encoder(weighted_net, levels):
    clips = _clips(3, [6000, 4000])
    wav = np.zeros((2, 6000), np.float32)
    wav[0], wav[1, :4000] = clips
    mask = np.arange(6000)[None] >= np.array([6000, 4000])[:, None]
    hl = jnp.asarray(levels[:2], jnp.float32)
    full = weighted_net.apply(wav, mask, hl)
    feats, token_mask = jax.jit(functools.partial(
        weighted_net.module.apply, method=M.HAAQINetModel.encode))(
            {"params": weighted_net.params}, wav, mask)
    assert feats.shape[:2] == (2, 3)
    head_only = weighted_net.head_apply(feats, token_mask, hl)
    np.testing.assert_allclose(head_only.clip_score, full.clip_score, atol=1e-6)

    def loss(params):
        out = weighted_net.module.apply({"params": params}, wav, mask, hl)
        return jnp.sum(out.clip_score)

    # freeze_encoder is the train step's business (its parameter labels, test_train.py): the
    # module itself passes gradients to the encoder and to the input, e.g. for saliency maps.
    grads = jax.jit(jax.grad(loss))(weighted_net.params)
    enc = max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(grads["encoder"]))
    head = max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(grads["head"]))
    assert enc > 0.0 and head > 0.0


@pytest.mark.parametrize("encoder", ["beats", "fbank_patches"])
def test_input_gradient_through_apply_matches_finite_differences(encoder, levels):
    """d clip_score / d waveform through `HAAQINet.apply` (it was 0 with a frozen encoder, and
    NaN through fbank_patches' clip statistics, whose silent mel bands have zero variance)."""
    cfg = (M.HAAQINetConfig(encoder_config=TINY_CFG) if encoder == "beats" else
           M.HAAQINetConfig(encoder_kind="fbank_patches",
                            head=HeadConfig(audiogram_scale=0.01)))
    net = M.HAAQINet.init_random(cfg, seed=2)
    assert net.config.freeze_encoder
    wav = jnp.asarray(np.stack(_clips(8, [6000])))
    hl = jnp.asarray(levels[:1], jnp.float32)
    score = lambda w: net.apply(w, None, hl).clip_score.sum()           # noqa: E731
    grad = np.asarray(jax.grad(score)(wav))
    assert np.isfinite(grad).all() and np.abs(grad).max() > 0
    direction = np.random.default_rng(0).standard_normal(wav.shape).astype(np.float32)
    direction /= np.linalg.norm(direction)
    eps = 3e-3
    numeric = (score(wav + eps * direction) - score(wav - eps * direction)) / (2 * eps)
    assert float(numeric) == pytest.approx(float(np.vdot(grad, direction)), rel=0.05, abs=1e-6)


@pytest.mark.parametrize("encoder", ["beats", "fbank_patches"])
def test_no_mask_means_every_sample_valid(encoder, levels):
    """apply(x, None) scores a clip as predict, an all-valid mask and padding do: fbank_patches'
    clip statistics once read frames past the last whole patch only without a mask."""
    cfg = (M.HAAQINetConfig(encoder_config=TINY_CFG) if encoder == "beats" else
           M.HAAQINetConfig(encoder_kind="fbank_patches",     # the default job's encoder
                            encoder_config={"clip_statistics": True, "position_dim": 8},
                            head=HeadConfig(audiogram_scale=0.01)))
    net = M.HAAQINet.init_random(cfg, seed=4)
    clip = _clips(11, [12500])[0]                  # not a whole number of patches
    hl = jnp.asarray(levels[:1], jnp.float32)
    model = M.HAAQINetModel(net.config)
    features = [model.apply({"params": net.params}, clip[None], mask, method="encode")[0]
                for mask in (None, np.zeros((1, clip.size), bool))]
    np.testing.assert_allclose(features[0], features[1], atol=1e-6)
    alone = float(net.apply(clip[None], None, hl).clip_score[0])
    masked = float(net.apply(clip[None], np.zeros((1, clip.size), bool), hl).clip_score[0])
    padded = np.zeros((1, 16000), np.float32)
    padded[0, :clip.size] = clip
    pad_mask = np.arange(16000)[None] >= clip.size
    in_padding = float(net.apply(padded, pad_mask, hl).clip_score[0])
    assert alone == pytest.approx(masked, abs=1e-6) and alone == pytest.approx(in_padding, abs=2e-5)
    assert alone == pytest.approx(float(net.predict([clip], SR, levels[:1], progress=False)[0]),
                                  abs=2e-5)


def test_encode_and_apply_check_their_inputs(weighted_net, levels):
    clips = _clips(9, [6000, 4000])
    wav = np.zeros((2, 6000), np.float32)
    wav[0], wav[1, :4000] = clips
    mask = np.arange(6000)[None] >= np.array([6000, 4000])[:, None]
    feats, tokens = weighted_net.encode(wav, mask)
    whole, whole_tokens = weighted_net.encode(wav[:1])              # no mask: all valid
    np.testing.assert_allclose(whole, feats[:1], atol=1e-4)      # batch of 1 vs 2: rounding
    assert whole_tokens.all() and not tokens[1].all()
    with pytest.raises(ValueError, match=r"padding_mask must have the waveform's shape "
                                         r"\(2, 6000\).*got \(2, 10\)"):
        weighted_net.encode(wav, mask[:, :10])                      # was: scores of 0
    with pytest.raises(ValueError, match=r"encode: waveform rows \[1\] have too few valid "
                                         r"samples \(\[0\]\).*at least 2800"):
        weighted_net.encode(wav, np.stack([mask[0], np.ones(6000, bool)]))
    with pytest.raises(ValueError, match=r"waveform must be \(B, N\).*got shape \(6000,\)"):
        weighted_net.encode(wav[0])
    with pytest.raises(ValueError, match=r"padding_mask must have the waveform's shape"):
        weighted_net.apply(wav, mask[:1], levels[:2])
    with pytest.raises(ValueError, match=r"audiogram must be \(B, 8\)"):
        weighted_net.apply(wav, mask, levels[:2, :7])
    # Values, where they are concrete: scores of 0 or NaN, or a misread clip, before.
    with pytest.raises(ValueError, match=r"HAAQINet.apply: waveform must be \(B, N\)"):
        weighted_net.apply(wav[0], None, levels[:1])                 # blamed the audiogram
    empty = np.stack([mask[0], np.ones(6000, bool)])
    with pytest.raises(ValueError, match=r"HAAQINet.apply: waveform rows \[1\] have too few "
                                         r"valid samples"):
        weighted_net.apply(wav, empty, levels[:2])                   # scored 0.0
    left = mask[:, ::-1].copy()                                      # padding first
    for call in (lambda: weighted_net.apply(wav[:, ::-1], left, levels[:2]),
                 lambda: weighted_net.encode(wav[:, ::-1], left)):
        with pytest.raises(ValueError, match=r"padding_mask: rows \[1\] have valid samples "
                                             r"after padded ones"):
            call()                                                   # read the wrong samples
    bad = levels[:2].copy()
    bad[1, 3] = np.nan
    with pytest.raises(ValueError, match=r"apply: audiogram row 1: level nan dB HL at 2000 Hz "
                                         r"\(index 3\)"):
        weighted_net.apply(wav, mask, bad)                           # scored NaN
    with pytest.raises(ValueError, match=r"apply: waveform rows \[0\] contain NaN"):
        weighted_net.apply(np.where((np.arange(2) == 0)[:, None] & (np.arange(6000) == 5),
                                    np.nan, wav), mask, levels[:2])
    with pytest.raises(ValueError, match=r"apply: waveform peak .* far outside \[-1, 1\]: integer PCM scale"):
        weighted_net.apply(wav * 32768, mask, levels[:2])
    with pytest.raises(ValueError, match=r"apply: waveform must be floating point"):
        weighted_net.apply((wav * 32767).astype(np.int16), mask, levels[:2])


def test_host_functions_refuse_tracers_by_name(weighted_net, levels):
    from haaqi_jax.haaqi import haaqi_batch, haaqi_v1
    wav = jnp.asarray(np.stack(_clips(10, [4000])))
    hl = levels[:1]
    with pytest.raises(TypeError, match=r"HAAQINet.predict prepares its input on the host.*"
                                        r"use HAAQINet.apply"):
        jax.jit(lambda w: weighted_net.predict(w, SR, hl[0]))(wav)
    with pytest.raises(TypeError, match=r"HAAQINet.encode prepares its input on the host"):
        jax.jit(lambda w: weighted_net.encode(w)[0])(wav)
    with pytest.raises(TypeError, match=r"haaqi_batch prepares its input on the host"):
        jax.jit(lambda w: haaqi_batch(w, w, SR, hl).combined)(wav)
    with pytest.raises(TypeError, match=r"haaqi_v1 prepares its input on the host"):
        jax.grad(lambda w: haaqi_v1(w, SR, w, SR, hl[0], 1)[0])(wav[0])
    # The traceable forward is: jit and vmap over it agree with the plain call.
    plain = weighted_net.apply(wav, None, hl).clip_score
    np.testing.assert_allclose(jax.jit(lambda w: weighted_net.apply(w, None, hl).clip_score)(
        wav), plain, atol=1e-6)


def test_predict_takes_audiogram_objects(weighted_net, levels):
    """haaqi_jax's and pyclarity's Audiogram, one for all clips or one per clip; an audiogram
    without some standard frequency is read by log-frequency interpolation."""
    from clarity.utils.audiogram import Audiogram as ClarityAudiogram

    from haaqi_jax import Audiogram
    clips = _clips(11, [4000, 5000])
    plain = weighted_net.predict(clips, SR, levels[:2], progress=False)
    ours = [Audiogram(levels[i]) for i in range(2)]
    np.testing.assert_array_equal(weighted_net.predict(clips, SR, ours, progress=False), plain)
    theirs = ClarityAudiogram(levels=levels[0], frequencies=np.array(M.STANDARD_FREQUENCIES))
    np.testing.assert_array_equal(weighted_net.predict(clips, SR, theirs, progress=False),
                                  weighted_net.predict(clips, SR, levels[0], progress=False))
    six = np.array([250, 500, 1000, 2000, 4000, 6000.0])
    sparse = Audiogram(levels[0][[0, 1, 2, 3, 5, 6]], six)
    expected = levels[0].copy()
    expected[4] = np.interp(np.log(3000), np.log(six), sparse.levels)   # 3000 Hz
    expected[7] = levels[0][6]                                          # 8000 Hz: held
    np.testing.assert_allclose(weighted_net.predict(clips, SR, sparse, progress=False),
                               weighted_net.predict(clips, SR, expected, progress=False),
                               atol=1e-6)
    with pytest.raises(ValueError, match=r"3 audiograms for 2 waveforms"):
        weighted_net.predict(clips, SR, ours + ours[:1], progress=False)


def test_few_compiled_shapes():
    from haaqi_jax.data.buckets import bucket_length
    lengths = np.linspace(3 * SR, 30 * SR, 60).astype(int)  # a folder of 3..30 s clips
    plan = M.plan_batches(lengths, 8)
    shapes = {(rows, n) for _, n, rows in plan}
    assert len(shapes) == len({bucket_length(n) for n in lengths}) <= 12, shapes
    assert sorted(i for idx, _, _ in plan for i in idx) == list(range(60))
    for idx, n, rows in plan:
        assert len(idx) <= rows == 8
        assert all(lengths[i] <= n <= 1.3 * lengths[i] + 1600 for i in idx)
    assert {rows for _, _, rows in M.plan_batches([5 * SR] * 3, 8)} == {4}


@pytest.mark.parametrize("mutate, message", [
    (lambda c, l: (c[:1] + [np.full(4000, np.nan, np.float32)], l), "item 1: sample 0 is NaN"),
    (lambda c, l: (c[:1] + [np.zeros(4000, np.float32)], l), "item 1: waveform is silent"),
    (lambda c, l: (c[:1] + [c[1][:2000]], l), "item 1: 2000 samples \\(0.125 s at 16 kHz\\) is too short"),
    (lambda c, l: (c[:1] + [np.stack([c[1], c[1]])], l), "item 1: expected a 1-D"),
    (lambda c, l: (c, l[:, :7]), "audiograms must be"),
    (lambda c, l: (c, np.concatenate([l, l[:1]])), "audiograms must be"),   # 3 for 2 clips
    (lambda c, l: (c, np.where(np.arange(8) == 3, 200.0, l)), "item 0 audiogram: level"),
    (lambda c, l: (c[:1] + [c[1].astype(np.int16)], l), "item 1: expected floating-point"),
    (lambda c, l: (c[:1] + [c[1] * 32767], l), "item 1: peak .* 16-bit integer values left "
                                               "unscaled"),
])
def test_predict_bad_input(weighted_net, levels, mutate, message):
    clips, lev = mutate(_clips(4, [4000, 4000]), levels[:2])
    with pytest.raises(ValueError, match=message):
        weighted_net.predict(clips, SR, lev, progress=False)


def test_predict_takes_bfloat16_and_warns_of_loud_clips(weighted_net, levels):
    """bfloat16 is floating point (numpy's own test said not); a clip peaking above 2 is
    scored as given, with a warning naming it."""
    clips = _clips(12, [4000, 5000])
    half = [jnp.asarray(c, jnp.bfloat16) for c in clips]
    np.testing.assert_array_equal(
        weighted_net.predict(half, SR, levels[:2], progress=False),
        weighted_net.predict([np.asarray(c, np.float32) for c in half], SR, levels[:2],
                             progress=False))
    loud = [clips[0], clips[1] * (3 / np.max(np.abs(clips[1])))]
    with pytest.warns(UserWarning, match=r"items \[1\] peak above 2"):
        weighted_net.predict(loud, SR, levels[:2], progress=False)


def test_predict_accepts_2d_array_and_one_audiogram(weighted_net, levels):
    clips = _clips(5, [5000, 5000])
    a = weighted_net.predict(np.stack(clips), SR, levels[0], progress=False)
    b = weighted_net.predict(clips, SR, np.stack([levels[0]] * 2), progress=False)
    np.testing.assert_allclose(a, b, atol=1e-6)
    c = weighted_net.predict(clips, SR, levels[0][None], progress=False)   # (1, 8): one for all
    np.testing.assert_allclose(c, b, atol=1e-6)
    with pytest.raises(ValueError, match="sample rate"):
        weighted_net.predict(clips, 0, levels[0], progress=False)
    # A rate no recording has: named, not "the waveform is empty" after resampling.
    for rate in (100, 10**9):
        with pytest.raises(ValueError, match=rf"sample rate {rate} Hz is not an audio rate"):
            weighted_net.predict(clips, rate, levels[0], progress=False)


def test_predict_zero_padded_rows_with_lengths(weighted_net, levels):
    clips = _clips(6, [6000, 4000])
    padded = np.zeros((2, 6000), np.float32)
    padded[0], padded[1, :4000] = clips
    alone = weighted_net.predict(clips, SR, levels[0], progress=False)
    trimmed = weighted_net.predict(padded, SR, levels[0], lengths=[6000, 4000], progress=None)
    np.testing.assert_allclose(trimmed, alone, atol=1e-6)
    # Without lengths every sample of a row is scored: the padded clip scores differently.
    whole = weighted_net.predict(padded, SR, levels[0], progress=False)
    assert abs(whole[1] - alone[1]) > 1e-4
    # A JAX array, and a whole-number float rate, work as a numpy array and an int do.
    one = weighted_net.predict(jnp.asarray(clips[0]), float(SR), levels[0], progress=False)
    np.testing.assert_allclose(one, alone[:1], atol=1e-6)


@pytest.mark.parametrize("call, error, message", [
    (lambda net, c, l: net.predict("clip.wav", SR, l), TypeError, "not file paths"),
    (lambda net, c, l: net.predict([Path("a.wav")], SR, l), TypeError, "not file paths"),
    (lambda net, c, l: net.predict(np.stack([c[0], c[0]], 1), SR, l), ValueError,
     "look like one clip of \\(samples, channels\\)"),
    (lambda net, c, l: net.predict(np.stack([c[0]] * 6, 1), SR, l), ValueError,   # 5.1 audio
     "look like one clip of \\(samples, channels\\)"),
    (lambda net, c, l: net.predict(np.stack(c), SR, l, lengths=[0, 3]), ValueError,
     "lengths must be"),
    (lambda net, c, l: net.predict(c, SR, l, lengths=[3, 3]), ValueError,
     "lengths is for a zero-padded"),
])
def test_predict_misuse_is_named(weighted_net, levels, call, error, message):
    with pytest.raises(error, match=message):
        call(weighted_net, _clips(7, [4000, 4000]), levels[0])


# ---------------------------------------------------------------- encoder registry hook


class _Out(NamedTuple):
    last_hidden_state: jax.Array
    hidden_states: tuple
    padding_mask: jax.Array


class _FrameEncoder(nn.Module):
    """A toy encoder with the BEATs token layout and token padding rule."""

    dim: int

    @nn.compact
    def __call__(self, wav, padding_mask, *, deterministic=True):
        batch, n = wav.shape
        tokens, frames = int(M.tokens_for_samples(n)), 1 + (n - 400) // 160
        x = wav[:, :160 * 2 * tokens].reshape(batch, tokens, 320)
        x = nn.Dense(self.dim)(x)
        if padding_mask is None:
            pad = jnp.zeros((batch, tokens), bool)
        else:
            c = n // frames
            f = padding_mask[:, :c * frames].reshape(batch, frames, c).all(-1)
            ct = frames // tokens
            pad = f[:, :ct * tokens].reshape(batch, tokens, ct).all(-1)
        return _Out(x, (x, jnp.tanh(x)), pad)


def test_registered_encoder_kind_is_used(levels, tmp_path):
    M.register_encoder("toy_frames", lambda cfg: _FrameEncoder(**cfg), lambda: {"dim": 12},
                       overwrite=True)
    with pytest.raises(ValueError, match="already registered"):
        M.register_encoder("toy_frames", lambda cfg: None, dict)
    # The same definition again (a config file that registers it, loaded twice): a no-op.
    build = M.encoder_spec("toy_frames").build
    M.register_encoder("toy_frames", build, lambda: {"dim": 12})
    net = M.HAAQINet.init_random(M.HAAQINetConfig(encoder_kind="toy_frames"), seed=0)
    assert net.params["encoder"]["Dense_0"]["kernel"].shape == (320, 12)
    assert net.config.encoder_config == {"dim": 12}
    scores = net.predict(_clips(6, [3000, 4000]), SR, levels[:2], progress=False)
    net.save(tmp_path / "toy")
    np.testing.assert_allclose(M.HAAQINet.load(tmp_path / "toy").predict(
        _clips(6, [3000, 4000]), SR, levels[:2], progress=False), scores, atol=1e-6)


class _TwoWidthEncoder(_FrameEncoder):
    """Hidden states of two widths (a pyramid-like encoder)."""

    @nn.compact
    def __call__(self, wav, padding_mask, *, deterministic=True):
        out = _FrameEncoder(self.dim)(wav, padding_mask)
        narrow = nn.Dense(self.dim // 2)(out.last_hidden_state)
        return _Out(narrow, (out.last_hidden_state, narrow), out.padding_mask)


def test_weighted_mode_over_hidden_states_of_two_widths_is_named():
    M.register_encoder("toy_two_widths", lambda cfg: _TwoWidthEncoder(**cfg),
                       lambda: {"dim": 12}, overwrite=True)
    config = M.HAAQINetConfig(encoder_kind="toy_two_widths", feature_mode="weighted",
                              feature_layers=(0, 1))
    with pytest.raises(ValueError, match=r"sums hidden states of one shape; encoder "
                                         r"'toy_two_widths' gives \{0: \(\d+, \d+, 12\), "
                                         r"1: \(\d+, \d+, 6\)\}"):
        M.HAAQINet.init_random(config, seed=0)


def test_unknown_encoder_kind_lists_every_builtin_kind():
    """In a fresh process (nothing imported yet) the error still lists all built-in kinds."""
    import os
    import subprocess
    import sys
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))
    code = ("from haaqi_jax.model import encoder_spec\n"
            "try:\n    encoder_spec('beatz')\nexcept ValueError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert "registered: ['beats', 'fbank_patches', 'student']" in out.stdout, out.stderr[-2000:]
