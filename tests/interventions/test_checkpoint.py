"""Checkpoint writing: save_pretrained layout + manifest, verified reload, atomic rename, the source never
touched (byte-identical after simulated failures), in-place with a backup, and a plain diffusers load in a
fresh process (no interp import) that reproduces the edited images."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from interventions import checkpoint as ck
from interventions.checkpoint import CheckpointWriteError, folder_hash, read_manifest, verify_files, write_checkpoint
from interventions.erasure import Concept, erase

torch.set_num_threads(1)
COLOURS = ["red", "yellow", "green", "cyan", "blue", "magenta"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from interp.zoo import shapes
    from interp.zoo.architectures import build_diffusion_pipeline

    pipe = build_diffusion_pipeline(0, width=8)
    pipe.set_progress_bar_config(disable=True)
    root = tmp_path_factory.mktemp("ck")
    pipe.save_pretrained(root / "source")
    caps = [a.caption() for a in shapes.all_attributes()][::4]
    concept = Concept.from_prompts("red", caps, [c for c in COLOURS if c != "red"])
    edit = erase(pipe, concept, "uce")
    return pipe, edit, root / "source"


@pytest.fixture
def edited(base):
    pipe, edit, _ = base
    return edit.applied(pipe)


@pytest.fixture
def source(base, tmp_path):
    """A fresh copy of the source checkpoint per test (tests write next to it)."""
    import shutil

    dst = tmp_path / "source"
    shutil.copytree(base[2], dst)
    return dst


def test_round_trip_layout_and_manifest(base, edited, source, tmp_path):
    _, edit, _ = base
    out = write_checkpoint(edited, tmp_path / "erased", edit, source=source)
    assert (out / "model_index.json").exists() and (out / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert (out / "text_encoder" / "model.safetensors").exists()
    man = read_manifest(out)
    assert man["concept"] == "red" and man["method"] == "uce" and man["lambda"] == 0.5
    assert man["layers"] == edit.layers and man["source_hash"] == folder_hash(source)
    assert verify_files(out) == []
    reloaded = ck.reload(edited, out)
    for name, value in edit.tensors.items():
        comp, rest = name.split(".", 1)
        assert torch.equal(getattr(reloaded, comp).get_parameter(rest), value.to(torch.float32))
    assert not list(tmp_path.glob(".*tmp*"))
    # a corrupted file is caught by verify_files
    f = out / "unet" / "config.json"
    f.write_text(f.read_text() + " ")
    assert verify_files(out) == ["unet/config.json"]


def test_refuses_to_overwrite(base, edited, source, tmp_path):
    _, edit, _ = base
    before = snapshot(source)
    with pytest.raises(CheckpointWriteError, match="refusing to write over the source"):
        write_checkpoint(edited, source, edit, source=source)
    with pytest.raises(CheckpointWriteError, match="inside the source"):
        write_checkpoint(edited, source / "sub", edit, source=source)
    (tmp_path / "taken").mkdir()
    with pytest.raises(CheckpointWriteError, match="already exists"):
        write_checkpoint(edited, tmp_path / "taken", edit, source=source)
    assert snapshot(source) == before


def _failing_save(monkeypatch, component, after_bytes: int = 100):
    """The component's save_pretrained writes a truncated weights file, then the disk 'fills up'."""
    orig = component.save_pretrained

    def broken(folder, *a, **kw):
        orig(folder, *a, **kw)
        w = next(Path(folder).glob("*.safetensors"))
        w.write_bytes(w.read_bytes()[:after_bytes])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(component, "save_pretrained", broken)


@pytest.mark.parametrize("in_place", [False, True])
def test_failure_mid_write_leaves_source_byte_identical(base, edited, source, tmp_path, monkeypatch, in_place):
    _, edit, _ = base
    before = snapshot(source)
    _failing_save(monkeypatch, edited.unet)
    dest = tmp_path / "erased"
    with pytest.raises(CheckpointWriteError) as info:
        write_checkpoint(edited, dest, edit, source=source, in_place=in_place)
    msg = str(info.value)
    assert "No space left" in msg and "intact" in msg and "unchanged" in msg
    assert snapshot(source) == before
    assert not dest.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]  # no temporary folder, no backup left


