"""haaqi_jax.beats against speechbrain 1.1.2's BEATs (bit-identical to Microsoft's code),
with seeded random weights in the official checkpoint layout."""

from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import beats_reference as ref
from haaqi_jax.beats import (RELEASED_CONFIG, BEATs, BEATsConfig, RelativePositionBias,
                             check_waveform_batch, min_samples, relative_position_buckets)
from haaqi_jax.convert.beats_torch import beats_params_from_state_dict
from haaqi_jax.fbank import frame_padding_mask, kaldi_fbank, normalize_fbank, num_frames

SR = 16000


class Setup:
    """A reference model and our converted model for one configuration."""

    def __init__(self, cfg, seed, path):
        self.cfg = cfg
        self.state_dict = ref.make_beats_state_dict(cfg, seed)
        ref.save_official_checkpoint(path, cfg, self.state_dict,
                                     finetuned=cfg.get("finetuned_model", False))
        self.speechbrain = ref.speechbrain_beats(path)
        self.params = beats_params_from_state_dict(self.state_dict, cfg)
        self.model = BEATs(BEATsConfig.from_dict(cfg))
        variables = {"params": self.params}
        self.encode_fbank = jax.jit(functools.partial(
            self.model.apply, variables, method=BEATs.encode_fbank))
        self.encode_wave = jax.jit(functools.partial(self.model.apply, variables))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return Setup(ref.TINY_CFG, 0, tmp_path_factory.mktemp("tiny") / "tiny.pt")


@pytest.fixture(scope="module")
def tiny_finetuned(tmp_path_factory):
    cfg = dict(ref.TINY_CFG, finetuned_model=True)
    return Setup(cfg, 1, tmp_path_factory.mktemp("ft") / "tiny_ft.pt")


def _batch(lengths, n, seed):
    rng = np.random.default_rng(seed)
    wav = np.zeros((len(lengths), n), np.float32)
    for i, length in enumerate(lengths):
        wav[i, :length] = np.clip(0.2 * rng.normal(size=length), -1, 1)
    pad = np.arange(n)[None, :] >= np.asarray(lengths)[:, None]
    return wav, pad


