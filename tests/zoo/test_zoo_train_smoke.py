"""The training recipes run end to end in smoke mode (tiny models, a few steps)."""
import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch

from interp.errors import InterpError
from interp.zoo import catalog
from recipes import zoo_train


@pytest.mark.parametrize("name", zoo_train.NAMES)
def test_smoke_training_writes_loadable_model(name, tmp_path, capsys):
    out = tmp_path / name
    metrics = zoo_train.main([name, "--smoke", "--out", str(out), "--quiet", "--seed", "3"])
    assert (out / "metrics.json").exists()
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["smoke"] is True and saved["train_steps"] > 0
    assert metrics["name"] == name
    assert "train_wall_s" in capsys.readouterr().out  # final metrics are printed
    assert not (out / "train_state.pt").exists() and not (out / zoo_train.STATE_FILE).exists()
    assert (out / catalog.FILES_MANIFEST).exists()  # the loader checks the files against it
    model = catalog.load_trained(name, path=out)
    assert model is not None
    assert list(out.rglob("*.safetensors"))


def _weights(folder):
    from safetensors.torch import load_file

    return {f"{p.relative_to(folder)}:{k}": v for p in sorted(folder.rglob("*.safetensors"))
            if p.name != zoo_train.STATE_FILE for k, v in load_file(str(p)).items()}


@pytest.mark.parametrize("name,steps,every", [("physics", 6, 4), ("shapes-diffusion", 3, 2)])
def test_resume_from_the_safetensors_state_is_bit_identical(name, steps, every, tmp_path, capsys):
    """A run resumed from its saved state (model, optimizer, EMA and RNG states as safetensors + JSON) ends
    with exactly the weights of the uninterrupted run; it starts from the state (a perturbed state changes
    the result), not from scratch."""
    out = tmp_path / "run"
    common = [name, "--smoke", "--quiet", "--no-eval", "--steps", str(steps), "--seed", "1"]
    zoo_train.main(common + ["--out", str(out), "--save-every", str(every), "--keep-state"])
    full = _weights(out)
    state = out / zoo_train.STATE_FILE
    assert state.exists() and not (out / "train_state.pt").exists()
    from interp.io import load_state

    assert load_state(state)["step"] == every
    for p in out.iterdir():  # keep only the state: the resumed run must rebuild everything from it
        if p != state:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    saved = load_state(state)
    capsys.readouterr()
    zoo_train.main(common + ["--out", str(out), "--resume", "--keep-state"])
    assert f"resumed {name} at step {every}" in capsys.readouterr().out
    resumed = _weights(out)
    assert full.keys() == resumed.keys() and len(full) > 3
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    from interp.io import save_state

    key = "model" if name == "physics" else "modules"
    first = saved[key] if name == "physics" else saved[key]["unet"]
    name0 = next(iter(first))
    first[name0] = first[name0] + 0.5
    save_state(state, saved)
    zoo_train.main(common + ["--out", str(out), "--resume"])
    assert not all(torch.equal(full[k], v) for k, v in _weights(out).items())


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling this creates the marker file


def test_resume_never_unpickles_a_train_state_pt(tmp_path):
    out, marker = tmp_path / "p", tmp_path / "PWNED"
    out.mkdir()
    torch.save({"step": _Payload(str(marker))}, out / "train_state.pt")
    with pytest.raises(InterpError, match="pickle-based"):
        zoo_train.main(["physics", "--smoke", "--out", str(out), "--quiet", "--resume", "--steps", "2"])
    assert not marker.exists()


def test_no_loader_in_the_package_unpickles():
    """grep the package for unpickling loaders: torch.load, pickle, np.load without allow_pickle=False."""
    import re
    from pathlib import Path

    root = Path(zoo_train.__file__).resolve().parents[1]
    hits = []
    for pkg in ("interp", "interventions", "probes", "recipes", "benchmarks"):
        for f in (root / pkg).rglob("*.py"):
            text = f.read_text()
            for m in re.finditer(r"torch\.load\(|import pickle|pickle\.loads?\(|np\.load\([^)]*\)", text):
                if m.group(0).startswith("np.load") and "allow_pickle=False" in m.group(0):
                    continue
                hits.append(f"{f.relative_to(root)}: {m.group(0)[:60]}")
    assert hits == []


def test_default_out_is_a_new_folder_and_shipped_weights_need_a_flag(tmp_path, monkeypatch):
    from interp.zoo.catalog import WEIGHTS_DIR

    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser()
    zoo_train.register(parser.add_subparsers())
    args = parser.parse_args(["zoo-train", "physics", "--smoke"])
    zoo_train._check_out(args)
    assert Path(args.out) == Path("interp-out") / "zoo-train" / "physics"
    shipped = WEIGHTS_DIR / "physics"
    before = {p.name: p.read_bytes() for p in shipped.iterdir() if p.is_file()}
    for out in (shipped, shipped / "sub", WEIGHTS_DIR):
        with pytest.raises(InterpError, match="--overwrite-shipped"):
            zoo_train.main(["physics", "--smoke", "--quiet", "--out", str(out)])
    assert {p.name: p.read_bytes() for p in shipped.iterdir() if p.is_file()} == before
    with pytest.raises(InterpError, match="--lr must be a finite"):
        zoo_train.main(["physics", "--smoke", "--quiet", "--lr", "nan"])


def test_physics_rollout_training_with_fresh_blobs(tmp_path):
    """--rollout-steps with --blob-fraction: half of each batch starts from one fresh blob; recorded."""
    from interp.zoo import physics as P

    traj, kappa, vel = P.sample_blob_rollouts(5, 4, 3)
    assert traj.shape == (4, 4, P.N_GRID) and kappa.shape == vel.shape == (4,)
    peaks = traj[:, 0].amax(-1)
    assert ((peaks > 0.45) & (peaks < 1.25)).all()  # one blob of amplitude 0.5-1.2 at t = 0
    m = zoo_train.main(["physics", "--smoke", "--out", str(tmp_path / "b"), "--quiet", "--steps", "2",
                        "--rollout-steps", "3", "--blob-fraction", "0.5"])
    assert m["train_rollout_steps"] == 3 and m["train_blob_fraction"] == 0.5


def test_register_mounts_zoo_train_subcommand():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    zoo_train.register(sub)
    args = parser.parse_args(["zoo-train", "physics", "--smoke", "--out", "x"])
    assert args.func is zoo_train.cli and args.name == "physics" and args.smoke
