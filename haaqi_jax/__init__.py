"""haaqi_jax: HAAQI-Net, BEATs, distillBEATs and a vectorised HAAQI in JAX/Flax.

HAAQI-Net: Wisnu et al., "HAAQI-Net: A Non-intrusive Neural Music Audio Quality Assessment
Model for Hearing Aids" (2024). BEATs: Chen et al., "BEATs: Audio Pre-Training with Acoustic
Tokenizers" (2022). HAAQI: Kates & Arehart, "The Hearing-Aid Audio Quality Index (HAAQI)" (2016).

The public names below are imported lazily so that `import haaqi_jax` stays cheap; nothing in
this package imports torch except `haaqi_jax.convert`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Audiogram": "haaqi_jax.audiogram",
    "STANDARD_FREQUENCIES": "haaqi_jax.audiogram",
    "load_beats": "haaqi_jax.beats",
    "BEATs": "haaqi_jax.beats",
    "BEATsConfig": "haaqi_jax.beats",
    "HAAQINet": "haaqi_jax.model",
    "haaqi_v1": "haaqi_jax.haaqi",
    "compute_haaqi": "haaqi_jax.haaqi",
    "haaqi_batch": "haaqi_jax.haaqi",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'haaqi_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
