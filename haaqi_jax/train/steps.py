"""Train and eval steps: pure functions of (state | params, batch), jitted by `jit_steps`.

A *forward* function maps (params, batch, rng, deterministic) -> predictions dict
(clip_score (B,), frame_scores (B, T), frame_mask (B, T) True = valid). Both training modes use
the same head forward:

  head-only on cached features   batch: features, token_mask, audiogram
  end-to-end on waveforms        batch: waveform, padding_mask, audiogram; the encoder turns
                                 them into features + token mask first, then the same head.

Frozen leaves are wrapped in `stop_gradient` before the forward pass, so XLA does not compute
the backward pass through a frozen encoder at all, and the optimizer (see state.py) holds no
state for them.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from haaqi_jax.train import sharding
from haaqi_jax.train.state import FROZEN, TRAINABLE, TrainState, ema_update

Batch = Mapping[str, jax.Array]
ForwardFn = Callable[..., dict[str, jax.Array]]
LossFn = Callable[[Mapping[str, jax.Array], Batch], tuple[jax.Array, dict[str, jax.Array]]]


def head_predictions(out: Any, token_mask: jax.Array) -> dict[str, jax.Array]:
    """A HeadOutput as the predictions a loss reads: clip_score (B,), frame_scores (B, T),
    frame_mask (B, T) (token_mask (B, T), True = valid, as bool) and, from the
    "haaqi_components" readout, clip_components (B, 2) and frame_components (B, T, 2)."""
    predictions = {"clip_score": out.clip_score, "frame_scores": out.frame_scores,
                   "frame_mask": token_mask.astype(bool)}
    if out.clip_components is not None:
        predictions.update(clip_components=out.clip_components,
                           frame_components=out.frame_components)
    return predictions


def make_head_forward(head_module: Any, param_key: str = "head") -> ForwardFn:
    """Forward of a HAAQINetHead on batch["features"], ["token_mask"] (True = valid), ["audiogram"]."""

    def forward(params, batch, *, rng=None, deterministic=True):
        rngs = None if deterministic else {"dropout": rng}
        out = head_module.apply({"params": params[param_key]}, batch["features"],
                                batch["token_mask"], batch["audiogram"],
                                deterministic=deterministic, rngs=rngs)
        return head_predictions(out, batch["token_mask"])

    return forward


def make_encoder_head_forward(encode: Callable[..., tuple[jax.Array, jax.Array]],
                              head_forward: ForwardFn) -> ForwardFn:
    """End-to-end forward: `encode(params, waveform, padding_mask, rng, deterministic)` ->
    (features, token_mask True = valid), then the head forward on those."""

    def forward(params, batch, *, rng=None, deterministic=True):
        enc_rng, head_rng = (None, None) if rng is None else jax.random.split(rng)
        features, token_mask = encode(params, batch["waveform"], batch["padding_mask"],
                                      rng=enc_rng, deterministic=deterministic)
        head_batch = {"features": features, "token_mask": token_mask,
                      "audiogram": batch["audiogram"]}
        return head_forward(params, head_batch, rng=head_rng, deterministic=deterministic)

    return forward


def stop_frozen(params: Any, labels: Any) -> Any:
    """stop_gradient on every leaf labelled frozen."""
    return jax.tree_util.tree_map(
        lambda p, label: jax.lax.stop_gradient(p) if label == FROZEN else p, params, labels)


def make_train_step(forward: ForwardFn, loss_fn: LossFn, tx: optax.GradientTransformation,
                    labels: Any, *, ema_decay: float = 0.0
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """One optimizer step: (state, batch) -> (new state, scalar metrics).

    Metrics: loss, the loss's aux terms, grad_norm (the leaves labelled TRAINABLE: the norm
    that gradient clipping sees), param_norm (the same leaves after the update: the loss and
    gradient are those of the parameters before it, so only this term shows an update that
    overflowed them), weight_sum (items that counted). Dropout uses
    fold_in(state.rng, state.step). A state with `ema_params` (create_train_state's
    ema_decay > 0) gets them updated with the new parameters at `ema_decay` (`ema_update`).

    Arguments between the state and the batch are passed through to `forward` before the
    batch and get no gradient: distillation calls `step(state, teacher_params, batch)` with a
    `forward(params, teacher_params, batch, *, rng, deterministic)`.
    """

    def train_step(state: TrainState, *inputs):
        *context, batch = inputs
        rng = jax.random.fold_in(state.rng, state.step)

        def loss_of(params):
            predictions = forward(stop_frozen(params, labels), *context, batch, rng=rng,
                                  deterministic=False)
            return loss_fn(predictions, batch)

        (loss, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        # Frozen leaves are carried over as they were (x + 0 would turn -0.0 into +0.0).
        new_params = jax.tree_util.tree_map(
            lambda new, old, label: old if label == FROZEN else new,
            new_params, state.params, labels)
        # The model's trainable leaves only: the norm that clip_by_global_norm sees (a loss's
        # own parameters, labelled LOSS_PARAMS, have their own unclipped optimizer).
        trainable = lambda tree: jax.tree_util.tree_map(
            lambda x, label: x if label == TRAINABLE else jnp.zeros((), x.dtype), tree, labels)
        metrics = {"loss": loss, **aux, "grad_norm": optax.tree.norm(trainable(grads)),
                   "param_norm": optax.tree.norm(trainable(new_params)),
                   "weight_sum": jnp.sum(batch["weight"])}
        ema = state.ema_params
        if ema is not None:
            ema = ema_update(ema, new_params, labels, ema_decay, state.step + 1)
        new_state = state.replace(step=state.step + 1, params=new_params, opt_state=opt_state,
                                  ema_params=ema)
        return new_state, metrics

    return train_step


def make_eval_step(forward: ForwardFn, loss_fn: LossFn) -> Callable[[Any, Batch], dict]:
    """(params, batch) -> {"loss_sum", "weight_sum" (scalars), "clip_score" (B,)}.

    loss_sum = batch loss * batch weight sum, so summing over batches and dividing by the
    summed weight gives the loss of the whole set with filler items ignored.
    """

    def eval_step(params, batch: Batch):
        predictions = forward(params, batch, deterministic=True)
        loss, _ = loss_fn(predictions, batch)
        weight_sum = jnp.sum(batch["weight"].astype(jnp.float32))
        return {"loss_sum": loss * weight_sum, "weight_sum": weight_sum,
                "clip_score": predictions["clip_score"]}

    return eval_step


def jit_steps(train_step, eval_step, mesh) -> tuple[Callable, Callable]:
    """Jits both steps for data parallelism on `mesh`: state/params replicated, batch split
    over 'data'; the train state is donated (updated in place)."""
    repl = sharding.replicated(mesh)
    data = sharding.batch_sharding(mesh)
    train = jax.jit(train_step, in_shardings=(repl, data), out_shardings=(repl, repl),
                    donate_argnums=(0,))
    evaluate = jax.jit(eval_step, in_shardings=(repl, data),
                       out_shardings={"loss_sum": repl, "weight_sum": repl, "clip_score": data})
    return train, evaluate
