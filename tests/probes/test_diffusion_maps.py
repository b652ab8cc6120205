"""Probe maps on a tiny random StableDiffusionPipeline: text-encoder layers x tokens, denoiser blocks x steps."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "interp"))
from test_diffusion_helpers import tiny_sd  # noqa: E402

import interp  # noqa: E402
from interp.zoo.shapes import COLOURS, SHAPES  # noqa: E402
from probes import SubjectOf, collect  # noqa: E402
from probes.datasets import denoiser_runner  # noqa: E402
from probes.maps import diffusion_probe_maps  # noqa: E402


@pytest.fixture(scope="module")
def data():
    prompts, colour, shape = [], [], []
    for c in COLOURS:
        for s in SHAPES:
            for side in ("left", "right"):
                prompts.append(f"a {c} {s} on the {side}")
                colour.append(c)
                shape.append(s)
    return prompts, {"colour": colour, "shape": shape}


def test_colour_is_read_at_its_token_and_not_before_it(data, tmp_path):
    prompts, labels = data
    pipe = interp.attach(tiny_sd())
    text, den = diffusion_probe_maps(pipe, prompts, labels, "colour", subjects=labels["colour"],
                                     text_positions={"article": 1, "colour": SubjectOf("last"), "eos": "eos"},
                                     steps=1, guidance=3.0, types="shape", batch_size=24, path=str(tmp_path),
                                     progress=False)
    assert text.axes == ("model", "measure", "layer", "pos") and den.axes == ("model", "measure", "site", "step")
    assert den.coord("step") == ["0"] and "unet.mid" in den.coord("site")
    acc = text.sel(measure="accuracy")
    for model in ("trained", "random-init"):
        a = acc.sel(model=model)
        assert a.sel(pos="colour").values.min() > 0.95               # the colour token carries its identity
        assert a.sel(pos="article").values.max() < 1 / 6 + 0.15       # the token before it cannot know it
    d = den.sel(measure="accuracy").values
    assert ((d >= 0) & (d <= 1)).all()
    # the activations went to disk per model and runner, complete
    for model in ("trained", "random-init"):
        for part in ("text", "denoiser"):
            assert (tmp_path / model / part / "meta.json").exists()


def test_denoiser_features_are_seeded_per_prompt(data):
    prompts, _ = data
    pipe = interp.attach(tiny_sd())
    run = denoiser_runner(pipe, ["unet.mid", "unet.up.1"], steps=2, guidance=3.0, seed=5)
    a, b = run(prompts[:3], 0), run(prompts[:3], 0)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["unet.mid"].shape == (3, 2, 16)                          # [items, steps, channels]
    ds = collect(None, prompts[:6], "den", runner=run, coords=[0, 1], axis="step", batch_size=3, progress=False)
    assert torch.equal(ds.X("unet.mid", 1)[:3], a["unet.mid"][:, 1])


def test_probe_cli_on_a_saved_pipeline(data, tmp_path):
    import json

    from interp import Result
    from recipes.cli import main

    prompts, labels = data
    lines = [json.dumps({"prompt": p, "label": c, "subject": c, "group": s})
             for p, c, s in zip(prompts, labels["colour"], labels["shape"]) if p.endswith("left")]
    (tmp_path / "d.jsonl").write_text("\n".join(lines))
    tiny_sd().save_pretrained(tmp_path / "pipe")
    rc = main(
        [
            "probe",
            "--model",
            str(tmp_path / "pipe"),
            "--data",
            str(tmp_path / "d.jsonl"),
            "--steps",
            "1",
            "--guidance",
            "3.0",
            "--no-random",
            "--folds",
            "3",
            "--batch-size",
            "24",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert rc == 0
    text = Result.load(tmp_path / "out" / "text_encoder_probe_map")
    den = Result.load(tmp_path / "out" / "denoiser_probe_map")
    assert text.coord("pos") == ["subject", "eos"] and den.axes[-1] == "step"
    assert text.sel(model="trained", measure="accuracy", pos="subject").values.min() > 0.95
    assert (tmp_path / "out" / "denoiser_probe_map.png").exists()
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["n"] == 24
