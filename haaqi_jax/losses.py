"""Losses by name: a registry that training configs point into (big_vision style).

A loss is a pure function

    loss_fn(predictions, batch, **kwargs) -> (loss, aux)

where `predictions` holds what the model step produced -- for HAAQI-Net:
  clip_score (B,), frame_scores (B, T), frame_mask (B, T) bool True = valid frame
and `batch` the batch arrays (label (B,), weight (B,) with 0 for filler items, ...). `loss` is a
scalar, `aux` a dict of scalars to log. Every loss weights items by `batch["weight"]` so filler
items added to complete a batch count for nothing; the normaliser is the weight sum of the
(global) batch, so a data-parallel step gives the loss of the whole batch.

Registered: "haaqi_mse" (HAAQI-Net), "haaqi_mse_corr" (the same plus a batch-correlation
term), "haaqi_components" (the same on HAAQI's two parts, for a head with the
"haaqi_components" readout); distillation terms "l1_cosine" (DistilHuBERT), "l1", "mse",
"cosine", "info_nce" (frame-contrastive); and the distillation objectives "distill_weighted"
(fixed weights) and "distill_uncertainty" (learned uncertainty weights, Kendall et al. 2018),
which combine a HAAQI loss and a distillation loss given by name (see the distillation
section below).

Your own loss, registered from your own code (no library edit), then chosen by config
(`config.loss.name = "my_loss"`, keyword arguments from `config.loss.kwargs`; a distillation
loss is named inside the objective: `loss.kwargs.distill = {"name": "my_loss", "kwargs": {}}`):

    from haaqi_jax.losses import register_loss

    @register_loss("my_loss")
    def my_loss(predictions, batch, *, scale=1.0):
        ...
        return loss, {"my_term": loss}
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from haaqi_jax.config import definition_site
from haaqi_jax.data.manifest import COMPONENT_NAMES

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]

_REGISTRY: dict[str, LossFn] = {}
_PARAM_INITS: dict[str, Callable[[int], Any]] = {}
_ROW_FIELDS: dict[str, tuple[str, ...]] = {}


def register_loss(name: str, *, overwrite: bool = False,
                  params: Callable[[int], Any] | None = None,
                  row_fields: tuple[str, ...] = ()) -> Callable[[LossFn], LossFn]:
    """Decorator adding `fn` to the registry under `name` (an existing name needs overwrite).

    `params`, for a loss with learnable parameters (e.g. uncertainty weights): a function
    (number of distillation target layers K) -> initial parameter pytree. A distillation keeps
    that pytree in the train state (trainable) and hands it to the loss as
    predictions["loss_params"]; plain training refuses such a loss.
    `row_fields`: `ManifestRow` fields beyond haaqi_score that every train and valid row must
    have (e.g. "haaqi_components"); the trainer checks them before the first step.
    """
    if not isinstance(name, str):       # bare @register_loss hands over the function
        raise TypeError(f"register_loss takes the loss's name: write @register_loss(\"my_loss\"), "
                        f"not @register_loss (got {name!r})")

    def decorator(fn: LossFn) -> LossFn:
        old = _REGISTRY.get(name)
        # The same definition run again (a config file loaded twice, a notebook cell rerun)
        # replaces itself; another function under a taken name needs overwrite.
        same = old is not None and definition_site(old) == definition_site(fn)
        if old is not None and not overwrite and not same:
            raise ValueError(f"loss {name!r} is already registered by "
                             f"{old.__module__}.{old.__qualname__} (pass overwrite=True)")
        _REGISTRY[name] = fn
        if params is None:
            _PARAM_INITS.pop(name, None)
        else:
            _PARAM_INITS[name] = params
        _ROW_FIELDS[name] = tuple(row_fields)
        return fn
    return decorator


def required_row_fields(name: str, kwargs: Mapping[str, Any] | None = None) -> tuple[str, ...]:
    """The manifest row fields loss `name` needs, with those of a HAAQI loss named inside a
    distillation objective (`kwargs["haaqi"]`)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown loss {name!r}; registered: {available_losses()}")
    fields = _ROW_FIELDS.get(name, ())
    inner = (kwargs or {}).get("haaqi")
    if inner is not None:
        fields += required_row_fields(*_named(inner, SUB_LOSS_DEFAULTS["haaqi"]))
    return tuple(dict.fromkeys(fields))


