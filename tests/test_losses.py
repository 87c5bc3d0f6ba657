"""The loss registry and haaqi_mse vs a batch-size-1 PyTorch reference (the paper's setting)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from haaqi_jax import losses


def _batch(seed=0, b=5, t=9):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, t + 1, b)
    mask = np.arange(t)[None, :] < lengths[:, None]
    frames = rng.uniform(0, 1, (b, t)) * mask
    clip = frames.sum(1) / lengths
    label = rng.uniform(0, 1, b)
    weight = np.array([1, 1, 0, 1, 1], np.float32)[:b]
    preds = {"clip_score": jnp.asarray(clip, jnp.float32), "frame_scores": jnp.asarray(frames, jnp.float32),
             "frame_mask": jnp.asarray(mask)}
    batch = {"label": jnp.asarray(label, jnp.float32), "weight": jnp.asarray(weight)}
    return preds, batch, lengths


@pytest.mark.parametrize("cw,fw", [(1.0, 1.0), (0.3, 2.0)])
def test_haaqi_mse_matches_torch_batch_one(cw, fw):
    preds, batch, lengths = _batch()
    loss, aux = losses.get_loss("haaqi_mse", clip_weight=cw, frame_weight=fw)(preds, batch)
    mse = torch.nn.functional.mse_loss
    per_item, weights = [], []
    for i in range(len(lengths)):  # the released model sees one unpadded clip at a time
        frames = torch.tensor(np.asarray(preds["frame_scores"][i, :lengths[i]]), dtype=torch.float64)
        label = torch.tensor(float(batch["label"][i]), dtype=torch.float64)
        clip = torch.tensor(float(preds["clip_score"][i]), dtype=torch.float64)
        per_item.append(cw * mse(clip, label) + fw * mse(frames, label.expand_as(frames)))
        weights.append(float(batch["weight"][i]))
    ref = sum(w * l for w, l in zip(weights, per_item)) / sum(weights)
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)
    assert float(cw * aux["clip_mse"] + fw * aux["frame_mse"]) == pytest.approx(float(loss), rel=1e-6)


def test_filler_items_do_not_count():
    preds, batch, _ = _batch()
    fn = losses.get_loss("haaqi_mse")
    moved = dict(preds, clip_score=preds["clip_score"].at[2].set(123.0),
                 frame_scores=preds["frame_scores"].at[2].set(-50.0))
    assert float(fn(preds, batch)[0]) == float(fn(moved, batch)[0])
    all_filler = dict(batch, weight=jnp.zeros_like(batch["weight"]))
    assert float(fn(preds, all_filler)[0]) == 0.0


def test_gradient_flows_through_frame_term():
    preds, batch, _ = _batch()
    fn = losses.get_loss("haaqi_mse", clip_weight=0.0, frame_weight=1.0)
    g = jax.grad(lambda f: fn(dict(preds, frame_scores=f), batch)[0])(preds["frame_scores"])
    g = np.asarray(g)
    mask = np.asarray(preds["frame_mask"])
    assert np.all(g[~mask] == 0) and np.all(g[2] == 0)  # padded frames, filler item
    assert np.count_nonzero(g[mask & (np.asarray(batch["weight"])[:, None] > 0)]) > 0


def test_user_registered_loss_and_errors():
    @losses.register_loss("test_abs_clip")
    def abs_clip(predictions, batch, *, scale=1.0):
        err = scale * jnp.abs(predictions["clip_score"] - batch["label"])
        return losses.weighted_mean(err, batch["weight"]), {}

    assert "test_abs_clip" in losses.available_losses()
    preds, batch, _ = _batch()
    got = float(losses.get_loss("test_abs_clip", scale=2.0)(preds, batch)[0])
    w = np.asarray(batch["weight"])
    ref = 2.0 * np.sum(w * np.abs(np.asarray(preds["clip_score"]) - np.asarray(batch["label"]))) / w.sum()
    assert got == pytest.approx(ref, rel=1e-6)
    with pytest.raises(ValueError, match="already registered"):
        losses.register_loss("test_abs_clip")(lambda p, b: (0.0, {}))
    with pytest.raises(ValueError, match="unknown loss 'nope'"):
        losses.get_loss("nope")
    # a keyword the loss does not take is named at build time, not inside a compiled step
    with pytest.raises(ValueError, match=r"loss 'test_abs_clip' takes no keyword 'scael' "
                                         r"\(its keywords: \['scale'\]\)"):
        losses.get_loss("test_abs_clip", scael=2.0)
    with pytest.raises(ValueError, match="takes no keyword 'score_weight'"):
        losses.get_loss("haaqi_mse", score_weight=1.0)
    # --set loss.name=test_abs_clip keeps the default config's kwargs: the error says so
    with pytest.raises(ValueError, match=r"takes no keyword 'clip_weight'.*; loss.kwargs belong "
                                         r"to the loss the config names: .*'loss.kwargs=\{\}'"):
        losses.check_loss_config("test_abs_clip", {"clip_weight": 1.0, "frame_weight": 1.0})
    losses.check_loss_config("test_abs_clip", {})
    # a string for a numeric keyword (loss.kwargs.min_log_var=abc) failed inside the step
    with pytest.raises(ValueError, match=r"loss 'test_abs_clip': keyword 'scale' takes a "
                                         r"number \(default 1.0\), got 'abc'"):
        losses.get_loss("test_abs_clip", scale="abc")
    with pytest.raises(ValueError, match=r"^loss.kwargs.haaqi: loss spec .*unknown keys"):
        losses.check_loss_config("distill_weighted", {"haaqi": {"name": "haaqi_mse",
                                                                "kwarg": {}}})
    # a bare @register_loss registered nothing and let the run fail later as "unknown loss"
    with pytest.raises(TypeError, match=r"write @register_loss\(\"my_loss\"\)"):
        @losses.register_loss
        def bare(predictions, batch):
            return 0.0, {}


def test_reregistering_without_params_drops_the_old_params():
    """A name registered again (overwrite=True) is the new loss alone: learnable parameters of
    the old one must not stay attached to it."""
    @losses.register_loss("test_with_params", overwrite=True,
                          params=lambda k: {"log_var": jnp.zeros(k)})
    def with_params(predictions, batch):
        return 0.0, {}

    assert losses.has_learnable_params("test_with_params")
    assert losses.loss_params("test_with_params", 3)["log_var"].shape == (3,)

    @losses.register_loss("test_with_params", overwrite=True)
    def without_params(predictions, batch):
        return 0.0, {}

    assert not losses.has_learnable_params("test_with_params")
    assert losses.loss_params("test_with_params", 3) == {}


def test_a_user_loss_that_reads_a_missing_key_or_logs_an_array_is_named():
    @losses.register_loss("test_reads_loudness", overwrite=True)
    def reads_loudness(predictions, batch):
        return jnp.mean(predictions["loudness"]), {}

    @losses.register_loss("test_logs_per_item", overwrite=True)
    def logs_per_item(predictions, batch):
        err = jnp.abs(predictions["clip_score"] - batch["label"])
        return jnp.mean(err), {"per_item": err}

    preds, batch, _ = _batch()
    with pytest.raises(ValueError, match=r"loss 'test_reads_loudness' read the key 'loudness'.*"
                                         r"predictions: \[.*'clip_score'"):
        losses.get_loss("test_reads_loudness")(preds, batch)
    # a (B,) aux would be averaged into one logged number without a word
    with pytest.raises(ValueError, match=r"'test_logs_per_item' returned aux values that are "
                                         r"not scalars \(\{'per_item': \(\d+,\)\}\)"):
        jax.jit(losses.get_loss("test_logs_per_item"))(preds, batch)


def test_haaqi_components_is_haaqi_mse_on_each_part_plus_the_score():
    """Known inputs: the loss must equal haaqi_mse (checked against torch above) on the
    nonlinear part, on the linear part, and score_weight times on the combined score."""
    preds, batch, _ = _batch(1)
    rng = np.random.default_rng(2)
    mask = np.asarray(preds["frame_mask"])
    frame_parts = rng.uniform(0, 1, mask.shape + (2,)) * mask[..., None]
    clip_parts = frame_parts.sum(1) / mask.sum(1)[:, None]
    parts = rng.uniform(0, 1, (len(mask), 2))
    preds = dict(preds, frame_components=jnp.asarray(frame_parts, jnp.float32),
                 clip_components=jnp.asarray(clip_parts, jnp.float32))
    batch = dict(batch, components=jnp.asarray(parts, jnp.float32))
    mse = losses.get_loss("haaqi_mse", clip_weight=0.5, frame_weight=2.0)
    expected = sum(float(mse({"clip_score": preds["clip_components"][:, i],
                              "frame_scores": preds["frame_components"][..., i],
                              "frame_mask": preds["frame_mask"]},
                             {"label": batch["components"][:, i], "weight": batch["weight"]})[0])
                   for i in range(2))
    fn = losses.get_loss("haaqi_components", clip_weight=0.5, frame_weight=2.0)
    loss, aux = fn(preds, batch)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert set(aux) == {"nonlinear_clip_mse", "nonlinear_frame_mse", "linear_clip_mse",
                        "linear_frame_mse"}
    with_score = losses.get_loss("haaqi_components", clip_weight=0.5, frame_weight=2.0,
                                 score_weight=0.3)(preds, batch)[0]
    assert float(with_score) == pytest.approx(expected + 0.3 * float(mse(preds, batch)[0]),
                                              rel=1e-6)
    # the part labels matter (the test can fail): swapping them moves the loss
    swapped = dict(batch, components=batch["components"][:, ::-1])
    assert abs(float(fn(preds, swapped)[0]) - float(loss)) > 1e-3
    with pytest.raises(ValueError, match="readout 'haaqi_components'"):
        fn({k: v for k, v in preds.items() if "components" not in k}, batch)
    assert losses.required_row_fields("haaqi_components") == ("haaqi_components",)
    assert losses.required_row_fields("haaqi_mse") == ()
    assert losses.required_row_fields("distill_weighted",
                                      {"haaqi": "haaqi_components"}) == ("haaqi_components",)


def test_a_config_file_that_registers_a_loss_loads_twice(tmp_path):
    """The README's pattern (register in your config file) survives loading the config twice
    in one process (a notebook, a sweep); another function under the same name still needs
    overwrite=True."""
    from haaqi_jax import config as cfglib
    config_file = tmp_path / "my_config.py"
    config_file.write_text(
        "from haaqi_jax.losses import register_loss\n"
        "from ml_collections import ConfigDict\n"
        "@register_loss('test_config_file_loss')\n"
        "def my_loss(predictions, batch, *, scale=1.0):\n"
        "    return scale * predictions['clip_score'].mean(), {}\n"
        "def get_config():\n"
        "    return ConfigDict({'loss': {'name': 'test_config_file_loss'}})\n")
    for _ in range(2):
        assert cfglib.load_config_file(config_file).loss.name == "test_config_file_loss"
    with pytest.raises(ValueError, match="'test_config_file_loss' is already registered by"):
        losses.register_loss("test_config_file_loss")(lambda p, b: (0.0, {}))
    # The same file name in another folder (runs/a/config.py, runs/b/config.py) is another
    # definition: refused, where it used to replace the first silently.
    other = tmp_path / "other" / "my_config.py"
    other.parent.mkdir()
    other.write_text(config_file.read_text().replace("scale *", "2 * scale *"))
    with pytest.raises(ValueError, match="'test_config_file_loss' is already registered"):
        cfglib.load_config_file(other)


def test_a_bool_keyword_refuses_a_string():
    """A string for a keyword whose default is a bool (e.g. "false" from a config) would be
    truthy inside the loss: refused by name, as a string for a number keyword is."""

    @losses.register_loss("test_bool_keyword", overwrite=True)
    def flagged(predictions, batch, *, symmetric: bool = False):
        return jnp.float32(1.0 if symmetric else 0.0), {}

    preds, batch, _ = _batch()
    assert float(losses.get_loss("test_bool_keyword", symmetric=True)(preds, batch)[0]) == 1.0
    for value in ("false", "true"):
        with pytest.raises(ValueError, match="keyword 'symmetric' takes true or false"):
            losses.get_loss("test_bool_keyword", symmetric=value)


def test_a_keyword_without_default_must_be_given():
    """A loss keyword with no default that the config does not give was found only when the
    step was first traced: in a distillation after the teacher had trained, as a bare
    TypeError. It is refused with the keyword named, by get_loss and by check_loss_config,
    for the objective and for a distillation term."""

    @losses.register_loss("test_needs_scale", overwrite=True)
    def needs_scale(predictions, batch, *, scale):
        return scale * jnp.mean(predictions["clip_score"]), {}

    preds, batch, _ = _batch()
    assert float(losses.get_loss("test_needs_scale", scale=0.0)(preds, batch)[0]) == 0.0
    with pytest.raises(ValueError, match=r"loss 'test_needs_scale' needs keyword 'scale' "
                                         r"\(it has no default\)"):
        losses.get_loss("test_needs_scale")
    with pytest.raises(ValueError, match=r"^loss.name='test_needs_scale': .*needs keyword "
                                         r"'scale'"):
        losses.check_loss_config("test_needs_scale", {})
    with pytest.raises(ValueError, match=r"^loss.kwargs.distill: .*needs keyword 'scale'"):
        losses.check_loss_config("distill_weighted", {"distill": "test_needs_scale"})
    losses.check_loss_config("distill_weighted", {"distill": {"name": "test_needs_scale",
                                                              "kwargs": {"scale": 2.0}}})


def test_weighted_pearson_matches_scipy_and_ignores_filler():
    from scipy.stats import pearsonr

    rng = np.random.default_rng(1)
    x, y = rng.uniform(0, 1, 12), rng.uniform(0, 1, 12)
    y = 0.6 * x + 0.4 * y                              # r about 0.8
    w = np.ones(12, np.float32)
    w[[3, 7]] = 0.0                                    # filler items: left out of scipy's
    r = losses.weighted_pearson(jnp.asarray(x), jnp.asarray(y), jnp.asarray(w))
    keep = w > 0
    assert float(r) == pytest.approx(pearsonr(x[keep], y[keep])[0], rel=2e-4)
    # integer weights count an item that many times
    w2 = np.array([2, 1, 3] + [1] * 9, np.float32)
    rep = np.repeat(np.arange(12), w2.astype(int))
    r2 = losses.weighted_pearson(jnp.asarray(x), jnp.asarray(y), jnp.asarray(w2))
    assert float(r2) == pytest.approx(pearsonr(x[rep], y[rep])[0], rel=2e-4)
    assert float(losses.weighted_pearson(jnp.asarray(x), jnp.asarray(-y), jnp.asarray(w))) \
        == pytest.approx(-pearsonr(x[keep], y[keep])[0], rel=2e-4)


def test_haaqi_mse_corr_is_mse_plus_the_correlation_term_and_safe_when_constant():
    preds, batch, _ = _batch(b=5)
    mse_loss, _ = losses.get_loss("haaqi_mse")(preds, batch)
    fn = losses.get_loss("haaqi_mse_corr", corr_weight=0.5)
    loss, aux = fn(preds, batch)
    r = losses.weighted_pearson(preds["clip_score"], batch["label"], batch["weight"])
    assert float(loss) == pytest.approx(float(mse_loss) + 0.5 * (1 - float(r)), rel=1e-6)
    assert float(aux["batch_lcc"]) == float(r)
    grad = lambda p, b: np.asarray(jax.grad(lambda c: fn(dict(p, clip_score=c), b)[0])(
        p["clip_score"]))
    assert grad(preds, batch)[2] == 0.0                          # the filler item
    # constant labels, constant predictions, one real item: finite, r = 0, gradient finite
    for p, b in ((preds, dict(batch, label=jnp.full(5, 0.4))),
                 (dict(preds, clip_score=jnp.full(5, 0.7)), batch),
                 (preds, dict(batch, weight=jnp.array([0, 0, 1, 0, 0], jnp.float32))),
                 (preds, dict(batch, weight=jnp.zeros(5)))):
        loss, aux = fn(p, b)
        assert np.isfinite(float(loss)) and abs(float(aux["batch_lcc"])) < 1e-6
        assert np.all(np.isfinite(grad(p, b)))
    # constant labels: the correlation term adds no gradient to the MSE's
    const = dict(batch, label=jnp.full(5, 0.4))
    plain = losses.get_loss("haaqi_mse")
    g_plain = jax.grad(lambda c: plain(dict(preds, clip_score=c), const)[0])(preds["clip_score"])
    np.testing.assert_allclose(grad(preds, const), g_plain, atol=1e-7)


def test_haaqi_mse_corr_gradient_matches_finite_differences():
    preds, batch, _ = _batch(seed=3, b=5)
    fn = losses.get_loss("haaqi_mse_corr", clip_weight=0.0, frame_weight=0.0, corr_weight=1.0)
    f = lambda c: float(fn(dict(preds, clip_score=jnp.asarray(c, jnp.float32)), batch)[0])
    clip = np.asarray(preds["clip_score"], np.float64)
    g = np.asarray(jax.grad(lambda c: fn(dict(preds, clip_score=c), batch)[0])(
        preds["clip_score"]))
    h = 1e-3
    for i in range(5):
        e = np.zeros(5)
        e[i] = h
        assert g[i] == pytest.approx((f(clip + e) - f(clip - e)) / (2 * h), abs=2e-3)
    assert np.count_nonzero(g) == 4                               # all but the filler item
