"""HAAQINetHead vs a PyTorch head built from nn.LSTM / nn.Linear / nn.MultiheadAttention."""

from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haaqi_jax.convert.haaqinet_torch import head_params_from_state_dict
from haaqi_jax.head import BLSTM, HAAQINetHead, HeadConfig, reverse_valid
from haaqinet_reference import make_head, torch_head_scores

LENGTHS = (37, 16, 29)
TOL = 1e-4


def _padded(items, length):
    """list of (..., T_b, C) -> (B, ..., length, C) zero-padded on the T axis, mask (B, length)."""
    out = np.zeros((len(items),) + items[0].shape[:-2] + (length, items[0].shape[-1]), np.float32)
    mask = np.zeros((len(items), length), bool)
    for b, x in enumerate(items):
        out[b, ..., :x.shape[-2], :] = x
        mask[b, :x.shape[-2]] = True
    return out, mask


def _run(head_cfg, params, feats, mask, hl, **kw):
    apply = jax.jit(HAAQINetHead(head_cfg).apply, static_argnames="deterministic")
    return apply({"params": params}, jnp.asarray(feats), jnp.asarray(mask), jnp.asarray(hl), **kw)


def _assert_padded_batch_matches_torch(torch_head, cfg, params, items, audiograms):
    """Our head on the zero-padded batch of `items` == the torch head on each item alone
    (clip and frame scores; padded frames 0). Returns (our output, padded features, mask)."""
    frames_ref, clips_ref = torch_head_scores(torch_head, items, audiograms)
    feats, mask = _padded(items, max(LENGTHS) + 3)
    out = _run(cfg, params, feats, mask, audiograms)
    np.testing.assert_allclose(np.asarray(out.clip_score), clips_ref, atol=TOL, rtol=0)
    for b, t in enumerate(LENGTHS):
        np.testing.assert_allclose(np.asarray(out.frame_scores[b, :t]), frames_ref[b], atol=TOL,
                                   rtol=0)
        assert np.all(np.asarray(out.frame_scores[b, t:]) == 0.0)
    return out, feats, mask


@pytest.fixture(scope="module")
def audiograms():
    rng = np.random.default_rng(0)
    return rng.uniform(0, 80, (len(LENGTHS), 8)).astype(np.float32)


def test_clips_of_one_and_two_tokens_match_torch(audiograms):
    """The clip score is the mean over each item's own valid frames, down to a single one."""
    torch_head = make_head(1, feature_dim=768)
    params, cfg = head_params_from_state_dict(torch_head.state_dict())
    rng = np.random.default_rng(4)
    items = [rng.normal(size=(t, 768)).astype(np.float32) for t in (1, 2, 5)]
    frames_ref, clips_ref = torch_head_scores(torch_head, items, audiograms)
    feats, mask = _padded(items, 8)
    out = _run(cfg, params, feats, mask, audiograms)
    np.testing.assert_allclose(np.asarray(out.clip_score), clips_ref, atol=TOL, rtol=0)
    for b, item in enumerate(items):
        np.testing.assert_allclose(np.asarray(out.frame_scores[b, :len(item)]), frames_ref[b],
                                   atol=TOL, rtol=0)


@pytest.mark.parametrize("num_layers, path", [(0, "short"), (12, "short"), (0, "long")])
def test_head_matches_torch_per_item(num_layers, path, audiograms, request):
    if path == "long":
        request.getfixturevalue("query_blocks")  # attention in blocks of 8 queries
    torch_head = make_head(1 + num_layers, feature_dim=768, num_weighted_layers=num_layers)
    params, cfg = head_params_from_state_dict(torch_head.state_dict())
    assert cfg.num_weighted_layers == num_layers and cfg.lstm_hidden == 100
    rng = np.random.default_rng(2)
    shape = (num_layers,) if num_layers else ()
    items = [rng.normal(size=shape + (t, 768)).astype(np.float32) for t in LENGTHS]
    out, feats, mask = _assert_padded_batch_matches_torch(torch_head, cfg, params, items,
                                                          audiograms)
    # The scores must depend on the audiogram (it is concatenated on every token).
    out2 = _run(cfg, params, feats, mask, audiograms + 10.0)
    assert np.max(np.abs(np.asarray(out2.clip_score - out.clip_score))) > 1e-4


