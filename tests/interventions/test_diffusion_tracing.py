"""Diff-QuickFix-style tracing on a tiny SD pipeline, checked against what the architecture guarantees:
CLIP is causal, so restoring text states before the corrupted word changes nothing (effect 0); restoring
the last text layer at every token, or the UNet's output at every step, gives the clean run back
(effect 1); a UNet state computed before any cross-attention is already clean at step 0 (effect 0)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "interp"))
from test_diffusion_helpers import tiny_sd  # noqa: E402

import interp  # noqa: E402
from interp import Result  # noqa: E402
from interventions.diffusion_tracing import attribute_metric, corruption, hue_metric, step_windows, trace_diffusion  # noqa: E402

torch.set_num_threads(1)
PROMPT = "a small red circle on the left, solid"


@pytest.fixture(scope="module")
def traced():
    pipe = tiny_sd()
    tr = trace_diffusion(pipe, PROMPT, "red", samples=2, steps=3, guidance=3.0, text_kinds=("resid_post", "attn.out"),
                         components=["unet.down.0.resnet.0", "unet.mid", "unet.up.1.attn.0.cross.out", "unet.out"],
                         keep_images=2, progress=False)
    return pipe, tr


def test_architectural_guarantees(traced):
    _, tr = traced
    assert tr.corrupted_metric < tr.clean_metric == 0.0  # metric = -distance to the clean predictions
    hidden = tr.text["text_encoder.resid_post"]
    assert hidden.axes == ("layer", "token") and hidden.coords["token"][3] == "3:red"
    assert hidden.values[:, :3].abs().max() < 1e-6          # before "red": nothing to restore (causal CLIP)
    assert hidden.values[:, 3].min() > 0.01                  # at "red": a real effect
    den = tr.denoiser
    assert den.coords["steps"] == ["all", "0", "1", "2"]
    cell = lambda comp, w: float(den.values[den.coords["component"].index(comp), den.coords["steps"].index(w)])  # noqa
    assert abs(cell("unet.out", "all") - 1.0) < 1e-4          # the whole prediction restored: clean run back
    assert abs(cell("unet.down.0.resnet.0", "0")) < 1e-6     # before any cross-attention at step 0: already clean
    assert cell("unet.mid", "all") > cell("unet.mid", "2")   # more steps restored, more effect


def test_restoring_the_last_text_layer_everywhere_gives_the_clean_run(traced):
    pipe, _ = traced
    tr = trace_diffusion(pipe, PROMPT, "red", samples=2, steps=2, guidance=3.0, text_layers=[1], denoiser=False,
                         keep_images=0, progress=False)
    v = tr.text["text_encoder.resid_post"].values[0]
    assert 0 < float(v.max()) < 1.0  # one token alone is not the whole story (later tokens read "red" too)
    lm = interp.attach(pipe)
    from interp.diffusion import Sampling, pred_distance, record, restore

    spec = Sampling([PROMPT] * 2, seed=0, steps=2, guidance=3.0)
    rec = record(lm, spec, "text_encoder.blocks.1.resid_post")
    out = lm.run(spec, ops=[*corruption(lm, "red"), *restore("text_encoder.blocks.1.resid_post", rec, branch="cond")])
    assert float(pred_distance(rec.output)(out.output).max()) < 1e-6


def test_results_round_trip_and_pictures(traced, tmp_path):
    _, tr = traced
    paths = tr.save(tmp_path)
    back = Result.load(paths["denoiser"])
    assert torch.equal(back.values, tr.denoiser.values) and back.coords == tr.denoiser.coords
    assert paths["images.png"].stat().st_size > 1000 and paths["denoiser.png"].stat().st_size > 1000
    assert set(tr.images) >= {"clean", "corrupted"} and tr.images["clean"].shape == (2, 3, 8, 8)


def test_helpers_validate_their_inputs():
    assert step_windows(6, 3) == [(0, 6), (0, 2), (2, 4), (4, 6)]
    assert step_windows(3, "steps") == [(0, 3), (0, 1), (1, 2), (2, 3)]
    with pytest.raises(ValueError, match="zoo scores"):
        attribute_metric("weight", "heavy")
    m = attribute_metric("colour", "red")
    from interp.diffusion import SampleOutput
    from interp.zoo import shapes

    red = shapes.to_tensor(
        shapes.sample(0, 2, attributes=[shapes.Attributes("red", "square", "center", "large", "solid")])[0]
    )
    blue = shapes.to_tensor(
        shapes.sample(0, 1, attributes=[shapes.Attributes("blue", "square", "center", "large", "solid")])[0]
    )
    imgs = (torch.cat([red, blue]) + 1) / 2
    assert m(SampleOutput(imgs, None, None, None, {}, 1)).tolist() == [1.0, 1.0, 0.0]
    h = hue_metric("red")(SampleOutput(imgs, None, None, None, {}, 1))  # red: cos 0 = 1; blue (240 deg): cos = -0.5
    torch.testing.assert_close(h, torch.tensor([1.0, 1.0, -0.5]), atol=1e-3, rtol=0)
    assert float(hue_metric("red")(SampleOutput(torch.zeros(1, 3, 8, 8), None, None, None, {}, 1))) == 0.0  # no shape


def test_corruption_covers_every_text_encoder_of_sd3():
    """SD3 has two CLIP encoders: both get their own noise (and seeds past int64 range stay valid)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "interp"))
    from test_diffusion_helpers import SD3_OPTIONS, tiny_sd3

    from interp.diffusion import Sampling

    lm = interp.attach(tiny_sd3())
    ops = corruption(lm, "red", seed=12345)
    assert [o.site for o in ops] == ["text_encoder.embed", "text_encoder_2.embed"]
    s = Sampling(PROMPT, steps=1, guidance=3.0, options=SD3_OPTIONS)
    sites = ["text_encoder.embed", "text_encoder_2.embed"]
    a = lm.run(s, ops=ops, capture=sites).cache
    b = lm.run(s, capture=sites).cache
    for site in sites:  # [call (prompt, negative), batch, token, d]: only the prompt's "red" (token 3) moved
        diff = (a[site] - b[site]).abs().amax(-1)
        assert diff[0, 0, 3] > 0 and diff[0, 0, :3].max() == 0 and diff[0, 0, 4:].max() == 0 and diff[1].max() == 0
