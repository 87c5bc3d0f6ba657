"""Float64 HAAQI on a backend without float64 (TPUs) runs on the host CPU; float32 does not.

This machine has CPUs only, so the tests pretend to be a TPU host (`pretend_tpu_host`):
`jax.default_backend()` says "tpu" and `jax.local_devices()` (no backend named) lists fake TPU
devices that no computation can use, while the cpu backend stays real. float64 work must then
run with a CPU device as JAX's default device, never touch the fake devices, and give exactly
the numbers of an unpatched run; float32 work must keep to the (fake) accelerators.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haaqi_jax.audiogram import Audiogram
from haaqi_jax.haaqi import placement

SLOPING = [10, 15, 20, 30, 40, 50, 60, 65]


class FakeTPU:
    """A TPU device as `jax.local_devices()` lists it; no array can be placed on it."""

    platform = "tpu"

    def __init__(self, index: int):
        self.id = index

    def memory_stats(self):
        return {"bytes_limit": 16 * 2 ** 30}

    def __repr__(self):
        return f"FakeTPU({self.id})"


def pretend_tpu_host(monkeypatch, count: int = 4) -> list[FakeTPU]:
    """Makes this process look like a host with `count` TPUs and a CPU; returns the TPUs."""
    real_local_devices = jax.local_devices
    tpus = [FakeTPU(i) for i in range(count)]

    def local_devices(process_index=None, backend=None, host_id=None):
        if backend is None:
            return list(tpus)
        return real_local_devices(process_index, backend, host_id)

    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    monkeypatch.setattr(jax, "local_devices", local_devices)
    monkeypatch.setattr(jax, "local_device_count",
                        lambda backend=None: len(local_devices(backend=backend)))
    return tpus


def spy_default_device(monkeypatch, module, name: str) -> list:
    """Wraps module.name to record JAX's default device at each call."""
    real = getattr(module, name)
    seen = []

    def spy(*args, **kwargs):
        seen.append(jax.config.jax_default_device)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return seen


CPU0 = jax.local_devices(backend="cpu")[0]


# ----------------------------------------------------------------------------------------------
# The predicate and the devices


@pytest.mark.parametrize("platform,native", [
    ("cpu", True), ("gpu", True), ("cuda", True), ("rocm", True), ("GPU", True),
    ("tpu", False), ("TPU", False), ("METAL", False), ("neuron", False), ("", False)])
def test_computes_float64_by_platform(platform, native):
    assert placement.computes_float64(platform) is native


def test_float64_goes_to_the_host_cpu_only_where_the_backend_lacks_it(monkeypatch):
    assert not placement.float64_on_host()                     # this CPU host
    assert placement.compute_devices(np.float64) == jax.local_devices()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not placement.float64_on_host()
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert placement.float64_on_host()


def test_compute_devices_on_a_tpu_host(monkeypatch):
    tpus = pretend_tpu_host(monkeypatch)
    assert placement.compute_devices(np.float32) == tpus
    assert placement.compute_devices(jnp.float32) == tpus
    cpus = placement.compute_devices(np.float64)
    assert cpus and all(d.platform == "cpu" for d in cpus)
    assert cpus == jax.local_devices(backend="cpu")
    with placement.float64_placement():
        assert jax.config.jax_default_device == CPU0
        assert jnp.zeros(3).devices() == {CPU0}
    assert jax.config.jax_default_device is None


def test_float64_placement_changes_nothing_on_a_float64_backend():
    with placement.float64_placement():
        assert jax.config.jax_default_device is None


def test_a_tpu_host_without_the_cpu_backend_names_the_fix(monkeypatch):
    pretend_tpu_host(monkeypatch)

    def no_cpu(process_index=None, backend=None, host_id=None):
        if backend is None:
            return [FakeTPU(0)]
        raise RuntimeError(f"Unknown backend {backend}")

    monkeypatch.setattr(jax, "local_devices", no_cpu)
    message = (r"float64 runs on the host CPU here \(tpu has no float64\), but JAX's cpu "
               r"backend is not available \(Unknown backend cpu\).*JAX_PLATFORMS=tpu,cpu.*"
               r"dtype=float32")
    with pytest.raises(ValueError, match=message):
        placement.compute_devices(np.float64)
    with pytest.raises(ValueError, match=message):
        with placement.float64_placement():
            pass
    assert [d.platform for d in placement.compute_devices(np.float32)] == ["tpu"]


# ----------------------------------------------------------------------------------------------
# One pair: haaqi_v1, compute_haaqi, ear_model.ear_model


FS = 24000


