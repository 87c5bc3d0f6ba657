"""haaqi_jax.attention.attend vs torch's scaled_dot_product_attention; its two batch paths
(one item per step, as on a CPU, and the whole batch at once, as on accelerators) agree."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from haaqi_jax.attention import (ToeplitzBias, attend, default_items_per_step,
                                 default_query_block)

B, H, T, D = 3, 4, 11, 8
VALID = (11, 7, 0)  # the last item has no valid key at all (a dummy batch filler)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((B, H, T, D)).astype(np.float32) for _ in range(3))
    bias = rng.standard_normal((H, T, T)).astype(np.float32)
    gate = rng.uniform(0.5, 2.0, (B, H, T, 1)).astype(np.float32)
    key_valid = np.arange(T)[None, :] < np.asarray(VALID)[:, None]
    return q, k, v, bias, gate, key_valid


def _torch_reference(q, k, v, bias, gate, key_valid):
    """Per item with at least one valid key: torch SDPA with the gated bias and -inf on
    padded keys (scale 1: `attend` takes scaled queries)."""
    out = {}
    for b in range(B):
        if not key_valid[b].any():
            continue
        mask = torch.from_numpy(gate[b] * bias)
        mask = mask.masked_fill(~torch.from_numpy(key_valid[b])[None, None, :], float("-inf"))
        out[b] = torch.nn.functional.scaled_dot_product_attention(
            torch.from_numpy(q[b]), torch.from_numpy(k[b]), torch.from_numpy(v[b]),
            attn_mask=mask, scale=1.0).numpy()
    return out


@pytest.mark.parametrize("items_per_step", [None, 1, 2])
def test_attend_matches_torch(inputs, items_per_step):
    q, k, v, bias, gate, key_valid = inputs
    out = np.asarray(jax.jit(lambda *a: attend(*a[:4], bias=a[4], bias_gate=a[5],
                                               items_per_step=items_per_step))(
        q, k, v, key_valid, bias, gate))
    assert out.shape == (B, H, T, D)
    for b, expected in _torch_reference(q, k, v, bias, gate, key_valid).items():
        np.testing.assert_allclose(out[b], expected, rtol=1e-5, atol=1e-5, err_msg=f"item {b}")
    # No valid key: uniform weights over all keys, finite (never NaN).
    np.testing.assert_allclose(out[2], np.broadcast_to(v[2].mean(axis=1, keepdims=True),
                                                       (H, T, D)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_all_padded_item_stays_finite_in_low_precision(dtype):
    """Logits of -100 on an item with no valid key: no -inf (float16's range ends at 65504)."""
    q = jnp.full((1, 2, 3, 4), 5.0, dtype)
    k = jnp.full((1, 2, 3, 4), -5.0, dtype)
    v = jnp.arange(24, dtype=jnp.float32).reshape(1, 2, 3, 4).astype(dtype)
    out = np.asarray(attend(q, k, v, jnp.zeros((1, 3), bool)), np.float32)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[0], np.broadcast_to(
        np.asarray(v, np.float32)[0].mean(axis=1, keepdims=True), (2, 3, 4)), rtol=1e-2)


def test_attend_without_bias_matches_torch(inputs):
    q, k, v, _, _, key_valid = inputs
    out = np.asarray(attend(q, k, v, key_valid))
    for b in range(2):
        mask = torch.from_numpy(key_valid[b])[None, None, :].expand(H, T, T)
        expected = torch.nn.functional.scaled_dot_product_attention(
            torch.from_numpy(q[b]), torch.from_numpy(k[b]), torch.from_numpy(v[b]),
            attn_mask=mask, scale=1.0).numpy()
        np.testing.assert_allclose(out[b], expected, rtol=1e-5, atol=1e-5)


def test_batch_paths_agree_with_dropout_and_gradients(inputs):
    """The same dropout key drops the same weights on both paths; gradients agree."""
    q, k, v, bias, gate, key_valid = inputs
    key = jax.random.key(3)

    def loss(q, items_per_step):
        out = attend(q, k, v, key_valid, bias=bias, bias_gate=gate, dropout_rate=0.5,
                     dropout_key=key, items_per_step=items_per_step)
        return (out ** 2).sum(), out

    (_, out_map), grad_map = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(q), 1)
    (_, out_all), grad_all = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(q), None)
    np.testing.assert_allclose(out_map, out_all, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad_map, grad_all, rtol=1e-4, atol=1e-4)
    assert np.isfinite(np.asarray(grad_map)).all()
    # Dropout did change the result (rate 0.5 on up to 11 keys).
    plain = np.asarray(attend(q, k, v, key_valid, bias=bias, bias_gate=gate))
    assert not np.allclose(np.asarray(out_map)[:2], plain[:2], atol=1e-3)


def test_dropout_is_unbiased_around_torch_attention(inputs):
    """Inverted dropout (torch's convention: kept weights scaled by 1 / (1 - p)): averaged
    over many keys, the output is torch SDPA's without dropout."""
    q, k, v, bias, gate, key_valid = inputs
    rate, draws = 0.3, 4000
    run = jax.jit(jax.vmap(lambda key: attend(q[:2], k[:2], v[:2], key_valid[:2], bias=bias,
                                              bias_gate=gate[:2], dropout_rate=rate,
                                              dropout_key=key, items_per_step=None)))
    keys = jax.random.split(jax.random.key(7), draws)
    mean = np.asarray(run(keys)).mean(0)
    reference = _torch_reference(q, k, v, bias, gate, key_valid)
    for b in (0, 1):
        # the sample mean's spread: ~|v| * sqrt(p / (1 - p)) / sqrt(draws) ~ 0.01
        np.testing.assert_allclose(mean[b], reference[b], atol=0.05)
        assert np.abs(mean[b]).mean() > 0.2          # the check has something to measure


