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
  one step. On accelerators the whole batch is always attended at once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

#: On a CPU, a batch whose float32 logits fit in this many bytes (a 32 MB last-level cache) is
#: attended in one step; a larger one in steps of at most `CPU_STEP_BYTES`.
CPU_BATCH_BYTES = 32 * 2 ** 20
#: Half that cache, leaving room for what a step also reads (BEATs' shared (H, T, T) position
#: bias is as large as one item's logits).
CPU_STEP_BYTES = 16 * 2 ** 20


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
    """One item: q, k, v (H, T, Dh), key_valid (T,), bias (H, T, T) | None, bias_gate
    (H, T, 1) | None, dropout_key | None -> (H, T, Dh)."""
    logits = jnp.einsum("hqd,hkd->hqk", q, k)
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
    return jnp.einsum("hqk,hkd->hqd", exp, v) / total


def attend(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array, *,
           bias: jax.Array | None = None, bias_gate: jax.Array | None = None,
           dropout_rate: float = 0.0, dropout_key: jax.Array | None = None,
           items_per_step: int | None | str = "auto") -> jax.Array:
    """Multi-head attention over prefix- or arbitrarily-masked keys.

    Args:
      q: (B, H, T, Dh) queries, already scaled (e.g. by Dh ** -0.5).
      k, v: (B, H, S, Dh) keys and values.
      key_valid: (B, S) bool, True = a key that may be attended to.
      bias: (H, T, S) additive logit bias shared by the batch (BEATs' relative positions).
      bias_gate: (B, H, T, 1) per-item factor on `bias` (BEATs' gated relative position).
      dropout_rate: attention-weight dropout, applied only when `dropout_key` is given.
      dropout_key: PRNG key for the dropout, or None (deterministic).
      items_per_step: items attended together; None = the whole batch, "auto" =
        `default_items_per_step` of these shapes.
    Returns:
      (B, H, T, Dh) attended values.
    """
    batch = q.shape[0]
    if items_per_step == "auto":
        items_per_step = default_items_per_step(batch, q.shape[1], q.shape[2], k.shape[2])
    keys = None
    if dropout_key is not None and dropout_rate > 0.0:
        keys = jax.random.split(dropout_key, batch)

    def one(item):
        q_i, k_i, v_i, valid_i, gate_i, key_i = item
        return _attend_item(q_i, k_i, v_i, valid_i, bias, gate_i, dropout_rate, key_i)

    items = (q, k, v, key_valid, bias_gate, keys)
    if items_per_step is None or items_per_step >= batch:
        return jax.vmap(one)(items)
    return jax.lax.map(one, items, batch_size=items_per_step)
