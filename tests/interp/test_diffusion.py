"""Step-aware runs on tiny pipelines: identity of clean-into-clean restoration, step windows, CFG branch
rows, streams, seeded noise, batched grids under a memory budget, per-token influence D_t."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_diffusion_helpers import FLUX_OPTIONS, SD3_OPTIONS, tiny_flux, tiny_sd, tiny_sd3, tiny_sdxl  # noqa: E402

import interp  # noqa: E402
from interp import Ablate, Add, Noise, OpNeverFiredError, PositionError, Replace, Tokens, at  # noqa: E402
from interp.diffusion import Sampling, pred_distance, record, restore, sample_grid, token_influence  # noqa: E402

PROMPT = "a small red circle on the left, solid"


@pytest.fixture(scope="module")
def sd():
    return interp.attach(tiny_sd())


@pytest.fixture(scope="module")
def spec():
    return Sampling(PROMPT, seed=3, steps=3, guidance=3.0)


@pytest.fixture(scope="module")
def clean(sd, spec):
    return record(sd, spec, ["unet.*", "text_encoder.blocks.*.resid_post"])


@pytest.mark.parametrize("build,options,guidance,pattern", [
    (tiny_sd, {}, 3.0, "unet.*"),
    (tiny_sdxl, {}, 3.0, "unet.*"),
    (tiny_sd3, SD3_OPTIONS, 3.0, "transformer.blocks.*"),
    (tiny_flux, FLUX_OPTIONS, None, "transformer.*"),
])
def test_restoring_clean_into_clean_is_bitwise_identity(build, options, guidance, pattern):
    """Every recorded denoiser site written back at every step, both branches: images, final latents and
    every prediction are bit-for-bit the clean run's."""
    pipe = build()
    lm = interp.attach(pipe)
    s = Sampling(PROMPT, seed=1, steps=2, guidance=guidance, options=options)
    rec = record(lm, s, [pattern, "text_encoder*.blocks.0.resid_post"])
    ops = [o for site in rec.sites for o in restore(site, rec)]
    assert len(ops) > 20
    out = lm.run(s, ops=ops).output
    assert torch.equal(out.images, rec.output.images)
    assert torch.equal(out.latents, rec.output.latents)
    assert torch.equal(out.pred, rec.output.pred)
    again = lm.run(s).output  # the same seed gives the same noise and images
    assert torch.equal(again.images, rec.output.images)


def test_step_window_op_touches_only_those_steps(sd, spec, clean):
    ref = torch.stack([c[1] for c in clean.calls("unet.mid")])
    v = torch.randn(ref.shape[2:])
    out = sd.run(spec, ops=[Add("unet.mid", v, alpha=2.0, spatial="keep", where=at(steps=(1, 2)))], capture="unet.mid")
    got = out.cache["unet.mid"]
    assert torch.equal(got[0], ref[0])                      # step 0: untouched
    assert torch.allclose(got[1], ref[1] + 2.0 * v, atol=1e-6)  # step 1: exactly the add
    assert not torch.allclose(got[2], ref[2])               # step 2 differs only through the new trajectory
    fired = []
    sd.run(spec, ops=[Replace("unet.mid", lambda x: fired.append(1) or x, where=at(steps=[0, 2]))])
    assert len(fired) == 2


def test_cfg_branch_selection_edits_only_those_rows(sd, clean):
    two = Sampling([PROMPT, PROMPT.replace("red", "blue")], seed=3, steps=1, guidance=3.0)
    base = sd.run(two, capture="unet.mid").cache["unet.mid"]  # [4 rows: uncond 0, 1, cond 0, 1, ...]
    v = torch.ones(base.shape[1:])
    for branch, rows in (("cond", [2, 3]), ("uncond", [0, 1])):
        got = sd.run(two, ops=[Add("unet.mid", v, spatial="keep", where=at(branch=branch))],
                     capture="unet.mid").cache["unet.mid"]
        changed = [r for r in range(4) if not torch.equal(got[r], base[r])]
        assert changed == rows, branch
    got = sd.run(two, ops=[Add("unet.mid", v, spatial="keep", where=at(branch="cond", items=1))],
                 capture="unet.mid").cache["unet.mid"]
    assert [r for r in range(4) if not torch.equal(got[r], base[r])] == [3]
    # text-encoder ops: branch="cond" edits the prompt call only, the negative prompt's call stays clean
    # (CLIP is causal: positions before the noised token 3 keep their values)
    te = sd.run(two, ops=[Noise("text_encoder.embed", std=1.0, where=at(pos=3, branch="cond"))],
                capture="text_encoder.blocks.0.resid_post").cache["text_encoder.blocks.0.resid_post"]
    ref = sd.run(two, capture="text_encoder.blocks.0.resid_post").cache["text_encoder.blocks.0.resid_post"]
    assert te.shape[0] == 2  # two calls: the prompts, then the negative prompts
    assert torch.equal(te[1], ref[1]) and torch.equal(te[0, :, :3], ref[0, :, :3])
    assert not torch.equal(te[0, 0, 3], ref[0, 0, 3]) and not torch.equal(te[0, 1, 3], ref[0, 1, 3])


