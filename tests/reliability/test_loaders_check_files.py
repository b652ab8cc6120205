"""Loaders check the files before trusting them: overwritten bytes (the same size, so only the hash can tell) do
not load as NaN parameters, a truncated safetensors file is named in the error, a missing folder is named as
missing (not as a network failure), and a NaN weight in a folder without a manifest is caught after loading.
Every kind is checked on the zoo loader, the checkpoint loader and steering vectors."""
from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest
import torch

from interp import io
from interp.zoo import catalog
from interventions.checkpoint import NotACheckpointError, load_checkpoint, write_checkpoint


def _overwrite(f: Path, value: float = float("nan")) -> None:
    """Overwrite 64 float32 values in the middle of the data section (size unchanged)."""
    n = struct.unpack("<Q", f.read_bytes()[:8])[0]
    data = bytearray(f.read_bytes())
    mid = 8 + n + (len(data) - 8 - n) // 2
    mid -= mid % 4
    data[mid:mid + 256] = struct.pack("<f", value) * 64
    f.write_bytes(bytes(data))


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size - 1000])


@pytest.fixture
def zoo_copy(tmp_path):
    dst = tmp_path / "physics"
    shutil.copytree(catalog.weights_path("physics"), dst)
    return dst


def test_zoo_loader_refuses_overwritten_truncated_and_missing_files(zoo_copy, tmp_path):
    catalog.load_trained("physics", path=zoo_copy)  # the intact copy loads
    f = zoo_copy / "model.safetensors"
    good = f.read_bytes()
    _overwrite(f)
    with pytest.raises(io.CorruptFileError, match=r"sha256.*model\.safetensors"):
        catalog.load_trained("physics", path=zoo_copy)
    f.write_bytes(good)
    _truncate(f)
    with pytest.raises(io.CorruptFileError, match=rf"{f}.*truncated"):
        catalog.load_trained("physics", path=zoo_copy)
    with pytest.raises(catalog.ZooFolderError, match="no weights folder") as info:
        catalog.load_trained("physics", path=tmp_path / "gone")
    assert "network" not in str(info.value).lower().replace("nothing was downloaded", "")


def test_zoo_loader_without_a_manifest_still_catches_nan_weights(zoo_copy):
    (zoo_copy / catalog.FILES_MANIFEST).unlink()
    _overwrite(zoo_copy / "model.safetensors")
    with pytest.raises(io.CorruptFileError, match="holds NaN or inf after loading"):
        catalog.load_trained("physics", path=zoo_copy)


def test_shipped_zoo_folders_carry_a_manifest_that_matches():
    for name in ("shapes-diffusion", "shapes-flow", "physics"):
        folder = catalog.weights_path(name)
        files = __import__("json").loads((folder / catalog.FILES_MANIFEST).read_text())["files"]
        assert any(k.endswith(".safetensors") for k in files)
        io.check_files(folder, files)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    from interp.zoo.architectures import build_diffusion_pipeline

    root = tmp_path_factory.mktemp("ckload")
    return write_checkpoint(build_diffusion_pipeline(0, width=8), root / "ck")


def test_checkpoint_loader_refuses_damaged_files(written, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(written, ck)
    load_checkpoint(ck)
    f = ck / "unet" / "diffusion_pytorch_model.safetensors"
    good = f.read_bytes()
    _overwrite(f, 3.0)  # finite garbage: only the manifest's hash can tell
    with pytest.raises(io.CorruptFileError, match=r"unet/diffusion_pytorch_model\.safetensors"):
        load_checkpoint(ck)
    f.write_bytes(good)
    _truncate(f)
    with pytest.raises(io.CorruptFileError, match="truncated"):
        load_checkpoint(ck)
    with pytest.raises(NotACheckpointError, match="no model folder"):
        load_checkpoint(tmp_path / "nowhere")


def test_check_safetensors_names_every_kind_of_damage(tmp_path):
    f = tmp_path / "t.safetensors"
    io.atomic_write_safetensors(f, {"a": torch.ones(100)})
    io.check_safetensors(f)
    data = f.read_bytes()
    for broken, what in ((data[:4], "truncated"), (data[:-1], "truncated"), (data + b"\0", "longer"),
                         (struct.pack("<Q", 10**9) + data[8:], "header claims"),
                         (data[:8] + b"{" * (len(data) - 8), "damaged header")):
        f.write_bytes(broken)
        with pytest.raises(io.CorruptFileError, match=what):
            io.check_safetensors(f)
        assert str(f) in str(pytest.raises(io.CorruptFileError, io.check_safetensors, f).value)
