"""The one place that decides how arrays are laid out over devices: data parallelism.

A 1-D `Mesh` over every device with the axis name 'data'. Batches are split along their leading
(batch) axis over 'data' (`batch_sharding`); parameters, optimizer state and RNG keys are
replicated (`replicated`). Steps are `jax.jit`-ed with these as in/out shardings, so XLA inserts
the gradient all-reduce; the loss, normalised by the weight sum of the global batch, is the
same number as on one device.

Multi-host (several machines, each with its local accelerators)
-----------------------------------------------------------------
1. Call `jax.distributed.initialize()` at the very start of every process (before any other
   JAX call; on TPU pods and SLURM/Kubernetes clusters the arguments are detected, otherwise
   pass coordinator_address, num_processes, process_id: `train.py --distributed` or
   `train.py --coordinator HOST:PORT --num-processes N --process-id I`).
2. `make_mesh()` then spans `jax.devices()`, i.e. the devices of *all* hosts.
3. Each host reads only its shard of the data: the pipelines take
   `shard_index=jax.process_index(), shard_count=jax.process_count()` and yield host-local
   batches of `global_batch // jax.process_count()` items (`local_batch_size`).
4. `shard_batch` turns the host-local arrays into global arrays with
   `jax.make_array_from_process_local_data`, so the jitted step sees the global batch.
5. Only process 0 writes logs and reports (`is_main_process()`); orbax checkpoints are written
   collectively by all processes (every process calls save/restore).
6. Files every host reads from shared storage (the demo dataset, feature and target caches)
   are built by process 0 while the others wait at a barrier of the distributed runtime
   (`main_process_first`); then the others open what it wrote.
On one host (the default) steps 1, 3 and 6 are no-ops: process_count() == 1.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Mapping, Sequence, TypeVar

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"

#: How long the other processes of a multi-host job wait for process 0 to build shared files
#: (`main_process_first`): generous, a feature cache of a large set takes hours.
SHARED_BUILD_TIMEOUT_S = 24 * 3600

#: Barrier names must not repeat within a job; every process numbers its calls alike.
_barrier_numbers = itertools.count()

T = TypeVar("T")


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """1-D mesh with axis 'data' over `devices` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over 'data', other axes whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device (parameters, optimizer state, RNG)."""
    return NamedSharding(mesh, PartitionSpec())


def check_global_batch(global_batch_size: int, mesh: Mesh, what: str = "the global batch size"
                       ) -> None:
    """Raises a ValueError unless the global batch divides evenly over the devices and hosts;
    `what` names the setting in the message (e.g. "train.batch_size")."""
    n_dev = mesh.devices.size
    if global_batch_size % n_dev:
        raise ValueError(
            f"{what} {global_batch_size} does not divide by the number of devices "
            f"{n_dev} (data parallelism over mesh axis '{DATA_AXIS}'); choose a multiple of "
            f"{n_dev}, e.g. {max(n_dev, (global_batch_size // n_dev) * n_dev)}")
    n_proc = jax.process_count()
    if global_batch_size % n_proc:
        raise ValueError(f"{what} {global_batch_size} does not divide by the number of "
                         f"processes {n_proc}")


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    """The number of items this host must feed per step (checks divisibility first)."""
    check_global_batch(global_batch_size, mesh)
    return global_batch_size // jax.process_count()


def is_main_process() -> bool:
    """True on the process that writes logs, reports and exported models."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process of a multi-host job has called barrier(name) (the runtime's
    barrier of `jax.distributed`, timeout `SHARED_BUILD_TIMEOUT_S`); nothing on one process.
    Every process must make the same calls in the same order. If a process fails instead, the
    runtime stops the others after its heartbeat timeout (the error is in that process's log).
    """
    if jax.process_count() == 1:
        return
    from orbax.checkpoint import multihost   # a barrier with a timeout, no device collective
    multihost.sync_global_processes(f"haaqi_jax.{next(_barrier_numbers)}.{name}",
                                    timeout=SHARED_BUILD_TIMEOUT_S,
                                    processes=set(range(jax.process_count())))


def main_process_first(name: str, build: Callable[[], T]) -> T:
    """build() on process 0 first, then on the other processes.

    For files on storage all hosts share (the demo dataset, feature caches): process 0 writes
    them while the others wait (`barrier`); then the others' build() finds them done and only
    opens them. On one process: build().

    Args:
      name: what is built, for the barrier's name (e.g. "demo dataset").
      build: the building function; on the other processes it must only read what process 0
        wrote (e.g. a cache's build that finds every entry present).
    """
    if is_main_process():
        result = build()
        barrier(name)
        return result
    barrier(name)
    return build()


def shard_batch(batch: Mapping[str, Any], mesh: Mesh,
                keys: Sequence[str] | None = None) -> dict[str, jax.Array]:
    """Host-local numpy batch -> global jax arrays split over 'data'.

    Args:
      batch: dict of arrays with a leading batch axis (this host's items).
      mesh: from `make_mesh`.
      keys: the entries to transfer (default: every numeric array); others (e.g. strings) stay
        on the host and are not returned.
    Returns:
      dict of global arrays, leading axis = local batch * process_count.
    """
    sharding = batch_sharding(mesh)
    out = {}
    for key in (batch.keys() if keys is None else keys):
        value = np.asarray(batch[key])
        if keys is None and value.dtype.kind not in "biuf":
            continue
        if value.ndim == 0:
            raise ValueError(f"shard_batch: entry {key!r} has no batch axis")
        global_items = value.shape[0] * jax.process_count()
        if global_items % mesh.devices.size:
            raise ValueError(
                f"shard_batch: entry {key!r} holds a global batch of {global_items} items, which "
                f"does not divide by the number of devices {mesh.devices.size}")
        out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a pytree (parameters, optimizer state) as a full copy on every device."""
    return jax.device_put(tree, replicated(mesh))


def local_data_parallel(fn: Callable[..., Any], params: Any, batch: Sequence[np.ndarray],
                        mesh: Mesh) -> Any:
    """fn(params, *batch) split over a mesh of this host's devices -> numpy outputs.

    For inference outside the training step (prediction, feature caches): the rows (leading
    axis) of every batch array are filled up to a multiple of the device count with copies of
    the first row, split over 'data', and cut back to the original count in every output.

    Args:
      fn: jitted function of (params, *batch) returning a pytree of (rows, ...) arrays.
      params: replicated over `mesh` (`replicate`), so they are not copied per call.
      batch: arrays with the same leading row count.
      mesh: from `make_mesh(jax.local_devices())`: each host of a multi-host job computes on
        its own devices only.
    """
    rows = batch[0].shape[0]
    fill = -rows % mesh.devices.size
    if fill:
        batch = [np.concatenate([x, np.repeat(x[:1], fill, axis=0)]) for x in batch]
    out = fn(params, *jax.device_put(tuple(batch), batch_sharding(mesh)))
    return jax.tree.map(lambda y: np.asarray(y)[:rows], out)


def to_host(x: jax.Array) -> np.ndarray:
    """A (possibly multi-host) global array as one numpy array on every host."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
