"""Training state and the optimizer, with frozen parameters masked out (big_vision style).

Each parameter gets a label, "trainable" or "frozen", from regular expressions on its path
("encoder/.*", "head/blstm/.*"; path parts joined by "/"). The optimizer is an
`optax.multi_transform` that gives "frozen" leaves `optax.set_to_zero()`: they hold NO optimizer
state (Adam moments exist only for trainable leaves) and the step keeps them bit-for-bit.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import optax

from haaqi_jax.config import check_fraction, is_number, is_whole

TRAINABLE = "trainable"
FROZEN = "frozen"
#: Learnable loss parameters (a distillation objective's uncertainty weights) trained at
#: optimizer.loss_params_learning_rate, a constant rate of their own.
LOSS_PARAMS = "loss_params"


@flax.struct.dataclass
class TrainState:
    """Everything a step changes; a pytree, so it can be jitted, sharded and checkpointed.

    Attributes:
      step: () int32, number of optimizer steps taken.
      params: parameter pytree.
      opt_state: optax state (no entries for frozen leaves).
      rng: (2,) uint32 raw PRNG key; step i uses fold_in(rng, i), so resuming at step i
        draws the same dropout masks as an uninterrupted run.
      ema_params: None (train.ema_decay 0, the default: the state has the same leaves as
        before the option existed), or a pytree like `params`: their exponential moving
        average over the steps taken (`ema_update`), which validation, early stopping and
        the report use in their place (`eval_params`).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    ema_params: Any = None


def check_ema_decay(decay: Any, key: str = "train.ema_decay") -> float:
    """`decay` as a float; ValueError naming `key` unless it is a number in [0, 1) (1 would
    never move the average off its first value, a negative one is no average)."""
    return check_fraction(decay, key, "0 = no moving average of the parameters")


def ema_update(ema: Any, params: Any, labels: Any, decay: float, count: jax.Array) -> Any:
    """The moving average after the `count`-th update (count >= 1, the new step number).

    A bias-corrected average (the correction Adam applies to its moments, folded into the
    decay): after t steps it is sum_i decay**(t-i) params_i / sum_i decay**(t-i) over the
    parameters after steps 1..t, so the initial weights never weigh in (a plain EMA started at
    them would still carry 0.99**600 = 0.24% of the random init after 10 epochs of 60 steps,
    and 55 % with decay 0.999). The decay of step t is decay (1 - decay**(t-1)) /
    (1 - decay**t): 0 at t = 1 (the average is the first step's parameters), then rising to
    `decay`. Leaves labelled frozen keep their value bit for bit (they equal the params).
    """
    t = count.astype(jnp.float32)
    power = jnp.power(jnp.float32(decay), t - 1.0)
    d = decay * (1.0 - power) / (1.0 - decay * power)
    return jax.tree_util.tree_map(
        lambda e, p, label: e if label == FROZEN else (d * e + (1.0 - d) * p).astype(e.dtype),
        ema, params, labels)


def eval_params(state: TrainState) -> Any:
    """The parameters to validate, select and report: the moving average when the state keeps
    one, else the trained parameters."""
    return state.params if state.ema_params is None else state.ema_params