def _pair(seconds: float = 0.5, seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    t = np.arange(int(seconds * FS)) / FS
    rng = np.random.default_rng(seed)
    ref = 0.1 * sum(np.sin(2 * np.pi * 220 * h * t + h) / h for h in range(1, 6))
    ref = ref * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return ref, ref + 0.02 * rng.standard_normal(ref.size)


def test_haaqi_v1_on_a_tpu_host_runs_on_the_cpu_and_gives_the_cpu_host_numbers(monkeypatch):
    from haaqi_jax.haaqi import api
    ref, proc = _pair()
    audiogram = Audiogram(SLOPING)
    np.random.seed(4)
    want = api.haaqi_v1(ref, FS, proc, FS, audiogram, 1)
    np.random.seed(4)
    want_compute = api.compute_haaqi(proc, ref, FS, FS, audiogram)
    state = np.random.get_state()[1].copy()

    pretend_tpu_host(monkeypatch)
    ear_calls = spy_default_device(monkeypatch, api, "_ear_and_loud_frames")
    backend_calls = spy_default_device(monkeypatch, api, "_backend_jit")
    np.random.seed(4)
    got = api.haaqi_v1(ref, FS, proc, FS, audiogram, 1)
    assert got == want                                    # the same floats, bit for bit
    assert ear_calls == [CPU0] and backend_calls == [CPU0]
    np.random.seed(4)
    assert api.compute_haaqi(proc, ref, FS, FS, audiogram) == want_compute
    assert ear_calls == [CPU0] * 2 and backend_calls == [CPU0] * 2
    np.testing.assert_array_equal(np.random.get_state()[1], state)   # pyclarity's draws
    assert jax.config.jax_default_device is None           # restored afterwards


def test_ear_model_drop_in_on_a_tpu_host_runs_on_the_cpu(monkeypatch):
    from haaqi_jax.haaqi import ear_model
    ref, proc = _pair(0.3)
    loss = np.array([10, 20, 30, 40, 50, 60.0])
    np.random.seed(2)
    want = ear_model.ear_model(ref, FS, proc, FS, loss, 1, 65.0)
    pretend_tpu_host(monkeypatch)
    calls = spy_default_device(monkeypatch, ear_model, "_core_jit")
    np.random.seed(2)
    got = ear_model.ear_model(ref, FS, proc, FS, loss, 1, 65.0)
    assert calls == [CPU0]
    for ours, theirs in zip(got, want):
        np.testing.assert_array_equal(ours, theirs)


# ----------------------------------------------------------------------------------------------
# Batches: haaqi_batch / score_prepared


class _MeshBuilt(Exception):
    """Raised by a stand-in for sharding.make_mesh: where the batch would have run."""

    def __init__(self, devices, default_device):
        super().__init__("mesh")
        self.devices, self.default_device = list(devices), default_device


def _stop_at_the_mesh(monkeypatch) -> None:
    from haaqi_jax.train import sharding

    def make_mesh(devices=None):
        raise _MeshBuilt(devices, jax.config.jax_default_device)

    monkeypatch.setattr(sharding, "make_mesh", make_mesh)


def _batch(count: int = 2):
    pairs = [_pair(0.5, seed) for seed in range(count)]
    return (np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]),
            np.asarray([SLOPING] * count, dtype=float))


def test_float32_batch_on_a_tpu_host_keeps_to_the_accelerators(monkeypatch):
    from haaqi_jax.haaqi import api
    tpus = pretend_tpu_host(monkeypatch)
    _stop_at_the_mesh(monkeypatch)
    ref, proc, levels = _batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")                     # and no warning about the CPU
        with pytest.raises(_MeshBuilt) as built:
            api.haaqi_batch(ref, proc, FS, levels, dtype=jnp.float32)
    assert built.value.devices == tpus and built.value.default_device is None


def test_float64_batch_on_a_tpu_host_goes_to_the_host_cpu_with_a_warning(monkeypatch):
    from haaqi_jax.haaqi import api
    pretend_tpu_host(monkeypatch)
    _stop_at_the_mesh(monkeypatch)
    ref, proc, levels = _batch()
    with pytest.warns(UserWarning, match=r"^HAAQI in float64 runs on the host CPU \(1 "
                                         r"device\) as tpu has no float64.*dtype=float32"):
        with pytest.raises(_MeshBuilt) as built:
            api.haaqi_batch(ref, proc, FS, levels, dtype=jnp.float64)
    assert built.value.devices == jax.local_devices(backend="cpu")


def test_float64_batch_on_a_float64_backend_does_not_warn(monkeypatch):
    from haaqi_jax.haaqi import api
    _stop_at_the_mesh(monkeypatch)
    ref, proc, levels = _batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(_MeshBuilt) as built:
            api.haaqi_batch(ref, proc, FS, levels, dtype=jnp.float64)
    assert built.value.devices == jax.local_devices() and built.value.default_device is None


def test_float64_batch_on_a_tpu_host_gives_the_cpu_host_numbers(monkeypatch):
    """The whole float64 batch, fake TPUs listed: no array may reach them (a Mesh over them
    fails), every call runs with the CPU as default device, and the floats are a CPU host's."""
    from haaqi_jax.haaqi import api
    ref, proc, levels = _batch(3)
    keys = jax.random.split(jax.random.PRNGKey(5), 3)
    want = api.haaqi_batch(ref, proc, FS, levels, key=keys, dtype=jnp.float64, chunk=2)
    pretend_tpu_host(monkeypatch)
    calls = spy_default_device(monkeypatch, api, "_batch_core")
    with pytest.warns(UserWarning, match="float64 runs on the host CPU"):
        got = api.haaqi_batch(ref, proc, FS, levels, key=keys, dtype=jnp.float64, chunk=2)
    assert calls == [CPU0, CPU0]                          # 2 chunks of 2
    for field in ("combined", "nonlinear", "linear", "cephigh", "bmsync5", "d_loud", "d_norm"):
        np.testing.assert_array_equal(np.asarray(getattr(got, field)),
                                      np.asarray(getattr(want, field)), err_msg=field)
