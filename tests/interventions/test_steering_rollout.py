"""Steering inside a physics rollout loop and the `interp steer` physics path, on a tiny untrained
surrogate (structure, exactness); the trained zoo model's kappa dose-response when its weights exist."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

import interp
from interp.zoo import physics as P
from interventions import steering as S
from recipes import steer as R


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = P.PhysicsSurrogate(d_model=16, n_heads=2, n_layers=2, d_mlp=32).eval()
    return model, interp.attach(model)


def test_steering_in_a_rollout_is_exact_and_windowed(tiny):
    model, lm = tiny
    hi, lo = R.physics_data(16, 0.008, 0.001)
    sv = S.extract(lm, hi, lo, "module:blocks.1", method="caa", reduce="mean")
    assert sv.vector.shape == (16,)
    u0 = torch.tensor(P.gaussian_blob(), dtype=torch.float32)
    plain = model.rollout(u0, 8, 0.003, 0.0)
    with sv.apply(lm, 0.0, steps_from=""):
        assert torch.equal(model.rollout(u0, 8, 0.003, 0.0), plain)  # alpha = 0: bitwise
    with sv.apply(lm, 0.5, steps=(3, 6)) as sess:
        win = model.rollout(u0, 8, 0.003, 0.0)
    assert sess.edits == [3] and sess.ctx.step == 7
    assert torch.equal(win[:4], plain[:4])  # states 0..3 come from calls 0..2, before the window
    assert (win[4] - plain[4]).abs().max() > 1e-5

    # the same edit by hand: one model call per step, Add on the block output in steps 3-5
    u, ref = u0[None], [u0[None]]
    for t in range(8):
        if 3 <= t < 6:
            out = lm.run((u, 0.003, 0.0), ops=[sv.op(0.5)]).logits
        else:
            out = model(u, 0.003, 0.0)
        u = out
        ref.append(u)
    torch.testing.assert_close(win, torch.cat(ref), atol=1e-6, rtol=1e-6)


def test_physics_adapter_names_the_residual_stream(tiny):
    """attach() gives the surrogate canonical sites (interp/adapters/physics.py); they are the
    tensors a hand-written forward computes, and raw module paths still resolve."""
    model, lm = tiny
    assert lm.family == "physics" and lm.n_layers == 2
    u = torch.tensor(P.random_initial(__import__("numpy").random.default_rng(0), 3), dtype=torch.float32)
    out = lm.run((u, 0.003, 0.25), capture=["blocks.*.resid_pre", "blocks.*.resid_post", "blocks.0.attn.out",
                                             "blocks.0.resid_mid", "blocks.0.mlp.out", "module:blocks.1"])
    c = out.cache
    b0 = model.blocks[0]
    x0 = c["blocks.0.resid_pre"]
    assert x0.shape == (3, 65, 16)
    torch.testing.assert_close(c["blocks.0.attn.out"], b0.attn(b0.ln1(x0)))
    torch.testing.assert_close(c["blocks.0.resid_mid"], x0 + c["blocks.0.attn.out"])
    torch.testing.assert_close(c["blocks.0.resid_post"], c["blocks.0.resid_mid"] + c["blocks.0.mlp.out"])
    assert torch.equal(c["blocks.0.resid_post"], c["blocks.1.resid_pre"])
    assert torch.equal(c["module:blocks.1"], c["blocks.1.resid_post"])
    assert torch.equal(out.logits, model(u, 0.003, 0.25))
    with pytest.raises(TypeError, match="kappa, velocity"):
        lm.run(u)


def test_recipe_physics_path_writes_report(tiny, tmp_path):
    model, _ = tiny
    cfg = R.Preset("physics", "tiny", "blocks.0.attn.out", "caa", slice(1, None), [-0.2, 0.0, 0.2],
                   {"high": 0.008, "low": 0.001, "kappa": 0.003, "rollout_steps": 6, "n": 16, "znorm": False,
                    "seed": 0, "window": None})
    rep = R.run_physics(model, cfg, tmp_path)
    assert rep["alpha0_bitwise_identical"] is True
    assert set(rep["dose_response"]) == {"steer", "random", "norm_matched"}
    assert all(len(v) == 3 for v in rep["dose_response"].values())
    assert Path(rep["plot"]).stat().st_size > 5000
    back = S.SteeringVector.load(rep["vector_file"])
    assert back.site == "blocks.0.attn.out" and back.method == "caa" and back.model == "tiny"


WEIGHTS = Path(P.__file__).parent / "weights" / "physics" / "metrics.json"


@pytest.mark.skipif(not WEIGHTS.exists(), reason="the trained physics zoo model is not committed yet")
def test_trained_physics_kappa_follows_the_steering_vector(tmp_path):
    from interp.zoo import load

    model = load("physics")
    cfg = R.config(argparse.Namespace(
        preset="physics-kappa", model=None, site=None, method=None, reduce=None, alphas="-1,0,1",
        steps=None, positive=None, negative=None, eval=None, targets=None, seed=0, znorm=False))
    rep = R.run_physics(model, cfg, tmp_path)
    assert rep["alpha0_bitwise_identical"] is True
    m = rep["monotonicity"]
    assert m["steer"]["increasing"], rep["dose_response"]
    for c in ("random", "norm_matched"):  # the controls of the same norm move kappa far less
        assert abs(m[c]["change"]) < 0.5 * m["steer"]["change"], (c, rep["dose_response"])
    fits = rep["reference_fits"]  # alpha = 1 lands between the mid and the high regime's own fits
    lo, mid, hi = (fits[k] for k in sorted(fits, key=lambda k: float(k.split("=")[1])))
    assert mid < rep["dose_response"]["steer"][2] < hi


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_recipe_diffusion_path_on_a_tiny_pipeline(tmp_path, family):
    """Extraction through interp.diffusion.record, the sweep through sample_grid (one sampling loop
    for every (vector, alpha) row), alpha = 0 bitwise against a plain sampling run; UNet feature
    maps get a channel vector (spatial="average"), SD3 image tokens a token vector."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "interp"))
    from test_diffusion_helpers import SD3_OPTIONS, tiny_sd, tiny_sd3

    pipe = tiny_sd() if family == "sd" else tiny_sd3()
    site = "unet.mid" if family == "sd" else "transformer.blocks.0.img"
    cfg = R.Preset("diffusion", f"tiny-{family}", site, "caa", "mean", [0.0, 0.5],
                   {"positive": "red", "negative": "blue", "base": "magenta", "n_steps": 2, "guidance": 3.0,
                    "seeds": 1, "znorm": False, "seed": 0, "window": (1, 2),
                    "options": {} if family == "sd" else SD3_OPTIONS})
    rep = R.run_diffusion(pipe, cfg, tmp_path)
    assert rep["alpha0_bitwise_identical"] is True
    back = S.SteeringVector.load(rep["vector_file"])
    if family == "sd":
        assert back.spatial == "average" and back.vector.shape == (pipe.unet.config.block_out_channels[-1],)
    else:
        assert back.spatial is None and back.vector.shape == (pipe.transformer.inner_dim,)
    from interp.diffusion import Sampling

    pl = interp.attach(pipe)  # the saved vector, injected in the window only, changes the image
    spec = Sampling("a magenta circle", seed=0, steps=2, guidance=3.0, options=cfg.extra["options"])
    plain = pl.run(spec).output.images
    assert (pl.run(spec, ops=[back.op(0.5, steps=(1, 2))]).output.images - plain).abs().max() > 1e-4
    assert set(rep["dose_response"]) == {"steer", "random", "norm_matched"}
    assert Path(rep["samples"]).stat().st_size > 2000 and Path(rep["plot"]).stat().st_size > 5000


