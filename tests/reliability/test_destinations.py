"""Destinations that could lose data are refused before anything is written (the source byte-identical):
one that contains the source, is it, lies inside it (also through a symlink), and --overwrite of a folder
interp did not write. --overwrite of interp's own output works; --in-place without --out writes (backup kept);
stale temporary folders of dead writers are removed, a live writer's are kept, and an interrupted overwrite
gets its previous output back."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reliab_helpers import snapshot  # noqa: E402

from interp import io  # noqa: E402
from interventions.checkpoint import (  # noqa: E402
    MANIFEST,
    CheckpointWriteError,
    check_destination,
    read_manifest,
    verify_files,
    write_checkpoint,
)
from recipes.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def pipe():
    from interp.zoo.architectures import build_diffusion_pipeline

    return build_diffusion_pipeline(0, width=8)


def test_every_destination_that_holds_the_source_is_refused(source, tmp_path):
    parent = source.parent
    (tmp_path / "link").symlink_to(parent, target_is_directory=True)
    (tmp_path / "srclink").symlink_to(source, target_is_directory=True)
    cases = {parent: "contains the source", tmp_path: "contains the source", tmp_path / "link": "contains the source",
             source: "over the source", tmp_path / "srclink": "over the source", source / "unet": "inside the source",
             tmp_path / "srclink" / "new": "inside the source"}
    before = snapshot(tmp_path)
    for dest, why in cases.items():
        for overwrite in (False, True):
            with pytest.raises(CheckpointWriteError, match=why):
                check_destination(dest, source, overwrite=overwrite)
    assert snapshot(tmp_path) == before


def test_cli_overwrite_of_the_parent_is_refused_and_the_source_kept(source, capsys):
    """The reported data loss: `interp erase SRC --out PARENT --overwrite` deleted SRC with PARENT."""
    before = snapshot(source.parent)
    rc = main(["erase", str(source), "--concept", "red", "--method", "uce", "--out", str(source.parent),
               "--overwrite", "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "contains the source" in err and len(err.strip().splitlines()) == 1  # refused before loading
    assert snapshot(source.parent) == before


def test_overwrite_replaces_only_interps_own_output(pipe, source, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointWriteError, match="not a checkpoint interp wrote"):
        write_checkpoint(pipe, plain, source=source, overwrite=True)
    assert (plain / "notes.txt").read_text() == "mine"
    out = write_checkpoint(pipe, tmp_path / "out", source=source)
    first = read_manifest(out)["created"]
    with pytest.raises(CheckpointWriteError, match="already exists"):
        write_checkpoint(pipe, out, source=source)
    write_checkpoint(pipe, out, source=source, overwrite=True, extra={"again": True})
    assert read_manifest(out)["again"] is True and verify_files(out) == [] and first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no backup or temp left


def test_in_place_without_out_writes_and_keeps_a_backup(source, capsys):
    before = snapshot(source)
    rc = main(["erase", str(source), "--concept", "red", "--method", "uce", "--in-place", "--quiet"])
    assert rc == 0
    assert "wrote" in capsys.readouterr().out
    assert (source / MANIFEST).exists() and verify_files(source) == []
    backups = [p for p in source.parent.iterdir() if p.name.startswith("src.bak-")]
    assert len(backups) == 1 and snapshot(backups[0]) == before
    # --in-place with --out is a contradiction: refused
    assert main(["erase", str(source), "--concept", "red", "--in-place", "--out", "x", "--quiet"]) == 2


def test_files_honour_the_umask(pipe, source, tmp_path):
    out = write_checkpoint(pipe, tmp_path / "out", source=source)
    want = 0o666 & ~io.umask()
    for f in out.rglob("*"):
        if f.is_file():
            assert f.stat().st_mode & 0o777 == want, f
    res = io.atomic_write_json(tmp_path / "r.json", {"a": float("nan")})
    assert res.stat().st_mode & 0o777 == want and res.read_text() == '{\n "a": "nan"\n}'


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporaries_of_dead_writers_are_removed_live_ones_kept(pipe, source, tmp_path):
    dest = tmp_path / "out"
    host = io._host()
    dead = tmp_path / f".out.tmp-{host}-{_dead_pid()}-deadbeef"
    live = tmp_path / f".out.tmp-{host}-{os.getpid()}-0badcafe"
    other_host = tmp_path / f".out.tmp-elsewhere-{_dead_pid()}-00000000"
    for d in (dead, live, other_host):
        (d / "unet").mkdir(parents=True)
        (d / "unet" / "w.bin").write_bytes(b"x" * 1000)
    old = tmp_path / ".out.tmp-elsewhere-1-11111111"
    old.mkdir()
    os.utime(old, (0, 0))  # older than a week: removed whatever host wrote it
    (tmp_path / ".out.lock").write_text("pid 1")  # a lock file left by a killed writer (nobody holds it)
    write_checkpoint(pipe, dest, source=source)
    assert not dead.exists() and not old.exists() and not (tmp_path / ".out.lock").exists()
    assert live.exists() and other_host.exists()  # a running writer / another host's writer: kept
    with io.writer_lock(dest):  # a held lock is never removed, and a second writer is refused at once
        assert io.clean_stale(dest) == [] and (tmp_path / ".out.lock").exists()
        with pytest.raises(CheckpointWriteError, match=f"being written by pid {os.getpid()}"):
            write_checkpoint(pipe, tmp_path / "out", source=source, overwrite=True)
    assert not (tmp_path / ".out.lock").exists()


def test_a_writer_killed_between_its_two_renames_gets_the_old_output_back(pipe, source, tmp_path):
    dest = write_checkpoint(pipe, tmp_path / "out", source=source)
    before = snapshot(dest)
    backup = tmp_path / f".out.old-{io._host()}-{_dead_pid()}-12345678"
    os.replace(dest, backup)  # what a SIGKILL between `dest -> backup` and `tmp -> dest` leaves
    io.clean_stale(dest)
    assert snapshot(dest) == before and not backup.exists()


def test_erase_refuses_non_finite_and_out_of_range_settings(source, capsys):
    for args, what in ((["--lam", "nan"], "--lam must be a finite"), (["--lam", "inf"], "--lam must be a finite"),
                       (["--lam", "-1"], "--lam must be a finite"), (["--steps", "0"], "--steps must be"),
                       (["--hirm-steps", "-3"], "--hirm-steps must be")):
        rc = main(["erase", str(source), "--concept", "red", "--method", "uce", "--quiet", *args])
        err = capsys.readouterr().err
        assert rc == 2 and what in err and len(err.strip().splitlines()) == 1, (args, err)


def test_missing_source_folder_is_named_not_a_network_failure(tmp_path, capsys):
    rc = main(["erase", str(tmp_path / "nowhere"), "--concept", "red", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "no model folder at" in err and "network" not in err.lower() and "hub" not in err.lower()


def test_ridge_lam_must_be_finite():
    from interventions.erasure import ErasureInputError, ridge_solve

    W = torch.randn(3, 4)
    k, v = torch.randn(5, 4), torch.randn(5, 3)
    for lam in (float("nan"), float("inf"), "0.1x"):
        with pytest.raises(ErasureInputError, match="lam"):
            ridge_solve(W, k, v, lam=lam)
    k[0, 0] = float("nan")
    with pytest.raises(ErasureInputError, match="keys hold NaN"):
        ridge_solve(W, k, v, lam=0.1)