def has_learnable_params(name: str) -> bool:
    """Whether loss `name` was registered with `params` (learnable parameters)."""
    return name in _PARAM_INITS


def loss_params(name: str, num_targets: int) -> Any:
    """Initial learnable parameters of loss `name` for K = num_targets distillation layers
    (an empty dict for a loss without parameters)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown loss {name!r}; registered: {available_losses()}")
    init = _PARAM_INITS.get(name)
    return {} if init is None else init(int(num_targets))


def available_losses() -> list[str]:
    """Names of the registered losses."""
    return sorted(_REGISTRY)


def get_loss(name: str, **kwargs: Any) -> LossFn:
    """The registered loss `name` with `kwargs` bound: `fn(predictions, batch) -> (loss, aux)`.

    Raises ValueError naming the keyword when the loss does not take one of `kwargs` (a typo in
    a config's `loss.kwargs` fails here, not inside a compiled step), or when `kwargs` lack a
    keyword that has no default.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown loss {name!r}; registered: {available_losses()}")
    fn = _REGISTRY[name]
    params = inspect.signature(fn).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        takes = [n for n, p in list(params.items())[2:]
                 if p.kind in (inspect.Parameter.KEYWORD_ONLY,
                               inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        unknown = [k for k in kwargs if k not in takes]
        if unknown:
            raise ValueError(f"loss {name!r} takes no keyword {unknown[0]!r} (its keywords: "
                             f"{takes})")
    missing = [n for n, p in list(params.items())[2:]
               if p.default is inspect.Parameter.empty and n not in kwargs
               and p.kind in (inspect.Parameter.KEYWORD_ONLY,
                              inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    if missing:                   # else a TypeError when the step is first traced
        raise ValueError(f"loss {name!r} needs keyword {missing[0]!r} (it has no default); "
                         f"give it in the loss's kwargs")
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    for key, value in kwargs.items():
        default = params[key].default if key in params else None
        if number(default) and not number(value):   # a string would fail deep inside the step
            raise ValueError(f"loss {name!r}: keyword {key!r} takes a number (default "
                             f"{default!r}), got {value!r}")
        if isinstance(default, bool) and isinstance(value, str):   # "false" would be truthy
            raise ValueError(f"loss {name!r}: keyword {key!r} takes true or false (default "
                             f"{default!r}), got {value!r}")

    @functools.wraps(fn)
    def checked(predictions, batch):
        # Shapes are static: a wrong return type fails once, at trace time, naming the loss.
        try:
            out = fn(predictions, batch, **kwargs)
        except KeyError as e:
            raise ValueError(
                f"loss {name!r} read the key {e.args[0]!r}, which this step does not give it "
                f"(predictions: {sorted(predictions)}; batch: {sorted(batch)})") from e
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping)):
            raise ValueError(f"loss {name!r} must return (loss, aux dict), got "
                             f"{type(out).__name__}")
        if jnp.shape(out[0]) != ():
            raise ValueError(f"loss {name!r} returned a loss of shape {jnp.shape(out[0])}; "
                             "expected a scalar (reduce over items and layers)")
        shaped = {k: jnp.shape(v) for k, v in out[1].items() if jnp.shape(v) != ()}
        if shaped:
            raise ValueError(f"loss {name!r} returned aux values that are not scalars "
                             f"({shaped}); the metrics log one number per key")
        return out

    return checked


def check_loss_config(name: str, kwargs: Mapping[str, Any] | None = None, *,
                      num_targets: int | None = None, where: str = "loss") -> None:
    """Resolves loss `name` with `kwargs`, and the HAAQI and distillation losses named inside
    a distillation objective (`kwargs["haaqi"]`, `kwargs["distill"]`), so that an unknown
    name or keyword fails before any training rather than when the step is first traced.

    Args:
      name, kwargs: the loss and its keyword arguments (config `loss.name`, `loss.kwargs`).
      num_targets: the number of distillation target layers, when known: a `layer_weights`
        of another length is refused here.
      where: the config section, named in the errors.
    Raises:
      ValueError naming the config key at fault.
    """
    kwargs = dict(kwargs or {})
    try:
        get_loss(name, **kwargs)
    except ValueError as err:
        # The usual cause: --set loss.name=another with the config's kwargs of its own loss.
        hint = (f"; {where}.kwargs belong to the loss the config names: replace them, e.g. "
                f"--set '{where}.kwargs={{}}'" if "takes no keyword" in str(err) else "")
        raise ValueError(f"{where}.name={name!r}: {err}{hint}") from None
    weights = kwargs.get("layer_weights")
    if num_targets is not None and weights is not None and (
            isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__")
            or len(weights) != num_targets):
        raise ValueError(f"{where}.kwargs.layer_weights={weights!r}: one weight per target "
                         f"layer, {num_targets} here")
    for key, default in SUB_LOSS_DEFAULTS.items():
        if key not in kwargs:
            continue
        try:
            sub_name, sub_kwargs = _named(kwargs[key], default)
            get_loss(sub_name, **sub_kwargs)
            _refuse_sub_loss_params(sub_name)
        except ValueError as err:
            raise ValueError(f"{where}.kwargs.{key}: {err}") from None
        if key == "distill" and "layer_weights" in sub_kwargs:
            raise ValueError(_SUB_LAYER_WEIGHTS.format(where=where))


def _refuse_sub_loss_params(name: str) -> None:
    """ValueError when loss `name`, named inside a distillation objective, has learnable
    parameters: the train state holds only the objective's (`loss_params(loss.name)`), so the
    sub-loss's would never be made or trained."""
    if has_learnable_params(name):
        raise ValueError(f"loss {name!r} has learnable parameters (register_loss(params=...)), "
                         "which a distillation objective does not give its HAAQI and "
                         "distillation losses (only the loss of loss.name gets its own): "
                         "register your objective itself with params, calling "
                         "haaqi_jax.losses.distillation_terms for the terms")


#: Why a distillation sub-loss takes no per-layer weights.
_SUB_LAYER_WEIGHTS = ("{where}.kwargs.distill.kwargs.layer_weights: a distillation objective "
                      "calls its distillation loss once per target layer, so that loss sees "
                      "one layer; weigh the layers with the objective's own layer_weights "
                      "({where}.name=distill_weighted, {where}.kwargs.layer_weights)")


def weighted_mean(values: jax.Array, weight: jax.Array) -> jax.Array:
    """sum(w * v) / sum(w) over items: values (B,) and weight (B,) -> scalar; 0 when every
    weight is 0 (all filler). For (B, K) values map it over K, as `_per_layer` does: given
    them directly, the weight would broadcast against the last axis, not against B."""
    total = jnp.sum(weight)
    return jnp.sum(weight * values) / jnp.where(total > 0, total, 1.0)


@register_loss("haaqi_mse")
def haaqi_mse(predictions: Mapping[str, jax.Array], batch: Mapping[str, jax.Array], *,
              clip_weight: float = 1.0, frame_weight: float = 1.0
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """HAAQI-Net's loss: clip_weight * MSE(clip, label) + frame_weight * MSE(frames, label).

    The frame term is each clip's mean over its valid frames of (frame score - label)^2, then
    the weighted mean over clips: with batch size 1 (the paper) it is the plain frame MSE, and a
    clip counts the same whatever its length. Unlike the 2024 release, gradients flow through
    both terms.

    Args:
      predictions: clip_score (B,), frame_scores (B, T), frame_mask (B, T) True = valid.
      batch: label (B,) HAAQI in [0, 1], weight (B,) 0 = filler item.
    Returns:
      (loss, {"clip_mse", "frame_mse"}).
    """
    label = batch["label"].astype(jnp.float32)
    weight = batch["weight"].astype(jnp.float32)
    clip_se = jnp.square(predictions["clip_score"] - label)
    mask = predictions["frame_mask"].astype(jnp.float32)
    frame_se = jnp.square(predictions["frame_scores"] - label[:, None]) * mask
    frame_se = frame_se.sum(axis=-1) / jnp.maximum(mask.sum(axis=-1), 1.0)
    clip_mse = weighted_mean(clip_se, weight)
    frame_mse = weighted_mean(frame_se, weight)
    loss = clip_weight * clip_mse + frame_weight * frame_mse
    return loss, {"clip_mse": clip_mse, "frame_mse": frame_mse}


def weighted_pearson(x: jax.Array, y: jax.Array, weight: jax.Array, *,
                     eps: float = 1e-6) -> jax.Array:
    """Pearson correlation of x and y (B,) with items weighted by `weight` (0 = filler):
    cov / sqrt((var_x + eps) (var_y + eps)), the weighted (co)variances about the weighted
    means. `eps` keeps it finite, and its gradient bounded, when either side is constant (a
    batch of one label, a head that scores every clip alike, one real item): then cov is 0,
    so is the result, and so is its gradient; against the labels' variance (~0.1 on the demo
    set) it changes r by about 1e-5."""
    w = weight.astype(jnp.float32)
    x, y = x.astype(jnp.float32), y.astype(jnp.float32)
    dx, dy = x - weighted_mean(x, w), y - weighted_mean(y, w)
    cov = weighted_mean(dx * dy, w)
    return cov / jnp.sqrt((weighted_mean(dx * dx, w) + eps) * (weighted_mean(dy * dy, w) + eps))


@register_loss("haaqi_mse_corr")
def haaqi_mse_corr(predictions: Mapping[str, jax.Array], batch: Mapping[str, jax.Array], *,
                   clip_weight: float = 1.0, frame_weight: float = 1.0,
                   corr_weight: float = 0.1) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`haaqi_mse` + corr_weight * (1 - the batch's Pearson correlation of clip scores and
    labels), a term aimed at the LCC the model is judged by (`weighted_pearson`: filler items
    count for nothing; a batch of constant labels gives the term 1 and no gradient). The
    correlation of one batch is noisy with few items: train.batch_size 8 leaves 6 degrees of
    freedom.

    Returns:
      (loss, {"clip_mse", "frame_mse", "batch_lcc"}).
    """
    loss, aux = haaqi_mse(predictions, batch, clip_weight=clip_weight, frame_weight=frame_weight)
    r = weighted_pearson(predictions["clip_score"], batch["label"], batch["weight"])
    return loss + corr_weight * (1.0 - r), {**aux, "batch_lcc": r}


@register_loss("haaqi_components", row_fields=("haaqi_components",))
def haaqi_components(predictions: Mapping[str, jax.Array], batch: Mapping[str, jax.Array], *,
                     clip_weight: float = 1.0, frame_weight: float = 1.0,
                     score_weight: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`haaqi_mse` on each of HAAQI's two parts, for a head with the "haaqi_components" readout,
    plus score_weight * `haaqi_mse` on the combined score.

    Args:
      predictions: clip_components (B, 2), frame_components (B, T, 2), clip_score (B,),
        frame_scores (B, T), frame_mask (B, T) True = valid.
      batch: components (B, 2) the labels' (nonlinear, linear) parts, label (B,), weight (B,).
    Returns:
      (loss, {"nonlinear_clip_mse", "nonlinear_frame_mse", "linear_clip_mse", ...}).
    """
    if predictions.get("clip_components") is None:
        raise ValueError("loss 'haaqi_components' needs a head with readout "
                         "'haaqi_components' (model.head.readout)")
    kwargs = dict(clip_weight=clip_weight, frame_weight=frame_weight)
    total, aux = 0.0, {}
    for i, part in enumerate(COMPONENT_NAMES):
        part_loss, part_aux = haaqi_mse(
            {"clip_score": predictions["clip_components"][:, i],
             "frame_scores": predictions["frame_components"][..., i],
             "frame_mask": predictions["frame_mask"]},
            {"label": batch["components"][:, i], "weight": batch["weight"]}, **kwargs)
        total = total + part_loss
        aux.update({f"{part}_{k}": v for k, v in part_aux.items()})
    if score_weight:
        score_loss, score_aux = haaqi_mse(predictions, batch, **kwargs)
        total = total + score_weight * score_loss
        aux.update(score_aux)
    return total, aux


# ----------------------------------------------------------------------------------------------
# Distillation (distillBEATs). Predictions of a distillation step add:
#   student_layers (B, K, T, C)  the prediction heads' outputs, one per target layer
#   teacher_layers (B, K, T, C)  the frozen teacher's hidden states of those layers
# with frame_mask (B, T) True = valid token. A distillation loss returns the SUM over its K
# layers of a per-layer term (each term: mean over an item's valid tokens, then the weighted
# mean over items) and logs every term; "distill_weighted" / "distill_uncertainty" combine a
# HAAQI loss with such a loss, calling the latter once per layer to get the per-layer terms.


def _per_layer(per_token: jax.Array, predictions: Mapping[str, jax.Array],
               batch: Mapping[str, jax.Array]) -> jax.Array:
    """(B, K, T) per-token values -> (K,) masked token mean per item, weighted item mean."""
    mask = predictions["frame_mask"].astype(jnp.float32)[:, None, :]            # (B, 1, T)
    per_item = (per_token * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0)       # (B, K)
    return jax.vmap(weighted_mean, in_axes=(1, None))(per_item,
                                                       batch["weight"].astype(jnp.float32))


def _safe_norm(x: jax.Array, eps: float = 1e-8) -> jax.Array:
    """(...) Euclidean norm over the last axis, at least eps, as sqrt(max(|x|^2, eps^2)): the
    same value as max(|x|, eps), but a zero vector (e.g. a padded token of an encoder's input
    layer) gets a zero gradient through it instead of 0/0 = NaN, which a mask multiplying the
    loss afterwards would not remove."""
    return jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1), eps * eps))


def _cosine(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Cosine similarity over the last axis (torch.nn.functional.cosine_similarity's eps,
    `_safe_norm`)."""
    return (a * b).sum(-1) / (_safe_norm(a, eps) * _safe_norm(b, eps))


def _distill_result(name: str, terms: jax.Array, layer_weights) -> tuple[jax.Array, dict]:
    weights = (jnp.ones_like(terms) if layer_weights is None
               else jnp.asarray(layer_weights, terms.dtype))
    if weights.shape != terms.shape:
        raise ValueError(f"{name}: layer_weights has {weights.shape[0]} entries for "
                         f"{terms.shape[0]} target layers")
    return (weights * terms).sum(), {f"{name}_{k}": terms[k] for k in range(terms.shape[0])}


def _targets(predictions):
    student = predictions["student_layers"].astype(jnp.float32)
    teacher = jax.lax.stop_gradient(predictions["teacher_layers"].astype(jnp.float32))
    if student.shape != teacher.shape or student.ndim != 4:
        raise ValueError(f"distillation loss: student_layers {student.shape} and teacher_layers "
                         f"{teacher.shape} must both be (B, K, T, C)")
    return student, teacher


@register_loss("l1_cosine")
def l1_cosine(predictions, batch, *, cosine_weight: float = 1.0, layer_weights=None):
    """DistilHuBERT's loss per target layer: mean |s - t| - cosine_weight * log sigmoid(cos(s, t)).

    The L1 term is averaged over channels and valid tokens, the cosine term over valid tokens
    (Chang et al. 2022, eq. 1-2); layers are summed (optionally weighted).
    Returns (loss, {"l1_k", "cos_k" (the -log sigmoid term), "l1_cosine_k"}).
    """
    student, teacher = _targets(predictions)
    l1 = _per_layer(jnp.abs(student - teacher).mean(-1), predictions, batch)
    cos = _per_layer(-jax.nn.log_sigmoid(_cosine(student, teacher)), predictions, batch)
    loss, aux = _distill_result("l1_cosine", l1 + cosine_weight * cos, layer_weights)
    aux.update({f"l1_{k}": l1[k] for k in range(l1.shape[0])})
    aux.update({f"cos_{k}": cos[k] for k in range(cos.shape[0])})
    return loss, aux


@register_loss("l1")
def l1(predictions, batch, *, layer_weights=None):
    """Mean absolute error per target layer (channels and valid tokens), summed over layers."""
    student, teacher = _targets(predictions)
    return _distill_result("l1", _per_layer(jnp.abs(student - teacher).mean(-1), predictions,
                                            batch), layer_weights)


@register_loss("mse")
def mse(predictions, batch, *, layer_weights=None):
    """Mean squared error per target layer (channels and valid tokens), summed over layers."""
    student, teacher = _targets(predictions)
    return _distill_result("mse", _per_layer(jnp.square(student - teacher).mean(-1),
                                             predictions, batch), layer_weights)


@register_loss("cosine")
def cosine(predictions, batch, *, layer_weights=None):
    """Cosine distance 1 - cos(s, t) per valid token, averaged, summed over layers."""
    student, teacher = _targets(predictions)
    return _distill_result("cosine", _per_layer(1.0 - _cosine(student, teacher), predictions,
                                                batch), layer_weights)


@register_loss("info_nce")
def info_nce(predictions, batch, *, temperature: float = 0.1, layer_weights=None):
    """Frame-contrastive distillation (InfoNCE, van den Oord et al. 2018, "Representation
    Learning with Contrastive Predictive Coding"; in distillation as in Tian et al., ICLR 2020,
    "Contrastive Representation Distillation"), per target layer and item:

        -log softmax_u(cos(s_t, t_u) / temperature)[u = t]

    for each valid student frame s_t against the item's valid teacher frames t_u: a frame must
    be closer to its own teacher frame than to the clip's other frames. Unlike l1 / cosine it
    asks only for the teacher's relative geometry over time, not its values. Per-token terms
    are averaged as the other losses (valid tokens, then the weighted mean over items); layers
    are summed (optionally weighted). Costs (B, K, T, T) logits: 24 MB at B = 8, K = 3, 10 s.

    Args:
      temperature: > 0; smaller sharpens the softmax (0.1 is CRD's and SimCLR's usual order).
    Returns (loss, {"info_nce_k"}).
    """
    if not temperature > 0:                # its type: checked by get_loss
        raise ValueError(f"info_nce: temperature must be a number > 0, got {temperature!r}")
    student, teacher = _targets(predictions)                                    # (B, K, T, C)
    unit = lambda x: x / _safe_norm(x)[..., None]
    logits = jnp.einsum("bktc,bkuc->bktu", unit(student), unit(teacher)) / temperature
    valid = predictions["frame_mask"].astype(bool)                              # (B, T)
    # Padded teacher frames are no candidates; half the lowest float keeps every value finite
    # (an item of padding alone included), so the masked mean's zeros stay zeros.
    logits = jnp.where(valid[:, None, None, :], logits, jnp.finfo(logits.dtype).min / 2)
    own = jnp.diagonal(logits, axis1=-2, axis2=-1)                              # (B, K, T)
    per_token = jax.nn.logsumexp(logits, axis=-1) - own
    per_token = jnp.where(valid[:, None, :], per_token, 0.0)
    return _distill_result("info_nce", _per_layer(per_token, predictions, batch),
                           layer_weights)


#: The sub-losses of a distillation objective and the loss each defaults to.
SUB_LOSS_DEFAULTS = {"haaqi": "haaqi_mse", "distill": "l1_cosine"}


def _named(spec: Any, default: str) -> tuple[str, dict[str, Any]]:
    """A sub-loss given as a name or {"name": ..., "kwargs": {...}}."""
    if spec is None:
        return default, {}
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, Mapping) and "name" in spec:
        unknown = set(spec) - {"name", "kwargs"}
        if unknown:
            raise ValueError(f"loss spec {dict(spec)}: unknown keys {sorted(unknown)} "
                             "(use name and kwargs)")
        return str(spec["name"]), dict(spec.get("kwargs") or {})
    raise ValueError(f"loss spec must be a name or {{'name': ..., 'kwargs': {{...}}}}, "
                     f"got {spec!r}")


def distillation_terms(predictions, batch, *, haaqi=None, distill=None):
    """[HAAQI loss, distillation term of layer 1, ..., of layer K] as a (1 + K,) vector.

    `haaqi` / `distill`: registered loss names or {"name", "kwargs"} (default "haaqi_mse" and
    "l1_cosine"). The distillation loss is called once per target layer, so any registered
    loss of the (predictions, batch) form -- a user's own included -- gives per-layer terms.
    Returns ((1 + K,) terms, aux): aux holds the HAAQI loss as haaqi_loss and its terms as
    haaqi/<key>, each layer's term as distill_<k> (k = 0 .. K - 1) and the distillation loss's
    own terms of layer k as distill_<k>/<key>.
    """
    haaqi_name, haaqi_kwargs = _named(haaqi, SUB_LOSS_DEFAULTS["haaqi"])
    distill_name, distill_kwargs = _named(distill, SUB_LOSS_DEFAULTS["distill"])
    if "layer_weights" in distill_kwargs:
        raise ValueError(_SUB_LAYER_WEIGHTS.format(where="loss"))
    _refuse_sub_loss_params(haaqi_name)
    _refuse_sub_loss_params(distill_name)
    haaqi_loss, aux = get_loss(haaqi_name, **haaqi_kwargs)(predictions, batch)
    distill_fn = get_loss(distill_name, **distill_kwargs)
    terms = [haaqi_loss]
    aux = {f"haaqi/{k}": v for k, v in aux.items()}
    aux["haaqi_loss"] = haaqi_loss
    num_targets = predictions["student_layers"].shape[1]
    for k in range(num_targets):
        layer_predictions = dict(predictions)
        layer_predictions["student_layers"] = predictions["student_layers"][:, k:k + 1]
        layer_predictions["teacher_layers"] = predictions["teacher_layers"][:, k:k + 1]
        term, layer_aux = distill_fn(layer_predictions, batch)
        terms.append(term)
        aux[f"distill_{k}"] = term
        # The sub-loss's own terms of this layer, e.g. distill_0/l1 and distill_0/cos (its
        # per-layer suffix "_0" dropped: it saw one layer).
        aux.update({f"distill_{k}/{key[:-2] if key.endswith('_0') else key}": value
                    for key, value in layer_aux.items()})
    return jnp.stack(terms), aux


@register_loss("distill_weighted")
def distill_weighted(predictions, batch, *, haaqi=None, distill=None, haaqi_weight: float = 1.0,
                     distill_weight: float = 1.0, layer_weights=None):
    """haaqi_weight * HAAQI loss + distill_weight * sum_k layer_weights[k] * distill term k."""
    terms, aux = distillation_terms(predictions, batch, haaqi=haaqi, distill=distill)
    k = terms.shape[0] - 1
    lw = jnp.ones((k,)) if layer_weights is None else jnp.asarray(layer_weights, jnp.float32)
    if lw.shape != (k,):
        raise ValueError(f"distill_weighted: layer_weights has {lw.shape} entries for {k} "
                         f"target layers")
    loss = haaqi_weight * terms[0] + distill_weight * jnp.sum(lw * terms[1:])
    aux["distill_loss"] = jnp.sum(lw * terms[1:])
    return loss, aux


@register_loss("distill_uncertainty",
               params=lambda num_targets: {"log_vars": jnp.zeros((1 + num_targets,), jnp.float32)})
def distill_uncertainty(predictions, batch, *, haaqi=None, distill=None, min_log_var=-10.0):
    """Adaptive weighting by learned uncertainty (Kendall, Gal & Cipolla, CVPR 2018):

        loss = sum_i exp(-s_i) * L_i + s_i,   i over [HAAQI, layer 1, ..., layer K]

    with s_i = predictions["loss_params"]["log_vars"][i] learnable (a log variance, initial 0,
    i.e. weights 1). Why this: the HAAQI MSE (~1e-2) and the feature terms (~1) differ by orders
    of magnitude and drift apart during training; the loss is least at s_i = log L_i, where
    every term is scaled to O(1) without hand-tuned weights, with 1 + K parameters and no extra
    passes. The s_i get there only as fast as their optimizer lets them: Adam moves each by
    about its learning rate per step, so at a model's 5e-4 they barely leave 0 in a short run
    (set `optimizer.loss_params_learning_rate`, configs/distill.py). The
    + s_i regulariser stops the trivial solution of zero weights. s is clipped below at
    `min_log_var` so a term that reaches ~0 cannot get an unbounded weight. The loss can be
    negative; compare runs by the logged haaqi_loss / distill_k terms.
    """
    terms, aux = distillation_terms(predictions, batch, haaqi=haaqi, distill=distill)
    log_vars = predictions["loss_params"]["log_vars"]
    if log_vars.shape != terms.shape:
        raise ValueError(f"distill_uncertainty: {log_vars.shape[0]} log-variances for "
                         f"{terms.shape[0]} terms (HAAQI + {terms.shape[0] - 1} layers)")
    s = jnp.maximum(log_vars, min_log_var)
    loss = jnp.sum(jnp.exp(-s) * terms + s)
    aux.update({f"weight_{i}": jnp.exp(-s[i]) for i in range(terms.shape[0])})
    aux["distill_loss"] = jnp.sum(terms[1:])
    return loss, aux
