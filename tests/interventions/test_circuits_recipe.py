"""`interp circuit` end to end on a tiny local GPT-2 folder: scores, curve, circuit PNG/JSON, summary."""
from __future__ import annotations

import json

import pytest
import torch

import interp
from recipes import cli


@pytest.fixture(scope="module")
def folder(tmp_path_factory, gpt2_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64)).eval()
    path = tmp_path_factory.mktemp("tiny-gpt2-circuit")
    m.save_pretrained(path)
    gpt2_tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("method,select", [("eap-ig", "top-k"), ("exact", "greedy")])
def test_circuit_recipe_writes_everything(folder, tmp_path, capsys, method, select):
    out = tmp_path / "c"
    rc = cli.main(["circuit", "--model", str(folder), "--task", "capitals", "--n", "4", "--method", method,
                   "--steps", "2", "--select", select, "--budget", "0.05", "--out", str(out)])
    assert rc == 0
    assert "CPR" in capsys.readouterr().out
    for png in ("faithfulness.png", "circuit.png", "scores.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    scores = interp.Result.load(out / "scores.json")
    curve = interp.Result.load(out / "faithfulness.json")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["edges"] == scores.shape[0] and summary["CPR"] == pytest.approx(curve.attrs["CPR"])
    d = json.loads((out / "circuit.json").read_text())
    kept = sum(e["in_graph"] for e in d["edges"].values())
    assert kept == round(0.05 * scores.shape[0])
    top = max(d["edges"].items(), key=lambda kv: abs(kv[1]["score"]))
    assert top[0] == summary["top_edges"][0][0]


def test_circuit_recipe_bad_budget(folder, tmp_path, capsys):
    assert cli.main(["circuit", "--model", str(folder), "--budget", "3", "--out", str(tmp_path)]) == 2
    assert "--budget 3.0: give a fraction of the edges" in capsys.readouterr().err
