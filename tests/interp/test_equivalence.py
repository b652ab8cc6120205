"""interp against TransformerLens and nnsight on the same weights."""
import copy

import pytest
import torch

import interp
from interp import Patch, at
from interventions.patching import patch_sweep

from ..conftest import tiny_gpt2

CLEAN = "The Eiffel Tower is located in the city of"
CORRUPT = "The Colosseum is located in the city of"


def _ids(tok, text):
    return tok(text, return_tensors="pt")["input_ids"]


def _bridge(hf_model):
    pytest.importorskip("transformer_lens")
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    return build_bridge_from_module(copy.deepcopy(hf_model), "GPT2LMHeadModel", hf_config=hf_model.config)


def test_resid_pre_sweep_equals_transformer_lens(gpt2_tokenizer):
    from transformer_lens import patching

    model = tiny_gpt2(n_layer=3, vocab=50257)
    bridge = _bridge(model)
    clean, corrupt = _ids(gpt2_tokenizer, CLEAN), _ids(gpt2_tokenizer, CORRUPT)
    paris, rome = _ids(gpt2_tokenizer, " Paris")[0, 0], _ids(gpt2_tokenizer, " Rome")[0, 0]
    _, clean_cache = bridge.run_with_cache(clean)
    tl = patching.get_act_patch_resid_pre(bridge, corrupt, clean_cache,
                                          lambda logits: logits[0, -1, paris] - logits[0, -1, rome])
    lm = interp.attach(model)
    ours = patch_sweep(lm, clean, corrupt, "resid_pre", metric=lambda lg: lg[:, -1, paris] - lg[:, -1, rome],
                       normalize=False, progress=False)
    assert ours.shape == tuple(tl.shape) == (3, clean.shape[1])
    torch.testing.assert_close(ours.values, tl.detach().float(), rtol=0, atol=1e-5)
    assert ours.values.abs().max() > 1e-3  # the sweep measured something


def test_attach_bridge_uses_tl_hook_names_as_aliases(gpt2_tokenizer):
    model = tiny_gpt2(n_layer=2)
    bridge = _bridge(model)
    tl = interp.attach(bridge)
    hf = interp.attach(model)
    ids = _ids(gpt2_tokenizer, CLEAN)
    a = tl.capture(ids, ["blocks.1.hook_resid_pre", "blocks.0.attn.z"])
    b = hf.capture(ids, ["blocks.1.resid_pre", "blocks.0.attn.z"])
    assert "blocks.1.resid_pre" in a  # the alias resolves to the canonical site
    torch.testing.assert_close(a["blocks.1.resid_pre"], b["blocks.1.resid_pre"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a["blocks.0.attn.z"], b["blocks.0.attn.z"], rtol=1e-5, atol=1e-5)
    # a patch through the TL adapter equals the same patch on the HF model
    src = hf.capture(_ids(gpt2_tokenizer, CORRUPT), "blocks.1.resid_pre")["blocks.1.resid_pre"]
    op = lambda name: [Patch(name, src, where=at(pos=[2, 3]))]
    torch.testing.assert_close(tl.run(ids, ops=op("blocks.1.hook_resid_pre")).logits,
                               hf.run(ids, ops=op("blocks.1.resid_pre")).logits, rtol=1e-4, atol=1e-4)


def test_single_patch_equals_nnsight(gpt2_tokenizer):
    nnsight = pytest.importorskip("nnsight")
    model = tiny_gpt2(n_layer=3)
    clean, corrupt = _ids(gpt2_tokenizer, CLEAN), _ids(gpt2_tokenizer, CORRUPT)
    lm = interp.attach(model)
    src = lm.capture(clean, "blocks.2.resid_pre")["blocks.2.resid_pre"]
    ours = lm.run(corrupt, ops=[Patch("blocks.2.resid_pre", src, where=at(pos=4))]).logits

    nm = nnsight.NNsight(model)
    with nm.trace(corrupt):
        nm.transformer.h[1].output[:, 4, :] = src[:, 4, :]  # output of block 1 = input of block 2
        theirs = nm.output.save()
    theirs = theirs.logits if hasattr(theirs, "logits") else theirs[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, lm.run(corrupt).logits)  # the patch did something

    wrapped = interp.attach(nnsight.NNsight(model))  # interp attaches to the module nnsight wraps
    assert torch.equal(wrapped.run(corrupt, ops=[Patch("blocks.2.resid_pre", src, where=at(pos=4))]).logits, ours)
    assert interp.hook_count(model) == 0
