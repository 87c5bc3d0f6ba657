"""Host-side entry points and JAX tracing.

`haaqi_v1`, `haaqi_batch`, `prepare_batch`, `HAAQINet.predict` and `HAAQINet.encode` prepare
their inputs with numpy on the host (resampling, alignment, validation, bucketing) and then call
functions that they jit-compile themselves. Called inside `jax.jit`, `vmap` or `grad` they would
meet tracers and fail deep inside numpy; `refuse_traced` says so at the door instead.
"""

from __future__ import annotations

from typing import Any

import jax


def refuse_traced(where: str, *values: Any, traceable: str | None = None) -> None:
    """Raises TypeError when any leaf of `values` is a JAX tracer.

    Args:
      where: the function's name, for the message.
      values: its array arguments (pytrees; lists of arrays are searched too).
      traceable: the function to use under jit / vmap / grad instead, if there is one.
    """
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(values)):
        hint = f"; inside traced code use {traceable}" if traceable else ""
        raise TypeError(f"{where} prepares its input on the host (numpy) and jit-compiles its "
                        f"device part itself: call it outside jax.jit, vmap and grad{hint}")