@pytest.mark.parametrize("path", ["short", "long"])
def test_head_gradients_match_torch_autograd(path, audiograms, request):
    """Training sees the same gradients as the released head: the attention's folded value /
    output / frame-score maps must give torch's gradients for every parameter (also on the
    long-input path, the attention's queries in blocks under jax.checkpoint)."""
    import torch

    if path == "long":
        request.getfixturevalue("query_blocks")

    torch_head = make_head(9, feature_dim=64).train(False)
    params, cfg = head_params_from_state_dict(torch_head.state_dict())
    rng = np.random.default_rng(5)
    items = [rng.normal(size=(t, 64)).astype(np.float32) for t in LENGTHS]
    total = sum(torch_head(torch.from_numpy(x)[None], torch.from_numpy(hl)[None])[1][0]
                for x, hl in zip(items, audiograms))
    total.backward()
    # PyTorch's two LSTM biases add up in the converted kernel: each gets the same gradient,
    # so keep one of them to convert the gradients like the weights.
    grads = {k: (torch.zeros_like(p) if "bias_hh" in k else p.grad)
             for k, p in torch_head.named_parameters()}
    expected, _ = head_params_from_state_dict(grads)

    feats, mask = _padded(items, max(LENGTHS) + 3)
    loss = lambda p: HAAQINetHead(cfg).apply(  # noqa: E731
        {"params": p}, jnp.asarray(feats), jnp.asarray(mask), jnp.asarray(audiograms)
    ).clip_score.sum()
    got = jax.jit(jax.grad(loss))(params)
    flat_expected = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    for path, g in jax.tree_util.tree_flatten_with_path(got)[0]:
        want = np.asarray(flat_expected[path])
        scale = max(np.max(np.abs(want)), 1e-3)
        np.testing.assert_allclose(np.asarray(g), want, atol=1e-4 * scale, rtol=0,
                                   err_msg=jax.tree_util.keystr(path))


def test_components_readout_matches_torch(audiograms):
    """readout "haaqi_components": two sigmoids per frame (a torch head with a 256 -> 2 frame
    score), their masked means, and HAAQI's polynomial of both (checked against pyclarity in
    test_haaqi_backend)."""
    import dataclasses

    from haaqi_jax.haaqi.backend import combined_from_parts

    torch_head = make_head(10, feature_dim=64, score_outputs=2)
    sd = torch_head.state_dict()
    weight, bias = sd["haaqiframe_score.weight"], sd["haaqiframe_score.bias"]
    params, cfg = head_params_from_state_dict(
        dict(sd, **{"haaqiframe_score.weight": weight[:1], "haaqiframe_score.bias": bias[:1]}))
    params["frame_score"] = {"kernel": weight.numpy().T, "bias": bias.numpy()}
    cfg = dataclasses.replace(cfg, readout="haaqi_components")
    rng = np.random.default_rng(6)
    items = [rng.normal(size=(t, 64)).astype(np.float32) for t in LENGTHS]
    frames_ref, _ = torch_head_scores(torch_head, items, audiograms)
    feats, mask = _padded(items, max(LENGTHS) + 3)
    out = _run(cfg, params, feats, mask, audiograms)
    for b, t in enumerate(LENGTHS):
        parts = frames_ref[b]                                            # (t, 2)
        np.testing.assert_allclose(np.asarray(out.frame_components[b, :t]), parts, atol=TOL)
        np.testing.assert_allclose(np.asarray(out.clip_components[b]), parts.mean(0), atol=TOL)
        np.testing.assert_allclose(np.asarray(out.frame_scores[b, :t]),
                                   combined_from_parts(parts[:, 0], parts[:, 1]), atol=TOL)
        np.testing.assert_allclose(float(out.clip_score[b]),
                                   combined_from_parts(*parts.mean(0)), atol=TOL)
        assert np.all(np.asarray(out.frame_scores[b, t:]) == 0.0)
        assert np.all(np.asarray(out.frame_components[b, t:]) == 0.0)
    plain = _run(dataclasses.replace(cfg, readout="score"),
                 dict(params, frame_score={"kernel": weight.numpy().T[:, :1],
                                           "bias": bias.numpy()[:1]}), feats, mask, audiograms)
    assert plain.frame_components is None and plain.clip_components is None
    with pytest.raises(ValueError, match="readout"):
        HeadConfig(readout="components")


def test_masking_matters_and_is_complete(audiograms):
    """Padding content must not move the scores; dropping the mask must (test can fail)."""
    torch_head = make_head(5, feature_dim=64)
    params, cfg = head_params_from_state_dict(torch_head.state_dict())
    rng = np.random.default_rng(3)
    items = [rng.normal(size=(t, 64)).astype(np.float32) for t in LENGTHS]
    feats, mask = _padded(items, max(LENGTHS) + 5)
    base = _run(cfg, params, feats, mask, audiograms)

    noisy = feats + (~mask)[..., None] * rng.normal(size=feats.shape).astype(np.float32) * 5
    moved = _run(cfg, params, noisy, mask, audiograms)
    np.testing.assert_allclose(np.asarray(moved.clip_score), np.asarray(base.clip_score),
                               atol=1e-6, rtol=0)
    unmasked = _run(cfg, params, noisy, np.ones_like(mask), audiograms)
    assert np.max(np.abs(np.asarray(unmasked.clip_score - base.clip_score))) > 1e-3


