"""Shared test set-up: independent references (torch, torchaudio's kaldi.py, speechbrain,
pyclarity) are imported only here and in the tests, never by haaqi_jax itself."""

from __future__ import annotations

import importlib.util
import os
import sys
import types

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
