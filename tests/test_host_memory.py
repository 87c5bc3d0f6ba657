"""haaqi_jax.host_memory: argument checks, and that XLA's CPU scratch stops page-faulting.

The setting belongs to the process, so the effect is measured in two fresh interpreters, one
without and one with `keep_freed_memory()`: the minor page faults of the median of the last 12
of 24 executions of a jitted function with tens of MB of scratch, as the kernel counts them
(getrusage).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from haaqi_jax import host_memory

_PROBE = textwrap.dedent("""
    import json, resource, sys
    from haaqi_jax import host_memory
    applied = host_memory.keep_freed_memory() if sys.argv[1] == "keep" else None
    import jax, jax.numpy as jnp

    @jax.jit
    def f(x):  # (1536, 1536) float32 intermediates: 9 MB each, several live at once
        y = jnp.sin(x) @ jnp.cos(x)
        z = jnp.tanh(y) @ jnp.exp(-x * x)
        return (y * z).sum() + jnp.sqrt(jnp.abs(z) + 1.0).sum()

    x = jnp.linspace(-1.0, 1.0, 1536 * 1536, dtype=jnp.float32).reshape(1536, 1536)
    faults = []
    for _ in range(24):
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        f(x).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
    # The median of the last 12 runs: the first runs fault in both settings (the compile, then
    # the heap growing to its working size over a few runs, more of them on a busy machine).
    late = sorted(faults[12:])
    print(json.dumps({"faults_per_run": late[len(late) // 2], "applied": applied}))
""")


def test_rejects_bad_thresholds():
    for bad in (0, -5, 2 ** 31):
        with pytest.raises(ValueError, match="threshold_bytes"):
            host_memory.keep_freed_memory(bad)


def _probe(mode: str) -> dict:
    # glibc's defaults: no malloc settings inherited from the caller's environment.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                         check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_xla_scratch_is_reused_instead_of_faulted_afresh():
    kept = _probe("keep")
    if not kept["applied"]:
        pytest.skip("no glibc mallopt on this platform: keep_freed_memory() is a no-op here")
    default = _probe("default")
    # Buffers above glibc's default mmap threshold: thousands of 4 KB faults per run.
    assert default["faults_per_run"] > 2000, default
    assert kept["faults_per_run"] < default["faults_per_run"] / 10, (default, kept)