def test_blstm_backward_direction_skips_padding():
    rng = np.random.default_rng(4)
    lengths = np.array([7, 12, 4])
    x = rng.normal(size=(3, 12, 10)).astype(np.float32)
    x_pad = np.where(np.arange(12)[None, :, None] < lengths[:, None, None], x, 3.0)
    layer = BLSTM(6)
    params = jax.jit(layer.init)(jax.random.key(0), x, lengths)
    apply = jax.jit(layer.apply)
    masked = np.asarray(apply(params, x_pad, lengths))
    for b, t in enumerate(lengths):
        alone = np.asarray(apply(params, x[b:b + 1, :t], np.array([t])))[0]
        np.testing.assert_allclose(masked[b, :t], alone, atol=1e-6)
    # Without lengths the padding reaches the backward half of valid steps (forward half is
    # unaffected because padding comes last).
    full = np.asarray(apply(params, x_pad, np.full(3, 12)))
    assert np.allclose(full[0, :7, :6], masked[0, :7, :6], atol=1e-6)
    assert np.max(np.abs(full[0, :7, 6:] - masked[0, :7, 6:])) > 1e-3
    np.testing.assert_array_equal(np.asarray(reverse_valid(reverse_valid(x, lengths), lengths)), x)


def test_dropout_only_when_not_deterministic(audiograms):
    torch_head = make_head(6, feature_dim=64)
    params, cfg = head_params_from_state_dict(torch_head.state_dict())
    feats, mask = _padded([np.ones((20, 64), np.float32)] * 3, 20)
    a = _run(cfg, params, feats, mask, audiograms)
    b = _run(cfg, params, feats, mask, audiograms, deterministic=True)
    np.testing.assert_array_equal(np.asarray(a.clip_score), np.asarray(b.clip_score))
    c = _run(cfg, params, feats, mask, audiograms, deterministic=False,
             rngs={"dropout": jax.random.key(1)})
    assert np.max(np.abs(np.asarray(c.clip_score - a.clip_score))) > 1e-5


def test_stacked_blstm_matches_torch(audiograms):
    """A head with nn.LSTM(num_layers=3) (the authors' trainer config stacks 6): each layer
    reads the previous one's [forward, backward] outputs; dropout between the layers only in
    training."""
    torch_head = make_head(12, feature_dim=64, lstm_hidden=24, lstm_layers=3, lstm_dropout=0.5)
    params, cfg = head_params_from_state_dict(torch_head.state_dict())
    assert cfg.lstm_layers == 3 and cfg.lstm_hidden == 24
    assert sorted(params["blstm"]) == ["backward", "backward_1", "backward_2", "forward",
                                       "forward_1", "forward_2"]
    rng = np.random.default_rng(3)
    items = [rng.normal(size=(t, 64)).astype(np.float32) for t in LENGTHS]
    out, feats, mask = _assert_padded_batch_matches_torch(torch_head, cfg, params, items,
                                                          audiograms)
    clips_ref = np.asarray(out.clip_score)   # equal to torch's (checked just above)
    # The first layer alone scores differently: the later layers are really applied.
    first = {**params, "blstm": {k: params["blstm"][k] for k in ("forward", "backward")}}
    alone = _run(dataclasses.replace(cfg, lstm_layers=1), first, feats, mask, audiograms)
    assert np.max(np.abs(np.asarray(alone.clip_score - out.clip_score))) > 1e-3
    # Dropout between layers: only that dropout is on here (the head's own rate is 0).
    cfg_drop = dataclasses.replace(cfg, dropout_rate=0.0, lstm_dropout_rate=0.5)
    quiet = _run(dataclasses.replace(cfg_drop, lstm_dropout_rate=0.0), params, feats, mask,
                 audiograms, deterministic=False, rngs={"dropout": jax.random.key(1)})
    np.testing.assert_allclose(np.asarray(quiet.clip_score), clips_ref, atol=TOL, rtol=0)
    noisy = _run(cfg_drop, params, feats, mask, audiograms, deterministic=False,
                 rngs={"dropout": jax.random.key(1)})
    assert np.max(np.abs(np.asarray(noisy.clip_score) - clips_ref)) > 1e-4
    with pytest.raises(ValueError, match="lstm_layers"):
        HeadConfig(lstm_layers=0)


