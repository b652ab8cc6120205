"""Adapters for diffusers pipelines and their components on tiny random configs of every family:
SD1.5-like UNet, SDXL-like UNet (2 text encoders, added conditioning, 2 transformer blocks per attention),
SD3 (MMDiT) and Flux (double + single stream). Hooks must fire at the right modules."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_diffusion_helpers import FLUX_OPTIONS, SD3_OPTIONS, tiny_flux, tiny_sd, tiny_sd3, tiny_sdxl  # noqa: E402

import interp  # noqa: E402
from interp import UnknownSiteError, at  # noqa: E402
from interp.diffusion import Sampling  # noqa: E402

PROMPT = "a small red circle on the left, solid"
FAMILIES = {
    "sd": (tiny_sd, {}, 3.0),
    "sdxl": (tiny_sdxl, {}, 3.0),
    "sd3": (tiny_sd3, SD3_OPTIONS, 3.0),
    "flux": (tiny_flux, FLUX_OPTIONS, None),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    build, options, guidance = FAMILIES[request.param]
    pipe = build()
    return request.param, pipe, Sampling(PROMPT, seed=0, steps=2, guidance=guidance, options=options)


def test_site_names_follow_the_grammar():
    sd = interp.attach(tiny_sd())
    names = sd.site_names()
    for n in [
        "text_encoder.embed",
        "text_encoder.blocks.1.attn.out",
        "text_encoder.blocks.0.attn.z",
        "unet.context",
        "unet.down.0.resnet.0",
        "unet.down.0.attn.0.self.out",
        "unet.down.0.attn.0.cross.out",
        "unet.down.0.attn.0.cross.k",
        "unet.down.0.downsample",
        "unet.mid",
        "unet.mid.attn.0.self.out",
        "unet.mid.resnet.1",
        "unet.up.1.resnet.1",
        "unet.up.1.attn.1.cross.out",
        "unet.up.0.upsample",
        "unet.out",
    ]:
        assert n in names, n
    assert (
        sd.site("unet.down.0.attn.0.cross.out").module == "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    )
    assert sd.site("text_encoder.blocks.1.attn.z").heads == 2
    xl = interp.attach(tiny_sdxl())
    assert xl.site("unet.down.1.attn.0.block.1.cross.out").module == \
        "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2"
    assert "unet.add_embed" in xl.site_names() and "text_encoder_2.final" in xl.site_names()
    sd3 = interp.attach(tiny_sd3())
    assert sd3.site("transformer.blocks.0.txt").slot == 0 and sd3.site("transformer.blocks.0.img").slot == 1
    assert "transformer.blocks.1.txt" not in sd3.site_names()  # SD3's last block is context_pre_only
    flux = interp.attach(tiny_flux())
    assert {"transformer.single.0", "transformer.single.0.img", "transformer.single.0.txt",
            "text_encoder_2.blocks.1.mlp.out"} <= set(flux.site_names())


def test_hooks_fire_at_the_right_modules_with_the_right_steps(family):
    """Each captured site equals what a plain torch hook on the same module records, call by call,
    and the run's call log gives steps 0, 1 with both CFG branches (Flux: cond only)."""
    name, pipe, spec = family
    lm = interp.attach(pipe)
    den = lm.adapter.denoiser
    site = {"sd": "unet.down.0.attn.0.cross.out", "sdxl": "unet.down.1.attn.0.block.1.cross.out",
            "sd3": "transformer.blocks.0.txt", "flux": "transformer.single.0.img"}[name]
    s = lm.site(site)
    seen = []
    module = lm.adapter.root.get_submodule(s.module)

    def grab(mod, args, out):
        seen.append((out[s.slot] if isinstance(out, tuple) else out).detach().clone())
    handle = module.register_forward_hook(grab)  # the reference: a plain torch hook, outside interp
    try:
        out = lm.run(spec, capture=[site, f"{den}.out"])
    finally:
        handle.remove()
    got = out.cache[site]
    assert got.shape[0] == 2 and len(seen) == 2
    for k in range(2):
        assert torch.equal(got[k], seen[k])
    log = out.output.calls[den]
    assert [c["step"] for c in log] == [0, 1]
    want = {"cond"} if name == "flux" else {"cond", "uncond"}
    assert all(set(c["branches"]) == want for c in log)
    assert interp.hook_count(pipe.vae) == 0 and interp.hook_count(getattr(pipe, den)) == 0