def test_streams_select_the_joint_block_output():
    lm = interp.attach(tiny_sd3())
    s = Sampling(PROMPT, seed=0, steps=1, guidance=3.0, options=SD3_OPTIONS)
    v = torch.randn(16)
    a = lm.run(s, ops=[Add("transformer.blocks.0", v, where=at(stream="txt"))]).output.pred
    b = lm.run(s, ops=[Add("transformer.blocks.0.txt", v)]).output.pred
    c = lm.run(s, ops=[Add("transformer.blocks.0", v)]).output.pred  # no stream: the img stream
    d = lm.run(s, ops=[Add("transformer.blocks.0.img", v)]).output.pred
    assert torch.equal(a, b) and torch.equal(c, d) and not torch.equal(a, c)


def test_out_of_range_steps_and_misplaced_selectors_are_clear_errors(sd, spec):
    with pytest.raises(PositionError, match=r"out of range: this run has 3 denoising steps"):
        sd.run(spec, ops=[Ablate("unet.mid", where=at(steps=(2, 5)))])
    with pytest.raises(PositionError, match="runs before the denoising loop"):
        sd.run(spec, ops=[Add("text_encoder.final", torch.ones(32), where=at(steps=(0, 1)))])
    flux = interp.attach(tiny_flux())
    with pytest.raises(OpNeverFiredError, match="no rows of branch 'uncond'"):  # no CFG: there are no uncond rows
        flux.run(Sampling(PROMPT, steps=1, options=FLUX_OPTIONS),
                 ops=[Add("transformer.single.0", torch.ones(16), where=at(branch="uncond"))])
    gpt = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(PositionError, match="no classifier-free-guidance branches"):
        interp.attach(gpt).run(torch.randn(2, 3, 4), ops=[interp.Ablate("module:0", where=at(branch="cond"))])
    with pytest.raises(PositionError, match=r"steps=\(0, 4\) for .unet.mid. are out of range"):
        restore("unet.mid", record(sd, spec, "unet.mid"), steps=(0, 4))


