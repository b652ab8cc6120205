"""Trajectory attribution (interventions.diffusion_attribution) on the trained shapes-flow model.

Guarantees checked: the replay loop is the stock pipeline (same latents); restoring the denoiser's output at
every step, or the clean conditioning from step 0, gives the clean run back (effect 1) and from the last step
changes nothing (0); for the last step's velocity and a metric linear in the image, attribution patching is
exact (the image is linear in that velocity); bad requests fail with one-line errors.
"""
import pytest
import torch

import interp
from interp.diffusion import Sampling
from interventions import diffusion_attribution as DA

torch.set_num_threads(1)
CLEAN, CORRUPT = "a small red circle on the left, solid", "a small blue circle on the left, solid"


@pytest.fixture(scope="module")
def runs():
    pipe = interp.zoo.load("shapes-flow")
    clean = DA.FlowRun(pipe, CLEAN, seed=1, steps=4)
    return pipe, clean, clean.with_prompt(CORRUPT)


def test_replay_loop_is_the_pipeline(runs):
    pipe, clean, _ = runs
    x, _ = clean.run()
    ref = interp.attach(pipe).run(Sampling(CLEAN, seed=1, steps=4, guidance=7.0)).output
    torch.testing.assert_close(x, ref.latents, atol=1e-6, rtol=0)


def _linear_metric(x):
    return (x * torch.tensor([1.0, -0.5, -0.5]).view(1, 3, 1, 1)).sum(1).mean()


def test_exact_and_attribution_on_known_cells(runs):
    _, clean, corrupt = runs
    res = DA.attribute(clean, corrupt, _linear_metric, sites=["transformer.out", "transformer.blocks.1.attn.img"],
                       tokens=[3], windows=[(0, 4), (3, 4)], ig_steps=2)
    exact, approx = res["exact"].values, res["attribution"].values
    assert res["exact"].axes == ("cell", "window") and res["exact"].coords["cell"][2] == "token 3"
    assert exact[0, 0].item() == pytest.approx(1.0, abs=1e-5)  # the velocity at every step: the clean run back
    # the last step's velocity enters the image linearly: attribution patching is exact there
    assert approx[0, 1].item() == pytest.approx(exact[0, 1].item(), rel=1e-3, abs=1e-5)
    assert 1e-3 < exact[0, 1].item() < 1.0  # small but real: the last step refines an image already made
    assert set(res["correlation"]) == {"attribution", "ig"} and all(-1 <= v <= 1 for v in res["correlation"].values())
    assert res["exact"].attrs["clean_metric"] > res["exact"].attrs["corrupted_metric"]


def test_when_curve_endpoints(runs, tmp_path):
    _, clean, corrupt = runs
    curve = DA.when_curve(clean, corrupt, DA.colour_metric("red"))
    v = curve.values
    assert curve.axes == ("mode", "start") and v.shape == (2, 5)
    assert v[0, 0].item() == pytest.approx(1.0, abs=1e-5) and v[0, 4].item() == pytest.approx(0.0, abs=1e-5)
    assert v[1, 0].item() == pytest.approx(0.0, abs=1e-5) and v[1, 4].item() == pytest.approx(1.0, abs=1e-5)
    back = interp.Result.load(curve.save(tmp_path / "curve"))
    torch.testing.assert_close(back.values, v)


def test_bad_requests(runs):
    pipe, clean, corrupt = runs
    with pytest.raises(DA.AttributionError, match="share seed"):
        DA.attribute(clean, DA.FlowRun(pipe, CORRUPT, seed=2, steps=4), _linear_metric)
    with pytest.raises(interp.UnknownSiteError):
        DA.attribute(clean, corrupt, _linear_metric, sites=["transformer.blocks.9.attn.img"])
    with pytest.raises(DA.AttributionError, match="colour"):
        DA.colour_metric("purple")
    with pytest.raises(DA.AttributionError, match="windows"):
        DA.attribute(clean, corrupt, _linear_metric, sites=["transformer.out"], windows=[(2, 9)])
    with pytest.raises(DA.AttributionError, match="SD3-style"):
        DA.FlowRun(interp.zoo.load("shapes-diffusion"), CLEAN)