def test_default_items_per_step_keeps_cpu_steps_cache_sized():
    if jax.default_backend() != "cpu":
        assert default_items_per_step(8, 12, 496, 496) is None
        return
    assert default_items_per_step(2, 12, 496, 496) is None    # 2 x 11.8 MB: one step
    assert default_items_per_step(8, 12, 496, 496) == 1       # 94 MB: one item per step
    assert default_items_per_step(8, 16, 1500, 1500) == 1     # never 0
    assert default_items_per_step(8, 16, 200, 200) is None    # 8 x 2.6 MB
    assert default_items_per_step(64, 16, 200, 200) == 6


def _toeplitz_inputs(seed=3):
    """q, k, v (B, H, T, D), a ToeplitzBias and its dense (H, T, T) table built entry by entry
    from the definition bias[h, t, s] = diagonals[h, s - t + T - 1]."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((B, H, T, D)).astype(np.float32) for _ in range(3))
    diagonals = rng.standard_normal((H, 2 * T - 1)).astype(np.float32)
    dense = np.empty((H, T, T), np.float32)
    for t in range(T):
        for s in range(T):
            dense[:, t, s] = diagonals[:, s - t + T - 1]
    return q, k, v, ToeplitzBias(jnp.asarray(diagonals)), dense


def test_toeplitz_bias_rows():
    *_, bias, dense = _toeplitz_inputs()
    np.testing.assert_array_equal(np.asarray(bias.dense(T)), dense)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda s: bias.rows(s, 4, T))(5)),
                                  dense[:, 5:9])


@pytest.mark.parametrize("block", [4, 8])
@pytest.mark.parametrize("toeplitz", [False, True])
def test_query_blocks_match_torch(inputs, block, toeplitz):
    """The long-input path (queries in blocks, the last one padded; the bias dense or as
    diagonals) against torch SDPA, with the batch both at once and item by item."""
    _, _, _, _, gate, key_valid = inputs
    q, k, v, diagonals, dense = _toeplitz_inputs()
    bias = diagonals if toeplitz else jnp.asarray(dense)
    expected = _torch_reference(q, k, v, dense, gate, key_valid)
    for items_per_step in (None, 1):
        out = np.asarray(jax.jit(lambda q, k, v: attend(
            q, k, v, key_valid, bias=bias, bias_gate=gate, items_per_step=items_per_step,
            query_block=block))(q, k, v))
        assert out.shape == (B, H, T, D)
        for b, want in expected.items():
            np.testing.assert_allclose(out[b], want, rtol=1e-5, atol=1e-5, err_msg=f"item {b}")
        assert np.isfinite(out).all()


def test_query_blocks_gradients_match_torch_autograd(inputs):
    """Gradients through the blocked path (each block under jax.checkpoint) are torch's."""
    _, _, _, _, gate, key_valid = inputs
    q, k, v, diagonals, dense = _toeplitz_inputs(seed=4)
    weights = np.random.default_rng(5).standard_normal((B, H, T, D)).astype(np.float32)
    live = [b for b in range(B) if key_valid[b].any()]

    def loss(q, k, v, diagonals):
        out = attend(q, k, v, key_valid, bias=ToeplitzBias(diagonals), bias_gate=gate,
                     query_block=4)
        return (out * weights)[np.asarray(live)].sum()

    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, diagonals.diagonals)
    tq, tk, tv, tdense = (torch.tensor(x, requires_grad=True) for x in (q, k, v, dense))
    total = 0
    for b in live:
        mask = (torch.from_numpy(gate[b]) * tdense).masked_fill(
            ~torch.from_numpy(key_valid[b])[None, None, :], float("-inf"))
        out = torch.nn.functional.scaled_dot_product_attention(tq[b], tk[b], tv[b],
                                                               attn_mask=mask, scale=1.0)
        total = total + (out * torch.from_numpy(weights[b])).sum()
    total.backward()
    # The gradient of a diagonal is the sum of the dense table's gradient along it.
    dense_grad = tdense.grad.numpy()
    want_diagonals = np.zeros((H, 2 * T - 1), np.float32)
    for t in range(T):
        for s in range(T):
            want_diagonals[:, s - t + T - 1] += dense_grad[:, t, s]
    for name, ours, want in zip("qkv", got[:3], (tq.grad, tk.grad, tv.grad)):
        np.testing.assert_allclose(np.asarray(ours)[live], want.numpy()[live], atol=1e-4,
                                   err_msg=name)
    np.testing.assert_allclose(np.asarray(got[3]), want_diagonals, atol=1e-4)


def test_default_query_block_only_for_long_items():
    assert default_query_block(12, 496, 496) is None                  # a 10 s clip: 12 MB
    assert default_query_block(16, 4000, 4000) is None                # 1.02 GB: the limit
    assert default_query_block(16, 4200, 4200) is not None
    block = default_query_block(12, 8940, 8940)                       # 3 minutes: 3.8 GB
    assert block is not None and block % 8 == 0
    if jax.default_backend() == "cpu":
        assert 4 * 12 * 8940 * block <= 16 * 2 ** 20
    assert default_query_block(16, 10 ** 6, 10 ** 6) == 8             # never fewer than 8
