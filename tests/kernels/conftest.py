"""Kernel tests run the Triton kernels on CPU through Triton's interpreter.

TRITON_INTERPRET must be set before triton (and interp.kernels.triton) is imported, so it is set
here, at conftest import time, before any test module of this package is collected. On a GPU
machine, ``INTERP_TEST_DEVICE=cuda pytest tests/kernels/test_kernels_triton.py`` runs the same
property tests on the compiled kernels instead (TRITON_INTERPRET is then left unset).
"""

import os
import sys

if os.environ.get("INTERP_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest runs with --import-mode=importlib: make kernel_helpers.py (beside this file) importable
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402


@pytest.fixture
def use_backend(monkeypatch):
    """use_backend("triton" | "torch" | "auto") forces dispatch for the rest of the test."""

    def _set(name):
        monkeypatch.setenv("INTERP_KERNELS", name)

    return _set
