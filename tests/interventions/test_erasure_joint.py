"""Erasure on joint attention (interventions/erasure/joint.py) on the trained shapes-flow model.

Checked: the LEACE fold is exact algebra (edited layer == eraser then original layer) and removes the concept's
per-position mean offset from the context states; the ridge edit moves the concept's text keys onto its guides'
and keeps the preserve prompts' keys; the written checkpoint reloads bit-identically with the stock diffusers
StableDiffusion3Pipeline (no interp import in the loading code path) and the source folder is untouched.
"""
import copy

import pytest
import torch

import interp
from interp.zoo.catalog import weights_path
from interventions.checkpoint import folder_hash, write_checkpoint
from interventions.erasure import report as R
from interventions.erasure.core import capture
from interventions.erasure.joint import _joint_keys, context_leace, joint_erase, joint_kv
from interventions.erasure.methods import _prompt_list, _split, _starts, _transformer_inputs

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def flow():
    return interp.zoo.load("shapes-flow")


@pytest.fixture(scope="module")
def concept():
    c = R.shapes_concept("red")
    # a quarter of the captions keeps the test fast; the fit is the same code path
    return type(c)(c.word, c.sources[::4], c.guides[::4], c.preserve[::4], c.guide_words)


def test_context_leace_fold_is_exact_and_erases_the_offset(flow, concept):
    edit = context_leace(flow, concept)
    tr = flow.transformer
    er = edit.erasers["module:context_embedder:input"]
    x = torch.randn(5, 7, tr.context_embedder.in_features, dtype=torch.float64)
    W, b = edit.tensors["transformer.context_embedder.weight"], edit.tensors["transformer.context_embedder.bias"]
    P = er.projection().double()
    ref = ((x - (x - er.mu.double()) @ P.T) @ tr.context_embedder.weight.double().T) + tr.context_embedder.bias.double()
    torch.testing.assert_close(x @ W.double().T + b.double(), ref, atol=1e-5, rtol=1e-5)
    # after the eraser, the concept prompts' and the other prompts' mean state agree at the concept position
    prompts, n_pres = _prompt_list(concept, True, ())
    inputs, keys, tok = _transformer_inputs(flow, prompts)
    s = _starts(tok, concept)[0]
    xs = capture(tr, inputs, ["module:context_embedder:input"], batch_keys=keys)["module:context_embedder:input"]
    n = len(concept.sources)
    src, pres = xs[:n, s], xs[len(prompts) - n_pres:, s]
    gap = lambda a, c: float((a.mean(0) - c.mean(0)).norm())  # noqa: E731
    erase = lambda v: v - (v - er.mu.double()) @ P.T  # noqa: E731
    assert gap(erase(src), erase(pres)) < 1e-6 * max(1.0, gap(src, pres)) and gap(src, pres) > 0.1
    assert edit.manifest()["eraser_rank"][0] >= 1


def test_joint_kv_moves_concept_keys_to_the_guides(flow, concept):
    edit = joint_kv(flow, concept, sigmas=(0.5,), pooled=False)
    tr = flow.transformer
    prompts, n_pres = _prompt_list(concept, True)
    starts = _starts(flow.tokenizer, concept)
    keys = _joint_keys(flow, prompts, (0.5,), 0)
    for i, x in keys.items():
        src, guide, pres = _split(x[0], concept, n_pres)
        k = torch.cat([src[j, p:] for j, p in enumerate(starts)])
        g = torch.cat([guide[j, p:] for j, p in enumerate(starts)])
        lin = tr.transformer_blocks[i].attn.add_k_proj
        W0 = lin.weight.detach().double()
        W1 = edit.tensors[f"transformer.transformer_blocks.{i}.attn.add_k_proj.weight"]
        before, after = float((k @ W0.T - g @ W0.T).norm()), float((k @ W1.double().T - g @ W0.T).norm())
        kept = float((pres.reshape(-1, pres.shape[-1]) @ (W1.double() - W0).T).norm() /
                     (pres.reshape(-1, pres.shape[-1]) @ W0.T).norm())
        assert after < 0.6 * before, (i, before, after)
        assert kept < 0.2, (i, kept)


def test_checkpoint_reloads_bit_identically_with_stock_diffusers(flow, concept, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    edit = joint_erase(flow, concept, sigmas=(0.5,))
    src = weights_path("shapes-flow")
    h = folder_hash(src)
    dest = write_checkpoint(edit.applied(flow), tmp_path / "joint", edit, source=src)
    assert folder_hash(src) == h  # the source is never touched
    stock = StableDiffusion3Pipeline.from_pretrained(str(dest), text_encoder_3=None, tokenizer_3=None,
                                                     local_files_only=True)
    for name, value in edit.tensors.items():
        got = stock.transformer.get_parameter(name.split(".", 1)[1])
        assert torch.equal(got, value.to(got.dtype)), name
    untouched = "transformer.transformer_blocks.0.attn.to_q.weight"
    assert torch.equal(stock.transformer.get_parameter(untouched.split(".", 1)[1]),
                       flow.transformer.get_parameter(untouched.split(".", 1)[1]))
    assert flow.transformer.context_embedder.weight.data_ptr() != 0  # the original pipeline object is unchanged:
    orig = copy.deepcopy(flow.transformer.context_embedder.weight)
    assert not torch.equal(orig, edit.tensors["transformer.context_embedder.weight"].to(orig.dtype))


def test_joint_methods_refuse_a_unet():
    pipe = interp.zoo.load("shapes-diffusion")
    with pytest.raises(ValueError, match="SD3 or Flux"):
        context_leace(pipe, R.shapes_concept("red"))
