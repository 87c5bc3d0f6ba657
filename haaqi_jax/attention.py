"""The scaled dot-product attention core shared by BEATs' layers and the HAAQI-Net head.

Both models project queries, keys and values with their own Dense layers (their parameter
layouts differ) and hand the heads-first arrays to `attend`, which does the rest:

    logits  = q k^T (+ bias_gate * bias)          per item (H, T, T)
    weights = softmax over valid keys             padded keys get no weight
    out     = weights v                           (H, T, Dh)

Two choices make it fast without changing the maths (tests compare both models with PyTorch):
- The softmax is normalised after the weighted sum: T x Dh divisions per head instead of
  T x T, and one pass less over the (H, T, T) logits.
- On a CPU, a large batch is attended a few items at a time (`jax.lax.map`), so that the
  logits of one step stay in the last-level cache (`default_items_per_step`): a 10 s clip's
  BEATs logits are 12 x 496 x 496 floats = 12 MB, a batch of 8 of them 94 MB, which spills to
  memory. On the project's 2-core CPU (32 MB L3) this made a whole BEATs HAAQI-Net at batch 8
  ~13 % faster per clip (benchmarks/README.md). Short clips (the demo's 2-4 s) still go in
  one step at its training batch of 8; its evaluation batches of 16 clips padded past 3.1 s
  (192 or 232 head tokens) take steps of 7 or 4 items. On accelerators the whole batch is
  always attended at once.

Long inputs (a whole song) are attended in blocks of queries. An item's logits grow with the
square of its length: 12 x 8,992^2 floats = 3.9 GB per BEATs layer for 3 minutes of audio, as
much again for the softmax and for BEATs' (H, T, T) position bias, and the HAAQI-Net head's 16
heads a third more. Above `LONG_ITEM_BYTES` of logits per item, `attend` walks the queries in
blocks (`default_query_block`) under `jax.checkpoint`, so neither inference nor a gradient
holds more than one block's logits (a gradient at 6,000 tokens: 117 MB of XLA scratch instead
of 3.4 GB), and the relative position bias comes as a `ToeplitzBias` (one value per head and
key-minus-query offset) from which each block takes its rows, instead of a (H, T, T) table.
Every query still sees every key: the result is the same attention.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

#: On a CPU, a batch whose float32 logits fit in this many bytes (a 32 MB last-level cache) is
#: attended in one step; a larger one in steps of at most `CPU_STEP_BYTES`.
CPU_BATCH_BYTES = 32 * 2 ** 20
#: Half that cache, leaving room for what a step also reads (BEATs' shared (H, T, T) position
#: bias is as large as one item's logits).
CPU_STEP_BYTES = 16 * 2 ** 20
#: An item whose float32 logits exceed this is attended in blocks of queries on every backend
#: (a 10 s clip's BEATs logits are 12 MB; 1 GiB is ~95 s for BEATs' 12 heads, ~82 s for the
#: head's 16). Its blocks hold at most `CPU_STEP_BYTES` of logits on a CPU (cache-sized) and
#: `ACCELERATOR_BLOCK_BYTES` elsewhere. Blocks cost time (a 60 s clip through a released-size
#: HAAQI-Net: 10.9 s blocked vs 7.4 s in one step on the Intel VM of benchmarks/README.md,
#: peak 1.3 vs 3.0 GB):
#: each block gathers its rows of the position bias and adds them outside the logits matmul.
LONG_ITEM_BYTES = 2 ** 30
ACCELERATOR_BLOCK_BYTES = 256 * 2 ** 20


class ToeplitzBias(NamedTuple):
    """A relative-position logit bias that depends only on key - query, as diagonals:
    bias[h, t, s] = diagonals[h, s - t + num_queries - 1] for t < num_queries, s < num_keys.

    diagonals: (H, num_queries + num_keys - 1). Memory grows with the length, not its square;
    `attend` takes the rows of each query block from it.
    """

    diagonals: jax.Array

    def rows(self, start, count: int, num_queries: int) -> jax.Array:
        """Rows start .. start + count - 1 (start may be traced) -> (H, count, num_keys)."""
        num_keys = self.diagonals.shape[-1] - num_queries + 1
        offset = (jnp.arange(num_keys)[None, :] - jnp.arange(count)[:, None]
                  + (num_queries - 1) - start)
        # Rows past the last query (a padded last block) read clipped offsets; their output
        # is dropped.
        return jnp.take(self.diagonals, jnp.clip(offset, 0, self.diagonals.shape[-1] - 1),
                        axis=-1)

    def dense(self, num_queries: int) -> jax.Array:
        """The whole (H, num_queries, num_keys) table."""
        return self.rows(0, num_queries, num_queries)


def default_query_block(heads: int, queries: int, keys: int) -> int | None:
    """Queries per block for one item: None (all at once) while its float32 logits stay
    within `LONG_ITEM_BYTES`; otherwise as many as fit in a block budget (`CPU_STEP_BYTES` on
    a CPU, `ACCELERATOR_BLOCK_BYTES` elsewhere), a multiple of 8, at least 8."""
    row_bytes = 4 * heads * keys
    if queries * row_bytes <= LONG_ITEM_BYTES:
        return None
    budget = CPU_STEP_BYTES if jax.default_backend() == "cpu" else ACCELERATOR_BLOCK_BYTES
    return max(8, budget // row_bytes // 8 * 8)


def default_items_per_step(batch: int, heads: int, queries: int, keys: int) -> int | None:
    """Items per attention step for these shapes: None (the whole batch) on accelerators and
    for a CPU batch within `CPU_BATCH_BYTES` of logits; otherwise as many items as fit in
    `CPU_STEP_BYTES` (at least 1).

    Measured on the project's 2-core CPU, BEATs at 10 s (12 MB of logits per item): one item
    per step cuts the attention's forward time per item by a third or more at batch 4-8 and
    by 5-15 % with gradients, but at batch 2 its backward pass is ~30 % slower than one step.
    """
    if jax.default_backend() != "cpu":
        return None
    per_item = 4 * heads * queries * keys
    if batch * per_item <= CPU_BATCH_BYTES:
        return None
    return max(1, CPU_STEP_BYTES // per_item)


def _attend_item(q, k, v, key_valid, bias, bias_gate, dropout_rate, dropout_key):
    """One item: q (H, T, Dh), k, v (H, S, Dh), key_valid (S,), bias (H, T, S) | None,
    bias_gate (H, T, 1) | None, dropout_key | None -> (H, T, Dh) in v's dtype.

    Half-precision q, k, v (a bfloat16 compute dtype) give float32 logits, softmax and
    normaliser: the products are accumulated into float32, the unnormalised weights (in [0, 1]
    after the max is taken off) multiply v in v's dtype into a float32 sum, and the division
    by the float32 total comes before the result is rounded back. float32 inputs take the
    float32 path exactly as before (no casts)."""
    half = _is_half(q.dtype)
    logits = jnp.einsum("hqd,hkd->hqk", q, k,
                        **({"preferred_element_type": jnp.float32} if half else {}))
    if bias is not None:
        logits = logits + (bias if bias_gate is None else bias_gate * bias)
    # Padded keys get half the dtype's lowest value added, not -inf: no logit below half the
    # dtype's range overflows, so an item whose keys are all padding (e.g. a dummy item that
    # fills a batch up to the device count) gets finite weights, never NaN (in float32 exactly
    # uniform ones: the sums round to one value for logits below ~5e30). An add of a (T,)
    # vector, unlike a select, fuses into the logits matmul on XLA:CPU.
    key_bias = jnp.where(key_valid, 0.0, jnp.finfo(logits.dtype).min / 2).astype(logits.dtype)
    logits = logits + key_bias[None, None, :]
    exp = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
    total = exp.sum(axis=-1, keepdims=True)
    if dropout_key is not None:
        # Dropout of the normalised weights, applied before the (deferred) normalisation.
        keep = jax.random.bernoulli(dropout_key, 1.0 - dropout_rate, exp.shape)
        exp = jnp.where(keep, exp / (1.0 - dropout_rate), 0.0)
    if half:
        weighted = jnp.einsum("hqk,hkd->hqd", exp.astype(v.dtype), v,
                              preferred_element_type=jnp.float32)
        return (weighted / total).astype(v.dtype)
    return jnp.einsum("hqk,hkd->hqd", exp, v) / total


def _is_half(dtype) -> bool:
    """A floating dtype narrower than float32 (bfloat16, float16)."""
    return jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32


def at_least_float32(x: jax.Array) -> jax.Array:
    """x (any shape) in at least float32, for the sums and nonlinearities kept in float32:
    a narrower float (a half-precision compute dtype) becomes float32, float32 and float64
    stay as they are (no op in the float32 default); integers and bools become float32
    (`jnp.promote_types(x.dtype, float32)`)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _attend_item_blocked(q, k, v, key_valid, bias, bias_gate, dropout_rate, dropout_key,
                         block: int):
    """`_attend_item` over blocks of `block` queries (the last one padded), each under
    jax.checkpoint: at most one block's (H, block, S) logits exist at a time, in the forward
    pass and in its gradient. bias: (H, T, S), a ToeplitzBias, or None."""
    heads, length, _ = q.shape
    num_blocks = -(-length // block)
    pad = num_blocks * block - length

    def blocks(x):                               # (H, T, ...) -> (num_blocks, H, block, ...)
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape((heads, num_blocks, block) + x.shape[2:]), 1, 0)

    dense_bias = None
    if bias is not None and not isinstance(bias, ToeplitzBias):
        dense_bias = jnp.pad(bias, [(0, 0), (0, pad), (0, 0)])

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def one(index, q_b, gate_b):
        start = index * block
        if dense_bias is not None:
            bias_b = jax.lax.dynamic_slice_in_dim(dense_bias, start, block, axis=1)
        elif bias is not None:
            bias_b = bias.rows(start, block, length)
        else:
            bias_b = None
        key_b = None if dropout_key is None else jax.random.fold_in(dropout_key, index)
        return _attend_item(q_b, k, v, key_valid, bias_b, gate_b, dropout_rate, key_b)

    gates = None if bias_gate is None else blocks(bias_gate)
    out = jax.lax.map(lambda xs: one(*xs), (jnp.arange(num_blocks), blocks(q), gates))
    out = jnp.moveaxis(out, 0, 1).reshape((heads, num_blocks * block) + out.shape[3:])
    return out[:, :length]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array, *,
           bias: jax.Array | None = None, bias_gate: jax.Array | None = None,
           dropout_rate: float = 0.0, dropout_key: jax.Array | None = None,
           items_per_step: int | None | str = "auto",
           query_block: int | None | str = "auto") -> jax.Array:
    """Multi-head attention over prefix- or arbitrarily-masked keys.

    Args:
      q: (B, H, T, Dh) queries, already scaled (e.g. by Dh ** -0.5).
      k, v: (B, H, S, Dh) keys and values.
      key_valid: (B, S) bool, True = a key that may be attended to.
      bias: (H, T, S) additive logit bias shared by the batch (BEATs' relative positions), or
        the same as a `ToeplitzBias` (what BEATs passes for long inputs).
      bias_gate: (B, H, T, 1) per-item factor on `bias` (BEATs' gated relative position).
      dropout_rate: attention-weight dropout, applied only when `dropout_key` is given.
      dropout_key: PRNG key for the dropout, or None (deterministic).
      items_per_step: items attended together; None = the whole batch, "auto" =
        `default_items_per_step` of these shapes.
      query_block: queries attended together within an item; None = all of them, "auto" =
        `default_query_block` of these shapes (None unless the item is long).
    Returns:
      (B, H, T, Dh) attended values, in v's dtype (half-precision inputs: float32 logits,
      softmax and normaliser, see `_attend_item`).
    """
    batch = q.shape[0]
    if items_per_step == "auto":
        items_per_step = default_items_per_step(batch, q.shape[1], q.shape[2], k.shape[2])
    if query_block == "auto":
        query_block = default_query_block(q.shape[1], q.shape[2], k.shape[2])
    if query_block is not None and query_block >= q.shape[2]:
        query_block = None
    if query_block is None and isinstance(bias, ToeplitzBias):
        bias = bias.dense(q.shape[2])
    keys = None
    if dropout_key is not None and dropout_rate > 0.0:
        keys = jax.random.split(dropout_key, batch)

    def one(item):
        q_i, k_i, v_i, valid_i, gate_i, key_i = item
        if query_block is not None:
            return _attend_item_blocked(q_i, k_i, v_i, valid_i, bias, gate_i, dropout_rate,
                                        key_i, query_block)
        return _attend_item(q_i, k_i, v_i, valid_i, bias, gate_i, dropout_rate, key_i)

    items = (q, k, v, key_valid, bias_gate, keys)
    if items_per_step is None or items_per_step >= batch:
        return jax.vmap(one)(items)
    return jax.lax.map(one, items, batch_size=items_per_step)
