"""`interp trace` end to end on a tiny local Hugging Face folder: heatmaps, JSON and CSV on disk; hub
names fail offline with a clear message; diffusers pipelines go to recipes.trace_diffusion."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import torch

import interp
from recipes import cli
from recipes import trace as trace_recipe


@pytest.fixture(scope="module")
def folder(tmp_path_factory, gpt2_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=4, n_positions=32)).eval()
    path = tmp_path_factory.mktemp("tiny-gpt2")
    m.save_pretrained(path)
    gpt2_tokenizer.save_pretrained(path)
    return path


def test_trace_writes_heatmaps_json_and_csv(folder, tmp_path, capsys):
    out = tmp_path / "trace"
    rc = cli.main(["trace", "--model", str(folder), "--prompt", "The Eiffel Tower is located in the city of",
                   "--subject", "Eiffel Tower", "--target", " Paris", "--samples", "3", "--window", "2",
                   "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "largest mlp" in printed and "p_clean" in printed
    for kind in ("hidden", "mlp", "attn"):
        assert (out / f"{kind}.png").read_bytes()[:4] == b"\x89PNG"
        res = interp.Result.load(out / f"{kind}.json")
        assert res.axes == ("layer", "pos") and res.shape == (3, 11)
        assert res.coord("pos")[1] == "1: E*" and res.attrs["samples"] == 3
    df = pd.read_csv(out / "effects.csv")
    assert set(df["kind"]) == {"hidden", "mlp", "attn"} and len(df) == 3 * 3 * 11
    summary = json.loads((out / "summary.json").read_text())
    assert summary["target"] == " Paris" and set(summary["peaks"]) == {"hidden", "mlp", "attn"}
    mlp = interp.Result.load(out / "mlp.json")
    peak = summary["peaks"]["mlp"]
    assert peak["indirect_effect"] == pytest.approx(float(mlp.values.max()), abs=1e-6)


def test_patching_mode_with_a_corrupted_prompt(folder, tmp_path):
    out = tmp_path / "patch"
    rc = cli.main(["trace", "--model", str(folder), "--prompt", "The capital of France is",
                   "--corrupted", "The capital of Italy is", "--target", " Paris", "--foil", " Rome",
                   "--kinds", "resid_pre,attn.z", "--layers", "0-1", "--out", str(out)])
    assert rc == 0
    res = interp.Result.load(out / "resid_pre.json")
    assert res.coord("layer") == [0, 1] and res.attrs["direction"] == "denoise"
    # position 3 (" France") is where the prompts differ: patching all of it at layer 0 restores the clean run
    assert float(res.sel(layer=0).values[3]) == pytest.approx(1.0, abs=1e-4)
    assert float(res.values[:, :3].abs().max()) == 0.0  # identical prefix: exact no-op cells
    heads = interp.Result.load(out / "attn_z.json")
    assert heads.axes == ("layer", "head") and heads.shape == (2, 4)
    assert json.loads((out / "summary.json").read_text())["metric"] == "logit_diff"


def test_hub_name_fails_offline_with_the_choices(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # read at import time
    rc = cli.main(["trace", "--model", "no-such-org/no-such-model", "--subject", "Eiffel Tower"])
    err = capsys.readouterr().err
    assert rc == 2 and "no-such-org/no-such-model" in err and "smollm2" in err and "offline" in err


def test_bad_arguments_are_one_line_errors(folder, tmp_path, capsys):
    for argv, words in ((["--out", str(tmp_path)], "--subject"),
                        (["--subject", "Eiffel Tower", "--layers", "2-5", "--out", str(tmp_path)], "do not exist"),
                        (["--subject", "Eiffel Tower", "--kinds", "mlp,neurons", "--out", str(tmp_path)], "--kinds")):
        assert cli.main(["trace", "--model", str(folder), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err
    assert trace_recipe.parse_layers("0-2,5", 6) == [0, 1, 2, 5]


def test_the_zoo_pipeline_is_a_pipeline():
    """The zoo's ShapesDiffusionPipeline lives in interp.zoo.catalog, not in a diffusers module: the test is the
    class hierarchy (one helper, the adapter's), not the module name."""
    from interp.zoo import load

    pipe = load("shapes-diffusion")
    assert type(pipe).__module__.startswith("interp") and trace_recipe.is_pipeline(pipe)
    assert not trace_recipe.is_pipeline(pipe.unet) and not trace_recipe.is_pipeline(load("physics"))


def test_readme_diffusion_trace_runs_on_the_real_zoo_pipeline(tmp_path, capsys):
    """The README's `interp trace --model shapes-diffusion ...` line through the real CLI, cut down to one
    denoiser component, one text layer, two steps and one sample (the quick defaults themselves are timed
    in the README)."""
    out = tmp_path / "trace-red"
    rc = cli.main(["trace", "--model", "shapes-diffusion", "--prompt", "a large red circle on the left, solid",
                   "--subject", "red", "--samples", "1", "--steps", "2", "--windows", "1", "--layers", "0",
                   "--components", "unet.mid.attn.0.cross.out", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "traced 'red'" in printed and "quick defaults" not in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 1 and summary["top"]
    assert (out / "trace_images.png").read_bytes()[:4] == b"\x89PNG"


def test_pipeline_quick_defaults_fill_only_what_is_unset():
    from recipes.trace_diffusion import QUICK, quick_defaults

    args = cli.build_parser().parse_args(["trace", "--model", "shapes-diffusion", "--subject", "red", "--steps", "4"])
    assert quick_defaults(args) == ["samples", "windows"]
    assert (args.samples, args.steps, args.windows) == (QUICK["samples"], 4, QUICK["windows"])


def test_diffusion_captions_in_the_recipe_and_readme_are_training_captions():
    """A caption outside the training set (or without a size word) traces a model off its data."""
    from interp.zoo.shapes import parse_caption, train_attributes
    from recipes.trace_diffusion import DEFAULT_PROMPT

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    captions = re.findall(r"--model shapes-(?:diffusion|flow) --prompt \"([^\"]+)\"", readme)
    assert captions, "the README traces a zoo pipeline"
    train = set(train_attributes())
    for caption in [DEFAULT_PROMPT, *captions]:
        assert parse_caption(caption) in train, caption
