"""The closed-form ridge editor and the pipeline methods built on it, on tiny random diffusers pipelines:
the solve is the minimiser of its objective; each method moves the concept's projections to the guides'
and keeps the preserved prompts'."""

import pytest
import torch

from interventions.erasure import (
    Concept,
    choose_window,
    cross_attention_layers,
    edit_start,
    erase,
    ridge_objective,
    ridge_solve,
    tokenize_like_pipeline,
)
from interventions.erasure.methods import _rows, _split, _starts, unet_cross_inputs

torch.set_num_threads(1)
COLOURS = ["red", "yellow", "green", "cyan", "blue", "magenta"]


@pytest.fixture(scope="module")
def pipe():
    from interp.zoo.architectures import build_diffusion_pipeline

    p = build_diffusion_pipeline(0, width=8)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def concept():
    from interp.zoo import shapes

    caps = [a.caption() for a in shapes.all_attributes()][::4]
    return Concept.from_prompts("red", caps, [c for c in COLOURS if c != "red"])


# ------------------------------------------------------------------------------------------ solve
def test_ridge_solve_is_the_minimiser():
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(5, 7, generator=g, dtype=torch.float64)
    k, v, c = (torch.randn(4, 7, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64),
               torch.randn(6, 7, generator=g, dtype=torch.float64))
    W = ridge_solve(W0, k, v, c, lam=0.3).requires_grad_(True)
    f = ridge_objective(W, W0, k, v, c, lam=0.3)
    (grad,) = torch.autograd.grad(f, W)
    assert grad.abs().max() < 1e-9
    for _ in range(5):  # any perturbation costs more
        d = torch.randn(5, 7, generator=g, dtype=torch.float64) * 1e-2
        assert ridge_objective(W.detach() + d, W0, k, v, c, 0.3) > f


def test_ridge_solve_limits():
    g = torch.Generator().manual_seed(1)
    W0 = torch.randn(3, 4, generator=g, dtype=torch.float64)
    k, v = torch.randn(2, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, generator=g, dtype=torch.float64)
    W = ridge_solve(W0, k, v, lam=1e-8)
    assert torch.allclose(k @ W.T, v, atol=1e-5)          # tiny lam: the edits are met exactly
    assert torch.allclose(ridge_solve(W0, k, v, lam=1e8), W0, atol=1e-6)  # huge lam: nothing moves
    c = torch.randn(2, 4, generator=g, dtype=torch.float64)
    Wp = ridge_solve(W0, k, v, c, lam=1e-8)
    assert torch.allclose(c @ Wp.T, c @ W0.T, atol=1e-5)  # 2 edits + 2 preserved keys in 4 dims: both met
    with pytest.raises(ValueError, match="do not fit"):
        ridge_solve(W0, torch.randn(2, 5), v)


# ------------------------------------------------------------------------------------------ prompts
def test_concept_prompts_and_alignment(pipe, concept):
    assert all("red" in s for s in concept.sources) and not any("red" in p for p in concept.preserve)
    assert concept.guides[0][0] == concept.sources[0].replace("red", "yellow")
    p = edit_start(pipe.tokenizer, concept.sources[0], concept.guides[0])
    ids = tokenize_like_pipeline(pipe.tokenizer, [concept.sources[0]])[0]
    assert pipe.tokenizer.decode([int(ids[p])]).strip() == "red"
    with pytest.raises(ValueError, match="same number of tokens"):
        edit_start(pipe.tokenizer, "a red circle", ["a reddish circle"])
    with pytest.raises(ValueError, match="none of the"):
        Concept.from_prompts("purple", concept.sources, ["blue"])
    with pytest.raises(ValueError, match="unknown erasure method"):
        erase(pipe, concept, "nope")
    with pytest.raises(ValueError, match="choose_window"):
        erase(pipe, concept, "locoedit")


# ------------------------------------------------------------------------------------------ methods
def _gaps(pipe, edited, concept, layer_target):
    """Relative distance of the concept's projections to the guides', and change of preserved projections."""
    x = unet_cross_inputs(pipe, [*concept.sources, *(g for gs in concept.guides for g in gs), *concept.preserve],
                          [layer_target.rsplit(".", 1)[0]], [layer_target.rsplit(".", 1)[1]])[layer_target]
    src, guide, pres = _split(x, concept, len(concept.preserve))
    starts = _starts(pipe.tokenizer, concept)
    W0 = pipe.unet.get_submodule(layer_target).weight.double()
    W1 = edited.unet.get_submodule(layer_target).weight.double()
    k, want = _rows(src, starts), _rows(guide, starts) @ W0.T
    before = ((k @ W0.T - want).norm() / want.norm()).item()
    after = ((k @ W1.T - want).norm() / want.norm()).item()
    p = pres.reshape(-1, x.shape[-1])
    drift = ((p @ W1.T - p @ W0.T).norm() / (p @ W0.T).norm()).item()
    return before, after, drift


