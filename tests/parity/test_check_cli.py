"""`interp check MODEL` on a model saved to disk: prints the table, saves it as a Result, exits 1 on a failure."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from interp.results import Result
from recipes.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from parity_zoo import build  # noqa: E402


@pytest.fixture
def gemma2_folder(tmp_path):
    build("gemma2").save_pretrained(tmp_path / "g2")
    return tmp_path / "g2"


def test_check_passes_prints_the_table_and_saves_a_result(gemma2_folder, tmp_path, capsys):
    assert main(["check", str(gemma2_folder), "--batches", "1,3", "--out", str(tmp_path / "res")]) == 0
    out = capsys.readouterr().out
    assert "site kind" in out and "PASS" in out and "grid column head (prefix+packs)" in out
    assert "seq_len=40" in out  # longer than the sliding window (32)
    res = Result.load(tmp_path / "res" / "check.json")
    assert res.axes == ("check", "field") and res.values[:, 0].min() == 1.0
    assert "patch attn.k" in res.coord("check")


def test_check_exits_non_zero_when_an_identity_fails(gemma2_folder, capsys, monkeypatch):
    """The head transform is part of what `logits`/the replay tail mean: drop Gemma 2's soft-capping from the
    adapter and the check must fail there (and the grid replay must not silently pass)."""
    from interp.adapters.hf_lm import HFCausalLMAdapter

    monkeypatch.setattr(HFCausalLMAdapter, "finish_logits", lambda self, logits: logits)
    assert main(["check", str(gemma2_folder), "--batches", "1", "--no-grids"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "head output=finish(logits)" in out


def test_bad_batches_is_a_one_line_error(gemma2_folder, capsys):
    assert main(["check", str(gemma2_folder), "--batches", "one"]) == 2
    assert "--batches takes comma-separated integers" in capsys.readouterr().err