def test_grid_rows_share_noise_and_match_single_runs_under_any_budget(sd, spec, clean):
    corrupt = Noise("text_encoder.embed", std=2.0, seed=7, where=at(pos=Tokens("red"), branch="cond"))
    rows = [[], restore("unet.mid", clean), restore("unet.up.1", clean, steps=(0, 2))]
    metric = pred_distance(clean.output)
    big = sample_grid(sd, spec, rows, metric, shared=[corrupt], progress=False)
    small = sample_grid(sd, spec, rows, metric, shared=[corrupt], chunk_rows=1, progress=False)
    assert big.stats["chunk_rows"] >= 3 and small.stats["chunk_rows"] == 1
    torch.testing.assert_close(big.values, small.values, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(big.values[0], big.base, atol=1e-5, rtol=1e-4)   # an empty row = the base run
    single = metric(sd.run(spec, ops=[corrupt, *rows[1]]).output)
    torch.testing.assert_close(big.values[1], single, atol=1e-5, rtol=1e-4)
    assert float(big.base[0]) > 0.01  # the corruption moved the predictions


def test_step_prefix_reuse_skips_the_base_steps_and_keeps_the_values(sd, spec, clean):
    """Rows acting only from step s on follow the base run before s: sample_grid groups them by s and replays
    the base run's predictions for those steps. Same values as computing every step; the UNet sees exactly
    the images of the steps that are computed."""
    from interp.diffusion import item_bytes

    corrupt = Noise("text_encoder.embed", std=2.0, seed=7, where=at(pos=Tokens("red"), branch="cond"))
    rows = [[]] + [restore(site, clean, steps=w) for site in ("unet.mid", "unet.up.1", "unet.down.0", "unet.down.1")
                   for w in (None, (1, 3), 2)]
    rows.append(restore("unet.mid", clean, steps=[2, 1], branch="cond"))
    metric = pred_distance(clean.output)
    item_bytes(sd, spec)  # the memory probe (one 1-step run, cached) is not part of the count
    images = []
    unet = sd.adapter.pipe.unet
    h = unet.conv_in.register_forward_hook(lambda m, i, o: images.append(i[0].shape[0]))
    try:
        fast = sample_grid(sd, spec, rows, metric, shared=[corrupt], progress=False)
        n_fast, images[:] = sum(images), []
        slow = sample_grid(sd, spec, rows, metric, shared=[corrupt], progress=False, reuse_steps=False)
        n_slow = sum(images)
    finally:
        h.remove()
    assert "forward" not in vars(unet)  # the replaying forward is removed after the run
    torch.testing.assert_close(fast.values, slow.values, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fast.base, slow.base, atol=1e-6, rtol=1e-5)
    by_step = {0: 4, 1: 5, 2: 5}  # first edited step -> rows (the empty row computes the last step only)
    assert fast.stats["rows_by_first_step"] == by_step
    # 3 steps x 2 CFG rows per image: the base run, then every row from its first step on
    assert n_slow == 6 * (1 + len(rows))
    assert n_fast == 6 + sum(2 * (3 - s) * n for s, n in by_step.items()), (n_fast, n_slow)
    assert fast.stats["denoiser_steps_run"] == sum((3 - s) * n for s, n in by_step.items()) / (3 * len(rows))
    assert n_fast < 0.7 * n_slow
    small = sample_grid(sd, spec, rows, metric, shared=[corrupt], progress=False, chunk_rows=3)  # chunks of 3 rows
    torch.testing.assert_close(small.values, slow.values, atol=1e-5, rtol=1e-4)


def test_step_prefix_reuse_with_a_shared_denoiser_op_and_empty_rows(sd, spec, clean):
    """A shared op inside the denoiser must still fire in every chunk: a chunk of rows without ops computes
    the last step (instead of replaying all of them), and the values equal a run without the reuse."""
    shared = [Noise("unet.mid", std=0.5, seed=2)]
    rows = [[], [], restore("unet.up.1", clean, steps=2)]
    metric = pred_distance(clean.output)
    fast = sample_grid(sd, spec, rows, metric, shared=shared, progress=False, chunk_rows=2)
    slow = sample_grid(sd, spec, rows, metric, shared=shared, progress=False, reuse_steps=False)
    torch.testing.assert_close(fast.values, slow.values, atol=1e-5, rtol=1e-4)
    assert fast.stats["rows_by_first_step"] == {2: 3}


def test_step_prefix_reuse_keeps_an_instance_level_forward(sd, spec, clean):
    """A denoiser whose forward is already replaced on the instance (accelerate's offload hooks do that):
    the replay calls it for the computed steps and puts it back afterwards."""
    from interp.diffusion import item_bytes

    item_bytes(sd, spec)
    unet = sd.adapter.pipe.unet
    calls = []
    cls_forward = type(unet).forward

    def wrapper(*a, **k):
        calls.append(1)
        return cls_forward(unet, *a, **k)

    unet.forward = wrapper
    try:
        sample_grid(sd, spec, [restore("unet.mid", clean, steps=2)], pred_distance(clean.output), progress=False)
        assert vars(unet)["forward"] is wrapper
        assert len(calls) == 3 + 1  # the base run's 3 steps, then the row's step 2 only
    finally:
        del unet.forward


def test_token_influence_matches_a_direct_denoiser_call(sd, spec):
    r = token_influence(sd, spec, positions=[0, 3])
    assert r.axes == ("step", "token") and r.coords["token"] == ["0:<|startoftext|>", "3:red"]
    # reference for step 1, token 3: the UNet called by hand on the clean run's x_t with the token zeroed
    ad = sd.adapter
    ad.record_inputs = True
    try:
        out = sd.run(spec).output
    finally:
        ad.record_inputs = False
    kw, branches, step = out.inputs[1]
    cond = branches["cond"]
    x, ctx = kw["sample"][cond], kw["encoder_hidden_states"][cond].clone()
    unet = sd.adapter.pipe.unet
    with torch.no_grad():
        full = unet(x, kw["timestep"], encoder_hidden_states=ctx).sample
    ctx[:, 3] = 0
    with torch.no_grad():
        cut = unet(x, kw["timestep"], encoder_hidden_states=ctx).sample
    want = float((full - cut).norm() / full.norm())
    assert abs(float(r.values[1, 1]) - want) < 1e-5 and want > 0


def test_token_influence_is_zero_when_the_denoiser_ignores_the_text():
    pipe = tiny_sd()
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if ".attn2.to_v." in name:
                p.zero_()
    r = token_influence(interp.attach(pipe), Sampling(PROMPT, steps=2, guidance=3.0))
    assert r.values.abs().max() < 1e-5  # float noise of batched convolutions; with the text read it is ~1e-2


def test_flux_true_cfg_calls_are_labelled_and_edited_per_branch():
    """Flux true CFG runs the transformer twice per step (prompt, then negative prompt) with N rows each:
    the second call of a step is the uncond branch, both calls carry the step index, branch ops edit
    only their call, and restoring a recording of both branches is the identity."""
    flux = interp.attach(tiny_flux())
    opts = {**FLUX_OPTIONS, "true_cfg_scale": 2.0, "negative_prompt": "a blue square"}
    spec = Sampling(PROMPT, seed=0, steps=2, options=opts)
    rec = record(flux, spec, "transformer.single.0")
    calls = rec.calls("transformer.single.0")
    assert [(c["step"], c["branches"]) for c, _ in calls] == [
        (0, {"cond": [0]}), (0, {"uncond": [0]}), (1, {"cond": [0]}), (1, {"uncond": [0]})]
    base = torch.stack([t for _, t in calls])
    v = torch.ones(16)
    for branch, changed_call in (("cond", 0), ("uncond", 1)):
        got = flux.run(spec, ops=[Add("transformer.single.0", v, where=at(branch=branch, steps=(0, 1)))],
                       capture="transformer.single.0").cache["transformer.single.0"]
        assert [i for i in range(2) if not torch.equal(got[i], base[i])] == [changed_call], branch
        assert torch.allclose(got[changed_call], base[changed_call] + v)
    same = flux.run(spec, ops=restore("transformer.single.0", rec)).output
    assert torch.equal(same.images, rec.output.images)