@pytest.mark.parametrize("method,kw", [("uce", {}), ("time", {}), ("locoedit", {"layers": [1, 2]})])
def test_cross_attention_methods_map_concept_to_guides(pipe, concept, method, kw):
    edit = erase(pipe, concept, method, **kw)
    layers = cross_attention_layers(pipe.unet)
    chosen = [layers[i] for i in kw.get("layers", range(len(layers)))]
    assert sorted(edit.tensors) == sorted(f"unet.{l}.{t}.weight" for l in chosen for t in ("to_k", "to_v"))
    edited = edit.applied(pipe)
    for l in chosen:
        before, after, drift = _gaps(pipe, edited, concept, f"{l}.to_v")
        assert after < 0.35 * before, (method, l, before, after)
        if method != "time":  # UCE / LocoEdit preserve the other prompts' projections
            assert drift < 0.05, (method, l, drift)
    untouched = [l for l in layers if l not in chosen]
    for l in untouched:
        assert torch.equal(edited.unet.get_submodule(f"{l}.to_v").weight, pipe.unet.get_submodule(f"{l}.to_v").weight)
    # the original pipeline is unchanged by applied()
    assert edit.manifest()["method"] == method and edit.manifest()["layers"] == chosen


def _final_states(pipe, prompts):
    with torch.no_grad():
        return pipe.encode_prompt(list(prompts), "cpu", 1, False)[0].double()


@pytest.mark.parametrize("method,kw", [("quickfix", {}), ("hirm", {"steps": 100})])
def test_text_encoder_methods_move_concept_states(pipe, concept, method, kw):
    edit = erase(pipe, concept, method, **kw)
    assert all(k.startswith("text_encoder.") and ".layers.0." in k for k in edit.tensors)
    edited = edit.applied(pipe)
    starts = _starts(pipe.tokenizer, concept)
    guides = [g for gs in concept.guides for g in gs]
    g0 = _final_states(pipe, guides).reshape(len(concept.sources), -1, 16, 64).mean(1)
    s0, s1 = _final_states(pipe, concept.sources), _final_states(edited, concept.sources)
    before = (_rows(s0, starts) - _rows(g0, starts)).norm()
    after = (_rows(s1, starts) - _rows(g0, starts)).norm()
    p0, p1 = _final_states(pipe, concept.preserve), _final_states(edited, concept.preserve)
    assert after < 0.5 * before, (method, before, after)
    assert (p1 - p0).norm() / p0.norm() < 0.05


def test_leace_folded_into_cross_attention_removes_the_concept_linearly(pipe, concept):
    edit = erase(pipe, concept, "leace", contrast="all")
    assert edit.info["mean_preserved"] is True  # to_v's lost mean term moved into to_out.0's bias
    edited = edit.applied(pipe)
    layer = cross_attention_layers(pipe.unet)[0]
    prompts = [*concept.sources, *concept.preserve, ""]
    x = unet_cross_inputs(pipe, prompts, [layer], ["to_k"])[f"{layer}.to_k"]
    z = torch.zeros(x.shape[:2], dtype=torch.bool)
    for i, p in enumerate(_starts(pipe.tokenizer, concept)):
        z[i, p:] = True
    for W, equal in ((pipe.unet.get_submodule(f"{layer}.to_k").weight, False),
                     (edited.unet.get_submodule(f"{layer}.to_k").weight, True)):
        y = x @ W.double().T
        gap = (y[z].mean(0) - y[~z].mean(0)).norm() / y.std(0).norm()
        assert (gap < 1e-6) == equal, gap


def test_leace_fold_equals_project_ops_on_the_attention_inputs(pipe, concept):
    """The folded UNet computes exactly what the original computes with the erasers applied as Project ops
    at every to_k / to_v input (through the engine)."""
    import interp

    edit = erase(pipe, concept, "leace")
    edited = edit.applied(pipe)
    emb = pipe.encode_prompt([concept.sources[0], concept.preserve[0]], "cpu", 1, False)[0]
    g = torch.Generator().manual_seed(0)
    inputs = {
        "sample": torch.randn(2, 3, 32, 32, generator=g),
        "timestep": torch.tensor(400),
        "encoder_hidden_states": emb,
    }
    ops = [interp.Project(site, er.to(torch.float32)) for site, er in edit.erasers.items()]
    with torch.no_grad():
        want = interp.attach(pipe.unet).run(inputs, ops=ops).logits
        got = edited.unet(**inputs).sample
        plain = pipe.unet(**inputs).sample
    assert (got - want).abs().max() < 1e-4 * want.abs().max()
    assert (plain - want).abs().max() > 1e-3 * want.abs().max()
    bare = erase(pipe, concept, "leace", exact_mean=False)
    assert bare.info["mean_preserved"] is False and not any("to_out" in k for k in bare.tensors)


