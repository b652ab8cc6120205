"""Every shipped zoo model loads offline and generates one sample quickly; the tokenizers and
the identity VAE behave."""
import json

import numpy as np
import pytest
import torch

import interp.zoo as zoo
from interp.zoo import catalog
from interp.zoo import physics as P
from interp.zoo import shapes as S

IMAGE_MODELS = ["shapes-diffusion", "shapes-flow"]


def _have(name):
    return (catalog.weights_path(name) / "metrics.json").exists()


def test_list_trained_entries_have_metrics():
    entries = catalog.list_trained()
    for e in entries:
        assert set(e) >= {"name", "kind", "path", "metrics", "description"}
        assert e["metrics"] and e["name"] in catalog.ENTRIES
    names = {e["name"] for e in zoo.available()}
    assert {e["name"] for e in entries} <= names


def test_unknown_name_lists_choices():
    with pytest.raises(KeyError, match="shapes-diffusion"):
        catalog.load_trained("nope")


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_image_model_loads_and_samples(name):
    if not _have(name):
        pytest.skip(f"{name} weights not trained yet")
    pipe = zoo.load(name)
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

    assert isinstance(pipe, StableDiffusionPipeline if name == "shapes-diffusion" else StableDiffusion3Pipeline)
    out = pipe(["a large red square in the center, solid"], num_inference_steps=2,
               generator=torch.Generator().manual_seed(0), output_type="np")
    img = out.images
    assert img.shape == (1, 32, 32, 3) and np.isfinite(img).all()
    # the tokenizer saved beside the weights round-trips every caption word as one token
    tok = pipe.tokenizer
    for a in S.all_attributes()[::7]:
        ids = tok(a.caption()).input_ids
        assert len(ids) == len(a.caption().replace(",", " ,").split()) + 2
        assert tok.decode(ids, skip_special_tokens=True).replace(" ,", ",") == a.caption()


def test_physics_loads_and_rolls_out():
    if not _have("physics"):
        pytest.skip("physics weights not trained yet")
    m = zoo.load("physics")
    assert isinstance(m, P.PhysicsSurrogate)
    u0 = torch.tensor(P.gaussian_blob(0.5, 0.04), dtype=torch.float32)
    traj = m.rollout(u0, 5, kappa=0.004, velocity=0.1)
    assert traj.shape == (6, P.N_GRID) and torch.isfinite(traj).all()
    exact = torch.tensor(P.exact_blob_rollout(5, 0.004, 0.1), dtype=torch.float32)
    assert ((traj - exact).norm() / exact.norm()).item() < 0.1
    metrics = json.loads((catalog.weights_path("physics") / "metrics.json").read_text())
    assert "one_step_rel_l2" in metrics and "kappa_fit" in metrics


def test_built_tokenizer_round_trips_and_saves(tmp_path):
    from transformers import CLIPTokenizer

    from interp.zoo.architectures import build_tokenizer

    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    back = CLIPTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    for a in S.all_attributes():
        ids = tok(a.caption()).input_ids
        assert back(a.caption()).input_ids == ids
        toks = tok.convert_ids_to_tokens(ids)
        assert toks[0] == "<|startoftext|>" and toks[-1] == "<|endoftext|>"
        assert [t.removesuffix("</w>") for t in toks[1:-1]] == a.caption().replace(",", " ,").split()
    assert tok("a red zebra").input_ids[-1] == tok.eos_token_id  # unknown words still tokenize
    assert tok.model_max_length == 16


def test_identity_vae():
    from interp.zoo.architectures import identity_vae

    vae = identity_vae()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(x).sample, x, atol=1e-4, rtol=0)
        torch.testing.assert_close(vae.encode(x).latent_dist.mean, x, atol=1e-4, rtol=0)


def test_shapes_diffusion_samples_without_cfg_by_default_and_plain_diffusers_reproduces_it():
    if not _have("shapes-diffusion"):
        pytest.skip("shapes-diffusion weights not trained yet")
    from interventions.checkpoint import plain_diffusers_check

    pipe = zoo.load("shapes-diffusion")
    rows = []
    h = pipe.unet.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    try:
        pipe(["a large red square in the center, solid"], num_inference_steps=2, output_type="np")
        assert rows == [1, 1]                     # guidance 1.0: no unconditional branch
        rows.clear()
        pipe(["a large red square in the center, solid"], num_inference_steps=2, output_type="np", guidance_scale=7.5)
        assert rows == [2, 2]                     # an explicit guidance_scale is used as given
    finally:
        h.remove()
    chk = plain_diffusers_check(
        pipe, catalog.weights_path("shapes-diffusion"), ["a small blue circle on the left, solid"], steps=2
    )
    assert (
        chk["checked"] and chk["class"] == "StableDiffusionPipeline" and chk["call_kwargs"] == {"guidance_scale": 1.0}
    )
    assert chk["reproduces"], chk