def _compare_with_speechbrain(setup, kaldi, lengths, n, seed, atol_wave, reuse_compiled=False):
    """Same fbank: every hidden state within 1e-4; from the waveform: within atol_wave.

    reuse_compiled: take the waveform path as our kaldi_fbank + the already compiled
    encode_fbank (saves a second full-size compilation; BEATs.__call__'s glue is covered by
    the tiny configuration)."""
    wav, pad = _batch(lengths, n, seed)
    fbank = ref.torch_kaldi_fbank(kaldi, wav)
    n_frames = fbank.shape[1]
    expected, _ = ref.speechbrain_hidden_states(setup.speechbrain, wav, lengths, fbank=fbank)
    _, expected_tokens = ref.reference_padding_masks(n, lengths, n_frames, (n_frames // 16) * 8)

    frame_pad = frame_padding_mask(jnp.asarray(pad), n_frames)
    out = setup.encode_fbank(jnp.asarray(fbank), frame_pad)
    np.testing.assert_array_equal(np.asarray(out.padding_mask), expected_tokens)
    assert len(out.hidden_states) == setup.cfg["encoder_layers"] + 1 == len(expected)
    for i, (ours, theirs) in enumerate(zip(out.hidden_states, expected)):
        np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=0,
                                   err_msg=f"hidden state {i} (same fbank)")
    np.testing.assert_array_equal(np.asarray(out.last_hidden_state),
                                  np.asarray(out.hidden_states[-1]))

    expected_wave, _ = ref.speechbrain_hidden_states(setup.speechbrain, wav, lengths)
    if reuse_compiled:
        our_fbank, _ = jax.jit(kaldi_fbank)(jnp.asarray(wav))
        out_wave = setup.encode_fbank(normalize_fbank(our_fbank), frame_pad)
    else:
        out_wave = setup.encode_wave(jnp.asarray(wav), jnp.asarray(pad))
    for i, (ours, theirs) in enumerate(zip(out_wave.hidden_states, expected_wave)):
        np.testing.assert_allclose(np.asarray(ours), theirs, atol=atol_wave, rtol=0,
                                   err_msg=f"hidden state {i} (from waveform)")


def test_tiny_matches_speechbrain(tiny, kaldi):
    # Unaligned lengths: exercises the reference's odd sample -> frame -> token mask rule.
    _compare_with_speechbrain(tiny, kaldi, [3 * SR + 111, 2 * SR - 77, 5000], 3 * SR + 111,
                              seed=0, atol_wave=1e-3)


def test_relative_position_buckets_host_memory_is_one_result():
    """A whole song is ~50 tokens/s: the (T, T) table's int64 temporaries must not multiply its
    size (they once took 12 times as much host memory)."""
    import tracemalloc
    n = 2000
    tracemalloc.start()
    try:
        ours = relative_position_buckets(n, 320, 800)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert ours.shape == (n, n) and ours.dtype == np.int32
    assert peak <= 1.25 * ours.nbytes + 2 ** 20, (peak, ours.nbytes)


def test_long_input_path_matches_speechbrain(tiny, kaldi, query_blocks):
    """The path of long inputs (attention in query blocks, the relative position bias as
    diagonals, never a (H, T, T) table) gives speechbrain's hidden states."""
    from haaqi_jax import attention
    variables = {"params": tiny.params}
    long_path = types.SimpleNamespace(
        cfg=tiny.cfg, speechbrain=tiny.speechbrain,
        encode_wave=jax.jit(functools.partial(tiny.model.apply, variables)),
        encode_fbank=jax.jit(functools.partial(tiny.model.apply, variables,
                                               method=BEATs.encode_fbank)))
    bias = RelativePositionBias(tiny.model.config).apply(
        {"params": tiny.params["relative_position_bias"]}, 150)
    assert isinstance(bias, attention.ToeplitzBias)
    _compare_with_speechbrain(long_path, kaldi, [3 * SR + 111, 2 * SR - 77, 5000], 3 * SR + 111,
                              seed=0, atol_wave=1e-3)


@pytest.mark.slow
def test_released_size_matches_speechbrain(kaldi, tmp_path):
    released = Setup(ref.RELEASED_CFG, 2, tmp_path / "released.pt")
    assert sum(x.size for x in jax.tree_util.tree_leaves(released.params)) == 90_311_792
    _compare_with_speechbrain(released, kaldi, [2 * SR, SR + 555], 2 * SR, seed=1,
                              atol_wave=1e-3, reuse_compiled=True)


def test_relative_position_buckets_match_reference():
    from speechbrain.lobes.models.beats import MultiheadAttention
    for num_buckets, max_distance in [(320, 800), (32, 128)]:
        attention = MultiheadAttention(16, 2, self_attention=True,
                                       has_relative_attention_bias=True,
                                       num_buckets=num_buckets, max_distance=max_distance)
        positions = torch.arange(1500)
        expected = attention._relative_positions_bucket(positions[None, :] - positions[:, None])
        ours = relative_position_buckets(1500, num_buckets, max_distance)
        np.testing.assert_array_equal(ours, expected.numpy())


def _aligned_length(n_batch, target):
    """A clip length whose tokens in a batch of width n_batch are exactly its own tokens alone.

    The reference rule (N // F samples per frame, about 2 frames per token) drifts from the
    16-frame patch grid, so only some lengths align: for N = 48000 (161 samples per frame) a
    patch count k >= 15 has lengths in [2560 k + 240, 2576 k]; shorter clips never align, and
    nor does any clip when N // F == 160 (they get one or two extra valid tokens).
    """
    n_frames = num_frames(n_batch)
    n_tokens = (n_frames // 16) * 8
    for length in range(target, target + 4000):
        _, tokens = ref.reference_padding_masks(n_batch, [length], n_frames, n_tokens)
        if (~tokens).sum() == (num_frames(length) // 16) * 8:
            return length
    raise AssertionError("no aligned length found")


def test_padded_batch_equals_items_alone(tiny):
    n = 3 * SR
    lengths = [n, _aligned_length(n, 41000)]
    wav, pad = _batch(lengths, n, seed=5)
    batched = tiny.encode_wave(jnp.asarray(wav), jnp.asarray(pad))
    for i, length in enumerate(lengths):
        alone = tiny.encode_wave(jnp.asarray(wav[i:i + 1, :length]))
        n_tokens = alone.last_hidden_state.shape[1]
        assert int((~batched.padding_mask[i]).sum()) == n_tokens
        for layer, (b, a) in enumerate(zip(batched.hidden_states, alone.hidden_states)):
            np.testing.assert_allclose(np.asarray(b[i, :n_tokens]), np.asarray(a[0]),
                                       atol=1e-4, err_msg=f"item {i}, hidden state {layer}")

    # Feature level: frame counts that are whole patches give the same guarantee.
    rng = np.random.default_rng(6)
    fbank = rng.normal(size=(2, 160, 128)).astype(np.float32)
    frame_pad = np.arange(160)[None, :] >= np.array([160, 96])[:, None]
    batched = tiny.encode_fbank(jnp.asarray(fbank), jnp.asarray(frame_pad))
    alone = tiny.encode_fbank(jnp.asarray(fbank[1:, :96]))
    np.testing.assert_allclose(np.asarray(batched.last_hidden_state[1, :48]),
                               np.asarray(alone.last_hidden_state[0]), atol=1e-4)


def test_jit_equals_eager(tiny):
    wav, pad = _batch([6000, 4000], 6000, seed=7)
    eager = tiny.model.apply({"params": tiny.params}, jnp.asarray(wav), jnp.asarray(pad))
    jitted = tiny.encode_wave(jnp.asarray(wav), jnp.asarray(pad))
    for e, j in zip(eager.hidden_states, jitted.hidden_states):
        np.testing.assert_allclose(np.asarray(j), np.asarray(e), atol=1e-5)


def test_finetuned_predictor(tiny_finetuned, kaldi):
    setup = tiny_finetuned
    n = 2 * SR
    lengths = [n, SR + 999]
    wav, pad = _batch(lengths, n, seed=8)
    fbank = ref.torch_kaldi_fbank(kaldi, wav)
    hidden, probs = ref.speechbrain_hidden_states(setup.speechbrain, wav, lengths, fbank=fbank)
    out = setup.encode_fbank(jnp.asarray(fbank),
                             frame_padding_mask(jnp.asarray(pad), fbank.shape[1]))
    assert out.probs.shape == (2, 527)
    np.testing.assert_allclose(np.asarray(out.probs), probs, atol=1e-5)
    # logits: masked time mean of the predictor, computed here in torch.
    weight, bias = setup.state_dict["predictor.weight"], setup.state_dict["predictor.bias"]
    token_logits = torch.from_numpy(hidden[-1]) @ weight.T + bias
    valid = torch.from_numpy(~np.asarray(out.padding_mask)).float()[..., None]
    logits = (token_logits * valid).sum(1) / valid.sum(1)
    np.testing.assert_allclose(np.asarray(out.logits), logits.numpy(), atol=1e-4)


def test_non_finetuned_has_no_predictor(tiny):
    out = tiny.encode_wave(jnp.zeros((1, SR)))
    assert out.logits is None and out.probs is None
    assert "predictor" not in tiny.params


def test_config_from_dict():
    cfg = BEATsConfig.from_dict({**RELEASED_CONFIG, "some_future_key": 3})
    assert cfg.deep_norm and cfg.max_distance == 800 and cfg.encoder_layers == 12
    assert BEATsConfig.from_dict(cfg.to_dict()) == cfg
    assert BEATsConfig.from_dict(ref.RELEASED_CFG) == cfg
    assert BEATsConfig().deep_norm is False       # class defaults = the reference's defaults
    with pytest.raises(ValueError, match="divisible"):
        BEATsConfig(encoder_embed_dim=100, encoder_attention_heads=12)
    with pytest.raises(ValueError, match="layer_norm_first"):
        BEATsConfig(layer_norm_first=True)


@pytest.mark.parametrize("bad, match", [
    (np.zeros((1, 2, SR), np.float32), "channel"),
    (np.zeros((SR,), np.float32), "batch axis"),
    (np.zeros((1, SR), np.int16), "dtype int16"),
    (np.full((2, SR), np.nan, np.float32), "NaN or inf"),
    (np.concatenate([np.zeros((1, SR)), np.full((1, SR), np.inf)]).astype(np.float32),
     r"rows \[1\]"),
    (np.zeros((1, min_samples() - 1), np.float32), "at least"),
    (np.full((1, SR), 20000.0, np.float32), "PCM"),
    (np.full((1, SR), 100.0, np.float32), "PCM"),       # quiet int16 audio cast to float
])
def test_bad_waveforms_raise(tiny, bad, match):
    with pytest.raises(ValueError, match=match):
        check_waveform_batch(bad)
    with pytest.raises(ValueError, match=match):
        tiny.model.apply({"params": tiny.params}, bad)


def test_bad_masks_and_fbank_raise(tiny):
    wav = np.zeros((2, SR), np.float32)
    with pytest.raises(ValueError, match="padding_mask shape"):
        check_waveform_batch(wav, np.zeros((2, SR + 1), bool))
    with pytest.raises(ValueError, match="bool"):
        check_waveform_batch(wav, np.zeros((2, SR), np.int32))
    # Nested lists are masks too: checked as arrays (their dtype was read off the list, an
    # AttributeError), a list of 0 / 1 refused as not bool like an int array.
    check_waveform_batch(wav, [[False] * SR] * 2)
    with pytest.raises(ValueError, match="bool"):
        check_waveform_batch(wav, [[0] * SR] * 2)
    # A row whose mask leaves no token valid under the reference's reduction rule.
    empty = np.arange(SR)[None, :] >= np.array([[SR], [0]])
    with pytest.raises(ValueError, match=r"rows \[1\].*too few valid samples"):
        tiny.model.apply({"params": tiny.params}, wav, empty)
    # A one-patch clip padded into a long batch keeps its token(s) even though fewer than
    # min_samples() samples stay unmasked (HAAQI-Net pads that way to match the clip alone).
    from haaqi_jax.model import encoder_padding_mask
    one_patch = np.asarray(encoder_padding_mask(jnp.array([SR, min_samples()]), SR))
    assert (~one_patch[1]).sum() < min_samples()
    out = tiny.model.apply({"params": tiny.params}, wav, one_patch)
    assert (~np.asarray(out.padding_mask[1])).sum() == 8
    with pytest.raises(ValueError, match="at least 16"):
        tiny.model.apply({"params": tiny.params}, jnp.zeros((1, 15, 128)),
                         method=BEATs.encode_fbank)
    min_ok = np.zeros((1, min_samples()), np.float32)
    assert tiny.encode_wave(jnp.asarray(min_ok)).last_hidden_state.shape == (1, 8, 64)


def test_dropout_active_only_when_not_deterministic():
    cfg = BEATsConfig.from_dict(dict(ref.TINY_CFG, dropout=0.3))
    model = BEATs(cfg)
    fbank = jnp.asarray(np.random.default_rng(0).normal(size=(1, 32, 128)).astype(np.float32))
    params = jax.jit(functools.partial(model.init, method=BEATs.encode_fbank))(
        jax.random.key(0), fbank)["params"]

    @jax.jit
    def run(key):
        a = model.apply({"params": params}, fbank, method=BEATs.encode_fbank)
        b = model.apply({"params": params}, fbank, deterministic=False,
                        rngs={"dropout": key}, method=BEATs.encode_fbank)
        c = model.apply({"params": params}, fbank, method=BEATs.encode_fbank)
        return a.last_hidden_state, b.last_hidden_state, c.last_hidden_state

    a, b, c = run(jax.random.key(1))
    assert np.abs(np.asarray(a - b)).max() > 1e-3
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


def test_length_buckets():
    from haaqi_jax.data.buckets import bucket_length, pad_to_bucket
    rungs = sorted({bucket_length(n) for n in range(1, 60 * SR, 1001)})
    assert rungs[0] == SR and len(rungs) <= 25
    assert all(b / a <= 1.25 + 1600 / a for a, b in zip(rungs, rungs[1:]))
    assert all(bucket_length(r) == r and bucket_length(r + 1) > r for r in rungs)
    batch, pad = pad_to_bucket([np.ones(5000), np.ones(SR + 1, np.float32)])
    assert batch.shape == pad.shape == (2, bucket_length(SR + 1)) and batch.dtype == np.float32
    np.testing.assert_array_equal((~pad).sum(1), [5000, SR + 1])
    assert batch[pad].sum() == 0 and batch[~pad].min() == 1
    with pytest.raises(ValueError, match="waveform 1 must be 1-D"):
        pad_to_bucket([np.ones(10), np.ones((2, 10))])
    with pytest.raises(ValueError, match="waveform 0 has dtype int16"):
        pad_to_bucket([np.ones(10, np.int16)])


def test_same_bucket_does_not_recompile(tiny):
    from haaqi_jax.data.buckets import pad_to_bucket
    forward = jax.jit(lambda w, m: tiny.model.apply({"params": tiny.params}, w, m)
                      .last_hidden_state)
    rng = np.random.default_rng(9)
    first = pad_to_bucket([0.1 * rng.normal(size=SR + 100).astype(np.float32)])
    second = pad_to_bucket([0.1 * rng.normal(size=SR + 3000).astype(np.float32)])
    assert first[0].shape == second[0].shape
    forward(*map(jnp.asarray, first)).block_until_ready()
    forward(*map(jnp.asarray, second)).block_until_ready()
    assert forward._cache_size() == 1