@pytest.mark.parametrize("lstm_layers", [1, 2])
def test_head_init_tree_matches_conversion(lstm_layers):
    torch_head = make_head(7, feature_dim=64, num_weighted_layers=3, lstm_layers=lstm_layers)
    params, cfg = head_params_from_state_dict(torch_head.state_dict())
    init = jax.jit(HAAQINetHead(cfg).init)(jax.random.key(0), jnp.zeros((1, 3, 5, 64)),
                                           jnp.ones((1, 5), bool), jnp.zeros((1, 8)))["params"]
    shapes = lambda t: jax.tree_util.tree_map(lambda a: tuple(a.shape), t)  # noqa: E731
    assert shapes(init) == shapes(params)
    # Uniform initial layer weights, as released (torch.ones before the softmax).
    np.testing.assert_array_equal(np.asarray(init["layer_weights"]), np.ones(3))


def test_bad_shapes_are_value_errors():
    cfg = HeadConfig(num_weighted_layers=2)
    head = HAAQINetHead(cfg)
    with pytest.raises(ValueError, match="stacked features"):
        head.init(jax.random.key(0), jnp.zeros((1, 5, 64)), jnp.ones((1, 5), bool),
                  jnp.zeros((1, 8)))
    head = HAAQINetHead(HeadConfig())
    with pytest.raises(ValueError, match="audiogram shape"):
        head.init(jax.random.key(0), jnp.zeros((1, 5, 64)), jnp.ones((1, 5), bool),
                  jnp.zeros((1, 6)))
    with pytest.raises(ValueError, match="token_mask shape"):
        head.init(jax.random.key(0), jnp.zeros((1, 5, 64)), jnp.ones((1, 4), bool),
                  jnp.zeros((1, 8)))
    with pytest.raises(ValueError, match="divisible"):
        HeadConfig(dense_dim=250)
    # Valid tokens must come first: the BLSTM reads their count, the attention the mask.
    params = head.init(jax.random.key(0), jnp.zeros((2, 6, 64)), jnp.ones((2, 6), bool),
                       jnp.zeros((2, 8)))
    gaps = jnp.asarray([[1, 1, 1, 1, 1, 1], [1, 0, 1, 0, 1, 0]], bool)
    with pytest.raises(ValueError, match=r"token_mask: rows \[1\] have valid tokens after "
                                         r"padded ones"):
        head.apply(params, jnp.zeros((2, 6, 64)), gaps, jnp.zeros((2, 8)))


def test_head_conversion_is_strict():
    sd = {k: v.clone() for k, v in make_head(8, feature_dim=64).state_dict().items()}
    bad = dict(sd)
    del bad["blstm.bias_hh_l0_reverse"]
    with pytest.raises(ValueError, match="blstm.bias_hh_l0_reverse"):
        head_params_from_state_dict(bad)
    bad = dict(sd, extra_thing=sd["linear0.bias"])
    with pytest.raises(ValueError, match="extra_thing"):
        head_params_from_state_dict(bad)
    bad = dict(sd)
    bad["haaqiAtt_layer.out_proj.weight"] = sd["haaqiAtt_layer.out_proj.weight"][:, :10]
    with pytest.raises(ValueError, match="haaqiAtt_layer.out_proj.weight"):
        head_params_from_state_dict(bad)
    stacked = make_head(8, feature_dim=64, lstm_layers=3).state_dict()
    bad = dict(stacked)
    del bad["blstm.bias_hh_l2_reverse"]
    with pytest.raises(ValueError, match="blstm.bias_hh_l2_reverse"):
        head_params_from_state_dict(bad)
    bad = dict(stacked, **{"blstm.weight_ih_l1": stacked["blstm.weight_ih_l1"][:, :7]})
    with pytest.raises(ValueError, match=r"blstm.weight_ih_l1.*expected \(400, 200\)"):
        head_params_from_state_dict(bad)


@pytest.mark.parametrize("name", ["adapter_dim", "lstm_hidden", "dense_dim", "num_heads"])
@pytest.mark.parametrize("value", [0, -16])
def test_a_width_below_one_is_refused_by_name(name, value):
    """`--set model.head.adapter_dim=0` ended train.py with flax's ZeroDivisionError
    traceback from the initialiser, and num_heads=0 with Python's "integer modulo by zero";
    a 0 dense_dim passed the divisibility check."""
    with pytest.raises(ValueError, match=rf"HeadConfig: {name} must be a whole number >= 1, "
                                         rf"got {value}"):
        HeadConfig(**{name: value})
