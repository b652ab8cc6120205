"""Fixtures of the fault-injection suite: a tiny shapes pipeline saved as a source folder."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory) -> Path:
    """shapes-diffusion's architecture (UNet width 8, random weights) saved with save_pretrained."""
    from interp.zoo.architectures import build_diffusion_pipeline

    folder = tmp_path_factory.mktemp("reliab") / "tiny-sd"
    build_diffusion_pipeline(0, width=8).save_pretrained(folder)
    return folder


@pytest.fixture
def source(tiny_source, tmp_path) -> Path:
    """A fresh copy of the tiny source per test, inside tmp_path/parent (so PARENT contains SRC)."""
    dst = tmp_path / "parent" / "src"
    shutil.copytree(tiny_source, dst)
    return dst
