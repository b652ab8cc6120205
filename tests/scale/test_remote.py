"""nnsight models meant for its remote backend, offline: what interp can and cannot do with them.

A not-dispatched nnsight model (how a model used with `trace(..., remote=True)` sits on the client)
is a meta-device skeleton: interp resolves its sites (module paths for writing nnsight code) but
refuses to run it with an error that says why and what to do; once dispatched (weights loaded here)
and attached again, interp's sweeps equal those on the plain HF model bit for bit.
"""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

import interp
from interp.sharding import MetaWeightsError

from .conftest import W

nnsight_tf = pytest.importorskip("nnsight.modeling.transformers")


def test_undispatched_nnsight_model_has_sites_but_refuses_to_run(model_dir, gpt2_tokenizer):
    wrapped = nnsight_tf.TransformersModel(str(model_dir), tokenizer=gpt2_tokenizer, task="text-generation")
    assert not wrapped.dispatched
    lm = interp.attach(wrapped)
    assert lm.site("blocks.2.mlp.out").module == "model.layers.2.mlp"  # the path nnsight code would use
    assert len(lm.site_names("blocks.*.resid_pre")) == 4
    with pytest.raises(MetaWeightsError, match=r"meta device.*remote=True.*model\.dispatch\(\)"):
        lm.run(W.prompts()[0])


def test_dispatched_nnsight_model_equals_the_plain_model(model_dir, gpt2_tokenizer):
    wrapped = nnsight_tf.TransformersModel(str(model_dir), tokenizer=gpt2_tokenizer, task="text-generation")
    before = interp.attach(wrapped)
    wrapped.dispatch()  # loads the weights into a new module: attach again afterwards
    lm = interp.attach(wrapped)
    with pytest.raises(MetaWeightsError):
        before.run(W.prompts()[0])
    ref = interp.attach(LlamaForCausalLM.from_pretrained(model_dir).eval())
    base = W.prompts()[1]
    got = lm.run_grid(base, W.mixed_rows(lm)[::3], W.last_logits, progress=False).values
    want = ref.run_grid(base, W.mixed_rows(ref)[::3], W.last_logits, progress=False).values
    assert torch.equal(got, want)
