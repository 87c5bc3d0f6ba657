"""HAAQI (Kates & Arehart 2016) in JAX: pyclarity-compatible `haaqi_v1` / `compute_haaqi` and a
batched, jit-compiled `haaqi_batch`.

Modules: preprocess (host-side resampling, alignment, trim, NAL-R), filters (linear recursions),
ear_model (the cochlear model), backend (features and scores), api (the public functions),
placement (float64 work on the host CPU where the backend lacks float64: TPUs), score_cli /
label (the `haaqi-jax score` / `label` subcommands). Names below import lazily.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "haaqi_v1": "haaqi_jax.haaqi.api",
    "compute_haaqi": "haaqi_jax.haaqi.api",
    "haaqi_batch": "haaqi_jax.haaqi.api",
    "prepare_batch": "haaqi_jax.haaqi.api",
    "score_prepared": "haaqi_jax.haaqi.api",
    "HAAQIResult": "haaqi_jax.haaqi.backend",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'haaqi_jax.haaqi' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
