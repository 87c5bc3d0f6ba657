"""The one place that writes and reads checkpoints (orbax), for conversion, training and prediction.

A *parameter directory* holds:
  params/        an orbax StandardCheckpointer tree (numpy arrays, float32 unless stated)
  config.json    whatever JSON-able metadata describes how to rebuild the module

`save_params` writes into a temporary sibling directory and renames it into place only when
everything succeeded, so a failed conversion leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

PARAMS_SUBDIR = "params"
CONFIG_FILE = "config.json"


def _checkpointer():
    import orbax.checkpoint as ocp  # imported lazily: orbax is slow to import
    return ocp.StandardCheckpointer()


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
    directory = Path(directory).absolute()
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} already exists (pass overwrite=True to replace it)")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
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
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} is not a haaqi_jax parameter directory: {CONFIG_FILE} is missing")
    return json.loads(path.read_text())


def load_params(directory: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """Loads (params, config) written by `save_params`; arrays come back as numpy."""
    directory = Path(directory).absolute()
    config = load_config(directory)
    if not (directory / PARAMS_SUBDIR).is_dir():
        raise FileNotFoundError(f"{directory}: the {PARAMS_SUBDIR}/ folder is missing")
    params = _checkpointer().restore(directory / PARAMS_SUBDIR)
    params = jax.tree_util.tree_map(np.asarray, params)
    return params, config
