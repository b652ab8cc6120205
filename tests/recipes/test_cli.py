"""The interp command line: sites, zoo, demo on a tiny local model, clear errors."""
import json
import subprocess
import sys

import pytest

from recipes.cli import main

from ..conftest import tiny_gpt2


@pytest.fixture
def tiny_folder(tmp_path, gpt2_tokenizer):
    model = tiny_gpt2(n_layer=2)
    model.save_pretrained(tmp_path / "tiny")
    gpt2_tokenizer.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def test_sites_lists_canonical_names_and_modules(tiny_folder, capsys):
    assert main(["sites", str(tiny_folder), "blocks.1.*"]) == 0
    out = capsys.readouterr().out
    assert "blocks.1.resid_pre" in out and "blocks.1.attn.z" in out and "heads=4" in out and "blocks.0." not in out
    assert main(["sites", str(tiny_folder), "--modules"]) == 0
    assert "module:transformer.h.0.attn.c_proj" in capsys.readouterr().out


def test_unknown_site_pattern_is_a_clear_cli_error(tiny_folder, capsys):
    assert main(["sites", str(tiny_folder), "blocks.1.resid_pr"]) == 2
    assert "Did you mean: blocks.1.resid_pre" in capsys.readouterr().err


def test_demo_writes_heatmap_and_numbers(tiny_folder, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--model", str(tiny_folder), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "heatmap:" in printed and str(out) in printed
    meta = json.loads((out / "resid_pre_patching.json").read_text())
    assert meta["axes"] == ["layer", "pos"] and len(meta["coords"]["layer"]) == 2
    assert (out / "resid_pre_patching.png").read_bytes()[:4] == b"\x89PNG"


def test_zoo_lists_smollm2(capsys):
    assert main(["zoo", "--json"]) == 0
    names = [e["name"] for e in json.loads(capsys.readouterr().out)]
    assert "smollm2" in names


def test_console_script_entry_point():
    r = subprocess.run([sys.executable, "-m", "recipes", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "demo" in r.stdout and "sites" in r.stdout


def test_zoo_summary_is_one_line_of_the_numbers_that_matter(capsys):
    from recipes.zoo import summary

    image = {"held_out": {"n_captions": 8, "n_per_caption": 32, "accuracy": {"colour": 1.0, "shape": 0.92},
                          "per_caption": {"a": {}}}, "lineage": [{"train_steps": 900}, {"train_steps": 5000}]}
    assert summary(image) == "held-out accuracy (8 captions x 32): colour 1.00, shape 0.92; 5900 training steps"
    phys = {"one_step_rel_l2": 0.00065, "kappa_fit_max_rel_err": 0.17, "train_steps": 600,
            "kappa_fit": {"a": {"rel_err": 0.05}, "b": {"rel_err": 0.17}}}
    assert summary(phys) == ("one-step rel. L2 0.00065; fitted kappa within 10% in 1 of 2 regimes (worst 17%); "
                             "600 training steps")
    assert main(["zoo"]) == 0
    out = capsys.readouterr().out
    assert "smollm2" in out and "per_caption" not in out
