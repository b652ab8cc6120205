"""The one atomic writer (interp.io) and the writers switched to it (probes.datasets' progress/meta, Result.save,
steering vectors, training state): a failure at any point leaves the previous file byte-identical and no
temporary file behind, and a reader never sees a partial file."""
from __future__ import annotations

import os

import pytest
import torch

from interp import io


class Stop(Exception):
    pass


def _hidden(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("fail_in", ["write", "chmod", "replace"])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch, fail_in):
    dest = tmp_path / "x.json"
    io.atomic_write_json(dest, {"v": 1})
    old = dest.read_bytes()
    real = {"chmod": os.chmod, "replace": os.replace}

    def boom(*a, **k):
        raise Stop(fail_in)
    if fail_in == "write":
        with pytest.raises(Stop):
            io.atomic_write(dest, lambda tmp: (open(tmp, "w").write("partial"), boom()))
    else:
        monkeypatch.setattr(os, fail_in, boom)
        with pytest.raises(Stop):
            io.atomic_write_json(dest, {"v": 2})
        monkeypatch.setattr(os, fail_in, real[fail_in])
    assert dest.read_bytes() == old and _hidden(tmp_path) == []


def test_datasets_writer_and_result_save_leave_nothing_on_error(tmp_path, monkeypatch):
    from interp import Result
    from probes import datasets

    datasets._atomic_text(tmp_path / "progress.json", '{"done": 1}')

    def boom(*a, **k):
        raise Stop()
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(Stop):
        datasets._atomic_text(tmp_path / "progress.json", '{"done": 2}')
    with pytest.raises(Stop):
        Result(torch.ones(2), ("a",)).save(tmp_path / "res")
    monkeypatch.undo()
    assert (tmp_path / "progress.json").read_text() == '{"done": 1}'
    assert _hidden(tmp_path) == [] and not (tmp_path / "res.json").exists()


def test_state_round_trip_keeps_types_and_refuses_foreign_files(tmp_path):
    state = {"step": 3, "lr": 0.5, "name": "x", "betas": (0.9, 0.99), "ids": [1, 2], "opt": {0: {"m": torch.ones(2)}},
             "none": None, "nested": {"t": torch.arange(3)}}
    back = io.load_state(io.save_state(tmp_path / "s.safetensors", state))
    assert back["betas"] == (0.9, 0.99) and list(back["opt"]) == [0] and torch.equal(back["opt"][0]["m"], torch.ones(2))
    assert {k: v for k, v in back.items() if k not in ("opt", "nested")} == \
        {k: v for k, v in state.items() if k not in ("opt", "nested")}
    io.atomic_write_safetensors(tmp_path / "other.safetensors", {"a": torch.ones(1)})
    with pytest.raises(io.CorruptFileError, match="not an interp state file"):
        io.load_state(tmp_path / "other.safetensors")
    with pytest.raises(TypeError, match="cannot store a object"):
        io.save_state(tmp_path / "bad.safetensors", {"x": object()})
