"""Shared test set-up: independent references (torch, torchaudio's kaldi.py, speechbrain,
pyclarity) are imported only here and in the tests, never by haaqi_jax itself."""

from __future__ import annotations

import importlib.util
import os
import sys
import types

import numpy as np
import pytest

# Agreement tests compare float32 results at 1e-4: make every JAX matmul full precision.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")


def _register_bare_torchaudio() -> None:
    """torchaudio 2.11 from PyPI cannot load its C++ extension next to torch 2.13, but
    `torchaudio/compliance/kaldi.py` is pure torch. A bare package object (with the real
    __path__) lets `torchaudio.compliance.kaldi` and speechbrain import without running
    torchaudio/__init__.py."""
    if "torchaudio" in sys.modules:
        return
    spec = importlib.util.find_spec("torchaudio")
    if spec is None or spec.origin is None:
        return
    pkg = types.ModuleType("torchaudio")
    pkg.__path__ = [os.path.dirname(spec.origin)]
    pkg.__version__ = "2.11.0"
    sys.modules["torchaudio"] = pkg


_register_bare_torchaudio()


@pytest.fixture(scope="session")
def kaldi():
    """torchaudio.compliance.kaldi, the fbank reference."""
    import torchaudio.compliance.kaldi as kaldi_module
    return kaldi_module


def _drop_speechbrain_lazy_modules() -> None:
    """speechbrain 1.1.2 puts LazyModule placeholders for optional integrations (k2, spacy,
    flair, ...) into sys.modules. Anything that walks sys.modules and touches attributes (the
    warnings machinery when a test triggers a warning, for one) then tries to import them and
    fails. They are placeholders only; removing them changes nothing speechbrain's BEATs uses."""
    if "speechbrain" not in sys.modules:
        return
    from speechbrain.utils.importutils import LazyModule
    for name, module in list(sys.modules.items()):
        if isinstance(module, LazyModule) and module.lazy_module is None:
            del sys.modules[name]


def pytest_runtest_setup(item):
    _drop_speechbrain_lazy_modules()


@pytest.fixture
def query_blocks(monkeypatch):
    """Every attention takes the long-input path: queries in blocks of 8 (the last one
    padded), BEATs' position bias as a ToeplitzBias. Build jit functions inside the test: a
    function traced before the patch keeps the short path."""
    from haaqi_jax import attention
    monkeypatch.setattr(attention, "LONG_ITEM_BYTES", 0)
    monkeypatch.setattr(attention, "CPU_STEP_BYTES", 1)
    monkeypatch.setattr(attention, "ACCELERATOR_BLOCK_BYTES", 1)
    assert attention.default_query_block(2, 40, 40) == 8


def max_abs_error(pred, true, weight):
    """A metric of a user's: the largest |prediction - label| of the kept clips ((n,) float64
    each, as register_metric passes them)."""
    return float(np.max(np.abs(pred - true)))


@pytest.fixture
def max_error():
    """`max_abs_error` registered as "test_max_error" (lower is better) for the test; its name."""
    from haaqi_jax.train import metrics as metrics_lib
    metrics_lib.register_metric("test_max_error", max_abs_error, higher_is_better=False)
    yield "test_max_error"
    metrics_lib.unregister_metric("test_max_error")
