"""Real processes: `interp erase` killed with SIGKILL at seeded random moments leaves the source byte-identical
and each destination absent or complete and verified (the next writer removes the dead one's temporaries);
two `interp erase` runs on the same new --out: exactly one succeeds, the other fails clearly; a full disk
(a 1 MB tmpfs, or ENOSPC injected where mounting is not allowed) leaves the source intact with a message
that says the disk is full."""
from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reliab_helpers import snapshot  # noqa: E402

from interventions.checkpoint import CheckpointWriteError, load_checkpoint, verify_files, write_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _erase(source: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "recipes", "erase", str(source), "--concept", "red", "--method",
                             "uce", "--out", str(out), "--quiet"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _temps(dest: Path) -> list[Path]:
    return [p for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}.")]


def _assert_absent_or_complete(dest: Path) -> str:
    if not dest.exists():
        return "absent"
    assert verify_files(dest) == [], dest
    load_checkpoint(dest)  # every safetensors file complete, hashes as recorded, parameters finite
    return "complete"


def test_sigkill_at_random_moments_keeps_the_source_and_leaves_no_partial_destination(source, tmp_path):
    rng = random.Random(1616)
    before = snapshot(source)
    dests = [tmp_path / f"out{i}" for i in range(3)]
    procs = [_erase(source, d) for d in dests]
    # out0: killed at a random moment from the start; out1, out2: at a random moment after their write began
    deadline = {0: time.time() + rng.uniform(2.0, 12.0)}
    delay = {1: rng.uniform(0.0, 0.6), 2: rng.uniform(0.0, 1.5)}
    killed, t_end = set(), time.time() + 240
    while len(killed) < 3 and time.time() < t_end:
        for i, p in enumerate(procs):
            if i in killed:
                continue
            if p.poll() is not None:  # finished before its moment came: a complete destination
                killed.add(i)
                continue
            if i not in deadline and (_temps(dests[i]) or dests[i].exists()):
                deadline[i] = time.time() + delay[i]
            if i in deadline and time.time() >= deadline[i]:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
                killed.add(i)
        time.sleep(0.01)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert snapshot(source) == before
    states = [_assert_absent_or_complete(d) for d in dests]
    assert any(p.returncode == -signal.SIGKILL for p in procs), states
    # a later writer to each destination removes what the killed one left (its pid is gone)
    from interp.zoo.architectures import build_diffusion_pipeline

    pipe = build_diffusion_pipeline(0, width=8)
    for d in dests:
        if not d.exists():
            write_checkpoint(pipe, d, source=source)
        from interp import io

        io.clean_stale(d)
        assert _temps(d) == [], _temps(d)
        assert _assert_absent_or_complete(d) == "complete"
    assert snapshot(source) == before


def test_two_erase_runs_on_the_same_new_out_one_wins_the_other_fails_clearly(source, tmp_path):
    dest = tmp_path / "shared-out"
    procs = [_erase(source, dest), _erase(source, dest)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], (codes, [o[1][-600:] for o in outs])
    loser = outs[[p.returncode for p in procs].index(2)][1].strip().splitlines()[-1]
    assert "being written by" in loser or "already exists" in loser, loser
    winner = outs[[p.returncode for p in procs].index(0)][0]
    assert f"wrote {dest}" in winner
    assert _assert_absent_or_complete(dest) == "complete" and _temps(dest) == []


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB tmpfs (root only); None where it cannot be mounted."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        yield None
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_leaves_the_source_intact_with_a_clear_message(source, small_disk, tmp_path, monkeypatch):
    from interp.zoo.architectures import build_diffusion_pipeline

    pipe = build_diffusion_pipeline(0, width=8)  # 1.8 MB on disk: more than the 1 MB disk holds
    before = snapshot(source)
    where = small_disk if small_disk is not None else tmp_path / "full"
    if small_disk is None:  # simulate ENOSPC in the writer itself, after part of a file is written
        import safetensors.torch as st

        real = st.save_file

        def save_file(tensors, filename, metadata=None):
            Path(filename).write_bytes(b"\0" * 4096)
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        monkeypatch.setattr(st, "save_file", save_file)
        assert real is not save_file
    with pytest.raises(CheckpointWriteError) as info:
        write_checkpoint(pipe, where / "out", source=source)
    msg = str(info.value)
    assert "is full" in msg and "intact" in msg and "\n" not in msg
    assert snapshot(source) == before
    assert list(where.iterdir()) == []  # no partial destination, no temporary folder, no lock file
