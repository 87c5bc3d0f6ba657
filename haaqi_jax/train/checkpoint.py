"""The one place that writes and reads checkpoints (orbax), for conversion, training and prediction.

A *parameter directory* holds:
  params/        an orbax StandardCheckpointer tree (numpy arrays, float32 unless stated)
  config.json    whatever JSON-able metadata describes how to rebuild the module

`save_params` writes into a temporary sibling directory and renames it into place only when
everything succeeded, so a failed conversion leaves nothing behind.

Training checkpoints (train state + loop position, resumable) go through
`TrainCheckpointManager`, an orbax CheckpointManager that keeps the latest and the best step.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import numpy as np

from haaqi_jax.files import read_json, write_atomic

PARAMS_SUBDIR = "params"
CONFIG_FILE = "config.json"


def _checkpointer():
    """An orbax checkpointer private to this process. A parameter directory is written and
    read by one process alone (a multi-host run's main process exports the best model while
    the others go on; a loader may run on any host): orbax's default would wait for every
    process at a barrier and hang there."""
    import orbax.checkpoint as ocp  # imported lazily: orbax is slow to import
    me = jax.process_index()
    return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"params_{me}"))


def check_params_target(directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """The absolute path `save_params` may write, checked before any long work.

    Raises:
      ValueError for an empty path; FileExistsError when it exists and `overwrite` is off, or
      when it is not a parameter directory (config.json and params/ only: `overwrite` never
      deletes another folder, e.g. a folder of models, or the current folder or one above it,
      given as "" or "."), or is a file.
    """
    if not str(directory).strip():
        raise ValueError("the output folder is empty; name a new folder")
    directory = Path(directory).absolute()
    if not directory.exists():
        if any(parent.is_file() for parent in directory.parents):
            raise FileExistsError(f"{directory}: a parent of it is a file, not a folder")
        return directory
    if not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is a file, not a parameter folder")
    if not overwrite:
        raise FileExistsError(f"{directory} already exists (overwrite=True, or --overwrite on "
                              f"the command line, replaces it)")
    entries = {entry.name for entry in directory.iterdir()}
    cwd = Path.cwd().absolute()
    if not entries <= {CONFIG_FILE, PARAMS_SUBDIR} or directory in (cwd, *cwd.parents):
        raise FileExistsError(f"{directory} is not a haaqi_jax parameter folder (it holds "
                              f"{', '.join(sorted(entries)[:5]) or 'nothing'}"
                              f"{', ...' if len(entries) > 5 else ''}); overwrite replaces only "
                              f"those (config.json and params/): name a new folder")
    return directory


def save_params(directory: str | os.PathLike, params: Any, config: dict[str, Any], *,
                overwrite: bool = False) -> Path:
    """Saves a parameter pytree and its JSON config atomically.

    Args:
      directory: target directory; must not exist unless `overwrite`.
      params: pytree of arrays (jax or numpy).
      config: JSON-serialisable dict (e.g. the module config plus a "kind" tag).
      overwrite: replace an existing directory.

    Returns:
      The absolute path written.
    """
    if jax.process_index() != 0:
        raise RuntimeError(f"save_params: process {jax.process_index()} of "
                           f"{jax.process_count()} cannot write {directory}: orbax writes "
                           f"host arrays from process 0 only; save from process 0")
    directory = check_params_target(directory, overwrite=overwrite)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)    # mkdtemp's 0700 would hide the folder from other users
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        host_params = jax.tree_util.tree_map(np.asarray, params)
        ckptr = _checkpointer()
        ckptr.save(tmp / PARAMS_SUBDIR, host_params)
        ckptr.wait_until_finished()
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_config(directory: str | os.PathLike) -> dict[str, Any]:
    """Reads config.json of a parameter directory, with a clear error if it is not one."""
    directory = Path(directory)
    if directory.is_file() and directory.suffix.lower() in (".pt", ".pth", ".ckpt", ".bin"):
        raise FileNotFoundError(f"{directory} is a PyTorch checkpoint; convert it first: "
                                f"python convert_weights.py [--haaqinet] {directory} OUT_DIR, "
                                f"then use OUT_DIR")
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} does not exist or is not a folder")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} is not a haaqi_jax parameter directory: {CONFIG_FILE} is missing")
    meta = read_json(path, "a parameter folder's config")
    if not isinstance(meta, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(meta).__name__}")
    return meta


def load_params(directory: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """Loads (params, config) written by `save_params`; arrays come back as numpy."""
    directory = Path(directory).absolute()
    config = load_config(directory)
    if not (directory / PARAMS_SUBDIR).is_dir():
        raise FileNotFoundError(f"{directory}: the {PARAMS_SUBDIR}/ folder is missing")
    params = _checkpointer().restore(directory / PARAMS_SUBDIR)
    params = jax.tree_util.tree_map(np.asarray, params)
    return params, config


class DamagedCheckpointError(ValueError):
    """A kept training checkpoint whose files cannot be restored (the message names it)."""


class TrainCheckpointManager:
    """Resumable training checkpoints: an orbax CheckpointManager keeping the latest and the best.

    Each checkpoint step holds
      state/   the train state pytree (params, optimizer state, step, RNG) as orbax arrays
      meta/    JSON: loop position (epoch, step in epoch), data-iterator state, early-stopping
               bookkeeping -- whatever the loop needs to continue exactly
    and optionally metrics (e.g. {"valid_loss": 0.01}). After each save only the new step and
    the best one stay on disk: the step the caller names (`keep`, the loop passes its
    early-stopping best, which `train.min_delta` may make differ from the lowest loss), else
    the step with the best `best_metric` so far. Metrics are remembered in `metrics.json` of
    the directory, so a resumed process knows them too (orbax's own preservation policy
    forgot them on a restart and deleted the best step). Saves are synchronous: when `save`
    returns, the step is complete on disk (orbax writes into a temporary folder and renames
    it), so a kill -9 leaves either the previous or the new checkpoint, never a broken one.
    """

    METRICS_FILE = "metrics.json"

    def __init__(self, directory: str | os.PathLike, *, best_metric: str = "valid_loss",
                 best_mode: str = "min"):
        import orbax.checkpoint as ocp

        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        self.directory = Path(directory).absolute()
        self.best_metric = best_metric
        self._sign = 1.0 if best_mode == "min" else -1.0
        # Every step is kept by orbax; `save` deletes what is neither new nor best.
        options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
        self._ocp = ocp
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def _metrics(self) -> dict[int, dict[str, float]]:
        path = self.directory / self.METRICS_FILE
        if not path.is_file():
            return {}
        try:
            return {int(k): v for k, v in json.loads(path.read_text()).items()}
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: not a checkpoint metrics file ({err})") from None

    def _remember(self, step: int, metrics: dict[str, float]) -> None:
        if jax.process_index() != 0:          # one writer on a multi-host run's shared folder
            return
        known = {**self._metrics(), int(step): {k: float(v) for k, v in metrics.items()}}
        write_atomic(self.directory / self.METRICS_FILE,
                     json.dumps({str(k): v for k, v in sorted(known.items())}, indent=1))

    def best_step(self) -> int | None:
        """The saved step with the best `best_metric`, or None when no saved step has one."""
        on_disk = set(self._manager.all_steps())
        scored = [(self._sign * m[self.best_metric], step) for step, m in self._metrics().items()
                  if step in on_disk and self.best_metric in m]
        return min(scored)[1] if scored else None

    def latest_step(self) -> int | None:
        """The newest saved step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any],
             metrics: dict[str, float] | None = None, *,
             keep: Iterable[int | None] | None = None) -> None:
        """Writes `state` (pytree of arrays) and `meta` (JSON-able) as checkpoint `step`, then
        deletes every other step except `keep` (steps, e.g. the loop's best) or, when `keep`
        is None, the step with the best metric."""
        # Metrics first: a kill -9 mid-save leaves an entry for a step that is not on disk,
        # which best_step ignores.
        if metrics is not None:
            self._remember(step, metrics)
        args = self._ocp.args.Composite(state=self._ocp.args.StandardSave(state),
                                        meta=self._ocp.args.JsonSave(meta))
        self._manager.save(int(step), args=args, force=True)
        self._manager.wait_until_finished()
        kept = {int(step)} | ({self.best_step()} if keep is None
                              else {int(k) for k in keep if k is not None})
        for old in self._manager.all_steps():
            if old not in kept:
                self._manager.delete(old)

    def restore(self, step: int, template: Any) -> tuple[Any, dict[str, Any]]:
        """(state, meta) of checkpoint `step`; `template` (a state of the same structure, e.g.
        a fresh one) gives the tree structure, dtypes and shardings to restore into."""
        if step not in self._manager.all_steps():
            raise FileNotFoundError(f"{self.directory}: no checkpoint for step {step} "
                                    f"(have {self.all_steps()})")
        abstract = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            template)
        args = self._ocp.args.Composite(state=self._ocp.args.StandardRestore(abstract),
                                        meta=self._ocp.args.JsonRestore())
        try:
            restored = self._manager.restore(int(step), args=args)
        except Exception as err:   # orbax / tensorstore raise many types for damaged files
            from haaqi_jax.host_memory import is_out_of_memory
            if is_out_of_memory(err) or isinstance(err, (PermissionError, InterruptedError)):
                raise                                # the machine's trouble, not the files
            first = (str(err).strip().splitlines() or [""])[0][:300]
            raise DamagedCheckpointError(
                f"{self.directory / str(step)}: the checkpoint of step {step} cannot be "
                f"restored ({type(err).__name__}: {first})") from err
        return restored.state, restored.meta

    def restore_latest(self, template: Any, warn: Callable[[str], None] = print
                       ) -> tuple[int, Any, dict[str, Any]] | None:
        """(step, state, meta) of the newest checkpoint that restores, or None when there is
        none.

        On one process, a damaged newer checkpoint (files cut short or deleted by hand) is
        reported through `warn` and the one before it tried (the loop keeps the latest and the
        best step, so that may be several epochs back); once one restores, each damaged newer
        one is moved aside to `damaged-<step>` (kept for inspection; training on saves that
        step anew). A multi-host run does not fall back: its processes could restore different
        steps.

        Raises:
          DamagedCheckpointError when the newest (multi-host) or every kept checkpoint cannot
          be restored; out-of-memory and permission errors as they are.
        """
        problems, damaged = [], []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                state, meta = self.restore(step, template)
            except DamagedCheckpointError as err:
                if jax.process_count() > 1:
                    raise
                problems.append(str(err))
                damaged.append(step)
                warn(f"{err}; trying the one before it")
                continue
            for bad in damaged:
                aside = self.directory / f"damaged-{bad}"
                for k in range(1, 100):
                    if not aside.exists():
                        break
                    aside = self.directory / f"damaged-{bad}.{k}"
                os.replace(self.directory / str(bad), aside)
                warn(f"moved the damaged checkpoint of step {bad} aside to {aside}")
            if damaged:
                self._manager.reload()
            return step, state, meta
        if problems:
            raise DamagedCheckpointError(
                f"{self.directory}: no kept checkpoint can be restored ({'; '.join(problems)}): "
                f"damaged files, or a train state of another structure than this code and "
                f"config make (changed since?). Pass another --workdir, or delete "
                f"{self.directory} to train from the start")
        return None

    def close(self) -> None:
        self._manager.close()