def test_leace_text_encoder_fold_is_exact(pipe, concept):
    edit = erase(pipe, concept, "leace", site="text_encoder")
    assert edit.info["mean_preserved"] is True and any(k.endswith(".bias") for k in edit.tensors)


def test_choose_window_picks_the_best_scoring_window(pipe, concept):
    target = cross_attention_layers(pipe.unet)[2]

    def score(p):  # lower when layer 2's value projection was edited (a stand-in for an image scorer)
        return -float(
            (p.unet.get_submodule(f"{target}.to_v").weight - pipe.unet.get_submodule(f"{target}.to_v").weight)
            .detach()
            .norm()
        )

    best, trace = choose_window(pipe, concept, 1, score)
    assert best == [2] and len(trace) == 4


def test_context_edit_on_sd3(concept):
    from interp.zoo.architectures import build_flow_pipeline

    p = build_flow_pipeline(0, heads=2, layers=2)
    small = Concept.from_prompts("red", [*concept.sources[:4], *concept.preserve[:8]], ["yellow", "blue"])
    edit = erase(p, small, "context")
    assert set(edit.tensors) == {
        "transformer.context_embedder.weight",
        "transformer.time_text_embed.text_embedder.linear_1.weight",
    }
    edited = edit.applied(p)

    def ctx(pp, prompts):
        emb = pp.encode_prompt(prompt=list(prompts), prompt_2=None, prompt_3=None, device="cpu",
                               do_classifier_free_guidance=False)[0]
        with torch.no_grad():
            return pp.transformer.context_embedder(emb).double()

    starts = _starts(p.tokenizer, small)
    want = (
        ctx(p, [g for gs in small.guides for g in gs])
        .reshape(len(small.sources), 2, *ctx(p, small.sources[:1]).shape[1:])
        .mean(1)
    )
    before = (_rows(ctx(p, small.sources), starts) - _rows(want, starts)).norm()
    after = (_rows(ctx(edited, small.sources), starts) - _rows(want, starts)).norm()
    assert after < 0.35 * before
    pres_change = (ctx(edited, small.preserve) - ctx(p, small.preserve)).norm() / ctx(p, small.preserve).norm()
    assert pres_change < 0.05


class FluxLikePipeline:
    """A stand-in for FluxPipeline (whose T5 encoder cannot be built offline): a tiny real FluxTransformer2DModel,
    prompts encoded by a small CLIP text encoder through the same `encode_prompt` signature."""

    def __init__(self):
        from diffusers import FluxTransformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModel

        from interp.zoo.architectures import build_tokenizer

        torch.manual_seed(0)
        self.tokenizer_2 = build_tokenizer()
        tok = self.tokenizer_2
        self.text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=64,
                                                 num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                                                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                                 pad_token_id=tok.pad_token_id))
        self.transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=64,
                                                  pooled_projection_dim=64, axes_dims_rope=(2, 2, 4))

    def encode_prompt(self, prompt, prompt_2=None, device=None):
        ids = tokenize_like_pipeline(self.tokenizer_2, prompt)
        with torch.no_grad():
            out = self.text(ids)
        return out.last_hidden_state, out.pooler_output, torch.zeros(ids.shape[1], 3)


def test_context_edit_on_flux_transformer(concept):
    p = FluxLikePipeline()
    small = Concept.from_prompts("red", [*concept.sources[:4], *concept.preserve[:8]], ["yellow", "blue"])
    edit = erase(p, small, "context", lam=0.1)
    assert set(edit.tensors) == {
        "transformer.context_embedder.weight",
        "transformer.time_text_embed.text_embedder.linear_1.weight",
    }
    W0 = p.transformer.context_embedder.weight.double()
    W1 = edit.tensors["transformer.context_embedder.weight"].double()
    starts = _starts(p.tokenizer_2, small)
    emb = lambda prompts: p.encode_prompt(list(prompts))[0].double()
    k = _rows(emb(small.sources), starts)
    want = (
        _rows(emb([g for gs in small.guides for g in gs]).reshape(len(small.sources), 2, 16, 64).mean(1), starts) @ W0.T
    )
    assert (k @ W1.T - want).norm() < 0.35 * (k @ W0.T - want).norm()
    c = emb(small.preserve).reshape(-1, 64)
    assert (c @ W1.T - c @ W0.T).norm() < 0.05 * (c @ W0.T).norm()


