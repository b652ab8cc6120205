"""Concept saliency (interventions.diffusion_saliency) checked against what the architectures guarantee.

The concept stream re-implements a joint block's text stream; fed the prompt's own context tokens as concepts it
must reproduce the run's text stream exactly (attention output before / after to_add_out and the block's text
output), on the trained SD3 model and on a random Flux transformer (rotary embeddings, q/k RMS norms). The maps
must localise the object on held-out renders whose masks the renderer knows; the scorer is checked on maps whose
answer is known; bad requests fail with one-line errors.
"""
import pytest
import torch

import interp
from interp import Result
from interp.diffusion import Sampling
from interp.zoo import scorers as SC
from interp.zoo import shapes as S
from interventions import diffusion_saliency as DS

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def flow():
    return interp.zoo.load("shapes-flow")


def _prompt_context(pipe, prompt):
    emb, _, pooled, _ = pipe.encode_prompt(prompt, prompt, prompt, device="cpu", do_classifier_free_guidance=False)
    return emb, pooled


def test_concept_stream_reproduces_sd3_text_stream(flow):
    """Concepts = the prompt's own tokens: the concept stream is the text stream, block by block."""
    den = flow.transformer
    emb, pooled = _prompt_context(flow, "a small red circle on the left, striped")
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    n = len(den.transformer_blocks)
    sites = DS._sites(den, "sd3", "", list(range(n)), ("q", "k", "v", "tk", "out", "z"))
    extra = {i: f"module:transformer_blocks.{i}.attn.add_v_proj" for i in range(n)}
    extra.update({(i, "txt_z"): f"module:transformer_blocks.{i}.attn.to_add_out:input" for i in range(n - 1)})
    extra.update({(i, "txt_out"): f"transformer.blocks.{i}.attn.txt" for i in range(n - 1)})
    extra.update({(i, "txt_block"): f"transformer.blocks.{i}.txt" for i in range(n - 1)})
    extra["ctx"] = "transformer.context_embed"
    lm = interp.attach(den)
    run = lm.run({"hidden_states": x, "timestep": torch.tensor([400.0]), "encoder_hidden_states": emb,
                  "pooled_projections": pooled}, capture=sorted({*sites.values(), *extra.values()}))
    call = {k: run.cache[v] for k, v in sites.items()}
    with torch.no_grad():
        stream = list(DS.concept_stream(den, call, run.cache[extra["ctx"]], n - 1))
    assert len(stream) == n
    for i, o, co, c in stream[:-1]:
        torch.testing.assert_close(o, run.cache[extra[i, "txt_z"]], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(co, run.cache[extra[i, "txt_out"]], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(c, run.cache[extra[i, "txt_block"]], atol=1e-5, rtol=1e-5)
    assert stream[-1][2] is None  # SD3's last block has no text output projection (context_pre_only)
    _check_probs(den, call, run, range(n), "transformer_blocks.{}.attn.add_v_proj")
    assert interp.hook_count(den) == 0


def _tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                  pooled_projection_dim=12, axes_dims_rope=(4, 6, 6)).eval()


def test_concept_stream_reproduces_flux_double_stream():
    den = _tiny_flux()
    g = torch.Generator().manual_seed(1)
    h = w = 4
    grid = torch.meshgrid(torch.zeros(1), torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    img_ids = torch.stack(grid, -1)
    img_ids = img_ids.reshape(-1, 3).float()
    txt = torch.randn(2, 5, 24, generator=g)
    inputs = {"hidden_states": torch.randn(2, h * w, 8, generator=g), "encoder_hidden_states": txt,
              "pooled_projections": torch.randn(2, 12, generator=g), "timestep": torch.tensor([0.3, 0.7]),
              "img_ids": img_ids, "txt_ids": torch.zeros(5, 3)}
    sites = DS._sites(den, "flux", "", [0, 1], ("q", "k", "v", "tk", "out", "z"))
    extra = {i: f"module:transformer_blocks.{i}.attn.add_v_proj" for i in range(2)}
    extra.update({(i, "txt_block"): f"transformer.blocks.{i}.txt" for i in range(2)})
    extra.update({(i, "txt_out"): f"transformer.blocks.{i}.attn.txt" for i in range(2)})
    extra["ctx"] = "transformer.context_embed"
    run = interp.attach(den).run(inputs, capture=sorted({*sites.values(), *extra.values()}))
    call = {k: run.cache[v] for k, v in sites.items()}
    with torch.no_grad():
        stream = list(DS.concept_stream(den, call, run.cache[extra["ctx"]], 1))
    for i, _o, co, c in stream:
        torch.testing.assert_close(co, run.cache[extra[i, "txt_out"]], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(c, run.cache[extra[i, "txt_block"]], atol=1e-5, rtol=1e-5)
    _check_probs(den, call, run, [0, 1], "transformer_blocks.{}.attn.add_v_proj")


def _check_probs(den, call, run, layers, txt_v):
    """The cross-attention maps' probabilities times the values give the model's own attention output."""
    for i in layers:
        with torch.no_grad():
            probs = DS.joint_probs(den, call, i)
        attn = den.transformer_blocks[i].attn
        v = torch.cat([call[i, "v"], run.cache[f"module:{txt_v.format(i)}"]], 1)
        z = (probs @ v.unflatten(-1, (attn.heads, -1)).transpose(1, 2)).transpose(1, 2).flatten(2)
        torch.testing.assert_close(z, call[i, "z"], atol=1e-5, rtol=1e-4)


def test_maps_find_the_object_on_held_out_renders(flow):
    """Held-out renders (masks known): the best block's maps point inside the object and overlap it."""
    imgs, caps, attrs = S.sample(7, 8, S.held_out_attributes())
    x, masks = S.to_tensor(imgs), torch.from_numpy(SC.masks(imgs))
    scores = {}
    for method, kw in (("cross", {"layers": [1]}), ("concept", {"layers": [2], "space": "value", "softmax": False,
                                                                "source": "prompt"})):
        maps = []
        for a, xi in zip(attrs, x):
            words = [a.shape] if method == "cross" else [a.size, a.colour, a.shape, a.position, a.texture]
            r = DS.image_saliency(flow, xi[None], [a.caption()], words, method=method, sigmas=(0.4, 0.6), **kw)
            maps.append(r.values[0, words.index(a.shape)])
        scores[method] = DS.segmentation_scores(torch.stack(maps), masks)
    for method, s in scores.items():
        assert float(s["pointing"].mean()) >= 0.75, (method, s)
        assert float(s["miou"].mean()) >= 0.55, (method, s)
    # shuffled maps (each image scored against another image's object) do much worse: the maps follow the object
    shifted = DS.segmentation_scores(torch.roll(torch.stack(maps), 1, 0), masks)
    assert float(shifted["iou"].mean()) < float(scores["concept"]["iou"].mean()) - 0.15


def test_sampling_run_maps_images_unchanged_and_saved(flow, tmp_path):
    spec = Sampling(["a large blue square on the right, solid"], seed=3, steps=4)
    plain = interp.attach(flow).run(spec).output.images
    parts = (flow.transformer, flow.text_encoder, flow.text_encoder_2)
    hooks = [interp.hook_count(m) for m in parts]  # transformers keeps its own output-capturing hooks
    res = DS.concept_attention(flow, spec, ["blue", "square", "red"], steps=(1, 4))
    assert res.axes == ("image", "concept", "y", "x") and res.shape == (1, 3, 16, 16)
    assert res.attrs["steps"] == [1, 2, 3] and res.attrs["layers"] == [0, 1, 2, 3]
    torch.testing.assert_close(res.images, plain, atol=0, rtol=0)  # the concept stream never touches the image
    torch.testing.assert_close(res.values.sum(1), torch.ones(1, 16, 16))  # softmax over concepts
    back = Result.load(res.save(tmp_path / "maps"))
    torch.testing.assert_close(back.values, res.values)
    assert back.coords["concept"] == ["blue", "square", "red"]
    cross = DS.cross_attention(flow, spec, ["blue", "square"], layers=[0, 2])
    assert cross.shape == (1, 2, 16, 16) and cross.attrs["layers"] == [0, 2]
    assert [interp.hook_count(m) for m in parts] == hooks and hooks[0] == 0


def test_unet_cross_attention_is_the_models_attention():
    """UNet maps: forward-order modules, probabilities that reproduce every cross-attention output, 8x8 grid."""
    pipe = interp.zoo.load("shapes-diffusion")
    den = pipe.unet
    mods = DS._cross_modules(den)
    assert [m.split(".")[0] for m in mods] == ["down_blocks", "mid_block", "up_blocks", "up_blocks"]
    imgs, caps, attrs = S.sample(11, 2, S.held_out_attributes())
    x = S.to_tensor(imgs)
    emb = pipe.encode_prompt(caps, "cpu", 1, False)[0]
    sites = DS._sites(den, "unet", "", list(range(len(mods))), ())
    extra = {(i, key): f"module:{m}.{mod}" for i, m in enumerate(mods)
             for key, mod in (("v", "to_v"), ("z", "to_out.0:input"))}
    t = torch.tensor([300, 300])
    run = interp.attach(den).run({"sample": pipe.scheduler.add_noise(x, torch.randn_like(x), t), "timestep": t,
                                  "encoder_hidden_states": emb}, capture=sorted({*sites.values(), *extra.values()}))
    call = {k: run.cache[v] for k, v in sites.items()}
    for i, m in enumerate(mods):
        heads = den.get_submodule(m).heads
        probs = DS.unet_probs(den, call, i)
        v = run.cache[extra[i, "v"]].unflatten(-1, (heads, -1)).transpose(1, 2)
        z = (probs @ v).transpose(1, 2).flatten(2)
        torch.testing.assert_close(z, run.cache[extra[i, "z"]], atol=1e-5, rtol=1e-4)
    r = DS.image_saliency(pipe, x, caps, ["a"], method="cross", sigmas=(0.3,))
    assert r.shape == (2, 1, 8, 8)  # 8x8 grids and the 4x4 mid block upsampled to 8x8
    with pytest.raises(DS.SaliencyError, match="joint-attention"):
        DS.image_saliency(pipe, x[:1], caps[:1], ["red"], method="concept")


def test_segmentation_scores_on_known_answers():
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[0, 4:12, 4:12] = True
    masks[1, 20:30, 10:20] = True
    perfect = masks.float()[:, ::2, ::2].clone()  # 16x16 maps of the same regions
    s = DS.segmentation_scores(perfect, masks)
    assert s["pointing"].tolist() == [1.0, 1.0] and s["iou"].tolist() == [1.0, 1.0] == s["miou"].tolist()
    half = perfect.clone()
    half[0, :, :4] = 0  # keep the right half of the first square (columns 8-11 of 4-11)
    assert DS.segmentation_scores(half, masks)["iou"][0].item() == pytest.approx(0.5)
    inverse = DS.segmentation_scores(1 - perfect, masks)
    assert inverse["pointing"].tolist() == [0.0, 0.0] and float(inverse["iou"].max()) == 0.0
    with pytest.raises(DS.SaliencyError, match="must be"):
        DS.segmentation_scores(perfect[0], masks)


def test_bad_requests_fail_with_one_line_errors(flow):
    with pytest.raises(DS.SaliencyError, match="no token"):
        DS.cross_attention(flow, Sampling("a small red circle on the left, solid", steps=2), ["blue"])
    with pytest.raises(DS.SaliencyError, match="out of range"):
        DS.concept_attention(flow, Sampling("a small red circle on the left, solid", steps=2), ["red"], layers=[7])
    with pytest.raises(DS.SaliencyError, match="space"):
        DS.concept_attention(flow, "a red circle", ["red"], space="keys")
    with pytest.raises(DS.SaliencyError, match="step window"):
        DS.concept_attention(flow, Sampling("a small red circle on the left, solid", steps=2), ["red"], steps=(1, 5))
    assert issubclass(DS.SaliencyError, interp.InterpError)