def test_components_attach_alone():
    pipe = tiny_sd()
    te = interp.attach(pipe.text_encoder, tokenizer=pipe.tokenizer)
    assert te.family == "text_encoder" and "blocks.1.resid_post" in te.site_names()
    out = te.run(PROMPT, capture=["blocks.1.resid_post", "final"])
    assert torch.equal(out.cache["final"], out.logits)  # CLIP's last_hidden_state is the final norm output
    unet = interp.attach(pipe.unet)
    assert unet.family == "unet"
    x = torch.randn(2, 3, 8, 8)
    ctx = torch.randn(2, 16, 32)
    kw = {"sample": x, "timestep": torch.tensor(10), "encoder_hidden_states": ctx}
    plain = pipe.unet(**kw).sample
    got = unet.run(kw, capture="unet.mid")
    assert torch.equal(got.logits, plain)
    zero = unet.run(kw, ops=[interp.Ablate("unet.context", "zero", where=at(pos=3, items=1))]).logits
    ctx2 = ctx.clone()
    ctx2[1, 3] = 0
    assert torch.equal(zero, pipe.unet(x, 10, encoder_hidden_states=ctx2).sample)
    assert torch.equal(zero[0], plain[0])
    dit = interp.attach(tiny_flux().transformer)
    assert dit.family == "dit" and "transformer.single.0.attn" in dit.site_names()


def test_unknown_components_and_sites_are_clear_errors():
    lm = interp.attach(tiny_sd())
    with pytest.raises(UnknownSiteError, match="unknown component 'transformer'.*text_encoder, unet"):
        lm.site("transformer.blocks.0.img")
    with pytest.raises(UnknownSiteError, match="Did you mean.*unet.down.1.resnet.0"):
        lm.site("unet.down.1.resnet.9")
    with pytest.raises(interp.PositionError, match="no img/txt streams"):
        lm.run(Sampling(PROMPT, steps=1), ops=[interp.Ablate("unet.mid", where=at(stream="img"))])


def test_sdxl_unet_alone_with_added_conditioning_in_a_grid():
    """A standalone SDXL UNet: added_cond_kwargs travel with every grid row; rows match direct calls."""
    unet = tiny_sdxl().unet
    lm = interp.attach(unet)
    assert {"unet.add_embed", "unet.down.1.attn.0.block.1.cross.k"} <= set(lm.site_names())
    g = torch.Generator().manual_seed(0)
    kw = {
        "sample": torch.randn(2, 3, 8, 8, generator=g),
        "timestep": torch.tensor([10, 500]),
        "encoder_hidden_states": torch.randn(2, 16, 32, generator=g),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(2, 8, generator=g),
            "time_ids": torch.randn(2, 6, generator=g),
        },
    }
    v = torch.randn(32, generator=g)
    rows = [
        [],
        [interp.Add("unet.add_embed", v)],
        [interp.Ablate("unet.down.1.attn.0.block.1.cross.k", "zero", where=at(pos=2))],
    ]
    grid = lm.run_grid(kw, rows, metric=lambda o: o.flatten(1), progress=False)
    with torch.no_grad():
        plain = unet(**kw).sample.flatten(1)
    torch.testing.assert_close(grid.values[0], plain, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(grid.values[1], plain, atol=1e-4) and not torch.allclose(grid.values[2], plain, atol=1e-4)
    one = lm.run(kw, ops=rows[1]).logits.flatten(1)
    torch.testing.assert_close(grid.values[1], one, atol=1e-5, rtol=1e-4)
    emb = lm.capture(kw, "unet.add_embed")["unet.add_embed"]
    assert emb.shape == (2, 32)


def test_edits_reach_what_pipelines_read_from_hidden_states():
    """SD3 reads CLIP's hidden_states[-2], which transformers records with its own hooks (installed at the
    first forward). Zeroing layer 0's output (= hidden_states[-2] of a 2-layer CLIP) must zero the CLIP part
    of the denoiser's text input on every run, not only the first."""
    lm = interp.attach(tiny_sd3())
    s = Sampling(PROMPT, steps=1, guidance=3.0, options=SD3_OPTIONS)
    for _ in range(2):
        ctx = lm.run(s, ops=[interp.Ablate("text_encoder.blocks.0.resid_post", "zero", where=at(branch="cond"))],
                     capture="transformer.context").cache["transformer.context"]
        assert ctx[1, :, :16].abs().max() == 0 and ctx[1, :, 16:32].abs().max() > 0  # cond row: CLIP-1 part zeroed
        assert ctx[0, :, :16].abs().max() > 0                                         # uncond row untouched


def test_clip_resid_mid_edits_reach_the_residual_stream():
    """CLIP's resid_mid is layer_norm2's input *and* the residual added after the MLP: an edit there must
    show up in the block output even where the MLP contributes nothing."""
    pipe = tiny_sd()
    te = interp.attach(pipe.text_encoder, tokenizer=pipe.tokenizer)
    v = torch.randn(32)
    base = te.run(PROMPT, capture="blocks.0.resid_post").cache["blocks.0.resid_post"]
    with torch.no_grad():
        for p in pipe.text_encoder.get_submodule(te.adapter.blocks + ".0.mlp").parameters():
            p.zero_()
    plain = te.run(PROMPT, capture="blocks.0.resid_post").cache["blocks.0.resid_post"]
    out = te.run(PROMPT, ops=[interp.Add("blocks.0.resid_mid", v, where=at(pos=2))],
                 capture="blocks.0.resid_post").cache["blocks.0.resid_post"]
    torch.testing.assert_close(out[0, 2], plain[0, 2] + v, atol=1e-5, rtol=0)
    assert torch.equal(out[0, :2], plain[0, :2]) and not torch.equal(base, plain)
