"""Data parallelism: 8 simulated CPU devices give the same losses and params as 1 device.

The 8-device side runs in a subprocess (XLA_FLAGS=--xla_force_host_platform_device_count=8 must
be set before JAX starts); this file is also that subprocess's script.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

NUM_STEPS = 3
BATCH = 8


def _run_steps(out_path: str | None = None):
    """Trains the HAAQI-Net head for NUM_STEPS on a fixed synthetic batch stream over every
    local device; returns (losses, flat params) and saves them when out_path is given."""
    import jax
    import jax.numpy as jnp
    from ml_collections import ConfigDict

    from haaqi_jax import losses
    from haaqi_jax.head import HAAQINetHead, HeadConfig
    from haaqi_jax.train import sharding, state as state_lib, steps

    head = HAAQINetHead(HeadConfig(adapter_dim=16, lstm_hidden=8, dense_dim=16, num_heads=4))
    rng = np.random.default_rng(0)
    t, c = 12, 24
    batches = []
    for _ in range(NUM_STEPS):
        lengths = rng.integers(3, t + 1, BATCH)
        batches.append({
            "features": rng.normal(size=(BATCH, t, c)).astype(np.float32),
            "token_mask": np.arange(t)[None, :] < lengths[:, None],
            "audiogram": rng.uniform(0, 60, (BATCH, 8)).astype(np.float32),
            "label": rng.uniform(0, 1, BATCH).astype(np.float32),
            "weight": np.r_[np.ones(BATCH - 2), np.zeros(2)].astype(np.float32),
        })
    b0 = batches[0]
    params = {"head": head.init(jax.random.PRNGKey(1), b0["features"], b0["token_mask"],
                                b0["audiogram"])["params"]}
    labels = state_lib.param_labels(params, ("head/adapter/.*",))  # one frozen part too
    # SGD, not Adam: Adam rescales gradients that are zero in exact arithmetic (e.g. the
    # attention key bias, which softmax ignores) to lr-sized steps of pure rounding noise.
    opt = ConfigDict({"name": "sgd", "learning_rate": 0.5, "momentum": 0.9})
    tx = state_lib.make_optimizer(opt, labels, NUM_STEPS)
    mesh = sharding.make_mesh()
    state = sharding.replicate(state_lib.create_train_state(params, tx, seed=3), mesh)
    forward = steps.make_head_forward(head)
    loss_fn = losses.get_loss("haaqi_mse")
    train_step, eval_step = steps.jit_steps(steps.make_train_step(forward, loss_fn, tx, labels),
                                            steps.make_eval_step(forward, loss_fn), mesh)
    step_losses = []
    for batch in batches:
        state, m = train_step(state, sharding.shard_batch(batch, mesh))
        step_losses.append(float(m["loss"]))
    ev = eval_step(state.params, sharding.shard_batch(batches[0], mesh))
    flat = {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    result = {"losses": np.asarray(step_losses), "eval_scores": np.asarray(ev["clip_score"]),
              "num_devices": np.asarray(mesh.devices.size), **flat}
    if out_path:
        np.savez(out_path, **result)
    return result


def _divisibility_error() -> str:
    from haaqi_jax.train import sharding
    try:
        sharding.check_global_batch(6, sharding.make_mesh())
    except ValueError as e:
        return str(e)
    return ""


@pytest.fixture(scope="module")
def eight_device_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded") / "eight.npz"
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, __file__, str(out)], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(np.load(out)), proc.stdout


def test_sharded_equals_single_device(eight_device_run):
    import jax
    assert len(jax.devices()) == 1
    eight, _ = eight_device_run
    one = _run_steps()
    assert int(eight["num_devices"]) == 8 and int(one["num_devices"]) == 1
    np.testing.assert_allclose(eight["losses"], one["losses"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(eight["eval_scores"], one["eval_scores"], rtol=1e-5, atol=1e-6)
    keys = [k for k in one if k.startswith("[")]
    assert keys and set(keys) == {k for k in eight if k.startswith("[")}
    for k in keys:
        np.testing.assert_allclose(eight[k], one[k], rtol=1e-5, atol=1e-5, err_msg=k)
    # The frozen adapter did not move on either side.
    assert any("adapter" in k for k in keys)


def test_indivisible_batch_is_a_clear_error(eight_device_run):
    _, stdout = eight_device_run
    assert "does not divide by the number of devices 8" in stdout


def test_shard_batch_places_items_on_the_data_axis():
    import jax
    from haaqi_jax.train import sharding
    mesh = sharding.make_mesh()
    batch = {"x": np.arange(8.0).reshape(4, 2), "name": np.array(["a", "b", "c", "d"])}
    out = sharding.shard_batch(batch, mesh)
    assert set(out) == {"x"}  # strings stay on the host
    assert out["x"].sharding.spec == jax.sharding.PartitionSpec("data")
    np.testing.assert_array_equal(sharding.to_host(out["x"]), batch["x"])
    with pytest.raises(ValueError, match="no batch axis"):
        sharding.shard_batch({"s": np.float32(1.0)}, mesh, keys=["s"])


if __name__ == "__main__":
    _run_steps(sys.argv[1])
    print(_divisibility_error())


def test_indivisible_batch_names_the_setting():
    from types import SimpleNamespace
    from haaqi_jax.train import sharding
    two_devices = SimpleNamespace(devices=np.empty(2))
    with pytest.raises(ValueError, match=r"^train.eval_batch_size 3 does not divide by the "
                                         r"number of devices 2 .*multiple of 2"):
        sharding.check_global_batch(3, two_devices, "train.eval_batch_size")