def test_hirm_random_target_and_errors(pipe, concept):
    from interventions.erasure import hirm

    edit = hirm(pipe, concept, steps=40, target="random", seed=3)
    f0, f1 = edit.info["forget_loss"]
    assert f1 < 0.5 * f0 and edit.info["target"] == "random"
    with pytest.raises(ValueError, match="'guide' or 'random'"):
        hirm(pipe, concept, steps=1, target="super")
    with pytest.raises(KeyError, match="no module"):
        hirm(pipe, concept, steps=1, block="encoder.layers.9")


def test_leace_aligned_contrast_also_equalises_concept_means(pipe, concept):
    edit = erase(pipe, concept, "leace", contrast="aligned")
    assert edit.info["contrast"] == "aligned" and edit.info["mean_preserved"] is True
    layer = cross_attention_layers(pipe.unet)[0]
    x = unet_cross_inputs(pipe, [*concept.sources, *concept.preserve], [layer], ["to_k"])[f"{layer}.to_k"]
    p0 = min(_starts(pipe.tokenizer, concept))
    z = torch.zeros(x.shape[:2], dtype=torch.bool)
    z[: len(concept.sources), p0:] = True
    y = edit.erasers[f"module:{layer}.to_k:input"](x[:, p0:])
    zz = z[:, p0:]
    assert (y[zz].mean(0) - y[~zz].mean(0)).norm() < 1e-6 * y.std(0).norm()
    with pytest.raises(ValueError, match="contrast"):
        erase(pipe, concept, "leace", contrast="some")


def test_leace_offsets_contrast_erases_the_concept_position_by_position(pipe, concept):
    """The default contrast: at each position from the concept word on (each of the next 8, then the rest
    pooled), the concept prompts' mean equals the other prompts' mean after the eraser, while what tells
    the positions apart (which word stands there) is kept; the global mean is kept too."""
    from interventions.erasure.methods import OFFSET_POSITIONS

    edit = erase(pipe, concept, "leace")
    assert edit.info["contrast"] == "offsets" and edit.info["mean_preserved"] is True
    assert 1 < max(edit.info["eraser_rank"]) <= OFFSET_POSITIONS + 1
    layer = cross_attention_layers(pipe.unet)[0]
    x = unet_cross_inputs(pipe, [*concept.sources, *concept.preserve], [layer], ["to_k"])[f"{layer}.to_k"]
    starts = _starts(pipe.tokenizer, concept)
    p0 = min(starts)
    er = edit.erasers[f"module:{layer}.to_k:input"]
    x = x[:, p0:].double()
    y = er(x)
    n = len(concept.sources)
    z = torch.zeros(x.shape[:2], dtype=torch.bool)
    for i, p in enumerate(starts):
        z[i, p - p0:] = True
    groups = [[t] for t in range(OFFSET_POSITIONS)] + [list(range(OFFSET_POSITIONS, x.shape[1]))]
    between_before, between_after = [], []
    for cols in groups:
        yc, zc, xc = y[:, cols], z[:, cols], x[:, cols]
        if zc.any() and (~zc).any():
            gap = (yc[zc].mean(0) - yc[~zc].mean(0)).norm() / y.reshape(-1, y.shape[-1]).std(0).norm()
            assert gap < 1e-6, (cols[:2], gap)
            before = (xc[zc].mean(0) - xc[~zc].mean(0)).norm() / x.reshape(-1, x.shape[-1]).std(0).norm()
            assert before > 1e-3  # there was something to erase at this position
        between_before.append(xc[n:].reshape(-1, x.shape[-1]).mean(0))
        between_after.append(yc[n:].reshape(-1, x.shape[-1]).mean(0))
    # the positions still differ from each other as much as before (the words there are not erased)
    d0 = torch.stack(between_before).diff(dim=0).norm(dim=-1)
    d1 = torch.stack(between_after).diff(dim=0).norm(dim=-1)
    assert (d1 / d0).min() > 0.8, (d1 / d0)
    flat_x, flat_y = x.reshape(-1, x.shape[-1]), y.reshape(-1, x.shape[-1])
    assert (flat_y.mean(0) - flat_x.mean(0)).norm() < 1e-6 * flat_x.std(0).norm()


def test_hirm_and_the_zoo_builders_leave_the_global_rng_alone(pipe, concept):
    """No global reseed: torch's RNG state is the same before and after a HiRM fit and a zoo build, and two
    fits with one seed are identical (the fine-tune draws no global random numbers)."""
    from interp.zoo.architectures import build_diffusion_pipeline
    from interventions.erasure import hirm

    torch.manual_seed(1234)
    state = torch.get_rng_state()
    a = hirm(pipe, concept, steps=3, seed=5)
    build_diffusion_pipeline(7, width=8)
    assert torch.equal(torch.get_rng_state(), state)
    torch.rand(10)  # another global state: the same fit
    b = hirm(pipe, concept, steps=3, seed=5)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
