"""A capture requested under a TransformerLens hook name is readable under that name (and the canonical one)."""
import copy

import pytest
import torch

import interp

from ..conftest import tiny_gpt2


def test_capture_under_a_tl_name_returns_the_tl_key(gpt2_tokenizer):
    pytest.importorskip("transformer_lens")
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    model = tiny_gpt2(n_layer=2)
    bridge = build_bridge_from_module(copy.deepcopy(model), "GPT2LMHeadModel", hf_config=model.config)
    ids = gpt2_tokenizer("The Eiffel Tower is in", return_tensors="pt")["input_ids"]
    cache = interp.attach(bridge).run(ids, capture=["blocks.1.hook_resid_pre", "blocks.0.hook_resid_post"]).cache
    hf = interp.attach(model).capture(ids, ["blocks.1.resid_pre", "blocks.0.resid_post"])
    for tl_name, name in (("blocks.1.hook_resid_pre", "blocks.1.resid_pre"),
                          ("blocks.0.hook_resid_post", "blocks.0.resid_post")):
        assert tl_name in cache and name in cache
        torch.testing.assert_close(cache[tl_name], hf[name], rtol=1e-5, atol=1e-5)
        assert cache[tl_name] is cache[name]
    assert "blocks.1.hook_mlp_out" not in cache  # an alias of a site that was not captured
    with pytest.raises(KeyError):
        cache["blocks.1.hook_mlp_out"]