def test_apply_inside_a_plain_diffusers_pipeline_call_equals_the_engine_run():
    """`with sv.apply(attach(pipe), ...): pipe(...)` (the user's own call) gives the images of
    interp.diffusion's step-aware run with the same op; alpha = 0 is bitwise the plain call."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "interp"))
    from test_diffusion_helpers import tiny_sd

    from interp.diffusion import Sampling

    pipe = tiny_sd()
    pl = interp.attach(pipe)
    sv = S.SteeringVector(torch.randn(16, generator=torch.Generator().manual_seed(0)), "unet.mid", spatial="average")
    prompts = ["a red circle", "a blue square"]

    def call():
        return pipe(prompts, num_inference_steps=3, guidance_scale=3.0, output_type="pt",
                    generator=[torch.Generator().manual_seed(s) for s in (5, 6)]).images

    plain = call()
    with sv.apply(pl, 0.0, steps=(1, 3)):
        assert torch.equal(call(), plain)
    with sv.apply(pl, 0.8, steps=(1, 3)) as sess:
        mine = call()
    assert sess.edits == [2] and sess.ctx.step == 2  # steps 1 and 2 of 0..2
    ref = pl.run(Sampling(prompts, seed=[5, 6], steps=3, guidance=3.0), ops=[sv.op(0.8, steps=(1, 3))]).output.images
    torch.testing.assert_close(mine, ref, atol=1e-6, rtol=1e-5)
    assert (mine - plain).abs().max() > 1e-4