def path_name(path: Sequence[Any]) -> str:
    """'encoder/layers_0/kernel' for a jax key path."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def param_labels(params: Any, frozen_patterns: Sequence[str] = ()) -> Any:
    """Pytree like `params` of "frozen" (path fully matches a pattern) or "trainable" strings."""
    compiled = [_compiled(p) for p in frozen_patterns]

    def label(path, _):
        name = path_name(path)
        return FROZEN if any(c.fullmatch(name) for c in compiled) else TRAINABLE

    return jax.tree_util.tree_map_with_path(label, params)


def _compiled(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f"frozen pattern {pattern!r} is not a regular expression: {err}") from None


def check_frozen_patterns(patterns: Sequence[str], params: Any, key: str) -> None:
    """ValueError naming `key` and the pattern when one is not a regular expression or matches
    no parameter path of `params` (a pattern that freezes nothing is a typo: "blstm/.*" for
    "head/blstm/.*")."""
    names = [path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    for pattern in patterns:
        compiled = _compiled(pattern)
        if not any(compiled.fullmatch(name) for name in names):
            raise ValueError(f"{key}: {pattern!r} matches no parameter (a pattern must match "
                             f"a whole path, e.g. {names[0]!r})")


def count_params(params: Any, labels: Any | None = None, which: str = TRAINABLE) -> int:
    """Number of scalars in `params` (only the leaves labelled `which` when labels are given)."""
    sizes = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda p: int(jnp.size(p)), params))
    if labels is None:
        return sum(sizes)
    return sum(s for s, l in zip(sizes, jax.tree_util.tree_leaves(labels)) if l == which)


def make_schedule(opt_cfg: Any, total_steps: int) -> optax.Schedule:
    """Learning-rate schedule: linear warm-up then 'constant' or 'cosine' decay to 0."""
    lr = float(opt_cfg.learning_rate)
    warmup = int(opt_cfg.get("warmup_steps", 0))
    kind = _checked_schedule(opt_cfg)
    if kind == "constant":
        main = optax.constant_schedule(lr)
    else:
        main = optax.cosine_decay_schedule(lr, max(1, total_steps - warmup))
    if warmup <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


#: optimizer.name's and optimizer.schedule's choices.
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine")


def check_optimizer(opt_cfg: Any) -> None:
    """ValueError naming the `optimizer` key at fault: the name, a learning rate that is not a
    positive number (a negative one would climb the loss), moment decays b1 / b2 outside
    [0, 1), a negative warmup, the schedule, a weight decay the optimizer ignores."""
    name = opt_cfg.get("name", "adam")
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name: unknown optimizer {name!r} ({' | '.join(OPTIMIZERS)})")
    for key in ("learning_rate", "loss_params_learning_rate"):
        rate = opt_cfg.get(key)
        if rate is None and key == "loss_params_learning_rate":
            continue
        if not is_number(rate) or not 0 < rate < float("inf"):
            raise ValueError(f"optimizer.{key} must be a number > 0, got {rate!r}")
    for key in ("b1", "b2"):               # Adam's moment decays
        check_fraction(opt_cfg.get(key, 0.9), f"optimizer.{key}")
    warmup = opt_cfg.get("warmup_steps", 0)
    if not is_whole(warmup) or warmup < 0:
        raise ValueError(f"optimizer.warmup_steps must be a whole number >= 0, got {warmup!r}")
    _checked_schedule(opt_cfg)
    check_weight_decay(opt_cfg)


def _checked_schedule(opt_cfg: Any) -> str:
    """optimizer.schedule (default "constant"); ValueError naming it when it is unknown."""
    kind = opt_cfg.get("schedule", "constant")
    if kind not in SCHEDULES:
        raise ValueError(f"optimizer.schedule: unknown schedule {kind!r} "
                         f"({' | '.join(SCHEDULES)})")
    return kind


def check_weight_decay(opt_cfg: Any) -> None:
    """ValueError when the `optimizer` section sets a weight decay its optimizer ignores (only
    adamw applies one)."""
    name = opt_cfg.get("name", "adam")
    decay = float(opt_cfg.get("weight_decay", 0.0))
    if name != "adamw" and decay != 0.0:
        raise ValueError(f"optimizer.weight_decay {decay} is applied by "
                         f"adamw only, and optimizer.name is {name!r}: set optimizer.name=adamw, "
                         f"or optimizer.weight_decay=0")


def make_optimizer(opt_cfg: Any, labels: Any, total_steps: int) -> optax.GradientTransformation:
    """optax optimizer from the `optimizer` config section, frozen leaves set to zero.

    opt_cfg fields: name ('adam' | 'adamw' | 'sgd'), learning_rate, schedule, warmup_steps,
    weight_decay (adamw), grad_clip_norm (<= 0: no clipping), b1, b2 (adam/adamw), and
    loss_params_learning_rate: the constant rate of leaves labelled LOSS_PARAMS (Adam, no
    decay or clipping; required when `labels` has such leaves).
    """
    check_optimizer(opt_cfg)
    schedule = make_schedule(opt_cfg, total_steps)
    name = opt_cfg.get("name", "adam")
    b1, b2 = float(opt_cfg.get("b1", 0.9)), float(opt_cfg.get("b2", 0.999))
    if name == "adam":
        base = optax.adam(schedule, b1=b1, b2=b2)
    elif name == "adamw":
        base = optax.adamw(schedule, b1=b1, b2=b2, weight_decay=float(opt_cfg.weight_decay))
    else:                                          # "sgd" (check_optimizer: one of OPTIMIZERS)
        base = optax.sgd(schedule, momentum=opt_cfg.get("momentum", None))
    clip = float(opt_cfg.get("grad_clip_norm", 0.0))
    trainable = optax.chain(optax.clip_by_global_norm(clip), base) if clip > 0 else base
    transforms = {TRAINABLE: trainable, FROZEN: optax.set_to_zero()}
    if LOSS_PARAMS in jax.tree_util.tree_leaves(labels):
        rate = opt_cfg.get("loss_params_learning_rate")
        if rate is None:                           # (a value is checked by check_optimizer)
            raise ValueError(f"optimizer.loss_params_learning_rate must be > 0 for the loss "
                             f"parameters, got {rate!r}")
        transforms[LOSS_PARAMS] = optax.adam(float(rate), b1=b1, b2=b2)
    return optax.multi_transform(transforms, labels)


def create_train_state(params: Any, tx: optax.GradientTransformation, seed: int, *,
                       ema_decay: float = 0.0) -> TrainState:
    """Step 0 state; `seed` seeds the dropout RNG; `ema_decay` > 0 keeps a moving average of
    the parameters (a copy of them until the first step: `ema_update`)."""
    ema = (None if check_ema_decay(ema_decay) == 0.0
           else jax.tree_util.tree_map(jnp.copy, params))     # own buffers: the step donates
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), rng=jax.random.PRNGKey(seed), ema_params=ema)
