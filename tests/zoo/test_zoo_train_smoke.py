"""The training recipes run end to end in smoke mode (tiny models, a few steps)."""
import argparse
import json

import pytest

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
    assert not (out / "train_state.pt").exists()
    model = catalog.load_trained(name, path=out)
    assert model is not None
    assert list(out.rglob("*.safetensors"))


def test_resume_continues_from_saved_state(tmp_path):
    out = tmp_path / "p"
    zoo_train.main(["physics", "--smoke", "--out", str(out), "--quiet", "--steps", "4", "--save-every", "2",
                    "--keep-state"])
    assert (out / "train_state.pt").exists()
    m = zoo_train.main(["physics", "--smoke", "--out", str(out), "--quiet", "--steps", "6", "--resume"])
    assert m["train_steps"] == 6


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
    assert args.func is zoo_train.run and args.name == "physics" and args.smoke
