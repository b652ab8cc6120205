"""Shared by the scale tests: the worker module (also run by torchrun) and its saved tiny Llama."""
import importlib.util
from pathlib import Path

import pytest

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("dist_worker", HERE / "dist_worker.py")
W = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(W)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    W.save_model(str(d))
    return d
