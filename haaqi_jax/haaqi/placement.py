"""Where HAAQI's float64 work runs: on a backend without float64 (TPUs), on the host's CPU.

XLA has no float64 (nor complex128) on TPUs: under `jax.enable_x64` a float64 computation
placed on a TPU fails deep inside the ear model ("64-bit data types are not yet supported on
the TPU driver API", "Element type C128 is not supported on TPU" for the FFTs; jax-ml/jax
#9862, #10158). HAAQI's float64 paths (`haaqi_v1`, `compute_haaqi`, `ear_model.ear_model`,
`haaqi_batch(dtype=float64)`, `haaqi-jax score`, `haaqi-jax label --dtype float64`) therefore
run on the host's CPU devices wherever the default backend lacks float64, and give the same
numbers as on a CPU-only host; float32 work stays on the default backend's devices.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import jax
import numpy as np

#: Platforms (`jax.default_backend()`, `Device.platform`; any case) whose XLA backend computes
#: float64 and complex128 natively. Every other platform is taken to lack them: TPUs, and
#: platforms not listed (Apple's METAL plugin has no float64, nor has AWS's neuron). A wrong
#: "no" costs only speed (the host CPU computes the same numbers); a wrong "yes" fails in XLA.
FLOAT64_PLATFORMS = frozenset({"cpu", "gpu", "cuda", "rocm"})


def computes_float64(platform: str) -> bool:
    """Whether JAX platform `platform` ("cpu", "gpu", "cuda", "rocm", "tpu", ...) computes
    float64 natively: True for FLOAT64_PLATFORMS, False for TPUs and unknown platforms."""
    return platform.lower() in FLOAT64_PLATFORMS


def float64_on_host() -> bool:
    """Whether float64 work must leave JAX's default backend for the host CPU (the default
    backend lacks float64: `computes_float64`)."""
    return not computes_float64(jax.default_backend())


def host_cpu_devices() -> list[jax.Device]:
    """This process's CPU devices (jax.local_devices(backend="cpu")).

    Raises:
      ValueError when JAX runs without its cpu backend (e.g. JAX_PLATFORMS=tpu), naming the
      platform, the fix and the float32 alternative.
    """
    try:
        return list(jax.local_devices(backend="cpu"))
    except RuntimeError as err:
        raise ValueError(
            f"HAAQI in float64 runs on the host CPU here ({jax.default_backend()} has no "
            f"float64), but JAX's cpu backend is not available ({err}): let JAX start it (e.g. "
            f"JAX_PLATFORMS=tpu,cpu), or compute in float32 (dtype=float32)") from err


def compute_devices(dtype) -> list[jax.Device]:
    """The local devices on which HAAQI computes in `dtype`: the default backend's
    (jax.local_devices()), except float64 on a backend without it: the host's CPU devices
    (`host_cpu_devices`; ValueError when JAX runs without them)."""
    if np.dtype(dtype) == np.float64 and float64_on_host():
        return host_cpu_devices()
    return list(jax.local_devices())


@contextlib.contextmanager
def float64_placement() -> Iterator[None]:
    """Context for float64 work: where the default backend lacks float64, the host's first
    CPU device becomes JAX's default device (jax.default_device), so new arrays and jit calls
    of uncommitted arguments run there (jit keys its cache on the default device: the CPU
    executables are compiled and kept apart). Elsewhere it changes nothing.

    Raises:
      ValueError when the host CPU is needed but JAX runs without its cpu backend.
    """
    if not float64_on_host():
        yield
        return
    with jax.default_device(host_cpu_devices()[0]):
        yield