def test_in_place_failure_at_the_final_rename_restores_the_source(base, edited, source, tmp_path, monkeypatch):
    _, edit, _ = base
    before = snapshot(source)
    real = os.replace

    def flaky(a, b):
        if ".tmp-" in str(a):  # the staged checkpoint cannot be moved in
            raise OSError(5, "Input/output error")
        return real(a, b)

    monkeypatch.setattr(ck.os, "replace", flaky)
    with pytest.raises(CheckpointWriteError, match="intact"):
        write_checkpoint(edited, source, edit, source=source, in_place=True)
    assert snapshot(source) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]


def test_verification_failure_writes_nothing(base, edited, source, tmp_path):
    _, edit, _ = base
    with pytest.raises(CheckpointWriteError, match="verify function rejected"):
        write_checkpoint(edited, tmp_path / "erased", edit, source=source, verify=lambda reloaded: False)
    assert not (tmp_path / "erased").exists()


def test_in_place_keeps_a_backup(base, edited, source, tmp_path):
    _, edit, _ = base
    before = snapshot(source)
    write_checkpoint(edited, source, edit, source=source, in_place=True)
    backups = list(tmp_path.glob("source.bak-*"))
    assert len(backups) == 1 and snapshot(backups[0]) == before
    man = read_manifest(source)
    assert man["method"] == "uce" and man["source_hash"] == folder_hash(backups[0])


def test_transformers_model_round_trip(base, tmp_path):
    pipe, _, _ = base
    from interp.zoo import shapes
    from interventions.erasure import Concept, erase

    caps = [a.caption() for a in shapes.all_attributes()][::6]
    edit = erase(pipe, Concept.from_prompts("red", caps, ["blue"]), "quickfix")
    te = edit.applied(pipe).text_encoder
    out = write_checkpoint(te, tmp_path / "te", None, extra={"concept": "red", "method": "quickfix"})
    from transformers import CLIPTextModel

    again = CLIPTextModel.from_pretrained(out)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(again(ids).last_hidden_state, te(ids).last_hidden_state)
    assert read_manifest(out)["source_hash"] is None


PLAIN_LOAD = r"""
import sys, numpy as np, torch
torch.set_num_threads(1)
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], safety_checker=None, requires_safety_checker=False)
pipe.set_progress_bar_config(disable=True)
# guidance 1.0: the zoo pipeline's default (ShapesDiffusionPipeline.plain_call_kwargs); the stock default is 7.5
imgs = pipe(["a small red circle on the left, solid", "a large blue square in the center, striped"],
            num_inference_steps=3, generator=torch.Generator().manual_seed(7), output_type="np",
            guidance_scale=1.0).images
assert not any(m == "interp" or m.startswith(("interp.", "interventions", "recipes")) for m in sys.modules)
np.save(sys.argv[2], imgs)
"""


def test_plain_diffusers_load_reproduces_the_edit(base, edited, source, tmp_path):
    pipe, edit, _ = base
    out = write_checkpoint(edited, tmp_path / "erased", edit, source=source)
    npy = tmp_path / "imgs.npy"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    r = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(out), str(npy)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    plain = np.load(npy)
    kw = dict(num_inference_steps=3, output_type="np")
    prompts = ["a small red circle on the left, solid", "a large blue square in the center, striped"]
    ours = edited(prompts, generator=torch.Generator().manual_seed(7), **kw).images
    orig = pipe(prompts, generator=torch.Generator().manual_seed(7), **kw).images
    assert np.abs(plain - ours).max() < 1e-4  # same weights; float summation order only
    assert np.abs(plain[0] - orig[0]).max() > 1e-3  # the edit changed the red prompt's image
